"""The coordinator's effects: intake of requests, aggregation of receipts, the DPO's decisions and
the timers.

Each is one unit of work in one PostgreSQL transaction: inbox claim, the cases it touches (loaded
and locked), their transitions (the pure methods of :class:`dsrflow.domain.case.Case`), and the
timeline entries and outgoing events those return (the outbox) commit together or not at all.
Bad input is dead-lettered through the outbox too, so it is never lost or half-sent.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson

from .. import auth, codec, commands, policy, registry, signing, topics
from ..domain import planner
from ..domain.case import Case, CaseError, Effects, InvalidTransition, TaskKind
from ..domain.timeline import Entry, TimelineKind
from ..events import (
    DEFAULT_CONTROLLER,
    Artifact,
    CommandResult,
    DeadLetter,
    DecisionCommand,
    RightsRequested,
    TaskProgress,
    TaskReceipt,
)
from ..exports import BundleError, ExportError, ExportStore, LocalExportStore, Withheld, build_bundle
from ..exports.store import controller_prefix, system_case_prefix
from ..registry import SystemDeclaration, active_systems
from ..rights import ACTION_FOR_RIGHT, LASTING, CaseStatus, Right, TaskStatus
from ..settings import Settings
from ..store import cases as repo
from ..store import outbox
from ..store.outbox import OutboxMessage

log = logging.getLogger("dsrflow.coordinator")

SOURCE = repo.SOURCE
INTAKE = "coordinator.requests"
AGGREGATOR = "coordinator.receipts"
COMMANDS = "coordinator.commands"

__all__ = ["AGGREGATOR", "COMMANDS", "INTAKE", "CaseNotFound", "Coordinator", "InvalidTransition", "Record"]


class CaseNotFound(CaseError, LookupError):
    """No case with that id."""


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record, independent of the client library."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes]


@dataclass(slots=True)
class _Work:
    """What one unit of work records besides the cases: transitions' effects and dead letters."""

    effects: Effects = field(default_factory=Effects)
    dead: list[OutboxMessage] = field(default_factory=list)

    def dead_letter(self, rec: Record, consumer: str, kind: str, error: str) -> None:
        record = DeadLetter(
            original_topic=rec.topic, original_partition=rec.partition, original_offset=rec.offset,
            consumer=consumer, error_type=kind, error=error[:4000], failed_at=datetime.now(UTC),
        )
        headers = list(rec.headers.items()) if isinstance(rec.headers, Mapping) else list(rec.headers)
        value, dl_headers = codec.dead_letter(rec.value, headers, record)
        self.dead.append(OutboxMessage(topics.DEADLETTER, rec.key, value, dl_headers))
        log.warning("dead-lettered %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, kind)


def _decode_all(records: Sequence[Record], model: type[Any], consumer: str,
                work: _Work) -> list[tuple[Record, codec.Envelope[Any]]]:
    out = []
    for rec in records:
        try:
            env = codec.decode(rec.value, rec.headers, model)
        except codec.DecodeError as exc:
            work.dead_letter(rec, consumer, exc.kind, str(exc))
            continue
        out.append((rec, env))
    return out


def _event_key(env: codec.Envelope[Any]) -> tuple[str, str]:
    """What the inbox knows an event by: CloudEvents ids are unique per source."""
    return env.source, env.id


def _receipt_key(env: codec.Envelope[Any]) -> tuple[str, str]:
    """A receipt is known by its system (the one whose key admitted it) and its id, never by a
    source a producer can write: a receipt naming another system cannot take this one's id."""
    return f"system:{env.data.system}", env.id


#: What dsr.receipts.v1 carries, by CloudEvents type: a task's result, or its progress meanwhile.
_ON_RECEIPTS: dict[str, type[TaskReceipt] | type[TaskProgress]] = {
    TaskReceipt.ce_type: TaskReceipt, TaskProgress.ce_type: TaskProgress}


def _decode_on_receipts(records: Sequence[Record], work: _Work) -> list[tuple[Record, codec.Envelope[Any]]]:
    """Decode each record of dsr.receipts.v1 as the type its ``ce_type`` header names; any other
    type (or none) is dead-lettered, with the reason."""
    out = []
    for rec in records:
        try:
            ce_type = codec.header_map(rec.headers).get("ce_type")
            model = _ON_RECEIPTS.get(ce_type or "")
            if model is None and ce_type:
                raise codec.DecodeError("bad_type", f"ce_type {ce_type[:200]!r} is not one of dsr.receipts.v1's: "
                                                    f"{', '.join(repr(t) for t in _ON_RECEIPTS)}")
            env = codec.decode(rec.value, rec.headers, model or TaskReceipt)  # no ce_type: missing_header
        except codec.DecodeError as exc:
            work.dead_letter(rec, AGGREGATOR, exc.kind, str(exc))
            continue
        if not from_system(env.source, env.data.system):
            work.dead_letter(rec, AGGREGATOR, "wrong_source", f"ce_source {env.source[:200]!r} is not system "
                             f"{env.data.system}'s (it ends in /{env.data.system}; the SDK's is "
                             f"dsrflow/worker/{env.data.system})")
            continue
        out.append((rec, env))
    return out


def from_system(source: str, system: str) -> bool:
    """Whether a CloudEvents source is a system's own: its last path segment is the system's name
    (``dsrflow/worker/crm``, ``acme/workers/crm``). Checked for receipts, progress and
    announcements, before their signature: a worker's producer that mixes up its systems is caught
    even where nothing is signed."""
    return source.rsplit("/", 1)[-1] == system


def _first_of_each(decoded: list[tuple[Record, codec.Envelope[Any]]],
                   key: Callable[[codec.Envelope[Any]], tuple[str, str]]) -> list[tuple[Record, codec.Envelope[Any]]]:
    """The same event twice in one batch counts once, as the inbox would count it."""
    seen: set[tuple[str, str]] = set()
    out = []
    for rec, env in decoded:
        if key(env) not in seen:
            seen.add(key(env))
            out.append((rec, env))
    return out


class Coordinator:
    """Intake, aggregation, the DPO's decisions and the timers, over an asyncpg pool and an export store."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, *, export_store: ExportStore | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.exports = export_store or LocalExportStore(settings.exports)

    async def dead_letter(self, rec: Record, consumer: str, kind: str, error: str) -> None:
        """Dead-letter one record on its own (used when processing it raised)."""
        work = _Work()
        work.dead_letter(rec, consumer, kind, error)
        async with self.pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, work.dead)

    async def _handle(self, records: Sequence[Record],
                      decode: Callable[[Sequence[Record], _Work], list[tuple[Record, codec.Envelope[Any]]]],
                      consumer: str, apply: Callable[..., Awaitable[None]],
                      admit: Callable[..., Awaitable[list[Any]]] | None = None,
                      key: Callable[[codec.Envelope[Any]], tuple[str, str]] = _event_key) -> None:
        """Decode (bad records are dead-lettered), let ``admit`` refuse some (dead-lettered before
        the inbox sees them, so a forgery cannot take a real event's id), drop events the inbox has
        seen, apply the rest: all in one transaction."""
        work = _Work()
        decoded = decode(records, work)
        now = datetime.now(UTC)
        async with self.pool.acquire() as conn, conn.transaction():
            if admit is not None and decoded:
                decoded = await admit(conn, decoded, work)
            # after admission: a forgery that came first in the batch cannot shadow the real event
            decoded = _first_of_each(decoded, key)
            fresh = await outbox.claim_inbox(conn, consumer, [key(env) for _, env in decoded])
            decoded = [(rec, env) for rec, env in decoded if key(env) in fresh]
            if decoded:
                await apply(conn, decoded, work, now)
            await repo.record(conn, work.effects, extra=work.dead)

    # -- intake ------------------------------------------------------------
    async def handle_requests(self, records: Sequence[Record]) -> None:
        """Open a case per new request (one transaction for the batch)."""
        await self._handle(records, lambda recs, work: _decode_all(recs, RightsRequested, INTAKE, work), INTAKE,
                           self._open_cases)

    async def _open_cases(self, conn: asyncpg.Connection,
                          decoded: list[tuple[Record, codec.Envelope[RightsRequested]]], work: _Work,
                          now: datetime) -> None:
        existing = await repo.find_request_ids(conn, [(env.data.controller, env.data.request_id)
                                                      for _, env in decoded])
        systems = await active_systems(conn)
        opened: list[Case] = []
        for rec, env in decoded:
            req = env.data
            if (req.controller, req.request_id) in existing:
                case_id = existing[(req.controller, req.request_id)]
                work.effects.timeline.append(Entry(case_id, TimelineKind.duplicate_request,
                                                   {"event_id": env.id, "source": env.source}, now))
                log.info("duplicate request for case %s ignored", case_id)
                continue
            received = req.received_at or env.time
            try:
                due = policy.deadlines(req.right, req.jurisdiction, received,
                                       via_processor=_via_processor(req, systems))
            except policy.UnknownJurisdiction as exc:
                work.dead_letter(rec, INTAKE, "unknown_jurisdiction", str(exc))
                continue
            case, fx = Case.open(req, event_id=env.id, source=env.source, received_at=received,
                                 ack_due_at=due.ack_due_at, due_at=due.due_at, basis=due.basis, systems=systems,
                                 now=now, max_extension_until=due.max_extension_until,
                                 target_at=self._target(req.jurisdiction, received, due.due_at))
            existing[(req.controller, req.request_id)] = case.case_id
            opened.append(case)
            work.effects.extend(fx)
        await repo.insert(conn, opened)

    async def open_case(self, request: RightsRequested, *, by: str, why: str,
                        now: datetime | None = None) -> uuid.UUID:
        """A case with no request from the subject behind it, opened by the DPO: the deletion of an
        under-16 account, data whose retention ran out, a client company's data returned or deleted
        when it leaves. Its identifiers count as verified by ``by``; ``by`` and ``why`` (no personal
        data) are on its first timeline entry. Deadlines run from now, as for any request."""
        now = now or datetime.now(UTC)
        async with self.pool.acquire() as conn, conn.transaction():
            case = await self._open_case_in(conn, request, by=by, why=why, now=now)
        return case.case_id

    async def _open_case_in(self, conn: asyncpg.Connection, request: RightsRequested, *, by: str, why: str,
                            now: datetime) -> Case:
        if not why.strip():
            raise InvalidTransition("say why the case is opened (no personal data)")
        req = RightsRequested.model_validate({
            **request.model_dump(mode="json", exclude_none=True), "channel": "dpo", "verified": False,
            "verification": [{"identifier": str(t), "method": "dpo_opened", "verified_by": by}
                             for t in request.subject.identifiers]})
        if await repo.find_request_ids(conn, [(req.controller, req.request_id)]):
            raise InvalidTransition(f"a case for {req.request_id} exists already")
        systems = await active_systems(conn)
        received = req.received_at or now
        due = policy.deadlines(req.right, req.jurisdiction, received, via_processor=_via_processor(req, systems))
        case, fx = Case.open(req, event_id=f"dpo-{uuid.uuid4()}", source="dsrflow/dpo", received_at=received,
                             ack_due_at=due.ack_due_at, due_at=due.due_at, basis=due.basis, systems=systems,
                             now=now, max_extension_until=due.max_extension_until,
                             opened={"by": by, "why": why.strip()},
                             target_at=self._target(req.jurisdiction, received, due.due_at))
        await repo.insert(conn, [case])
        await repo.record(conn, fx)
        return case

    async def offboard(self, controller: str, *, handover: bool, by: str, why: str,
                       now: datetime | None = None) -> uuid.UUID:
        """A client company (``controller``) leaves the processor that runs dsrflow: one case asks
        every system of that controller to hand over (``handover``) or delete all of its data,
        within ``offboarding_period`` (the processor's promise)."""
        now = now or datetime.now(UTC)
        async with self.pool.acquire() as conn, conn.transaction():
            case = await self._offboard_in(conn, controller, handover=handover, by=by, why=why, now=now)
        return case.case_id

    async def _offboard_in(self, conn: asyncpg.Connection, controller: str, *, handover: bool, by: str, why: str,
                           now: datetime) -> Case:
        if not why.strip():
            raise InvalidTransition("say why the client's data is handed over or deleted (no personal data)")
        if controller == DEFAULT_CONTROLLER:
            raise InvalidTransition("the default controller is the deployment's own: it is never offboarded")
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('offboard:' || $1))", controller)
        open_case = await conn.fetchval("""SELECT right_name FROM cases WHERE controller = $1 AND scope = 'controller'
                                             AND completed_at IS NULL LIMIT 1""", controller)
        if open_case is not None:  # a deletion never overtakes a hand-over still running, nor the reverse
            doing = "handed over" if open_case == "portability" else "deleted"
            raise InvalidTransition(f"controller {controller}'s data is being {doing}: that case finishes first")
        systems = await active_systems(conn)
        if not any(s.controller == controller for s in systems):
            raise InvalidTransition(f"controller {controller} has no registered system")
        mode = "handover" if handover else "delete"
        case, fx = Case.open_offboarding(
            controller=controller, handover=handover, request_id=f"offboard-{controller}-{mode}-{uuid.uuid4().hex[:8]}",
            jurisdiction=self.settings.jurisdiction, by=by, why=why, systems=systems, now=now,
            due_at=now + self.settings.offboarding_period,
            basis=(f"the processor's promise to {'hand over' if handover else 'delete'} all of a client's data "
                   f"when it leaves, within {self.settings.offboarding_period.days} days (its contract; "
                   "DSRFLOW_OFFBOARDING_PERIOD)"))
        await repo.insert(conn, [case])
        await repo.record(conn, fx)
        log.info("controller %s: %s of all its data opened as case %s", controller, mode, case.case_id)
        return case

    def _target(self, jurisdiction: str, received: datetime, due: datetime) -> datetime | None:
        """The organisation's internal target for a case (``settings.internal_target``), if set."""
        spec = self.settings.internal_target
        if not spec:
            return None
        target: datetime = policy.internal_target(jurisdiction, received, due, spec)
        return target

    # -- the DPO's decisions --------------------------------------------------
    async def _decide(self, case_id: uuid.UUID, decide: Callable[[Case, list[SystemDeclaration]], Effects],
                      now: datetime, *, conn: asyncpg.Connection | None = None, controller: str | None = None,
                      decision: str | None = None) -> Case:
        """Load and lock the case, apply ``decide``, settle it, and record it all in one
        transaction (a savepoint inside ``conn``'s, when given). ``controller``: the decider's
        tenant; a case of another controller is not found."""
        if conn is None:
            async with self.pool.acquire() as own:
                return await self._decide(case_id, decide, now, conn=own, controller=controller, decision=decision)
        async with conn.transaction():
            case = (await repo.load(conn, [case_id])).get(case_id)
            if case is None or (controller is not None and not _may_decide(controller, case, decision)):
                raise CaseNotFound(f"no case {case_id}")
            systems = await active_systems(conn)
            fx = decide(case, systems)
            fx.extend(await self._settle(conn, [case], {s.name: s for s in systems}, now))
            await repo.save(conn, [case])
            await repo.record(conn, fx)
        return case

    # -- decisions as signed commands (dsr.commands.v1, and the CLI) ------------------------------
    async def handle_announcements(self, records: Sequence[Record]) -> None:
        """Record what workers announce on ``dsr.systems.v1`` (see :mod:`.systems`)."""
        from .systems import handle_announcements

        await handle_announcements(self.pool, self.settings, records)

    async def handle_commands(self, records: Sequence[Record]) -> None:
        """Decisions sent on ``dsr.commands.v1`` by a DPO tool: each is checked (its token's
        signature, the actor's role and tenant) and applied in its own transaction, and its result
        (applied, or refused and why) goes to ``dsr.command-results.v1``. Undecodable records are
        dead-lettered."""
        for rec in records:
            try:
                env = codec.decode(rec.value, rec.headers, DecisionCommand)
            except codec.DecodeError as exc:
                work = _Work()
                work.dead_letter(rec, COMMANDS, exc.kind, str(exc))
                # claimed by position, so a batch retried after a later command's outage adds none again
                where_ = (f"kafka:{rec.topic}", f"{rec.partition}@{rec.offset}")
                async with self.pool.acquire() as conn, conn.transaction():
                    if await outbox.claim_inbox(conn, COMMANDS, [where_]):
                        await outbox.add(conn, work.dead)
                continue
            await self.execute(env.data.token, fallback_id=f"{env.source}/{env.id}")

    async def execute(self, token: str, *, fallback_id: str, now: datetime | None = None) -> CommandResult:
        """Verify a command token and apply its decision, once: who decided is the actor of the
        key that signed it. The inbox (by the token's jti) makes a redelivered command a no-op
        that reports its first result's acceptance again; the result is published through the
        outbox with the decision's effects, in the same transaction."""
        async with self.pool.acquire() as conn:
            now = now or await db_now(conn)
            try:
                who = await auth.verify_command(conn, token, now=now)
            except auth.AuthError as exc:
                log.warning("command refused: %s", exc.reason_code)
                return await self._result(conn, CommandResult(
                    command_id=fallback_id[:128], accepted=False, error_type=f"auth.{exc.reason_code}",
                    error=str(exc)[:2000], at=now), claim=("unauthenticated", fallback_id))
            command_id = str(who.command_id)
            decision = str(who.cmd.get("decision"))[:64] if isinstance(who.cmd.get("decision"), str) else None
            base: dict[str, Any] = {"command_id": command_id, "actor": who.actor, "decision": decision, "at": now,
                                    "controller": who.tenant}
            claim = (f"actor:{who.actor}", command_id)  # a rotated key re-signing the same command changes nothing
            try:
                cmd = commands.parse_command(who.cmd)
                commands.check_role(who.role, cmd)
            except commands.CommandError as exc:
                return await self._result(conn, CommandResult(
                    **base, accepted=False, error_type="not_allowed" if isinstance(exc, commands.NotAllowed)
                    else "invalid_command", error=str(exc)[:2000]), claim=claim)
            async with conn.transaction():
                if not await outbox.claim_inbox(conn, COMMANDS, [claim]):
                    log.info("command %s seen already", command_id)
                    return await self._first_result(conn, command_id, base, actor=who.actor)
                try:
                    case = await self._apply(conn, cmd, by=who.actor, tenant=who.tenant, now=now)
                except (CaseError, policy.UnsupportedRight, policy.UnknownJurisdiction,
                        registry.SystemDecisionError, registry.SystemOwnedElsewhere) as exc:
                    result = CommandResult(**base, accepted=False, error_type=type(exc).__name__, error=str(exc)[:2000],
                                           case_id=getattr(cmd, "case_id", None))
                else:
                    result = CommandResult(**base, accepted=True, case_id=case.case_id if case else None,
                                           case_status=case.status if case else None)
                await outbox.add(conn, [outbox.message(topics.COMMAND_RESULTS, command_id, result, source=SOURCE,
                                                       subject=command_id)])
            log.info("command %s (%s by %s): %s", command_id, decision, who.actor,
                     "applied" if result.accepted else result.error_type)
            return result

    @staticmethod
    async def _first_result(conn: asyncpg.Connection, command_id: str, base: dict[str, Any], *,
                            actor: str | None) -> CommandResult:
        """A command received again: the result it got the first time (while the outbox keeps it),
        if it was the same actor's; never another actor's."""
        rows = await conn.fetch("SELECT value FROM outbox WHERE topic = $1 AND key = $2 ORDER BY id",
                                topics.COMMAND_RESULTS, command_id.encode())
        for row in rows:
            first = CommandResult.model_validate_json(bytes(row["value"]))
            if first.actor == actor:
                return first
        return CommandResult(**{**base, "accepted": False, "error_type": "duplicate",
                                "error": "this command was received before; its first result stands"})

    async def _result(self, conn: asyncpg.Connection, result: CommandResult,
                      claim: tuple[str, str]) -> CommandResult:
        """Publish a refused command's result, once per claim (its source and id)."""
        async with conn.transaction():
            if not await outbox.claim_inbox(conn, COMMANDS, [claim]):
                return await self._first_result(conn, result.command_id, result.model_dump(
                    exclude={"accepted", "error_type", "error"}), actor=result.actor)
            await outbox.add(conn, [outbox.message(topics.COMMAND_RESULTS, result.command_id, result, source=SOURCE,
                                                   subject=result.command_id)])
        return result

    async def _apply(self, conn: asyncpg.Connection, cmd: commands.Command, *, by: str, tenant: str,
                     now: datetime) -> Case | None:
        """One decision, inside ``conn``'s transaction (as a savepoint: a refusal undoes only it).
        The case it was about; None for a decision on a system."""
        c = cmd
        if isinstance(c, commands.ApproveSystem | commands.RefuseSystem):
            async with conn.transaction():
                if isinstance(c, commands.ApproveSystem):
                    await registry.approve(conn, c.system, c.digest, by=by, tenant=tenant)
                else:
                    await registry.refuse(conn, c.system, c.digest, by=by, tenant=tenant, reason=c.reason)
            return None  # an approved system's open cases are planned by the next sweep (plan_new_systems)
        if isinstance(c, commands.Offboard):
            if tenant not in (c.controller, DEFAULT_CONTROLLER):
                raise InvalidTransition(f"an actor of controller {tenant!r} cannot offboard {c.controller!r}")
            async with conn.transaction():
                return await self._offboard_in(conn, c.controller, handover=c.mode == "handover", by=by, why=c.why,
                                               now=now)
        if isinstance(c, commands.OpenCase):
            if c.request.controller != tenant:
                raise InvalidTransition(f"an actor of controller {tenant!r} opens cases of that controller only")
            async with conn.transaction():
                return await self._open_case_in(conn, c.request, by=by, why=c.why, now=now)

        def decide(case: Case, systems: list[SystemDeclaration]) -> Effects:
            if isinstance(c, commands.Verify):
                return case.verify(by=by, systems=systems, now=now, identifiers=c.identifiers, method=c.method)
            if isinstance(c, commands.Deny):
                return self._deny(case, by=by, ground=c.ground, reason=c.reason, now=now)
            if isinstance(c, commands.Extend):
                return self._extend(case, systems, by=by, reason=c.reason, until=c.until, now=now)
            if isinstance(c, commands.Hold):
                return case.hold_case(by=by, kind=c.kind, reason=c.reason, now=now)
            if isinstance(c, commands.Release):
                return case.release(by=by, now=now)
            if isinstance(c, commands.Lift):
                return case.lift(by=by, systems=systems, now=now)
            if isinstance(c, commands.RetryTask):
                return case.retry_task(c.task_id, by=by, systems=systems, now=now)
            if isinstance(c, commands.SkipTask):
                return case.skip_task(c.task_id, by=by, reason=c.reason, now=now)
            if isinstance(c, commands.ReassignTask):
                return case.reassign_task(c.task_id, by=by, reason=c.reason, systems=systems, now=now,
                                          to_system=c.to_system, to_person=c.to_person)
            if isinstance(c, commands.CompleteTask):
                return case.resolve_manual(c.task_id, by=by, resolution=TaskStatus(c.resolution), note=c.note,
                                           now=now)
            if isinstance(c, commands.DeclineTask):
                return case.resolve_manual(c.task_id, by=by, resolution=TaskStatus.refused, note=c.note, now=now)
            raise InvalidTransition(f"unknown decision {c.decision}")

        return await self._decide(c.case_id, decide, now, conn=conn, controller=tenant, decision=c.decision)

    async def verify(self, case_id: uuid.UUID, *, by: str, identifiers: Sequence[str] | None = None,
                     now: datetime | None = None) -> CaseStatus:
        """Record that the subject's identity (``identifiers``: which ones; default every one the
        request gave) and any representative's authority were verified, and fan the case out.

        Raises :class:`CaseNotFound`, or :class:`InvalidTransition` unless the case is awaiting
        verification."""
        now = now or datetime.now(UTC)
        case = await self._decide(case_id, lambda c, systems: c.verify(
            by=by, systems=systems, now=now, identifiers=identifiers), now)  # type: ignore[arg-type]
        log.info("case %s verified; %s", case_id, case.status)
        return case.status

    async def resolve_manual_task(self, case_id: uuid.UUID, task_id: uuid.UUID, *, by: str, resolution: TaskStatus,
                                  note: str, now: datetime | None = None) -> CaseStatus:
        """A person completed (``succeeded`` / ``not_found``) or declined (``refused``) a manual task."""
        now = now or datetime.now(UTC)
        case = await self._decide(case_id, lambda c, _: c.resolve_manual(
            task_id, by=by, resolution=resolution, note=note, now=now), now)
        return case.status

    async def extend_deadline(self, case_id: uuid.UUID, *, by: str, reason: str, until: date | None = None,
                              now: datetime | None = None) -> datetime:
        """The one extension the law allows, with reasons, to the end of ``until`` in the case's
        jurisdiction (default: the latest the law allows); returns the new due date."""
        now = now or datetime.now(UTC)
        case = await self._decide(case_id, lambda c, systems: self._extend(
            c, systems, by=by, reason=reason, until=until, now=now), now)
        return case.due_at

    @staticmethod
    def _extend(c: Case, systems: Sequence[SystemDeclaration], *, by: str, reason: str, until: date | None,
                now: datetime) -> Effects:
        if c.max_extension_until is None and c.original_due_at is None:
            # a case opened before the maximum was recorded at intake: work it out as intake would
            by_name = {s.name: s for s in systems}
            via = any(by_name[t.system].operated_by != "controller" for t in c.tasks if t.system in by_name)
            c.max_extension_until = policy.deadlines(c.right, c.jurisdiction, c.received_at,
                                                     via_processor=via).max_extension_until
        end = None
        if until is not None:
            tz = ZoneInfo(policy.rules(c.jurisdiction).timezone)
            end = datetime.combine(until, time.max, tzinfo=tz).astimezone(UTC)
        return c.extend(by=by, reason=reason, until=end, now=now)

    async def deny(self, case_id: uuid.UUID, *, by: str, ground: str, reason: str,
                   now: datetime | None = None) -> CaseStatus:
        """Refuse a request on a ground of its jurisdiction's data file, with reasons."""
        now = now or datetime.now(UTC)
        case = await self._decide(case_id, lambda c, _: self._deny(c, by=by, ground=ground, reason=reason, now=now),
                                  now)
        return case.status

    @staticmethod
    def _deny(c: Case, *, by: str, ground: str, reason: str, now: datetime) -> Effects:
        try:
            found = policy.denial_ground(c.jurisdiction, ground, c.right)
        except policy.UnsupportedRight as exc:
            raise InvalidTransition(str(exc)) from None
        return c.deny(by=by, ground=ground, basis=found.basis, reason=reason, now=now)

    async def hold(self, case_id: uuid.UUID, *, by: str, kind: str, reason: str,
                   now: datetime | None = None) -> CaseStatus:
        """Put an open case on hold (legal hold, suspected fraud)."""
        now = now or datetime.now(UTC)
        case = await self._decide(case_id, lambda c, _: c.hold_case(by=by, kind=kind, reason=reason, now=now), now)
        return case.status

    async def release(self, case_id: uuid.UUID, *, by: str, now: datetime | None = None) -> CaseStatus:
        """End a hold; the case goes on where it stopped."""
        now = now or datetime.now(UTC)
        case = await self._decide(case_id, lambda c, _: c.release(by=by, now=now), now)
        return case.status

    async def skip_task(self, case_id: uuid.UUID, task_id: uuid.UUID, *, by: str, reason: str,
                        now: datetime | None = None) -> CaseStatus:
        """The DPO skips an open task, with a reason."""
        now = now or datetime.now(UTC)
        case = await self._decide(case_id, lambda c, _: c.skip_task(task_id, by=by, reason=reason, now=now), now)
        return case.status

    async def retry_task(self, case_id: uuid.UUID, task_id: uuid.UUID, *, by: str,
                         now: datetime | None = None) -> CaseStatus:
        """The DPO sends a stalled, failed or conflicting task again."""
        now = now or datetime.now(UTC)
        case = await self._decide(case_id, lambda c, systems: c.retry_task(task_id, by=by, systems=systems, now=now),
                                  now)
        return case.status

    async def reassign_task(self, case_id: uuid.UUID, task_id: uuid.UUID, *, by: str, reason: str,
                            to_system: str | None = None, to_person: str | None = None,
                            now: datetime | None = None) -> CaseStatus:
        """The DPO gives a task to another system of the case's controller, or to a person."""
        now = now or datetime.now(UTC)
        case = await self._decide(case_id, lambda c, systems: c.reassign_task(
            task_id, by=by, reason=reason, systems=systems, now=now, to_system=to_system, to_person=to_person), now)
        return case.status

    async def lift_restriction(self, case_id: uuid.UUID, *, by: str, now: datetime | None = None) -> CaseStatus:
        """Lift the restriction (or objection) a case put in place: each system that restricted is
        asked to lift it."""
        now = now or datetime.now(UTC)
        case = await self._decide(case_id, lambda c, systems: c.lift(by=by, systems=systems, now=now), now)
        return case.status

    # -- aggregation ---------------------------------------------------------
    async def handle_receipts(self, records: Sequence[Record]) -> None:
        """Apply new receipts to their tasks and close finished cases, and record the progress
        workers report on long tasks (both arrive on ``dsr.receipts.v1``, told apart by their
        ``ce_type``): decoded (bad records, and other types, are dead-lettered), admitted by their
        system's signature, claimed in the inbox and applied in their order, in one transaction
        for the batch."""
        await self._handle(records, _decode_on_receipts, AGGREGATOR, self._apply_receipts, admit=self._signed,
                           key=_receipt_key)

    async def _signed(self, conn: asyncpg.Connection, decoded: list[tuple[Record, codec.Envelope[Any]]],
                      work: _Work) -> list[tuple[Record, codec.Envelope[Any]]]:
        """Receipts and progress of a system that has keys must be signed by one of them
        (dsrflow.signing, as a receipt); with ``require_signed_receipts``, every system's must.
        Others are dead-lettered, both as ``unauthenticated_receipt`` (one kind to watch for)."""
        keys = await signing.system_keys(conn, {env.data.system for _, env in decoded})
        out = []
        for rec, env in decoded:
            own = keys.get(env.data.system)
            if own is None and not self.settings.require_signed_receipts:
                out.append((rec, env))
                continue
            try:
                signing.verify_headers(own or {}, rec.headers, ce_id=env.id, ce_source=env.source,
                                       value=rec.value or b"")
            except signing.SignatureError as exc:
                what = "progress of " if isinstance(env.data, TaskProgress) else ""
                work.dead_letter(rec, AGGREGATOR, "unauthenticated_receipt", f"{what}system {env.data.system}: {exc}")
                continue
            out.append((rec, env))
        return out

    async def _apply_receipts(self, conn: asyncpg.Connection,
                              decoded: list[tuple[Record, codec.Envelope[TaskReceipt | TaskProgress]]], work: _Work,
                              now: datetime) -> None:
        """Receipts and progress in the order they came. A progress only ever records itself on its
        task: no timeline entry, no event, no settling; when it does not fit (an unknown task,
        another attempt, a task no longer dispatched, an older one) it is late, not invalid, and is
        ignored with a log line."""
        cases = await repo.load(conn, [env.data.case_id for _, env in decoded])
        systems = {s.name: s for s in await active_systems(conn)}
        receipt_rows = []
        touched: dict[uuid.UUID, Case] = {}
        for rec, env in decoded:
            r = env.data
            case = cases.get(r.case_id)
            if isinstance(r, TaskProgress):
                why = f"no case {r.case_id}" if case is None else case.apply_progress(r, now=now)
                if why is not None:
                    named = case.task(r.task_id) if case is not None else None
                    # another system's task: not late, but a system's key speaking for a task not its own
                    level = logging.WARNING if named is not None and named.system != r.system else logging.INFO
                    log.log(level, "progress of system %s ignored: %s", r.system, why)
                continue
            try:
                if case is None:
                    raise InvalidTransition(f"no task {r.task_id} for case {r.case_id} in system {r.system}")
                fx = case.apply_receipt(r, max_attempts=self.settings.max_task_attempts, systems=systems, now=now)
            except InvalidTransition as exc:
                work.dead_letter(rec, AGGREGATOR, "unknown_task", str(exc))
                continue
            receipt_rows.append((env.id, r.task_id, r.case_id, r.system, r.attempt, str(r.status),
                                 orjson.dumps(r.model_dump(mode="json", exclude_none=True)).decode()))
            work.effects.extend(fx)
            touched[case.case_id] = case
        await conn.executemany(
            """INSERT INTO receipts (event_id, task_id, case_id, system, attempt, status, body)
               VALUES ($1,$2,$3,$4,$5,$6,$7::jsonb) ON CONFLICT DO NOTHING""",
            receipt_rows,
        )
        work.effects.extend(await self._settle(conn, list(touched.values()), systems, now))
        await self._drop_late_exports(conn, decoded)
        await repo.save(conn, cases.values())  # the cases receipts touched, and the progress recorded

    async def _drop_late_exports(self, conn: asyncpg.Connection,
                                 decoded: Sequence[tuple[Record, codec.Envelope[Any]]]) -> None:
        """Exports a late receipt names for a finished case whose copies already expired (a task
        skipped, done by its system after all): nothing will ever bundle or expire them, so they go
        now. A case that is open again keeps them: its new bundle is built from them."""
        late = [(env.data.case_id, env.data.system, a.ref) for _, env in decoded if isinstance(env.data, TaskReceipt)
                for a in env.data.artifacts]
        if not late:
            return
        expired = {r["case_id"]: r["controller"] for r in await conn.fetch(
            "SELECT case_id, controller FROM cases WHERE case_id = ANY($1::uuid[]) AND exports_deleted_at IS NOT NULL "
            "AND completed_at IS NOT NULL AND exports_deleted_at >= completed_at", sorted({c for c, _, _ in late}))}
        # only under the receipt's own system's part for that case: a receipt never deletes what is not its own
        refs = [ref for case_id, system, ref in late if case_id in expired
                and ref.startswith(system_case_prefix(system, case_id, expired[case_id]))]
        if refs:
            removed = await asyncio.to_thread(lambda: sum(self.exports.delete(ref) for ref in refs))
            log.info("deleted %d export(s) that late receipts named for cases whose copies had expired", removed)

    async def _settle(self, conn: asyncpg.Connection, cases: Sequence[Case], systems: Mapping[str, SystemDeclaration],
                      now: datetime) -> Effects:
        """Finish the cases whose every task is done (building access bundles side by side: each is
        file I/O with an fsync); refresh the outcome of finished cases whose later tasks moved; tell
        the DPO's tools about the others."""
        fx = Effects()
        finishing = [(c, s) for c in cases if (s := c.settle()) is not None]
        bundles = await asyncio.gather(*(self._bundle(c, s, systems) for c, s in finishing), return_exceptions=True)
        for (case, status), bundle in zip(finishing, bundles, strict=True):
            if isinstance(bundle, BaseException) and not isinstance(bundle, ExportError):
                raise bundle  # the export store is away, say: the batch is retried, the case not failed
            if isinstance(bundle, BaseException):  # a bad artifact fails the case, not the coordinator
                fx.extend(case.finish(status, now=now, systems=systems,
                                      bundle_error=f"{type(bundle).__name__}: {bundle}"))
            else:
                fx.extend(case.finish(status, now=now, systems=systems, bundle=bundle))
            if case.scope == "controller" and case.right == Right.erasure and case.outcome is not None:
                # the client company's data is gone from its systems: dsrflow's own copies go too
                # (the hand-over's exports and package), and the outcome says what is left
                prefix = controller_prefix(case.controller)
                deleted = await asyncio.to_thread(self.exports.delete_prefix, prefix)
                case.outcome["dsrflow_exports"] = {"prefix": prefix, "deleted": deleted}
            from .erasure import after_erasure  # a person's erasure: suppression list, earlier copies deleted

            fx.extend(await after_erasure(conn, case, systems, now, settings=self.settings, exports=self.exports))
            log.info("case %s %s", case.case_id, case.status)
        done = {c.case_id for c, _ in finishing}
        for case in cases:
            if case.case_id in done:
                continue
            if case.status in (CaseStatus.completed, CaseStatus.completed_with_exceptions, CaseStatus.failed):
                if any(t.dirty for t in case.tasks):
                    fx.extend(case.refresh_outcome(now=now, systems=systems))
            elif any(t.dirty for t in case.tasks):
                fx.events.append(case.case_event(now))
        return fx

    async def _bundle(self, case: Case, status: CaseStatus,
                      systems: Mapping[str, SystemDeclaration] | None = None) -> Artifact | None:
        """The access bundle of a finished access or portability case (None for other rights)."""
        if not case.needs_bundle or status == CaseStatus.failed:
            return None
        # only what a system exported in full: a conflict's, failure's or refusal's artifacts may hold
        # another person's data, and the bundle lists those systems as withheld
        parts = [(t.system, Artifact.model_validate(a)) for t in sorted(case.tasks, key=lambda t: t.system)
                 if t.status == TaskStatus.succeeded for a in (t.result or {}).get("artifacts", [])]
        for system, artifact in parts:
            # A receipt may only bring its own system's exports for this case into the bundle.
            legacy = f"{controller_prefix(case.controller)}cases/{case.case_id}/{system}/"  # before per-system parts
            if not artifact.ref.startswith((system_case_prefix(system, case.case_id, case.controller), legacy)):
                raise BundleError(f"export of system {system!r} is not one of this case's: {artifact.ref}")
        return await asyncio.to_thread(
            build_bundle, self.exports, case_id=case.case_id, request_id=case.request_id, parts=parts,
            controller=case.controller, right=str(case.right), declarations=systems,
            systems_without_data=sorted(t.system for t in case.tasks if t.status == TaskStatus.not_found),
            withheld=[Withheld(t.system, "manual" if manual else str(t.status), t.note if manual else None,
                               tuple((t.result or {}).get("retained", [])))
                      for t in case.tasks if (manual := t.kind == TaskKind.manual and t.status == TaskStatus.succeeded)
                      or t.status not in (TaskStatus.succeeded, TaskStatus.not_found)],
        )

    # -- timers --------------------------------------------------------------
    async def sweep_stalled(self, now: datetime | None = None, *, limit: int = 500) -> int:
        """Re-send tasks whose wait for a receipt ran out (``task_timeout``, doubled with every
        attempt up to ``task_backoff_max``, counted from when the task was sent or from the latest
        progress its worker reported, whichever is later: a task that keeps reporting progress is
        left to run); once a case's deadline nears (its warning point, see :meth:`watch_deadlines`)
        and a task was sent ``max_task_attempts`` times, mark it stalled instead and alert the DPO.
        A late receipt still completes a stalled task. Times are the database's clock unless
        ``now`` is given. Returns how many tasks changed."""
        timeout, cap = self.settings.task_timeout, self.settings.task_backoff_max
        async with self.pool.acquire() as conn, conn.transaction():
            now = now or await db_now(conn)
            ids = await repo.stale_cases(conn, now, timeout, cap, limit)
            if not ids:
                return 0
            cases = await repo.load(conn, ids, skip_locked=True)
            systems = {s.name: s for s in await active_systems(conn)}
            fx = Effects()
            changed = 0
            for case in cases.values():
                near = now >= case.warn_at(self.settings.deadline_warning_share)
                for task in case.tasks:
                    since = task.waiting_since  # sent, or its latest progress: a task still progressing waits
                    if (task.status == TaskStatus.dispatched and since is not None
                            and since + repo.task_wait(timeout, cap, task.attempt) < now):
                        # every task is sent max_task_attempts times at least (one planned late for a
                        # lasting effect, long after its case's deadline, too); then only until it nears
                        surface = near and task.attempt >= self.settings.max_task_attempts
                        moved = case.time_out(task, systems=systems, now=now, surface=surface)
                        changed += bool(moved.timeline)
                        fx.extend(moved)
                        if task.status != TaskStatus.dispatched:  # stalled and surfaced
                            log.warning("task %s of case %s stalled after %d attempts: the DPO is alerted",
                                        task.task_id, case.case_id, task.attempt)
            fx.extend(await self._settle(conn, list(cases.values()), systems, now))
            await repo.save(conn, cases.values())
            await repo.record(conn, fx)
            return changed

    async def watch_deadlines(self, now: datetime | None = None, *, limit: int = 500) -> int:
        """The deadline watcher: for open cases (held ones too), a warning once
        ``deadline_warning_share`` of the time is gone, a note when the internal target passes, an
        overdue alert after the due date; each once, on the timeline and on ``dsr.alerts.v1``.
        Times are the database's clock unless ``now`` is given. Returns how many cases had news."""
        async with self.pool.acquire() as conn, conn.transaction():
            now = now or await db_now(conn)
            ids = await repo.cases_to_watch(conn, now, self.settings.deadline_warning_share, limit)
            if not ids:
                return 0
            cases = await repo.load(conn, ids, skip_locked=True)
            fx = Effects()
            news = 0
            for case in cases.values():
                seen = case.watch(now, warning_share=self.settings.deadline_warning_share)
                news += bool(seen.timeline)
                fx.extend(seen)
            await repo.save(conn, cases.values())
            await repo.record(conn, fx)
            return news

    async def plan_new_systems(self, now: datetime | None = None, *, limit: int = 500) -> int:
        """Give systems registered after a case was planned their tasks: open cases, and finished
        cases whose lasting effect (restriction, opt-out, ...) is still in force. Returns how many
        cases were looked at."""
        now = now or datetime.now(UTC)
        async with self.pool.acquire() as conn, conn.transaction():
            systems = await active_systems(conn)
            ids = await repo.unplanned_cases(conn, [s.name for s in systems], [str(r) for r in LASTING],
                                             [str(r) for r in ACTION_FOR_RIGHT], limit)
            if not ids:
                return 0
            cases = await repo.load(conn, ids, skip_locked=True)
            fx = Effects()
            for case in cases.values():
                fx.extend(case.plan_new_systems(systems, now))
            fx.extend(await self._settle(conn, list(cases.values()), {s.name: s for s in systems}, now))
            await repo.save(conn, cases.values())
            await repo.record(conn, fx)
            return len(cases)

    async def pseudonymise_closed(self, now: datetime | None = None, *, limit: int = 500) -> int:
        """Pseudonymise closed cases older than ``case_data_retention`` (unset: none): their
        identifiers, corrections and notes are replaced, their evidence stays. Returns how many."""
        retention = self.settings.case_data_retention
        if retention is None:
            return 0
        secret = self.settings.pseudonym_key
        key = secret.get_secret_value().encode() if secret is not None else None
        async with self.pool.acquire() as conn, conn.transaction():
            now = now or await db_now(conn)
            ids = await repo.cases_to_pseudonymise(conn, now - retention, [str(r) for r in LASTING], limit)
            cases = await repo.load(conn, ids, skip_locked=True)
            fx = Effects()
            done = 0
            for case in cases.values():
                try:
                    fx.extend(case.pseudonymise(now, key=key))
                    done += 1
                except InvalidTransition:
                    continue  # an open task came back (a retry), say: next time
            await repo.save(conn, cases.values())
            await repo.record(conn, fx)
        if done:
            log.info("pseudonymised %d closed case(s)", done)
        return done

    async def prune(self, now: datetime | None = None) -> tuple[int, int]:
        """Delete outbox rows sent longer ago than ``outbox_retention`` and inbox ids older than
        ``inbox_retention`` (which must outlast the topics' retention, or a replay could repeat an
        effect). Returns (outbox rows, inbox rows) deleted."""
        from .retention import expire_exports  # and access bundles and their exports past bundle_retention

        if now is None:
            async with self.pool.acquire() as conn:
                now = await db_now(conn)  # the database's clock, as every other timer's
        try:
            await expire_exports(self.pool, self.exports, self.settings.bundle_retention, now)
        except Exception as exc:  # noqa: BLE001 - expiry must not stop the pruning below; the next sweep retries
            log.warning("expiring bundles failed (%s); the next sweep retries", type(exc).__name__)
        async with self.pool.acquire() as conn:
            sent = await conn.execute("DELETE FROM outbox WHERE sent_at < $1", now - self.settings.outbox_retention)
            seen = await conn.execute("DELETE FROM inbox WHERE processed_at < $1", now - self.settings.inbox_retention)
        return int(sent.split()[-1]), int(seen.split()[-1])


#: What the processor's own actors (the default controller's) may do on a client's offboarding case.
_OFFBOARDING_WORK = frozenset({"retry_task", "skip_task", "reassign_task", "complete_task", "decline_task"})


def _may_decide(tenant: str, case: Case, decision: str | None) -> bool:
    """An actor decides on its own controller's cases; the default controller's actors (the
    processor that runs dsrflow) also carry out a client company's offboarding: its tasks only."""
    return case.controller == tenant or (case.scope == "controller" and tenant == DEFAULT_CONTROLLER
                                         and decision in _OFFBOARDING_WORK)


async def db_now(conn: asyncpg.Connection) -> datetime:
    """The database's clock: every coordinator instance times cases by the same clock."""
    now: datetime = await conn.fetchval("SELECT now()")
    return now


def _via_processor(req: RightsRequested, systems: Sequence[SystemDeclaration]) -> bool:
    """Whether a system operated by a processor or third party would act on this request: the law
    then gives the longer via-processor period where it has one."""
    systems = [s for s in systems if s.controller == req.controller]
    asked = {t.system for t in planner.plan_for(req.right, req.subject.identifiers, systems,
                                                verified=req.verified_types() or req.subject.identifiers.keys(),
                                                changes=req.changes, purposes=req.purposes).tasks}
    return any(s.operated_by != "controller" for s in systems if s.name in asked)
