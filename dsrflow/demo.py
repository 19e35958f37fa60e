"""``dsrflow demo``: the whole flow on the embedded stack, with the two reference systems.

Starts a fresh embedded stack (on Apache Kafka, so kcat and every other client can join in),
runs the coordinator and the CRM and billing workers as processes, submits requests from
realistic subjects in waves, shows progress, prints each case's outcome and bundle, checks the
reference systems' own databases, and tears everything down. Exits 0 only when every case
reached the outcome it should.

The scenario (:func:`run_scenario`) is shared with the end-to-end test and runs on any
broker and PostgreSQL the settings point at.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from . import launcher, topics
from .client import submit
from .events import RightsRequested
from .rights import TERMINAL_CASE, CaseStatus, IdentifierType, Right
from .settings import Settings

SYSTEMS = ("crm", "billing")


@dataclass
class Step:
    """One request of the scenario and the outcome it must reach."""

    label: str
    right: Right
    subject: str  # a role: a key of examples.people.SUBJECTS or of the cast (see :func:`cast`)
    expect: CaseStatus
    verified: bool = True
    #: published by a plain Kafka client with only the required ce_* headers, as kcat would
    raw_client: bool = False
    #: no new request: the DPO verifies the identity of the case the step with this label opened
    verifies: str | None = None
    #: no new request: the DPO lifts the restriction of the case the step with this label opened
    lifts: str | None = None
    request_id: str = field(default_factory=lambda: f"demo-{uuid.uuid4().hex[:12]}")
    expect_tasks: dict[str, str] = field(default_factory=dict)
    #: the identifiers to send, instead of the person's email and phone
    identifiers: dict[str, str] | None = None
    #: more fields of the request: purposes, changes, requester, ...
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaseResult:
    step: Step
    case_id: uuid.UUID | None
    status: str | None
    tasks: dict[str, str]
    outcome: dict[str, Any] | None
    bundle_path: Path | None

    @property
    def ok(self) -> bool:
        return self.status == self.step.expect and all(
            self.tasks.get(s) == st for s, st in self.step.expect_tasks.items()
        )


#: Roles of the cast, picked from the CRM's own lists so that each starts where its right has an effect.
ROLES = ("rectified", "restricted", "objector", "withdrawer", "opted_out", "sale_opt_out", "tracked",
         "automated", "attack_a", "attack_b", "child")
NEW_ADDRESS = "18 Phố Lý Quốc Sư, Phường Hàng Trống, Quận Hoàn Kiếm, Hà Nội"


async def cast(settings: Settings) -> dict[str, Any]:
    """People for the roles: CRM contacts not used by the fixed subjects, each in the audience its
    right takes them out of (the opt-out's person gets the newsletter, the tracked person has a
    cookie, ...), so the checks afterwards show a change, not an empty list."""
    from examples.common import system_dsn
    from examples.crm.processing import campaign_audience, lead_scoring_candidates, shared_audience
    from examples.people import PEOPLE, SUBJECTS

    taken = {p.email for p in SUBJECTS.values()}
    conn = await asyncpg.connect(system_dsn("crm", settings))
    try:
        newsletter = {r["email"] for r in await campaign_audience(conn)}
        shared = {r["email"] for r in await shared_audience(conn)}
        scored = {r["email"] for r in await lead_scoring_candidates(conn)}
    finally:
        await conn.close()
    pool = [p for p in PEOPLE if "crm" in p.systems and p.email not in taken]
    chosen: dict[str, Any] = {}

    def pick(role: str, ok: Callable[[Any], bool]) -> None:
        person = next(p for p in pool if ok(p) and p not in chosen.values())
        chosen[role] = person

    pick("opted_out", lambda p: p.email in newsletter)
    pick("objector", lambda p: p.email in newsletter)
    pick("withdrawer", lambda p: p.email in newsletter)
    pick("sale_opt_out", lambda p: p.email in shared)
    pick("tracked", lambda p: p.cookie_id is not None)
    pick("automated", lambda p: p.email in scored)
    pick("restricted", lambda p: p.email in scored)
    for role in ("rectified", "attack_a", "attack_b", "child"):
        pick(role, lambda p: True)
    return chosen


def waves(people: Mapping[str, Any] | None = None) -> list[list[Step]]:
    """Access before erasure of the same person, so the waves run in order. ``people``: the cast."""
    c = people or {}
    fixed = [
        [
            Step("access, person in CRM and billing", Right.access, "both", CaseStatus.completed,
                 expect_tasks={"crm": "succeeded", "billing": "succeeded"}),
            Step("access, person in no system (kcat-style client)", Right.access, "nowhere", CaseStatus.completed,
                 expect_tasks={"crm": "not_found", "billing": "not_found"}, raw_client=True),
            Step("erasure, CRM contact only", Right.erasure, "crm_only", CaseStatus.completed,
                 expect_tasks={"crm": "succeeded", "billing": "not_found"}),
            Step("erasure, identity not yet verified", Right.erasure, "billing_only",
                 CaseStatus.awaiting_verification, verified=False),
        ],
        [
            Step("erasure, person with invoices", Right.erasure, "both", CaseStatus.completed_with_exceptions,
                 expect_tasks={"crm": "succeeded", "billing": "retained"}),
            Step("  ... the DPO verifies that identity", Right.erasure, "billing_only",
                 CaseStatus.completed_with_exceptions, expect_tasks={"crm": "not_found", "billing": "retained"},
                 verifies="erasure, identity not yet verified"),
        ],
        [
            Step("access after erasure", Right.access, "both", CaseStatus.completed,
                 expect_tasks={"crm": "not_found", "billing": "not_found"}),
        ],
    ]
    if not c:
        return fixed
    a, b = c["attack_a"], c["attack_b"]
    fixed[0] += [
        Step("rectification: a new address", Right.rectification, "rectified", CaseStatus.completed,
             expect_tasks={"crm": "succeeded"}, extra={"changes": {"address": NEW_ADDRESS}}),
        Step("portability: a machine-readable copy", Right.portability, "rectified", CaseStatus.completed,
             expect_tasks={"crm": "succeeded"}),
        Step("restriction of all processing", Right.restriction, "restricted", CaseStatus.completed,
             expect_tasks={"crm": "succeeded"}),
        Step("objection to marketing", Right.objection, "objector", CaseStatus.completed,
             expect_tasks={"crm": "succeeded"}, extra={"purposes": ["marketing"]}),
        Step("consent withdrawn for marketing", Right.withdraw_consent, "withdrawer", CaseStatus.completed,
             expect_tasks={"crm": "succeeded"}, extra={"purposes": ["marketing"]}),
        Step("marketing opt-out by a local phone, unverified", Right.opt_out_marketing, "opted_out",
             CaseStatus.completed, verified=False, expect_tasks={"crm": "succeeded"},
             identifiers={"phone": "0" + c["opted_out"].phone.removeprefix("+84")}),
        Step("opt-out of sale and sharing, unverified", Right.opt_out_sale_share, "sale_opt_out",
             CaseStatus.completed, verified=False, expect_tasks={"crm": "succeeded"},
             identifiers={"email": c["sale_opt_out"].email}),
        Step("opt-out of tracking by a cookie id", Right.opt_out_tracking, "tracked", CaseStatus.completed,
             verified=False, expect_tasks={"crm": "succeeded"}, identifiers={"cookie_id": c["tracked"].cookie_id}),
        Step("objection to automated decisions", Right.automated_decision_objection, "automated",
             CaseStatus.completed, expect_tasks={"crm": "succeeded"}),
        Step("information: what is processed, why, where, how long", Right.information, "nowhere",
             CaseStatus.completed, verified=False),
        Step("erasure: one person's email + another's phone", Right.erasure, "attack_a",
             CaseStatus.completed_with_exceptions, expect_tasks={"crm": "conflict"},
             identifiers={"email": a.email, "phone": b.phone}),
        Step("access by a parent for a child, not yet verified", Right.access, "child",
             CaseStatus.awaiting_verification,
             extra={"requester": {"relationship": "parent_guardian", "name": "Người giám hộ",
                                  "evidence": "birth_certificate"}}),
    ]
    fixed[1] += [
        Step("  ... the DPO checks the parent's authority", Right.access, "child", CaseStatus.completed,
             expect_tasks={"crm": "succeeded"}, verifies="access by a parent for a child, not yet verified"),
        Step("  ... the DPO lifts the restriction", Right.restriction, "restricted", CaseStatus.completed,
             expect_tasks={"crm": "succeeded", "crm:lift_restriction": "succeeded"},
             lifts="restriction of all processing"),
    ]
    return fixed


def _person(step: Step, people: Mapping[str, Any]) -> Any:
    from examples.people import SUBJECTS

    return people[step.subject] if step.subject in people else SUBJECTS[step.subject]


def _body(step: Step, people: Mapping[str, Any]) -> dict[str, Any]:
    return {"request_id": step.request_id, "right": str(step.right), "verified": step.verified,
            "subject": {"identifiers": step.identifiers or _person(step, people).identifiers()},
            "jurisdiction": "VN", **step.extra}


def _request(step: Step, people: Mapping[str, Any] | None = None) -> RightsRequested:
    return RightsRequested.model_validate({**_body(step, people or {}), "received_at": datetime.now(UTC),
                                           "channel": "privacy_centre"})


async def prepare(settings: Settings) -> None:
    """Case store migrated, reference systems created and seeded, topics in place."""
    from examples.billing.worker import setup as setup_billing
    from examples.common import system_dsn
    from examples.crm.worker import setup as setup_crm

    from .store import migrate

    await migrate(settings.dsn)
    await setup_crm(system_dsn("crm", settings))
    await setup_billing(system_dsn("billing", settings))
    await topics.apply(settings.kafka_client_options(), topics.specs_for(list(SYSTEMS)),
                       replication_factor=settings.topic_replication_factor)


async def sign_everything(settings: Settings, systems: Sequence[str] = SYSTEMS) -> Settings:
    """What an administrator does before the services start (``dsrflow systems coordinator-key``,
    ``dsrflow systems key NAME``): the coordinator signs every task and the workers act only on
    signed ones; each system's worker signs its receipts and the coordinator refuses unsigned
    ones. Returns the settings the services are started with (keys made once per state dir)."""
    from . import signing
    from .launcher import worker_credential

    folder = settings.state_dir / "credentials"
    private, public = signing.coordinator_key_files(folder)
    if not private.exists():
        signing.new_coordinator_key(private, public)
    conn = await asyncpg.connect(settings.dsn)
    try:
        for system in systems:
            if worker_credential(settings, system) is None:
                await signing.new_system_key(conn, system, signing.system_key_file(folder, system))
    finally:
        await conn.close()
    return settings.model_copy(update={"coordinator_credential": private, "coordinator_public_keys": public,
                                       "require_signed_receipts": True})


#: The demo's people who decide: a DPO, and an operator of the call centre. Each acts with a signing
#: key, as `dsrflow actors add` gives one; the timeline records them by that key, never by a name
#: a sender makes up.
DPO, OPERATOR, ADMIN = "dpo-demo", "ops-demo", "admin-demo"


async def credentials(settings: Settings) -> dict[str, Any]:
    """The DPO's, the operator's and the administrator's credentials (made and registered once per
    case store, kept in ``<state_dir>/credentials``)."""
    from . import auth

    out: dict[str, Any] = {}
    conn = await asyncpg.connect(settings.dsn)
    try:
        known = {a.name for a in await auth.list_actors(conn)}
        for name, role in ((DPO, auth.Role.dpo), (OPERATOR, auth.Role.operator), (ADMIN, auth.Role.admin)):
            path = settings.state_dir / "credentials" / f"{name}.json"
            if name in known and path.exists():
                out[name] = auth.load_credential(path)
                continue
            if name not in known:
                await auth.add_actor(conn, name, role)
            cred = auth.generate_credential(name)
            await auth.add_key(conn, name, cred.public_pem(), key_id=cred.key_id)
            cred.save(path, overwrite=True)
            out[name] = cred
    finally:
        await conn.close()
    return out


async def send_command(settings: Settings, actor: str, command: Mapping[str, Any], key: str) -> None:
    """What a DPO tool in any language does: a decision signed with the actor's key, published on
    dsr.commands.v1; the coordinator checks it and applies it once."""
    from aiokafka import AIOKafkaProducer

    from . import auth, codec
    from .events import DecisionCommand

    token = auth.sign_command((await credentials(settings))[actor], command)
    value, headers = codec.encode(DecisionCommand(token=token), source="demo/dpo-tool")
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    try:
        await producer.send_and_wait(topics.COMMANDS, value, key=key.encode(), headers=headers)
    finally:
        await producer.stop()


async def decide(settings: Settings, actor: str, command: Mapping[str, Any]) -> Any:
    """What ``dsrflow cases ...`` and ``dsrflow tasks ...`` do: sign the decision with the actor's
    credential and have the coordinator's core apply it (the same check as on the topic). Returns
    the CommandResult."""
    from . import auth
    from .coordinator import Coordinator

    token = auth.sign_command((await credentials(settings))[actor], command)
    pool = await asyncpg.create_pool(settings.dsn, min_size=1, max_size=1)
    try:
        return await Coordinator(settings, pool).execute(token, fallback_id=f"demo-{uuid.uuid4()}")
    finally:
        await pool.close()


async def approve_systems(settings: Settings, systems: Sequence[str] = SYSTEMS, services: Any = None,
                          timeout: float = 60.0) -> None:
    """What an administrator does when a new worker announces itself (``dsrflow systems pending``,
    then ``dsrflow systems approve NAME --digest D``): wait for each system's announcement, approve
    the declaration it announced, and wait until it is registered."""
    from . import launcher

    digests = await launcher.wait_announced(settings.dsn, systems, services, timeout)
    for system, digest in digests.items():
        result = await decide(settings, ADMIN, {"decision": "approve_system", "system": system, "digest": digest})
        if not result.accepted:
            raise RuntimeError(f"approving system {system} was refused: {result.error_type}: {result.error}")
    await launcher.wait_registered(settings.dsn, systems, services, timeout)


async def verify_case(settings: Settings, case_id: uuid.UUID) -> None:
    """The DPO confirms the subject's identity, from a DPO tool over dsr.commands.v1."""
    await send_command(settings, DPO, {"decision": "verify", "case_id": str(case_id), "method": "id_document"},
                       str(case_id))


