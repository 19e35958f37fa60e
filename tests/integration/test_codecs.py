"""Tasks that a foreign client compressed (gzip, snappy, lz4, zstd: librdkafka and the Java client
compress whenever a producer or a topic's ``compression.type`` says so) reach a worker's handlers,
and an undecodable one among them is dead-lettered while the worker keeps running."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from dsrflow import codec, topics
from dsrflow.codec import header_map, read_dead_letter
from dsrflow.rights import Action, ReceiptStatus
from dsrflow.settings import Settings
from dsrflow.testing.worker import make_task
from tests.conftest import CODECS, librdkafka_produce
from tests.integration.test_worker_kafka import TIMEOUT, Collector, collectors, receipt_of, tiny_worker

pytestmark = [pytest.mark.kafka, pytest.mark.pg]
__all__ = ["collectors"]  # the fixture, imported for its side effect on this module


async def test_worker_handles_tasks_compressed_in_every_codec(
    broker: str, case_store: str, tmp_path: Path, collectors: tuple[Collector, Collector]
) -> None:
    receipts, dead = collectors
    system = f"kc{uuid.uuid4().hex[:10]}"
    task_topic = topics.tasks_topic(system)
    settings = Settings(kafka_bootstrap=broker, pg_dsn=SecretStr(case_store), export_dir=tmp_path / "exports",
                        kafka_idempotent_producer=True)
    worker = tiny_worker(system)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(settings, stop=stop))
    try:
        probe = AIOKafkaProducer(bootstrap_servers=broker)
        await probe.start()
        try:
            deadline = time.monotonic() + TIMEOUT
            while task_topic not in (await probe.client.fetch_all_metadata()).topics():
                if running.done():
                    running.result()
                assert time.monotonic() < deadline, "worker did not create its task topic"
                await asyncio.sleep(0.2)
        finally:
            await probe.stop()

        tasks = {}
        for name in CODECS:
            task = make_task(system, Action.export, {"email": f"{name}.khach@example.vn"})
            tasks[name] = task
            value, headers = codec.encode(task, source="librdkafka-test")
            bad_key = f"bad-{name}".encode()
            # Each batch: a valid task and a record that decompresses but is not JSON.
            await asyncio.to_thread(librdkafka_produce, broker, task_topic, [
                (str(task.case_id).encode(), value, headers),
                (bad_key, b'{"task_id": "not json', headers),
            ], compression=name)

        got = await receipts.wait_for(lambda r: receipt_of(r).system == system, count=len(CODECS))
        by_task = {receipt_of(r).task_id: receipt_of(r) for r in got}
        for name, task in tasks.items():
            assert by_task[task.task_id].status == ReceiptStatus.succeeded, name
            assert by_task[task.task_id].counts == {"located": 1}, name

        letters = await dead.wait_for(
            lambda r: header_map(r.headers).get("dlq_original_topic") == task_topic, count=len(CODECS))
        assert {r.key for r in letters} == {f"bad-{n}".encode() for n in CODECS}
        assert {read_dead_letter(r.headers).error_type for r in letters} == {"bad_json"}
        assert all(r.value == b'{"task_id": "not json' for r in letters)  # the decompressed original
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, TIMEOUT)
