"""The loyalty programme's dsrflow worker: no handlers of its own, only loyalty.yaml, run by the
declarative SQL worker (:mod:`dsrflow.sqlworker`).

Run it with ``dsrflow worker loyalty`` (or ``python -m dsrflow.worker examples.loyalty.worker``).
Its database is ``DSRFLOW_LOYALTY_DSN``, else the database ``loyalty`` on the case store's
server; on start it creates that database and its tables if missing (it does not seed). The
keyed hash of ``erase: hash`` needs ``DSRFLOW_LOYALTY_HASH_KEY`` (16 characters or more): without
it the worker refuses to start.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from dsrflow.settings import Settings
from dsrflow.sqlworker import load_spec, sql_worker

from ..common import own_ledger, setup_database, system_dsn

NAME = "loyalty"
HERE = Path(__file__).parent
SCHEMA = HERE / "schema.sql"
SEED = HERE / "seed.sql"
SPEC = load_spec(HERE / "loyalty.yaml")
_SETUP_LOCK = 0x6C6F79  # "loy": serialises concurrent setup() calls


async def _seed(conn: asyncpg.Connection) -> None:
    await conn.execute(SEED.read_text(encoding="utf-8"))


async def setup(dsn: str, *, seed: bool = True) -> None:
    """Create the database and its tables if missing; seed them if ``seed`` and empty."""
    await setup_database(dsn, schema=SCHEMA, lock=_SETUP_LOCK, seed=_seed if seed else None,
                         seeded_table="members")


async def _prepare(dsn: str) -> None:
    await setup(dsn, seed=False)


def _dsn(settings: Settings) -> str:
    return system_dsn(NAME, settings)


worker = sql_worker(SPEC, dsn_from=_dsn, prepare=_prepare, ledger=own_ledger(NAME))
