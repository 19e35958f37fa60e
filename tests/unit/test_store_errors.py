"""Which errors the coordinator retries, and what it says about the others."""

from __future__ import annotations

import asyncpg
import pytest

from dsrflow.store.errors import is_transient, where


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (asyncpg.InterfaceError("connection is closed"), True),
        (asyncpg.AdminShutdownError(), True),  # 57P01: failover / shutdown
        (asyncpg.CannotConnectNowError(), True),  # 57P03: still starting up
        (asyncpg.SerializationError(), True),  # 40001
        (asyncpg.DeadlockDetectedError(), True),  # 40P01
        (asyncpg.TooManyConnectionsError(), True),  # 53300
        (asyncpg.ReadOnlySQLTransactionError(), True),  # 25006: a primary turned replica
        (asyncpg.UndefinedTableError(), False),  # a bug or a missing migration: retrying cannot help
        (asyncpg.UniqueViolationError(), False),
        (ValueError("bad"), False),
    ],
)
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_the_request_id_race_is_transient_other_unique_violations_are_not() -> None:
    race = asyncpg.UniqueViolationError()
    race.constraint_name = "cases_request_id_key"  # type: ignore[attr-defined]
    assert is_transient(race)


def test_where_names_the_place_not_the_message() -> None:
    try:
        raise ValueError("lan.nguyen@example.vn is not allowed")
    except ValueError as exc:
        text = where(exc)
    assert text.startswith("ValueError at test_store_errors.py:test_where_names_the_place_not_the_message:")
    assert "lan.nguyen" not in text
