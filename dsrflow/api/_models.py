"""Response models of the HTTP API: they are the OpenAPI document's schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from ..domain.planner import TaskKind
from ..domain.timeline import TimelineKind
from ..events import Artifact
from ..rights import Action, CaseStatus, IdentifierType, Right, TaskStatus
from ..store import queries


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class CaseSummary(_Model):
    """A case as listed: no personal data."""

    case_id: UUID
    request_id: str = Field(description="the requesting app's id for the request")
    right: Right
    jurisdiction: str
    status: CaseStatus
    received_at: datetime
    ack_due_at: datetime = Field(description="deadline to acknowledge the request")
    due_at: datetime = Field(description="deadline to complete the request")
    overdue: bool = Field(description="not in a terminal status and past due_at")
    completed_at: datetime | None
    task_counts: dict[TaskStatus, int] = Field(description="number of the case's tasks in each status")
    controller: str = Field(description="the controller (tenant) the request was made to")
    target_at: datetime | None = Field(description="the organisation's internal target, before due_at")

    @classmethod
    def of(cls, row: queries.CaseSummary) -> CaseSummary:
        return cls(
            case_id=row.case_id,
            request_id=row.request_id,
            right=Right(row.right),
            jurisdiction=row.jurisdiction,
            status=CaseStatus(row.status),
            received_at=row.received_at,
            ack_due_at=row.ack_due_at,
            due_at=row.due_at,
            overdue=row.overdue,
            completed_at=row.completed_at,
            task_counts={TaskStatus(k): v for k, v in row.task_counts.items()},
            controller=row.controller,
            target_at=row.target_at,
        )


class CaseList(_Model):
    items: list[CaseSummary] = Field(description="newest first: by received_at, then case_id, descending")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class SubjectIdentifiers(_Model):
    """Who the request is about. Personal data."""

    identifiers: dict[IdentifierType, str] = Field(description="identifier type -> value, as submitted")


class TaskProgress(_Model):
    """The latest progress a task's worker reported while it runs (no personal data)."""

    seq: int = Field(description="1, 2, 3... per attempt: the latest one the coordinator received")
    done: int | None = Field(description="units of work done so far (records, tables...), if the worker said")
    total: int | None = Field(description="units of work in all, when known")
    note: str | None = Field(description="what the worker is doing")
    at: datetime = Field(description="when the coordinator received it: the task's wait for its receipt runs "
                         "from here, or from dispatched_at if later")

    @classmethod
    def of(cls, progress: dict[str, Any] | None, at: datetime | None) -> TaskProgress | None:
        if progress is None or at is None:
            return None
        return cls(seq=progress["seq"], done=progress.get("done"), total=progress.get("total"),
                   note=progress.get("note"), at=at)


class Task(_Model):
    """One system's share of the work."""

    task_id: UUID
    system: str
    action: Action
    status: TaskStatus
    attempt: int
    dispatched_at: datetime | None
    completed_at: datetime | None
    result: dict[str, Any] | None = Field(
        description="the last receipt's counts, categories, retained items and artifacts"
    )
    error: str | None
    kind: TaskKind = Field(description="worker: a system's worker does it; manual: a person does it")
    reason: str | None = Field(default=None, description="manual tasks: why a person must act")
    decided_by: str | None = Field(default=None, description="who completed, declined or skipped it")
    note: str | None = Field(default=None, description="what the person did, or why not")
    progress: TaskProgress | None = Field(
        default=None, description="the latest progress its worker reported for the current attempt (a re-dispatch "
        "clears it); null when none was")

    @classmethod
    def of(cls, row: queries.TaskRow) -> Task:
        return cls(
            task_id=row.task_id,
            system=row.system,
            action=Action(row.action),
            status=TaskStatus(row.status),
            attempt=row.attempt,
            dispatched_at=row.dispatched_at,
            completed_at=row.completed_at,
            result=row.result,
            error=row.error,
            kind=TaskKind(row.kind),
            reason=row.reason,
            decided_by=row.decided_by,
            note=row.note,
            progress=TaskProgress.of(row.progress, row.progress_at),
        )


class TimelineEntry(_Model):
    position: int = Field(description="1-based place in the case's hash chain")
    at: datetime
    kind: TimelineKind = Field(description="what happened")
    detail: dict[str, Any]

    @classmethod
    def of(cls, row: queries.TimelineRow) -> TimelineEntry:
        return cls(position=row.position, at=row.at, kind=TimelineKind(row.kind), detail=row.detail)


class CaseDetail(CaseSummary):
    """A case with everything the DPO needs to answer it. Contains personal data."""

    subject: SubjectIdentifiers
    verified: bool = Field(description="the subject's identity was verified")
    channel: str | None
    changes: dict[str, str] | None = Field(description="rectification: field -> corrected value")
    purposes: list[str] | None = Field(description="objection / consent withdrawal: purposes")
    outcome: dict[str, Any] | None
    bundle: Artifact | None = Field(description="the access bundle in the export store")
    exports_deleted_at: datetime | None = Field(
        default=None, description="when the access bundle and the exports it was built from were deleted, "
        "bundle_retention after the case finished; null while they are kept")
    created_at: datetime
    updated_at: datetime
    tasks: list[Task]
    timeline: list[TimelineEntry]
    timeline_verified: bool = Field(
        description="the timeline's hash chain is unbroken and ends where the case row's anchor says: "
        "no entry altered, inserted, deleted or cut off")

    @classmethod
    def build(
        cls,
        case: queries.CaseDetail,
        tasks: list[queries.TaskRow],
        timeline: list[queries.TimelineRow],
        *,
        timeline_verified: bool,
    ) -> CaseDetail:
        summary = CaseSummary.of(case.summary)
        # Stored flat ({"email": ...}); also read the event's {"identifiers": {...}} shape.
        ids = case.subject.get("identifiers", case.subject)
        return cls(
            **dict(summary),
            subject=SubjectIdentifiers(identifiers={IdentifierType(k): str(v) for k, v in ids.items()}),
            verified=case.verified,
            channel=case.channel,
            changes=case.changes,
            purposes=case.purposes,
            outcome=case.outcome,
            bundle=Artifact.model_validate(case.bundle) if case.bundle is not None else None,
            exports_deleted_at=case.exports_deleted_at,
            created_at=case.created_at,
            updated_at=case.updated_at,
            tasks=[Task.of(t) for t in tasks],
            timeline=[TimelineEntry.of(e) for e in timeline],
            timeline_verified=timeline_verified,
        )


class Health(_Model):
    status: Literal["ok"] = "ok"
