"""Ordered SQL migrations (``migrations/NNNN_name.sql``), each applied once in its own transaction."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import asyncpg

# Any constant works: it only has to be the same for every dsrflow process.
_LOCK_ID = 0x64737266  # "dsrf"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    out = []
    for entry in resources.files("dsrflow.store").joinpath("migrations").iterdir():
        if entry.name.endswith(".sql"):
            version, _, rest = entry.name.partition("_")
            out.append(Migration(int(version), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(out, key=lambda m: m.version)


async def _applied(conn: asyncpg.Connection) -> dict[int, str]:
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    return {r["version"]: r["checksum"] for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")}


async def pending_migrations(dsn: str) -> list[Migration]:
    conn = await asyncpg.connect(dsn)
    try:
        done = await _applied(conn)
        return [m for m in available() if m.version not in done]
    finally:
        await conn.close()


async def migrate(dsn: str) -> list[Migration]:
    """Apply pending migrations; returns those applied. Safe to run concurrently."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            done = await _applied(conn)
            applied = []
            for m in available():
                if m.version in done:
                    if done[m.version] != m.checksum:
                        raise RuntimeError(f"migration {m.version}_{m.name} changed after it was applied")
                    continue
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        m.version, m.name, m.checksum,
                    )
                applied.append(m)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()
