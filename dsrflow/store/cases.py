"""Cases and tasks in PostgreSQL: the repository behind the case core (:mod:`dsrflow.domain.case`).

The coordinator works in units of work: inside one transaction it claims the batch's events in
the inbox, loads (and locks, in case-id order) the cases they touch, runs the transitions, and
:func:`save` writes the changed cases and tasks with the transitions' timeline entries and
outgoing events. Either all of it commits or none of it does.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import asyncpg
import orjson

from .. import topics
from ..domain.case import Case, Effects, Task, TaskKind
from ..events import Artifact
from ..rights import Action, CaseStatus, IdentifierType, Right, TaskStatus
from . import outbox
from .timeline import append

__all__ = ["cases_to_pseudonymise", "cases_to_watch", "find_request_ids", "insert", "load", "record", "save",
           "stale_cases", "task_wait", "unplanned_cases"]

SOURCE = "dsrflow/coordinator"


def _loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _j(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _task(row: Mapping[str, Any]) -> Task:
    return Task(
        task_id=row["task_id"], case_id=row["case_id"], system=row["system"], action=Action(row["action"]),
        status=TaskStatus(row["status"]), kind=TaskKind(row["kind"]), attempt=row["attempt"],
        dispatched_at=row["dispatched_at"], completed_at=row["completed_at"], result=_loads(row["result"]),
        error=row["error"], reason=row["reason"], changes=_loads(row["changes"]), decided_by=row["decided_by"],
        note=row["note"], assignee=row["assignee"], progress=_loads(row["progress"]), progress_at=row["progress_at"],
    )


def _case(row: Mapping[str, Any], tasks: Iterable[Task]) -> Case:
    bundle = _loads(row["bundle"])
    verification = _loads(row["verification"])
    if verification is None and row["verified"]:  # a case from before identifiers were verified one by one
        verification = [{"identifier": t, "method": "upstream", "verified_by": None, "verified_at": None}
                        for t in _loads(row["subject"])]
    return Case(
        case_id=row["case_id"], request_id=row["request_id"], request_event=row["request_event"],
        right=Right(row["right_name"]), jurisdiction=row["jurisdiction"], status=CaseStatus(row["status"]),
        subject={IdentifierType(k): v for k, v in _loads(row["subject"]).items()},
        received_at=row["received_at"], ack_due_at=row["ack_due_at"], due_at=row["due_at"],
        verification=verification or [], requester=_loads(row["requester"]), channel=row["channel"],
        changes=_loads(row["changes"]), purposes=_loads(row["purposes"]), completed_at=row["completed_at"],
        outcome=_loads(row["outcome"]), bundle=Artifact.model_validate(bundle) if bundle else None,
        lifted_at=row["lifted_at"], considered=list(row["considered"]),
        max_extension_until=row["max_extension_until"], original_due_at=row["original_due_at"],
        extension=_loads(row["extension"]), hold=_loads(row["hold"]), opened=_loads(row["opened"]),
        controller=row["controller"], acknowledged_at=row["acknowledged_at"], target_at=row["target_at"],
        warned_at=row["warned_at"], target_passed_at=row["target_passed_at"], overdue_at=row["overdue_at"],
        pseudonymised_at=row["pseudonymised_at"], scope=row["scope"],
        tasks=sorted(tasks, key=lambda t: (t.system, t.action)),
    )


async def load(conn: asyncpg.Connection, case_ids: Iterable[uuid.UUID], *, skip_locked: bool = False) -> dict[
        uuid.UUID, Case]:
    """The cases with their tasks, locked for the transaction (in case-id order, so concurrent
    batches cannot deadlock; ``skip_locked`` leaves out cases another transaction holds)."""
    ids = sorted(set(case_ids))
    if not ids:
        return {}
    lock = "FOR UPDATE SKIP LOCKED" if skip_locked else "FOR UPDATE"
    rows = await conn.fetch(f"SELECT * FROM cases WHERE case_id = ANY($1::uuid[]) ORDER BY case_id {lock}", ids)
    tasks: dict[uuid.UUID, list[Task]] = {}
    for r in await conn.fetch("SELECT * FROM tasks WHERE case_id = ANY($1::uuid[])", [r["case_id"] for r in rows]):
        tasks.setdefault(r["case_id"], []).append(_task(r))
    return {r["case_id"]: _case(r, tasks.get(r["case_id"], [])) for r in rows}


async def find_request_ids(conn: asyncpg.Connection,
                           requests: Iterable[tuple[str, str]]) -> dict[tuple[str, str], uuid.UUID]:
    """Cases already opened for these (controller, request id) pairs, locked: a concurrent intake of
    the same request waits. Request ids are the requesting app's, unique per controller only."""
    pairs = sorted(set(requests))
    if not pairs:
        return {}
    rows = await conn.fetch(
        """SELECT c.controller, c.request_id, c.case_id FROM cases c
           JOIN unnest($1::text[], $2::text[]) AS r(controller, request_id) USING (controller, request_id)
           ORDER BY c.case_id FOR UPDATE OF c""",
        [p[0] for p in pairs], [p[1] for p in pairs])
    return {(r["controller"], r["request_id"]): r["case_id"] for r in rows}


