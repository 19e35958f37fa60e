"""Timeline entries: what happened to a case, in order. The store chains them by hash
(:mod:`dsrflow.store.timeline`); the kinds are the CHECK constraint of ``case_timeline.kind``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID


class TimelineKind(StrEnum):
    received = "received"
    duplicate_request = "duplicate_request"
    awaiting_verification = "awaiting_verification"
    verified = "verified"
    no_systems_registered = "no_systems_registered"
    information_answered = "information_answered"
    tasks_dispatched = "tasks_dispatched"
    tasks_planned_late = "tasks_planned_late"  # a system registered after the case was planned
    manual_tasks_opened = "manual_tasks_opened"
    systems_not_asked = "systems_not_asked"  # with why: nothing is left out silently
    task_succeeded = "task_succeeded"
    task_not_found = "task_not_found"
    task_retained = "task_retained"
    task_conflict = "task_conflict"
    task_refused = "task_refused"
    task_failed = "task_failed"
    task_retried = "task_retried"
    task_redispatched = "task_redispatched"
    task_stalled = "task_stalled"
    manual_completed = "manual_completed"
    manual_declined = "manual_declined"
    task_skipped = "task_skipped"
    task_retried_by_dpo = "task_retried_by_dpo"
    reopened = "reopened"  # a finished case opened again: the DPO retried one of its tasks
    restriction_lifted = "restriction_lifted"
    deadline_extended = "deadline_extended"
    denied = "denied"
    held = "held"
    released = "released"
    completed = "completed"
    failed = "failed"
    outcome_updated = "outcome_updated"
    acknowledged = "acknowledged"  # the subject was told the request arrived: on time against ack_due_at?
    deadline_warning = "deadline_warning"
    target_passed = "target_passed"  # the organisation's internal target went by
    deadline_overdue = "deadline_overdue"
    task_reassigned = "task_reassigned"
    pseudonymised = "pseudonymised"  # a closed case's identifiers, corrections and notes were replaced
    exports_expired = "exports_expired"  # the access bundle and its exports were deleted: bundle_retention


@dataclass(frozen=True, slots=True)
class Entry:
    case_id: UUID
    kind: str
    detail: Mapping[str, Any]
    at: datetime
