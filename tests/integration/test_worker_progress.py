"""Progress reports of a long task on a real broker: ``TaskProgress`` records beside the receipts,
with the receipt's key (so on its partition, before the receipt), each with a random id of its
own, signed with the worker's credential like a receipt, throttled to one per
``progress_interval``, the note redacted, and none after the handler returned."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from pydantic import SecretStr

from dsrflow import auth, codec, signing, topics
from dsrflow.codec import header_map
from dsrflow.events import TaskProgress, TaskReceipt
from dsrflow.registry import SystemDeclaration
from dsrflow.rights import Action, IdentifierType, ReceiptStatus
from dsrflow.settings import Settings
from dsrflow.testing.worker import make_task
from dsrflow.worker import Result, TaskContext, Worker

pytestmark = [pytest.mark.kafka, pytest.mark.pg]

TIMEOUT = 60.0
EMAIL = "lan.nguyen@example.vn"


@pytest.fixture
async def receipts_topic(broker: str) -> AsyncIterator[AIOKafkaConsumer]:
    await topics.apply({"bootstrap_servers": broker}, topics.specs_for([]))  # receipts, dead letters
    consumer = AIOKafkaConsumer(topics.RECEIPTS, bootstrap_servers=broker, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


def long_eraser(system: str) -> Worker:
    """Reports progress as a long erasure would: at 0 s, 1.5 s (twice), and 3 s, with an interval of
    1 s. Sent: the first at once, the second at once (the interval is over), the third's values
    when the interval after the second ends (2.5 s); the last one is still waiting when the
    handler returns at 3 s, so it is never sent."""
    w = Worker(SystemDeclaration(name=system, identifier_types=(IdentifierType.email,), actions=(Action.erase,)),
               progress_interval=timedelta(seconds=1))

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        await ctx.progress(0, 3, note=f"looking up {ctx.identifiers[IdentifierType.email]}")
        await asyncio.sleep(1.5)
        await ctx.progress(1, 3, note="orders")
        await ctx.progress(2, 3, note="invoices")
        await asyncio.sleep(1.5)
        await ctx.progress(3, 3, note="too late")
        return Result.succeeded(counts={"erased": 3})

    return w


async def test_a_long_task_reports_progress_signed_before_its_receipt_on_its_partition(
    broker: str, broker_kind: str, case_store: str, tmp_path: Path, receipts_topic: AIOKafkaConsumer,
) -> None:
    system = f"kp{uuid.uuid4().hex[:10]}"
    key = auth.generate_credential(system)
    key.save(tmp_path / "worker.json")
    settings = Settings(kafka_bootstrap=broker, pg_dsn=SecretStr(case_store), export_dir=tmp_path / "exports",
                        kafka_idempotent_producer=broker_kind != "tansu", worker_credential=tmp_path / "worker.json")
    task = make_task(system, Action.erase, {"email": EMAIL})
    await topics.apply(settings.kafka_client_options(), topics.specs_for([system]))
    stop = asyncio.Event()
    run = asyncio.create_task(long_eraser(system).run(settings, stop=stop))
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    mine: list[ConsumerRecord[bytes, bytes]] = []
    try:
        value, headers = codec.encode(task, source="dsrflow/coordinator")
        await producer.send_and_wait(topics.tasks_topic(system), value, key=str(task.case_id).encode(),
                                     headers=headers)
        deadline = time.monotonic() + TIMEOUT
        while not any(header_map(r.headers)["ce_type"] == TaskReceipt.ce_type for r in mine):
            if run.done():
                run.result()
            assert time.monotonic() < deadline, "no receipt"
            for records in (await receipts_topic.getmany(timeout_ms=300)).values():
                mine += [r for r in records if header_map(r.headers).get("ce_subject") == str(task.case_id)]
        await asyncio.sleep(1.5)  # a report that was still due would have come by now
        for records in (await receipts_topic.getmany(timeout_ms=500)).values():
            mine += [r for r in records if header_map(r.headers).get("ce_subject") == str(task.case_id)]
    finally:
        await producer.stop()
        stop.set()
        await asyncio.wait_for(run, TIMEOUT)

    types = [header_map(r.headers)["ce_type"] for r in mine]
    assert types == [TaskProgress.ce_type] * 3 + [TaskReceipt.ce_type]  # in order, none after the receipt
    assert {r.partition for r in mine} == {mine[-1].partition}
    assert {r.key for r in mine} == {str(task.case_id).encode()}
    reports = [codec.decode(r.value, r.headers, TaskProgress).data for r in mine[:3]]
    assert [(p.seq, p.done, p.total, p.note) for p in reports] == [
        (1, 0, 3, "looking up [redacted]"), (2, 1, 3, "orders"), (3, 2, 3, "invoices")]
    assert {(p.task_id, p.case_id, p.system, p.attempt) for p in reports} == {
        (task.task_id, task.case_id, system, 1)}
    assert all(EMAIL.encode() not in r.value for r in mine)
    receipt = codec.decode(mine[-1].value, mine[-1].headers, TaskReceipt).data
    assert receipt.status == ReceiptStatus.succeeded and receipt.counts == {"erased": 3}

    ids = [header_map(r.headers)["ce_id"] for r in mine]
    assert len(set(ids)) == 4
    for ce_id in ids[:3]:
        assert uuid.UUID(ce_id).version == 4  # random: another report's id cannot be guessed from one
    public = {key.key_id: key.private_key.public_key()}
    for r in mine:  # the coordinator admits reports as it admits receipts: by the system's signature
        ce = header_map(r.headers)
        assert ce["ce_source"] == f"dsrflow/worker/{system}"
        assert signing.verify_headers(public, list(r.headers), ce_id=ce["ce_id"], ce_source=ce["ce_source"],
                                      value=r.value) == key.key_id
