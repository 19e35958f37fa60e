"""A worker on a real broker and a real case store: tasks in, receipts out, bad records dead-lettered,
the batch's offsets committed, and the worker still running after bad input. (That the commit
comes only after the broker acknowledged every receipt is tested in tests/unit/test_worker_sdk.py,
where a producer can be made to fail on cue.)"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from pydantic import SecretStr

from dsrflow import codec, topics
from dsrflow.codec import header_map, read_dead_letter
from dsrflow.events import TaskReceipt
from dsrflow.exports import LocalExportStore
from dsrflow.registry import SystemDeclaration
from dsrflow.rights import Action, IdentifierType, ReceiptStatus
from dsrflow.settings import Settings
from dsrflow.testing.worker import make_task
from dsrflow.worker import Result, RetryableError, TaskContext, Worker

pytestmark = [pytest.mark.kafka, pytest.mark.pg]

TIMEOUT = 60.0
FLAKY_EMAIL = "hung.tran@example.vn"  # the erase handler's database is "down" for this one


def tiny_worker(system: str) -> Worker:
    w = Worker(
        SystemDeclaration(
            name=system,
            identifier_types=(IdentifierType.email,),
            categories=("user.contact.email",),
            actions=(Action.export, Action.erase),
        )
    )

    @w.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        art = await ctx.export({"email": ctx.identifiers[IdentifierType.email], "plan": "Cloud Server"}, records=1)
        return Result.succeeded(counts={"located": 1}, categories=["user.contact.email"], artifacts=[art])

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        if ctx.identifiers[IdentifierType.email] == FLAKY_EMAIL:
            raise RetryableError("database unavailable")
        return Result.succeeded(counts={"erased": 1})

    return w


class Collector:
    """Reads a topic from the beginning and keeps the records that match."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
        )
        self.records: list[ConsumerRecord[bytes, bytes]] = []

    async def wait_for(
        self, match: Callable[[ConsumerRecord[bytes, bytes]], bool], count: int = 1
    ) -> list[ConsumerRecord[bytes, bytes]]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            found = [r for r in self.records if match(r)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)} of {count} records after {TIMEOUT}s")
            for records in (await self.consumer.getmany(timeout_ms=500)).values():
                # dsr.receipts.v1 is shared: it carries progress reports, and other tests' invalid
                # receipts too (the conformance suite's, say): receipts that decode only
                self.records.extend(r for r in records if self.consumer.subscription() != {topics.RECEIPTS}
                                    or is_receipt(r))


@pytest.fixture
async def collectors(broker: str) -> AsyncIterator[tuple[Collector, Collector]]:
    # Receipts and dead letters belong to `dsrflow topics apply`, not to a worker.
    await topics.apply({"bootstrap_servers": broker}, topics.specs_for([]))
    receipts, dead = Collector(broker, topics.RECEIPTS), Collector(broker, topics.DEADLETTER)
    try:
        await receipts.consumer.start()
        await dead.consumer.start()
        yield receipts, dead
    finally:
        await receipts.consumer.stop()
        await dead.consumer.stop()


def is_receipt(record: ConsumerRecord[bytes, bytes]) -> bool:
    try:
        codec.decode(record.value, record.headers, TaskReceipt)
    except codec.DecodeError:
        return False
    return True


def receipt_of(record: ConsumerRecord[bytes, bytes]) -> TaskReceipt:
    return codec.decode(record.value, record.headers, TaskReceipt).data