def _case_params(c: Case) -> tuple[Any, ...]:
    return (
        c.case_id, c.request_id, c.request_event, str(c.right), c.jurisdiction, str(c.status),
        _j({str(k): v for k, v in c.subject.items()}), c.verified, c.channel, _j(c.changes), _j(c.purposes),
        c.received_at, c.ack_due_at, c.due_at, c.completed_at, _j(c.outcome),
        _j(c.bundle.model_dump(mode="json")) if c.bundle else None, _j(c.verification or None), _j(c.requester),
        c.lifted_at, c.considered, c.max_extension_until, c.original_due_at, _j(c.extension), _j(c.hold),
        _j(c.opened), c.controller, c.acknowledged_at, c.target_at, c.scope,
    )


async def insert(conn: asyncpg.Connection, cases: Sequence[Case]) -> None:
    """New cases, with their tasks."""
    await conn.executemany(
        """INSERT INTO cases (case_id, request_id, request_event, right_name, jurisdiction, status, subject, verified,
               channel, changes, purposes, received_at, ack_due_at, due_at, completed_at, outcome, bundle,
               verification, requester, lifted_at, considered, max_extension_until, original_due_at, extension,
               hold, opened, controller, acknowledged_at, target_at, scope)
           VALUES ($1,$2,$3,$4,$5,$6,$7::jsonb,$8,$9,$10::jsonb,$11::jsonb,$12,$13,$14,$15,$16::jsonb,$17::jsonb,
                   $18::jsonb,$19::jsonb,$20,$21,$22,$23,$24::jsonb,$25::jsonb,$26::jsonb,$27,$28,$29,$30)""",
        [_case_params(c) for c in cases],
    )
    for c in cases:
        c.dirty = False
    await _save_tasks(conn, [t for c in cases for t in c.tasks if t.dirty])


async def save(conn: asyncpg.Connection, cases: Iterable[Case]) -> None:
    """The changed cases and tasks of cases already stored."""
    cases = list(cases)
    changed = [c for c in cases if c.dirty]
    await conn.executemany(
        """UPDATE cases SET status=$2, verified=$3, outcome=$4::jsonb, bundle=$5::jsonb, completed_at=$6,
               verification=$7::jsonb, requester=$8::jsonb, lifted_at=$9, considered=$10, due_at=$11,
               original_due_at=$12, extension=$13::jsonb, hold=$14::jsonb, warned_at=$15, target_passed_at=$16,
               overdue_at=$17, subject=$18::jsonb, changes=$19::jsonb, opened=$20::jsonb, pseudonymised_at=$21,
               updated_at=now()
           WHERE case_id=$1""",
        [(c.case_id, str(c.status), c.verified, _j(c.outcome), _j(c.bundle.model_dump(mode="json")) if c.bundle
          else None, c.completed_at, _j(c.verification or None), _j(c.requester), c.lifted_at, c.considered,
          c.due_at, c.original_due_at, _j(c.extension), _j(c.hold), c.warned_at, c.target_passed_at, c.overdue_at,
          _j({str(k): v for k, v in c.subject.items()}), _j(c.changes), _j(c.opened), c.pseudonymised_at)
         for c in changed],
    )
    for c in changed:
        c.dirty = False
    tasks = [t for c in cases for t in c.tasks]
    await _save_progress(conn, [t for t in tasks if t.progressed and not t.dirty])
    await _save_tasks(conn, [t for t in tasks if t.dirty])


