"""Read queries over the case store for the DPO's HTTP API and tooling.

Each function takes a connection or a pool, runs one statement and returns frozen
read models; JSON columns come back decoded whether or not the connection has a
jsonb codec. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

import orjson

from ..rights import TERMINAL_CASE, CaseStatus, Right


class Executor(Protocol):
    """An ``asyncpg.Connection``, or an ``asyncpg.Pool`` that lends one for the statement."""

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]: ...

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any: ...

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any: ...


_TERMINAL = sorted(s.value for s in TERMINAL_CASE)

# $1: terminal statuses, $2: now. One definition of "overdue", used to select and to filter.
_OVERDUE = "(c.status <> ALL($1::text[]) AND c.due_at < $2)"

_SUMMARY_COLUMNS = f"""
    c.case_id, c.request_id, c.right_name, c.jurisdiction, c.status,
    c.received_at, c.ack_due_at, c.due_at, c.completed_at, c.controller, c.target_at,
    {_OVERDUE} AS overdue,
    COALESCE((SELECT jsonb_object_agg(s.status, s.n)
              FROM (SELECT t.status, count(*) AS n FROM tasks t
                    WHERE t.case_id = c.case_id GROUP BY t.status) s), '{{}}'::jsonb) AS task_counts"""


@dataclass(frozen=True, slots=True)
class CaseKey:
    """A case's place in the newest-first order: the keyset for pagination."""

    received_at: datetime
    case_id: UUID


@dataclass(frozen=True, slots=True)
class CaseSummary:
    case_id: UUID
    request_id: str
    right: str
    jurisdiction: str
    status: str
    received_at: datetime
    ack_due_at: datetime
    due_at: datetime
    completed_at: datetime | None
    overdue: bool
    task_counts: dict[str, int]
    controller: str = "default"
    target_at: datetime | None = None

    @property
    def key(self) -> CaseKey:
        return CaseKey(self.received_at, self.case_id)


@dataclass(frozen=True, slots=True)
class CasePage:
    items: list[CaseSummary]
    #: Key of the last item when more cases follow it; None on the last page.
    next_after: CaseKey | None


@dataclass(frozen=True, slots=True)
class CaseDetail:
    summary: CaseSummary
    #: Identifiers as submitted: personal data.
    subject: dict[str, Any]
    verified: bool
    channel: str | None
    changes: dict[str, Any] | None
    purposes: list[Any] | None
    outcome: dict[str, Any] | None
    bundle: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    #: when the access bundle and the exports it was built from were deleted (bundle_retention)
    exports_deleted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TaskRow:
    task_id: UUID
    system: str
    action: str
    status: str
    attempt: int
    dispatched_at: datetime | None
    completed_at: datetime | None
    result: dict[str, Any] | None
    error: str | None
    kind: str = "worker"
    reason: str | None = None
    decided_by: str | None = None
    note: str | None = None
    case_id: UUID | None = None
    assignee: str | None = None
    #: the latest progress its worker reported for the current attempt: {attempt, seq, done, total,
    #: note}, and when the coordinator recorded it
    progress: dict[str, Any] | None = None
    progress_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TimelineRow:
    """One timeline entry with the chain fields :func:`dsrflow.store.timeline.verify` needs."""

    case_id: UUID
    position: int
    at: datetime
    kind: str
    detail: dict[str, Any]
    prev_hash: bytes
    hash: bytes


def _json(value: Any) -> Any:
    """A json/jsonb column: text without a codec, already decoded with one."""
    if isinstance(value, str | bytes):
        return orjson.loads(value)
    return value


def _summary(r: Mapping[str, Any]) -> CaseSummary:
    return CaseSummary(
        case_id=r["case_id"],
        request_id=r["request_id"],
        right=r["right_name"],
        jurisdiction=r["jurisdiction"],
        status=r["status"],
        received_at=r["received_at"],
        ack_due_at=r["ack_due_at"],
        due_at=r["due_at"],
        completed_at=r["completed_at"],
        overdue=r["overdue"],
        task_counts={str(k): int(v) for k, v in _json(r["task_counts"]).items()},
        controller=r["controller"],
        target_at=r["target_at"],
    )


