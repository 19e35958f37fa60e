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
from tests.conftest import CODECS, librdkafka_produce, stored_codecs
from tests.integration.test_worker_kafka import TIMEOUT, Collector, collectors, receipt_of, tiny_worker

pytestmark = [pytest.mark.kafka, pytest.mark.pg]
__all__ = ["collectors"]  # the fixture, imported for its side effect on this module


async def _started(broker: str, task_topic: str, running: asyncio.Task[None]) -> None:
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


async def test_worker_handles_tasks_compressed_in_every_codec(
    broker: str, broker_data_dir: Path, case_store: str, tmp_path: Path, collectors: tuple[Collector, Collector]
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
        await _started(broker, task_topic, running)
        tasks = {}
        for name in CODECS:
            task = make_task(system, Action.export, {"email": f"{name}.khach@example.vn"})
            tasks[name] = task
            value, headers = codec.encode(task, source="librdkafka-test")
            key = f"case-{name}".encode()  # one key: one partition, so both records share a batch
            # Each batch: a valid task and a record that decompresses but is not JSON.
            await asyncio.to_thread(librdkafka_produce, broker, task_topic, [
                (key, value, headers),
                (key, b'{"task_id": "not json', [*headers, ("bad", name.encode())]),
            ], compression=name)

        got = await receipts.wait_for(lambda r: receipt_of(r).system == system, count=len(CODECS))
        by_task = {receipt_of(r).task_id: receipt_of(r) for r in got}
        for name, task in tasks.items():
            assert by_task[task.task_id].status == ReceiptStatus.succeeded, name
            assert by_task[task.task_id].counts == {"located": 1}, name

        letters = await dead.wait_for(
            lambda r: header_map(r.headers).get("dlq_original_topic") == task_topic, count=len(CODECS))
        assert {header_map(r.headers)["bad"] for r in letters} == set(CODECS)
        assert {read_dead_letter(r.headers).error_type for r in letters} == {"bad_json"}
        assert all(r.value == b'{"task_id": "not json' for r in letters)  # the decompressed original
        assert not running.done()
        # The broker really stored each batch compressed (librdkafka skips compression that does not pay).
        stored = stored_codecs(broker_data_dir, task_topic)
        assert sorted(stored) == sorted(CODECS), stored
    finally:
        stop.set()
        await asyncio.wait_for(running, TIMEOUT)


async def test_a_batch_that_cannot_be_decoded_is_dead_lettered_and_the_worker_goes_on(
    broker: str, broker_data_dir: Path, case_store: str, tmp_path: Path, collectors: tuple[Collector, Collector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without its codec library (cramjam), an lz4 batch cannot be decoded: each of its records is
    dead-lettered by offset, the offsets move past it, and a gzip task after it is still done."""
    import aiokafka.codec

    receipts, dead = collectors
    system = f"ku{uuid.uuid4().hex[:10]}"
    task_topic = topics.tasks_topic(system)
    settings = Settings(kafka_bootstrap=broker, pg_dsn=SecretStr(case_store), export_dir=tmp_path / "exports",
                        kafka_idempotent_producer=True)
    stop = asyncio.Event()
    running = asyncio.create_task(tiny_worker(system).run(settings, stop=stop))
    try:
        await _started(broker, task_topic, running)
        monkeypatch.setattr(aiokafka.codec, "cramjam", None)  # as on a machine without the codec library
        lost = [make_task(system, Action.export, {"email": f"lz4.{n}@example.vn"}) for n in range(2)]
        await asyncio.to_thread(librdkafka_produce, broker, task_topic, [
            (b"one-partition", *codec.encode(t, source="librdkafka-test")) for t in lost], compression="lz4")
        assert stored_codecs(broker_data_dir, task_topic) == ["lz4"]
        letters = await dead.wait_for(
            lambda r: header_map(r.headers).get("dlq_original_topic") == task_topic, count=2)
        found = sorted((read_dead_letter(r.headers).original_offset, read_dead_letter(r.headers).error_type)
                       for r in letters)
        assert found == [(0, "undecodable_batch"), (1, "undecodable_batch")]
        assert "UnsupportedCodecError" in read_dead_letter(letters[0].headers).error

        monkeypatch.undo()
        after = make_task(system, Action.export, {"email": "gzip.after@example.vn"})
        value, headers = codec.encode(after, source="librdkafka-test")
        await asyncio.to_thread(librdkafka_produce, broker, task_topic, [(b"k", value, headers)], compression="gzip")
        [done] = await receipts.wait_for(lambda r: receipt_of(r).task_id == after.task_id)
        assert receipt_of(done).status == ReceiptStatus.succeeded
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, TIMEOUT)
