"""The worker conformance suite over Kafka (``Conformance.over_kafka``, ``KafkaTransport``) and its
command line (``python -m dsrflow.testing.conformance``): workers that run on their own, on the
session's broker, are sent tasks as the coordinator sends them and judged by their receipts alone.

- the reference CRM worker passes every check, from Python and from the command line;
- broken workers fail the check about their bug; one whose bug only a redelivery shows passes,
  because over Kafka a redelivered record meets the worker's task ledger, not its handler;
- a worker that acts only on tasks the coordinator signed passes when the suite signs, and sends no
  receipt (the check fails on its timeout, the task is dead-lettered) when it does not.

Each worker runs in this process with ``Worker.run``, its case store a fresh database (only its
default task ledger uses it). The broker is shared with other tests: before a worker starts, its
group's offsets are moved to the end of its task topic, so that it sees only the tasks sent here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from dsrflow import auth, signing, topics
from dsrflow.codec import decode, encode, header_map, read_dead_letter
from dsrflow.events import TaskAssigned, TaskReceipt
from dsrflow.exports import LocalExportStore, export_key
from dsrflow.registry import SystemDeclaration
from dsrflow.settings import Settings
from dsrflow.testing import broken
from dsrflow.testing.conformance import (
    CHECKS,
    CONFLICT,
    COORDINATOR_SOURCE,
    ERASE_TWICE,
    EXPORT,
    LEGAL_BASIS,
    REDELIVERY,
    Conformance,
    KafkaTransport,
)
from dsrflow.worker import Worker
from examples.crm import worker as crm
from examples.people import CRM_ONLY, IN_BOTH

pytestmark = [pytest.mark.kafka, pytest.mark.pg]

MakeDatabase = Callable[..., Awaitable[str]]
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 20.0  # per receipt; a passing run takes well under a second a task
LEDGER = "dsrflow_task_ledger"  # the CRM's task ledger, in its own database: grows with every task


# -- running a worker on the broker ----------------------------------------------------------------


async def skip_old_tasks(settings: Settings, system: str) -> None:
    """Commit the worker group's offsets at the end of its task topic: tasks other tests left there
    (the broker is shared) are not this test's to run."""
    topic = topics.tasks_topic(system)
    parts = await partitions(settings, topic)
    consumer = AIOKafkaConsumer(group_id=f"dsrflow-worker-{system}", enable_auto_commit=False,
                                **settings.kafka_client_options())
    await consumer.start()
    try:
        consumer.assign(parts)
        await consumer.commit(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


async def end_offsets(settings: Settings, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(group_id=None, **settings.kafka_client_options())
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


async def read(settings: Settings, start: dict[TopicPartition, int],
               end: dict[TopicPartition, int]) -> list[ConsumerRecord[bytes, bytes]]:
    """The records between two sets of offsets."""
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **settings.kafka_client_options())
    await consumer.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + TIMEOUT
        while [tp for tp in start if await consumer.position(tp) < end[tp]]:
            assert time.monotonic() < deadline, "records missing"
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out += [r for r in records if r.offset < end[TopicPartition(r.topic, r.partition)]]
    finally:
        await consumer.stop()
    return out


async def partitions(settings: Settings, topic: str) -> list[TopicPartition]:
    producer = AIOKafkaProducer(**settings.kafka_client_options())
    await producer.start()
    try:
        return [TopicPartition(topic, p) for p in sorted(await producer.partitions_for(topic))]
    finally:
        await producer.stop()


@asynccontextmanager
async def running(worker: Worker, settings: Settings) -> AsyncIterator[None]:
    """``worker`` consuming its task topic (``Worker.run``) for the duration."""
    await topics.apply(settings.kafka_client_options(), topics.specs_for([worker.name]))
    await skip_old_tasks(settings, worker.name)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(settings, stop=stop))
    try:
        await until_consuming(settings, worker.name, task)
        yield
        assert not task.done(), "the worker stopped by itself"
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)  # raises what stopped the worker, if anything did