async def lift_case(settings: Settings, case_id: uuid.UUID) -> None:
    """The DPO lifts a restriction, from a DPO tool over dsr.commands.v1."""
    await send_command(settings, DPO, {"decision": "lift", "case_id": str(case_id)}, str(case_id))


async def publish_raw(settings: Settings, key: str, value: bytes) -> None:
    """Publish as any Kafka client following topics/schemas/ would: hand-written JSON and only the
    required CloudEvents headers, no dsrflow code involved."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    try:
        headers = [("ce_specversion", b"1.0"), ("ce_id", f"raw-{uuid.uuid4()}".encode()), ("ce_source", b"demo"),
                   ("ce_type", b"dsrflow.rights.requested.v1"), ("content-type", b"application/json")]
        await producer.send_and_wait(topics.REQUESTS, value, key=key.encode(), headers=headers)
    finally:
        await producer.stop()


async def publish_invalid(settings: Settings) -> None:
    """An event no schema allows: it must reach the dead-letter topic, and nothing must stop."""
    await publish_raw(settings, "demo-invalid", b'{"request_id": "bad one", "right": "teleport"}')


async def _statuses(conn: asyncpg.Connection, request_ids: Sequence[str]) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch(
        """SELECT c.request_id, c.case_id, c.status, c.outcome, c.bundle,
                  coalesce(jsonb_object_agg(t.system || CASE WHEN t.action = 'lift_restriction'
                                                        THEN ':lift_restriction' ELSE '' END, t.status)
                           FILTER (WHERE t.system IS NOT NULL), '{}') AS tasks
           FROM cases c LEFT JOIN tasks t USING (case_id)
           WHERE c.request_id = ANY($1::text[]) GROUP BY c.case_id""",
        list(request_ids),
    )
    return {r["request_id"]: r for r in rows}


_OPEN_TASK = {"pending", "dispatched", "manual", "stalled"}


def _settled(step: Step, row: asyncpg.Record | None) -> bool:
    if row is None:
        return False
    if not (CaseStatus(row["status"]) in TERMINAL_CASE or row["status"] == step.expect):
        return False
    tasks = orjson.loads(row["tasks"])
    return all(name in tasks and tasks[name] not in _OPEN_TASK for name in step.expect_tasks)


async def run_scenario(
    settings: Settings, *, progress: Callable[[str], None] = lambda _: None, timeout: float = 120.0,
    duplicate: bool = True, invalid: bool = True, people: Mapping[str, Any] | None = None,
) -> list[CaseResult]:
    """Submit the waves and wait for each to settle; returns one result per step. ``people``: the
    cast for every right (:func:`cast`); without it, access and erasure only."""
    people = people or {}
    conn = await asyncpg.connect(settings.dsn)
    results: list[CaseResult] = []
    try:
        for n, wave in enumerate(waves(people), 1):
            reqs = [_request(s, people) for s in wave if not s.raw_client and not s.verifies and not s.lifts]
            await submit(settings, reqs)
            for s in wave:
                earlier_label = s.verifies or s.lifts
                if earlier_label:
                    earlier = next(r for r in results if r.step.label == earlier_label)
                    assert earlier.case_id is not None, f"no case for {earlier_label!r}"
                    s.request_id = earlier.step.request_id
                    await (verify_case if s.verifies else lift_case)(settings, earlier.case_id)
            for s in wave:
                if s.raw_client:
                    await publish_raw(settings, s.request_id, orjson.dumps(_body(s, people)))
            if n == 1 and duplicate:
                # The same request again (a client retry): same request id, new event id.
                await submit(settings, [reqs[0].model_copy()])
            if n == 1 and invalid:
                await publish_invalid(settings)
            progress(f"wave {n}: submitted {len(wave)} request(s)")
            deadline = time.monotonic() + timeout
            last = ""
            while True:
                rows = await _statuses(conn, [s.request_id for s in wave])
                counts: dict[str, int] = {}
                for s in wave:
                    st = rows[s.request_id]["status"] if s.request_id in rows else "submitted"
                    counts[st] = counts.get(st, 0) + 1
                line = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                if line != last:
                    progress(f"wave {n}: {line}")
                    last = line
                if all(_settled(s, rows.get(s.request_id)) for s in wave):
                    break
                if time.monotonic() > deadline:
                    progress(f"wave {n}: timed out after {timeout:.0f}s")
                    break
                await asyncio.sleep(0.25)
            for s in wave:
                r = rows.get(s.request_id)
                bundle = orjson.loads(r["bundle"]) if r is not None and r["bundle"] else None
                results.append(CaseResult(
                    step=s,
                    case_id=r["case_id"] if r else None,
                    status=r["status"] if r else None,
                    tasks=orjson.loads(r["tasks"]) if r else {},
                    outcome=orjson.loads(r["outcome"]) if r is not None and r["outcome"] else None,
                    bundle_path=(settings.exports / bundle["ref"]).resolve() if bundle else None,
                ))
        return results
    finally:
        await conn.close()


#: A system declared with no dsrflow worker, registered after the scenario: the call centre's
#: dialler list. Lasting effects in force (the marketing opt-out, the objection) reach it as
#: manual tasks, which a person carries out.
CALL_CENTRE = "call_centre"


async def late_system(settings: Settings, results: Sequence[CaseResult]) -> list[tuple[str, bool]]:
    """Register the call centre after the opt-outs, let the coordinator plan for it, and have a
    person work the manual tasks it gets. Returns checks."""
    from .coordinator import Coordinator
    from .registry import SystemDeclaration, register

    declaration = SystemDeclaration(
        name=CALL_CENTRE, identifier_types=(IdentifierType.phone,), worker=False,
        purposes=("marketing.communications",),
        description="Outbound call centre: the dialler's list of numbers to call with offers",
        processors=("Example Call Centre JSC (outsourced)",), operated_by="processor", storage_country="VN",
    )
    pool = await asyncpg.create_pool(settings.dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await register(conn, declaration)
        coordinator = Coordinator(settings, pool)
        await coordinator.plan_new_systems()
        manual = await pool.fetch("SELECT task_id, case_id FROM tasks WHERE system = $1 AND status = 'manual'",
                                  CALL_CENTRE)
        done_by: set[str] = set()
        for t in manual:  # the DPO gives each to the call centre's operator, who does it and says so
            ids = {"case_id": str(t["case_id"]), "task_id": str(t["task_id"])}
            await decide(settings, DPO, {"decision": "reassign_task", **ids, "to_person": OPERATOR,
                                         "reason": "the call centre's operator keeps the dialler list"})
            result = await decide(settings, OPERATOR, {
                "decision": "complete_task", **ids, "resolution": "succeeded",
                "note": "number removed from the dialler list (ticket CC-2041)"})
            done_by.add(result.actor if result.accepted else f"refused: {result.error}")
        by_case = {r["case_id"]: r["status"] for r in await pool.fetch(
            "SELECT case_id, status FROM tasks WHERE system = $1", CALL_CENTRE)}
    finally:
        await pool.close()
    by_label = {r.step.label: r for r in results}
    lasting = [by_label[k].case_id for k in ("marketing opt-out by a local phone, unverified",
                                              "objection to marketing") if k in by_label]
    erasure = by_label["erasure, CRM contact only"].case_id
    return [
        ("call centre registered later: the opt-out and the objection reach it, done by a person",
         bool(lasting) and all(by_case.get(c) == "succeeded" for c in lasting)),
        ("call centre registered later: a finished erasure does not reach it (not lasting)", erasure not in by_case),
        (f"call centre tasks reassigned by the DPO to {OPERATOR}, completed with the operator's own key",
         done_by == {OPERATOR}),
    ]


async def dpo_decisions(settings: Settings, people: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """The DPO's other decisions, each signed with the DPO's key: a case put on hold for suspected
    fraud, released, extended with reasons and finally denied on a ground of the law; and a case
    opened with no request behind it (an under-16 account, deleted as Viindoo's policy says).
    Returns checks, read back from the case store and the notices the subject would get."""
    from examples.people import SUBJECTS

    from .codec import decode
    from .events import SubjectNotice
    from .store.outbox import headers_from_json

    checks: list[tuple[str, bool]] = []
    person = SUBJECTS["both"]
    doubtful = RightsRequested.model_validate({
        "request_id": f"demo-{uuid.uuid4().hex[:12]}", "right": "access", "received_at": datetime.now(UTC),
        "subject": {"identifiers": {"email": person.email}}, "channel": "email"})
    await submit(settings, [doubtful])
    conn = await asyncpg.connect(settings.dsn)
    try:
        case_id = None
        for _ in range(200):
            case_id = await conn.fetchval("SELECT case_id FROM cases WHERE request_id = $1", doubtful.request_id)
            if case_id:
                break
            await asyncio.sleep(0.1)
        assert case_id is not None, "the coordinator did not open the doubtful case"
        on = {"case_id": str(case_id)}
        steps = [
            ({"decision": "hold", **on, "kind": "suspected_fraud",
              "reason": "request by email from an address that changed yesterday"}, "on_hold"),
            ({"decision": "release", **on}, "awaiting_verification"),
            ({"decision": "extend", **on, "reason": "the subject was asked to confirm by phone; no answer yet"},
             "awaiting_verification"),
            ({"decision": "deny", **on, "ground": "identity_not_verified",
              "reason": "the subject could not be reached to confirm the request"}, "denied"),
        ]
        seen = []
        for command, expect in steps:
            result = await decide(settings, DPO, command)
            seen.append((command["decision"], result.accepted and str(result.case_status) == expect))
        checks.append(("suspected fraud: held, released, extended with reasons, denied on a legal ground "
                       f"({', '.join(d for d, ok in seen if ok)})", all(ok for _, ok in seen)))
        rows = await conn.fetch("SELECT value, headers FROM outbox WHERE topic = $1 AND key = $2 ORDER BY id",
                                topics.NOTICES, str(case_id).encode())
        told = [decode(r["value"], headers_from_json(r["headers"]), SubjectNotice).data.kind for r in rows]
        checks.append((f"the subject is told: {', '.join(told)}",
                       told == ["acknowledged", "more_information_needed", "extended", "denied"]))
        young = RightsRequested.model_validate({
            "request_id": f"demo-{uuid.uuid4().hex[:12]}", "right": "erasure",
            "subject": {"identifiers": {"email": "be.minh.2012@example.vn"}}})
        opened = await decide(settings, DPO, {
            "decision": "open_case", "request": young.model_dump(mode="json", exclude_none=True),
            "why": "account of a user under 16, reported by a parent (ticket SUP-88): deleted as the policy says"})
        first = await conn.fetchrow("""SELECT t.detail FROM case_timeline t JOIN cases c USING (case_id)
                                       WHERE c.request_id = $1 ORDER BY position LIMIT 1""", young.request_id)
        by = orjson.loads(first["detail"]).get("opened_by_dpo", {}).get("by") if first else None
        checks.append(("a case with no request behind it: an under-16 account's deletion, opened by the DPO",
                       opened.accepted and by == DPO))
        checks += await _client_leaves(settings, conn)
    finally:
        await conn.close()
    return checks


async def _client_leaves(settings: Settings, conn: asyncpg.Connection) -> list[tuple[str, bool]]:
    """A client company (controller "acme") leaves the processor: its helpdesk, a system with no
    dsrflow worker, is handed over by the operator, then its deletion is skipped by the DPO with the
    reason (the vendor deletes it at the contract's end), so the case says so."""
    from .registry import SystemDeclaration, register

    await register(conn, SystemDeclaration(name="acme-helpdesk", identifier_types=(IdentifierType.email,),
                                           worker=False, controller="acme",
                                           description="acme's helpdesk, hosted for it by the processor"))
    steps: list[bool] = []
    for mode in ("handover", "delete"):
        opened = await decide(settings, DPO, {"decision": "offboard", "controller": "acme", "mode": mode,
                                              "why": "acme's contract ended on 2026-11-30"})
        task = await conn.fetchrow("SELECT task_id, action, kind FROM tasks WHERE case_id = $1", opened.case_id)
        ids = {"case_id": str(opened.case_id), "task_id": str(task["task_id"])}
        if mode == "handover":
            await decide(settings, DPO, {"decision": "reassign_task", **ids, "to_person": OPERATOR,
                                         "reason": "the operator exports acme's helpdesk"})
            done = await decide(settings, OPERATOR, {"decision": "complete_task", **ids, "resolution": "succeeded",
                                                     "note": "helpdesk export delivered to acme's SFTP (HD-12)"})
            steps.append(task["action"] == "export_all" and done.accepted and str(done.case_status) == "completed")
        else:
            done = await decide(settings, DPO, {"decision": "skip_task", **ids,
                                                "reason": "the helpdesk vendor deletes it at the contract's end"})
            steps.append(task["action"] == "erase_all" and done.accepted
                         and str(done.case_status) == "completed_with_exceptions")
    return [("a client company leaves: its data handed over by the operator, its deletion skipped with the "
             "reason (completed with exceptions)", all(steps) and len(steps) == 2)]


async def reference_checks(settings: Settings, people: Mapping[str, Any] | None = None) -> list[tuple[str, bool]]:
    """Look in the reference systems' own databases, not at what the workers reported."""
    from examples.common import system_dsn
    from examples.crm.processing import campaign_audience, lead_scoring_candidates, shared_audience, tracking_allowed
    from examples.people import SUBJECTS

    both, crm_only = SUBJECTS["both"], SUBJECTS["crm_only"]
    crm = await asyncpg.connect(system_dsn("crm", settings))
    billing = await asyncpg.connect(system_dsn("billing", settings))
    extra: list[tuple[str, bool]] = []
    try:
        gone = await crm.fetchval(
            "SELECT count(*) FROM contacts WHERE email = ANY($1::text[]) OR phone = ANY($2::text[])",
            [both.email, crm_only.email], [both.phone, crm_only.phone],
        )
        cust = await billing.fetchrow("SELECT * FROM customers WHERE id = $1", both.customer_id)
        invoices = await billing.fetchval("SELECT count(*) FROM invoices WHERE customer_id = $1", both.customer_id)
        found_by_id = await billing.fetchval(
            "SELECT count(*) FROM customers WHERE email = $1 OR phone = $2", both.email, both.phone)
        others = await crm.fetchval("SELECT count(*) FROM contacts")
        if people:
            c = people
            newsletter = {r["email"] for r in await campaign_audience(crm)}
            shared = {r["email"] for r in await shared_audience(crm)}
            scored = {r["email"] for r in await lead_scoring_candidates(crm)}
            address = await crm.fetchval(
                """SELECT a.line FROM addresses a JOIN contacts k ON k.id = a.contact_id
                   WHERE k.email = $1 ORDER BY a.id LIMIT 1""", c["rectified"].email)
            attacked = await crm.fetchval(
                "SELECT count(*) FROM contacts WHERE email = ANY($1::text[]) AND phone = ANY($2::text[])",
                [c["attack_a"].email, c["attack_b"].email], [c["attack_a"].phone, c["attack_b"].phone])
            extra = [
                ("CRM: the rectified address is the one the person gave", address is not None
                 and NEW_ADDRESS.startswith(address)),
                ("CRM: the newsletter skips the opt-out, the objection and the withdrawn consent",
                 not {c["opted_out"].email, c["objector"].email, c["withdrawer"].email} & newsletter
                 and bool(newsletter)),
                ("CRM: the ad audience skips the sale/share opt-out", c["sale_opt_out"].email not in shared),
                ("CRM: analytics no longer follows the opted-out cookie",
                 not await tracking_allowed(crm, c["tracked"].cookie_id)),
                ("CRM: lead scoring skips the automated-decision objection", c["automated"].email not in scored),
                ("CRM: the lifted restriction lets lead scoring score the person again",
                 c["restricted"].email in scored),
                ("CRM: an erasure by the identifiers of two people erased neither", attacked == 2),
            ]
    finally:
        await crm.close()
        await billing.close()
    return [
        ("CRM: erased contacts are gone (contacts, addresses, notes)", gone == 0),
        ("CRM: other customers are untouched", others > 0),
        ("billing: customer anonymised, email and phone removed",
         cust is not None and cust["anonymised_at"] is not None and cust["email"] is None and cust["phone"] is None
         and found_by_id == 0),
        (f"billing: {invoices} invoice(s) and their payments kept with their amounts (Law on Accounting)",
         invoices > 0),
        *extra,
    ]


async def duplicate_ignored(settings: Settings, request_id: str) -> bool:
    """The resubmitted request opened no second case and is on the first case's timeline."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        cases = await conn.fetchval("SELECT count(*) FROM cases WHERE request_id = $1", request_id)
        noted = await conn.fetchval(
            """SELECT count(*) FROM case_timeline t JOIN cases c USING (case_id)
               WHERE c.request_id = $1 AND t.kind = 'duplicate_request'""", request_id)
    finally:
        await conn.close()
    return bool(cases == 1 and noted >= 1)


async def dead_letters(settings: Settings, timeout: float = 10.0) -> list[dict[str, str]]:
    """The dlq_* headers of the records on the dead-letter topic."""
    from aiokafka import AIOKafkaConsumer

    from .codec import header_map

    consumer = AIOKafkaConsumer(topics.DEADLETTER, **settings.kafka_client_options(),
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list[dict[str, str]] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not out:
            batches = await consumer.getmany(timeout_ms=500)
            for recs in batches.values():
                out += [{k: v for k, v in header_map(r.headers).items() if k.startswith("dlq_")} for r in recs]
    finally:
        await consumer.stop()
    return out


def _print(msg: str) -> None:
    print(msg, flush=True)


def main(base: Settings) -> int:
    """Entry point of ``dsrflow demo``."""
    from . import stack
    from ._reference import ensure_examples

    ensure_examples()  # the checkout's examples/, or the copy inside the installed package
    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # the services log to files; keep the screen for the story
    state_dir = base.state_dir / "demo"
    if state_dir.exists():
        stack.down(state_dir)
        shutil.rmtree(state_dir)
    _print(f"starting the embedded stack in {state_dir} ...")
    t0 = time.monotonic()
    info = stack.up(state_dir, broker=os.environ.get("DSRFLOW_DEMO_BROKER", "apache"))
    try:
        settings = Settings(state_dir=state_dir, kafka_bootstrap=None, pg_dsn=None, export_dir=None,
                            log_level="INFO")
        _print(f"  broker {settings.bootstrap} ({info['broker']}), PostgreSQL {settings.dsn}")
        asyncio.run(prepare(settings))
        settings = asyncio.run(sign_everything(settings))
        _print("case store migrated; CRM and billing databases seeded; topics applied; tasks and receipts signed")
        with launcher.running(settings, SYSTEMS, log_dir=state_dir / "logs") as services:
            asyncio.run(approve_systems(settings, SYSTEMS, services))
            _print("coordinator and workers (crm, billing) running; the systems they announced approved by an "
                   "administrator")
            people = asyncio.run(cast(settings))
            results = asyncio.run(run_scenario(settings, progress=lambda m: _print("  " + m), people=people))
            checks = asyncio.run(reference_checks(settings, people))
            checks += asyncio.run(late_system(settings, results))
            checks += asyncio.run(dpo_decisions(settings, people))
            dlq = asyncio.run(dead_letters(settings))
            checks.append(("duplicate request: no second case, noted on the first case's timeline",
                           asyncio.run(duplicate_ignored(settings, results[0].step.request_id))))
            services.check_alive()
        _print("")
        _print(f"{'request':<54} {'right':<28} {'outcome':<26} tasks")
        for r in results:
            mark = "ok " if r.ok else "BAD"
            tasks = ", ".join(f"{k}={v}" for k, v in sorted(r.tasks.items())) or "-"
            _print(f"{mark} {r.step.label:<50} {r.step.right:<28} {r.status or 'no case':<26} {tasks}")
            outcome = r.outcome or {}
            if "information" in outcome:
                _print(f"      answered from the declarations of {', '.join(sorted(outcome['information']))}: "
                       "purposes, recipients, processors, storage country, retention")
            for system in outcome.get("identifier_conflicts", []):
                _print(f"      {system}: the identifiers point to different people; nothing done, the DPO decides")
            for item in (r.outcome or {}).get("retained", []):
                _print(f"      kept by {item['system']}: {item['records']} {item['category']} record(s) until "
                       f"{item.get('retain_until', '?')[:10]}; basis: {item['legal_basis']}")
            if r.bundle_path and r.bundle_path.exists():
                _print(f"      access bundle: {r.bundle_path}")
            elif r.bundle_path:
                _print("      access bundle: deleted with its exports by the same person's erasure, which finished "
                       "after it")
            copies = (r.outcome or {}).get("earlier_copies_deleted", {})
            if copies.get("cases"):
                _print(f"      dsrflow's own copies deleted: {copies.get('bundles', 0)} bundle(s), "
                       f"{copies.get('exports', 0)} export(s) of {len(copies['cases'])} earlier access case(s)")
        _print("")
        for label, ok in checks:
            _print(f"{'ok ' if ok else 'BAD'} {label}")
        invalid_ok = any(d.get("dlq_error_type") == "invalid" for d in dlq)
        _print(f"{'ok ' if invalid_ok else 'BAD'} invalid event dead-lettered "
               f"({', '.join(sorted({d.get('dlq_error_type', '?') for d in dlq})) or 'none'})")
        all_ok = all(r.ok for r in results) and all(ok for _, ok in checks) and invalid_ok
        _print(f"\ndemo {'succeeded' if all_ok else 'FAILED'} in {time.monotonic() - t0:.1f}s; "
               f"logs in {state_dir / 'logs'}")
        return 0 if all_ok else 1
    finally:
        stack.down(state_dir)
        _print("embedded stack stopped")
