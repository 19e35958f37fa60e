"""Helpers both reference systems share: their own database next to the case store, the
task's identifiers in normal form, and how a rectification's changes and an objection's
purposes are read."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from dsrflow._startup import retry_at_start
from dsrflow.errors import DsrflowError, ServiceUnavailable
from dsrflow.identity import normalise
from dsrflow.rights import IdentifierType, change_category, parse_date_of_birth
from dsrflow.rights import parse_text as parse_text  # the reference systems' free-text corrections
from dsrflow.settings import Settings
from dsrflow.stack.postgres import create_database, with_database
from dsrflow.worker import PostgresTaskLedger, Result, SubjectMatch, TaskContext, TaskError, TaskLedger, Worker


def system_dsn(system: str, settings: Settings) -> str:
    """``DSRFLOW_<SYSTEM>_DSN`` if set, else a database named after the system on the case
    store's server. A real system would bring its own configuration; this keeps the demo to one
    PostgreSQL server."""
    return os.environ.get(f"DSRFLOW_{system.upper()}_DSN") or settings.database_dsn(system)


def own_ledger(system: str) -> Callable[[Settings], TaskLedger]:
    """``Worker(ledger=...)``: the worker's task ledger (which task attempts ran, and their first
    receipts) in the system's own database, next to the data its handlers change. The worker opens
    it after its startup hooks, which create that database."""

    def ledger(settings: Settings) -> TaskLedger:
        return PostgresTaskLedger(system_dsn(system, settings))

    return ledger


async def ensure_database(dsn: str) -> None:
    """Create the database ``dsn`` names if it does not exist (through the server's ``postgres``
    database). Safe when several processes race to create it."""
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        await create_database(with_database(dsn, "postgres"), urlsplit(dsn).path.lstrip("/"))
    else:
        await conn.close()


def rowcount(status: str) -> int:
    """The row count of an asyncpg command status such as ``"DELETE 3"`` or ``"UPDATE 1"``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class Database:
    """The connection pool a worker opens at startup and its handlers use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(f"the {self.name} database is not open: run the worker's startup hooks")
        return self._pool

    async def open(self, dsn: str, *, max_size: int = 10) -> None:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


async def setup_database(
    dsn: str, *, schema: Path, lock: int, seed: Callable[[asyncpg.Connection], Awaitable[object]] | None,
    seeded_table: str,
) -> None:
    """Create the database and its tables if missing; run ``seed`` when given and ``seeded_table``
    is empty. ``lock`` (an advisory lock id) serialises concurrent setups of the same system."""
    await ensure_database(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
            await conn.execute(schema.read_text())
            if seed is not None and not await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {seeded_table})"):
                await seed(conn)
    finally:
        await conn.close()


async def wait_for_database(name: str, dsn: str, attempt: Callable[[], Awaitable[None]], settings: Settings) -> None:
    """Run ``attempt`` until the system's own database answers, for up to DSRFLOW_STARTUP_TIMEOUT;
    then one clear error naming it by ``host:port/dbname`` (never the DSN: it may hold a password)."""
    parts = urlsplit(dsn)
    where = f"{parts.hostname}:{parts.port or 5432}{parts.path}"

    def transient(exc: BaseException) -> bool:
        return isinstance(exc, OSError | TimeoutError | asyncpg.CannotConnectNowError
                          | asyncpg.TooManyConnectionsError)

    def fail(exc: BaseException) -> DsrflowError | None:
        if transient(exc) or isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.InterfaceError):
            return ServiceUnavailable(f"the {name} database is unreachable at {where} ({type(exc).__name__})")
        if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
            return ServiceUnavailable(f"the {name} database at {where} refused the connection: "
                                      f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return None

    await retry_at_start(f"{name} database unreachable", attempt, timeout=settings.startup_timeout.total_seconds(),
                         retryable=transient, fail=fail, log=logging.getLogger("dsrflow.worker"))


def open_with(worker: Worker, db: Database, setup: Callable[..., Awaitable[None]]) -> None:
    """Give the worker startup and shutdown hooks that create (unseeded) and open ``db``."""

    @worker.on_startup
    async def open_database(settings: Settings) -> None:
        dsn = system_dsn(db.name, settings)

        async def attempt() -> None:
            await setup(dsn, seed=False)
            await db.open(dsn, max_size=worker.concurrency)

        await wait_for_database(db.name, dsn, attempt, settings)

    @worker.on_shutdown
    async def close_database(settings: Settings) -> None:
        await db.close()


# -- what a task asks ------------------------------------------------------------------------


def subject_identifiers(ctx: TaskContext) -> dict[IdentifierType, str]:
    """The task's identifiers (of the types this system declared) in the normal form of
    :mod:`dsrflow.identity`, the form both systems store: a phone written the local way
    (``0901234567``) becomes ``+84901234567``. Tasks carry no jurisdiction, so a local number is
    read as Vietnamese, as :meth:`TaskContext.match` reads it too."""
    out: dict[IdentifierType, str] = {}
    for kind, value in ctx.identifiers.items():
        try:
            out[kind] = normalise(kind, value)
        except ValueError as exc:  # the message names the type, never the value
            raise TaskError(str(exc)) from None
    return out


class Refusal(Exception):
    """A task the system will not carry out as asked. The message is the receipt's reason: it
    names fields, never their values."""


class Answered(Exception):
    """The task's answer is known before anything was changed (identifiers that point to different
    people, or nobody found): raised to leave the handler and its transaction at once."""

    def __init__(self, result: Result) -> None:
        super().__init__(str(result.status))
        self.result = result


def require_one_person(match: SubjectMatch[Any]) -> None:
    """Raise :class:`Answered` with ``conflict`` or ``not_found`` unless the match names one
    person's records to act on (see :func:`dsrflow.identity.match_subject`)."""
    if match.conflict:
        raise Answered(Result.conflict(match.reason()))
    if match.not_found:
        raise Answered(Result.not_found())


