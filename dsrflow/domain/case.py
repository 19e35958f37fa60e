"""A case and its tasks, with one method per transition. Pure: no I/O.

Each transition changes the case in memory and returns :class:`Effects`: the timeline entries to
append and the events to publish (through the outbox). The coordinator loads the cases a batch
touches, calls these methods, and records the case, its tasks and the effects in one transaction
with the inbox claim (:mod:`dsrflow.store.cases`). Building an access bundle is I/O, so it sits
between :meth:`Case.settle` (is the case finished, and how?) and :meth:`Case.finish`.

States (:class:`~dsrflow.rights.CaseStatus`)::

    received ──open──▶ awaiting_verification ──verify──▶ in_progress ──settle/finish──▶ completed
                  └──────────────────────────────────────▶ in_progress                 completed_with_exceptions
                  └──▶ completed (information answered, nothing to ask)                 failed

Tasks (:class:`~dsrflow.rights.TaskStatus`): a worker task is ``dispatched`` until its worker's
receipt makes it succeeded / not_found / retained / conflict / refused / failed (a retryable
failure is sent again), or the sweep finds it silent and re-sends it, then marks it ``stalled``.
A long task's worker reports progress meanwhile (:meth:`Case.apply_progress`): the sweep counts
its silence from the latest progress, and a re-dispatch clears it.
A manual task waits in ``manual`` for a person to complete or decline it.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .. import topics
from ..errors import DsrflowError
from ..events import (
    DEFAULT_CONTROLLER,
    Artifact,
    CaseAlert,
    CaseUpdated,
    Event,
    NoticeBundle,
    NoticeRetained,
    NoticeSystem,
    RightsRequested,
    SubjectNotice,
    TaskAssigned,
    TaskProgress,
    TaskReceipt,
)
from ..registry import SystemDeclaration
from ..rights import (
    ACTION_FOR_RIGHT,
    LASTING,
    NO_VERIFICATION,
    TERMINAL_CASE,
    TERMINAL_TASK,
    Action,
    CaseStatus,
    IdentifierType,
    ReceiptStatus,
    Right,
    TaskStatus,
)
from .planner import UNVERIFIED_REASON, Plan, PlannedTask, TaskKind, outcome, plan_for
from .timeline import Entry, TimelineKind

__all__ = ["Case", "CaseError", "Effects", "InvalidTransition", "Task", "TaskKind", "information_answer"]

#: Rights whose finished case carries an access bundle.
BUNDLED: frozenset[Right] = frozenset({Right.access, Right.portability})
#: Kinds of hold: a legal hold (litigation, an authority's order), or suspected fraud (a request
#: that may come from someone else, as when a provider suspends email-based requests).
HOLD_KINDS = ("legal_hold", "suspected_fraud")
#: Rights a restriction can be lifted from.
LIFTABLE: frozenset[Right] = frozenset({Right.restriction, Right.objection})
#: Namespace of the stable ids of notices and alerts (uuid5 of case, kind and what it is about).
_IDS = uuid.UUID("5b1e0b0e-4d2b-4a43-9a4e-6f0d2c1d7a11")


class CaseError(DsrflowError):
    """A transition the case refuses. The message holds no personal data."""


class InvalidTransition(CaseError, ValueError):
    """The case (or task) is not in a state that allows the requested change."""


@dataclass(slots=True)
class Effects:
    """What a transition causes besides the new state: timeline entries and outgoing events."""

    timeline: list[Entry] = field(default_factory=list)
    #: (topic, key, event)
    events: list[tuple[str, str, Event]] = field(default_factory=list)

    def extend(self, other: Effects) -> Effects:
        self.timeline += other.timeline
        self.events += other.events
        return self


@dataclass(slots=True)
class Task:
    task_id: uuid.UUID
    case_id: uuid.UUID
    system: str
    action: Action
    status: TaskStatus
    kind: TaskKind = TaskKind.worker
    attempt: int = 1
    dispatched_at: datetime | None = None
    completed_at: datetime | None = None
    #: counts, categories, retained, artifacts of the receipt that settled it
    result: dict[str, Any] | None = None
    error: str | None = None
    reason: str | None = None
    changes: dict[str, str] | None = None
    decided_by: str | None = None
    note: str | None = None
    #: the person a manual task is assigned to (an actor), if any
    assignee: str | None = None
    #: the latest progress its worker reported for the current attempt: {attempt, seq, done, total,
    #: note}; and when the coordinator recorded it. A re-dispatch clears both.
    progress: dict[str, Any] | None = None
    progress_at: datetime | None = None
    #: touched by the transition in hand: the store writes it
    dirty: bool = field(default=False, compare=False)
    #: only its progress changed (no timeline entry, no case event): the store writes that alone
    progressed: bool = field(default=False, compare=False)

    @property
    def label(self) -> str:
        """The task's name in a case's summary: the system, plus the action when it is a lift."""
        return self.system if self.action != Action.lift_restriction else f"{self.system}:{self.action}"

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_TASK

    @property
    def waiting_since(self) -> datetime | None:
        """Where its wait for a receipt counts from: when it was sent, or its latest progress."""
        if self.dispatched_at is None or self.progress_at is None:
            return self.dispatched_at
        return max(self.dispatched_at, self.progress_at)

    def _send(self, now: datetime) -> None:
        """Sent (again) now: its wait starts over, and an earlier attempt's progress counts no more."""
        self.dispatched_at, self.progress, self.progress_at = now, None, None


