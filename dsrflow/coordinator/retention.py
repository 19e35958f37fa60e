"""Expiry of dsrflow's own copies of personal data: access bundles and the exports they were built from.

A finished access or portability case keeps its bundle (``bundles/<case_id>.zip``) and every
system's exports for it (``systems/<system>/cases/<case_id>/``) for ``bundle_retention``
(``DSRFLOW_BUNDLE_RETENTION``, 30 days by default) after it finished; the sweep's
:meth:`~dsrflow.coordinator.service.Coordinator.prune` then deletes them with
:func:`expire_exports`. Each case is done once: ``cases.exports_deleted_at`` records when, and
the case's timeline an ``exports_expired`` entry (what was deleted, never what it held), which
the DPO sees. A case reopened and finished again after that gets a new bundle and expires again.
An access case whose bundle could not be built (failed) has its exports deleted the same way.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from ..domain.case import BUNDLED, Effects
from ..domain.timeline import Entry, TimelineKind
from ..exports import ExportStore, bundle_key, system_case_prefix
from ..exports.store import ExportError, controller_prefix
from ..rights import CaseStatus
from ..store import cases as repo

__all__ = ["Expired", "expire_exports", "expired_cases"]

log = logging.getLogger("dsrflow.coordinator.retention")

_FINISHED = [str(s) for s in (CaseStatus.completed, CaseStatus.completed_with_exceptions, CaseStatus.failed)]


@dataclass(frozen=True, slots=True)
class Expired:
    """A case whose bundle and exports are due for deletion."""

    case_id: UUID
    controller: str
    systems: tuple[str, ...]


async def expired_cases(conn: asyncpg.Connection, before: datetime, limit: int) -> list[Expired]:
    """Finished access / portability cases that finished before ``before``, hold a bundle (or failed
    building one), and whose copies are not deleted yet (or were, before the case finished again).
    Locks them (others' locked rows are skipped: the next sweep takes them)."""
    rows = await conn.fetch(
        """SELECT c.case_id, c.controller,
                  ARRAY(SELECT DISTINCT t.system FROM tasks t WHERE t.case_id = c.case_id ORDER BY 1) AS systems
           FROM cases c
           WHERE c.completed_at < $1 AND c.status = ANY($2::text[])
             AND (c.bundle IS NOT NULL OR (c.status = 'failed' AND c.right_name = ANY($3::text[])))
             AND (c.exports_deleted_at IS NULL OR c.exports_deleted_at < c.completed_at)
           ORDER BY c.completed_at LIMIT $4
           FOR UPDATE OF c SKIP LOCKED""",
        before, _FINISHED, [str(r) for r in BUNDLED], limit)
    return [Expired(r["case_id"], r["controller"], tuple(r["systems"])) for r in rows]


def _delete_copies(exports: ExportStore, case: Expired) -> tuple[bool, int]:
    """Delete a case's bundle and every system's exports for it: (bundle deleted, exports deleted)."""
    bundle = exports.delete(bundle_key(case.case_id, case.controller))
    prefixes = [system_case_prefix(system, case.case_id, case.controller) for system in case.systems]
    prefixes.append(f"{controller_prefix(case.controller)}cases/{case.case_id}/")  # before per-system parts
    return bundle, sum(exports.delete_prefix(p) for p in prefixes)


async def expire_exports(pool: asyncpg.Pool, exports: ExportStore, retention: timedelta, now: datetime, *,
                         limit: int = 500) -> int:
    """Delete the bundles and exports of cases finished longer than ``retention`` before ``now``;
    record it on each case (``exports_deleted_at``, an ``exports_expired`` timeline entry). Files
    are deleted before the record is written: a crash in between deletes nothing more next time,
    and records it then. Returns how many cases were done."""
    async with pool.acquire() as conn, conn.transaction():
        due = await expired_cases(conn, now - retention, limit)
        if not due:
            return 0
        fx = Effects()
        done: list[Expired] = []
        for case in due:
            try:
                bundle, deleted = await asyncio.to_thread(_delete_copies, exports, case)
            except (OSError, ExportError) as exc:
                # one case's files that cannot go (a permission, a store away) hold up no other case:
                # it stays due, and the next sweep tries it again
                log.error("case %s: access bundle and exports not deleted (%s); the next sweep retries",
                          case.case_id, type(exc).__name__)
                continue
            done.append(case)
            fx.timeline.append(Entry(case.case_id, str(TimelineKind.exports_expired), {
                "bundle_deleted": bundle, "exports_deleted": deleted, "systems": list(case.systems),
                "retention_seconds": int(retention.total_seconds())}, now))
        if done:
            await conn.executemany("UPDATE cases SET exports_deleted_at = $2 WHERE case_id = $1",
                                   [(case.case_id, now) for case in done])
            await repo.record(conn, fx)
    log.info("deleted the access bundles and exports of %d case(s) finished more than %s ago", len(done), retention)
    return len(done)
