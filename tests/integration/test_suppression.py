"""Keeping erased people erased (dsrflow.suppression, dsrflow.coordinator.erasure), on a real
PostgreSQL and, for delivery, a real Kafka:

- a completed erasure publishes each verified identifier it acted on as a keyed hash to
  dsr.suppressions.v1 (through the outbox), which a pipeline reproduces from the identifier
  however written; no readable identifier anywhere; a failed or denied erasure publishes nothing;
  no key, nothing published and the outcome says so;
- the relay delivers them; the example ingest guard refuses the erased person and takes another;
  ``dsrflow suppression check`` exits 0 for the erased email, 1 for another;
- a later erasure deletes dsrflow's own copies (exports, bundle) of the person's earlier access
  cases of the same controller, and says so; another person's and another controller's stay.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from dsrflow import codec, topics
from dsrflow.coordinator import Coordinator
from dsrflow.coordinator.erasure import NO_KEY
from dsrflow.coordinator.relay import OutboxRelay
from dsrflow.events import RightsRequested, SubjectSuppressed
from dsrflow.exports import ExportStore, LocalExportStore, MemoryExportStore
from dsrflow.exports.store import bundle_key, system_case_prefix
from dsrflow.registry import SystemDeclaration, register
from dsrflow.settings import Settings
from dsrflow.store.outbox import headers_from_json
from dsrflow.suppression import SuppressionKey, load_key, new_key, suppression_hash, write_key
from examples.ingest_guard import IngestGuard, SuppressionList
from tests.integration.test_coordinator import receipt, record

ROOT = Path(__file__).resolve().parents[2]
CRM = SystemDeclaration(name="crm", identifier_types=("email", "phone"), actions=("export", "erase"))
BILLING = SystemDeclaration(name="billing", identifier_types=("email", "customer_id"), actions=("export", "erase"))
ACME_CRM = SystemDeclaration(name="acme-crm", identifier_types=("email", "phone"), actions=("export", "erase"),
                             controller="acme")
LAN = {"email": "lan.nguyen@example.vn", "phone": "+84901234567"}
AN = {"email": "an.tran@example.vn", "phone": "+84912000111"}
#: what would give a person away in an event's bytes
READABLE = (b"lan.nguyen", b"Lan.Nguyen", b"example.vn", b"901234567", b"0901", b"84901234567")


@pytest.fixture
async def pool(case_store: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(case_store, min_size=1, max_size=2)
    async with p.acquire() as conn:
        for s in (CRM, BILLING, ACME_CRM):
            await register(conn, s)
    yield p
    await p.close()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write_key(new_key(), tmp_path / "suppression-key.json")


def coordinator(pool: asyncpg.Pool, case_store: str, tmp_path: Path, *, key: Path | None,
                exports: ExportStore | None = None, bootstrap: str = "unused:9092", **kw: Any) -> Coordinator:
    settings = Settings(pg_dsn=case_store, kafka_bootstrap=bootstrap, state_dir=tmp_path, max_task_attempts=1,
                        suppression_key=key, **kw)
    return Coordinator(settings, pool, export_store=exports or MemoryExportStore())


async def submit(c: Coordinator, right: str, identifiers: dict[str, str], *, verified: bool = True,
                 **kw: Any) -> str:
    req = RightsRequested.model_validate({"request_id": f"s-{uuid.uuid4().hex[:10]}", "right": right,
                                          "verified": verified, "subject": {"identifiers": identifiers}, **kw})
    value, headers = codec.encode(req, source="test")
    await c.handle_requests([record(topics.REQUESTS, value, headers, req.request_id.encode())])
    return req.request_id


async def tasks_of(pool: asyncpg.Pool, request_id: str) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT t.* FROM tasks t JOIN cases c USING (case_id) WHERE c.request_id = $1",
                            request_id)
    return {r["system"]: r for r in rows}


async def case_of(pool: asyncpg.Pool, request_id: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM cases WHERE request_id = $1", request_id)
    assert row is not None
    return row


async def finish(c: Coordinator, pool: asyncpg.Pool, request_id: str, status: str = "succeeded",
                 exports: ExportStore | None = None) -> asyncpg.Record:
    """Every task of the case answers ``status`` (an access case's systems export one file each)."""
    receipts = []
    for t in (await tasks_of(pool, request_id)).values():
        kw: dict[str, Any] = {"error": "the system's database refused"} if status == "failed" else {}
        if exports is not None:
            case = await case_of(pool, request_id)
            art = exports.put(f"{system_case_prefix(t['system'], t['case_id'], case['controller'])}1.json",
                              b'{"contact": {"name": "Nguyen Thi Lan"}}', records=1)
            kw["artifacts"] = [art.model_dump()]
        receipts.append(receipt(t, status, **kw))
    await c.handle_receipts(receipts)
    return await case_of(pool, request_id)


async def suppressions(pool: asyncpg.Pool) -> list[tuple[bytes, bytes, list[tuple[str, bytes]], SubjectSuppressed]]:
    rows = await pool.fetch("SELECT key, value, headers FROM outbox WHERE topic = $1 ORDER BY id", topics.SUPPRESSIONS)
    out = []
    for r in rows:
        headers = headers_from_json(r["headers"])
        out.append((r["key"], r["value"], headers, codec.decode(r["value"], headers, SubjectSuppressed).data))
    return out


def outcome(case: asyncpg.Record) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(case["outcome"])
    return doc


async def test_a_completed_erasure_publishes_each_verified_identifier_as_a_keyed_hash(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path, key_file: Path
) -> None:
    c = coordinator(pool, case_store, tmp_path, key=key_file)
    key = load_key(key_file)
    # email and phone verified; the customer id was given but never verified: the case did not use it
    rid = await submit(c, "erasure", {**LAN, "customer_id": "C-0042"}, verified=False,
                       verification=[{"identifier": "email", "method": "email_link"},
                                     {"identifier": "phone", "method": "sms_otp"}])
    assert await suppressions(pool) == []  # nothing before the case completes
    case = await finish(c, pool, rid)
    assert case["status"] == "completed"

    published = await suppressions(pool)
    assert sorted(e.identifier_type for *_, e in published) == ["email", "phone"]
    by_type = {e.identifier_type: e for *_, e in published}
    # a pipeline finds the same hash from the identifier however it is written
    assert by_type["email"].hash == suppression_hash(key, "email", "Lan.Nguyen@Example.VN")
    assert by_type["phone"].hash == suppression_hash(key, "phone", "0901 234 567", region="VN")
    for k, value, headers, event in published:
        assert k == f"default:{event.hash}".encode()  # compacted by controller and hash: a list per tenant
        assert (event.key_id, event.controller, event.case_id) == (key.key_id, "default", case["case_id"])
        assert event.erased_at == case["completed_at"]
        raw = value + b"".join(v for _, v in headers) + k
        assert [r for r in READABLE if r in raw] == [], "a readable identifier in the event"
        assert b"C-0042" not in raw
    assert suppression_hash(key, "customer_id", "C-0042") not in {e.hash for *_, e in published}

    doc = outcome(case)
    assert doc["suppression"] == {"published": 2, "key_id": key.key_id, "identifier_types": ["email", "phone"]}
    text = orjson.dumps(doc)
    assert not any(e.hash.encode() in text for *_, e in published)  # the outcome keeps counts, not hashes
    assert [r for r in READABLE if r in text] == []
    assert doc["earlier_copies_deleted"] == {"cases": [], "exports": 0, "bundles": 0}


async def test_a_completed_with_exceptions_erasure_publishes_too(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path, key_file: Path
) -> None:
    c = coordinator(pool, case_store, tmp_path, key=key_file)
    rid = await submit(c, "erasure", {"email": "mai.le@example.com"})
    t = await tasks_of(pool, rid)
    await c.handle_receipts([receipt(t["crm"], "succeeded"),
                             receipt(t["billing"], "refused", error="not this system's to erase")])
    case = await case_of(pool, rid)
    assert case["status"] == "completed_with_exceptions"
    assert [e.identifier_type for *_, e in await suppressions(pool)] == ["email"]
    assert outcome(case)["suppression"]["published"] == 1


async def test_a_failed_or_denied_erasure_publishes_nothing(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path, key_file: Path
) -> None:
    c = coordinator(pool, case_store, tmp_path, key=key_file)
    failed = await finish(c, pool, await submit(c, "erasure", LAN), status="failed")
    assert failed["status"] == "failed"
    assert "suppression" not in outcome(failed) and "earlier_copies_deleted" not in outcome(failed)

    waiting = await case_of(pool, await submit(c, "erasure", LAN, verified=False))
    assert waiting["status"] == "awaiting_verification"
    assert await c.deny(waiting["case_id"], by="dpo@example.vn", ground="identity_not_verified",
                        reason="the email link was never opened") == "denied"
    assert "suppression" not in outcome(await case_of(pool, waiting["request_id"]))
    assert await suppressions(pool) == []

    access = await finish(c, pool, await submit(c, "access", LAN))  # not an erasure at all
    assert access["status"] == "completed" and "suppression" not in outcome(access)
    assert await suppressions(pool) == []


async def test_no_key_publishes_nothing_and_the_outcome_says_so(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    c = coordinator(pool, case_store, tmp_path, key=None)
    case = await finish(c, pool, await submit(c, "erasure", LAN))
    assert case["status"] == "completed"
    assert outcome(case)["suppression"] == NO_KEY == "not published: no DSRFLOW_SUPPRESSION_KEY"
    assert await suppressions(pool) == []


async def test_a_later_erasure_deletes_the_earlier_access_copies_of_that_person_only(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    exports = LocalExportStore(tmp_path / "exports")
    c = coordinator(pool, case_store, tmp_path, key=None, exports=exports)
    lan = await finish(c, pool, await submit(c, "access", LAN), exports=exports)
    an = await finish(c, pool, await submit(c, "access", AN), exports=exports)
    acme = await finish(c, pool, await submit(c, "access", {"email": LAN["email"]}, controller="acme"),
                        exports=exports)
    # Lan again, but her phone was never verified in this case: no verified identifier shared by phone
    unverified = await finish(c, pool, await submit(c, "access", {"email": "lan.other@example.com",
                                                                  "phone": LAN["phone"]}, verified=False,
                                                    verification=[{"identifier": "email", "method": "email_link"}]),
                              exports=exports)
    cases = {"lan": lan, "an": an, "acme": acme, "unverified": unverified}
    for name, case in cases.items():
        assert case["status"] == "completed", name
        assert exports.exists(bundle_key(case["case_id"], case["controller"])), name
    before = {name: len(list((tmp_path / "exports").rglob(f"*{case['case_id']}*"))) for name, case in cases.items()}
    assert before["lan"] >= 3  # crm's and billing's export folders, and the bundle

    # the erasure names Lan by her phone only, written the local way: it is her verified phone
    erasure = await finish(c, pool, await submit(c, "erasure", {"phone": "0901 234 567"}))
    assert erasure["status"] == "completed"
    doc = outcome(erasure)["earlier_copies_deleted"]
    assert doc == {"cases": [{"case_id": str(lan["case_id"]), "right": "access", "exports": 2, "bundles": 1}],
                   "exports": 2, "bundles": 1}
    assert not exports.exists(bundle_key(lan["case_id"]))
    gone = {r["case_id"]: r["exports_deleted_at"] for r in await pool.fetch("SELECT case_id, exports_deleted_at "
                                                                            "FROM cases")}
    assert gone[lan["case_id"]] is not None  # the access case's record says its copies are gone
    assert [c for c, at in gone.items() if at is not None] == [lan["case_id"]]
    for system in ("crm", "billing"):
        assert not [p for p in (tmp_path / "exports").rglob("*")
                    if p.is_file() and str(lan["case_id"]) in str(p)], system
    # another person, another controller, a case that shares no verified identifier: untouched
    for name in ("an", "acme", "unverified"):
        assert exports.exists(bundle_key(cases[name]["case_id"], cases[name]["controller"])), name
        assert len(list((tmp_path / "exports").rglob(f"*{cases[name]['case_id']}*"))) == before[name], name
    text = orjson.dumps(outcome(erasure))
    assert [r for r in READABLE if r in text] == []


async def test_the_relay_delivers_the_list_the_guard_refuses_the_erased_and_check_answers(
    pool: asyncpg.Pool, case_store: str, broker: str, broker_kind: str, tmp_path: Path, key_file: Path
) -> None:
    settings = Settings(pg_dsn=case_store, kafka_bootstrap=broker, state_dir=tmp_path, suppression_key=key_file,
                        kafka_idempotent_producer=broker_kind != "tansu")
    await topics.apply(settings.kafka_client_options(), topics.specs_for(["crm", "billing", "acme-crm"]))
    c = Coordinator(settings, pool, export_store=MemoryExportStore())
    tag = uuid.uuid4().hex[:8]
    erased = {"email": f"erased.{tag}@example.vn", "phone": f"+849{int(tag, 16) % 10**8:08d}"}
    case = await finish(c, pool, await submit(c, "erasure", erased))
    assert case["status"] == "completed" and outcome(case)["suppression"]["published"] == 2

    stop = asyncio.Event()
    relay = asyncio.create_task(OutboxRelay(settings, poll_interval=0.1).run(stop))
    try:
        for _ in range(300):
            if not await pool.fetchval("SELECT count(*) FROM outbox WHERE topic = $1 AND sent_at IS NULL",
                                       topics.SUPPRESSIONS):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the relay never sent the suppressions")
    finally:
        stop.set()
        await relay

    # the example pipeline: reads the whole list, then refuses the erased person and takes another
    key: SuppressionKey = load_key(key_file)
    listed = SuppressionList(settings)
    stop_list = asyncio.Event()
    follower = asyncio.create_task(listed.run(stop_list))
    try:
        await asyncio.wait_for(listed.ready.wait(), 30)
        guard = IngestGuard(listed, key, region="VN")
        assert guard.guard({"name": "Erased", "email": erased["email"].upper()}) is False
        assert guard.guard({"name": "Erased", "phone": "0" + erased["phone"][3:]}) is False  # local form
        assert guard.guard({"name": "Someone else", "email": f"other.{tag}@example.vn", "phone": "+84912999888"})
        assert guard.guard({"name": "No identifiers"})
        assert guard.refused == 2
    finally:
        stop_list.set()
        await follower

    env = {**os.environ, "DSRFLOW_KAFKA_BOOTSTRAP": broker, "DSRFLOW_SUPPRESSION_KEY": str(key_file),
           "DSRFLOW_STATE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}

    def check(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dsrflow.cli", "suppression", "check", *argv], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    found, other, by_phone = await asyncio.gather(
        asyncio.to_thread(check, "--email", f"  Erased.{tag}@Example.VN "),
        asyncio.to_thread(check, "--email", f"other.{tag}@example.vn"),
        asyncio.to_thread(check, "--phone", "0" + erased["phone"][3:]))
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == f"suppressed (erased {case['completed_at'].date().isoformat()}, " \
                                   f"case {case['case_id']})"
    assert by_phone.returncode == 0, by_phone.stderr
    assert (other.returncode, other.stdout.strip()) == (1, "not suppressed"), other.stderr


async def test_an_erasure_whose_identifiers_are_two_peoples_suppresses_nothing_and_deletes_nothing(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path, key_file: Path
) -> None:
    """Hùng asked for his data; then an erasure names Lan's email with Hùng's phone. The CRM finds
    two people (conflict): nothing is suppressed (Hùng's phone would be), and Hùng's copies stay."""
    exports = LocalExportStore(tmp_path / "exports")
    c = coordinator(pool, case_store, tmp_path, key=key_file, exports=exports)
    hung = await finish(c, pool, await submit(c, "access", {"email": "hung.tran@example.vn",
                                                            "phone": LAN["phone"]}), exports=exports)
    assert exports.exists(bundle_key(hung["case_id"]))
    rid = await submit(c, "erasure", LAN)
    t = await tasks_of(pool, rid)
    await c.handle_receipts([receipt(t["crm"], "conflict", error="two people"), receipt(t["billing"], "not_found")])
    case = await case_of(pool, rid)
    assert case["status"] == "completed_with_exceptions"
    assert await suppressions(pool) == []
    doc = outcome(case)
    assert doc["suppression"] == "not published: the identifiers point to different people in crm"
    assert doc["earlier_copies_deleted"]["cases"] == []
    assert exports.exists(bundle_key(hung["case_id"]))


async def test_one_shared_identifier_is_not_the_same_person_for_earlier_copies(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    """A recycled phone number: Hùng's earlier access case shares Lan's phone but not her email. Her
    erasure (email and phone, both hers in every system) leaves Hùng's copies alone."""
    exports = LocalExportStore(tmp_path / "exports")
    c = coordinator(pool, case_store, tmp_path, key=None, exports=exports)
    hung = await finish(c, pool, await submit(c, "access", {"email": "hung.tran@example.vn",
                                                            "phone": LAN["phone"]}), exports=exports)
    lan = await finish(c, pool, await submit(c, "access", LAN), exports=exports)
    erasure = await finish(c, pool, await submit(c, "erasure", LAN))
    deleted = outcome(erasure)["earlier_copies_deleted"]
    assert [d["case_id"] for d in deleted["cases"]] == [str(lan["case_id"])]
    assert exports.exists(bundle_key(hung["case_id"])) and not exports.exists(bundle_key(lan["case_id"]))


async def test_each_controller_has_its_own_suppression_list(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path, key_file: Path
) -> None:
    c = coordinator(pool, case_store, tmp_path, key=key_file)
    await finish(c, pool, await submit(c, "erasure", {"email": LAN["email"]}, controller="acme"))
    [(k, value, headers, event)] = await suppressions(pool)
    assert event.controller == "acme" and k == f"acme:{event.hash}".encode()
    from dsrflow.suppression import apply_record, list_key

    entries: dict[str, SubjectSuppressed] = {}
    apply_record(entries, k, value, headers)
    assert list(entries) == [list_key("acme", event.hash)]  # the default controller's list does not have it
