"""The coordinator's intake and aggregation on a real PostgreSQL (no broker: records are
handed in as Kafka would deliver them), and the outbox relay on the real broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from dsrflow import codec, topics
from dsrflow.coordinator import Coordinator, Record
from dsrflow.coordinator.relay import OutboxRelay
from dsrflow.events import Artifact, RetainedItem, RightsRequested, TaskAssigned, TaskReceipt
from dsrflow.exports import MemoryExportStore
from dsrflow.registry import SystemDeclaration, register
from dsrflow.settings import Settings
from dsrflow.store.outbox import headers_from_json
from dsrflow.store.timeline import verify

CRM = SystemDeclaration(name="crm", identifier_types=("email", "phone"), actions=("export", "erase"))
BILLING = SystemDeclaration(name="billing", identifier_types=("email",), actions=("export", "erase"))


@pytest.fixture
async def pool(case_store: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(case_store, min_size=1, max_size=2)
    async with p.acquire() as conn:
        await register(conn, CRM)
        await register(conn, BILLING)
    yield p
    await p.close()


@pytest.fixture
def coordinator(pool: asyncpg.Pool, case_store: str, tmp_path: Path) -> Coordinator:
    settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path, max_task_attempts=2)
    return Coordinator(settings, pool, export_store=MemoryExportStore())


@pytest.fixture
async def kafka_settings(broker: str, broker_kind: str, case_store: str, tmp_path: Path) -> Settings:
    """Settings on the real broker, with dsrflow's topics (and the two test systems' task topics) in place."""
    settings = Settings(pg_dsn=case_store, kafka_bootstrap=broker, state_dir=tmp_path,
                        kafka_idempotent_producer=broker_kind != "tansu")
    await topics.apply(settings.kafka_client_options(), topics.specs_for(["crm", "billing"]))
    return settings


@pytest.fixture
async def relay_producer(kafka_settings: Settings) -> AsyncIterator[Any]:
    """A producer configured as the relay's, with a short request timeout."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**kafka_settings.producer_options(), request_timeout_ms=5000)
    await producer.start()
    yield producer
    await producer.stop()


_offsets = iter(range(10**6))


def record(topic: str, value: bytes | None, headers: list[tuple[str, bytes]], key: bytes | None = None) -> Record:
    return Record(topic, 0, next(_offsets), key, value, headers)


def request(right: str = "access", request_id: str | None = None, **kw: object) -> Record:
    req = RightsRequested.model_validate({
        "request_id": request_id or f"r-{uuid.uuid4().hex[:8]}", "right": right, "verified": True,
        "subject": {"identifiers": {"email": "lan.nguyen@example.vn", "phone": "+84901234567"}}, **kw,
    })
    value, headers = codec.encode(req, source="test")
    return record(topics.REQUESTS, value, headers, req.request_id.encode())


async def outbox_events(pool: asyncpg.Pool, topic: str) -> list[tuple[dict[str, str], bytes]]:
    rows = await pool.fetch("SELECT value, headers FROM outbox WHERE topic = $1 ORDER BY id", topic)
    return [(codec.header_map(headers_from_json(r["headers"])), r["value"]) for r in rows]


async def tasks_of(pool: asyncpg.Pool, request_id: str) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch(
        "SELECT t.* FROM tasks t JOIN cases c USING (case_id) WHERE c.request_id = $1", request_id)
    return {r["system"]: r for r in rows}


def receipt(task: asyncpg.Record, status: str, **kw: object) -> Record:
    r = TaskReceipt.model_validate({
        "task_id": task["task_id"], "case_id": task["case_id"], "system": task["system"],
        "attempt": kw.pop("attempt", task["attempt"]), "status": status, "completed_at": datetime.now(UTC), **kw,
    })
    value, headers = codec.encode(r, source=f"worker/{task['system']}")
    return record(topics.RECEIPTS, value, headers, str(task["case_id"]).encode())


