"""Access bundles and the exports they were built from expire ``bundle_retention`` after their case
finished (dsrflow.coordinator.retention, run by the coordinator's prune), on a real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest

from dsrflow import codec, topics
from dsrflow.coordinator import Coordinator, Record
from dsrflow.events import Artifact, RightsRequested, TaskReceipt
from dsrflow.exports import MemoryExportStore, bundle_key, read_bundle, system_case_prefix
from dsrflow.registry import SystemDeclaration, register
from dsrflow.settings import Settings
from dsrflow.store import queries
from dsrflow.store.timeline import verify

RETENTION = timedelta(days=30)
CRM = SystemDeclaration(name="crm", identifier_types=("email",), actions=("export", "erase"),
                        categories=("user.contact.email", "user.name"), purposes=("essential.service",),
                        recipients=("Zalo OA",), processors=("Viettel IDC",), storage_country="VN")
BILLING = SystemDeclaration(name="billing", identifier_types=("email",), actions=("export", "erase"),
                            categories=("user.financial",), storage_country="SG")
MARKETING = SystemDeclaration(name="marketing", identifier_types=("email",), actions=("export",))


@pytest.fixture
async def pool(case_store: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(case_store, min_size=1, max_size=2)
    async with p.acquire() as conn:
        for system in (CRM, BILLING, MARKETING):
            await register(conn, system)
    yield p
    await p.close()


@pytest.fixture
def store() -> MemoryExportStore:
    return MemoryExportStore()


@pytest.fixture
def coordinator(pool: asyncpg.Pool, case_store: str, tmp_path: Path, store: MemoryExportStore) -> Coordinator:
    settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path,
                        bundle_retention=RETENTION)
    return Coordinator(settings, pool, export_store=store)


_offsets = iter(range(10**6))


def record(topic: str, value: bytes, headers: list[tuple[str, bytes]], key: bytes | None = None) -> Record:
    return Record(topic, 0, next(_offsets), key, value, headers)


def request(request_id: str) -> Record:
    req = RightsRequested.model_validate({
        "request_id": request_id, "right": "access", "verified": True,
        "subject": {"identifiers": {"email": "lan.nguyen@example.vn"}},
    })
    value, headers = codec.encode(req, source="test")
    return record(topics.REQUESTS, value, headers, request_id.encode())


def receipt(task: asyncpg.Record, status: str, **kw: object) -> Record:
    r = TaskReceipt.model_validate({
        "task_id": task["task_id"], "case_id": task["case_id"], "system": task["system"],
        "attempt": task["attempt"], "status": status, "completed_at": datetime.now(UTC), **kw,
    })
    value, headers = codec.encode(r, source=f"worker/{task['system']}")
    return record(topics.RECEIPTS, value, headers, str(task["case_id"]).encode())


async def finish_access_case(coordinator: Coordinator, pool: asyncpg.Pool, store: MemoryExportStore,
                             request_id: str) -> asyncpg.Record:
    """An access case: crm exports two files, billing one, marketing finds nothing."""
    await coordinator.handle_requests([request(request_id)])
    tasks = {r["system"]: r for r in await pool.fetch(
        "SELECT t.* FROM tasks t JOIN cases c USING (case_id) WHERE c.request_id = $1", request_id)}
    case_id = tasks["crm"]["case_id"]

    def export(system: str, name: str, doc: object) -> dict[str, object]:
        data = orjson.dumps(doc)
        art: Artifact = store.put(f"{system_case_prefix(system, case_id)}{name}", data, records=1)
        return art.model_dump()

    await coordinator.handle_receipts([
        receipt(tasks["crm"], "succeeded", artifacts=[
            export("crm", "t-1.json", {"contacts": [{"full_name": "Nguyễn Thị Lan"}]}),
            export("crm", "t-1-2.json", {"notes": [{"text": "gọi lại sau"}]})]),
        receipt(tasks["billing"], "succeeded", artifacts=[
            export("billing", "t-1.json", {"invoices": [{"amount_vnd": 1_250_000}]})]),
        receipt(tasks["marketing"], "not_found"),
    ])
    case = await pool.fetchrow("SELECT * FROM cases WHERE request_id = $1", request_id)
    assert case["status"] == "completed" and case["bundle"] is not None and case["exports_deleted_at"] is None
    return case


def copies(store: MemoryExportStore, case_id: uuid.UUID) -> list[str]:
    return [k for k in store.keys() if str(case_id) in k]


async def expiries(pool: asyncpg.Pool, case_id: uuid.UUID) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM case_timeline WHERE case_id = $1 AND kind = 'exports_expired'", case_id)


async def test_a_finished_access_case_keeps_its_bundle_for_the_retention_then_it_is_deleted_once(
    coordinator: Coordinator, pool: asyncpg.Pool, store: MemoryExportStore
) -> None:
    case = await finish_access_case(coordinator, pool, store, "acc-1")
    case_id, finished = case["case_id"], case["completed_at"]
    bundle = Artifact.model_validate(orjson.loads(case["bundle"]))
    assert bundle.ref == bundle_key(case_id)
    manifest, files = read_bundle(store.get(bundle.ref))
    assert sorted(files) == ["billing.csv", "billing.json", "crm-1.csv", "crm-1.json", "crm-2.csv", "crm-2.json",
                             "index.html"]
    crm = next(s for s in manifest["systems"] if s["name"] == "crm")
    assert (crm["records"], crm["recipients"], crm["processors"], crm["storage_country"]) == (
        2, ["Zalo OA"], ["Viettel IDC"], "VN")
    assert manifest["withheld"] == [{"system": "marketing", "reason": "not_found"}]
    assert "Nguyễn Thị Lan" in files["index.html"].decode()
    other = store.put(f"{system_case_prefix('crm', uuid.uuid4())}t-1.json", b"{}", records=0).ref  # another case's
    assert len(copies(store, case_id)) == 4

    # within the retention: kept
    assert await coordinator.prune(finished + RETENTION - timedelta(seconds=1)) == (0, 0)
    assert len(copies(store, case_id)) == 4 and await expiries(pool, case_id) == []

    # past it: the bundle and every system's exports go, and that is recorded
    at = finished + RETENTION + timedelta(seconds=1)
    await coordinator.prune(at)
    assert copies(store, case_id) == [] and store.exists(other)
    assert await pool.fetchval("SELECT exports_deleted_at FROM cases WHERE case_id = $1", case_id) == at
    [entry] = await expiries(pool, case_id)
    assert orjson.loads(entry["detail"]) == {"bundle_deleted": True, "exports_deleted": 3,
                                             "systems": ["billing", "crm", "marketing"],
                                             "retention_seconds": int(RETENTION.total_seconds())}
    timeline = await pool.fetch("SELECT * FROM case_timeline WHERE case_id = $1 ORDER BY position", case_id)
    assert verify(timeline)
    detail = await queries.get_case(pool, case_id, now=at)
    assert detail is not None and detail.exports_deleted_at == at and detail.bundle is not None  # what it was

    # not redone
    await coordinator.prune(at + timedelta(days=5))
    assert len(await expiries(pool, case_id)) == 1
    assert await pool.fetchval("SELECT exports_deleted_at FROM cases WHERE case_id = $1", case_id) == at


async def test_only_cases_finished_longer_ago_than_the_retention_lose_their_copies(
    coordinator: Coordinator, pool: asyncpg.Pool, store: MemoryExportStore
) -> None:
    old = await finish_access_case(coordinator, pool, store, "acc-old")
    new = await finish_access_case(coordinator, pool, store, "acc-new")
    await pool.execute("UPDATE cases SET completed_at = completed_at - $2::interval WHERE case_id = $1",
                       old["case_id"], RETENTION + timedelta(hours=1))
    await coordinator.prune()  # now: the clock's
    assert copies(store, old["case_id"]) == [] and len(copies(store, new["case_id"])) == 4
    assert len(await expiries(pool, old["case_id"])) == 1 and await expiries(pool, new["case_id"]) == []
    assert await pool.fetchval("SELECT exports_deleted_at FROM cases WHERE case_id = $1", new["case_id"]) is None


async def test_an_access_case_whose_bundle_failed_loses_its_exports_too(
    coordinator: Coordinator, pool: asyncpg.Pool, store: MemoryExportStore
) -> None:
    await coordinator.handle_requests([request("acc-bad")])
    tasks = {r["system"]: r for r in await pool.fetch("SELECT * FROM tasks")}
    case_id = tasks["crm"]["case_id"]
    art = store.put(f"{system_case_prefix('crm', case_id)}t-1.json", b'{"a": 1}', records=1)
    store.put(art.ref, b'{"a": 2}', records=1)  # changed after the receipt: the bundle fails
    await coordinator.handle_receipts([receipt(tasks["crm"], "succeeded", artifacts=[art.model_dump()]),
                                       receipt(tasks["billing"], "not_found"),
                                       receipt(tasks["marketing"], "not_found")])
    case = await pool.fetchrow("SELECT * FROM cases")
    assert case["status"] == "failed" and case["bundle"] is None and copies(store, case_id) == [art.ref]
    await coordinator.prune(case["completed_at"] + RETENTION + timedelta(minutes=1))
    assert copies(store, case_id) == [] and len(await expiries(pool, case_id)) == 1


async def test_a_case_whose_copies_cannot_be_deleted_holds_up_no_other(
    coordinator: Coordinator, pool: asyncpg.Pool, store: MemoryExportStore
) -> None:
    stuck = await finish_access_case(coordinator, pool, store, "acc-stuck")
    other = await finish_access_case(coordinator, pool, store, "acc-other")
    real_delete = store._delete

    def refusing(key: str) -> bool:  # a worker-owned folder the coordinator may not touch, say
        if str(stuck["case_id"]) in key:
            raise PermissionError(13, "Permission denied")
        return real_delete(key)

    store._delete = refusing  # type: ignore[method-assign]
    await pool.execute("INSERT INTO outbox (topic, key, value, headers, sent_at) VALUES ('t', NULL, $2, '[]', $1)",
                       datetime.now(UTC) - timedelta(days=400), b"x")
    at = max(stuck["completed_at"], other["completed_at"]) + RETENTION + timedelta(seconds=1)
    sent, _ = await coordinator.prune(at)
    assert copies(store, other["case_id"]) == [] and len(await expiries(pool, other["case_id"])) == 1
    assert await expiries(pool, stuck["case_id"]) == []  # not recorded: the next sweep tries again
    assert await pool.fetchval("SELECT exports_deleted_at FROM cases WHERE case_id = $1", stuck["case_id"]) is None
    assert sent == 1  # and the outbox was pruned all the same
    store._delete = real_delete  # type: ignore[method-assign]
    await coordinator.prune(at)
    assert copies(store, stuck["case_id"]) == [] and len(await expiries(pool, stuck["case_id"])) == 1


async def test_an_export_a_late_receipt_names_after_expiry_is_deleted_at_once(
    coordinator: Coordinator, pool: asyncpg.Pool, store: MemoryExportStore
) -> None:
    """Marketing's task was skipped and the case finished and expired; then marketing's worker did
    it after all, and its receipt names an export that nothing would ever bundle or expire."""
    await coordinator.handle_requests([request("acc-late")])
    tasks = {r["system"]: r for r in await pool.fetch("SELECT * FROM tasks")}
    case_id = tasks["crm"]["case_id"]
    await coordinator.handle_receipts([receipt(tasks["crm"], "not_found"), receipt(tasks["billing"], "not_found")])
    await coordinator.skip_task(case_id, tasks["marketing"]["task_id"], by="dpo", reason="system being retired")
    case = await pool.fetchrow("SELECT * FROM cases")
    assert case["status"] == "completed_with_exceptions"
    await coordinator.prune(case["completed_at"] + RETENTION + timedelta(seconds=1))
    assert await pool.fetchval("SELECT exports_deleted_at FROM cases") is not None

    late = store.put(f"{system_case_prefix('marketing', case_id)}t-1.json", b'{"lists": ["tin khuyen mai"]}',
                     records=1)
    elsewhere = store.put(f"{system_case_prefix('crm', case_id)}t-9.json", b"{}", records=0)  # not marketing's
    await coordinator.handle_receipts([receipt(tasks["marketing"], "succeeded",
                                               artifacts=[late.model_dump(), elsewhere.model_dump()])])
    assert not store.exists(late.ref)
    assert store.exists(elsewhere.ref)  # a receipt never deletes what is not its own system's
    assert (await pool.fetchrow("SELECT status FROM tasks WHERE system = 'marketing'"))["status"] == "succeeded"
