"""Graceful shutdown on a real broker and a real case store (where the task ledger is): a worker
told to stop while a slow handler runs lets it finish within ``shutdown_grace``, sends its receipt
and commits, so the next instance does not run it again; a handler still running when the grace
ends is cancelled, its claim given up and its record left uncommitted, so the next instance runs
it, once, and sends the one receipt."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import SecretStr

from dsrflow import codec, topics
from dsrflow.events import TaskAssigned
from dsrflow.registry import SystemDeclaration
from dsrflow.rights import Action, IdentifierType, ReceiptStatus
from dsrflow.settings import Settings
from dsrflow.testing.worker import make_task
from dsrflow.worker import Result, TaskContext, Worker
from tests.integration.receipts import Receipts

pytestmark = [pytest.mark.kafka, pytest.mark.pg]

TIMEOUT = 60.0  # any one wait
TEST_TIMEOUT = 150.0  # a whole test




def slow_worker(system: str, calls: list[uuid.UUID], cancelled: list[uuid.UUID], *, seconds: float,
                grace: timedelta) -> Worker:
    """Erases in ``seconds``; ``calls`` gets each task it starts, ``cancelled`` each one cancelled."""
    w = Worker(SystemDeclaration(name=system, identifier_types=(IdentifierType.email,), actions=(Action.erase,)),
               shutdown_grace=grace)

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        calls.append(ctx.task.task_id)
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            cancelled.append(ctx.task.task_id)
            raise
        return Result.succeeded(counts={"erased": 1})

    return w


def settings_for(broker: str, broker_kind: str, case_store: str, tmp_path: Path) -> Settings:
    return Settings(kafka_bootstrap=broker, pg_dsn=SecretStr(case_store), export_dir=tmp_path / "exports",
                    kafka_idempotent_producer=broker_kind != "tansu")


async def produce(settings: Settings, system: str, task: TaskAssigned) -> int:
    """Put the task on its system's topic (created first); its partition."""
    await topics.apply(settings.kafka_client_options(), topics.specs_for([system]))
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    try:
        value, headers = codec.encode(task, source="test")
        sent = await producer.send_and_wait(topics.tasks_topic(system), value, key=str(task.case_id).encode(),
                                            headers=headers)
    finally:
        await producer.stop()
    return int(sent.partition)


async def committed(broker: str, system: str, partition: int) -> int | None:
    probe = AIOKafkaConsumer(bootstrap_servers=broker, group_id=f"dsrflow-worker-{system}", enable_auto_commit=False)
    await probe.start()
    try:
        offset: int | None = await probe.committed(TopicPartition(topics.tasks_topic(system), partition))
        return offset
    finally:
        await probe.stop()


async def started_then_stopped(worker: Worker, settings: Settings, calls: list[Any]) -> float:
    """Run the worker until its handler has started, then tell it to stop; how long it took to exit."""
    stop = asyncio.Event()
    run = asyncio.create_task(worker.run(settings, stop=stop))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not calls:
            if run.done():
                run.result()
            assert time.monotonic() < deadline, "the handler did not start"
            await asyncio.sleep(0.05)
        stop.set()
        t0 = time.monotonic()
        await asyncio.wait_for(run, TIMEOUT)
        return time.monotonic() - t0
    finally:
        stop.set()  # pass or fail, the worker is gone before the next test
        if not run.done():
            done, _ = await asyncio.wait({run}, timeout=TIMEOUT)
            if not done:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)


async def test_a_handler_finishing_within_the_grace_reports_and_is_committed_and_not_run_again(
    broker: str, broker_kind: str, case_store: str, tmp_path: Path, receipts: Receipts,
) -> None:
    system = f"sd{uuid.uuid4().hex[:10]}"
    settings = settings_for(broker, broker_kind, case_store, tmp_path)
    task = make_task(system, Action.erase, {"email": "lan.nguyen@example.vn"})
    partition = await produce(settings, system, task)
    first_calls: list[uuid.UUID] = []
    async with asyncio.timeout(TEST_TIMEOUT):
        took = await started_then_stopped(
            slow_worker(system, first_calls, [], seconds=2.0, grace=timedelta(seconds=30)), settings, first_calls)
        assert took >= 1.0  # it waited for the handler
        receipt = await receipts.first(task.task_id)
        assert receipt.status == ReceiptStatus.succeeded and receipt.counts == {"erased": 1}
        assert await committed(broker, system, partition) is not None

        # The next instance: a task of the same case (the same partition) goes through it, the first does not.
        second_calls: list[uuid.UUID] = []
        stop = asyncio.Event()
        run = asyncio.create_task(slow_worker(system, second_calls, [], seconds=0.0, grace=timedelta(seconds=30))
                                  .run(settings, stop=stop))
        try:
            probe = make_task(system, Action.erase, {"email": "an.le@example.vn"}, case_id=task.case_id)
            await produce(settings, system, probe)
            await receipts.wait_for([probe.task_id])
            await receipts.read(1.0)
        finally:
            stop.set()
            await asyncio.wait_for(run, TIMEOUT)
    assert first_calls == [task.task_id] and second_calls == [probe.task_id]
    assert len(receipts.of(task.task_id)) == 1


async def test_a_handler_still_running_when_the_grace_ends_is_run_by_the_next_instance_once(
    broker: str, broker_kind: str, case_store: str, tmp_path: Path, receipts: Receipts,
) -> None:
    system = f"sd{uuid.uuid4().hex[:10]}"
    settings = settings_for(broker, broker_kind, case_store, tmp_path)
    task = make_task(system, Action.erase, {"email": "lan.nguyen@example.vn"})
    partition = await produce(settings, system, task)
    first_calls: list[uuid.UUID] = []
    cancelled: list[uuid.UUID] = []
    async with asyncio.timeout(TEST_TIMEOUT):
        took = await started_then_stopped(
            slow_worker(system, first_calls, cancelled, seconds=3600, grace=timedelta(milliseconds=500)),
            settings, first_calls)
        assert took < 30  # it did not wait for the handler
        assert cancelled == [task.task_id]
        await receipts.read(1.0)
        assert receipts.of(task.task_id) == []
        assert await committed(broker, system, partition) is None

        second_calls: list[uuid.UUID] = []
        stop = asyncio.Event()
        run = asyncio.create_task(slow_worker(system, second_calls, [], seconds=0.0, grace=timedelta(seconds=30))
                                  .run(settings, stop=stop))
        try:
            # Run at once: the claim was given up, there is no lease to wait out.
            receipt = await receipts.first(task.task_id)
            await receipts.read(1.0)  # any second copy arrives too
        finally:
            stop.set()
            await asyncio.wait_for(run, TIMEOUT)
    assert receipt.status == ReceiptStatus.succeeded and receipt.counts == {"erased": 1}
    assert first_calls == [task.task_id] and second_calls == [task.task_id]
    assert len(receipts.of(task.task_id)) == 1
    assert await committed(broker, system, partition) is not None
