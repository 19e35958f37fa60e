"""Helpers both reference systems share: their own database next to the case store."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from dsrflow.settings import Settings
from dsrflow.stack.postgres import create_database, with_database
from dsrflow.worker import Worker


def system_dsn(system: str, settings: Settings) -> str:
    """``DSRFLOW_<SYSTEM>_DSN`` if set, else a database named after the system on the case
    store's server. A real system would bring its own configuration; this keeps the demo to one
    PostgreSQL server."""
    return os.environ.get(f"DSRFLOW_{system.upper()}_DSN") or settings.database_dsn(system)


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


def open_with(worker: Worker, db: Database, setup: Callable[..., Awaitable[None]]) -> None:
    """Give the worker startup and shutdown hooks that create (unseeded) and open ``db``."""

    @worker.on_startup
    async def open_database(settings: Settings) -> None:
        dsn = system_dsn(db.name, settings)
        await setup(dsn, seed=False)
        await db.open(dsn, max_size=worker.concurrency)

    @worker.on_shutdown
    async def close_database(settings: Settings) -> None:
        await db.close()