async def test_worker_round_trip(
    broker: str, broker_kind: str, case_store: str, tmp_path: Path, collectors: tuple[Collector, Collector]
) -> None:
    receipts, dead = collectors
    system = f"kt{uuid.uuid4().hex[:10]}"  # own topic and group: the broker may be shared
    task_topic = topics.tasks_topic(system)
    settings = Settings(
        kafka_bootstrap=broker,
        pg_dsn=SecretStr(case_store),
        export_dir=tmp_path / "exports",
        kafka_idempotent_producer=broker_kind != "tansu",  # Tansu has no InitProducerId
    )
    worker = tiny_worker(system)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(settings, stop=stop))

    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    sent: list[Any] = []

    async def send(value: bytes | None, headers: list[tuple[str, bytes]], key: bytes) -> None:
        sent.append(await (await producer.send(task_topic, value, key=key, headers=headers)))

    try:
        # The worker creates its task topic; wait for that before producing.
        deadline = time.monotonic() + TIMEOUT
        while task_topic not in (await producer.client.fetch_all_metadata()).topics():
            if running.done():
                running.result()  # raises the worker's startup error
            assert time.monotonic() < deadline, "worker did not create its task topic"
            await asyncio.sleep(0.2)

        export = make_task(system, Action.export, {"email": "Lan.Nguyen@Example.VN"})
        flaky = make_task(system, Action.erase, {"email": FLAKY_EMAIL})
        other = make_task("billing", Action.export, {"email": "bao.pham@example.vn"})
        for task in (export, flaky):
            await send(*codec.encode(task, source="test"), key=str(task.case_id).encode())
        good_headers = codec.encode(export, source="test")[1]
        await send(b'{"task_id": "not json', good_headers, b"k-bad-json")
        await send(orjson.dumps({"task_id": "x"}), [], b"k-no-headers")
        await send(*codec.encode(other, source="test"), key=b"k-wrong-system")

        got = await receipts.wait_for(lambda r: receipt_of(r).system == system, count=2)
        by_task = {receipt_of(r).task_id: (r, receipt_of(r)) for r in got}

        record, ok = by_task[export.task_id]
        assert ok.status == ReceiptStatus.succeeded and ok.case_id == export.case_id and ok.attempt == 1
        assert record.key == str(export.case_id).encode()
        h = header_map(record.headers)
        assert h["ce_source"] == f"dsrflow/worker/{system}" and h["ce_subject"] == str(export.case_id)
        assert h["ce_type"] == TaskReceipt.ce_type
        # The claim check points at a file in the export store that matches it.
        [art] = ok.artifacts
        data = LocalExportStore(settings.exports).get(art.ref)
        assert hashlib.sha256(data).hexdigest() == art.sha256
        assert orjson.loads(data)["email"] == "lan.nguyen@example.vn"
        assert b"lan.nguyen" not in record.value  # exported records never travel on Kafka

        _, failed = by_task[flaky.task_id]
        assert failed.status == ReceiptStatus.failed and failed.retryable
        assert failed.error == "RetryableError: database unavailable"

        letters = await dead.wait_for(lambda r: header_map(r.headers).get("dlq_original_topic") == task_topic, count=3)
        by_key = {r.key: r for r in letters}
        assert set(by_key) == {b"k-bad-json", b"k-no-headers", b"k-wrong-system"}
        kinds = {k: read_dead_letter(r.headers).error_type for k, r in by_key.items()}
        assert kinds == {
            b"k-bad-json": "bad_json",
            b"k-no-headers": "missing_header",
            b"k-wrong-system": "wrong_system",
        }
        bad = by_key[b"k-bad-json"]
        assert bad.value == b'{"task_id": "not json'  # the original bytes, untouched
        letter = read_dead_letter(bad.headers)
        assert letter.consumer == f"dsrflow-worker-{system}" and letter.original_offset == sent[2].offset
        assert any(k.startswith("dlq_") for k, _ in bad.headers)
        assert header_map(bad.headers)["ce_id"] == header_map(good_headers)["ce_id"]  # original headers kept

        # Still running after bad input: one more task goes through.
        assert not running.done()
        again = make_task(system, Action.erase, {"email": "an.nguyen@example.vn"})
        await send(*codec.encode(again, source="test"), key=str(again.case_id).encode())
        [last] = await receipts.wait_for(lambda r: receipt_of(r).task_id == again.task_id)
        assert receipt_of(last).status == ReceiptStatus.succeeded
    finally:
        await producer.stop()
        stop.set()
        await asyncio.wait_for(running, TIMEOUT)  # graceful: returns, does not raise

    # Not registered by the worker: it announced itself (tests/integration/test_announcements.py),
    # and only an administrator's approval puts a declaration in force.
    conn = await asyncpg.connect(case_store)
    try:
        row = await conn.fetchrow("SELECT actions, identifier_types FROM systems WHERE name = $1", system)
    finally:
        await conn.close()
    assert row is None

    # Every record consumed was committed (receipts and dead letters were delivered first).
    produced: dict[int, int] = {}
    for md in sent:
        produced[md.partition] = max(produced.get(md.partition, 0), md.offset + 1)
    probe = AIOKafkaConsumer(bootstrap_servers=broker, group_id=f"dsrflow-worker-{system}", enable_auto_commit=False)
    await probe.start()
    try:
        committed = {p: await probe.committed(TopicPartition(task_topic, p)) for p in produced}
    finally:
        await probe.stop()
    assert committed == produced