@dataclass(slots=True)
class Case:
    case_id: uuid.UUID
    request_id: str
    request_event: str
    right: Right
    jurisdiction: str
    status: CaseStatus
    subject: dict[IdentifierType, str]
    received_at: datetime
    ack_due_at: datetime
    due_at: datetime
    #: [{identifier, method, verified_by, verified_at}]: which identifiers were verified, how, by whom
    verification: list[dict[str, Any]] = field(default_factory=list)
    requester: dict[str, Any] | None = None
    channel: str | None = None
    changes: dict[str, str] | None = None
    purposes: list[str] | None = None
    completed_at: datetime | None = None
    outcome: dict[str, Any] | None = None
    bundle: Artifact | None = None
    lifted_at: datetime | None = None
    #: the latest due date the law's one extension allows (None: no extension allowed)
    max_extension_until: datetime | None = None
    #: the due date before the extension, and the extension's {by, reason, at}
    original_due_at: datetime | None = None
    extension: dict[str, Any] | None = None
    #: a hold in force: {kind, reason, by, at, resumes (the status it returns to)}
    hold: dict[str, Any] | None = None
    #: a case the DPO opened with no request: {by, why}. The reason is kept here, where it can be
    #: pseudonymised later, not in the append-only timeline (which keeps its hash).
    opened: dict[str, str] | None = None
    #: systems this case's planning has looked at (asked or not), so a sweep plans a system once
    considered: list[str] = field(default_factory=list)
    #: the controller (tenant) the request was made to: only its systems are asked
    controller: str = DEFAULT_CONTROLLER
    #: when the subject was told the request arrived (the acknowledged notice)
    acknowledged_at: datetime | None = None
    #: the organisation's internal target, earlier than due_at (None: none set)
    target_at: datetime | None = None
    #: when the deadline watcher warned, saw the internal target pass, saw the case overdue
    warned_at: datetime | None = None
    target_passed_at: datetime | None = None
    overdue_at: datetime | None = None
    #: when the subject's identifiers, corrections and notes were replaced (closed cases only)
    pseudonymised_at: datetime | None = None
    #: subject: a person's request; controller: a client company leaving (all of its data)
    scope: str = "subject"
    tasks: list[Task] = field(default_factory=list)
    dirty: bool = field(default=False, compare=False)

    # -- reading ---------------------------------------------------------
    @property
    def verified_types(self) -> frozenset[IdentifierType]:
        return frozenset(IdentifierType(v["identifier"]) for v in self.verification)

    @property
    def verified(self) -> bool:
        return bool(self.verification)

    @property
    def representative_unverified(self) -> bool:
        r = self.requester
        return bool(r) and r.get("relationship", "self") != "self" and not r.get("verified", False)  # type: ignore[union-attr]

    @property
    def lasting_in_force(self) -> bool:
        """A lasting effect (restriction, opt-out, ...) that reaches systems registered later."""
        return (self.right in LASTING and self.lifted_at is None
                and self.status in (CaseStatus.in_progress, CaseStatus.completed,
                                    CaseStatus.completed_with_exceptions, CaseStatus.failed))

    def task(self, task_id: uuid.UUID) -> Task | None:
        return next((t for t in self.tasks if t.task_id == task_id), None)

    def summary(self) -> dict[str, str]:
        return {t.label: str(t.status) for t in self.tasks}

    def mine(self, systems: Iterable[SystemDeclaration]) -> list[SystemDeclaration]:
        """The systems of this case's controller: no other tenant's system is ever asked."""
        return [s for s in systems if s.controller == self.controller]

    def case_event(self, now: datetime) -> tuple[str, str, Event]:
        event = CaseUpdated(
            case_id=self.case_id, request_id=self.request_id, right=self.right, status=self.status,
            jurisdiction=self.jurisdiction, received_at=self.received_at, due_at=self.due_at, updated_at=now,
            tasks={t.label: t.status for t in self.tasks}, bundle=self.bundle, controller=self.controller,
            target_at=self.target_at, overdue=self.status not in TERMINAL_CASE and now > self.due_at,
        )
        return topics.CASES, str(self.case_id), event

    def notice(self, kind: str, now: datetime, *, key: str = "", **detail: Any) -> tuple[str, str, Event]:
        """A :class:`SubjectNotice` of ``kind`` for this case (``key`` tells apart two notices of one
        kind, such as a second completion after a reopening)."""
        event = SubjectNotice(
            notice_id=uuid.uuid5(_IDS, f"{self.case_id}/notice/{kind}/{key}"), kind=kind,  # type: ignore[arg-type]
            case_id=self.case_id, request_id=self.request_id, controller=self.controller, right=self.right,
            jurisdiction=self.jurisdiction, at=now, due_at=self.due_at, **detail)
        return topics.NOTICES, str(self.case_id), event

    def _tell(self, fx: Effects, kind: str, now: datetime, *, key: str = "", **detail: Any) -> None:
        """Add a notice to the subject to ``fx``, unless the DPO opened the case: nobody asked, so
        there is nobody to tell (the DPO informs the person where the law requires it)."""
        if self.opened is None:
            fx.events.append(self.notice(kind, now, key=key, **detail))

    def alert(self, kind: str, now: datetime, *, task: Task | None = None, key: str = "") -> tuple[str, str, Event]:
        """A :class:`CaseAlert` of ``kind`` for the DPO's tools."""
        span = (self.due_at - self.received_at).total_seconds()
        used = (now - self.received_at).total_seconds() / span if span > 0 else 1.0
        event = CaseAlert(
            alert_id=uuid.uuid5(_IDS, f"{self.case_id}/alert/{kind}/{task.task_id if task else ''}/{key}"),
            kind=kind, case_id=self.case_id, request_id=self.request_id,  # type: ignore[arg-type]
            controller=self.controller, right=self.right, status=self.status, jurisdiction=self.jurisdiction,
            at=now, due_at=self.due_at, target_at=self.target_at, share_used=round(used, 4),
            system=task.system if task else None, task_id=task.task_id if task else None,
            attempts=task.attempt if task else None)
        return topics.ALERTS, str(self.case_id), event

    def task_event(self, task: Task, systems: Mapping[str, SystemDeclaration]) -> tuple[str, str, Event]:
        """The TaskAssigned for ``task``'s current attempt: only the identifier types its system
        searches by, and of those only the ones the case may use."""
        system = systems.get(task.system)
        usable = self._usable()
        ids = {t: usable[t] for t in (system.identifier_types if system else ()) if t in usable}
        event = TaskAssigned(
            task_id=task.task_id, case_id=self.case_id, system=task.system, action=task.action, right=self.right,
            attempt=task.attempt, identifiers=ids, due_at=self.due_at,
            changes=task.changes if task.action == Action.rectify else None, purposes=self.purposes,
            jurisdiction=self.jurisdiction, controller=self.controller, scope=self.scope,  # type: ignore[arg-type]
        )
        return topics.tasks_topic(task.system), str(self.case_id), event

    def _usable(self) -> dict[IdentifierType, str]:
        if self.right in NO_VERIFICATION:
            return dict(self.subject)
        ok = self.verified_types
        return {t: v for t, v in self.subject.items() if t in ok}

    def _not_pseudonymised(self) -> None:
        if self.pseudonymised_at is not None:
            raise InvalidTransition(f"case {self.case_id} was pseudonymised: its identifiers are gone, so nothing "
                                    "is sent again; open a new case")

    def _entry(self, kind: TimelineKind, now: datetime, **detail: Any) -> Entry:
        return Entry(self.case_id, str(kind), detail, now)

    # -- opening -----------------------------------------------------------
    @classmethod
    def open(
        cls, request: RightsRequested, *, event_id: str, source: str, received_at: datetime, ack_due_at: datetime,
        due_at: datetime, basis: str, systems: Sequence[SystemDeclaration], now: datetime,
        case_id: uuid.UUID | None = None, max_extension_until: datetime | None = None,
        opened: dict[str, str] | None = None, target_at: datetime | None = None,
    ) -> tuple[Case, Effects]:
        """A new case for ``request``: received and acknowledged (the subject is told, and the
        acknowledgement is recorded against its deadline), then waiting for verification (the
        subject is told what is needed), fanned out, or (an information request, or nothing to
        ask) answered at once. Only systems of the request's controller are asked."""
        case = cls(
            case_id=case_id or uuid.uuid4(), request_id=request.request_id, request_event=event_id,
            right=request.right, jurisdiction=request.jurisdiction, status=CaseStatus.received,
            subject=dict(request.subject.identifiers), received_at=received_at, ack_due_at=ack_due_at,
            due_at=due_at, verification=request.verification_record(),
            requester=request.requester.model_dump(mode="json", exclude_none=True) if request.requester else None,
            channel=request.channel, changes=dict(request.changes) if request.changes else None,
            purposes=list(request.purposes) if request.purposes else None, dirty=True,
            max_extension_until=max_extension_until, opened=opened, controller=request.controller,
            target_at=target_at, acknowledged_at=now if opened is None else None,
        )
        fx = Effects([case._entry(TimelineKind.received, now, event_id=event_id, source=source,
                                  right=str(request.right), jurisdiction=request.jurisdiction,
                                  due_at=due_at.isoformat(), ack_due_at=ack_due_at.isoformat(), basis=basis,
                                  verified=sorted(str(t) for t in case.verified_types),
                                  requester=(case.requester or {}).get("relationship", "self"),
                                  **({"opened_by_dpo": {"by": opened["by"], "why_sha256": hashlib.sha256(
                                      opened["why"].encode()).hexdigest()}} if opened else {}))])
        if opened is None:  # a case the DPO opened was asked by nobody: nobody is acknowledged
            on_time = now <= ack_due_at
            fx.timeline.append(case._entry(TimelineKind.acknowledged, now, ack_due_at=ack_due_at.isoformat(),
                                           on_time=on_time))
            case._tell(fx, "acknowledged", now, ack_due_at=ack_due_at, acknowledged_on_time=on_time, basis=basis)
        if case._waits_for_verification():
            case.status = CaseStatus.awaiting_verification
            fx.timeline.append(case._entry(TimelineKind.awaiting_verification, now,
                                           representative=case.representative_unverified))
            needed = (["identity_verification"] if not case.verified_types else []) + (
                ["representative_authority"] if case.representative_unverified else [])
            case._tell(fx, "more_information_needed", now, needed=needed)
            fx.events.append(case.case_event(now))
            return case, fx
        return case, fx.extend(case._fan_out(systems, now))

    @classmethod
    def open_offboarding(
        cls, *, controller: str, handover: bool, request_id: str, jurisdiction: str, by: str, why: str,
        systems: Sequence[SystemDeclaration], now: datetime, due_at: datetime, basis: str,
    ) -> tuple[Case, Effects]:
        """A client company (a controller) leaves the processor that runs dsrflow: every system of
        that controller is asked to hand over (``handover``: export_all, and the case builds the
        package) or delete (erase_all) all of its data; a system whose worker cannot is a person's
        task. Nobody's identifiers are involved. Deadlines are the processor's promise (``basis``)."""
        right = Right.portability if handover else Right.erasure
        case = cls(
            case_id=uuid.uuid4(), request_id=request_id, request_event=f"dpo-{uuid.uuid4()}", right=right,
            jurisdiction=jurisdiction, status=CaseStatus.received, subject={}, received_at=now, ack_due_at=now,
            due_at=due_at, channel="dpo", opened={"by": by, "why": why.strip()}, controller=controller,
            scope="controller", dirty=True,
        )
        fx = Effects([case._entry(TimelineKind.received, now, event_id=case.request_event, source="dsrflow/dpo",
                                  right=str(right), jurisdiction=jurisdiction, due_at=due_at.isoformat(),
                                  ack_due_at=now.isoformat(), basis=basis, verified=[], requester="self",
                                  scope="controller", controller=controller,
                                  opened_by_dpo={"by": by, "why_sha256": hashlib.sha256(
                                      why.strip().encode()).hexdigest()})])
        return case, fx.extend(case._fan_out(systems, now))

    def _waits_for_verification(self) -> bool:
        if self.right in NO_VERIFICATION or self.right == Right.information:
            return False  # an opt-out only suppresses; information comes from the declarations
        return not self.verified_types or self.representative_unverified

    def _fan_out(self, systems: Sequence[SystemDeclaration], now: datetime) -> Effects:
        fx = Effects()
        systems = self.mine(systems)
        self.status = CaseStatus.in_progress
        self.dirty = True
        if self.right == Right.information:
            self.considered = sorted(s.name for s in systems)
            fx.timeline.append(self._entry(TimelineKind.information_answered, now,
                                           systems=self.considered))
            return fx.extend(self._finish_now(CaseStatus.completed, now,
                                              {"information": information_answer(systems)}))
        if self.right not in ACTION_FOR_RIGHT:
            fx.events.append(self.case_event(now))  # a complaint, say: the DPO answers it against its deadline
            return fx
        if not systems:
            # Nobody could have looked: the case stays open rather than claim "nothing held".
            fx.timeline.append(self._entry(TimelineKind.no_systems_registered, now))
            fx.events.append(self.case_event(now))
            return fx
        fx.extend(self._plan(systems, now))
        if not self.tasks:
            return fx.extend(self._finish_now(CaseStatus.completed, now, {
                "note": "no registered system searches by these identifier types or is concerned by this right",
                "systems_considered": self.considered}))
        fx.events.append(self.case_event(now))
        return fx

    def _plan(self, systems: Sequence[SystemDeclaration], now: datetime, *, late: bool = False) -> Effects:
        if self.right in LIFTABLE and self.lifted_at is not None:
            return Effects()  # a lifted restriction is never sent again
        systems = self.mine(systems)
        fresh = [s for s in systems if s.name not in self.considered]
        plan = (self._plan_all(fresh) if self.scope == "controller" else
                plan_for(self.right, self.subject, fresh, verified=self.verified_types, changes=self.changes,
                         purposes=self.purposes))
        self.considered = sorted({*self.considered, *(s.name for s in fresh)})
        self.dirty = True
        fx = Effects()
        by_name = {s.name: s for s in systems}
        for p in plan.tasks:
            task = self._new_task(p, now)
            if task.kind == TaskKind.worker:
                fx.events.append(self.task_event(task, by_name))
        worker = [p.system for p in plan.tasks if p.kind == TaskKind.worker]
        manual = {p.system: p.reason for p in plan.tasks if p.kind == TaskKind.manual}
        if worker:
            fx.timeline.append(self._entry(TimelineKind.tasks_planned_late if late else TimelineKind.tasks_dispatched,
                                           now, systems=worker))
        if manual:
            fx.timeline.append(self._entry(TimelineKind.manual_tasks_opened, now, systems=manual))
        if plan.not_asked:
            fx.timeline.append(self._entry(TimelineKind.systems_not_asked, now, systems=plan.not_asked))
        return fx

    def _plan_all(self, systems: Sequence[SystemDeclaration]) -> Plan:
        """A client company leaving: every system of the controller hands over or deletes all of it."""
        action = Action.export_all if self.right in BUNDLED else Action.erase_all
        out = Plan()
        for s in sorted(systems, key=lambda s: s.name):
            if s.supports(action):
                out.tasks.append(PlannedTask(s.name, action, {}, TaskKind.worker))
            else:
                why = "it has no dsrflow worker" if not s.worker else f"its worker cannot {action}"
                what = "hand over" if action == Action.export_all else "delete"
                out.tasks.append(PlannedTask(s.name, action, {}, TaskKind.manual,
                                             f"{why}: a person must {what} all of this client's data in it"))
        return out

    def _new_task(self, p: PlannedTask, now: datetime) -> Task:
        task = Task(task_id=uuid.uuid4(), case_id=self.case_id, system=p.system, action=p.action,
                    status=TaskStatus.dispatched if p.kind == TaskKind.worker else TaskStatus.manual,
                    kind=p.kind, attempt=1, dispatched_at=now if p.kind == TaskKind.worker else None,
                    reason=p.reason, changes=p.changes, dirty=True)
        self.tasks.append(task)
        return task

    # -- the DPO ---------------------------------------------------------------
    def verify(self, *, by: str, systems: Sequence[SystemDeclaration], now: datetime,
               identifiers: Iterable[IdentifierType] | None = None, method: str = "dpo") -> Effects:
        """The DPO verified the subject's identity (``identifiers``: which ones; default all given)
        and, for a representative, their authority. A waiting case then fans out; a case in progress
        sends the systems that waited for these identifiers (manual tasks) to their workers."""
        if self.status not in (CaseStatus.awaiting_verification, CaseStatus.in_progress):
            raise InvalidTransition(f"case {self.case_id} is {self.status}, not awaiting verification")
        kinds = set(self.subject) if identifiers is None else {IdentifierType(t) for t in identifiers}
        if not kinds <= set(self.subject):
            raise InvalidTransition("only identifiers the request gave can be verified")
        if not kinds:
            raise InvalidTransition("verify at least one identifier")
        have = self.verified_types
        if self.status == CaseStatus.in_progress and kinds <= have:
            raise InvalidTransition(f"case {self.case_id} is in_progress, with those identifiers verified already")
        self.verification = [*self.verification, *({"identifier": str(t), "method": method, "verified_by": by,
                                                     "verified_at": now.isoformat()}
                                                    for t in sorted(kinds - have))]
        if self.requester is not None:
            self.requester = {**self.requester, "verified": True, "verified_by": by}
        self.dirty = True
        fx = Effects([self._entry(TimelineKind.verified, now, by=by, identifiers=sorted(str(t) for t in kinds),
                                  method=method)])
        if self.status == CaseStatus.awaiting_verification:
            return fx.extend(self._fan_out(systems, now))
        by_name = {s.name: s for s in systems}
        usable = self._usable()
        for t in self.tasks:
            system = by_name.get(t.system)
            if (t.status != TaskStatus.manual or system is None or not system.supports(t.action)
                    or not (t.reason or "").startswith(UNVERIFIED_REASON)):
                continue
            if any(k in usable for k in system.identifier_types):
                t.kind, t.status, t.reason, t.dirty = TaskKind.worker, TaskStatus.dispatched, None, True
                t._send(now)
                fx.events.append(self.task_event(t, by_name))
        fx.events.append(self.case_event(now))
        return fx

    def extend(self, *, by: str, reason: str, now: datetime, until: datetime | None = None) -> Effects:
        """The one extension the law allows: the due date moves to ``until`` (default: the latest
        the law allows), decided before the original due date, with reasons the subject is told."""
        if self.status in TERMINAL_CASE or self.status == CaseStatus.received:
            raise InvalidTransition(f"case {self.case_id} is {self.status}: its deadline cannot be extended")
        if self.scope == "controller":
            raise InvalidTransition("a client company's offboarding runs on its contract's period: no law extends it")
        if self.extension is not None:
            raise InvalidTransition(f"case {self.case_id} was extended already: the law allows one extension")
        if self.max_extension_until is None:
            raise InvalidTransition(f"{self.jurisdiction} allows no extension for {self.right}")
        if now > self.due_at:
            raise InvalidTransition(f"case {self.case_id} is past its due date: an extension is decided before it")
        if not reason.strip():
            raise InvalidTransition("give the reasons for the extension (the subject is told them)")
        new_due = until or self.max_extension_until
        if new_due > self.max_extension_until:
            raise InvalidTransition(f"{self.jurisdiction} allows an extension to {self.max_extension_until:%Y-%m-%d} "
                                    "at the latest")
        if new_due <= self.due_at:
            raise InvalidTransition("an extension moves the due date later")
        self.original_due_at, self.due_at = self.due_at, new_due
        self.extension = {"by": by, "reason": reason.strip(), "at": now.isoformat()}
        self.warned_at = None  # the watcher warns again against the new due date
        self.dirty = True
        fx = Effects([self._entry(TimelineKind.deadline_extended, now, by=by, due_at=new_due.isoformat(),
                                  original_due_at=self.original_due_at.isoformat())], [self.case_event(now)])
        self._tell(fx, "extended", now, original_due_at=self.original_due_at, reasons=reason.strip())
        return fx

    def deny(self, *, by: str, ground: str, basis: str, reason: str, now: datetime) -> Effects:
        """Refuse the request on a legal ground of the jurisdiction's data file (``basis`` is its
        text), with the DPO's reasons, which the subject is told. Only before any worker was asked
        to act: a case whose tasks are out is finished task by task (skip), so it never claims that
        nothing was done when a system already did it."""
        if self.status not in (CaseStatus.received, CaseStatus.awaiting_verification, CaseStatus.in_progress,
                               CaseStatus.on_hold):
            raise InvalidTransition(f"case {self.case_id} is {self.status}: it cannot be denied")
        done = [t for t in self.tasks if t.status in (TaskStatus.succeeded, TaskStatus.retained)]
        if done:
            names = ", ".join(sorted(t.system for t in done))
            raise InvalidTransition(f"case {self.case_id} was already carried out by {names}: it cannot be denied")
        sent = [t for t in self.tasks if t.kind == TaskKind.worker or t.dispatched_at is not None]
        if sent:
            names = ", ".join(sorted(t.system for t in sent))
            raise InvalidTransition(f"case {self.case_id} has tasks sent to {names}: skip them one by one instead")
        if not reason.strip():
            raise InvalidTransition("give the reasons for the denial (the subject is told them)")
        for t in self.tasks:  # manual tasks nobody needs to do any more
            if not t.terminal:
                t.status, t.decided_by, t.note, t.completed_at, t.dirty = (
                    TaskStatus.skipped, by, "the request was denied", now, True)
        self.status, self.completed_at, self.hold, self.dirty = CaseStatus.denied, now, None, True
        self.outcome = {"status": str(CaseStatus.denied), "ground": ground, "basis": basis,
                        "reason": reason.strip(), "by": by}
        fx = Effects([self._entry(TimelineKind.denied, now, by=by, ground=ground)], [self.case_event(now)])
        self._tell(fx, "denied", now, ground=ground, basis=basis, reasons=reason.strip())
        return fx

    def hold_case(self, *, by: str, kind: str, reason: str, now: datetime) -> Effects:
        """Put the case on hold: a legal hold, or suspected fraud. Nothing new is sent while it
        holds (no fan-out, no retry, no system registered later); receipts of work already out still
        count; it waits, is never dropped, and its deadline stays as it was, visible."""
        if kind not in HOLD_KINDS:
            raise InvalidTransition(f"a hold is one of {', '.join(HOLD_KINDS)}")
        if self.status not in (CaseStatus.awaiting_verification, CaseStatus.in_progress):
            raise InvalidTransition(f"case {self.case_id} is {self.status}: only an open case is held")
        if not reason.strip():
            raise InvalidTransition("give the reason for the hold")
        self.hold = {"kind": kind, "reason": reason.strip(), "by": by, "at": now.isoformat(),
                     "resumes": str(self.status)}
        self.status, self.dirty = CaseStatus.on_hold, True
        return Effects([self._entry(TimelineKind.held, now, by=by, hold=kind)], [self.case_event(now)])

    def release(self, *, by: str, now: datetime) -> Effects:
        """End a hold: the case goes on where it stopped (a finished one is settled next)."""
        if self.status != CaseStatus.on_hold or self.hold is None:
            raise InvalidTransition(f"case {self.case_id} is {self.status}, not on hold")
        resumes = CaseStatus(self.hold["resumes"])
        self.status, self.hold, self.dirty = resumes, None, True
        return Effects([self._entry(TimelineKind.released, now, by=by, status=str(resumes))],
                       [self.case_event(now)])

    def skip_task(self, task_id: uuid.UUID, *, by: str, reason: str, now: datetime) -> Effects:
        """The DPO skips a task that is still open (stalled, waiting for a person, or sent), with a
        reason: the case then finishes with exceptions, saying so. No personal data in ``reason``."""
        task = self.task(task_id)
        if task is None:
            raise InvalidTransition(f"case {self.case_id} has no task {task_id}")
        if task.terminal:
            raise InvalidTransition(f"task {task_id} is {task.status} already")
        if not reason.strip():
            raise InvalidTransition("say why the task is skipped (a reason is required)")
        task.status, task.decided_by, task.note, task.completed_at, task.dirty = (
            TaskStatus.skipped, by, reason.strip(), now, True)
        return Effects([self._entry(TimelineKind.task_skipped, now, system=task.system, by=by)])

    def retry_task(self, task_id: uuid.UUID, *, by: str, systems: Sequence[SystemDeclaration],
                   now: datetime) -> Effects:
        """The DPO sends a stalled, failed or conflicting task to its worker again (after fixing the
        cause: the system is back, the records were merged). A finished case opens again for it."""
        task = self.task(task_id)
        if task is None:
            raise InvalidTransition(f"case {self.case_id} has no task {task_id}")
        if task.status not in (TaskStatus.stalled, TaskStatus.failed, TaskStatus.conflict):
            raise InvalidTransition(f"task {task_id} is {task.status}: only a stalled, failed or conflicting task "
                                    "is retried")
        if self.status == CaseStatus.on_hold:
            raise InvalidTransition(f"case {self.case_id} is on hold: release it first")
        self._not_pseudonymised()
        by_name = {s.name: s for s in systems}
        system = by_name.get(task.system)
        if system is None or not system.supports(task.action):
            raise InvalidTransition(f"system {task.system} has no registered worker that can {task.action}")
        if task.action == Action.restrict and self.lifted_at is not None:
            raise InvalidTransition("the restriction was lifted: it is not sent again")
        task.attempt += 1
        task.status, task.completed_at, task.dirty = TaskStatus.dispatched, None, True
        task._send(now)
        fx = Effects([self._entry(TimelineKind.task_retried_by_dpo, now, system=task.system, by=by,
                                  attempt=task.attempt)], [self.task_event(task, by_name)])
        if self.status in TERMINAL_CASE and self.status != CaseStatus.denied:
            self.status, self.completed_at, self.dirty = CaseStatus.in_progress, None, True
            fx.timeline.append(self._entry(TimelineKind.reopened, now, by=by, system=task.system))
        fx.events.append(self.case_event(now))
        return fx

    def reassign_task(self, task_id: uuid.UUID, *, by: str, reason: str, systems: Sequence[SystemDeclaration],
                      now: datetime, to_system: str | None = None, to_person: str | None = None) -> Effects:
        """The DPO gives an open (or failed, or conflicting) task to someone else: another system of
        this controller (the data moved; the old task is skipped, saying where it went), or a person,
        who then completes or declines it as a manual task. A worker's late receipt for the task it
        had still records what that system did."""
        task = self.task(task_id)
        if task is None:
            raise InvalidTransition(f"case {self.case_id} has no task {task_id}")
        if (to_system is None) == (to_person is None):
            raise InvalidTransition("reassign to exactly one of a system or a person")
        if task.status not in (TaskStatus.dispatched, TaskStatus.stalled, TaskStatus.manual, TaskStatus.failed,
                               TaskStatus.conflict):
            raise InvalidTransition(f"task {task_id} is {task.status}: only an open, failed or conflicting task "
                                    "is reassigned")
        if self.status in (CaseStatus.on_hold, CaseStatus.denied):
            raise InvalidTransition(f"case {self.case_id} is {self.status}: it cannot be reassigned now")
        if not reason.strip():
            raise InvalidTransition("say why the task is reassigned (a reason is required)")
        self._not_pseudonymised()
        if task.action == Action.restrict and self.lifted_at is not None:
            raise InvalidTransition("the restriction was lifted: it is not sent again")
        if task.action == Action.lift_restriction and to_system is not None:
            raise InvalidTransition("a lift goes to the system that restricted; reassign it to a person instead")
        fx = Effects()
        mine = {s.name: s for s in self.mine(systems)}
        if to_person is not None:
            if task.kind == TaskKind.manual and task.assignee == to_person and task.status == TaskStatus.manual:
                raise InvalidTransition(f"task {task_id} is assigned to {to_person} already")
            task.kind, task.status, task.assignee, task.completed_at = (
                TaskKind.manual, TaskStatus.manual, to_person, None)
            task.reason, task.dirty = f"reassigned to a person: {reason.strip()}", True
            fx.timeline.append(self._entry(TimelineKind.task_reassigned, now, system=task.system, by=by,
                                           to_person=to_person))
        else:
            assert to_system is not None
            target = mine.get(to_system)
            if target is None:
                raise InvalidTransition(f"no registered system {to_system!r} of this case's controller")
            if to_system == task.system:
                raise InvalidTransition("reassign to another system (use retry for the same one)")
            if any(t.system == to_system and t.action == task.action for t in self.tasks):
                raise InvalidTransition(f"system {to_system} has a {task.action} task in this case already")
            # planned as intake would: the identifiers it may use, its action, or a person when none can
            plan = (self._plan_all([target]) if self.scope == "controller" else
                    plan_for(self.right, self.subject, [target], verified=self.verified_types, changes=self.changes,
                             purposes=self.purposes))
            if not plan.tasks:
                why = "; ".join(f"{v}" for v in plan.not_asked.values()) or "it is not concerned by this right"
                raise InvalidTransition(f"system {to_system} would not be asked for this case: {why}")
            task.status, task.decided_by, task.completed_at, task.dirty = TaskStatus.skipped, by, now, True
            task.note = f"reassigned to {to_system}: {reason.strip()}"
            new = self._new_task(plan.tasks[0], now)
            self.considered = sorted({*self.considered, to_system})
            if new.kind == TaskKind.worker:
                fx.events.append(self.task_event(new, mine))
            fx.timeline.append(self._entry(TimelineKind.task_reassigned, now, system=task.system, by=by,
                                           to_system=to_system, task_kind=str(new.kind)))
        if self.status in TERMINAL_CASE:
            self.status, self.completed_at = CaseStatus.in_progress, None
            fx.timeline.append(self._entry(TimelineKind.reopened, now, by=by, system=task.system))
        self.dirty = True
        fx.events.append(self.case_event(now))
        return fx

    def resolve_manual(self, task_id: uuid.UUID, *, by: str, resolution: TaskStatus, note: str,
                       now: datetime) -> Effects:
        """A person carried out (``succeeded``), found nothing (``not_found``) or declined
        (``refused``) a manual task, with a note. The note is shown to the DPO: no personal data."""
        task = self.task(task_id)
        if task is None:
            raise InvalidTransition(f"case {self.case_id} has no task {task_id}")
        if task.status not in (TaskStatus.manual, TaskStatus.stalled):
            raise InvalidTransition(f"task {task_id} is {task.status}, not waiting for a person")
        if resolution not in (TaskStatus.succeeded, TaskStatus.not_found, TaskStatus.refused):
            raise InvalidTransition("a manual task is completed (succeeded, not_found) or declined (refused)")
        if not note.strip():
            raise InvalidTransition("say what was done (a note is required)")
        task.status, task.decided_by, task.note, task.completed_at = resolution, by, note.strip(), now
        task.result = {"counts": {}, "manual": True}
        task.dirty = True
        kind = TimelineKind.manual_declined if resolution == TaskStatus.refused else TimelineKind.manual_completed
        return Effects([self._entry(kind, now, system=task.system, status=str(resolution), by=by)])

    def lift(self, *, by: str, systems: Sequence[SystemDeclaration], now: datetime) -> Effects:
        """Lift a restriction (or objection): each system that restricted is asked to lift it."""
        if self.right not in LIFTABLE:
            raise InvalidTransition(f"a {self.right} case has no restriction to lift")
        if self.lifted_at is not None:
            raise InvalidTransition(f"the restriction of case {self.case_id} was lifted already")
        if self.status in (CaseStatus.awaiting_verification, CaseStatus.received, CaseStatus.denied,
                           CaseStatus.on_hold):
            raise InvalidTransition(f"case {self.case_id} is {self.status}: release or verify it first")
        self.lifted_at = now
        self.dirty = True
        restricted = [t for t in self.tasks if t.action == Action.restrict
                      and t.status in (TaskStatus.succeeded, TaskStatus.retained, TaskStatus.dispatched,
                                       TaskStatus.stalled, TaskStatus.manual, TaskStatus.skipped)]
        by_name = {s.name: s for s in systems}
        fx = Effects([self._entry(TimelineKind.restriction_lifted, now, by=by,
                                  systems=sorted(t.system for t in restricted))])
        for t in restricted:
            if not t.terminal:  # never re-sent now; its lift (queued after it, same key) undoes what it did
                t.status, t.decided_by, t.completed_at, t.dirty = TaskStatus.skipped, by, now, True
                t.note = "the restriction was lifted before this system confirmed it"
        for t in sorted(restricted, key=lambda t: t.system):
            system = by_name.get(t.system)
            worker = system is not None and system.supports(Action.lift_restriction)
            task = self._new_task(PlannedTask(
                t.system, Action.lift_restriction, {}, TaskKind.worker if worker else TaskKind.manual,
                None if worker else "its worker cannot lift a restriction: a person must act"), now)
            if worker:
                fx.events.append(self.task_event(task, by_name))
        if self.status in TERMINAL_CASE and any(not t.terminal for t in self.tasks):
            fx.events.append(self.case_event(now))
        return fx

    # -- systems registered later ------------------------------------------------
    def plan_new_systems(self, systems: Sequence[SystemDeclaration], now: datetime) -> Effects:
        """Ask systems that registered after the case was planned: while it is open, and for a
        lasting effect (restriction, opt-out, ...) still in force, also after it finished."""
        if self.status == CaseStatus.on_hold:
            return Effects()  # planned once it is released
        systems = self.mine(systems)  # another controller's systems are never asked, nor named
        if self.right not in ACTION_FOR_RIGHT or (self.right in LIFTABLE and self.lifted_at is not None):
            self.considered = sorted({*self.considered, *(s.name for s in systems)})
            self.dirty = True
            return Effects()
        if not (self.status == CaseStatus.in_progress or self.lasting_in_force):
            return Effects()
        before = len(self.tasks)
        fx = self._plan(systems, now, late=True)
        if self.status == CaseStatus.in_progress and not self.tasks and self.considered:
            return fx.extend(self._finish_now(CaseStatus.completed, now, {
                "note": "no registered system searches by these identifier types or is concerned by this right",
                "systems_considered": self.considered}))
        if len(self.tasks) > before:
            fx.events.append(self.case_event(now))
        return fx

    # -- receipts and timers -------------------------------------------------------
    def apply_receipt(self, receipt: TaskReceipt, *, max_attempts: int, systems: Mapping[str, SystemDeclaration],
                      now: datetime) -> Effects:
        """A worker's receipt for one attempt of a task of this case."""
        task = self.task(receipt.task_id)
        if task is None or task.system != receipt.system:
            raise InvalidTransition(f"no task {receipt.task_id} for case {self.case_id} in system {receipt.system}")
        # Skipped, or reassigned to a person (who may have resolved it since), after it was sent to its
        # worker; a worker result already recorded is not overwritten.
        taken_from_worker = task.dispatched_at is not None and (
            (task.status == TaskStatus.skipped and task.kind == TaskKind.worker)
            or (task.kind == TaskKind.manual and task.assignee is not None
                and (task.status in (TaskStatus.manual, TaskStatus.refused, TaskStatus.skipped)
                     or (task.result or {}).get("manual", False))))
        if (taken_from_worker and receipt.attempt <= task.attempt
                and receipt.status in (ReceiptStatus.succeeded, ReceiptStatus.retained, ReceiptStatus.not_found)):
            # Skipped or reassigned by the DPO, but the worker had it and did it: what happened counts.
            task.note = (f"{task.note or 'skipped'}; the system did it before the skip reached it"
                         if task.kind == TaskKind.worker else
                         f"reassigned to {task.assignee} ({task.status}: {task.note or 'open'}), but the system "
                         "did it before that reached it")
            task.status, task.completed_at, task.dirty = TaskStatus(receipt.status), receipt.completed_at, True
            task.result = receipt.model_dump(mode="json", include={"counts", "categories", "retained", "artifacts"})
            return Effects([self._entry(TimelineKind(f"task_{receipt.status}"), now, system=receipt.system,
                                        attempt=receipt.attempt, status=str(receipt.status), counts=receipt.counts,
                                        after_skip=True)])
        if task.terminal or task.kind == TaskKind.manual or receipt.attempt > task.attempt:
            return Effects()  # a late duplicate, an attempt never sent, or a task a person holds: changes nothing
        if receipt.attempt < task.attempt and receipt.status == ReceiptStatus.failed:
            return Effects()  # an earlier attempt's failure: its retry is already out
        # An earlier attempt that did finish counts: its effect happened (erased rows stay erased),
        # and the retry in flight would only report what is left.
        detail: dict[str, Any] = {"system": receipt.system, "attempt": receipt.attempt, "status": str(receipt.status)}
        task.dirty = True
        if (receipt.status == ReceiptStatus.failed and receipt.retryable and receipt.attempt < max_attempts
                and receipt.system in systems):  # a system no longer registered gets no retry
            if self.status == CaseStatus.on_hold:  # nothing new is sent while held: the sweep retries after release
                task.error = receipt.error
                return Effects([self._entry(TimelineKind.task_failed, now, **detail, counts=receipt.counts,
                                            retry="after the hold is released")])
            task.attempt, task.status, task.error = receipt.attempt + 1, TaskStatus.dispatched, receipt.error
            task._send(now)
            return Effects([self._entry(TimelineKind.task_retried, now, **detail, next_attempt=receipt.attempt + 1)],
                           [self.task_event(task, systems)])
        task.status, task.completed_at, task.error = TaskStatus(receipt.status), receipt.completed_at, receipt.error
        task.result = receipt.model_dump(mode="json", include={"counts", "categories", "retained", "artifacts"})
        return Effects([self._entry(TimelineKind(f"task_{receipt.status}"), now, **detail, counts=receipt.counts)])

    def apply_progress(self, progress: TaskProgress, *, now: datetime) -> str | None:
        """A worker's word that a task of this case is still running: recorded on the task (its
        latest progress, and ``now`` as when it came) if the task is its system's, dispatched, and at
        that attempt. No
        timeline entry and no event: the sweep only waits longer. Returns None when recorded, else
        why it changed nothing (ids only)."""
        task = self.task(progress.task_id)
        if task is None:
            return f"no task {progress.task_id} in case {self.case_id}"
        if task.system != progress.system:  # a system's key never speaks for another system's task
            return f"task {progress.task_id} is not system {progress.system}'s"
        if task.status != TaskStatus.dispatched or task.kind != TaskKind.worker:
            return f"task {progress.task_id} is {task.status}, no longer dispatched"
        if progress.attempt != task.attempt:
            return f"attempt {progress.attempt} of task {progress.task_id}, which is at attempt {task.attempt}"
        # The latest report wins: a case's reports share a partition, so they come in order, and
        # the inbox drops a redelivered one. A lower seq than the one recorded is a new run of the
        # same attempt (another instance took the task over after a restart): it is alive too.
        task.progress = {"attempt": progress.attempt, "seq": progress.seq, "done": progress.done,
                         "total": progress.total, "note": progress.note}
        task.progress_at, task.progressed = now, True
        return None

    def time_out(self, task: Task, *, systems: Mapping[str, SystemDeclaration], now: datetime,
                 surface: bool) -> Effects:
        """No receipt for ``task`` within its wait (the task timeout, doubled with every attempt):
        send it again; or, once the deadline nears (``surface``) or its system is gone, mark it
        stalled and alert the DPO, who retries, reassigns or skips it (a late receipt still
        completes it)."""
        if task.status != TaskStatus.dispatched or task.dispatched_at is None or self.status == CaseStatus.on_hold:
            return Effects()
        detail: dict[str, Any] = {"system": task.system, "attempt": task.attempt,
                                  "waited_s": int((now - task.dispatched_at).total_seconds())}
        if task.progress_at is not None and task.progress is not None:  # it went silent after reporting progress
            detail.update(progress_seq=task.progress.get("seq"),
                          silent_s=int((now - (task.waiting_since or now)).total_seconds()))
        task.dirty = True
        if not surface and task.system in systems:
            task.attempt += 1
            task._send(now)
            return Effects([self._entry(TimelineKind.task_redispatched, now, **detail, next_attempt=task.attempt)],
                           [self.task_event(task, systems)])
        task.status = TaskStatus.stalled
        return Effects([self._entry(TimelineKind.task_stalled, now, **detail, surfaced=True)],
                       [self.alert("task_stalled", now, task=task, key=str(task.attempt)), self.case_event(now)])

    # -- the deadline watcher ------------------------------------------------------
    def warn_at(self, warning_share: float) -> datetime:
        """When ``warning_share`` of the time from receipt to the due date is gone."""
        return self.received_at + (self.due_at - self.received_at) * warning_share

    def watch(self, now: datetime, *, warning_share: float) -> Effects:
        """The deadline watcher's look at an open case (held ones too: a hold does not stop the
        law's clock): once ``warning_share`` of its time is gone a warning, once the internal target
        passes a note of it, once the due date passes an overdue alert; each once (an extension
        arms the warning again)."""
        if self.status in TERMINAL_CASE:
            return Effects()
        fx = Effects()
        if self.overdue_at is None and now > self.due_at:
            self.overdue_at, self.warned_at = now, self.warned_at or now
            fx.timeline.append(self._entry(TimelineKind.deadline_overdue, now, due_at=self.due_at.isoformat(),
                                           status=str(self.status)))
            fx.events.append(self.alert("deadline_overdue", now, key=self.due_at.isoformat()))
        elif self.warned_at is None and now >= self.warn_at(warning_share):
            self.warned_at = now
            fx.timeline.append(self._entry(TimelineKind.deadline_warning, now, due_at=self.due_at.isoformat(),
                                           share=warning_share))
            fx.events.append(self.alert("deadline_warning", now, key=self.due_at.isoformat()))
        if self.target_at is not None and self.target_passed_at is None and now > self.target_at:
            self.target_passed_at = now
            fx.timeline.append(self._entry(TimelineKind.target_passed, now, target_at=self.target_at.isoformat()))
            fx.events.append(self.alert("target_passed", now))
        if fx.timeline:
            self.dirty = True
            fx.events.append(self.case_event(now))
        return fx

    # -- dsrflow's own personal data ---------------------------------------------------
    def pseudonymise(self, now: datetime, *, key: bytes | None) -> Effects:
        """Replace what this closed case keeps of the person once its retention ran out: each
        identifier, each corrected value and the representative's name and contact by a keyed hash
        (HMAC-SHA256 with ``key``: the same person is still recognised, by whoever holds the key,
        but not read), or dropped without a key; the free text staff wrote (notes, reasons) by its
        SHA-256 (so a kept copy can still be matched). The evidence stays: timeline, statuses,
        what was done and kept on which basis, who decided, and the hashes. A lasting effect still
        in force (a restriction, an opt-out) keeps its identifiers: later systems need them."""
        if self.status not in TERMINAL_CASE or self.pseudonymised_at is not None:
            raise InvalidTransition(f"case {self.case_id} is {self.status}: only a closed case is pseudonymised")
        if self.lasting_in_force or any(not t.terminal for t in self.tasks):
            raise InvalidTransition(f"case {self.case_id} still acts (a lasting effect or an open task)")

        def digest(text: str) -> str:
            return text if text.startswith("sha256:") else "sha256:" + hashlib.sha256(text.encode()).hexdigest()

        def personal(text: str) -> str:  # keyed: an email or phone is guessed back from a plain hash
            if key is None:
                return "pseudonymised"
            if text.startswith("hmac-sha256:"):
                return text
            return "hmac-sha256:" + hmac.new(key, text.encode(), hashlib.sha256).hexdigest()

        self.subject = {k: personal(f"{k}:{v}") for k, v in self.subject.items()}
        if self.changes:
            self.changes = {f: personal(v) for f, v in self.changes.items()}
        if self.requester:
            self.requester = {k: (personal(v) if k in ("name", "contact", "evidence") and isinstance(v, str) else v)
                              for k, v in self.requester.items()}
        if self.opened and "why" in self.opened:
            self.opened = {**self.opened, "why": digest(self.opened["why"])}
        for held in ("extension", "hold"):
            doc = getattr(self, held)
            if doc and doc.get("reason"):
                setattr(self, held, {**doc, "reason": digest(doc["reason"])})
        for t in self.tasks:
            if t.changes:
                t.changes = {f: personal(v) for f, v in t.changes.items()}
            if t.note:
                t.note = digest(t.note)
            if t.progress and t.progress.get("note"):  # a worker's words: meant to hold no personal data
                t.progress = {**t.progress, "note": digest(t.progress["note"])}
            if t.reason and t.reason.startswith("reassigned to a person:"):  # the DPO's words
                t.reason = digest(t.reason)
            t.dirty = True
        if self.outcome:
            outcome = dict(self.outcome)
            if outcome.get("reason"):
                outcome["reason"] = digest(outcome["reason"])
            systems = outcome.get("systems")
            if isinstance(systems, dict):
                outcome["systems"] = {name: _digest_entry(e, digest) for name, e in systems.items()}
            self.outcome = outcome
        self.pseudonymised_at, self.dirty = now, True
        return Effects([self._entry(TimelineKind.pseudonymised, now, identifiers=sorted(str(k) for k in self.subject),
                                    keyed=key is not None)], [self.case_event(now)])

    # -- finishing -------------------------------------------------------------------
    def settle(self) -> CaseStatus | None:
        """The status this case finishes with now, or None while it waits (for a task, a person,
        a system to register, or the DPO). Finished cases return None."""
        if self.status != CaseStatus.in_progress or self.right not in ACTION_FOR_RIGHT:
            return None
        if not self.tasks:
            return None  # no system registered yet: nobody could have looked
        return outcome([t.status for t in self.tasks])

    @property
    def needs_bundle(self) -> bool:
        return self.right in BUNDLED

    def finish(self, status: CaseStatus, *, now: datetime, systems: Mapping[str, SystemDeclaration],
               bundle: Artifact | None = None, bundle_error: str | None = None) -> Effects:
        """Close the case with ``status`` (from :meth:`settle`; ``failed`` when the bundle could not
        be built) and record its outcome: per system what was done, kept and on which basis."""
        if bundle_error is not None:
            status = CaseStatus.failed
        doc = outcome_document(self, status, systems, now)
        if bundle_error is not None:
            doc["bundle_error"] = bundle_error
        self.bundle = bundle
        return self._finish_now(status, now, doc, **({"bundle_sha256": bundle.sha256} if bundle else {}))

    def _finish_now(self, status: CaseStatus, now: datetime, doc: dict[str, Any], **detail: Any) -> Effects:
        self.status, self.completed_at, self.outcome = status, now, {"status": str(status), **doc}
        self.dirty = True
        kind = TimelineKind.failed if status == CaseStatus.failed else TimelineKind.completed
        fx = Effects([self._entry(kind, now, status=str(status), tasks=self.summary(), **detail)],
                     [self.case_event(now)])
        # Law 91/2025 Art 14(5): the subject is told what was done, and what was kept on which basis.
        # A case finished again after a reopening tells them again (a new notice id).
        systems = [NoticeSystem(system=t.system, action=t.action, status=t.status,
                                counts=(t.result or {}).get("counts", {}))
                   for t in sorted(self.tasks, key=lambda t: (t.system, t.action))]
        kept = [NoticeRetained(system=item["system"], category=item["category"], records=item["records"],
                               legal_basis=item["legal_basis"], retain_until=item.get("retain_until"))
                for item in doc.get("retained", [])]
        self._tell(fx, "completed", now, key=now.isoformat(), status=status, systems=systems, retained=kept,
                   information=doc.get("information"))
        if self.bundle is not None:
            self._tell(fx, "bundle_ready", now, key=self.bundle.sha256, bundle=NoticeBundle(
                sha256=self.bundle.sha256, size=self.bundle.size, records=self.bundle.records))
        return fx

    def refresh_outcome(self, *, now: datetime, systems: Mapping[str, SystemDeclaration]) -> Effects:
        """A finished case whose later tasks (a system registered after it, a lift) moved: its
        outcome shows them, its status and deadline stay what they were."""
        if self.status not in TERMINAL_CASE or self.outcome is None:
            return Effects()
        # what was recorded when it finished, and no later task changes
        kept = ("information", "bundle_error", "dsrflow_exports", "suppression", "earlier_copies_deleted")
        lasting_keys: dict[str, Any] = {k: self.outcome[k] for k in kept if k in self.outcome}
        self.outcome = {"status": str(self.status), **outcome_document(self, self.status, systems, now),
                        **lasting_keys}
        self.dirty = True
        return Effects([self._entry(TimelineKind.outcome_updated, now, tasks=self.summary())],
                       [self.case_event(now)])