async def list_cases(
    db: Executor,
    *,
    now: datetime,
    status: CaseStatus | None = None,
    right: Right | None = None,
    overdue: bool | None = None,
    controller: str | None = None,
    after: CaseKey | None = None,
    limit: int = 50,
) -> CasePage:
    """Cases newest first (received_at, then case_id, both descending), at most ``limit``,
    starting after ``after``. ``overdue`` is judged at ``now``; ``controller`` keeps one tenant's."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    args: list[Any] = [_TERMINAL, now]
    where: list[str] = []
    # Only the filters given go into the statement, so each shape gets a plan that uses its index.
    if status is not None:
        args.append(status.value)
        where.append(f"c.status = ${len(args)}")
    if right is not None:
        args.append(right.value)
        where.append(f"c.right_name = ${len(args)}")
    if overdue is not None:
        where.append(_OVERDUE if overdue else f"NOT {_OVERDUE}")
    if controller is not None:
        args.append(controller)
        where.append(f"c.controller = ${len(args)}")
    if after is not None:
        args.extend((after.received_at, after.case_id))
        where.append(f"(c.received_at, c.case_id) < (${len(args) - 1}, ${len(args)}::uuid)")
    args.append(limit + 1)  # one more than asked tells whether another page follows
    sql = (
        f"SELECT {_SUMMARY_COLUMNS} FROM cases c"
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY c.received_at DESC, c.case_id DESC LIMIT ${len(args)}"
    )
    rows = await db.fetch(sql, *args)
    items = [_summary(r) for r in rows[:limit]]
    return CasePage(items=items, next_after=items[-1].key if len(rows) > limit else None)


async def get_case(db: Executor, case_id: UUID, *, now: datetime) -> CaseDetail | None:
    """One case with its subject, outcome and bundle; None when there is no such case."""
    r = await db.fetchrow(
        f"""SELECT {_SUMMARY_COLUMNS}, c.subject, c.verified, c.channel, c.changes, c.purposes,
                   c.outcome, c.bundle, c.created_at, c.updated_at, c.exports_deleted_at
            FROM cases c WHERE c.case_id = $3""",
        _TERMINAL, now, case_id,
    )
    if r is None:
        return None
    return CaseDetail(
        summary=_summary(r),
        subject=_json(r["subject"]),
        verified=r["verified"],
        channel=r["channel"],
        changes=_json(r["changes"]),
        purposes=_json(r["purposes"]),
        outcome=_json(r["outcome"]),
        bundle=_json(r["bundle"]),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        exports_deleted_at=r["exports_deleted_at"],
    )


_TASK_COLUMNS = """task_id, case_id, system, action, status, attempt, dispatched_at, completed_at, result, error,
                   kind, reason, decided_by, note, assignee, progress, progress_at"""


def _task_row(r: Mapping[str, Any]) -> TaskRow:
    return TaskRow(
        task_id=r["task_id"], system=r["system"], action=r["action"], status=r["status"], attempt=r["attempt"],
        dispatched_at=r["dispatched_at"], completed_at=r["completed_at"], result=_json(r["result"]),
        error=r["error"], kind=r["kind"], reason=r["reason"], decided_by=r["decided_by"], note=r["note"],
        case_id=r["case_id"], assignee=r["assignee"], progress=_json(r["progress"]), progress_at=r["progress_at"],
    )


async def case_tasks(db: Executor, case_id: UUID) -> list[TaskRow]:
    """The case's tasks, ordered by system name and action."""
    rows = await db.fetch(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE case_id = $1 ORDER BY system, action", case_id)
    return [_task_row(r) for r in rows]


async def tasks_by_status(db: Executor, status: str, *, limit: int = 100) -> list[TaskRow]:
    """Tasks in one status across cases, oldest first (``manual``: the tasks waiting for a person)."""
    rows = await db.fetch(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE status = $1 ORDER BY created_at LIMIT $2",
                          status, limit)
    return [_task_row(r) for r in rows]


async def task_case(db: Executor, task_id: UUID) -> UUID | None:
    """The case a task belongs to."""
    case_id: UUID | None = await db.fetchval("SELECT case_id FROM tasks WHERE task_id = $1", task_id)
    return case_id


async def case_timeline(db: Executor, case_id: UUID) -> list[TimelineRow]:
    """The case's timeline in chain order, with the hashes needed to verify it."""
    rows = await db.fetch(
        """SELECT case_id, position, at, kind, detail, prev_hash, hash
           FROM case_timeline WHERE case_id = $1 ORDER BY position""",
        case_id,
    )
    return [
        TimelineRow(
            case_id=r["case_id"],
            position=r["position"],
            at=r["at"],
            kind=r["kind"],
            detail=_json(r["detail"]),
            prev_hash=bytes(r["prev_hash"]),
            hash=bytes(r["hash"]),
        )
        for r in rows
    ]


__all__ = [
    "CaseDetail",
    "CaseKey",
    "CasePage",
    "CaseSummary",
    "Executor",
    "TaskRow",
    "TimelineRow",
    "case_tasks",
    "case_timeline",
    "get_case",
    "list_cases",
]
