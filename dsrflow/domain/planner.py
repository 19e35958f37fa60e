"""Pure decisions: which systems get a task for a request, of which kind, and a case's outcome.

A system is asked when it searches by one of the identifier types the case may use and the
action concerns it (:data:`dsrflow.rights.ACTION_PURPOSES`; for a rectification, when it holds one
of the corrected fields). It gets a worker task when its worker supports the action, else a
**manual** task for a person: a system that may hold the data is never left out silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from ..registry import SystemDeclaration
from ..rights import (
    ACTION_FOR_RIGHT,
    ACTION_PURPOSES,
    NO_VERIFICATION,
    TERMINAL_TASK,
    Action,
    CaseStatus,
    IdentifierType,
    Right,
    TaskStatus,
    change_category,
)

#: the reason of a manual task that waits for the DPO to verify more identifiers
UNVERIFIED_REASON = "it searches only by identifiers not verified"


class TaskKind(StrEnum):
    worker = "worker"  # the system's worker carries it out and sends a receipt
    manual = "manual"  # a person carries it out (no worker, or the worker cannot do the action)


@dataclass(frozen=True, slots=True)
class PlannedTask:
    system: str
    action: Action
    #: only the identifier types this system searches by (data minimisation on its topic)
    identifiers: dict[IdentifierType, str]
    kind: TaskKind = TaskKind.worker
    #: why a person must act (manual tasks); no personal data
    reason: str | None = None
    #: rectification: the corrections of the fields this system holds
    changes: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    tasks: list[PlannedTask] = field(default_factory=list)
    #: systems that were not asked, and why (for the timeline: nothing is left out silently)
    not_asked: dict[str, str] = field(default_factory=dict)


def needs_verification(right: Right, verified: bool | Iterable[IdentifierType]) -> bool:
    """Whether a case must wait for the DPO to verify the subject's identity before it fans out."""
    if right in NO_VERIFICATION:
        return False
    if isinstance(verified, bool):
        return not verified
    return not set(verified)


def usable_identifiers(
    right: Right, identifiers: Mapping[IdentifierType, str], verified: Iterable[IdentifierType]
) -> dict[IdentifierType, str]:
    """The identifiers a task may carry: the verified ones; for an opt-out every one given (an
    opt-out only suppresses, so anyone may ask it)."""
    if right in NO_VERIFICATION:
        return dict(identifiers)
    ok = set(verified)
    return {t: v for t, v in identifiers.items() if t in ok}


def _overlap(purposes: Iterable[str], prefixes: Iterable[str]) -> bool:
    prefixes = list(prefixes)
    return any(p == pre or p.startswith(pre + ".") or pre.startswith(p + ".") for p in purposes for pre in prefixes)


def _concerns(system: SystemDeclaration, action: Action, purposes: Sequence[str] | None) -> bool:
    if not system.purposes:
        return True  # no purpose says otherwise: ask, rather than leave data out
    if purposes and action in (Action.restrict, Action.revoke_consent):
        return _overlap(system.purposes, purposes)  # an objection to, or withdrawal for, the named purposes
    prefixes = ACTION_PURPOSES.get(action)
    return not prefixes or _overlap(system.purposes, prefixes)


def _changes_for(system: SystemDeclaration, changes: Mapping[str, str]) -> dict[str, str]:
    """The corrections this system holds a field for; a field dsrflow cannot place goes to every system."""
    held = set(system.categories)
    return {k: v for k, v in changes.items()
            if (cat := change_category(k)) is None or not held or cat in held
            or any(h.startswith(cat + ".") or cat.startswith(h + ".") for h in held)}


def plan_for(
    right: Right,
    identifiers: Mapping[IdentifierType, str],
    systems: Iterable[SystemDeclaration],
    *,
    verified: Iterable[IdentifierType] | None = None,
    changes: Mapping[str, str] | None = None,
    purposes: Sequence[str] | None = None,
    action: Action | None = None,
) -> Plan:
    """The tasks of a case: one per system concerned (see the module docstring). ``verified``
    defaults to every identifier given; ``action`` overrides the right's own (lifting a restriction)."""
    action = action or ACTION_FOR_RIGHT.get(right)
    if action is None:
        return Plan()
    usable = usable_identifiers(right, identifiers, identifiers.keys() if verified is None else verified)
    unverified = sorted(str(t) for t in identifiers if t not in usable)
    out = Plan()
    for system in sorted(systems, key=lambda s: s.name):
        ids = {t: usable[t] for t in system.identifier_types if t in usable}
        if not _concerns(system, action, purposes):
            out.not_asked[system.name] = f"its purposes do not include what {action} is about"
            continue
        sys_changes = None
        if action == Action.rectify:
            sys_changes = _changes_for(system, changes or {})
            if not sys_changes:
                out.not_asked[system.name] = "it holds none of the corrected fields"
                continue
        if not ids:
            searched = {str(t) for t in system.identifier_types} & set(unverified)
            if searched:  # it could find the subject, but only by identifiers nobody verified
                out.tasks.append(PlannedTask(
                    system.name, action, {}, TaskKind.manual,
                    f"{UNVERIFIED_REASON} ({', '.join(sorted(searched))}): "
                    "verify them, or check by hand", sys_changes))
            else:
                out.not_asked[system.name] = "it searches by none of the subject's identifier types"
            continue
        if system.supports(action):
            out.tasks.append(PlannedTask(system.name, action, ids, TaskKind.worker, None, sys_changes))
        else:
            why = "it has no dsrflow worker" if not system.worker else f"its worker cannot {action}"
            out.tasks.append(PlannedTask(system.name, action, ids, TaskKind.manual, f"{why}: a person must act",
                                         sys_changes))
    return out


def plan(right: Right, identifiers: Mapping[IdentifierType, str], systems: Iterable[SystemDeclaration]) -> list[
        PlannedTask]:
    """The tasks of a request whose identifiers are all verified (see :func:`plan_for`)."""
    return plan_for(right, identifiers, systems).tasks


def outcome(task_statuses: Sequence[TaskStatus]) -> CaseStatus | None:
    """The case status once every task is terminal; None while any task is open (dispatched,
    stalled, or waiting for a person).

    A failed task fails the case (the DPO must act). Data kept by law, a refusal, identifiers that
    point to different people, or a task the DPO skipped complete it with exceptions, so the
    subject is told honestly what was not done. Otherwise (every system did it, or held nothing)
    it is completed.
    """
    if any(s not in TERMINAL_TASK for s in task_statuses):
        return None
    if any(s == TaskStatus.failed for s in task_statuses):
        return CaseStatus.failed
    if any(s in (TaskStatus.retained, TaskStatus.refused, TaskStatus.conflict, TaskStatus.skipped)
           for s in task_statuses):
        return CaseStatus.completed_with_exceptions
    return CaseStatus.completed