async def until_consuming(settings: Settings, system: str, task: asyncio.Task[None]) -> None:
    """Wait until the worker is in its group, consuming: its startup (hooks, ledger) is over, so a
    seed does not race its schema checks."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    await admin.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            if task.done():
                task.result()  # raises what stopped it
                raise AssertionError("the worker stopped before it consumed")
            try:
                [response] = await admin.describe_consumer_groups([f"dsrflow-worker-{system}"])
                [group] = response.to_object()["groups"]
            except KafkaError:  # the group coordinator is not there yet on a fresh broker
                group = {}
            if group.get("state") == "Stable" and group.get("members"):
                return
            assert time.monotonic() < deadline, f"worker {system} did not join its group"
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def worker_settings(broker: str, broker_kind: str, case_store: str, tmp_path: Path, **kw: object) -> Settings:
    return Settings(kafka_bootstrap=broker, pg_dsn=SecretStr(case_store), export_dir=tmp_path / "exports",
                    state_dir=tmp_path / "state", kafka_idempotent_producer=broker_kind != "tansu", **kw)  # type: ignore[arg-type]


# -- the reference CRM's data ----------------------------------------------------------------------


async def _tables(conn: asyncpg.Connection) -> list[str]:
    return [r["tablename"] for r in await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]


def reseed(dsn: str) -> Callable[[], Awaitable[None]]:
    """Empty every table (the task ledger too), then the CRM's own ``setup`` seeds it again."""

    async def seed() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"TRUNCATE {', '.join(await _tables(conn))} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()
        await crm.setup(dsn)

    return seed


def rows(dsn: str) -> Callable[[], Awaitable[object]]:
    """Every row of every table but the task ledger (every task adds to it), as JSON text, sorted."""

    async def snapshot() -> object:
        conn = await asyncpg.connect(dsn)
        try:
            return {t: sorted(r[0] for r in await conn.fetch(f"SELECT to_jsonb(x)::text FROM {t} x"))
                    for t in await _tables(conn) if t != LEDGER}
        finally:
            await conn.close()

    return snapshot


@pytest.fixture
async def crm_worker(
    broker: str, broker_kind: str, case_store: str, make_database: MakeDatabase, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Settings, str]]:
    """The reference CRM worker, running on the broker over a freshly seeded database: (its settings,
    the CRM database's DSN)."""
    dsn = await make_database("crm")
    await crm.setup(dsn)
    monkeypatch.setenv("DSRFLOW_CRM_DSN", dsn)  # the CRM's database and its task ledger
    settings = worker_settings(broker, broker_kind, case_store, tmp_path)
    async with running(crm.worker, settings):
        yield settings, dsn


# -- from Python -----------------------------------------------------------------------------------


async def test_the_crm_running_on_kafka_passes_every_check(crm_worker: tuple[Settings, str]) -> None:
    settings, dsn = crm_worker
    conformance = Conformance.over_kafka(crm.SYSTEM, settings=settings, subject=IN_BOTH.identifiers(),
                                         other=CRM_ONLY.identifiers(), seed=reseed(dsn), snapshot=rows(dsn),
                                         timeout=TIMEOUT)
    assert isinstance(conformance.transport, KafkaTransport) and conformance.worker is None
    task_topic = await partitions(settings, topics.tasks_topic("crm"))
    before = await end_offsets(settings, task_topic)
    findings = await conformance.assert_conformant()
    assert [(f.check, f.outcome) for f in findings] == [(c, "passed") for c in CHECKS], [str(f) for f in findings]
    [export] = [f for f in findings if f.check == EXPORT]
    assert "export succeeded with 1 artifact(s) about the subject" in export.reason
    # The artifacts the suite read are the worker's own files, in its export store.
    assert any(settings.exports.rglob("*.json"))

    # What went to the worker: tasks as the coordinator sends them; a redelivery (an export and an
    # erasure) is the very same record, twice.
    sent: dict[str, list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]] = {}
    for r in await read(settings, before, await end_offsets(settings, task_topic)):
        task = decode(r.value, r.headers, TaskAssigned)
        assert task.source == COORDINATOR_SOURCE and r.key == str(task.data.case_id).encode()
        sent.setdefault(str(task.data.task_id), []).append((r.key, r.value, list(r.headers)))
    twice = [records for records in sent.values() if len(records) > 1]
    assert len(twice) == 2 and all(a == b for a, b in twice), twice


