"""The DPO lifecycle on a real PostgreSQL: what the subject is told (dsr.notices.v1), the deadline
watcher and its alerts (dsr.alerts.v1), reassigned tasks, and two controllers (tenants) whose cases
never mix."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from dsrflow import codec, topics
from dsrflow.coordinator import Coordinator
from dsrflow.coordinator.service import InvalidTransition
from dsrflow.events import CaseAlert, RightsRequested, SubjectNotice
from dsrflow.exports import MemoryExportStore
from dsrflow.registry import SystemDeclaration, SystemOwnedElsewhere, register
from dsrflow.rights import TaskStatus
from dsrflow.settings import Settings
from dsrflow.store.outbox import headers_from_json
from dsrflow.store.timeline import verify
from tests.integration.test_coordinator import receipt, record
from tests.integration.test_outcomes import BILLING, CRM, LAN, case_of, submit, systems, tasks, timeline

ARCHIVE = SystemDeclaration(name="archive", identifier_types=("email",), actions=("export", "erase"))


@pytest.fixture
async def pool(case_store: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(case_store, min_size=1, max_size=2)
    yield p
    await p.close()


@pytest.fixture
def coordinator(pool: asyncpg.Pool, case_store: str, tmp_path: Path) -> Coordinator:
    settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path, internal_target="50%")
    return Coordinator(settings, pool, export_store=MemoryExportStore())


async def notices(pool: asyncpg.Pool, request_id: str) -> list[SubjectNotice]:
    rows = await pool.fetch("SELECT value, headers FROM outbox WHERE topic = $1 ORDER BY id", topics.NOTICES)
    out = [codec.decode(r["value"], headers_from_json(r["headers"]), SubjectNotice).data for r in rows]
    return [n for n in out if n.request_id == request_id]


async def alerts(pool: asyncpg.Pool, request_id: str) -> list[CaseAlert]:
    rows = await pool.fetch("SELECT value, headers FROM outbox WHERE topic = $1 ORDER BY id", topics.ALERTS)
    out = [codec.decode(r["value"], headers_from_json(r["headers"]), CaseAlert).data for r in rows]
    return [a for a in out if a.request_id == request_id]


def personal_data_in(raw: bytes) -> list[str]:
    return [v for v in (*LAN.values(), "lan", "Lan") if v.encode() in raw]


# -- what the subject is told ---------------------------------------------------------------------


async def test_the_subject_is_told_each_step_without_their_identifiers(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM, BILLING)
    rid = await submit(coordinator, "erasure", verified=False)
    case = await case_of(pool, rid)
    told = await notices(pool, rid)
    assert [n.kind for n in told] == ["acknowledged", "more_information_needed"]
    assert told[0].acknowledged_on_time and told[0].ack_due_at == case["ack_due_at"]
    assert told[0].basis and "Decree 356" in told[0].basis
    assert told[1].needed == ["identity_verification"]
    assert case["acknowledged_at"] is not None and case["acknowledged_at"] <= case["ack_due_at"]
    ack = [e for e in await timeline(pool, rid) if e["kind"] == "acknowledged"]
    assert len(ack) == 1 and orjson.loads(ack[0]["detail"])["on_time"] is True

    await coordinator.verify(case["case_id"], by="dpo@example.vn")
    await coordinator.extend_deadline(case["case_id"], by="dpo@example.vn", reason="billing archive is offline")
    t = await tasks(pool, rid)
    await coordinator.handle_receipts([
        receipt(t["crm"], "succeeded", counts={"erased": 3}),
        receipt(t["billing"], "retained", counts={"anonymised": 1}, retained=[
            {"category": "user.financial", "records": 2, "legal_basis": "Law on Accounting 88/2015 Art 41"}]),
    ])
    told = await notices(pool, rid)
    assert [n.kind for n in told] == ["acknowledged", "more_information_needed", "extended", "completed"]
    extended, completed = told[2], told[3]
    case = await case_of(pool, rid)
    assert extended.reasons == "billing archive is offline"
    assert extended.original_due_at == case["original_due_at"] and extended.due_at == case["due_at"]
    assert completed.status == "completed_with_exceptions" or completed.status == "completed"
    assert {(s.system, s.status) for s in completed.systems or []} == {("crm", "succeeded"),
                                                                       ("billing", "retained")}
    assert [(k.system, k.category, k.legal_basis) for k in completed.retained or []] == [
        ("billing", "user.financial", "Law on Accounting 88/2015 Art 41")]
    raw = b"".join(r["value"] for r in await pool.fetch("SELECT value FROM outbox WHERE topic = $1", topics.NOTICES))
    assert personal_data_in(raw) == []


async def test_a_denial_tells_the_ground_and_an_access_case_tells_the_bundle(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    rid = await submit(coordinator, "erasure", verified=False)
    case = await case_of(pool, rid)
    await coordinator.deny(case["case_id"], by="dpo@example.vn", ground="identity_not_verified",
                           reason="the email link was never opened")
    denied = (await notices(pool, rid))[-1]
    assert (denied.kind, denied.ground, denied.reasons) == ("denied", "identity_not_verified",
                                                            "the email link was never opened")
    assert denied.basis and "Decree 356" in denied.basis

    await systems(pool, CRM)
    rid = await submit(coordinator, "access")
    t = await tasks(pool, rid)
    await coordinator.handle_receipts([receipt(t["crm"], "not_found")])
    kinds = [n.kind for n in await notices(pool, rid)]
    assert kinds == ["acknowledged", "completed", "bundle_ready"]
    bundle = (await notices(pool, rid))[-1].bundle
    assert bundle is not None and bundle.sha256 == orjson.loads((await case_of(pool, rid))["bundle"])["sha256"]


# -- the deadline watcher -----------------------------------------------------------------------------


async def test_the_watcher_warns_sees_the_target_pass_and_the_case_go_overdue_each_once(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM)
    rid = await submit(coordinator, "access")
    case = await case_of(pool, rid)
    received, due, target = case["received_at"], case["due_at"], case["target_at"]
    assert target is not None and received < target < due  # internal_target="50%"
    span = due - received
    assert await coordinator.watch_deadlines(received + span * 0.4) == 0
    assert await coordinator.watch_deadlines(target + timedelta(minutes=1)) == 1
    assert await coordinator.watch_deadlines(received + span * 0.8) == 1
    assert await coordinator.watch_deadlines(received + span * 0.9) == 0  # warned already
    assert await coordinator.watch_deadlines(due + timedelta(minutes=1)) == 1
    assert await coordinator.watch_deadlines(due + timedelta(days=3)) == 0  # overdue once
    got = await alerts(pool, rid)
    assert [a.kind for a in got] == ["target_passed", "deadline_warning", "deadline_overdue"]
    assert got[1].share_used is not None and 0.75 <= got[1].share_used < 0.85
    kinds = [e["kind"] for e in await timeline(pool, rid)]
    assert [k for k in kinds if k in ("target_passed", "deadline_warning", "deadline_overdue")] == [
        "target_passed", "deadline_warning", "deadline_overdue"]
    assert verify(await timeline(pool, rid))
    # the overdue case's state on dsr.cases.v1 says so
    last = await pool.fetchrow("SELECT value FROM outbox WHERE topic = $1 ORDER BY id DESC LIMIT 1", topics.CASES)
    assert orjson.loads(last["value"])["overdue"] is True


async def test_a_held_case_is_still_watched_and_an_extension_arms_the_warning_again(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM)
    rid = await submit(coordinator, "erasure")
    case = await case_of(pool, rid)
    span = case["due_at"] - case["received_at"]
    await coordinator.hold(case["case_id"], by="dpo@example.vn", kind="legal_hold", reason="court order 12/2026")
    assert await coordinator.watch_deadlines(case["received_at"] + span * 0.8) == 1
    await coordinator.release(case["case_id"], by="dpo@example.vn")
    await coordinator.extend_deadline(case["case_id"], by="dpo@example.vn", reason="the archive is being restored",
                                      now=case["received_at"] + span * 0.85)
    case = await case_of(pool, rid)
    assert case["warned_at"] is None
    new_span = case["due_at"] - case["received_at"]
    assert await coordinator.watch_deadlines(case["received_at"] + new_span * 0.8) == 1
    warnings = [a for a in await alerts(pool, rid) if a.kind == "deadline_warning"]
    assert [(a.status, a.due_at) for a in warnings] == [("on_hold", span + case["received_at"]),
                                                        ("in_progress", case["due_at"])]


async def test_the_watcher_uses_the_database_clock(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    await systems(pool, CRM)
    rid = await submit(coordinator, "access")
    # a case received long ago by the database's clock: the watcher, asked without a time, sees it overdue
    await pool.execute("UPDATE cases SET received_at = now() - interval '40 days', due_at = now() - interval '1 day',"
                       " target_at = NULL WHERE request_id = $1", rid)
    assert await coordinator.watch_deadlines() == 1
    assert [a.kind for a in await alerts(pool, rid)] == ["deadline_overdue"]


# -- reassigning a task -----------------------------------------------------------------------------


async def test_a_task_is_reassigned_to_another_system_or_to_a_person(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM, BILLING, ARCHIVE)
    rid = await submit(coordinator, "erasure", identifiers={"email": LAN["email"]})
    t = await tasks(pool, rid)
    case_id = t["crm"]["case_id"]
    with pytest.raises(InvalidTransition, match="exactly one"):
        await coordinator.reassign_task(case_id, t["crm"]["task_id"], by="dpo@example.vn", reason="moved")
    with pytest.raises(InvalidTransition, match="no registered system 'nowhere'"):
        await coordinator.reassign_task(case_id, t["crm"]["task_id"], by="dpo@example.vn", reason="moved",
                                        to_system="nowhere")
    with pytest.raises(InvalidTransition, match="has a erase task in this case already"):
        await coordinator.reassign_task(case_id, t["crm"]["task_id"], by="dpo@example.vn", reason="moved",
                                        to_system="archive")
    # billing's customers moved to a new system: billing's task goes there
    await pool.execute("DELETE FROM tasks WHERE task_id = $1", t["archive"]["task_id"])
    await coordinator.reassign_task(case_id, t["billing"]["task_id"], by="dpo@example.vn",
                                    reason="customers migrated to the archive", to_system="archive")
    # crm's worker is gone for the week: a person does it
    await coordinator.reassign_task(case_id, t["crm"]["task_id"], by="dpo@example.vn",
                                    reason="crm worker decommissioned", to_person="ops-lan")
    t = await tasks(pool, rid)
    assert (t["billing"]["status"], t["billing"]["note"]) == ("skipped", "reassigned to archive: "
                                                                         "customers migrated to the archive")
    assert (t["archive"]["status"], t["archive"]["kind"]) == ("dispatched", "worker")
    assert (t["crm"]["status"], t["crm"]["kind"], t["crm"]["assignee"]) == ("manual", "manual", "ops-lan")
    # the crm worker had the task after all and did it: what happened is recorded
    await coordinator.handle_receipts([receipt(t["crm"], "succeeded", counts={"erased": 2}),
                                       receipt(t["archive"], "not_found")])
    t = await tasks(pool, rid)
    assert t["crm"]["status"] == "succeeded" and "did it before" in t["crm"]["note"]
    case = await case_of(pool, rid)
    assert case["status"] == "completed_with_exceptions"  # billing was skipped, and the outcome says where it went
    kinds = [e["kind"] for e in await timeline(pool, rid)]
    assert kinds.count("task_reassigned") == 2
    assert verify(await timeline(pool, rid))


# -- two controllers (tenants) ----------------------------------------------------------------------


async def test_two_controllers_cases_never_mix(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    acme_crm = SystemDeclaration(name="acme-crm", identifier_types=("email",), actions=("export", "erase"),
                                 controller="acme")
    beta_crm = SystemDeclaration(name="beta-crm", identifier_types=("email",), actions=("export", "erase"),
                                 controller="beta")
    await systems(pool, acme_crm, beta_crm)
    with pytest.raises(SystemOwnedElsewhere, match="another controller"):
        async with pool.acquire() as conn:
            await register(conn, acme_crm.model_copy(update={"controller": "beta"}))
    same_person = {"email": "lan.nguyen@example.vn"}
    acme = await submit(coordinator, "erasure", same_person, controller="acme")
    beta = await submit(coordinator, "access", same_person, controller="beta")
    assert set(await tasks(pool, acme)) == {"acme-crm"}
    assert set(await tasks(pool, beta)) == {"beta-crm"}
    acme_case, beta_case = await case_of(pool, acme), await case_of(pool, beta)
    assert (acme_case["controller"], beta_case["controller"]) == ("acme", "beta")
    # the tasks on each system's topic carry their controller; no beta case reaches acme's topic
    for system, controller, rid in (("acme-crm", "acme", acme), ("beta-crm", "beta", beta)):
        rows = await pool.fetch("SELECT value FROM outbox WHERE topic = $1", topics.tasks_topic(system))
        sent = [orjson.loads(r["value"]) for r in rows]
        assert [(e["controller"], e["case_id"]) for e in sent] == [
            (controller, str((await case_of(pool, rid))["case_id"]))]
    # a system registered later for acme is planned for acme's case only
    await systems(pool, ARCHIVE.model_copy(update={"name": "acme-archive", "controller": "acme"}))
    await coordinator.plan_new_systems()
    assert set(await tasks(pool, acme)) == {"acme-crm", "acme-archive"}
    assert set(await tasks(pool, beta)) == {"beta-crm"}
    # nor can the DPO reassign acme's task to beta's system
    t = await tasks(pool, acme)
    with pytest.raises(InvalidTransition, match="no registered system 'beta-crm' of this case's controller"):
        await coordinator.reassign_task(acme_case["case_id"], t["acme-crm"]["task_id"], by="dpo@example.vn",
                                        reason="moved", to_system="beta-crm")
    # every event about a case names its controller
    for topic in (topics.CASES, topics.NOTICES):
        for r in await pool.fetch("SELECT key, value FROM outbox WHERE topic = $1", topic):
            body = orjson.loads(r["value"])
            expected = {str(acme_case["case_id"]): "acme", str(beta_case["case_id"]): "beta"}[body["case_id"]]
            assert body["controller"] == expected


# -- dsrflow's own personal data ----------------------------------------------------------------------


async def test_a_closed_case_is_pseudonymised_after_its_retention_and_its_evidence_stays(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    import hashlib
    import hmac

    settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path,
                        case_data_retention=timedelta(days=30), pseudonym_key="k" * 32)
    c = Coordinator(settings, pool, export_store=MemoryExportStore())
    await systems(pool, CRM, BILLING)
    rid = await submit(c, "erasure")
    restriction = await submit(c, "restriction")
    t = await tasks(pool, rid)
    await c.skip_task(t["billing"]["case_id"], t["billing"]["task_id"], by="dpo@example.vn",
                      reason="Lan asked by phone to keep billing")
    await c.handle_receipts([receipt(t["crm"], "succeeded", counts={"erased": 3})])
    r = await tasks(pool, restriction)
    await c.handle_receipts([receipt(r["crm"], "succeeded"), receipt(r["billing"], "succeeded")])
    case = await case_of(pool, rid)
    assert case["status"] == "completed_with_exceptions"
    before = orjson.loads(case["outcome"])
    assert await c.pseudonymise_closed(case["completed_at"] + timedelta(days=29)) == 0
    assert await c.pseudonymise_closed(case["completed_at"] + timedelta(days=31)) == 1  # the erasure only
    case = await case_of(pool, rid)
    expected = "hmac-sha256:" + hmac.new(b"k" * 32, f"email:{LAN['email']}".encode(), hashlib.sha256).hexdigest()
    assert orjson.loads(case["subject"])["email"] == expected
    assert case["pseudonymised_at"] is not None
    rows = [dict(case), *[dict(x) for x in (await tasks(pool, rid)).values()]]
    assert personal_data_in(orjson.dumps(rows, default=str)) == []
    after = orjson.loads(case["outcome"])
    assert {k: (v["status"], v["counts"]) for k, v in after["systems"].items()} == {
        k: (v["status"], v["counts"]) for k, v in before["systems"].items()}
    note = after["systems"]["billing"]["note"]
    assert note == "sha256:" + hashlib.sha256(b"Lan asked by phone to keep billing").hexdigest()
    entries = await timeline(pool, rid)
    assert entries[-1]["kind"] == "pseudonymised" and verify(entries)
    # the restriction is still in force: systems registered later need its identifiers
    assert (await case_of(pool, restriction))["pseudonymised_at"] is None
    assert orjson.loads((await case_of(pool, restriction))["subject"]) == LAN


# -- decisions as signed commands ------------------------------------------------------------------------


def _foreign_token(private_key: Any, key_id: str, claims: dict[str, Any]) -> str:
    """A JWT made the way a DPO tool in another language would: base64url JSON, an Ed25519
    signature over ``header.payload``, no PyJWT."""
    import base64

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing = b64(orjson.dumps({"alg": "EdDSA", "typ": "JWT", "kid": key_id})) + "." + b64(orjson.dumps(claims))
    return signing + "." + b64(private_key.sign(signing.encode()))


async def command_records(tokens: list[str]) -> list[Any]:
    from dsrflow.events import DecisionCommand

    out = []
    for token in tokens:
        value, headers = codec.encode(DecisionCommand(token=token), source="dpo-tool")
        out.append(record(topics.COMMANDS, value, headers))
    return out


async def test_decisions_sent_as_signed_commands_are_applied_once_by_their_actor(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    import time

    from dsrflow import auth

    await systems(pool, CRM)
    async with pool.acquire() as conn:
        await auth.add_actor(conn, "dpo-mai", "dpo")
        await auth.add_actor(conn, "ops-an", "operator")
        await auth.add_actor(conn, "dpo-acme", "dpo", tenant="acme")
        dpo = auth.generate_credential("dpo-mai")
        ops = auth.generate_credential("ops-an")
        acme = auth.generate_credential("dpo-acme")
        for cred in (dpo, ops, acme):
            await auth.add_key(conn, cred.actor, cred.public_pem(), key_id=cred.key_id)
    rid = await submit(coordinator, "erasure", verified=False)
    case_id = str((await case_of(pool, rid))["case_id"])
    verify_cmd = {"decision": "verify", "case_id": case_id, "method": "id_document"}
    now = int(time.time())
    foreign = _foreign_token(dpo.private_key, dpo.key_id, {
        "iss": "dpo-mai", "aud": "dsrflow", "jti": str(uuid.uuid4()), "iat": now, "exp": now + 300,
        "cmd": verify_cmd})
    forged = _foreign_token(ops.private_key, dpo.key_id, {  # signed by another key than the kid claims
        "iss": "dpo-mai", "aud": "dsrflow", "jti": str(uuid.uuid4()), "iat": now, "exp": now + 300,
        "cmd": {"decision": "deny", "case_id": case_id, "ground": "identity_not_verified", "reason": "x"}})
    not_allowed = auth.sign_command(ops, {"decision": "deny", "case_id": case_id, "ground": "identity_not_verified",
                                          "reason": "no"})
    other_tenant = auth.sign_command(acme, {"decision": "hold", "case_id": case_id, "kind": "legal_hold",
                                            "reason": "not theirs"})
    await coordinator.handle_commands(await command_records([forged, not_allowed, other_tenant, foreign, foreign]))
    case = await case_of(pool, rid)
    assert case["status"] == "in_progress"  # verified once, by the key's actor; nothing else applied
    entries = await timeline(pool, rid)
    verified = [orjson.loads(e["detail"]) for e in entries if e["kind"] == "verified"]
    assert [(v["by"], v["method"]) for v in verified] == [("dpo-mai", "id_document")]
    assert not [e for e in entries if e["kind"] in ("denied", "held")]
    results = [orjson.loads(r["value"]) for r in
               await pool.fetch("SELECT value FROM outbox WHERE topic = $1 ORDER BY id", topics.COMMAND_RESULTS)]
    assert [(r["accepted"], r.get("error_type")) for r in results] == [
        (False, "auth.bad_signature"), (False, "not_allowed"), (False, "CaseNotFound"), (True, None)]
    assert results[3]["actor"] == "dpo-mai" and results[3]["case_status"] == "in_progress"
    # an operator completes a task the DPO reassigned to them
    t = await tasks(pool, rid)
    reassign = auth.sign_command(dpo, {"decision": "reassign_task", "case_id": case_id,
                                       "task_id": str(t["crm"]["task_id"]), "to_person": "ops-an",
                                       "reason": "the crm worker is down"})
    complete = auth.sign_command(ops, {"decision": "complete_task", "case_id": case_id,
                                       "task_id": str(t["crm"]["task_id"]), "resolution": "succeeded",
                                       "note": "erased in the crm console"})
    assert (await coordinator.execute(reassign, fallback_id="r")).accepted
    result = await coordinator.execute(complete, fallback_id="c")
    assert result.accepted and result.case_status == "completed"
    assert (await tasks(pool, rid))["crm"]["decided_by"] == "ops-an"


# -- held by review -----------------------------------------------------------------------------------


async def test_two_controllers_may_use_the_same_request_id(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    for controller in ("acme", "beta"):
        req = RightsRequested.model_validate({"request_id": "pc-1", "right": "access", "verified": True,
                                              "controller": controller,
                                              "subject": {"identifiers": {"email": f"an@{controller}.vn"}}})
        value, headers = codec.encode(req, source=f"{controller}-privacy-centre")
        await coordinator.handle_requests([record(topics.REQUESTS, value, headers, b"pc-1")])
    rows = await pool.fetch("SELECT controller FROM cases WHERE request_id = 'pc-1' ORDER BY controller")
    assert [r["controller"] for r in rows] == ["acme", "beta"]
    assert not await pool.fetch("SELECT 1 FROM case_timeline WHERE kind = 'duplicate_request'")


async def test_a_late_receipt_counts_after_the_person_declined_and_a_lifted_restriction_is_not_reassigned(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    await systems(pool, CRM, BILLING)
    rid = await submit(coordinator, "erasure")
    t = await tasks(pool, rid)
    case_id = t["crm"]["case_id"]
    await coordinator.reassign_task(case_id, t["crm"]["task_id"], by="dpo", reason="worker down", to_person="ops")
    await coordinator.resolve_manual_task(case_id, t["crm"]["task_id"], by="ops", resolution=TaskStatus.refused,
                                          note="could not reach the crm console")
    await coordinator.handle_receipts([receipt(t["crm"], "succeeded", counts={"erased": 2})])
    crm = (await tasks(pool, rid))["crm"]
    assert crm["status"] == "succeeded" and orjson.loads(crm["result"])["counts"] == {"erased": 2}

    rid = await submit(coordinator, "restriction")
    t = await tasks(pool, rid)
    await coordinator.handle_receipts([receipt(t["crm"], "succeeded"),
                                       receipt(t["billing"], "failed", error="down")])
    await coordinator.lift_restriction(t["crm"]["case_id"], by="dpo")
    with pytest.raises(InvalidTransition, match="lifted"):
        await coordinator.reassign_task(t["billing"]["case_id"], t["billing"]["task_id"], by="dpo", reason="moved",
                                        to_system="crm")


async def test_a_pseudonymised_case_sends_nothing_again_and_an_opened_case_acknowledges_nobody(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path,
                        case_data_retention=timedelta(days=1))
    c = Coordinator(settings, pool, export_store=MemoryExportStore())
    await systems(pool, CRM)
    rid = await submit(c, "erasure")
    t = await tasks(pool, rid)
    await c.handle_receipts([receipt(t["crm"], "failed", error="gone")])
    case = await case_of(pool, rid)
    assert case["status"] == "failed"
    assert await c.pseudonymise_closed(case["completed_at"] + timedelta(days=2)) == 1
    with pytest.raises(InvalidTransition, match="pseudonymised"):
        await c.retry_task(case["case_id"], t["crm"]["task_id"], by="dpo")
    with pytest.raises(InvalidTransition, match="pseudonymised"):
        await c.reassign_task(case["case_id"], t["crm"]["task_id"], by="dpo", reason="x", to_person="ops")

    req = RightsRequested.model_validate({"request_id": "dpo-1", "right": "erasure",
                                          "subject": {"identifiers": {"email": "minor@example.vn"}}})
    case_id = await c.open_case(req, by="dpo", why="an under-16 account")
    kinds = [e["kind"] for e in await timeline(pool, "dpo-1")]
    assert "acknowledged" not in kinds and (await case_of(pool, "dpo-1"))["acknowledged_at"] is None
    assert await notices(pool, "dpo-1") == [] and case_id


async def test_a_command_received_again_gets_its_first_result(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    from dsrflow import auth

    async with pool.acquire() as conn:
        await auth.add_actor(conn, "dpo-lan", "dpo")
        cred = auth.generate_credential("dpo-lan")
        await auth.add_key(conn, "dpo-lan", cred.public_pem(), key_id=cred.key_id)
    rid = await submit(coordinator, "erasure", verified=False)
    case_id = str((await case_of(pool, rid))["case_id"])
    token = auth.sign_command(cred, {"decision": "hold", "case_id": case_id, "kind": "legal_hold",
                                     "reason": "court order"})
    first = await coordinator.execute(token, fallback_id="a")
    again = await coordinator.execute(token, fallback_id="b")
    assert first.accepted and again.accepted and again.command_id == first.command_id
    assert again.controller == "default"
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE topic = $1", topics.COMMAND_RESULTS) == 1
    assert len([e for e in await timeline(pool, rid) if e["kind"] == "held"]) == 1


async def test_a_duplicate_request_noted_on_a_case_moves_its_anchor_on_the_topic(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    req = RightsRequested.model_validate({"request_id": "dup-anchor", "right": "complaint", "verified": True,
                                          "subject": {"identifiers": {"email": "an@example.vn"}}})
    for _ in range(2):  # a client retry: same request, new event id
        value, headers = codec.encode(req, source="privacy-centre")
        await coordinator.handle_requests([record(topics.REQUESTS, value, headers, b"dup-anchor")])
    entries = await timeline(pool, "dup-anchor")
    assert entries[-1]["kind"] == "duplicate_request"
    last = await pool.fetchrow("SELECT value FROM outbox WHERE topic = $1 ORDER BY id DESC LIMIT 1", topics.CASES)
    anchor = orjson.loads(last["value"])
    assert anchor["timeline_length"] == len(entries)
    assert anchor["timeline_head"] == bytes(entries[-1]["hash"]).hex()


# -- a client company leaves ---------------------------------------------------------------------------


async def test_a_client_company_leaving_has_all_its_data_handed_over_then_deleted(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    from dsrflow import auth

    whole = ("export_all", "erase_all")
    acme_crm = SystemDeclaration(name="acme-crm", identifier_types=("email",), actions=("export", "erase", *whole),
                                 controller="acme")
    acme_mail = SystemDeclaration(name="acme-mail", identifier_types=("email",), worker=False, controller="acme")
    beta_crm = SystemDeclaration(name="beta-crm", identifier_types=("email",), actions=("export", "export_all"),
                                 controller="beta")
    await systems(pool, acme_crm, acme_mail, beta_crm)
    async with pool.acquire() as conn:
        for name, tenant in (("dpo-beta", "beta"), ("dpo-host", "default")):
            await auth.add_actor(conn, name, "dpo", tenant=tenant)
        beta, host = auth.generate_credential("dpo-beta"), auth.generate_credential("dpo-host")
        for cred in (beta, host):
            await auth.add_key(conn, cred.actor, cred.public_pem(), key_id=cred.key_id)
    handover = {"decision": "offboard", "controller": "acme", "mode": "handover", "why": "contract ended 2026-11-30"}
    own = await coordinator.execute(auth.sign_command(host, {**handover, "controller": "default"}), fallback_id="d")
    assert not own.accepted and "never offboarded" in (own.error or "")
    refused = await coordinator.execute(auth.sign_command(beta, handover), fallback_id="x")
    assert not refused.accepted and "cannot offboard" in (refused.error or "")
    result = await coordinator.execute(auth.sign_command(host, handover), fallback_id="y")
    assert result.accepted and result.actor == "dpo-host"
    for mode in ("handover", "delete"):  # nothing overtakes a hand-over still running
        again = await coordinator.execute(auth.sign_command(host, {**handover, "mode": mode}), fallback_id="z")
        assert not again.accepted and "being handed over" in (again.error or "")
    case = await pool.fetchrow("SELECT * FROM cases WHERE case_id = $1", result.case_id)
    assert (case["scope"], case["controller"], case["right_name"]) == ("controller", "acme", "portability")
    assert orjson.loads(case["subject"]) == {}
    t = await tasks(pool, case["request_id"])
    assert {k: (v["action"], v["kind"]) for k, v in t.items()} == {
        "acme-crm": ("export_all", "worker"), "acme-mail": ("export_all", "manual")}
    sent = await pool.fetch("SELECT value FROM outbox WHERE topic LIKE 'dsr.tasks.%'")
    assert [(e["system"], e["scope"], e["identifiers"]) for e in map(lambda r: orjson.loads(r["value"]), sent)] == [
        ("acme-crm", "controller", {})]
    import hashlib

    from dsrflow.exports.store import export_key

    body = orjson.dumps({"tables": {"contacts": [{"id": 1}]}})
    key = export_key(case["case_id"], "acme-crm", t["acme-crm"]["task_id"], 1,
                     digest=hashlib.sha256(body).hexdigest(), controller="acme")
    artifacts = [coordinator.exports.put(key, body, records=1).model_dump(mode="json")]
    await coordinator.handle_receipts([receipt(t["acme-crm"], "succeeded", counts={"records": 1},
                                               artifacts=artifacts)])
    # the processor's DPO carries out the offboarding's tasks, and decides nothing else on acme's case
    on_case = {"case_id": str(result.case_id)}
    held = await coordinator.execute(auth.sign_command(host, {"decision": "hold", **on_case, "kind": "legal_hold",
                                                              "reason": "x"}), fallback_id="h")
    assert not held.accepted and held.error_type == "CaseNotFound"
    await coordinator.resolve_manual_task(case["case_id"], t["acme-mail"]["task_id"], by="ops", note="mailbox exported",
                                          resolution=TaskStatus.succeeded)
    case = await pool.fetchrow("SELECT * FROM cases WHERE case_id = $1", result.case_id)
    assert case["status"] == "completed" and case["bundle"] is not None  # the handover package
    assert orjson.loads(case["bundle"])["ref"].startswith("controllers/acme/bundles/")
    assert await notices(pool, case["request_id"]) == []  # a client company, not a data subject

    # then the deletion: acme's systems erase everything, and dsrflow's own copies go too
    deleting = await coordinator.execute(auth.sign_command(host, {**handover, "mode": "delete"}), fallback_id="e")
    assert deleting.accepted and deleting.case_id is not None
    with pytest.raises(InvalidTransition, match="contract"):
        await coordinator.extend_deadline(deleting.case_id, by="dpo", reason="more time")
    d = await tasks(pool, (await pool.fetchrow("SELECT request_id FROM cases WHERE case_id = $1",
                                               deleting.case_id))["request_id"])
    assert {k: v["action"] for k, v in d.items()} == {"acme-crm": "erase_all", "acme-mail": "erase_all"}
    await coordinator.handle_receipts([receipt(d["acme-crm"], "succeeded", counts={"erased": 40})])
    skipped = await coordinator.execute(auth.sign_command(host, {
        "decision": "skip_task", "case_id": str(deleting.case_id), "task_id": str(d["acme-mail"]["task_id"]),
        "reason": "the mail vendor deletes it at the contract's end"}), fallback_id="s")
    assert skipped.accepted and skipped.case_status == "completed_with_exceptions"
    gone = orjson.loads((await pool.fetchrow("SELECT outcome FROM cases WHERE case_id = $1",
                                             deleting.case_id))["outcome"])
    assert gone["dsrflow_exports"] == {"prefix": "controllers/acme/", "deleted": 2}  # the export and the package
    assert not coordinator.exports.keys()  # type: ignore[attr-defined]

    deletion = await coordinator.execute(auth.sign_command(beta, {**handover, "controller": "beta", "mode": "delete"}),
                                         fallback_id="w")
    assert deletion.accepted
    t = await tasks(pool, (await pool.fetchrow("SELECT request_id FROM cases WHERE case_id = $1",
                                               deletion.case_id))["request_id"])
    assert {k: v["action"] for k, v in t.items()} == {"beta-crm": "erase_all"}
    assert t["beta-crm"]["kind"] == "manual"  # beta's worker declares no erase_all: a person deletes it


async def test_a_controllers_exports_and_bundle_live_under_its_own_prefix(
    coordinator: Coordinator, pool: asyncpg.Pool
) -> None:
    import hashlib

    from dsrflow.exports.store import export_key
    from dsrflow.testing.worker import make_task, run_task
    from dsrflow.worker import Result, Worker

    beta_crm = SystemDeclaration(name="beta-crm", identifier_types=("email",), actions=("export",), controller="beta")
    worker = Worker(beta_crm)

    @worker.handler("export")  # type: ignore[arg-type]
    async def export(ctx: Any) -> Result:
        return Result.succeeded(counts={"records": 1}, artifacts=[await ctx.export({"contact": "x"}, records=1)])

    await systems(pool, beta_crm)
    rid = await submit(coordinator, "access", {"email": "an@beta.vn"}, controller="beta")
    t = await tasks(pool, rid)
    task = make_task("beta-crm", "export", {"email": "an@beta.vn"}, case_id=t["beta-crm"]["case_id"],
                     task_id=t["beta-crm"]["task_id"], controller="beta")
    done = await run_task(worker, task, store=coordinator.exports)
    assert done.artifacts[0].ref.startswith(f"controllers/beta/systems/beta-crm/cases/{t['beta-crm']['case_id']}/")
    value, headers = codec.encode(done, source="worker/beta-crm")
    await coordinator.handle_receipts([record(topics.RECEIPTS, value, headers)])
    case = await case_of(pool, rid)
    assert case["status"] == "completed"
    assert orjson.loads(case["bundle"])["ref"] == f"controllers/beta/bundles/{case['case_id']}.zip"

    # an export under the default controller's prefix is not one of beta's case's: the case fails
    rid = await submit(coordinator, "access", {"email": "binh@beta.vn"}, controller="beta")
    t = await tasks(pool, rid)
    body = b'{"contact": "y"}'
    wrong = coordinator.exports.put(export_key(t["beta-crm"]["case_id"], "beta-crm", t["beta-crm"]["task_id"], 1,
                                               digest=hashlib.sha256(body).hexdigest()), body, records=1)
    await coordinator.handle_receipts([receipt(t["beta-crm"], "succeeded", artifacts=[wrong.model_dump(mode="json")])])
    case = await case_of(pool, rid)
    assert case["status"] == "failed" and "not one of this case's" in orjson.loads(case["outcome"])["bundle_error"]


async def test_pseudonymised_corrections_are_keyed_hashes(pool: asyncpg.Pool, case_store: str,
                                                          tmp_path: Path) -> None:
    """A corrected email or phone is guessed back from a plain hash: with a key, it is keyed too."""
    settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path,
                        case_data_retention=timedelta(days=1), pseudonym_key="k" * 32)
    c = Coordinator(settings, pool, export_store=MemoryExportStore())
    await systems(pool, CRM)
    rid = await submit(c, "rectification", changes={"email": "lan.new@example.vn"})
    t = await tasks(pool, rid)
    await c.handle_receipts([receipt(t["crm"], "succeeded")])
    case = await case_of(pool, rid)
    assert await c.pseudonymise_closed(case["completed_at"] + timedelta(days=2)) == 1
    case = await case_of(pool, rid)
    [value] = orjson.loads(case["changes"]).values()
    assert value.startswith("hmac-sha256:") and "lan.new" not in value
    task_changes = orjson.loads((await tasks(pool, rid))["crm"]["changes"])
    assert all(v.startswith("hmac-sha256:") for v in task_changes.values())
