"""Which database errors are worth retrying.

Retrying by SQLSTATE class rather than by exception type catches every way a server says
"not now" (failover, shutdown, startup, resource limits, lock timeouts, serialisation
failures) and nothing that a retry cannot fix.
"""

from __future__ import annotations

import asyncpg

#: 08 connection exception, 40 transaction rollback (serialisation, deadlock), 53 insufficient
#: resources, 57 operator intervention (shutdown, cannot connect now, query cancelled), 58 system error
_CLASSES = frozenset({"08", "40", "53", "57", "58"})
#: 55P03 lock not available; 25006 read-only transaction (a primary became a replica in a failover)
_STATES = frozenset({"55P03", "25006"})
#: unique keys two coordinator instances can race on during a rebalance: a retry sees the winner's row
_RACES = frozenset({"cases_request_id_key"})


def is_transient(exc: BaseException) -> bool:
    """True when the same work may well succeed if tried again later."""
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        if state[:2] in _CLASSES or state in _STATES:
            return True
        return state == "23505" and getattr(exc, "constraint_name", None) in _RACES
    return False


def where(exc: BaseException) -> str:
    """``ExceptionType at file:function:line`` of the innermost frame: enough to find a bug,
    without the message, which may quote personal data (asyncpg's DETAIL does)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(exc).__name__
    code = tb.tb_frame.f_code
    return f"{type(exc).__name__} at {code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}:{tb.tb_lineno}"