#: Run on the broker, the check each broken worker fails. The replaying worker replays an erasure
#: when the same task comes again; over Kafka the worker's task ledger answers the redelivered record
#: with the first receipt, and its handler never sees it: it passes.
OVER_KAFKA = {
    "any_identifier": {CONFLICT},
    "blank_basis": {LEGAL_BASIS},
    "same_answer": {ERASE_TWICE},
    "replaying": set(),
}


@pytest.mark.parametrize("name", sorted(OVER_KAFKA))
async def test_broken_workers_running_on_kafka_fail_their_check(
    name: str, broker: str, broker_kind: str, case_store: str, tmp_path: Path
) -> None:
    specimen = broken.BROKEN[name]
    settings = worker_settings(broker, broker_kind, case_store, tmp_path)
    conformance = Conformance.over_kafka(specimen.worker.system, settings=settings, subject=broken.SUBJECT,
                                         other=broken.OTHER, seed=specimen.table.seed,
                                         snapshot=specimen.table.snapshot, timeout=TIMEOUT)
    async with running(specimen.worker, settings):
        findings = await conformance.run()
    assert [f.check for f in findings] == list(CHECKS)
    assert {f.check for f in findings if f.failed} == OVER_KAFKA[name], [str(f) for f in findings]
    assert all(f.passed for f in findings if not f.failed), [str(f) for f in findings]
    by_check = {f.check: f for f in findings}
    if name == "any_identifier":
        assert "gave succeeded, not conflict" in by_check[CONFLICT].reason, by_check[CONFLICT]
    if name == "blank_basis":
        assert by_check[LEGAL_BASIS].problems == ("retained item 1 (user.financial) has no legal basis",)
    if name == "same_answer":
        assert by_check[ERASE_TWICE].problems == ("a second erasure of the subject gave retained, not not_found",)
    if name == "replaying":  # in-process, the same worker fails it: the ledger is what makes the difference
        in_process = await specimen.conformance(snapshot=specimen.table.snapshot).check(REDELIVERY)
        assert in_process.failed, in_process


async def test_signed_tasks_pass_and_unsigned_ones_get_no_receipt(
    broker: str, broker_kind: str, case_store: str, tmp_path: Path
) -> None:
    """A worker given the coordinator's public keys (DSRFLOW_COORDINATOR_PUBLIC_KEYS) acts only on
    tasks the coordinator's credential signed: the suite signs with it and the worker passes; unsigned,
    the task is dead-lettered, no receipt comes, and the check fails saying so."""
    private, public = signing.coordinator_key_files(tmp_path / "credentials")
    signing.new_coordinator_key(private, public)
    settings = worker_settings(broker, broker_kind, case_store, tmp_path, coordinator_public_keys=public)
    specimen = broken.GOOD

    def suite(**signing_and_timeout: object) -> Conformance:
        return Conformance.over_kafka(specimen.worker.system, settings=settings, subject=broken.SUBJECT,
                                      other=broken.OTHER, seed=specimen.table.seed, **signing_and_timeout)  # type: ignore[arg-type]

    signed = suite(credential=auth.load_credential(private), timeout=TIMEOUT)
    unsigned = suite(timeout=3)
    task_topic = topics.tasks_topic(specimen.worker.name)
    async with running(specimen.worker, settings):
        findings = await signed.assert_conformant()
        assert [f.outcome for f in findings] == ["passed"] * len(CHECKS), [str(f) for f in findings]
        dead = AIOKafkaConsumer(group_id=None, **settings.kafka_client_options())
        await dead.start()
        try:
            parts = await partitions(settings, topics.DEADLETTER)
            dead.assign(parts)
            await dead.seek_to_end(*parts)
            finding = await unsigned.check(EXPORT)
            letters = []
            deadline = time.monotonic() + TIMEOUT
            while not letters and time.monotonic() < deadline:
                for records in (await dead.getmany(timeout_ms=500)).values():
                    letters += [r for r in records if header_map(r.headers).get("dlq_original_topic") == task_topic]
        finally:
            await dead.stop()
    assert finding.failed
    assert finding.reason.startswith(f"no receipt for export within 3s: is the worker running and consuming "
                                     f"{task_topic}?"), finding
    assert "not signed" in finding.reason
    # The worker did get the task, and refused it for its missing signature.
    assert [read_dead_letter(r.headers).error_type for r in letters] == ["unauthenticated_task"]