async def test_request_opens_case_with_one_task_per_system_and_minimal_identifiers(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    rec = request()
    await coordinator.handle_requests([rec])
    case = await pool.fetchrow("SELECT * FROM cases")
    assert case["status"] == "in_progress" and case["right_name"] == "access"
    assert case["due_at"] > case["received_at"] and case["ack_due_at"] <= case["due_at"]
    tasks = await tasks_of(pool, case["request_id"])
    assert set(tasks) == {"crm", "billing"} and all(t["status"] == "dispatched" for t in tasks.values())
    billing = await outbox_events(pool, "dsr.tasks.billing.v1")
    assert len(billing) == 1
    task = codec.decode(billing[0][1], [(k, v.encode()) for k, v in billing[0][0].items()], TaskAssigned)
    assert task.data.identifiers == {"email": "lan.nguyen@example.vn"}  # billing does not search by phone
    crm = await outbox_events(pool, "dsr.tasks.crm.v1")
    assert b"+84901234567" in crm[0][1]
    # CaseUpdated carries no personal data
    for _, value in await outbox_events(pool, "dsr.cases.v1"):
        assert b"lan.nguyen" not in value and b"+8490" not in value


async def test_redelivered_event_changes_nothing_and_duplicate_request_opens_no_case(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    rec = request(request_id="dup-1")
    await coordinator.handle_requests([rec])
    before = await pool.fetchval("SELECT count(*) FROM outbox")
    await coordinator.handle_requests([rec])  # the same event again (redelivery)
    assert await pool.fetchval("SELECT count(*) FROM outbox") == before
    await coordinator.handle_requests([request(request_id="dup-1")])  # same request id, new event
    assert await pool.fetchval("SELECT count(*) FROM cases WHERE request_id = 'dup-1'") == 1
    assert await pool.fetchval("SELECT count(*) FROM tasks") == 2
    kinds = [r["kind"] for r in await pool.fetch("SELECT kind FROM case_timeline ORDER BY seq")]
    assert kinds.count("duplicate_request") == 1


async def test_invalid_and_unknown_records_are_dead_lettered_with_their_bytes(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    _, headers = codec.encode(RightsRequested.model_validate(
        {"request_id": "x", "right": "access", "subject": {"identifiers": {"email": "a@b.vn"}}}), source="t")
    bad = [
        record(topics.REQUESTS, b"{not json", [*headers, ("x\x00y", b"\x00a")], b"k1"),
        record(topics.REQUESTS, b'{"request_id":"x"}', [("ce_id", b"1")], b"k2"),
        request(jurisdiction="ZZ"),
    ]
    good = request()
    await coordinator.handle_requests([*bad, good])
    assert await pool.fetchval("SELECT count(*) FROM cases") == 1  # the good one went through
    dead = await pool.fetch("SELECT key, value, headers FROM outbox WHERE topic = 'dsr.deadletter.v1' ORDER BY id")
    assert [r["value"] for r in dead[:2]] == [b"{not json", b'{"request_id":"x"}']
    kinds = [codec.read_dead_letter(headers_from_json(r["headers"])).error_type for r in dead]
    assert kinds == ["bad_json", "missing_header", "unknown_jurisdiction"]
    assert dead[0]["key"] == b"k1"
    # a foreign client's header, NUL bytes and all, survives the outbox exactly
    assert ("x\x00y", b"\x00a") in headers_from_json(dead[0]["headers"])

    # a receipt for a task nobody assigned
    ghost = TaskReceipt(task_id=uuid.uuid4(), case_id=uuid.uuid4(), system="crm", attempt=1, status="succeeded",
                        completed_at=datetime.now(UTC))
    value, headers = codec.encode(ghost, source="worker/crm")
    await coordinator.handle_receipts([record(topics.RECEIPTS, value, headers)])
    last = await pool.fetchrow("SELECT headers FROM outbox WHERE topic = 'dsr.deadletter.v1' ORDER BY id DESC LIMIT 1")
    assert codec.read_dead_letter(headers_from_json(last["headers"])).error_type == "unknown_task"


async def test_receipts_complete_erasure_with_exceptions_and_duplicates_are_ignored(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    rec = request("erasure", request_id="er-1")
    await coordinator.handle_requests([rec])
    tasks = await tasks_of(pool, "er-1")
    kept = RetainedItem(category="user.financial", records=3, legal_basis="Law on Accounting Art 41")
    r_billing = receipt(tasks["billing"], "retained", retained=[kept.model_dump()], counts={"anonymised": 1})
    await coordinator.handle_receipts([r_billing])
    assert (await pool.fetchrow("SELECT status FROM cases"))["status"] == "in_progress"
    await coordinator.handle_receipts([receipt(tasks["crm"], "succeeded", counts={"erased": 4}), r_billing])
    case = await pool.fetchrow("SELECT * FROM cases")
    assert case["status"] == "completed_with_exceptions"
    outcome = orjson.loads(case["outcome"])
    assert [(r["system"], r["category"], r["records"], r["legal_basis"]) for r in outcome["retained"]] == [
        ("billing", "user.financial", 3, "Law on Accounting Art 41")]
    assert outcome["systems"]["crm"]["counts"] == {"erased": 4}
    # a late duplicate of a receipt for a finished task changes nothing
    n_events = await pool.fetchval("SELECT count(*) FROM outbox")
    await coordinator.handle_receipts([receipt(tasks["crm"], "failed", error="late")])
    assert await pool.fetchval("SELECT count(*) FROM outbox") == n_events
    assert (await pool.fetchrow("SELECT status FROM tasks WHERE system = 'crm'"))["status"] == "succeeded"
    rows = await pool.fetch("SELECT * FROM case_timeline WHERE case_id = $1 ORDER BY position", case["case_id"])
    assert [r["kind"] for r in rows][-1] == "completed" and verify(rows)


async def test_retryable_failure_redispatches_then_gives_up(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    await coordinator.handle_requests([request("erasure", request_id="retry-1")])
    crm = (await tasks_of(pool, "retry-1"))["crm"]
    await coordinator.handle_receipts([receipt(crm, "failed", retryable=True, error="db timeout")])
    crm = (await tasks_of(pool, "retry-1"))["crm"]
    assert crm["attempt"] == 2 and crm["status"] == "dispatched"
    attempts = [codec.decode(v, [(k, x.encode()) for k, x in h.items()], TaskAssigned).data.attempt
                for h, v in await outbox_events(pool, "dsr.tasks.crm.v1")]
    assert attempts == [1, 2]
    # max_task_attempts=2: the second retryable failure is final
    await coordinator.handle_receipts([receipt(crm, "failed", retryable=True, error="db timeout")])
    billing = (await tasks_of(pool, "retry-1"))["billing"]
    await coordinator.handle_receipts([receipt(billing, "not_found")])
    assert (await pool.fetchrow("SELECT status FROM cases"))["status"] == "failed"


async def test_access_case_gets_a_bundle_from_the_export_store(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    await coordinator.handle_requests([request("access", request_id="acc-1")])
    tasks = await tasks_of(pool, "acc-1")
    case_id = tasks["crm"]["case_id"]
    art: Artifact = coordinator.exports.put(f"systems/crm/cases/{case_id}/1.json", b'{"contacts": []}', records=1)
    await coordinator.handle_receipts([
        receipt(tasks["crm"], "succeeded", artifacts=[art.model_dump()]),
        receipt(tasks["billing"], "not_found"),
    ])
    case = await pool.fetchrow("SELECT * FROM cases")
    assert case["status"] == "completed"
    bundle = Artifact.model_validate(orjson.loads(case["bundle"]))
    from dsrflow.exports import read_bundle

    manifest, files = read_bundle(coordinator.exports.get(bundle.ref))
    assert manifest["systems_without_data"] == ["billing"] and sorted(files) == ["crm.csv", "crm.json", "index.html"]
    assert [(s["name"], s["records"], s["declared"]) for s in manifest["systems"]] == [
        ("billing", 0, True), ("crm", 1, True)]


async def test_a_conflicting_systems_export_stays_out_of_the_bundle(coordinator: Coordinator,
                                                                     pool: asyncpg.Pool) -> None:
    """A worker that exported, then found the identifiers to be two people's, answers conflict: what
    it exported may hold the other person's data, and never reaches the subject."""
    await coordinator.handle_requests([request("access", request_id="acc-c")])
    tasks = await tasks_of(pool, "acc-c")
    case_id = tasks["crm"]["case_id"]
    theirs = coordinator.exports.put(f"systems/crm/cases/{case_id}/1.json", b'[{"name": "Lan B"}]', records=1)
    mine = coordinator.exports.put(f"systems/billing/cases/{case_id}/1.json", b'[{"name": "Lan A"}]', records=1)
    await coordinator.handle_receipts([
        receipt(tasks["crm"], "conflict", error="two people", artifacts=[theirs.model_dump()]),
        receipt(tasks["billing"], "succeeded", artifacts=[mine.model_dump()]),
    ])
    case = await pool.fetchrow("SELECT * FROM cases WHERE request_id = 'acc-c'")
    assert case["status"] == "completed_with_exceptions"
    from dsrflow.exports import read_bundle

    manifest, files = read_bundle(coordinator.exports.get(orjson.loads(case["bundle"])["ref"]))
    assert sorted(files) == ["billing.csv", "billing.json", "index.html"]
    assert all(b"Lan B" not in body for body in files.values())
    assert [(w["system"], w["reason"]) for w in manifest["withheld"]] == [("crm", "conflict")]


async def test_tampered_export_fails_the_case_not_the_coordinator(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    await coordinator.handle_requests([request("access", request_id="acc-2")])
    tasks = await tasks_of(pool, "acc-2")
    art = coordinator.exports.put(f"systems/crm/cases/{tasks['crm']['case_id']}/1.json", b"{}", records=0)
    forged = art.model_copy(update={"sha256": "0" * 64})
    await coordinator.handle_receipts([receipt(tasks["crm"], "succeeded", artifacts=[forged.model_dump()]),
                                       receipt(tasks["billing"], "not_found")])
    case = await pool.fetchrow("SELECT * FROM cases")
    assert case["status"] == "failed" and "does not match" in orjson.loads(case["outcome"])["bundle_error"]


async def test_a_receipt_cannot_bring_another_systems_export_into_the_bundle(
        coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    await coordinator.handle_requests([request("access", request_id="acc-3")])
    tasks = await tasks_of(pool, "acc-3")
    # billing's real export of this case, named by crm's receipt
    theirs = coordinator.exports.put(f"systems/billing/cases/{tasks['crm']['case_id']}/1.json", b"{}", records=0)
    await coordinator.handle_receipts([receipt(tasks["crm"], "succeeded", artifacts=[theirs.model_dump()]),
                                       receipt(tasks["billing"], "not_found")])
    case = await pool.fetchrow("SELECT * FROM cases WHERE request_id = 'acc-3'")
    assert case["status"] == "failed"
    assert "export of system 'crm' is not one of this case's" in orjson.loads(case["outcome"])["bundle_error"]


async def test_outbox_relay_publishes_to_kafka_and_marks_sent(
    coordinator: Coordinator, pool: asyncpg.Pool, kafka_settings: Settings
) -> None:
    settings = kafka_settings
    rec = request(request_id=f"relay-{uuid.uuid4().hex[:6]}")
    await coordinator.handle_requests([rec])
    n = await pool.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
    relay = OutboxRelay(settings, poll_interval=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    consumer = AIOKafkaConsumer(topics.CASES, **settings.kafka_client_options(), auto_offset_reset="earliest",
                                group_id=None)
    await consumer.start()
    try:
        case_id = str(await pool.fetchval("SELECT case_id FROM cases"))
        found = None
        deadline = asyncio.get_running_loop().time() + 30
        while found is None and asyncio.get_running_loop().time() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                for r in recs:
                    if r.key == case_id.encode():
                        found = r
        assert found is not None, "CaseUpdated never reached dsr.cases.v1"
        assert codec.header_map(found.headers)["ce_type"] == "dsrflow.case.updated.v1"
        for _ in range(50):
            if await pool.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0:
                break
            await asyncio.sleep(0.1)
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL") == n
    finally:
        stop.set()
        await task
        await consumer.stop()


async def test_task_without_receipt_is_redispatched_then_stalled_and_a_late_receipt_still_counts(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    from datetime import timedelta

    await coordinator.handle_requests([request("access", request_id="slow-1")])
    later = datetime.now(UTC) + coordinator.settings.task_timeout + timedelta(seconds=1)
    assert await coordinator.sweep_stalled(datetime.now(UTC)) == 0  # nothing is late yet
    assert await coordinator.sweep_stalled(later) == 2
    tasks = await tasks_of(pool, "slow-1")
    assert {t["attempt"] for t in tasks.values()} == {2}
    assert len(await outbox_events(pool, "dsr.tasks.crm.v1")) == 2
    # the second attempt waits twice as long: one timeout later nothing moves, two later it is sent again
    timeout = coordinator.settings.task_timeout
    second = await pool.fetchval("SELECT max(dispatched_at) FROM tasks")
    assert await coordinator.sweep_stalled(second + timeout + timedelta(seconds=1)) == 0
    third = second + 2 * timeout + timedelta(seconds=1)
    assert await coordinator.sweep_stalled(third) == 2
    assert {t["attempt"] for t in (await tasks_of(pool, "slow-1")).values()} == {3}
    # once the deadline nears (75% of the time gone) a silent task is surfaced to the DPO, not re-sent
    case = await pool.fetchrow("SELECT received_at, due_at FROM cases")
    warn = case["received_at"] + (case["due_at"] - case["received_at"]) * 0.75
    assert third + 4 * timeout < warn
    assert await coordinator.sweep_stalled(warn - timedelta(seconds=1)) == 2  # before it: sent once more
    assert await coordinator.sweep_stalled(warn + 30 * timeout) == 2
    tasks = await tasks_of(pool, "slow-1")
    assert {t["status"] for t in tasks.values()} == {"stalled"}
    assert {t["attempt"] for t in tasks.values()} == {4}
    alerts = [orjson.loads(r["value"]) for r in
              await pool.fetch("SELECT value FROM outbox WHERE topic = 'dsr.alerts.v1' ORDER BY id")]
    assert sorted((a["kind"], a["system"], a["attempts"]) for a in alerts) == [
        ("task_stalled", "billing", 4), ("task_stalled", "crm", 4)]
    last = await pool.fetchrow("SELECT value FROM outbox WHERE topic = 'dsr.cases.v1' ORDER BY id DESC LIMIT 1")
    assert orjson.loads(last["value"])["tasks"] == {"crm": "stalled", "billing": "stalled"}
    assert (await pool.fetchrow("SELECT status FROM cases"))["status"] == "in_progress"
    await coordinator.handle_receipts([receipt(tasks["crm"], "not_found"), receipt(tasks["billing"], "not_found")])
    assert (await pool.fetchrow("SELECT status FROM cases"))["status"] == "completed"
    kinds = [r["kind"] for r in await pool.fetch("SELECT kind FROM case_timeline ORDER BY seq")]
    assert kinds.count("task_redispatched") == 6 and kinds.count("task_stalled") == 2


async def test_unverified_request_waits_until_the_dpo_verifies_it(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    from dsrflow.coordinator.service import CaseNotFound, InvalidTransition

    await coordinator.handle_requests([request("erasure", request_id="unv-1", verified=False)])
    case = await pool.fetchrow("SELECT * FROM cases")
    assert case["status"] == "awaiting_verification" and not case["verified"]
    assert await pool.fetchval("SELECT count(*) FROM tasks") == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE topic LIKE 'dsr.tasks.%'") == 0

    assert await coordinator.verify(case["case_id"], by="dpo-1") == "in_progress"
    case = await pool.fetchrow("SELECT * FROM cases")
    assert case["status"] == "in_progress" and case["verified"]
    assert set(await tasks_of(pool, "unv-1")) == {"crm", "billing"}
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE topic LIKE 'dsr.tasks.%'") == 2
    rows = await pool.fetch("SELECT * FROM case_timeline WHERE case_id = $1 ORDER BY position", case["case_id"])
    assert [r["kind"] for r in rows] == ["received", "acknowledged", "awaiting_verification", "verified",
                                         "tasks_dispatched"]
    assert verify(rows)

    with pytest.raises(InvalidTransition):
        await coordinator.verify(case["case_id"], by="dpo-1")
    with pytest.raises(CaseNotFound):
        await coordinator.verify(uuid.uuid4(), by="dpo-1")


async def test_prune_drops_old_sent_outbox_rows_and_old_inbox_ids_only(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    from datetime import timedelta

    await coordinator.handle_requests([request()])
    now = datetime.now(UTC)
    total = await pool.fetchval("SELECT count(*) FROM outbox")
    await pool.execute("UPDATE outbox SET sent_at = $1 WHERE id = (SELECT min(id) FROM outbox)",
                       now - timedelta(days=8))
    await pool.execute("INSERT INTO inbox (consumer, event_id, processed_at) VALUES ('t', 'old', $1)",
                       now - timedelta(days=36))
    assert await coordinator.prune(now) == (1, 1)
    assert await pool.fetchval("SELECT count(*) FROM outbox") == total - 1  # unsent rows stay, whatever their age
    assert await pool.fetchval("SELECT count(*) FROM inbox WHERE event_id = 'old'") == 0
    assert await pool.fetchval("SELECT count(*) FROM inbox") == 1


async def test_relay_sets_aside_a_row_the_broker_refuses_and_publishes_the_rest(
    pool: asyncpg.Pool, kafka_settings: Settings, relay_producer: Any
) -> None:
    from datetime import timedelta

    from dsrflow.coordinator import relay as relay_mod
    from dsrflow.store.outbox import OutboxMessage, add

    settings, producer = kafka_settings, relay_producer
    async with pool.acquire() as conn:
        await add(conn, [
            OutboxMessage(topics.DEADLETTER, b"huge", b"x" * 3_000_000, []),  # over the 1 MB request limit
            OutboxMessage("dsr.tasks.nosuchsystem.v1", b"k", b"{}", []),  # a topic that does not exist
            OutboxMessage(topics.CASES, b"ok", b"{}", []),
        ])
    relay = OutboxRelay(settings, set_aside_after=timedelta(0))  # the grace period is tested below
    async with pool.acquire() as conn:
        await relay.relay_once(conn, producer)
        rows = {r["key"]: r for r in await conn.fetch("SELECT * FROM outbox")}
        assert rows[b"ok"]["sent_at"] is not None  # the good row was not held up
        assert rows[b"huge"]["failed_at"] is not None and "MessageSizeTooLarge" in rows[b"huge"]["error"]
        assert rows[b"k"]["failed_at"] is None and rows[b"k"]["attempts"] == 1  # may yet be created
        for _ in range(relay_mod.MAX_ROW_ATTEMPTS - 1):
            await relay.relay_once(conn, producer)
        row = await conn.fetchrow("SELECT * FROM outbox WHERE key = 'k'")
        assert row["failed_at"] is not None and "does not exist" in row["error"]
        assert relay.set_aside == 2 and relay.published == 1
        assert await relay.relay_once(conn, producer) == 0  # nothing left to try


async def test_only_one_relay_publishes_at_a_time(pool: asyncpg.Pool, kafka_settings: Settings) -> None:
    settings = kafka_settings
    a, b = OutboxRelay(settings, standby_interval=0.1), OutboxRelay(settings, standby_interval=0.1)
    stop = asyncio.Event()
    runs = [asyncio.create_task(a.run(stop)), asyncio.create_task(b.run(stop))]
    try:
        for _ in range(100):
            held = await pool.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND granted",
                0x64737272)
            if held:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert held == 1
        assert await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1", 0x64737272) == 1
    finally:
        stop.set()
        await asyncio.gather(*runs)


async def test_agent_path_retries_transient_errors_and_dead_letters_only_the_record_that_breaks(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    from dsrflow.coordinator.app import _with_retry
    from dsrflow.coordinator.service import INTAKE

    good, bad, also_good = request(request_id="g-1"), request(request_id="boom"), request(request_id="g-2")
    outages = iter([asyncpg.CannotConnectNowError("starting up")])  # one transient failure first

    async def handler(records: list[Record]) -> None:
        for exc in outages:
            raise exc
        if any(r.key == b"boom" for r in records):
            raise KeyError("boom")  # a bug that only this record triggers
        await coordinator.handle_requests(records)

    await _with_retry(coordinator, handler, INTAKE, [good, bad, also_good])  # returns: never raises
    assert {r["request_id"] for r in await pool.fetch("SELECT request_id FROM cases")} == {"g-1", "g-2"}
    dead = await pool.fetch("SELECT key, value, headers FROM outbox WHERE topic = 'dsr.deadletter.v1'")
    assert [r["key"] for r in dead] == [b"boom"] and dead[0]["value"] == bad.value
    letter = codec.read_dead_letter(headers_from_json(dead[0]["headers"]))
    assert letter.error_type == "processing_error" and letter.error.startswith("KeyError at ")


async def test_a_late_receipt_from_an_earlier_attempt_records_the_real_effect(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    from datetime import timedelta

    await coordinator.handle_requests([request("erasure", request_id="late-1")])
    first = await tasks_of(pool, "late-1")
    await coordinator.sweep_stalled(datetime.now(UTC) + coordinator.settings.task_timeout + timedelta(seconds=1))
    assert {t["attempt"] for t in (await tasks_of(pool, "late-1")).values()} == {2}
    # attempt 1 did erase; its receipt arrives after attempt 2 went out
    await coordinator.handle_receipts([receipt(first["crm"], "succeeded", attempt=1, counts={"erased": 4}),
                                       receipt(first["billing"], "failed", attempt=1, error="timeout")])
    tasks = await tasks_of(pool, "late-1")
    assert tasks["crm"]["status"] == "succeeded" and orjson.loads(tasks["crm"]["result"])["counts"] == {"erased": 4}
    assert tasks["billing"]["status"] == "dispatched"  # an old failure does not undo the retry in flight
    # attempt 2 of crm finds nothing left: it must not overwrite what attempt 1 did
    await coordinator.handle_receipts([receipt(tasks["crm"], "not_found", attempt=2),
                                       receipt(tasks["billing"], "not_found", attempt=2)])
    tasks = await tasks_of(pool, "late-1")
    assert tasks["crm"]["status"] == "succeeded" and tasks["billing"]["status"] == "not_found"
    assert (await pool.fetchrow("SELECT status FROM cases"))["status"] == "completed"
    # a receipt for an attempt never dispatched changes nothing
    await coordinator.handle_requests([request("erasure", request_id="late-2")])
    t = (await tasks_of(pool, "late-2"))["crm"]
    await coordinator.handle_receipts([receipt(t, "succeeded", attempt=7)])
    assert (await tasks_of(pool, "late-2"))["crm"]["status"] == "dispatched"


async def test_an_export_from_another_case_never_enters_a_bundle(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    await coordinator.handle_requests([request("access", request_id="acc-3")])
    tasks = await tasks_of(pool, "acc-3")
    other = coordinator.exports.put(f"cases/{uuid.uuid4()}/crm/1.json", b'{"someone": "else"}', records=1)
    await coordinator.handle_receipts([receipt(tasks["crm"], "succeeded", artifacts=[other.model_dump()]),
                                       receipt(tasks["billing"], "not_found")])
    case = await pool.fetchrow("SELECT * FROM cases")
    assert case["status"] == "failed" and case["bundle"] is None
    assert "not one of this case's" in orjson.loads(case["outcome"])["bundle_error"]


async def test_same_event_id_from_two_sources_is_two_events(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    """CloudEvents ids are unique per source: another app's id "1" is not a redelivery."""
    def from_source(source: str, request_id: str) -> Record:
        req = RightsRequested.model_validate({"request_id": request_id, "right": "erasure", "verified": True,
                                              "subject": {"identifiers": {"email": "lan.nguyen@example.vn"}}})
        value, headers = codec.encode(req, source=source, event_id="1")
        return record(topics.REQUESTS, value, headers, request_id.encode())

    await coordinator.handle_requests([from_source("privacy-centre", "pc-1")])
    await coordinator.handle_requests([from_source("mobile-app", "app-1"), from_source("privacy-centre", "pc-1")])
    assert {r["request_id"] for r in await pool.fetch("SELECT request_id FROM cases")} == {"pc-1", "app-1"}
    assert await pool.fetchval("SELECT count(*) FROM case_timeline WHERE kind = 'duplicate_request'") == 0


async def test_with_no_system_registered_a_case_stays_open_instead_of_claiming_nothing_held(
    case_store: str, tmp_path: Path
) -> None:
    pool = await asyncpg.create_pool(case_store, min_size=1, max_size=1)
    try:
        settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path)
        await Coordinator(settings, pool, export_store=MemoryExportStore()).handle_requests([request("erasure")])
        case = await pool.fetchrow("SELECT * FROM cases")
        assert case["status"] == "in_progress" and case["completed_at"] is None
        kinds = [r["kind"] for r in await pool.fetch("SELECT kind FROM case_timeline ORDER BY position")]
        assert kinds == ["received", "acknowledged", "no_systems_registered"]
    finally:
        await pool.close()


async def test_relay_gives_a_missing_topic_time_and_never_blames_rows_for_a_broken_producer(
    pool: asyncpg.Pool, kafka_settings: Settings, relay_producer: Any
) -> None:
    from aiokafka.errors import OutOfOrderSequenceNumber

    from dsrflow.coordinator import relay as relay_mod
    from dsrflow.store.outbox import OutboxMessage, add

    settings, producer = kafka_settings, relay_producer
    async with pool.acquire() as conn:
        await add(conn, [OutboxMessage("dsr.tasks.latecomer.v1", b"k", b"{}", [])])
    relay = OutboxRelay(settings)  # default grace: minutes
    async with pool.acquire() as conn:
        for _ in range(relay_mod.MAX_ROW_ATTEMPTS + 2):  # many passes, in well under the grace period
            await relay.relay_once(conn, producer)
        row = await conn.fetchrow("SELECT * FROM outbox")
        assert row["failed_at"] is None and row["attempts"] == relay_mod.MAX_ROW_ATTEMPTS + 2
        await conn.execute("DELETE FROM outbox")

        await add(conn, [OutboxMessage(topics.CASES, str(i).encode(), b"{}", []) for i in range(3)])
        producer._message_accumulator.fail_all(OutOfOrderSequenceNumber())  # the producer is broken
        with pytest.raises(OutOfOrderSequenceNumber):
            await relay.relay_once(conn, producer)
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE failed_at IS NULL AND sent_at IS NULL") == 3
        assert relay.set_aside == 0
