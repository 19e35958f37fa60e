"""The task ledger: a durable record of which task attempts a worker group has run, and with what result.

Kafka delivers a task at least once: again after a crash before the commit, after a rebalance
that hands its partition to another instance of the worker group, after a restart. Handlers are
idempotent, but a second run does not *report* the same: an erasure run twice finds nothing the
second time and would answer ``not_found`` with no counts. So before a handler runs, the worker
claims the task attempt in the ledger, keyed by ``(task_id, attempt)``:

- no row: the claim is inserted (state ``running``, the instance's name, a lease) and the handler
  runs; its receipt is stored (state ``done``) before it is sent;
- ``done``: the handler does not run; the stored receipt, the first result, is sent again (same
  CloudEvents id, so the coordinator's inbox drops it as a duplicate if it had it);
- ``running``, lease not over: another instance is running it; wait for its receipt;
- ``running``, lease over: its instance died holding it (no receipt): take it over and run it.

When two instances both finish (a takeover of an instance that was only slow), the first receipt
stored stands and both report it.

:class:`PostgresTaskLedger` keeps the ledger in a PostgreSQL table (created if missing) in a
database the worker owns: the system's own database, or dsrflow's case store by default.
:class:`MemoryTaskLedger` is for tests and lives as long as its process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import asyncpg

from ..events import TaskAssigned, TaskReceipt

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger("dsrflow.worker")

TABLE = "dsrflow_task_ledger"
#: finished rows are deleted after this long (tasks topics keep records 7 days)
DEFAULT_RETENTION = timedelta(days=30)
_SCHEMA_LOCK = 0x6473726C6564  # "dsrled": serialises concurrent CREATE TABLE IF NOT EXISTS


@dataclass(frozen=True, slots=True)
class LedgerClaim:
    """What claiming a task attempt found.

    - ``owned``: this instance holds the claim and runs the handler (``takeover``: from an instance
      whose lease ran out without a receipt);
    - ``done``: the attempt has run; ``receipt`` is its first result;
    - ``busy``: ``holder`` is running it; its lease runs out in ``retry_in`` seconds.
    """

    state: Literal["owned", "done", "busy"]
    receipt: TaskReceipt | None = None
    holder: str | None = None
    retry_in: float = 0.0
    takeover: bool = False


@runtime_checkable
class TaskLedger(Protocol):
    """Where a worker group records the task attempts it claimed and the receipts they gave."""

    async def open(self) -> None:
        """Connect and create what is missing. Called once per run; may be called by several workers."""

    async def close(self) -> None:
        """Release what :meth:`open` took (once per :meth:`open`)."""

    async def claim(self, task: TaskAssigned, *, owner: str, lease: timedelta) -> LedgerClaim:
        """Claim ``(task.task_id, task.attempt)`` for ``owner`` for ``lease``, unless it is done or
        held by another owner whose lease has not run out."""

    async def finish(self, task: TaskAssigned, receipt: TaskReceipt, *, owner: str) -> TaskReceipt:
        """Store ``receipt`` as the attempt's result unless one is stored already; return the stored one."""

    async def release(self, task: TaskAssigned, *, owner: str) -> None:
        """Give up ``owner``'s claim without a result (the handler was cancelled): the next delivery runs it."""


#: ``Worker(ledger=...)`` takes a ledger or a function of the settings that makes one (its DSN is
#: known only when the worker runs).
LedgerFactory = Callable[["Settings"], TaskLedger]


# -- PostgreSQL ----------------------------------------------------------------------------------

_DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    task_id     uuid        NOT NULL,
    attempt     integer     NOT NULL CHECK (attempt >= 1),
    system      text        NOT NULL,
    case_id     uuid        NOT NULL,
    state       text        NOT NULL CHECK (state IN ('running', 'done')),
    receipt     jsonb,
    claimed_by  text        NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL,
    takeovers   integer     NOT NULL DEFAULT 0,
    finished_at timestamptz,
    PRIMARY KEY (task_id, attempt),
    CONSTRAINT {TABLE}_done_has_receipt CHECK ((state = 'done') = (receipt IS NOT NULL AND finished_at IS NOT NULL))
);
COMMENT ON TABLE {TABLE} IS
    'dsrflow workers: task attempts claimed and the receipt each gave first (no personal data)';
"""

_CLAIM = f"""
INSERT INTO {TABLE} AS l (task_id, attempt, system, case_id, state, claimed_by, lease_until)
VALUES ($1, $2, $3, $4, 'running', $5, now() + $6::interval)
ON CONFLICT (task_id, attempt) DO UPDATE
    SET claimed_by = EXCLUDED.claimed_by, claimed_at = now(), lease_until = EXCLUDED.lease_until,
        takeovers = l.takeovers + 1
    WHERE l.state = 'running' AND l.lease_until <= now()
RETURNING l.takeovers
"""

_LOOK = f"""
SELECT state, receipt::text AS receipt, claimed_by,
       greatest(extract(epoch FROM lease_until - now()), 0)::float8 AS retry_in
FROM {TABLE} WHERE task_id = $1 AND attempt = $2
"""

_FINISH = f"""
INSERT INTO {TABLE} AS l (task_id, attempt, system, case_id, state, receipt, claimed_by, lease_until, finished_at)
VALUES ($1, $2, $3, $4, 'done', $5::jsonb, $6, now(), now())
ON CONFLICT (task_id, attempt) DO UPDATE
    SET state = 'done', receipt = EXCLUDED.receipt, finished_at = now()
    WHERE l.state = 'running'
