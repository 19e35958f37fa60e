"""The coordinator's effects: intake of requests and aggregation of receipts.

Each batch of records is handled in one PostgreSQL transaction: inbox claim, state
change, timeline entries and outgoing events (outbox) commit together or not at all.
Decisions are the pure functions of :mod:`.planner` and :mod:`dsrflow.policy`.
Bad input is dead-lettered through the outbox too, so it is never lost or half-sent.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from .. import codec, policy, topics
from ..events import Artifact, CaseUpdated, DeadLetter, RightsRequested, TaskAssigned, TaskReceipt
from ..exports import BundleError, ExportError, ExportStore, LocalExportStore, build_bundle
from ..registry import SystemDeclaration, active_systems
from ..rights import ACTION_FOR_RIGHT, TERMINAL_TASK, CaseStatus, IdentifierType, ReceiptStatus, Right, TaskStatus
from ..settings import Settings
from ..store import outbox
from ..store.outbox import OutboxMessage
from ..store.timeline import Entry, append
from . import planner

log = logging.getLogger("dsrflow.coordinator")

SOURCE = "dsrflow/coordinator"
INTAKE = "coordinator.requests"
AGGREGATOR = "coordinator.receipts"
BUNDLED_RIGHTS = frozenset({Right.access, Right.portability})


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
class _Batch:
    """What one transaction writes besides its own rows."""

    messages: list[OutboxMessage] = field(default_factory=list)
    timeline: list[Entry] = field(default_factory=list)

    def dead_letter(self, rec: Record, consumer: str, kind: str, error: str) -> None:
        record = DeadLetter(
            original_topic=rec.topic,
            original_partition=rec.partition,
            original_offset=rec.offset,
            consumer=consumer,
            error_type=kind,
            error=error[:4000],
            failed_at=datetime.now(UTC),
        )
        headers = list(rec.headers.items()) if isinstance(rec.headers, Mapping) else list(rec.headers)
        value, dl_headers = codec.dead_letter(rec.value, headers, record)
        self.messages.append(OutboxMessage(topics.DEADLETTER, rec.key, value, dl_headers))
        log.warning("dead-lettered %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, kind)


def _j(value: Any) -> str:
    return orjson.dumps(value).decode()


def _case_event(case: Mapping[str, Any], tasks: Mapping[str, str], now: datetime) -> OutboxMessage:
    bundle = case.get("bundle")
    if isinstance(bundle, str):
        bundle = orjson.loads(bundle)
    event = CaseUpdated(
        case_id=case["case_id"],
        request_id=case["request_id"],
        right=case["right_name"],
        status=case["status"],
        jurisdiction=case["jurisdiction"],
        received_at=case["received_at"],
        due_at=case["due_at"],
        updated_at=now,
        tasks=dict(tasks),
        bundle=Artifact.model_validate(bundle) if bundle else None,
    )
    return outbox.message(topics.CASES, str(case["case_id"]), event, source=SOURCE, subject=str(case["case_id"]))


def _task_event(task: Mapping[str, Any], case: Mapping[str, Any], identifiers: Mapping[str, str]) -> OutboxMessage:
    event = TaskAssigned(
        task_id=task["task_id"],
        case_id=task["case_id"],
        system=task["system"],
        action=task["action"],
        right=case["right_name"],
        attempt=task["attempt"],
        identifiers={IdentifierType(k): v for k, v in identifiers.items()},
        due_at=case["due_at"],
        changes=case.get("changes"),
        purposes=case.get("purposes"),
    )
    return outbox.message(
        topics.tasks_topic(task["system"]), str(task["case_id"]), event, source=SOURCE, subject=str(task["case_id"])
    )


def _decode_all(
    records: Sequence[Record], model: type[Any], consumer: str, batch: _Batch
) -> list[tuple[Record, codec.Envelope[Any]]]:
    out = []
    seen: set[tuple[str, str]] = set()
    for rec in records:
        try:
            env = codec.decode(rec.value, rec.headers, model)
        except codec.DecodeError as exc:
            batch.dead_letter(rec, consumer, exc.kind, str(exc))
            continue
        if (env.source, env.id) in seen:  # same event twice in one batch: the inbox would count it once
            continue
        seen.add((env.source, env.id))
        out.append((rec, env))
    return out


class Coordinator:
    """Intake and aggregation, over an asyncpg pool and an export store."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, *, export_store: ExportStore | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.exports = export_store or LocalExportStore(settings.exports)

    async def dead_letter(self, rec: Record, consumer: str, kind: str, error: str) -> None:
        """Dead-letter one record on its own (used when processing it raised)."""
        batch = _Batch()
        batch.dead_letter(rec, consumer, kind, error)
        async with self.pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, batch.messages)

    async def _handle(self, records: Sequence[Record], model: type[Any], consumer: str, apply: Any) -> None:
        """Decode (bad records are dead-lettered), drop events the inbox has seen, apply the rest,
        and write timeline and outbox: all in one transaction."""
        batch = _Batch()
        decoded = _decode_all(records, model, consumer, batch)
        now = datetime.now(UTC)
        async with self.pool.acquire() as conn, conn.transaction():
            fresh = await outbox.claim_inbox(conn, consumer, [(env.source, env.id) for _, env in decoded])
            decoded = [(rec, env) for rec, env in decoded if (env.source, env.id) in fresh]
            if decoded:
                await apply(conn, decoded, batch, now)
            await append(conn, batch.timeline)
            await outbox.add(conn, batch.messages)

    # -- intake ------------------------------------------------------------
    async def handle_requests(self, records: Sequence[Record]) -> None:
        """Open a case per new request (one transaction for the batch)."""
        await self._handle(records, RightsRequested, INTAKE, self._open_cases)

    async def _open_cases(
        self, conn: asyncpg.Connection, decoded: list[tuple[Record, codec.Envelope[RightsRequested]]],
        batch: _Batch, now: datetime,
    ) -> None:
        request_ids = list({env.data.request_id for _, env in decoded})
        existing = {
            r["request_id"]: r["case_id"]
            for r in await conn.fetch(
                "SELECT request_id, case_id FROM cases WHERE request_id = ANY($1::text[]) ORDER BY case_id FOR UPDATE",
                request_ids,
            )
        }
        systems = await active_systems(conn)
        cases: list[dict[str, Any]] = []
        tasks: list[dict[str, Any]] = []
        for rec, env in decoded:
            req = env.data
            if req.request_id in existing:
                batch.timeline.append(
                    Entry(existing[req.request_id], "duplicate_request",
                          {"event_id": env.id, "source": env.source}, now)
                )
                log.info("duplicate request for case %s ignored", existing[req.request_id])
                continue
            received = req.received_at or env.time
            try:
                due = policy.deadlines(req.right, req.jurisdiction, received)
            except policy.UnknownJurisdiction as exc:
                batch.dead_letter(rec, INTAKE, "unknown_jurisdiction", str(exc))
                continue
            case_id = uuid.uuid4()
            existing[req.request_id] = case_id
            case = {
                "case_id": case_id, "request_id": req.request_id, "request_event": env.id,
                "right_name": str(req.right), "jurisdiction": req.jurisdiction, "status": str(CaseStatus.received),
                "subject": {str(k): v for k, v in req.subject.identifiers.items()}, "verified": req.verified,
                "channel": req.channel, "changes": req.changes, "purposes": req.purposes, "received_at": received,
                "ack_due_at": due.ack_due_at, "due_at": due.due_at, "completed_at": None, "outcome": None,
                "bundle": None,
            }
            cases.append(case)
            batch.timeline.append(Entry(case_id, "received", {
                "event_id": env.id, "source": env.source, "right": str(req.right),
                "jurisdiction": req.jurisdiction, "due_at": due.due_at.isoformat(),
                "ack_due_at": due.ack_due_at.isoformat(), "basis": due.basis,
            }, now))
            tasks += _fan_out(case, systems, batch, now)
        await conn.executemany(
            """INSERT INTO cases (case_id, request_id, request_event, right_name, jurisdiction, status, subject,
                   verified, channel, changes, purposes, received_at, ack_due_at, due_at, completed_at, outcome)
               VALUES ($1,$2,$3,$4,$5,$6,$7::jsonb,$8,$9,$10::jsonb,$11::jsonb,$12,$13,$14,$15,$16::jsonb)""",
            [(c["case_id"], c["request_id"], c["request_event"], c["right_name"], c["jurisdiction"], c["status"],
              _j(c["subject"]), c["verified"], c["channel"], _j(c["changes"]) if c["changes"] else None,
              _j(c["purposes"]) if c["purposes"] else None, c["received_at"], c["ack_due_at"], c["due_at"],
              c["completed_at"], _j(c["outcome"]) if c["outcome"] else None) for c in cases],
        )
        await _insert_tasks(conn, tasks, now)

    # -- the DPO's decisions --------------------------------------------------
    async def verify(self, case_id: uuid.UUID, *, by: str, now: datetime | None = None) -> CaseStatus:
        """Record that the subject's identity was verified, and fan the case out to the systems.

        Raises :class:`CaseNotFound`, or :class:`InvalidTransition` unless the case is
        awaiting verification."""
        now = now or datetime.now(UTC)
        batch = _Batch()
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM cases WHERE case_id = $1 FOR UPDATE", case_id)
            if row is None:
                raise CaseNotFound(f"no case {case_id}")
            if row["status"] != CaseStatus.awaiting_verification:
                raise InvalidTransition(f"case {case_id} is {row['status']}, not awaiting verification")
            case = _case_view(row)
            case["verified"] = True
            batch.timeline.append(Entry(case_id, "verified", {"by": by}, now))
            tasks = _fan_out(case, await active_systems(conn), batch, now)
            await conn.execute(
                """UPDATE cases SET verified = true, status = $2, completed_at = $3, outcome = $4::jsonb,
                       updated_at = now() WHERE case_id = $1""",
                case_id, case["status"], case["completed_at"], _j(case["outcome"]) if case["outcome"] else None,
            )
            await _insert_tasks(conn, tasks, now)
            await append(conn, batch.timeline)
            await outbox.add(conn, batch.messages)
        log.info("case %s verified; %s", case_id, case["status"])
        return CaseStatus(case["status"])

    # -- aggregation ---------------------------------------------------------
    async def handle_receipts(self, records: Sequence[Record]) -> None:
        """Apply new receipts to their tasks and close finished cases (one transaction for the batch)."""
        await self._handle(records, TaskReceipt, AGGREGATOR, self._apply_receipts)

    async def _apply_receipts(
        self, conn: asyncpg.Connection, decoded: list[tuple[Record, codec.Envelope[TaskReceipt]]],
        batch: _Batch, now: datetime,
    ) -> None:
        case_ids = sorted({env.data.case_id for _, env in decoded})
        # Lock cases in a fixed order so concurrent batches cannot deadlock.
        cases = {
            r["case_id"]: dict(r)
            for r in await conn.fetch("SELECT * FROM cases WHERE case_id = ANY($1::uuid[]) ORDER BY case_id FOR UPDATE",
                                      case_ids)
        }
        tasks = {
            r["task_id"]: dict(r)
            for r in await conn.fetch("SELECT * FROM tasks WHERE case_id = ANY($1::uuid[])", case_ids)
        }
        changed_tasks: set[uuid.UUID] = set()
        receipt_rows = []
        for rec, env in decoded:
            r = env.data
            task = tasks.get(r.task_id)
            if task is None or task["case_id"] != r.case_id or task["system"] != r.system:
                batch.dead_letter(rec, AGGREGATOR, "unknown_task", f"no task {r.task_id} for case {r.case_id} "
                                  f"in system {r.system}")
                continue
            receipt_rows.append((env.id, r.task_id, r.case_id, r.system, r.attempt, str(r.status),
                                 _j(r.model_dump(mode="json", exclude_none=True))))
            if TaskStatus(task["status"]) in TERMINAL_TASK or r.attempt > task["attempt"]:
                continue  # a late duplicate, or an attempt never dispatched: recorded above, changes nothing
            if r.attempt < task["attempt"] and r.status == ReceiptStatus.failed:
                continue  # an earlier attempt's failure: its retry is already out
            # An earlier attempt that did finish counts: its effect happened (erased rows stay
            # erased), and the retry in flight would only report what is left.
            detail: dict[str, Any] = {"system": r.system, "attempt": r.attempt, "status": str(r.status)}
            if r.status == ReceiptStatus.failed and r.retryable and r.attempt < self.settings.max_task_attempts:
                task.update(attempt=r.attempt + 1, status=str(TaskStatus.dispatched), dispatched_at=now, error=r.error)
                case = cases[r.case_id]
                system_ids = await self._identifiers_for(conn, r.system, _loads(case["subject"]))
                batch.messages.append(_task_event(task, _case_view(case), system_ids))
                batch.timeline.append(Entry(r.case_id, "task_retried", {**detail, "next_attempt": r.attempt + 1}, now))
            else:
                task.update(status=str(r.status), completed_at=r.completed_at, error=r.error,
                            result=_j(r.model_dump(mode="json", include={"counts", "categories", "retained",
                                                                           "artifacts"})))
                batch.timeline.append(Entry(r.case_id, "task_" + str(r.status), {**detail, "counts": r.counts}, now))
            changed_tasks.add(r.task_id)
        await conn.executemany(
            """INSERT INTO receipts (event_id, task_id, case_id, system, attempt, status, body)
               VALUES ($1,$2,$3,$4,$5,$6,$7::jsonb) ON CONFLICT DO NOTHING""",
            receipt_rows,
        )
        await conn.executemany(
            """UPDATE tasks SET status=$2, attempt=$3, dispatched_at=$4, completed_at=$5, result=$6::jsonb,
                   error=$7, updated_at=now() WHERE task_id=$1""",
            [(t["task_id"], t["status"], t["attempt"], t["dispatched_at"], t["completed_at"], t["result"], t["error"])
             for tid, t in tasks.items() if tid in changed_tasks],
        )
        touched = {tasks[tid]["case_id"] for tid in changed_tasks}
        await self._close_finished(conn, [cases[c] for c in sorted(touched)], tasks, batch, now)

    # -- timers --------------------------------------------------------------
    async def sweep_stalled(self, now: datetime | None = None, *, limit: int = 500) -> int:
        """Re-dispatch tasks that got no receipt within ``task_timeout``; after the last attempt
        mark them stalled (a late receipt still completes them). Returns how many changed."""
        now = now or datetime.now(UTC)
        cutoff = now - self.settings.task_timeout
        batch = _Batch()
        async with self.pool.acquire() as conn, conn.transaction():
            case_ids = [r["case_id"] for r in await conn.fetch(
                """SELECT DISTINCT case_id FROM tasks WHERE status = 'dispatched' AND dispatched_at < $1
                   LIMIT $2""", cutoff, limit)]
            if not case_ids:
                return 0
            cases = {r["case_id"]: dict(r) for r in await conn.fetch(
                "SELECT * FROM cases WHERE case_id = ANY($1::uuid[]) ORDER BY case_id FOR UPDATE SKIP LOCKED",
                case_ids)}
            due = await conn.fetch(
                """SELECT * FROM tasks WHERE case_id = ANY($1::uuid[]) AND status = 'dispatched'
                   AND dispatched_at < $2""", list(cases), cutoff)
            updates = []
            for t in map(dict, due):
                case = cases[t["case_id"]]
                detail = {"system": t["system"], "attempt": t["attempt"],
                          "waited_s": int((now - t["dispatched_at"]).total_seconds())}
                if t["attempt"] < self.settings.max_task_attempts:
                    t.update(attempt=t["attempt"] + 1, dispatched_at=now)
                    ids = await self._identifiers_for(conn, t["system"], _loads(case["subject"]))
                    batch.messages.append(_task_event(t, _case_view(case), ids))
                    batch.timeline.append(Entry(t["case_id"], "task_redispatched",
                                                {**detail, "next_attempt": t["attempt"]}, now))
                else:
                    t["status"] = str(TaskStatus.stalled)
                    batch.timeline.append(Entry(t["case_id"], "task_stalled", detail, now))
                    log.warning("task %s of case %s stalled after %d attempts", t["task_id"], t["case_id"],
                                t["attempt"])
                updates.append((t["task_id"], t["status"], t["attempt"], t["dispatched_at"]))
            await conn.executemany(
                "UPDATE tasks SET status=$2, attempt=$3, dispatched_at=$4, updated_at=now() WHERE task_id=$1", updates)
            statuses: dict[uuid.UUID, dict[str, str]] = {}
            for r in await conn.fetch("SELECT case_id, system, status FROM tasks WHERE case_id = ANY($1::uuid[])",
                                      list(cases)):
                statuses.setdefault(r["case_id"], {})[r["system"]] = r["status"]
            for case_id in sorted({r["case_id"] for r in due}):  # tell the DPO's tools what changed
                batch.messages.append(_case_event(_case_view(cases[case_id]), statuses.get(case_id, {}), now))
            await append(conn, batch.timeline)
            await outbox.add(conn, batch.messages)
            return len(updates)

    async def prune(self, now: datetime | None = None) -> tuple[int, int]:
        """Delete outbox rows sent longer ago than ``outbox_retention`` and inbox ids older than
        ``inbox_retention`` (which must outlast the topics' retention, or a replay could repeat an
        effect). Returns (outbox rows, inbox rows) deleted."""
        now = now or datetime.now(UTC)
        async with self.pool.acquire() as conn:
            sent = await conn.execute("DELETE FROM outbox WHERE sent_at < $1", now - self.settings.outbox_retention)
            seen = await conn.execute("DELETE FROM inbox WHERE processed_at < $1", now - self.settings.inbox_retention)
        return int(sent.split()[-1]), int(seen.split()[-1])

    async def _identifiers_for(self, conn: asyncpg.Connection, system: str, ids: Mapping[str, str]) -> dict[str, str]:
        types = await conn.fetchval("SELECT identifier_types FROM systems WHERE name = $1", system) or []
        return {t: ids[t] for t in types if t in ids}

    async def _close_finished(
        self, conn: asyncpg.Connection, cases: Iterable[dict[str, Any]], tasks: Mapping[uuid.UUID, dict[str, Any]],
        batch: _Batch, now: datetime,
    ) -> None:
        by_case: dict[uuid.UUID, list[dict[str, Any]]] = {}
        for t in tasks.values():
            by_case.setdefault(t["case_id"], []).append(t)
        finished: list[tuple[dict[str, Any], CaseStatus, list[dict[str, Any]], dict[str, Any]]] = []
        for case in cases:
            if CaseStatus(case["status"]) != CaseStatus.in_progress:
                continue
            own = by_case.get(case["case_id"], [])
            status = planner.outcome([TaskStatus(t["status"]) for t in own])
            if status is None:
                batch.messages.append(_case_event(_case_view(case), {t["system"]: t["status"] for t in own}, now))
                continue
            finished.append((case, status, own, {t["system"]: _loads(t["result"]) or {} for t in own}))

        # Bundles are built side by side (each is file I/O with an fsync), not one after another.
        bundles = await asyncio.gather(
            *(self._bundle(case, status, own, results) for case, status, own, results in finished),
            return_exceptions=True,
        )
        updates = []
        for (case, status, own, results), bundle in zip(finished, bundles, strict=True):
            statuses = {t["system"]: t["status"] for t in own}
            outcome_doc = _outcome(status, own, results)
            if isinstance(bundle, BaseException) and not isinstance(bundle, ExportError):
                raise bundle  # the export store is away, say: the batch is retried, the case not failed
            if isinstance(bundle, BaseException):  # a bad artifact fails the case, not the coordinator
                status = CaseStatus.failed
                outcome_doc = {**_outcome(status, own, results),
                               "bundle_error": f"{type(bundle).__name__}: {bundle}"}
                bundle = None
            case.update(status=str(status), completed_at=now, outcome=_j(outcome_doc),
                        bundle=_j(bundle.model_dump(mode="json")) if bundle else None)
            updates.append((case["case_id"], case["status"], now, case["outcome"], case["bundle"]))
            detail: dict[str, Any] = {"status": str(status), "tasks": statuses}
            if bundle:
                detail["bundle_sha256"] = bundle.sha256
            batch.timeline.append(Entry(case["case_id"], "completed" if status != CaseStatus.failed else "failed",
                                        detail, now))
            batch.messages.append(_case_event(_case_view(case), statuses, now))
            log.info("case %s %s", case["case_id"], status)
        await conn.executemany(
            """UPDATE cases SET status=$2, completed_at=$3, outcome=$4::jsonb, bundle=$5::jsonb, updated_at=now()
               WHERE case_id=$1""",
            updates,
        )

    async def _bundle(self, case: Mapping[str, Any], status: CaseStatus, tasks: Sequence[Mapping[str, Any]],
                      results: Mapping[str, Any]) -> Artifact | None:
        """The access bundle of a finished access or portability case (None for other rights)."""
        if Right(case["right_name"]) not in BUNDLED_RIGHTS or status == CaseStatus.failed:
            return None
        parts = [(system, Artifact.model_validate(a)) for system, res in sorted(results.items())
                 for a in res.get("artifacts", [])]
        for system, artifact in parts:
            # A receipt may only bring its own system's exports for this case into the bundle.
            if not artifact.ref.startswith(f"cases/{case['case_id']}/{system}/"):
                raise BundleError(f"export of system {system!r} is not one of this case's: {artifact.ref}")
        return await asyncio.to_thread(
            build_bundle, self.exports, case_id=case["case_id"], request_id=case["request_id"], parts=parts,
            systems_without_data=sorted(t["system"] for t in tasks if t["status"] == TaskStatus.not_found),
        )