HANDMADE = SystemDeclaration(name="handmade", identifier_types=("email",), categories=("user.contact.email",),
                             actions=("export",))


async def handmade_worker(settings: Settings, mode: str, ready: asyncio.Event) -> None:
    """A worker written without dsrflow's SDK, as a team in another language would: a plain consumer
    of its task topic (no group) that exports the task's email and answers on dsr.receipts.v1,
    ``mode`` saying how: ``progress_first`` (a progress event, then the receipt), ``wrong_key`` (the
    receipt keyed by something other than the case id), ``undecodable`` (a receipt the schema refuses)."""
    store = LocalExportStore(settings.exports)
    parts = await partitions(settings, topics.tasks_topic(HANDMADE.name))
    consumer = AIOKafkaConsumer(group_id=None, **settings.kafka_client_options())
    producer = AIOKafkaProducer(**settings.kafka_client_options())
    await consumer.start()
    await producer.start()
    try:
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        for tp in parts:
            await consumer.position(tp)  # resolved now: tasks sent from here on are seen
        ready.set()
        while True:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    task = decode(record.value, record.headers, TaskAssigned).data
                    key = str(task.case_id).encode()
                    body = orjson.dumps({"email": task.identifiers["email"]})
                    ref = export_key(task.case_id, task.system, task.task_id, task.attempt,
                                     digest=hashlib.sha256(body).hexdigest())
                    artifact = store.put(ref, body, records=1)
                    receipt = TaskReceipt(task_id=task.task_id, case_id=task.case_id, system=task.system,
                                          attempt=task.attempt, status="succeeded", counts={"located": 1},
                                          artifacts=[artifact], completed_at=datetime.now(UTC))
                    value, headers = encode(receipt, source="handmade", subject=str(task.case_id))
                    if mode == "progress_first":
                        progress = orjson.dumps({"task_id": str(task.task_id), "case_id": str(task.case_id),
                                                 "system": task.system, "attempt": task.attempt, "seq": 1,
                                                 "at": datetime.now(UTC).isoformat()})
                        progress_headers = [(k, b"dsrflow.task.progress.v1" if k == "ce_type" else v)
                                            for k, v in headers]
                        await producer.send_and_wait(topics.RECEIPTS, progress, key=key, headers=progress_headers)
                    elif mode == "wrong_key":
                        key = b"handmade"
                    elif mode == "undecodable":
                        value = value.replace(b'"succeeded"', b'"done"')
                    await producer.send_and_wait(topics.RECEIPTS, value, key=key, headers=headers)
    finally:
        await consumer.stop()
        await producer.stop()