RETURNING l.receipt::text AS receipt
"""

_STORED = f"SELECT receipt::text FROM {TABLE} WHERE task_id = $1 AND attempt = $2 AND state = 'done'"

_RELEASE = f"DELETE FROM {TABLE} WHERE task_id = $1 AND attempt = $2 AND state = 'running' AND claimed_by = $3"

_PRUNE = f"DELETE FROM {TABLE} WHERE coalesce(finished_at, claimed_at) < now() - $1::interval"


class PostgresTaskLedger:
    """The ledger in the PostgreSQL database ``dsn`` (a table ``dsrflow_task_ledger``, created if
    missing). Rows older than ``retention`` are deleted when the ledger opens."""

    def __init__(self, dsn: str, *, retention: timedelta = DEFAULT_RETENTION, max_connections: int = 4) -> None:
        self.dsn = dsn
        self.retention = retention
        self.max_connections = max_connections
        self._pool: asyncpg.Pool | None = None
        self._users = 0
        self._opening: asyncio.Lock | None = None

    def __repr__(self) -> str:
        from ..settings import dsn_location

        return f"PostgresTaskLedger({dsn_location(self.dsn)!r})"  # never the password

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the task ledger is not open")
        return self._pool

    async def open(self) -> None:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:  # two workers of one process may share the ledger
            self._users += 1
            if self._pool is not None:
                return
            try:
                # timeouts well under the lease margin: a half-open connection fails the batch (which is
                # retried) instead of holding a claim until its lease runs out
                pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.max_connections,
                                                 timeout=10, command_timeout=20)
                try:
                    async with pool.acquire() as conn, conn.transaction():
                        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                        await conn.execute(_DDL)
                        pruned = await conn.execute(_PRUNE, self.retention)
                except BaseException:
                    await pool.close()
                    raise
            except BaseException:
                self._users -= 1
                raise
            self._pool = pool
        n = pruned.rsplit(" ", 1)[-1]
        if n.isdigit() and int(n):
            log.info("task ledger: %s row(s) older than %s deleted", n, self.retention)

    async def close(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def claim(self, task: TaskAssigned, *, owner: str, lease: timedelta) -> LedgerClaim:
        async with self.pool.acquire() as conn:
            takeovers = await conn.fetchval(_CLAIM, task.task_id, task.attempt, task.system, task.case_id, owner,
                                            lease)
            if takeovers is not None:
                return LedgerClaim("owned", takeover=takeovers > 0)
            row = await conn.fetchrow(_LOOK, task.task_id, task.attempt)
        if row is None:  # released between the two statements: claim again
            return LedgerClaim("busy", retry_in=0.0)
        if row["state"] == "done":
            return LedgerClaim("done", receipt=TaskReceipt.model_validate_json(row["receipt"]))
        return LedgerClaim("busy", holder=row["claimed_by"], retry_in=float(row["retry_in"]))

    async def finish(self, task: TaskAssigned, receipt: TaskReceipt, *, owner: str) -> TaskReceipt:
        async with self.pool.acquire() as conn:
            stored = await conn.fetchval(_FINISH, task.task_id, task.attempt, task.system, task.case_id,
                                         receipt.model_dump_json(), owner)
            if stored is None:
                stored = await conn.fetchval(_STORED, task.task_id, task.attempt)
        if stored is None:  # cannot happen: the row exists and is done, or was just made done
            raise RuntimeError(f"task {task.task_id} attempt {task.attempt}: no result in the ledger")
        return TaskReceipt.model_validate_json(stored)

    async def release(self, task: TaskAssigned, *, owner: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(_RELEASE, task.task_id, task.attempt, owner)


# -- in memory -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    holder: str
    lease_until: float
    receipt: TaskReceipt | None = None


class MemoryTaskLedger:
    """The ledger in a dict, for tests: shared by the workers of one process that are given the
    same instance, and lost with the process."""

    def __init__(self) -> None:
        self.entries: dict[tuple[object, int], _Entry] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def claim(self, task: TaskAssigned, *, owner: str, lease: timedelta) -> LedgerClaim:
        key = (task.task_id, task.attempt)
        now = time.monotonic()
        entry = self.entries.get(key)
        if entry is None or (entry.receipt is None and entry.lease_until <= now):
            self.entries[key] = _Entry(owner, now + lease.total_seconds())
            return LedgerClaim("owned", takeover=entry is not None)
        if entry.receipt is not None:
            return LedgerClaim("done", receipt=entry.receipt)
        return LedgerClaim("busy", holder=entry.holder, retry_in=entry.lease_until - now)

    async def finish(self, task: TaskAssigned, receipt: TaskReceipt, *, owner: str) -> TaskReceipt:
        entry = self.entries.setdefault((task.task_id, task.attempt), _Entry(owner, time.monotonic()))
        if entry.receipt is None:
            entry.receipt = receipt
        return entry.receipt

    async def release(self, task: TaskAssigned, *, owner: str) -> None:
        key = (task.task_id, task.attempt)
        entry = self.entries.get(key)
        if entry is not None and entry.receipt is None and entry.holder == owner:
            del self.entries[key]
