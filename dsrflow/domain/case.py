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
A manual task waits in ``manual`` for a person to complete or decline it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .. import topics
from ..errors import DsrflowError
from ..events import Artifact, CaseUpdated, Event, RightsRequested, TaskAssigned, TaskReceipt
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
from .planner import UNVERIFIED_REASON, PlannedTask, TaskKind, outcome, plan_for
from .timeline import Entry, TimelineKind

__all__ = ["Case", "CaseError", "Effects", "InvalidTransition", "Task", "TaskKind", "information_answer"]

#: Rights whose finished case carries an access bundle.
BUNDLED: frozenset[Right] = frozenset({Right.access, Right.portability})
#: Kinds of hold: a legal hold (litigation, an authority's order), or suspected fraud (a request
#: that may come from someone else, as when a provider suspends email-based requests).
HOLD_KINDS = ("legal_hold", "suspected_fraud")
#: Rights a restriction can be lifted from.
LIFTABLE: frozenset[Right] = frozenset({Right.restriction, Right.objection})


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
    #: touched by the transition in hand: the store writes it
    dirty: bool = field(default=False, compare=False)

    @property
    def label(self) -> str:
        """The task's name in a case's summary: the system, plus the action when it is a lift."""
        return self.system if self.action != Action.lift_restriction else f"{self.system}:{self.action}"

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_TASK


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

    def case_event(self, now: datetime) -> tuple[str, str, Event]:
        event = CaseUpdated(
            case_id=self.case_id, request_id=self.request_id, right=self.right, status=self.status,
            jurisdiction=self.jurisdiction, received_at=self.received_at, due_at=self.due_at, updated_at=now,
            tasks={t.label: t.status for t in self.tasks}, bundle=self.bundle,
        )
        return topics.CASES, str(self.case_id), event

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
            jurisdiction=self.jurisdiction,
        )
        return topics.tasks_topic(task.system), str(self.case_id), event

    def _usable(self) -> dict[IdentifierType, str]:
        if self.right in NO_VERIFICATION:
            return dict(self.subject)
        ok = self.verified_types
        return {t: v for t, v in self.subject.items() if t in ok}

    def _entry(self, kind: TimelineKind, now: datetime, **detail: Any) -> Entry:
        return Entry(self.case_id, str(kind), detail, now)

    # -- opening -----------------------------------------------------------
    @classmethod
    def open(
        cls, request: RightsRequested, *, event_id: str, source: str, received_at: datetime, ack_due_at: datetime,
        due_at: datetime, basis: str, systems: Sequence[SystemDeclaration], now: datetime,
        case_id: uuid.UUID | None = None, max_extension_until: datetime | None = None,
        opened: dict[str, str] | None = None,
    ) -> tuple[Case, Effects]:
        """A new case for ``request``: received, then waiting for verification, fanned out, or
        (an information request, or nothing to ask) answered at once."""
        case = cls(
            case_id=case_id or uuid.uuid4(), request_id=request.request_id, request_event=event_id,
            right=request.right, jurisdiction=request.jurisdiction, status=CaseStatus.received,
            subject=dict(request.subject.identifiers), received_at=received_at, ack_due_at=ack_due_at,
            due_at=due_at, verification=request.verification_record(),
            requester=request.requester.model_dump(mode="json", exclude_none=True) if request.requester else None,
            channel=request.channel, changes=dict(request.changes) if request.changes else None,
            purposes=list(request.purposes) if request.purposes else None, dirty=True,
            max_extension_until=max_extension_until, opened=opened,
        )
        fx = Effects([case._entry(TimelineKind.received, now, event_id=event_id, source=source,
                                  right=str(request.right), jurisdiction=request.jurisdiction,
                                  due_at=due_at.isoformat(), ack_due_at=ack_due_at.isoformat(), basis=basis,
                                  verified=sorted(str(t) for t in case.verified_types),
                                  requester=(case.requester or {}).get("relationship", "self"),
                                  **({"opened_by_dpo": {"by": opened["by"], "why_sha256": hashlib.sha256(
                                      opened["why"].encode()).hexdigest()}} if opened else {}))])
        if case._waits_for_verification():
            case.status = CaseStatus.awaiting_verification
            fx.timeline.append(case._entry(TimelineKind.awaiting_verification, now,
                                           representative=case.representative_unverified))
            fx.events.append(case.case_event(now))
            return case, fx
        return case, fx.extend(case._fan_out(systems, now))

    def _waits_for_verification(self) -> bool:
        if self.right in NO_VERIFICATION or self.right == Right.information:
            return False  # an opt-out only suppresses; information comes from the declarations
        return not self.verified_types or self.representative_unverified

    def _fan_out(self, systems: Sequence[SystemDeclaration], now: datetime) -> Effects:
        fx = Effects()
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
        fresh = [s for s in systems if s.name not in self.considered]
        plan = plan_for(self.right, self.subject, fresh, verified=self.verified_types, changes=self.changes,
                        purposes=self.purposes)
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
                t.kind, t.status, t.dispatched_at, t.reason, t.dirty = (
                    TaskKind.worker, TaskStatus.dispatched, now, None, True)
                fx.events.append(self.task_event(t, by_name))
        fx.events.append(self.case_event(now))
        return fx

    def extend(self, *, by: str, reason: str, now: datetime, until: datetime | None = None) -> Effects:
        """The one extension the law allows: the due date moves to ``until`` (default: the latest
        the law allows), decided before the original due date, with reasons the subject is told."""
        if self.status in TERMINAL_CASE or self.status == CaseStatus.received:
            raise InvalidTransition(f"case {self.case_id} is {self.status}: its deadline cannot be extended")
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
        self.dirty = True
        return Effects([self._entry(TimelineKind.deadline_extended, now, by=by, due_at=new_due.isoformat(),
                                    original_due_at=self.original_due_at.isoformat())], [self.case_event(now)])

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
        sent = [t for t in self.tasks if t.kind == TaskKind.worker]
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
        return Effects([self._entry(TimelineKind.denied, now, by=by, ground=ground)], [self.case_event(now)])

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
        by_name = {s.name: s for s in systems}
        system = by_name.get(task.system)
        if system is None or not system.supports(task.action):
            raise InvalidTransition(f"system {task.system} has no registered worker that can {task.action}")
        if task.action == Action.restrict and self.lifted_at is not None:
            raise InvalidTransition("the restriction was lifted: it is not sent again")
        task.attempt += 1
        task.status, task.dispatched_at, task.completed_at, task.dirty = TaskStatus.dispatched, now, None, True
        fx = Effects([self._entry(TimelineKind.task_retried_by_dpo, now, system=task.system, by=by,
                                  attempt=task.attempt)], [self.task_event(task, by_name)])
        if self.status in TERMINAL_CASE and self.status != CaseStatus.denied:
            self.status, self.completed_at, self.dirty = CaseStatus.in_progress, None, True
            fx.timeline.append(self._entry(TimelineKind.reopened, now, by=by, system=task.system))
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
        if (task.status == TaskStatus.skipped and task.kind == TaskKind.worker and receipt.attempt <= task.attempt
                and receipt.status in (ReceiptStatus.succeeded, ReceiptStatus.retained, ReceiptStatus.not_found)):
            # Skipped by the DPO, but the worker had it and did it: what happened is what counts.
            task.status, task.completed_at, task.dirty = TaskStatus(receipt.status), receipt.completed_at, True
            task.note = f"{task.note or 'skipped'}; the system did it before the skip reached it"
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
            task.attempt, task.status, task.dispatched_at, task.error = (
                receipt.attempt + 1, TaskStatus.dispatched, now, receipt.error)
            return Effects([self._entry(TimelineKind.task_retried, now, **detail, next_attempt=receipt.attempt + 1)],
                           [self.task_event(task, systems)])
        task.status, task.completed_at, task.error = TaskStatus(receipt.status), receipt.completed_at, receipt.error
        task.result = receipt.model_dump(mode="json", include={"counts", "categories", "retained", "artifacts"})
        return Effects([self._entry(TimelineKind(f"task_{receipt.status}"), now, **detail, counts=receipt.counts)])

    def time_out(self, task: Task, *, max_attempts: int, systems: Mapping[str, SystemDeclaration],
                 now: datetime) -> Effects:
        """No receipt for ``task`` within the task timeout: send it again, or after the last attempt
        mark it stalled (a late receipt still completes it)."""
        if task.status != TaskStatus.dispatched or task.dispatched_at is None or self.status == CaseStatus.on_hold:
            return Effects()
        detail = {"system": task.system, "attempt": task.attempt,
                  "waited_s": int((now - task.dispatched_at).total_seconds())}
        task.dirty = True
        if task.attempt < max_attempts and task.system in systems:
            task.attempt += 1
            task.dispatched_at = now
            return Effects([self._entry(TimelineKind.task_redispatched, now, **detail, next_attempt=task.attempt)],
                           [self.task_event(task, systems)])
        task.status = TaskStatus.stalled
        return Effects([self._entry(TimelineKind.task_stalled, now, **detail)])

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
        return Effects([self._entry(kind, now, status=str(status), tasks=self.summary(), **detail)],
                       [self.case_event(now)])

    def refresh_outcome(self, *, now: datetime, systems: Mapping[str, SystemDeclaration]) -> Effects:
        """A finished case whose later tasks (a system registered after it, a lift) moved: its
        outcome shows them, its status and deadline stay what they were."""
        if self.status not in TERMINAL_CASE or self.outcome is None:
            return Effects()
        lasting_keys: dict[str, Any] = {k: self.outcome[k] for k in ("information", "bundle_error")
                                        if k in self.outcome}
        self.outcome = {"status": str(self.status), **outcome_document(self, self.status, systems, now),
                        **lasting_keys}
        self.dirty = True
        return Effects([self._entry(TimelineKind.outcome_updated, now, tasks=self.summary())],
                       [self.case_event(now)])


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