async def _save_tasks(conn: asyncpg.Connection, tasks: Sequence[Task]) -> None:
    await conn.executemany(
        """INSERT INTO tasks (task_id, case_id, system, action, status, kind, attempt, dispatched_at, completed_at,
               result, error, reason, changes, decided_by, note, assignee, progress_at, progress)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10::jsonb,$11,$12,$13::jsonb,$14,$15,$16,$17,$18::jsonb)
           ON CONFLICT (task_id) DO UPDATE SET status=EXCLUDED.status, kind=EXCLUDED.kind,
               reason=EXCLUDED.reason, attempt=EXCLUDED.attempt, assignee=EXCLUDED.assignee,
               changes=EXCLUDED.changes,
               dispatched_at=EXCLUDED.dispatched_at, completed_at=EXCLUDED.completed_at, result=EXCLUDED.result,
               error=EXCLUDED.error, decided_by=EXCLUDED.decided_by, note=EXCLUDED.note,
               progress_at=EXCLUDED.progress_at, progress=EXCLUDED.progress, updated_at=now()""",
        [(t.task_id, t.case_id, t.system, str(t.action), str(t.status), str(t.kind), t.attempt, t.dispatched_at,
          t.completed_at, _j(t.result), t.error, t.reason, _j(t.changes), t.decided_by, t.note, t.assignee,
          t.progress_at, _j(t.progress))
         for t in tasks],
    )
    for t in tasks:
        t.dirty = t.progressed = False


async def _save_progress(conn: asyncpg.Connection, tasks: Sequence[Task]) -> None:
    """Tasks whose progress alone changed: those two columns (the row's updated_at stays about
    the task's state)."""
    await conn.executemany("UPDATE tasks SET progress_at = $2, progress = $3::jsonb WHERE task_id = $1",
                           [(t.task_id, t.progress_at, _j(t.progress)) for t in tasks])
    for t in tasks:
        t.progressed = False


async def record(conn: asyncpg.Connection, effects: Effects, *, extra: Iterable[outbox.OutboxMessage] = ()) -> None:
    """Append the effects' timeline entries and queue their events (and ``extra`` messages, such as
    dead letters) in the outbox. Call after :func:`insert` / :func:`save`, in the same transaction."""
    heads = await append(conn, effects.timeline)
    # One CaseUpdated per case per unit of work: the last one, which holds the state being committed,
    # with the timeline's new head as an anchor outside the case store. A case whose timeline grew
    # without one (a duplicate request noted on it, say) gets one too, so the anchor on the topic
    # never lags the table.
    events_in = list(effects.events)
    published = {key for topic, key, _ in events_in if topic == topics.CASES}
    unanchored = [case_id for case_id in heads if str(case_id) not in published]
    if unanchored:
        at = max(e.at for e in effects.timeline)
        for case in (await load(conn, unanchored)).values():
            events_in.append(case.case_event(at))
    effects = Effects(effects.timeline, events_in)
    last_state = {key: i for i, (topic, key, _) in enumerate(effects.events) if topic == topics.CASES}
    events = []
    for i, (topic, key, event) in enumerate(effects.events):
        if topic == topics.CASES:
            if last_state[key] != i:
                continue
            head = heads.get(uuid.UUID(key)) or await _head(conn, uuid.UUID(key))
            if head is not None:
                event = event.model_copy(update={"timeline_length": head[0], "timeline_head": head[1].hex()})
        events.append((topic, key, event))
    messages = [outbox.message(topic, key, event, source=SOURCE, subject=key) for topic, key, event in events]
    await outbox.add(conn, [*messages, *extra])