def task_purposes(ctx: TaskContext) -> list[str] | None:
    """The purposes (fideslang data uses) an objection or a consent withdrawal names, sorted and
    without duplicates; None when it names none: the whole of the processing."""
    purposes = sorted({p.strip() for p in ctx.task.purposes or () if p.strip()})
    for p in purposes:
        if not _PURPOSE.fullmatch(p):
            raise Refusal(f"purpose {_label(p)} is not a data-use key such as marketing.communications")
    return purposes or None


_PURPOSE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")

#: Parses one corrected value; raises ValueError (without the value) when it is not valid.
Parser = Callable[[str], object]


_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def _label(key: str) -> str:
    """A field or purpose name for a receipt's reason. It came from the request, so anything that
    does not look like a name (free text, perhaps personal data) is not repeated."""
    return repr(key) if _NAME.fullmatch(key) else "(a name that is not one)"


def read_changes(
    changes: Mapping[str, str] | None, accepted: Mapping[str, tuple[str, Parser]], *, system: str
) -> dict[str, object]:
    """A rectification's corrections as ``{this system's field: parsed value}``.

    ``changes`` names each field as the request did: a short name (``"phone"``, see
    :data:`dsrflow.rights.CHANGE_FIELDS`) or a fideslang category (``"user.contact.phone_number"``).
    ``accepted`` maps each category the system can correct to its field and parser. Raises
    :class:`Refusal` for a field the system cannot correct or a value that is not valid: nothing is
    half-done, and the reason names the field, never the value."""
    if not changes:
        raise Refusal("the rectification task carries no changes")
    out: dict[str, object] = {}
    for key, raw in changes.items():
        category = change_category(key)
        if category is None or category not in accepted:
            raise Refusal(f"{system} cannot rectify field {_label(key)}: it keeps no such field")
        field, parse = accepted[category]
        try:
            value = parse(raw)
        except ValueError as exc:
            raise Refusal(f"the correction of field {_label(key)} is not valid: {exc}") from None
        if field in out and out[field] != value:
            raise Refusal(f"the task gives two different corrections of field {_label(key)}")
        out[field] = value
    return out


def parse_name(raw: str) -> str:
    name = " ".join(raw.split())
    if not name:
        raise ValueError("a name cannot be empty")
    return name


def parse_email(raw: str) -> str:
    return normalise(IdentifierType.email, raw)


def parse_phone(raw: str) -> str:
    return normalise(IdentifierType.phone, raw)


parse_date = parse_date_of_birth  # ISO or the Vietnamese way (dsrflow.rights)


Handler = Callable[[TaskContext], Awaitable[Result]]


async def restrict_records(conn: asyncpg.Connection, owner: str, ids: list[Any], case_id: Any,
                           purposes: list[str] | None) -> dict[str, int]:
    """Record this case's restriction of the records ``ids`` in the ``restrictions`` table, whose
    key column is ``owner`` (``contact_id``, ``customer_id``). Idempotent. Counts: restricted by
    this case and in force, of which already before (a second delivery), and the purposes named."""
    new = await conn.fetch(
        f"""INSERT INTO restrictions ({owner}, case_id, purposes)
            SELECT unnest($1::{_SQL_TYPE[owner]}[]), $2, $3::text[]
            ON CONFLICT ({owner}, case_id) DO NOTHING RETURNING {owner}""",
        ids, case_id, purposes,
    )
    in_force = await conn.fetchval(
        f"SELECT count(*) FROM restrictions WHERE case_id = $1 AND {owner} = ANY($2) AND lifted_at IS NULL",
        case_id, ids,
    )
    counts = {"restricted": in_force, "already_restricted": len(ids) - len(new)}
    if purposes:
        counts["purposes"] = len(purposes)
    return counts


async def lift_records(conn: asyncpg.Connection, owner: str, ids: list[Any], case_id: Any) -> tuple[int, int]:
    """Lift the restriction this case set on ``ids`` (the rows stay, with ``lifted_at``, as its
    record). Returns (lifted now, restricted by this case at all)."""
    lifted = rowcount(await conn.execute(
        f"UPDATE restrictions SET lifted_at = now() WHERE case_id = $1 AND {owner} = ANY($2) AND lifted_at IS NULL",
        case_id, ids))
    total = await conn.fetchval(f"SELECT count(*) FROM restrictions WHERE case_id = $1 AND {owner} = ANY($2)",
                                case_id, ids)
    return lifted, total


#: the SQL type of each restrictions table's key column
_SQL_TYPE = {"contact_id": "bigint", "customer_id": "text"}


def answering(handler: Handler) -> Handler:
    """Turn an :class:`Answered` raised by ``handler`` into its result, and a :class:`Refusal` into
    ``Result.refused`` (raised inside its transaction, which then rolls back: nothing changes)."""

    @functools.wraps(handler)
    async def wrapped(ctx: TaskContext) -> Result:
        try:
            return await handler(ctx)
        except Answered as exc:
            return exc.result
        except Refusal as exc:
            return Result.refused(str(exc))

    return wrapped


def purposes_overlap(a: str, b: str) -> bool:
    """One purpose is the other or contains it (the SQL function of the same name in schema.sql)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")
