"""Progress of long tasks (``dsrflow.task.progress.v1`` on ``dsr.receipts.v1``, issue 8): recorded on
the task (the latest report wins), admitted by the system's signature like receipts, shown by the API,
and counted by the sweep, which leaves a task that keeps progressing alone. Records are handed to
the coordinator as Kafka delivers them, on a real PostgreSQL; one test goes through the real broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from pydantic import SecretStr

from dsrflow import auth, codec, signing, topics
from dsrflow.api import create_app
from dsrflow.coordinator import Coordinator
from dsrflow.coordinator.service import Record
from dsrflow.events import RightsRequested, TaskProgress, TaskReceipt
from dsrflow.exports import MemoryExportStore
from dsrflow.registry import SystemDeclaration, register
from dsrflow.settings import Settings
from dsrflow.store import cases as repo
from dsrflow.store.outbox import headers_from_json

CRM = SystemDeclaration(name="crm", identifier_types=("email",), actions=("erase",))
BILLING = SystemDeclaration(name="billing", identifier_types=("email",), actions=("erase",))
TOKEN = "dpo-test-token-progress-0123456789"
_offsets = iter(range(10**6))


@pytest.fixture
async def pool(case_store: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(case_store, min_size=1, max_size=2)
    async with p.acquire() as conn:
        for s in (CRM, BILLING):
            await register(conn, s)
    yield p
    await p.close()


def make_coordinator(pool: asyncpg.Pool, case_store: str, tmp_path: Path, **kw: Any) -> Coordinator:
    settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path, **kw)
    return Coordinator(settings, pool, export_store=MemoryExportStore())


@pytest.fixture
def coordinator(pool: asyncpg.Pool, case_store: str, tmp_path: Path) -> Coordinator:
    return make_coordinator(pool, case_store, tmp_path)


async def erasure(c: Coordinator, pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    """A verified erasure case: one dispatched task for crm, one for billing."""
    req = RightsRequested.model_validate({"request_id": f"prog-{uuid.uuid4().hex[:8]}", "right": "erasure",
                                          "verified": True, "subject": {"identifiers": {"email": "an@example.vn"}}})
    value, headers = codec.encode(req, source="test")
    await c.handle_requests([Record(topics.REQUESTS, 0, next(_offsets), None, value, headers)])
    return await tasks(pool, req.request_id)


async def tasks(pool: asyncpg.Pool, request_id: str) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT t.* FROM tasks t JOIN cases c USING (case_id) WHERE c.request_id = $1",
                            request_id)
    return {r["system"]: r for r in rows}


async def task(pool: asyncpg.Pool, t: asyncpg.Record) -> asyncpg.Record:
    row: asyncpg.Record = await pool.fetchrow("SELECT * FROM tasks WHERE task_id = $1", t["task_id"])
    return row


def _signed(value: bytes, headers: list[tuple[str, bytes]], credential: auth.Credential | None, event_id: str,
            source: str) -> list[tuple[str, bytes]]:
    if credential is None:
        return headers
    return headers + signing.sign_headers(credential, ce_id=event_id, ce_source=source, value=value)


def progress_record(t: Mapping[str, Any], seq: int, *, credential: auth.Credential | None = None,
                    event_id: str | None = None, **kw: Any) -> Record:
    """A worker's progress on ``t`` (its current attempt unless ``attempt`` is given)."""
    p = TaskProgress.model_validate({"task_id": t["task_id"], "case_id": t["case_id"], "system": t["system"],
                                     "attempt": t["attempt"], "seq": seq, "at": datetime.now(UTC), **kw})
    source, event_id = f"dsrflow/worker/{p.system}", event_id or str(uuid.uuid4())  # a random id, as workers do
    value, headers = codec.encode(p, source=source, event_id=event_id)
    return Record(topics.RECEIPTS, 0, next(_offsets), str(p.case_id).encode(), value,
                  _signed(value, headers, credential, event_id, source))


def receipt_record(t: Mapping[str, Any], status: str, *, credential: auth.Credential | None = None,
                   **kw: Any) -> Record:
    r = TaskReceipt.model_validate({"task_id": t["task_id"], "case_id": t["case_id"], "system": t["system"],
                                    "attempt": t["attempt"], "status": status, "completed_at": datetime.now(UTC),
                                    **kw})
    source, event_id = f"dsrflow/worker/{r.system}", f"receipt-{t['task_id']}-{t['attempt']}"
    value, headers = codec.encode(r, source=source, event_id=event_id)
    return Record(topics.RECEIPTS, 0, next(_offsets), str(r.case_id).encode(), value,
                  _signed(value, headers, credential, event_id, source))