@pytest.mark.parametrize(("mode", "says"), [
    ("progress_first", None),
    ("wrong_key", "failed: the receipt of export is not keyed by the task's case_id"),
    ("undecodable", "failed: the receipt of export does not decode: status: "),
])
async def test_a_worker_without_the_sdk(mode: str, says: str | None, broker: str, broker_kind: str,
                                        tmp_path: Path) -> None:
    """What else shares the receipts topic is passed over; a receipt of the task that is not one,
    or not keyed by its case id, fails the check at once, saying so."""
    settings = worker_settings(broker, broker_kind, "postgresql://unused@127.0.0.1:9/none", tmp_path)
    await topics.apply(settings.kafka_client_options(), topics.specs_for([HANDMADE.name]))
    table = broken.Table()
    conformance = Conformance.over_kafka(HANDMADE, settings=settings, subject={"email": broken.SUBJECT["email"]},
                                         other={"email": broken.OTHER["email"]}, seed=table.seed, timeout=TIMEOUT)
    ready = asyncio.Event()
    worker = asyncio.create_task(handmade_worker(settings, mode, ready))
    try:
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        t0 = time.monotonic()
        finding = await conformance.check(EXPORT)
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    if says is None:
        assert finding.passed, finding
    else:
        assert str(finding).startswith(f"{EXPORT}: {says}"), finding
        assert time.monotonic() - t0 < TIMEOUT / 2  # at once, not after waiting out the timeout


# -- from the command line -------------------------------------------------------------------------

SEED_SCRIPT = """\
import asyncio, os
import asyncpg
from examples.crm import worker as crm

async def main() -> None:
    dsn = os.environ["DSRFLOW_CRM_DSN"]
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        await conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    await crm.setup(dsn)

asyncio.run(main())
"""

SNAPSHOT_SCRIPT = f"""\
import asyncio, json, os
import asyncpg

async def main() -> None:
    conn = await asyncpg.connect(os.environ["DSRFLOW_CRM_DSN"])
    tables = [r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                             "AND tablename <> '{LEDGER}' ORDER BY 1")]
    print(json.dumps({{t: sorted(r[0] for r in await conn.fetch(f"SELECT to_jsonb(x)::text FROM {{t}} x"))
                       for t in tables}}))
    await conn.close()

asyncio.run(main())
"""

SHOP_TOML = """\
name = "shop"
identifier_types = ["email", "phone"]
categories = ["user.name", "user.contact.email", "user.contact.phone_number", "user.contact.address",
              "user.financial"]
actions = ["export", "erase"]
"""


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSRFLOW_")}
    assert settings.kafka_bootstrap is not None
    env.update(DSRFLOW_KAFKA_BOOTSTRAP=settings.kafka_bootstrap, DSRFLOW_EXPORT_DIR=str(settings.exports),
               DSRFLOW_STATE_DIR=str(settings.state_dir), PYTHONPATH=str(ROOT), **extra)
    if settings.kafka_idempotent_producer is not None:
        env["DSRFLOW_KAFKA_IDEMPOTENT_PRODUCER"] = str(settings.kafka_idempotent_producer).lower()
    return env


async def conformance_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dsrflow.testing.conformance", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def people(option: str, identifiers: dict[str, str]) -> list[str]:
    return [arg for kind, value in identifiers.items() for arg in (option, f"{kind}={value}")]


async def test_the_command_line_passes_the_running_crm(crm_worker: tuple[Settings, str], tmp_path: Path) -> None:
    settings, dsn = crm_worker
    declaration = tmp_path / "crm.json"
    declaration.write_bytes(orjson.dumps(crm.SYSTEM.model_dump(mode="json")))
    (tmp_path / "seed.py").write_text(SEED_SCRIPT)
    (tmp_path / "snapshot.py").write_text(SNAPSHOT_SCRIPT)
    code, out, err = await conformance_cli(
        "--declaration", str(declaration), *people("--subject", IN_BOTH.identifiers()),
        *people("--other", CRM_ONLY.identifiers()),
        "--seed-cmd", f"{sys.executable} {tmp_path / 'seed.py'}",
        "--snapshot-cmd", f"{sys.executable} {tmp_path / 'snapshot.py'}", "--timeout", str(TIMEOUT),
        env=cli_env(settings, DSRFLOW_CRM_DSN=dsn))
    lines = out.splitlines()
    assert code == 0, (out, err)
    assert [line.split(": ")[:2] for line in lines] == [[c, "passed"] for c in CHECKS], out
    assert err.strip().splitlines()[-1] == f"crm: {len(CHECKS)} passed, 0 failed, 0 skipped"
    assert IN_BOTH.email not in out + err and IN_BOTH.phone not in out + err  # no personal data printed