class CaseNotFound(LookupError):
    """No case with that id."""


class InvalidTransition(ValueError):
    """The case is not in a state that allows the requested change."""


def _fan_out(case: dict[str, Any], systems: Sequence[SystemDeclaration], batch: _Batch,
             now: datetime) -> list[dict[str, Any]]:
    """Decide a case's first working state and plan its tasks (pure, apart from queuing the
    TaskAssigned and CaseUpdated events and timeline entries on ``batch``). Updates ``case``."""
    right = Right(case["right_name"])
    plan: list[planner.PlannedTask] = []
    if planner.needs_verification(right, case["verified"]):
        status = CaseStatus.awaiting_verification
    else:
        ids = {IdentifierType(k): v for k, v in case["subject"].items()}
        plan = planner.plan(right, ids, systems)
        if plan or right not in ACTION_FOR_RIGHT or not systems:
            # without fan-out the DPO answers it, against its deadline; with no system registered
            # at all, nobody could have looked: the case stays open rather than claim "nothing held"
            status = CaseStatus.in_progress
        else:
            status = CaseStatus.completed  # no registered system holds data we could search for
    case["status"] = str(status)
    if status == CaseStatus.completed:
        case.update(completed_at=now, outcome={"note": "no registered system holds data for these identifiers"})
    tasks: list[dict[str, Any]] = []
    for p in plan:
        task: dict[str, Any] = {"task_id": uuid.uuid4(), "case_id": case["case_id"], "system": p.system,
                                "action": str(p.action), "status": str(TaskStatus.dispatched), "attempt": 1}
        tasks.append(task)
        batch.messages.append(_task_event(task, case, {str(k): v for k, v in p.identifiers.items()}))
    if status == CaseStatus.awaiting_verification:
        batch.timeline.append(Entry(case["case_id"], "awaiting_verification", {}, now))
    elif not systems and right in ACTION_FOR_RIGHT:
        batch.timeline.append(Entry(case["case_id"], "no_systems_registered", {}, now))
    if plan:
        batch.timeline.append(Entry(case["case_id"], "tasks_dispatched", {"systems": [p.system for p in plan]}, now))
    if status == CaseStatus.completed:
        batch.timeline.append(Entry(case["case_id"], "completed", {"status": str(status), "tasks": {}}, now))
    batch.messages.append(_case_event(case, {t["system"]: t["status"] for t in tasks}, now))
    return tasks


