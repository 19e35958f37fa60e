"""The test broker and database fixtures, topic provisioning, and the embedded stack."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from dsrflow import topics
from dsrflow.settings import Settings
from dsrflow.stack import embedded
from dsrflow.stack._proc import alive, family
from dsrflow.testing.brokers import TestBrokerError, in_ci, start_test_broker
from tests.conftest import librdkafka_produce


async def _create_topic(bootstrap: str, partitions: int = 2) -> str:
    name = f"t.stack.{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def _consume(consumer: AIOKafkaConsumer, n: int, timeout: float = 30.0) -> list[tuple[bytes, bytes]]:
    got: list[tuple[bytes, bytes]] = []

    async def loop() -> None:
        while len(got) < n:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                got.extend((m.key, m.value) for m in msgs)

    await asyncio.wait_for(loop(), timeout)
    return got


# -- the broker fixture -----------------------------------------------------------
async def test_produce_consume_and_commit(broker: str) -> None:
    topic = await _create_topic(broker)
    sent = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(20)]
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
    await producer.start()
    try:
        for key, value in sent:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()

    group = f"g.{uuid.uuid4().hex[:8]}"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        # Tansu holds a new group's first join for about half the session timeout
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    try:
        got = await _consume(consumer, len(sent))
        assert sorted(got) == sorted(sent)
        await consumer.commit()
        committed = {tp.partition: await consumer.committed(tp) for tp in consumer.assignment()}
        assert sum(v or 0 for v in committed.values()) == len(sent)
    finally:
        await consumer.stop()

    # the group's committed offsets survive the member: a reader of the group's
    # partitions resumes after them (assigned, not subscribed: Tansu only lets a new
    # member join once the old one's session has expired)
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b"after", key=b"k0")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker, group_id=group, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(2)])
        assert await consumer.committed(TopicPartition(topic, meta.partition)) == meta.offset
        assert await _consume(consumer, 1) == [(b"k0", b"after")]
    finally:
        await consumer.stop()


async def test_idempotent_producer(broker: str, broker_kind: str) -> None:
    if broker_kind == "tansu":
        pytest.skip("Tansu 0.6 answers InitProducerId with UNKNOWN_SERVER_ERROR: no idempotent producer")
    topic = await _create_topic(broker, partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=True)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b"once", key=b"k")
        assert meta.offset == 0
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        assert await _consume(consumer, 1) == [(b"k", b"once")]
    finally:
        await consumer.stop()


def test_ci_insists_on_apache_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(TestBrokerError, match="Apache Kafka"):
        start_test_broker("tansu")
    with pytest.raises(TestBrokerError, match="Apache Kafka"):
        start_test_broker("127.0.0.1:9")


# -- topics.apply ---------------------------------------------------------------
async def test_topics_apply_creates_then_reports_unchanged(broker: str) -> None:
    specs = topics.specs_for(["crm"])
    names = [s.name for s in specs]
    assert topics.tasks_topic("crm") in names

    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        before = set(await admin.list_topics())
    finally:
        await admin.close()

    first = await topics.apply({"bootstrap_servers": broker}, specs)
    assert sorted(first.created) == sorted(n for n in names if n not in before)
    assert first.drift == {}

    second = await topics.apply({"bootstrap_servers": broker}, specs)
    assert second.created == []
    assert sorted(second.unchanged) == sorted(names)
    assert second.drift == {}

    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        described = {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(names)}
    finally:
        await admin.close()
    assert described == {s.name: s.partitions for s in specs}


async def test_topics_apply_reports_drift_from_the_declaration(broker: str) -> None:
    """A topic that exists with other partitions or configs is reported, not silently accepted."""
    import dataclasses

    name = f"dsr.tasks.drift{uuid.uuid4().hex[:6]}.v1"
    declared = topics.declared()[topics.TASKS_TEMPLATE].for_system(name.split(".")[2])
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1,
                                            topic_configs={"retention.ms": "1000"})])
    finally:
        await admin.close()
    report = await topics.apply({"bootstrap_servers": broker}, [dataclasses.replace(declared, name=name)])
    assert report.created == [] and report.unchanged == []
    diffs = report.drift[name]
    assert any(d.startswith("partitions: declared 3, broker has 1") for d in diffs)
    assert any(d.startswith("retention.ms: declared 604800000, broker has 1000") for d in diffs)


# -- PostgreSQL fixtures -----------------------------------------------------------
async def test_make_database_gives_fresh_databases(make_database: Callable[..., Awaitable[str]]) -> None:
    a, b = await make_database("x"), await make_database("x")
    assert a != b
    conn = await asyncpg.connect(a)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    finally:
        await conn.close()


async def test_case_store_is_migrated(case_store: str) -> None:
    from dsrflow.store import pending_migrations

    assert await pending_migrations(case_store) == []


# -- the embedded stack ------------------------------------------------------------
def _need_apache() -> None:
    from dsrflow.stack.kafka import available

    why = available()
    if why is not None:
        if in_ci():
            pytest.fail(f"CI=true: Apache Kafka cannot start here: {why}")
        pytest.skip(why)


def _cli(*args: str, state: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSRFLOW_")}
    env["DSRFLOW_STATE_DIR"] = str(state)
    return subprocess.run([sys.executable, "-m", "dsrflow.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _librdkafka_read(bootstrap: str, topic: str, n: int, timeout: float = 30.0) -> list[tuple[bytes, bytes]]:
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g.{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    return got


async def test_stack_up_runs_a_broker_every_client_uses_and_keeps_its_data(tmp_path: Path) -> None:
    """`dsrflow stack up` runs Apache Kafka: kcat and librdkafka talk to it, as aiokafka does, and
    what was written before `stack down` is there after `stack up`, on the same address."""
    _need_apache()
    state = tmp_path / "state"
    assert embedded.status(state)["running"] is False

    up = await asyncio.to_thread(_cli, "stack", "up", state=state)
    assert up.returncode == 0, up.stderr
    data = orjson.loads((state / "stack.json").read_bytes())
    processes: set[int] = set()
    try:
        pids = dict(data["pids"])
        assert set(pids) == {"postgres", "kafka"} and data["broker_kind"] == "apache"
        assert all(alive(p) for p in pids.values())
        assert data["idempotent_producer"] is True
        bootstrap = data["kafka_bootstrap"]
        assert f"DSRFLOW_KAFKA_BOOTSTRAP={bootstrap}" in up.stdout

        # idempotent: a second `up` keeps the running services
        again = await asyncio.to_thread(embedded.up, state)
        assert again["pids"] == pids and again["kafka_bootstrap"] == bootstrap

        st = embedded.status(state)
        assert st["running"] is True
        assert {k: v["running"] for k, v in st["services"].items()} == {"postgres": True, "kafka": True}

        # Settings finds the stack through stack.json
        settings = Settings(state_dir=state, kafka_bootstrap=None, pg_dsn=None)
        assert settings.bootstrap == bootstrap
        assert settings.dsn == data["pg_dsn"] and settings.dsn.endswith("/dsrflow")
        assert settings.producer_options()["enable_idempotence"] is True
        conn = await asyncpg.connect(settings.dsn)
        try:
            assert await conn.fetchval("SELECT current_database()") == "dsrflow"
        finally:
            await conn.close()
        report = await topics.apply({"bootstrap_servers": bootstrap}, topics.specs_for(["crm"]))
        assert topics.REQUESTS in report.created

        # librdkafka (confluent-kafka), compressed, with an idempotent producer
        await asyncio.to_thread(librdkafka_produce, bootstrap, topics.REQUESTS,
                                [(b"k1", b"from librdkafka", [("ce_id", b"1")])], compression="zstd")
        # kcat: metadata, then a record
        kcat = shutil.which("kcat")
        if kcat is None and in_ci():
            pytest.fail("CI=true: kcat is not installed (.ci/run installs it)")
        if kcat is not None:
            meta = subprocess.run([kcat, "-L", "-b", bootstrap, "-t", topics.REQUESTS], capture_output=True,
                                  text=True, timeout=30)
            assert meta.returncode == 0 and f'topic "{topics.REQUESTS}"' in meta.stdout, meta.stderr
            subprocess.run([kcat, "-P", "-b", bootstrap, "-t", topics.REQUESTS, "-k", "k2"], input=b"from kcat",
                           check=True, timeout=30, capture_output=True)
        expected = {(b"k1", b"from librdkafka")} | ({(b"k2", b"from kcat")} if kcat else set())
        assert set(await asyncio.to_thread(_librdkafka_read, bootstrap, topics.REQUESTS, len(expected))) == expected

        processes = set().union(*(family(p) for p in pids.values()))
        assert len(processes) > 2
    finally:
        down = await asyncio.to_thread(_cli, "stack", "down", state=state)

    assert down.returncode == 0 and "stopped" in down.stdout, down.stderr
    assert not (state / "stack.json").exists()
    assert not [p for p in processes if alive(p)], "processes left after down"
    assert embedded.status(state)["running"] is False
    assert await asyncio.to_thread(embedded.down, state) is False

    # topics, records and the case store survive down/up, and the broker keeps its address
    data2 = await asyncio.to_thread(embedded.up, state)
    try:
        assert data2["kafka_bootstrap"] == bootstrap
        got = await asyncio.to_thread(_librdkafka_read, bootstrap, topics.REQUESTS, len(expected))
        assert set(got) == expected
        consumer = AIOKafkaConsumer(topics.REQUESTS, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            assert set(await _consume(consumer, len(expected))) == expected
        finally:
            await consumer.stop()
        conn = await asyncpg.connect(data2["pg_dsn"])
        await conn.close()
    finally:
        await asyncio.to_thread(embedded.down, state)
    assert not any(alive(p) for p in data2["pids"].values())


async def test_tansu_is_an_explicit_choice_and_one_broker_runs_at_a_time(tmp_path: Path) -> None:
    state = tmp_path / "state"
    data = await asyncio.to_thread(embedded.up, state, broker="tansu")
    try:
        assert set(data["pids"]) == {"postgres", "tansu"} and data["idempotent_producer"] is False
        assert Settings(state_dir=state).producer_options()["enable_idempotence"] is False
        with pytest.raises(embedded.StackError, match="runs tansu, not apache"):
            await asyncio.to_thread(embedded.up, state)
        st = embedded.status(state)
        assert st["broker_kind"] == "tansu" and st["running"] is True
    finally:
        await asyncio.to_thread(embedded.down, state)
    assert not any(alive(p) for p in data["pids"].values())


def test_apache_kafka_formats_with_a_cluster_id_that_starts_with_a_dash(tmp_path: Path) -> None:
    """Random cluster ids are URL-safe base64: one in 64 starts with "-" (it once broke the format step)."""
    from dsrflow.stack.kafka import ApacheKafka

    _need_apache()
    kafka = ApacheKafka(tmp_path / "kafka")
    kafka.cluster_id = "-" + kafka.cluster_id[1:]
    with kafka:
        assert kafka.bootstrap
