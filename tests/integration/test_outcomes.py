"""Every right's case on a real PostgreSQL, through the coordinator's units of work: manual tasks,
systems registered later, lasting effects, information answered from declarations,
representatives, per-identifier verification, conflicts, lifting a restriction, the
via-processor deadline, and the store's CHECK constraints."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson
import pytest

from dsrflow import codec, policy, topics
from dsrflow.coordinator import Coordinator
from dsrflow.coordinator.service import InvalidTransition
from dsrflow.events import RightsRequested, TaskAssigned
from dsrflow.exports import MemoryExportStore
from dsrflow.registry import Retention, SystemDeclaration, register
from dsrflow.rights import Action, TaskStatus
from dsrflow.settings import Settings
from dsrflow.store.outbox import headers_from_json
from dsrflow.store.timeline import verify
from tests.integration.test_coordinator import receipt, record

EVERYTHING = tuple(Action)
CRM = SystemDeclaration(name="crm", identifier_types=("email", "phone"), actions=EVERYTHING,
                        purposes=("essential.service", "marketing.communications"),
                        categories=("user.name", "user.contact.email", "user.contact.address"),
                        backup_retention=timedelta(days=35))
BILLING = SystemDeclaration(name="billing", identifier_types=("email", "customer_id"),
                            actions=(Action.export, Action.erase, Action.rectify, Action.restrict),
                            purposes=("billing", "accounting"), categories=("user.name", "user.financial"),
                            retention=(Retention(category="user.financial", legal_basis="Law on Accounting Art 41",
                                                 period=timedelta(days=3653)),),
                            storage_country="VN")
ANALYTICS = SystemDeclaration(name="analytics", identifier_types=("email",), worker=False,
                              purposes=("analytics",), processors=("Example Analytics Ltd",),
                              operated_by="processor", storage_country="SG")
LAN = {"email": "lan.nguyen@example.vn", "phone": "+84901234567"}


@pytest.fixture
async def pool(case_store: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(case_store, min_size=1, max_size=2)
    yield p
    await p.close()


async def systems(pool: asyncpg.Pool, *declared: SystemDeclaration) -> None:
    async with pool.acquire() as conn:
        for s in declared:
            await register(conn, s)


@pytest.fixture
def coordinator(pool: asyncpg.Pool, case_store: str, tmp_path: Path) -> Coordinator:
    settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path, max_task_attempts=2)
    return Coordinator(settings, pool, export_store=MemoryExportStore())


async def submit(c: Coordinator, right: str, identifiers: dict[str, str] | None = None, **kw: Any) -> str:
    body = {"request_id": f"o-{uuid.uuid4().hex[:10]}", "right": right,
            "subject": {"identifiers": identifiers or LAN}, **kw}
    body.setdefault("verified", True)
    req = RightsRequested.model_validate(body)
    value, headers = codec.encode(req, source="test")
    await c.handle_requests([record(topics.REQUESTS, value, headers, req.request_id.encode())])
    return req.request_id


async def case_of(pool: asyncpg.Pool, request_id: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM cases WHERE request_id = $1", request_id)
    assert row is not None
    return row


async def tasks(pool: asyncpg.Pool, request_id: str) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT t.* FROM tasks t JOIN cases c USING (case_id) WHERE c.request_id = $1",
                            request_id)
    return {r["system"] if r["action"] != "lift_restriction" else f"{r['system']}:lift": r for r in rows}


async def sent_tasks(pool: asyncpg.Pool, system: str) -> list[TaskAssigned]:
    rows = await pool.fetch("SELECT value, headers FROM outbox WHERE topic = $1 ORDER BY id",
                            topics.tasks_topic(system))
    return [codec.decode(r["value"], headers_from_json(r["headers"]), TaskAssigned).data for r in rows]


async def timeline(pool: asyncpg.Pool, request_id: str) -> list[asyncpg.Record]:
    return await pool.fetch("""SELECT t.* FROM case_timeline t JOIN cases c USING (case_id)
                               WHERE c.request_id = $1 ORDER BY position""", request_id)


def outcome(row: asyncpg.Record) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(row["outcome"])
    return doc


async def test_a_system_without_a_worker_gets_a_manual_task_and_the_case_waits_for_the_person(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM, ANALYTICS)
    rid = await submit(coordinator, "erasure")
    t = await tasks(pool, rid)
    assert (t["crm"]["kind"], t["crm"]["status"]) == ("worker", "dispatched")
    assert (t["analytics"]["kind"], t["analytics"]["status"]) == ("manual", "manual")
    assert "no dsrflow worker" in t["analytics"]["reason"]
    assert [e.system for e in await sent_tasks(pool, "analytics")] == []  # nothing sent to a system with no worker

    await coordinator.handle_receipts([receipt(t["crm"], "succeeded", counts={"erased": 3})])
    assert (await case_of(pool, rid))["status"] == "in_progress"  # the person has not acted yet

    with pytest.raises(InvalidTransition, match="note"):
        await coordinator.resolve_manual_task(t["analytics"]["case_id"], t["analytics"]["task_id"], by="ops@vn",
                                              resolution=TaskStatus.succeeded, note=" ")
    status = await coordinator.resolve_manual_task(
        t["analytics"]["case_id"], t["analytics"]["task_id"], by="ops@example.vn",
        resolution=TaskStatus.succeeded, note="profile deleted in the analytics console, ticket OPS-17")
    assert status == "completed"
    case = await case_of(pool, rid)
    doc = outcome(case)
    assert doc["systems"]["analytics"] == {
        "action": "erase", "status": "succeeded", "kind": "manual", "attempts": 1, "counts": {},
        "reason": t["analytics"]["reason"], "decided_by": "ops@example.vn",
        "note": "profile deleted in the analytics console, ticket OPS-17"}
    assert doc["systems"]["crm"]["backups_expire_by"]  # erased data lives on in backups until then
    kinds = [e["kind"] for e in await timeline(pool, rid)]
    assert kinds == ["received", "acknowledged", "tasks_dispatched", "manual_tasks_opened", "task_succeeded",
                     "manual_completed", "completed"]
    assert verify(await timeline(pool, rid))


async def test_a_declined_manual_task_completes_the_case_with_exceptions(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, ANALYTICS)
    rid = await submit(coordinator, "access")
    t = (await tasks(pool, rid))["analytics"]
    await coordinator.resolve_manual_task(t["case_id"], t["task_id"], by="dpo@example.vn",
                                          resolution=TaskStatus.refused, note="vendor account closed; no export tool")
    assert (await case_of(pool, rid))["status"] == "completed_with_exceptions"
    with pytest.raises(InvalidTransition, match="not waiting for a person"):
        await coordinator.resolve_manual_task(t["case_id"], t["task_id"], by="x", resolution=TaskStatus.succeeded,
                                              note="again")


async def test_a_system_registered_later_is_asked_by_open_cases(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    rid = await submit(coordinator, "erasure")  # no system at all yet
    assert (await case_of(pool, rid))["status"] == "in_progress" and await tasks(pool, rid) == {}
    await coordinator.plan_new_systems()  # still nobody to ask
    assert await tasks(pool, rid) == {} and (await case_of(pool, rid))["status"] == "in_progress"

    await systems(pool, CRM)
    assert await coordinator.plan_new_systems() == 1
    t = await tasks(pool, rid)
    assert t["crm"]["status"] == "dispatched"
    [sent] = [e for e in await sent_tasks(pool, "crm") if e.case_id == t["crm"]["case_id"]]
    assert sent.identifiers == {"email": LAN["email"], "phone": LAN["phone"]}
    assert await coordinator.plan_new_systems() == 0  # planned once
    await coordinator.handle_receipts([receipt(t["crm"], "not_found")])
    assert (await case_of(pool, rid))["status"] == "completed"
    assert "tasks_planned_late" in [e["kind"] for e in await timeline(pool, rid)]


async def test_an_opt_out_reaches_a_system_registered_after_it_and_erasure_does_not(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, BILLING)
    mailer = SystemDeclaration(name="mailer", identifier_types=("email",), actions=(Action.suppress_marketing,),
                               purposes=("marketing.communications",))
    opt_out = await submit(coordinator, "opt_out_marketing", {"email": LAN["email"]}, verified=False)
    erasure = await submit(coordinator, "erasure", {"email": LAN["email"]})
    case = await case_of(pool, opt_out)
    # billing's purposes do not include marketing: not asked, and the case says so
    assert case["status"] == "completed" and await tasks(pool, opt_out) == {}
    assert "billing" in outcome(case)["systems_considered"]
    await coordinator.handle_receipts([receipt((await tasks(pool, erasure))["billing"], "succeeded")])

    await systems(pool, mailer)
    await coordinator.plan_new_systems()
    t = await tasks(pool, opt_out)
    assert t["mailer"]["status"] == "dispatched" and t["mailer"]["action"] == "suppress_marketing"
    [sent] = await sent_tasks(pool, "mailer")
    assert sent.identifiers == {"email": LAN["email"]}  # unverified: an opt-out may still use it
    assert "mailer" not in await tasks(pool, erasure)  # erasure is not lasting: a finished one asks no one new

    await coordinator.handle_receipts([receipt(t["mailer"], "succeeded", counts={"suppressed": 1})])
    case = await case_of(pool, opt_out)
    assert case["status"] == "completed"  # its status and deadline stay; its outcome shows the new system
    assert outcome(case)["systems"]["mailer"]["status"] == "succeeded"
    assert [e["kind"] for e in await timeline(pool, opt_out)][-2:] == ["task_succeeded", "outcome_updated"]


async def test_an_information_request_is_answered_from_the_declarations(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, BILLING, ANALYTICS)
    rid = await submit(coordinator, "information", verified=False)
    case = await case_of(pool, rid)
    assert case["status"] == "completed" and await tasks(pool, rid) == {}
    info = outcome(case)["information"]
    assert info["billing"]["retention"] == [{"category": "user.financial", "legal_basis": "Law on Accounting Art 41",
                                             "days": 3653}]
    assert info["analytics"]["processors"] == ["Example Analytics Ltd"]
    assert info["analytics"]["storage_country"] == "SG"
    assert LAN["email"] not in case["outcome"]  # the same answer for everyone: no personal data


async def test_a_representative_must_be_verified_before_the_case_fans_out(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM)
    rid = await submit(coordinator, "access", requester={"relationship": "parent_guardian", "name": "Nguyễn Văn Minh"})
    case = await case_of(pool, rid)
    assert case["status"] == "awaiting_verification" and await tasks(pool, rid) == {}
    assert orjson.loads(case["requester"])["relationship"] == "parent_guardian"
    status = await coordinator.verify(case["case_id"], by="dpo@example.vn")
    assert status == "in_progress"
    assert orjson.loads((await case_of(pool, rid))["requester"])["verified"] is True
    assert (await tasks(pool, rid))["crm"]["status"] == "dispatched"


async def test_only_verified_identifiers_reach_the_systems(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    await systems(pool, CRM, BILLING)
    rid = await submit(coordinator, "access", {"email": LAN["email"], "phone": LAN["phone"], "customer_id": "KH00001"},
                       verified=False, verification=[{"identifier": "email", "method": "email_link"}])
    t = await tasks(pool, rid)
    crm = [e for e in await sent_tasks(pool, "crm") if e.task_id == t["crm"]["task_id"]]
    billing = [e for e in await sent_tasks(pool, "billing") if e.task_id == t["billing"]["task_id"]]
    assert crm[0].identifiers == {"email": LAN["email"]}  # the phone was not verified
    assert billing[0].identifiers == {"email": LAN["email"]}


async def test_nothing_verified_waits_and_the_dpo_verifies_one_identifier(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM)
    rid = await submit(coordinator, "erasure", verified=False)
    case = await case_of(pool, rid)
    assert case["status"] == "awaiting_verification"
    await coordinator.verify(case["case_id"], by="dpo@example.vn", identifiers=["phone"])
    [sent] = [e for e in await sent_tasks(pool, "crm") if e.case_id == case["case_id"]]
    assert sent.identifiers == {"phone": LAN["phone"]}
    [v] = orjson.loads((await case_of(pool, rid))["verification"])
    assert (v["identifier"], v["verified_by"]) == ("phone", "dpo@example.vn")


async def test_a_local_phone_is_stored_and_sent_in_e164(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    await systems(pool, CRM)
    rid = await submit(coordinator, "access", {"phone": "0901 234 567"})
    assert orjson.loads((await case_of(pool, rid))["subject"]) == {"phone": "+84901234567"}
    [sent] = [e for e in await sent_tasks(pool, "crm") if e.case_id == (await case_of(pool, rid))["case_id"]]
    assert sent.identifiers == {"phone": "+84901234567"}


async def test_a_conflict_completes_with_exceptions_and_names_the_system(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM, BILLING)
    rid = await submit(coordinator, "erasure")
    t = await tasks(pool, rid)
    await coordinator.handle_receipts([
        receipt(t["crm"], "conflict", error="the task's identifiers point to different people"),
        receipt(t["billing"], "succeeded"),
    ])
    case = await case_of(pool, rid)
    assert case["status"] == "completed_with_exceptions"
    assert outcome(case)["identifier_conflicts"] == ["crm"]
    assert outcome(case)["systems"]["crm"]["status"] == "conflict"


async def test_lifting_a_restriction_asks_each_system_that_restricted(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM, BILLING)
    rid = await submit(coordinator, "restriction")
    t = await tasks(pool, rid)
    await coordinator.handle_receipts([receipt(t["crm"], "succeeded"), receipt(t["billing"], "succeeded")])
    case = await case_of(pool, rid)
    assert case["status"] == "completed"
    with pytest.raises(InvalidTransition, match="no restriction to lift"):
        await coordinator.lift_restriction((await case_of(pool, await submit(coordinator, "access")))["case_id"],
                                           by="dpo")
    await coordinator.lift_restriction(case["case_id"], by="dpo@example.vn")
    t = await tasks(pool, rid)
    # billing's worker cannot lift: a person must; crm's worker is asked
    assert (t["crm:lift"]["kind"], t["crm:lift"]["status"]) == ("worker", "dispatched")
    assert (t["billing:lift"]["kind"], t["billing:lift"]["status"]) == ("manual", "manual")
    assert [e.action for e in await sent_tasks(pool, "crm") if e.case_id == case["case_id"]] == [
        Action.restrict, Action.lift_restriction]
    await coordinator.handle_receipts([receipt(t["crm:lift"], "succeeded")])
    doc = outcome(await case_of(pool, rid))
    assert doc["systems"]["crm:lift_restriction"]["status"] == "succeeded"
    assert doc["waiting_for_a_person"] == ["billing:lift_restriction"]
    with pytest.raises(InvalidTransition, match="lifted already"):
        await coordinator.lift_restriction(case["case_id"], by="dpo")
    # a lifted restriction no longer reaches systems that register later
    await systems(pool, SystemDeclaration(name="support", identifier_types=("email",), actions=(Action.restrict,)))
    await coordinator.plan_new_systems()
    assert "support" not in await tasks(pool, rid)


async def test_a_system_run_by_a_processor_gives_the_longer_deadline(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM)
    own = await case_of(pool, await submit(coordinator, "erasure", received_at="2026-11-02T09:00:00+07:00"))
    await systems(pool, ANALYTICS)
    via = await case_of(pool, await submit(coordinator, "erasure", received_at="2026-11-02T09:00:00+07:00"))
    received = own["received_at"]
    assert own["due_at"] == policy.deadlines("erasure", "VN", received).due_at
    assert via["due_at"] == policy.deadlines("erasure", "VN", received, via_processor=True).due_at
    assert via["due_at"] > own["due_at"]


async def test_rectification_goes_only_to_systems_holding_the_field(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM, BILLING)
    rid = await submit(coordinator, "rectification", changes={"address": "12 Phố Hàng Bạc, Hà Nội"})
    t = await tasks(pool, rid)
    assert set(t) == {"crm"}
    [sent] = [e for e in await sent_tasks(pool, "crm") if e.task_id == t["crm"]["task_id"]]
    assert sent.changes == {"address": "12 Phố Hàng Bạc, Hà Nội"}
    kinds = {e["kind"]: orjson.loads(e["detail"]) for e in await timeline(pool, rid)}
    assert "billing" in kinds["systems_not_asked"]["systems"]


async def test_the_store_refuses_a_status_no_enum_names(pool: asyncpg.Pool, coordinator: Coordinator) -> None:
    await systems(pool, CRM)
    rid = await submit(coordinator, "access")
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("UPDATE cases SET status = 'done' WHERE request_id = $1", rid)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("UPDATE tasks SET status = 'finished' WHERE task_id = $1",
                           (await tasks(pool, rid))["crm"]["task_id"])


async def test_a_lift_while_the_restriction_is_still_out_supersedes_it_and_it_is_never_sent_again(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM)
    rid = await submit(coordinator, "restriction")
    restrict = (await tasks(pool, rid))["crm"]
    case_id = restrict["case_id"]
    await coordinator.lift_restriction(case_id, by="dpo@example.vn")
    t = await tasks(pool, rid)
    assert (t["crm"]["status"], t["crm"]["decided_by"]) == ("skipped", "dpo@example.vn")
    assert t["crm:lift"]["status"] == "dispatched"
    # The restriction's first attempt fails, retryably: it is not sent again after the lift.
    await coordinator.handle_receipts([receipt(restrict, "failed", retryable=True, error="db down")])
    await coordinator.sweep_stalled(now=restrict["dispatched_at"] + timedelta(days=1))
    sent = [(e.action, e.attempt) for e in await sent_tasks(pool, "crm") if e.case_id == case_id]
    assert sent[:2] == [(Action.restrict, 1), (Action.lift_restriction, 1)]
    assert (Action.restrict, 2) not in sent
    assert (await tasks(pool, rid))["crm"]["status"] == "skipped"


async def test_complaints_never_crowd_out_cases_waiting_for_a_system(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    for _ in range(3):
        await submit(coordinator, "complaint")
    rid = await submit(coordinator, "erasure")
    await systems(pool, CRM)
    for _ in range(3):  # the sweep's batch is smaller than the complaints
        await coordinator.plan_new_systems(limit=2)
    assert (await tasks(pool, rid))["crm"]["status"] == "dispatched"


async def test_a_case_with_no_system_concerned_later_finishes_instead_of_waiting_forever(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    rid = await submit(coordinator, "opt_out_marketing", {"email": LAN["email"]}, verified=False)
    assert (await case_of(pool, rid))["status"] == "in_progress"  # nobody registered: nobody looked
    await systems(pool, BILLING)  # not concerned by marketing
    await coordinator.plan_new_systems()
    case = await case_of(pool, rid)
    assert case["status"] == "completed" and await tasks(pool, rid) == {}
    assert outcome(case)["systems_considered"] == ["billing"]


async def test_verifying_more_identifiers_later_sends_the_systems_that_waited_for_them(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    auth = SystemDeclaration(name="auth", identifier_types=("phone",), actions=(Action.export,))
    await systems(pool, CRM, auth)
    rid = await submit(coordinator, "access", verified=False, verification=[{"identifier": "email",
                                                                             "method": "email_link"}])
    t = await tasks(pool, rid)
    assert (t["auth"]["kind"], t["auth"]["status"]) == ("manual", "manual")
    await coordinator.verify(t["auth"]["case_id"], by="dpo@example.vn", identifiers=["phone"])
    t = await tasks(pool, rid)
    assert (t["auth"]["kind"], t["auth"]["status"]) == ("worker", "dispatched")
    [sent] = await sent_tasks(pool, "auth")
    assert sent.identifiers == {"phone": LAN["phone"]}
    with pytest.raises(InvalidTransition, match="verified already"):
        await coordinator.verify(t["auth"]["case_id"], by="dpo@example.vn", identifiers=["phone"])


async def test_a_late_task_resolved_leaves_no_stale_claim_in_the_outcome(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM)
    rid = await submit(coordinator, "opt_out_marketing", {"email": LAN["email"]}, verified=False)
    await coordinator.handle_receipts([receipt((await tasks(pool, rid))["crm"], "succeeded")])
    await systems(pool, ANALYTICS.model_copy(update={"purposes": ("marketing.communications",)}))
    await coordinator.plan_new_systems()
    late = (await tasks(pool, rid))["analytics"]
    assert late["status"] == "manual"
    assert outcome(await case_of(pool, rid))["waiting_for_a_person"] == ["analytics"]
    await coordinator.resolve_manual_task(late["case_id"], late["task_id"], by="ops@example.vn",
                                          resolution=TaskStatus.succeeded, note="unsubscribed in the vendor tool")
    doc = outcome(await case_of(pool, rid))
    assert "waiting_for_a_person" not in doc and doc["systems"]["analytics"]["status"] == "succeeded"


async def test_the_access_bundle_says_which_systems_are_not_in_it_and_why(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    from dsrflow.exports import read_bundle

    await systems(pool, CRM, ANALYTICS)
    rid = await submit(coordinator, "access")
    t = await tasks(pool, rid)
    await coordinator.handle_receipts([receipt(t["crm"], "conflict", error="two people")])
    await coordinator.resolve_manual_task(t["analytics"]["case_id"], t["analytics"]["task_id"], by="ops",
                                          resolution=TaskStatus.succeeded, note="export e-mailed from the console")
    case = await case_of(pool, rid)
    assert case["status"] == "completed_with_exceptions"
    manifest, files = read_bundle(coordinator.exports.get(orjson.loads(case["bundle"])["ref"]))
    assert manifest["systems_not_in_bundle"] == {
        "analytics": "manual, export e-mailed from the console", "crm": "conflict"}
    assert manifest["withheld"] == [
        {"system": "analytics", "reason": "manual", "detail": "export e-mailed from the console"},
        {"system": "crm", "reason": "conflict"}]
    assert [f["name"] for f in manifest["files"]] == ["index.html"] and list(files) == ["index.html"]


async def test_an_opt_out_that_failed_somewhere_still_reaches_a_system_registered_later(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM)
    rid = await submit(coordinator, "opt_out_marketing", {"email": LAN["email"]}, verified=False)
    await coordinator.handle_receipts([receipt((await tasks(pool, rid))["crm"], "failed", error="mailer gone")])
    assert (await case_of(pool, rid))["status"] == "failed"
    await systems(pool, SystemDeclaration(name="mailer", identifier_types=("email",),
                                          actions=(Action.suppress_marketing,), purposes=("marketing",)))
    await coordinator.plan_new_systems()
    assert (await tasks(pool, rid))["mailer"]["status"] == "dispatched"


async def test_the_dpo_retries_a_stalled_task_and_skips_a_conflicting_one(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM, BILLING)
    rid = await submit(coordinator, "erasure")
    t = await tasks(pool, rid)
    case_id = t["crm"]["case_id"]
    # crm never answers: sent again a day later; once the deadline nears it stalls, and the DPO is alerted
    for days in (1, 18):
        await coordinator.sweep_stalled(now=t["crm"]["dispatched_at"] + timedelta(days=days))
    await coordinator.handle_receipts([receipt(t["billing"], "conflict", error="two people")])
    t = await tasks(pool, rid)
    assert (t["crm"]["status"], t["billing"]["status"]) == ("stalled", "conflict")
    assert (await case_of(pool, rid))["status"] == "in_progress"
    with pytest.raises(InvalidTransition, match="reason"):
        await coordinator.skip_task(case_id, t["crm"]["task_id"], by="dpo", reason="")
    await coordinator.retry_task(case_id, t["crm"]["task_id"], by="dpo@example.vn")
    crm = (await tasks(pool, rid))["crm"]
    assert (crm["status"], crm["attempt"]) == ("dispatched", 3)
    assert [e.attempt for e in await sent_tasks(pool, "crm") if e.case_id == case_id] == [1, 2, 3]
    await coordinator.handle_receipts([receipt(crm, "succeeded")])
    case = await case_of(pool, rid)
    assert case["status"] == "completed_with_exceptions"  # billing's conflict is an exception
    # The records were merged in billing: the DPO retries the conflict, and the finished case opens again.
    await coordinator.retry_task(case_id, t["billing"]["task_id"], by="dpo@example.vn")
    assert (await case_of(pool, rid))["status"] == "in_progress"
    billing = (await tasks(pool, rid))["billing"]
    await coordinator.skip_task(case_id, billing["task_id"], by="dpo@example.vn",
                                reason="the customer closed the account with billing by phone")
    case = await case_of(pool, rid)
    assert case["status"] == "completed_with_exceptions"
    assert outcome(case)["systems"]["billing"]["status"] == "skipped"
    kinds = [e["kind"] for e in await timeline(pool, rid)]
    assert {"task_retried_by_dpo", "reopened", "task_skipped"} <= set(kinds)
    assert verify(await timeline(pool, rid))
    with pytest.raises(InvalidTransition, match="only a stalled, failed or conflicting task"):
        await coordinator.retry_task(case_id, crm["task_id"], by="dpo")


async def test_the_store_checks_name_exactly_the_enums(pool: asyncpg.Pool) -> None:
    from dsrflow.domain.timeline import TimelineKind
    from dsrflow.rights import CaseStatus

    async def allowed(constraint: str) -> set[str]:
        text = await pool.fetchval("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1",
                                   constraint)
        return set(re.findall(r"'([a-z_]+)'::text", text))

    assert await allowed("case_timeline_kind_check") == {str(k) for k in TimelineKind}
    assert await allowed("tasks_status_check") == {str(s) for s in TaskStatus}
    assert await allowed("cases_status_check") == {str(s) for s in CaseStatus}


async def test_the_one_extension_the_law_allows_with_reasons(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    from datetime import UTC, datetime

    await systems(pool, CRM)
    now = datetime.now(UTC)
    rid = await submit(coordinator, "erasure", received_at=now.isoformat())
    case = await case_of(pool, rid)
    expected = policy.deadlines("erasure", "VN", case["received_at"])
    assert case["max_extension_until"] == expected.max_extension_until
    with pytest.raises(InvalidTransition, match="reasons"):
        await coordinator.extend_deadline(case["case_id"], by="dpo", reason=" ")
    too_late = (expected.max_extension_until + timedelta(days=2)).date()
    with pytest.raises(InvalidTransition, match="at the latest"):
        await coordinator.extend_deadline(case["case_id"], by="dpo", reason="backups", until=too_late)
    due = await coordinator.extend_deadline(case["case_id"], by="dpo@example.vn",
                                            reason="the billing archive is restored from tape first")
    case = await case_of(pool, rid)
    assert due == case["due_at"] == expected.max_extension_until
    assert case["original_due_at"] == expected.due_at
    assert orjson.loads(case["extension"])["reason"] == "the billing archive is restored from tape first"
    with pytest.raises(InvalidTransition, match="one extension"):
        await coordinator.extend_deadline(case["case_id"], by="dpo", reason="again")
    assert "deadline_extended" in [e["kind"] for e in await timeline(pool, rid)]
    # decided after the original due date: refused
    late = await case_of(pool, await submit(coordinator, "erasure", received_at=now.isoformat()))
    with pytest.raises(InvalidTransition, match="past its due date"):
        await coordinator.extend_deadline(late["case_id"], by="dpo", reason="late",
                                          now=late["due_at"] + timedelta(hours=1))
    # a date within the limit: the end of that day in Vietnam
    other = await case_of(pool, await submit(coordinator, "erasure", received_at=now.isoformat()))
    day = (other["due_at"] + timedelta(days=3)).astimezone(ZoneInfo("Asia/Ho_Chi_Minh")).date()
    due = await coordinator.extend_deadline(other["case_id"], by="dpo", reason="volume", until=day)
    assert due.astimezone(ZoneInfo("Asia/Ho_Chi_Minh")).date() == day


async def test_a_denial_needs_a_ground_of_the_jurisdiction_and_never_hides_work_done(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM)
    waiting = await case_of(pool, await submit(coordinator, "erasure", verified=False))
    with pytest.raises(InvalidTransition, match="no denial ground 'harms_others' for erasure"):
        await coordinator.deny(waiting["case_id"], by="dpo", ground="harms_others", reason="x")
    status = await coordinator.deny(waiting["case_id"], by="dpo@example.vn", ground="processing_without_consent",
                                    reason="the account is under a contract still in force until 2027")
    assert status == "denied"
    doc = outcome(await case_of(pool, waiting["request_id"]))
    assert doc["ground"] == "processing_without_consent" and "Art 14(2)" in doc["basis"]
    assert doc["reason"].startswith("the account is under a contract")
    assert await tasks(pool, waiting["request_id"]) == {}  # nothing was sent, nothing is claimed
    # A case whose tasks are out cannot be denied wholesale: its tasks are skipped one by one.
    sent = await case_of(pool, await submit(coordinator, "erasure"))
    with pytest.raises(InvalidTransition, match="skip them one by one"):
        await coordinator.deny(sent["case_id"], by="dpo", ground="processing_without_consent", reason="x")
    # GDPR's ground for a manifestly excessive request applies to every right.
    eu = await case_of(pool, await submit(coordinator, "access", verified=False, jurisdiction="EU"))
    assert await coordinator.deny(eu["case_id"], by="dpo", ground="manifestly_unfounded_or_excessive",
                                  reason="the fourth identical request this week") == "denied"


async def test_a_held_erasure_waits_sends_nothing_new_and_keeps_its_deadline(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM, BILLING)
    rid = await submit(coordinator, "erasure")
    case = await case_of(pool, rid)
    t = await tasks(pool, rid)
    with pytest.raises(InvalidTransition, match="legal_hold, suspected_fraud"):
        await coordinator.hold(case["case_id"], by="dpo", kind="whim", reason="x")
    assert await coordinator.hold(case["case_id"], by="dpo@example.vn", kind="legal_hold",
                                  reason="litigation hold from the legal department, ref LH-12") == "on_hold"
    # work already out still counts; nothing new is sent; the case does not finish while held
    await coordinator.handle_receipts([receipt(t["crm"], "succeeded"), receipt(t["billing"], "failed",
                                                                               retryable=True, error="db down")])
    await coordinator.sweep_stalled(now=t["crm"]["dispatched_at"] + timedelta(days=1))
    held = await case_of(pool, rid)
    assert held["status"] == "on_hold" and held["due_at"] == case["due_at"]
    assert [e.attempt for e in await sent_tasks(pool, "billing") if e.case_id == case["case_id"]] == [1]
    with pytest.raises(InvalidTransition, match="on_hold"):
        await coordinator.verify(case["case_id"], by="dpo")
    assert await coordinator.release(case["case_id"], by="dpo@example.vn") == "in_progress"
    await coordinator.sweep_stalled(now=t["billing"]["dispatched_at"] + timedelta(days=1))  # retried after release
    assert [e.attempt for e in await sent_tasks(pool, "billing") if e.case_id == case["case_id"]] == [1, 2]
    await coordinator.handle_receipts([receipt((await tasks(pool, rid))["billing"], "succeeded")])
    assert (await case_of(pool, rid))["status"] == "completed"
    kinds = [e["kind"] for e in await timeline(pool, rid)]
    assert kinds.index("held") < kinds.index("released") < kinds.index("completed")
    with pytest.raises(InvalidTransition, match="not on hold"):
        await coordinator.release(case["case_id"], by="dpo")


async def test_the_dpo_opens_a_case_with_no_request_behind_it(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    await systems(pool, CRM)
    req = RightsRequested.model_validate({"request_id": f"dpo-{uuid.uuid4().hex[:8]}", "right": "erasure",
                                          "subject": {"identifiers": {"email": LAN["email"]}}})
    with pytest.raises(InvalidTransition, match="say why"):
        await coordinator.open_case(req, by="dpo@example.vn", why=" ")
    case_id = await coordinator.open_case(req, by="dpo@example.vn",
                                          why="account of a user under 16 (terms of service 4.2)")
    case = await case_of(pool, req.request_id)
    assert case["case_id"] == case_id and case["status"] == "in_progress" and case["channel"] == "dpo"
    assert (await tasks(pool, req.request_id))["crm"]["status"] == "dispatched"
    [first, *_] = await timeline(pool, req.request_id)
    why = "account of a user under 16 (terms of service 4.2)"
    assert orjson.loads(first["detail"])["opened_by_dpo"] == {
        "by": "dpo@example.vn", "why_sha256": hashlib.sha256(why.encode()).hexdigest()}
    assert orjson.loads(case["opened"]) == {"by": "dpo@example.vn", "why": why}  # kept where it can be erased
    [v] = orjson.loads(case["verification"])
    assert (v["method"], v["verified_by"]) == ("dpo_opened", "dpo@example.vn")
    with pytest.raises(InvalidTransition, match="exists already"):
        await coordinator.open_case(req, by="dpo", why="again")


async def test_a_receipt_for_a_task_skipped_too_late_records_what_the_system_did(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM)
    rid = await submit(coordinator, "erasure")
    t = (await tasks(pool, rid))["crm"]
    await coordinator.skip_task(t["case_id"], t["task_id"], by="dpo", reason="the system is being retired")
    assert (await case_of(pool, rid))["status"] == "completed_with_exceptions"
    await coordinator.handle_receipts([receipt(t, "succeeded", counts={"erased": 4})])  # it was done after all
    crm = outcome(await case_of(pool, rid))["systems"]["crm"]
    assert crm["status"] == "succeeded" and crm["counts"] == {"erased": 4}
    assert "did it before the skip reached it" in crm["note"]


async def test_a_denial_is_refused_once_a_person_carried_out_a_task(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, ANALYTICS, ANALYTICS.model_copy(update={"name": "archive"}))
    rid = await submit(coordinator, "erasure")
    t = (await tasks(pool, rid))["archive"]
    await coordinator.resolve_manual_task(t["case_id"], t["task_id"], by="ops", resolution=TaskStatus.succeeded,
                                          note="paper file shredded")
    with pytest.raises(InvalidTransition, match="already carried out by archive"):
        await coordinator.deny(t["case_id"], by="dpo", ground="processing_without_consent", reason="x")


async def test_a_held_restriction_cannot_be_lifted_and_a_lifted_one_is_never_sent(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM)
    rid = await submit(coordinator, "restriction", verified=False)
    case_id = (await case_of(pool, rid))["case_id"]
    await coordinator.hold(case_id, by="dpo", kind="suspected_fraud", reason="request from a new device")
    with pytest.raises(InvalidTransition, match="release or verify it first"):
        await coordinator.lift_restriction(case_id, by="dpo")
    await coordinator.release(case_id, by="dpo")
    await coordinator.verify(case_id, by="dpo")
    assert [e.action for e in await sent_tasks(pool, "crm") if e.case_id == case_id] == [Action.restrict]


async def test_held_cases_never_starve_the_sweep(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    await systems(pool, CRM)
    held = [await case_of(pool, await submit(coordinator, "erasure")) for _ in range(3)]
    for c in held:
        await coordinator.hold(c["case_id"], by="dpo", kind="legal_hold", reason="litigation")
    rid = await submit(coordinator, "erasure")
    open_task = (await tasks(pool, rid))["crm"]
    changed = await coordinator.sweep_stalled(now=open_task["dispatched_at"] + timedelta(days=1), limit=2)
    assert changed == 1 and (await tasks(pool, rid))["crm"]["attempt"] == 2


async def test_a_case_from_before_the_maximum_was_recorded_can_still_be_extended(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    from datetime import UTC, datetime

    await systems(pool, CRM)
    rid = await submit(coordinator, "erasure", received_at=datetime.now(UTC).isoformat())
    await pool.execute("UPDATE cases SET max_extension_until = NULL WHERE request_id = $1", rid)  # as migrated
    case = await case_of(pool, rid)
    due = await coordinator.extend_deadline(case["case_id"], by="dpo", reason="volume")
    assert due == policy.deadlines("erasure", "VN", case["received_at"]).max_extension_until
