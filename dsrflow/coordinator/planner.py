"""Pure decisions: which systems get a task, and what a case's outcome is."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..registry import SystemDeclaration
from ..rights import (
    ACTION_FOR_RIGHT,
    NO_VERIFICATION,
    TERMINAL_TASK,
    Action,
    CaseStatus,
    IdentifierType,
    Right,
    TaskStatus,
)


@dataclass(frozen=True, slots=True)
class PlannedTask:
    system: str
    action: Action
    #: only the identifier types this system searches by (data minimisation on its topic)
    identifiers: dict[IdentifierType, str]


def needs_verification(right: Right, verified: bool) -> bool:
    return not verified and right not in NO_VERIFICATION


def plan(
    right: Right, identifiers: Mapping[IdentifierType, str], systems: Iterable[SystemDeclaration]
) -> list[PlannedTask]:
    """One task per system that supports the right's action and searches by an identifier we have."""
    action = ACTION_FOR_RIGHT.get(right)
    if action is None:
        return []
    tasks = []
    for system in sorted(systems, key=lambda s: s.name):
        if not system.supports(action):
            continue
        ids = {t: identifiers[t] for t in system.identifier_types if t in identifiers}
        if ids:
            tasks.append(PlannedTask(system.name, action, ids))
    return tasks


def outcome(task_statuses: Sequence[TaskStatus]) -> CaseStatus | None:
    """The case status once every task is terminal; None while any task is open.

    A failed task fails the case (the DPO must act); data kept by law or a refusal
    completes it with exceptions, so the subject is told honestly what was kept.
    """
    if any(s not in TERMINAL_TASK for s in task_statuses):
        return None
    if any(s == TaskStatus.failed for s in task_statuses):
        return CaseStatus.failed
    if any(s in (TaskStatus.retained, TaskStatus.refused) for s in task_statuses):
        return CaseStatus.completed_with_exceptions
    return CaseStatus.completed