async def test_the_command_line_fails_a_broken_worker(
    broker: str, broker_kind: str, case_store: str, tmp_path: Path
) -> None:
    specimen = broken.ANY_IDENTIFIER
    settings = worker_settings(broker, broker_kind, case_store, tmp_path)
    declaration = tmp_path / "shop.toml"
    declaration.write_text(SHOP_TOML)
    await specimen.table.seed()  # its data lives in this process: seeded once, for the one check
    args = ["--declaration", str(declaration), *people("--subject", broken.SUBJECT), *people("--other", broken.OTHER),
            "--timeout", str(TIMEOUT)]
    async with running(specimen.worker, settings):
        code, out, err = await conformance_cli(*args, "--seed-cmd", "true", "--check", CONFLICT, env=cli_env(settings))
        # A seed that fails fails its check, and says so; the next check still runs.
        failed_seed = await conformance_cli(*args, "--seed-cmd", "echo cannot seed >&2; exit 3", "--check", EXPORT,
                                            LEGAL_BASIS, env=cli_env(settings))
    assert code == 1, (out, err)
    [line] = out.splitlines()
    assert line.startswith(f"{CONFLICT}: failed: export with the subject's email and the other person's phone "
                           "gave succeeded, not conflict"), line
    assert err.strip().splitlines()[-1] == "shop: 0 passed, 1 failed, 0 skipped"
    code, out, err = failed_seed
    assert code == 1, (out, err)
    assert out.splitlines() == [f"{EXPORT}: failed: --seed-cmd exited with status 3",
                                f"{LEGAL_BASIS}: failed: --seed-cmd exited with status 3"]
    assert "cannot seed" in err  # what the command said, passed on


@pytest.mark.parametrize(("change", "says"), [
    ({"--check": "erase_once"}, "argument --check: invalid choice: 'erase_once'"),
    ({"--subject": "lan.nguyen@example.com"}, "argument --subject: expected TYPE=VALUE"),
    ({"--subject": "shoe_size=42"}, "argument --subject: unknown identifier type 'shoe_size'"),
    ({"--timeout": "0"}, "argument --timeout: must be more than 0 seconds"),
    ({"--declaration": "missing.json"}, "cannot read it"),
    ({"--other": "email=LAN.NGUYEN@example.com"}, "subject and other share their email"),
    ({"DSRFLOW_KAFKA_BOOTSTRAP": "unset"}, "no DSRFLOW_KAFKA_BOOTSTRAP set"),
])
async def test_the_command_line_says_what_is_wrong_with_its_arguments(
    change: dict[str, str], says: str, tmp_path: Path
) -> None:
    declaration = tmp_path / "shop.toml"
    declaration.write_text(SHOP_TOML)
    options = {"--declaration": str(declaration), "--subject": f"email={broken.SUBJECT['email']}",
               "--other": f"email={broken.OTHER['email']}", "--seed-cmd": "true"}
    env = cli_env(Settings(kafka_bootstrap="127.0.0.1:9", state_dir=tmp_path / "state", export_dir=tmp_path))
    for key, value in change.items():
        if key.startswith("DSRFLOW_"):
            del env[key]
        else:
            options[key] = str(tmp_path / value) if key == "--declaration" else value
    code, out, err = await conformance_cli(*[a for kv in options.items() for a in kv], env=env)
    assert code == 2, (out, err)
    assert out == ""
    [line] = err.splitlines()  # one line, not a usage block or a traceback
    assert line.startswith("python -m dsrflow.testing.conformance: ") and says in line, line
    assert "lan.nguyen" not in line  # an identifier given on the command line is never repeated