async def dead_letters(pool: asyncpg.Pool) -> list[tuple[str, str]]:
    rows = await pool.fetch("SELECT headers FROM outbox WHERE topic = $1 ORDER BY id", topics.DEADLETTER)
    out = []
    for r in rows:
        letter = codec.read_dead_letter(headers_from_json(r["headers"]))
        out.append((letter.error_type, letter.error))
    return out


async def counts(pool: asyncpg.Pool) -> tuple[int, int, int]:
    """Timeline entries, CaseUpdated events and receipt rows so far."""
    return (await pool.fetchval("SELECT count(*) FROM case_timeline"),
            await pool.fetchval("SELECT count(*) FROM outbox WHERE topic = $1", topics.CASES),
            await pool.fetchval("SELECT count(*) FROM receipts"))


def progress_of(row: asyncpg.Record) -> dict[str, Any] | None:
    value = row["progress"]
    return orjson.loads(value) if isinstance(value, str | bytes) else value


# -- recording -------------------------------------------------------------------------
async def test_progress_is_recorded_the_latest_report_wins_and_the_api_shows_it(
    coordinator: Coordinator, pool: asyncpg.Pool, case_store: str
) -> None:
    t = await erasure(coordinator, pool)
    before = await counts(pool)
    start = datetime.now(UTC)
    await coordinator.handle_receipts([progress_record(t["crm"], 2, done=40, total=100, note="table orders")])
    crm = await task(pool, t["crm"])
    assert progress_of(crm) == {"attempt": 1, "seq": 2, "done": 40, "total": 100, "note": "table orders"}
    assert start <= crm["progress_at"] <= datetime.now(UTC)  # the coordinator's clock, not the worker's `at`
    assert crm["status"] == "dispatched" and crm["attempt"] == 1
    recorded_at = crm["progress_at"]
    # another instance took the task over after a restart and numbers its reports from 1 again:
    # it is alive, and what it says now is the progress
    await coordinator.handle_receipts([progress_record(t["crm"], 1, done=10, total=100)])
    crm = await task(pool, t["crm"])
    assert progress_of(crm)["done"] == 10 and crm["progress_at"] > recorded_at  # type: ignore[index]
    recorded_at = crm["progress_at"]
    # a redelivered record (same event id) is claimed once by the inbox
    again = progress_record(t["crm"], 3, done=70, total=100, note="table invoices")
    await coordinator.handle_receipts([again])
    await coordinator.handle_receipts([again])
    crm = await task(pool, t["crm"])
    assert progress_of(crm) == {"attempt": 1, "seq": 3, "done": 70, "total": 100, "note": "table invoices"}
    assert crm["progress_at"] > recorded_at
    # no timeline entry, no CaseUpdated, no receipt row for any of it; billing untouched; nothing dead-lettered
    assert await counts(pool) == before
    billing = await task(pool, t["billing"])
    assert billing["progress"] is None and billing["progress_at"] is None
    assert await dead_letters(pool) == []

    app = create_app(Settings(api_token=SecretStr(TOKEN), pg_dsn=SecretStr(case_store)))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dsrflow.test") as client:
            r = await client.get(f"/v1/cases/{t['crm']['case_id']}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    shown = {x["system"]: x["progress"] for x in r.json()["tasks"]}
    assert shown["billing"] is None
    assert {k: v for k, v in shown["crm"].items() if k != "at"} == {"seq": 3, "done": 70, "total": 100,
                                                                   "note": "table invoices"}
    assert datetime.fromisoformat(shown["crm"]["at"]) == crm["progress_at"]


async def test_the_final_receipt_completes_the_task_after_progress_and_later_progress_is_ignored(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    t = await erasure(coordinator, pool)
    await coordinator.handle_receipts([progress_record(t["crm"], 1, done=1, total=2)])
    # progress and the result in one batch, in the order the partition holds them
    await coordinator.handle_receipts([progress_record(t["crm"], 2, done=2, total=2),
                                       receipt_record(t["crm"], "succeeded", counts={"erased": 2})])
    crm = await task(pool, t["crm"])
    assert crm["status"] == "succeeded" and orjson.loads(crm["result"])["counts"] == {"erased": 2}
    assert progress_of(crm)["seq"] == 2  # type: ignore[index]
    # progress arriving after the result (a slow partition, a redelivery) changes nothing, and is no dead letter
    timeline = await pool.fetchval("SELECT count(*) FROM case_timeline")
    await coordinator.handle_receipts([progress_record(t["crm"], 3, done=0, total=2, note="late")])
    later = await task(pool, t["crm"])
    assert later["status"] == "succeeded" and progress_of(later) == progress_of(crm)
    assert later["progress_at"] == crm["progress_at"]
    assert await pool.fetchval("SELECT count(*) FROM case_timeline") == timeline
    assert await dead_letters(pool) == []
    # billing finishes: the case completes as it always did
    await coordinator.handle_receipts([receipt_record(t["billing"], "not_found")])
    status = await pool.fetchval("SELECT status FROM cases WHERE case_id = $1", t["crm"]["case_id"])
    assert status == "completed"
    # progress of a finished case's task is still only ignored
    await coordinator.handle_receipts([progress_record(t["billing"], 1, done=5)])
    assert (await task(pool, t["billing"]))["progress"] is None
    assert await dead_letters(pool) == []


async def test_progress_of_an_unknown_task_or_another_attempt_is_ignored_not_dead_lettered(
    coordinator: Coordinator, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    t = await erasure(coordinator, pool)
    ghost = {**dict(t["crm"]), "task_id": uuid.uuid4()}
    lost = {**dict(t["crm"]), "case_id": uuid.uuid4(), "task_id": uuid.uuid4()}
    with caplog.at_level("INFO", logger="dsrflow.coordinator"):
        await coordinator.handle_receipts([
            progress_record(ghost, 1, done=1, note="ghost note"),
            progress_record(lost, 1, done=1),
            progress_record(t["crm"], 1, attempt=2, done=1),  # an attempt never sent
        ])
    assert await dead_letters(pool) == []
    crm = await task(pool, t["crm"])
    assert crm["progress"] is None and crm["progress_at"] is None
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(ignored) == 3
    assert str(ghost["task_id"]) in ignored[0] and str(lost["case_id"]) in ignored[1] and "attempt 2" in ignored[2]
    assert not any("ghost note" in m or "an@example.vn" in m for m in ignored)  # ids only


async def test_a_redispatch_clears_the_progress_and_the_old_attempts_progress_is_ignored(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    c = make_coordinator(pool, case_store, tmp_path, max_task_attempts=3)
    t = await erasure(c, pool)
    await c.handle_receipts([progress_record(t["crm"], 4, done=4, total=10)])
    assert progress_of(await task(pool, t["crm"])) is not None
    await c.handle_receipts([receipt_record(t["crm"], "failed", retryable=True, error="db away")])
    crm = await task(pool, t["crm"])
    assert crm["status"] == "dispatched" and crm["attempt"] == 2
    assert crm["progress"] is None and crm["progress_at"] is None
    await c.handle_receipts([progress_record(t["crm"], 9, attempt=1, done=9)])  # attempt 1 ran on a while
    assert (await task(pool, t["crm"]))["progress"] is None
    await c.handle_receipts([progress_record(crm, 1, done=1, total=10)])  # the new attempt counts from 1 again
    assert progress_of(await task(pool, t["crm"])) == {"attempt": 2, "seq": 1, "done": 1, "total": 10, "note": None}


# -- signatures ------------------------------------------------------------------------
async def test_a_forged_progress_is_dead_lettered_before_the_inbox_and_not_recorded(
    coordinator: Coordinator, pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    crm_key = auth.generate_credential("crm")
    stranger = auth.generate_credential("crm")  # a key nobody registered
    async with pool.acquire() as conn:
        await signing.add_system_key(conn, "crm", crm_key.public_pem(), key_id=crm_key.key_id)
    t = await erasure(coordinator, pool)
    real_id = str(uuid.uuid4())
    tampered = progress_record(t["crm"], 3, credential=crm_key, done=5, total=9)
    tampered = Record(tampered.topic, 0, next(_offsets), tampered.key,
                      tampered.value.replace(b'"done":5', b'"done":9'), tampered.headers)  # type: ignore[union-attr]
    await coordinator.handle_receipts([
        progress_record(t["crm"], 1, event_id=real_id, done=1),  # unsigned, the real one's id
        progress_record(t["crm"], 2, credential=stranger, event_id=real_id, done=2),  # an unknown key
        tampered,
    ])
    crm = await task(pool, t["crm"])
    assert crm["progress"] is None and crm["progress_at"] is None
    dead = await dead_letters(pool)
    assert [kind for kind, _ in dead] == ["unauthenticated_receipt"] * 3
    assert all(error.startswith("progress of system crm: ") for _, error in dead)
    # the real progress, signed, with the id the forgeries tried to take, is recorded
    await coordinator.handle_receipts([progress_record(t["crm"], 1, credential=crm_key, event_id=real_id, done=3)])
    assert progress_of(await task(pool, t["crm"]))["done"] == 3  # type: ignore[index]
    # billing has no key: its unsigned progress counts, unless every receipt must be signed
    strict = make_coordinator(pool, case_store, tmp_path, require_signed_receipts=True)
    await strict.handle_receipts([progress_record(t["billing"], 1, done=1)])
    assert (await task(pool, t["billing"]))["progress"] is None
    assert [kind for kind, _ in await dead_letters(pool)] == ["unauthenticated_receipt"] * 4
    await coordinator.handle_receipts([progress_record(t["billing"], 1, done=1)])
    assert progress_of(await task(pool, t["billing"]))["done"] == 1  # type: ignore[index]


async def test_progress_naming_another_systems_task_does_not_touch_it(
    coordinator: Coordinator, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    crm_key, billing_key = auth.generate_credential("crm"), auth.generate_credential("billing")
    async with pool.acquire() as conn:
        await signing.add_system_key(conn, "crm", crm_key.public_pem(), key_id=crm_key.key_id)
    t = await erasure(coordinator, pool)
    # crm's key, crm's name, billing's task: admitted (it is crm's own word) but it cannot touch billing's task
    as_crm = {**dict(t["billing"]), "system": "crm"}
    with caplog.at_level("WARNING", logger="dsrflow.coordinator"):
        await coordinator.handle_receipts([progress_record(as_crm, 1, credential=crm_key, done=1)])
    billing = await task(pool, t["billing"])
    assert billing["progress"] is None and billing["progress_at"] is None
    assert (await task(pool, t["crm"]))["progress"] is None
    assert await dead_letters(pool) == []
    assert any(str(t["billing"]["task_id"]) in r.getMessage() and "not system crm's" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    # once billing has a key, crm's key cannot speak for billing at all: dead-lettered
    async with pool.acquire() as conn:
        await signing.add_system_key(conn, "billing", billing_key.public_pem(), key_id=billing_key.key_id)
    await coordinator.handle_receipts([progress_record(t["billing"], 1, credential=crm_key, done=1)])
    assert (await task(pool, t["billing"]))["progress"] is None
    assert [kind for kind, _ in await dead_letters(pool)] == ["unauthenticated_receipt"]
    await coordinator.handle_receipts([progress_record(t["billing"], 1, credential=billing_key, done=1)])
    assert progress_of(await task(pool, t["billing"]))["done"] == 1  # type: ignore[index]


# -- decoding --------------------------------------------------------------------------
async def test_other_types_and_invalid_progress_are_dead_lettered_with_the_reason(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    t = await erasure(coordinator, pool)
    good = progress_record(t["crm"], 1, done=1)
    other = Record(topics.RECEIPTS, 0, next(_offsets), None, good.value,
                   [(k, b"dsrflow.task.hurry.v1" if k == "ce_type" else v) for k, v in good.headers])  # type: ignore[union-attr]
    untyped = Record(topics.RECEIPTS, 0, next(_offsets), None, good.value,
                     [(k, v) for k, v in good.headers if k != "ce_type"])  # type: ignore[union-attr]
    bad_seq = Record(topics.RECEIPTS, 0, next(_offsets), None, good.value.replace(b'"seq":1', b'"seq":0'),  # type: ignore[union-attr]
                     good.headers)
    as_receipt = Record(topics.RECEIPTS, 0, next(_offsets), None, good.value,  # a progress's body typed a receipt
                        [(k, TaskReceipt.ce_type.encode() if k == "ce_type" else v) for k, v in good.headers])  # type: ignore[union-attr]
    await coordinator.handle_receipts([other, untyped, bad_seq, as_receipt])
    dead = await dead_letters(pool)
    assert [kind for kind, _ in dead] == ["bad_type", "missing_header", "invalid", "invalid"]
    assert "dsrflow.task.hurry.v1" in dead[0][1] and TaskProgress.ce_type in dead[0][1] \
        and TaskReceipt.ce_type in dead[0][1]
    assert "seq" in dead[2][1]
    crm = await task(pool, t["crm"])
    assert crm["progress"] is None and crm["status"] == "dispatched"


# -- the sweep -------------------------------------------------------------------------
async def test_a_task_that_keeps_progressing_is_not_resent_one_that_stops_is(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    timeout = coordinator.settings.task_timeout
    t = await erasure(coordinator, pool)
    case_id = t["crm"]["case_id"]
    # both tasks were sent three timeouts ago; crm has been reporting progress, billing has been silent
    await pool.execute("UPDATE tasks SET dispatched_at = dispatched_at - $2::interval WHERE case_id = $1",
                       case_id, 3 * timeout)
    await coordinator.handle_receipts([progress_record(t["crm"], 1, done=10, total=100)])
    soon = datetime.now(UTC) + timeout / 2
    assert await coordinator.sweep_stalled(soon) == 1  # billing only
    now = await tasks(pool, await pool.fetchval("SELECT request_id FROM cases WHERE case_id = $1", case_id))
    assert now["crm"]["attempt"] == 1 and now["crm"]["status"] == "dispatched"
    assert now["billing"]["attempt"] == 2
    sent = [orjson.loads(r["value"]) for r in await pool.fetch(
        "SELECT value FROM outbox WHERE topic = $1 ORDER BY id", topics.tasks_topic("crm"))]
    assert [s["attempt"] for s in sent] == [1]  # crm was never sent again
    # crm keeps progressing: its wait keeps starting over
    first = now["crm"]["progress_at"]
    await coordinator.handle_receipts([progress_record(t["crm"], 2, done=50, total=100)])
    crm = await task(pool, t["crm"])
    assert crm["progress_at"] > first
    assert await coordinator.sweep_stalled(crm["progress_at"] + timeout - timedelta(seconds=1)) == 0
    assert (await task(pool, t["crm"]))["attempt"] == 1
    # a case whose only open task is progressing is not even picked by the sweep's query
    await coordinator.handle_receipts([receipt_record(now["billing"], "not_found")])
    async with pool.acquire() as conn:
        assert await repo.stale_cases(conn, crm["progress_at"] + timeout - timedelta(seconds=1), timeout,
                                      coordinator.settings.task_backoff_max, 10) == []
        assert await repo.stale_cases(conn, crm["progress_at"] + timeout + timedelta(seconds=1), timeout,
                                      coordinator.settings.task_backoff_max, 10) == [case_id]
    # its progress stops: one wait after the last progress it is sent again, its progress cleared
    assert await coordinator.sweep_stalled(crm["progress_at"] + timeout + timedelta(seconds=1)) == 1
    crm = await task(pool, t["crm"])
    assert crm["attempt"] == 2 and crm["status"] == "dispatched"
    assert crm["progress"] is None and crm["progress_at"] is None
    sent = [orjson.loads(r["value"]) for r in await pool.fetch(
        "SELECT value FROM outbox WHERE topic = $1 ORDER BY id", topics.tasks_topic("crm"))]
    assert [s["attempt"] for s in sent] == [1, 2]
    entry = await pool.fetchrow("""SELECT detail FROM case_timeline WHERE case_id = $1 AND kind = 'task_redispatched'
                                   AND detail->>'system' = 'crm'""", case_id)
    detail = orjson.loads(entry["detail"]) if isinstance(entry["detail"], str) else entry["detail"]
    assert detail["progress_seq"] == 2 and detail["silent_s"] == int((timeout + timedelta(seconds=1)).total_seconds())
    assert detail["waited_s"] > detail["silent_s"]


async def test_a_progressing_task_is_stalled_near_the_deadline_once_its_progress_stops(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    c = make_coordinator(pool, case_store, tmp_path, max_task_attempts=1)
    timeout = c.settings.task_timeout
    t = await erasure(c, pool)
    case = await pool.fetchrow("SELECT received_at, due_at FROM cases WHERE case_id = $1", t["crm"]["case_id"])
    warn = case["received_at"] + (case["due_at"] - case["received_at"]) * c.settings.deadline_warning_share
    await c.handle_receipts([progress_record(t["crm"], 1, done=1)])
    assert (await task(pool, t["crm"]))["progress_at"] is not None
    # time passes: crm was sent four timeouts before the warning point and last reported two before it
    await pool.execute("UPDATE tasks SET progress_at = $2::timestamptz - $3::interval * 2, "
                       "dispatched_at = $2::timestamptz - $3::interval * 4 WHERE task_id = $1",
                       t["crm"]["task_id"], warn, timeout)
    last = (await task(pool, t["crm"]))["progress_at"]
    # one wait after its last progress, less a second: crm is left alone (billing, silent, is sent again)
    assert await c.sweep_stalled(last + timeout - timedelta(seconds=1)) == 1
    crm = await task(pool, t["crm"])
    assert crm["status"] == "dispatched" and crm["attempt"] == 1
    assert (await task(pool, t["billing"]))["attempt"] == 2
    # past the warning point, its progress a full wait behind: stalled and the DPO alerted
    assert await c.sweep_stalled(warn + timedelta(seconds=1)) == 1
    crm = await task(pool, t["crm"])
    assert crm["status"] == "stalled" and crm["attempt"] == 1
    alerts = [orjson.loads(r["value"]) for r in await pool.fetch("SELECT value FROM outbox WHERE topic = $1",
                                                                 topics.ALERTS)]
    assert [(a["kind"], a["system"]) for a in alerts] == [("task_stalled", "crm")]
    # progress for the stalled task changes nothing; its late receipt still completes it
    await c.handle_receipts([progress_record(crm, 2, done=2), receipt_record(crm, "succeeded", counts={"erased": 1})])
    crm = await task(pool, t["crm"])
    assert crm["status"] == "succeeded" and progress_of(crm)["seq"] == 1  # type: ignore[index]


# -- through the real broker -------------------------------------------------------------
async def test_signed_progress_and_receipt_through_the_broker(
    broker: str, broker_kind: str, pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    """A worker's signed progress and receipt, produced to dsr.receipts.v1 and consumed back as the
    coordinator's agent gets them (headers and bytes as the broker stores them)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    settings = Settings(pg_dsn=case_store, kafka_bootstrap=broker, state_dir=tmp_path,
                        kafka_idempotent_producer=broker_kind != "tansu")
    await topics.apply(settings.kafka_client_options(), topics.specs_for(["crm", "billing"]))
    c = Coordinator(settings, pool, export_store=MemoryExportStore())
    crm_key = auth.generate_credential("crm")
    async with pool.acquire() as conn:
        await signing.add_system_key(conn, "crm", crm_key.public_pem(), key_id=crm_key.key_id)
    t = await erasure(c, pool)
    sent = [progress_record(t["crm"], 1, credential=crm_key, done=1, total=2),
            progress_record(t["crm"], 1, done=2, total=2, note="forged"),  # unsigned: refused
            progress_record(t["crm"], 2, credential=crm_key, done=2, total=2)]
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    try:
        for r in sent:
            await producer.send_and_wait(topics.RECEIPTS, r.value, key=r.key, headers=list(r.headers))  # type: ignore[arg-type]
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topics.RECEIPTS, **settings.kafka_client_options(), auto_offset_reset="earliest",
                                group_id=None)
    await consumer.start()
    got: list[Record] = []
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len(got) < len(sent) and asyncio.get_running_loop().time() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                got += [Record(m.topic, m.partition, m.offset, m.key, m.value, list(m.headers)) for m in recs
                        if m.key == str(t["crm"]["case_id"]).encode()]
    finally:
        await consumer.stop()
    assert len(got) == len(sent), "the records never came back from dsr.receipts.v1"
    await c.handle_receipts(got)
    crm = await task(pool, t["crm"])
    assert progress_of(crm) == {"attempt": 1, "seq": 2, "done": 2, "total": 2, "note": None}
    assert [kind for kind, _ in await dead_letters(pool)] == ["unauthenticated_receipt"]