async def test_a_worker_acts_only_on_tasks_the_coordinator_signed_and_signs_its_receipts(
    broker: str, broker_kind: str, case_store: str, tmp_path: Path, collectors: tuple[Collector, Collector]
) -> None:
    from dsrflow import auth, signing
    from dsrflow.coordinator.relay import sign_task

    receipts, dead = collectors
    system = f"ks{uuid.uuid4().hex[:10]}"
    task_topic = topics.tasks_topic(system)
    coordinator_key, impostor = auth.generate_credential("coordinator"), auth.generate_credential("coordinator")
    signing.write_public_keys(tmp_path / "coordinator-public.json", [coordinator_key])
    worker_key = auth.generate_credential(system)
    worker_key.save(tmp_path / "worker.json")
    settings = Settings(kafka_bootstrap=broker, pg_dsn=SecretStr(case_store), export_dir=tmp_path / "exports",
                        kafka_idempotent_producer=broker_kind != "tansu",
                        coordinator_public_keys=tmp_path / "coordinator-public.json",
                        worker_credential=tmp_path / "worker.json")
    calls: list[str] = []
    worker = tiny_worker(system)
    erase = worker._handlers[Action.erase]

    async def counting(ctx: TaskContext) -> Result:
        calls.append(ctx.identifiers[IdentifierType.email])
        return await erase(ctx)

    worker._handlers[Action.erase] = counting
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(settings, stop=stop))
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while task_topic not in (await producer.client.fetch_all_metadata()).topics():
            if running.done():
                running.result()
            assert time.monotonic() < deadline, "worker did not create its task topic"
            await asyncio.sleep(0.2)
        real = make_task(system, Action.erase, {"email": "lan.nguyen@example.vn"})
        unsigned = make_task(system, Action.erase, {"email": "nam.le@example.vn"})
        forged = make_task(system, Action.erase, {"email": "mai.tran@example.vn"})
        value, headers = codec.encode(real, source="dsrflow/coordinator")
        await producer.send_and_wait(task_topic, value, key=b"real", headers=sign_task(coordinator_key, headers, value))
        value, headers = codec.encode(unsigned, source="dsrflow/coordinator")
        await producer.send_and_wait(task_topic, value, key=b"unsigned", headers=headers)
        value, headers = codec.encode(forged, source="dsrflow/coordinator")
        await producer.send_and_wait(task_topic, value, key=b"forged", headers=sign_task(impostor, headers, value))

        [got] = await receipts.wait_for(lambda r: receipt_of(r).task_id == real.task_id)
        ce = header_map(got.headers)
        assert signing.verify_headers({worker_key.key_id: worker_key.private_key.public_key()}, list(got.headers),
                                      ce_id=ce["ce_id"], ce_source=ce["ce_source"], value=got.value) \
            == worker_key.key_id
        letters = await dead.wait_for(lambda r: header_map(r.headers).get("dlq_original_topic") == task_topic,
                                      count=2)
        assert {r.key: read_dead_letter(r.headers).error_type for r in letters} == {
            b"unsigned": "unauthenticated_task", b"forged": "unauthenticated_task"}
        assert calls == ["lan.nguyen@example.vn"]  # the forged tasks were never acted on
    finally:
        stop.set()
        await producer.stop()
        await asyncio.wait_for(running, TIMEOUT)


async def test_a_dead_letter_the_broker_refuses_as_too_large_goes_without_the_original_and_the_worker_goes_on(
    broker: str, broker_kind: str, case_store: str, tmp_path: Path, collectors: tuple[Collector, Collector]
) -> None:
    """The dead-letter topic takes smaller records than the task topic (an operator's setting): an
    undecodable 300 kB record's dead letter (the record and the dlq_* headers) is refused by the
    broker, though the producer took it. The letter goes again without the original's bytes and
    headers, and the partition goes on to the next task."""
    import os

    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    if broker_kind != "apache":
        pytest.skip("the broker's own size limit is tested against Apache Kafka")
    receipts, dead = collectors
    system = f"kd{uuid.uuid4().hex[:10]}"
    task_topic = topics.tasks_topic(system)
    settings = Settings(kafka_bootstrap=broker, pg_dsn=SecretStr(case_store), export_dir=tmp_path / "exports",
                        kafka_idempotent_producer=True)
    await topics.apply(settings.kafka_client_options(), topics.specs_for([system]))
    declared = topics.declared()[topics.DEADLETTER].config()
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    stop = asyncio.Event()
    running: asyncio.Task[None] | None = None
    try:
        # Not incremental: the topic's declared settings, with a record limit of 200 kB.
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topics.DEADLETTER,
                                                  configs={**declared, "max.message.bytes": "200000"})])
        running = asyncio.create_task(tiny_worker(system).run(settings, stop=stop))
        big = os.urandom(300_000)  # under the codec's cut (512 KiB): copied whole, and random: not compressible
        sent = await producer.send_and_wait(task_topic, big, key=b"k-big")
        after = make_task(system, Action.erase, {"email": "an.nguyen@example.vn"})
        value, headers = codec.encode(after, source="test")
        await producer.send_and_wait(task_topic, value, key=b"k-big", headers=headers)  # the same partition
        [got] = await receipts.wait_for(lambda r: receipt_of(r).task_id == after.task_id)
        assert receipt_of(got).status == ReceiptStatus.succeeded
        [letter_record] = await dead.wait_for(lambda r: r.key == b"k-big"
                                              and header_map(r.headers).get("dlq_original_topic") == task_topic)
    finally:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topics.DEADLETTER, configs=declared)])
        await admin.close()
        await producer.stop()
        stop.set()
        if running is not None:
            await asyncio.wait_for(running, TIMEOUT)
    assert not letter_record.value
    letter = read_dead_letter(letter_record.headers)
    assert (letter.original_partition, letter.original_offset, letter.error_type) == (
        sent.partition, sent.offset, "missing_header")
    assert "the original (300000 bytes) is not copied: " in letter.error and "TooLarge" in letter.error