async def _head(conn: asyncpg.Connection, case_id: uuid.UUID) -> tuple[int, bytes] | None:
    row = await conn.fetchrow("SELECT timeline_length, timeline_head FROM cases WHERE case_id = $1", case_id)
    if row is None or row["timeline_head"] is None:
        return None
    return row["timeline_length"], bytes(row["timeline_head"])


async def stale_cases(conn: asyncpg.Connection, now: Any, timeout: Any, cap: Any, limit: int) -> list[uuid.UUID]:
    """Cases (not on hold) with a task whose wait for a receipt ran out: the task timeout, doubled
    with every attempt up to ``cap`` (the same rule as :func:`task_wait`), counted from when it
    was sent or from its latest progress, whichever is later (``Task.waiting_since``)."""
    return [r["case_id"] for r in await conn.fetch(
        """SELECT t.case_id FROM tasks t JOIN cases c USING (case_id)
           WHERE t.status = 'dispatched' AND c.status <> 'on_hold'
             AND GREATEST(t.dispatched_at, t.progress_at)
                 + LEAST($2::interval * power(2, LEAST(t.attempt - 1, 30)), $3::interval) < $1
           GROUP BY t.case_id ORDER BY min(GREATEST(t.dispatched_at, t.progress_at)) LIMIT $4""",
        now, timeout, cap, limit)]


def task_wait(timeout: Any, cap: Any, attempt: int) -> Any:
    """How long attempt ``attempt`` of a task waits for its receipt: ``timeout`` doubled with every
    attempt after the first, at most ``cap``."""
    return min(timeout * 2 ** min(attempt - 1, 30), cap)


async def cases_to_watch(conn: asyncpg.Connection, now: Any, warning_share: float, limit: int) -> list[uuid.UUID]:
    """Open cases the deadline watcher has news for: a warning due, the internal target passed, or
    the due date passed, not yet recorded."""
    return [r["case_id"] for r in await conn.fetch(
        """SELECT case_id FROM cases
           WHERE completed_at IS NULL
             AND status NOT IN ('completed', 'completed_with_exceptions', 'denied', 'failed')
             AND ((overdue_at IS NULL AND due_at < $1)
                  OR (warned_at IS NULL AND received_at + (due_at - received_at) * $2::float8 <= $1)
                  OR (target_at IS NOT NULL AND target_passed_at IS NULL AND target_at < $1))
           ORDER BY due_at LIMIT $3""",
        now, warning_share, limit)]


async def cases_to_pseudonymise(conn: asyncpg.Connection, before: Any, lasting: Sequence[str],
                                limit: int) -> list[uuid.UUID]:
    """Closed cases, finished before ``before``, not pseudonymised yet, and not a lasting effect
    still in force."""
    return [r["case_id"] for r in await conn.fetch(
        """SELECT case_id FROM cases
           WHERE completed_at < $1 AND pseudonymised_at IS NULL
             AND status IN ('completed', 'completed_with_exceptions', 'denied', 'failed')
             AND NOT (right_name = ANY($2::text[]) AND lifted_at IS NULL AND status <> 'denied')
           ORDER BY completed_at LIMIT $3""",
        before, list(lasting), limit)]


async def unplanned_cases(conn: asyncpg.Connection, systems: Sequence[str], lasting: Sequence[str],
                          fan_out: Sequence[str], limit: int) -> list[uuid.UUID]:
    """Cases a registered system of their own controller has not been considered for yet: open
    fan-out cases, and finished cases whose lasting effect is still in force (not lifted). Rights
    without fan-out (a complaint) never qualify, so they cannot crowd out the cases that do."""
    if not systems:
        return []
    return [r["case_id"] for r in await conn.fetch(
        """SELECT case_id FROM cases
           WHERE NOT (considered @> ARRAY(SELECT name FROM systems s
                                          WHERE s.active AND s.name = ANY($1::text[])
                                            AND s.controller = cases.controller))
             AND right_name = ANY($3::text[]) AND lifted_at IS NULL
             AND (status = 'in_progress'
                  OR (right_name = ANY($2::text[])
                      AND status IN ('completed', 'completed_with_exceptions', 'failed')))
           ORDER BY received_at LIMIT $4""",
        list(systems), list(lasting), list(fan_out), limit)]