async def _insert_tasks(conn: asyncpg.Connection, tasks: Sequence[Mapping[str, Any]], now: datetime) -> None:
    await conn.executemany(
        """INSERT INTO tasks (task_id, case_id, system, action, status, attempt, dispatched_at)
           VALUES ($1,$2,$3,$4,$5,$6,$7)""",
        [(t["task_id"], t["case_id"], t["system"], t["action"], t["status"], t["attempt"], now) for t in tasks],
    )


def _loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _case_view(case: Mapping[str, Any]) -> dict[str, Any]:
    """A case row with its jsonb columns decoded."""
    return {k: (_loads(v) if k in ("changes", "purposes", "bundle", "subject", "outcome") else v)
            for k, v in case.items()}


def _outcome(status: CaseStatus, tasks: Sequence[Mapping[str, Any]], results: Mapping[str, Any]) -> dict[str, Any]:
    """What the case did, per system, and what the law made us keep. No personal data."""
    retained = [
        {"system": system, **item} for system, res in sorted(results.items()) for item in res.get("retained", [])
    ]
    return {
        "status": str(status),
        "systems": {
            t["system"]: {"status": t["status"], "attempts": t["attempt"],
                          "counts": results.get(t["system"], {}).get("counts", {}),
                          **({"error": t["error"]} if t.get("error") else {})}
            for t in sorted(tasks, key=lambda t: t["system"])
        },
        "retained": retained,
    }