def _digest_entry(entry: Any, digest: Callable[[str], str]) -> Any:
    """An outcome's per-system entry with the staff's free text (note, a reassignment's reason) hashed."""
    if not isinstance(entry, dict):
        return entry
    out = dict(entry)
    if out.get("note"):
        out["note"] = digest(out["note"])
    if isinstance(out.get("reason"), str) and out["reason"].startswith("reassigned to a person:"):
        out["reason"] = digest(out["reason"])
    return out


def outcome_document(case: Case, status: CaseStatus, systems: Mapping[str, SystemDeclaration],
                     now: datetime) -> dict[str, Any]:
    """What the case did, per system, what the law made us keep, and what waits for a person.
    No personal data."""
    per_system: dict[str, Any] = {}
    retained: list[dict[str, Any]] = []
    for t in sorted(case.tasks, key=lambda t: (t.system, t.action)):
        result = t.result or {}
        entry: dict[str, Any] = {"action": str(t.action), "status": str(t.status), "kind": str(t.kind),
                                 "attempts": t.attempt, "counts": result.get("counts", {})}
        for key in ("error", "reason", "decided_by", "note"):
            if getattr(t, key):
                entry[key] = getattr(t, key)
        system = systems.get(t.system)
        if system is not None and t.kind == TaskKind.worker:
            # what "not found" means: the identifier types this system was asked by
            usable = case._usable()
            entry["searched_by"] = sorted(str(k) for k in system.identifier_types if k in usable)
        if (case.right == Right.erasure and system is not None and system.backup_retention is not None
                and t.status in (TaskStatus.succeeded, TaskStatus.retained)):
            # Backups still hold what was erased until they expire; restoring one replays the erasure.
            done = t.completed_at or now
            entry["backups_expire_by"] = (done + system.backup_retention).isoformat()
        per_system[t.label] = entry
        retained += [{"system": t.system, **item} for item in result.get("retained", [])]
    doc: dict[str, Any] = {"systems": per_system, "retained": retained}
    waiting = sorted(t.label for t in case.tasks if t.status == TaskStatus.manual)
    if waiting:
        doc["waiting_for_a_person"] = waiting
    conflicts = sorted(t.label for t in case.tasks if t.status == TaskStatus.conflict)
    if conflicts:
        doc["identifier_conflicts"] = conflicts
    return doc


def information_answer(systems: Iterable[SystemDeclaration]) -> dict[str, Any]:
    """An information request's answer, from what the systems declare (Decree 356/2025 Art 4(1),
    GDPR Art 13-15): categories, purposes, recipients and processors, storage country, sensitive
    categories, retention and backup retention. No personal data: it is the same for everyone."""

    def days(period: timedelta | None) -> int | None:
        return None if period is None else period.days

    return {
        s.name: {
            "description": s.description,
            "categories": list(s.categories),
            "purposes": list(s.purposes),
            "recipients": list(s.recipients),
            "processors": list(s.processors),
            "operated_by": s.operated_by,
            "storage_country": s.storage_country,
            "sensitive_categories": list(s.sensitive_categories),
            "retention": [{"category": r.category, "legal_basis": r.legal_basis, "days": days(r.period)}
                          for r in s.retention],
            "backup_retention_days": days(s.backup_retention),
        }
        for s in sorted(systems, key=lambda s: s.name)
    }
