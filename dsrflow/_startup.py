"""How a long-running service (coordinator, worker, API) waits for its broker and case store
at start: retried with backoff and a warning per retry, for at most ``startup_timeout``
(DSRFLOW_STARTUP_TIMEOUT), then a one-line :class:`~dsrflow.errors.DsrflowError`.

The timeout bounds the whole start, not each wait: a service that waits for the broker and then
for the case store shares one :class:`StartupBudget` between the two.

The waiting is needed when services start before Kafka or PostgreSQL (compose, Kubernetes);
the bound is there so that a wrong address is an error, not a process that waits forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from .errors import DsrflowError

if TYPE_CHECKING:
    from .settings import Settings

T = TypeVar("T")

BACKOFF_MAX_S = 10.0
#: the least time one try gets, even when the budget is (nearly) spent
MIN_ATTEMPT_S = 1.0


class StartupBudget:
    """One DSRFLOW_STARTUP_TIMEOUT for the whole start of a service: every wait at start
    (broker, then case store) draws on the same deadline."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout

    @classmethod
    def of(cls, settings: Settings) -> StartupBudget:
        return cls(settings.startup_timeout.total_seconds())

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


async def retry_at_start(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    retryable: Callable[[BaseException], bool],
    fail: Callable[[BaseException], DsrflowError | None],
    log: logging.Logger,
    budget: StartupBudget | None = None,
) -> T:
    """``await attempt()`` until it succeeds, retrying errors ``retryable`` accepts for up to
    ``timeout`` seconds, or until the deadline of ``budget`` (shared with the service's other
    waits at start) when one is given. Then (or at once for any other error) raise
    ``fail(exc)``, or ``exc`` itself when that is None."""
    if budget is None:
        budget = StartupBudget(timeout)
    delay = 0.5
    while True:
        try:
            # Each try is bounded too: a host that drops packets must not outlast the deadline.
            return await asyncio.wait_for(attempt(), timeout=max(budget.remaining(), MIN_ATTEMPT_S))
        except Exception as exc:  # noqa: BLE001 - classified below
            remaining = budget.remaining()
            transient = retryable(exc)
            if not transient or remaining <= 0:
                mapped = fail(exc)
                if mapped is None:
                    raise
                if transient:
                    mapped.args = (f"{mapped}; waited {budget.timeout:g}s (DSRFLOW_STARTUP_TIMEOUT)",)
                raise mapped from exc
            pause = min(delay, remaining)
            log.warning("%s (%s); retrying in %.1fs", what, type(exc).__name__, pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, BACKOFF_MAX_S)


def _broker_retryable(exc: BaseException) -> bool:
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, RequestTimedOutError

    return isinstance(exc, KafkaConnectionError | KafkaTimeoutError | NodeNotReadyError | RequestTimedOutError
                      | OSError | TimeoutError)


def _case_store_retryable(exc: BaseException) -> bool:
    from .store.errors import is_transient

    return is_transient(exc)


async def wait_for_broker(settings: Settings, attempt: Callable[[], Awaitable[T]], *, log: logging.Logger,
                          what: str = "broker unreachable", budget: StartupBudget | None = None) -> T:
    """Run ``attempt`` (something that talks to the broker) until the broker answers, within
    ``budget`` (a fresh DSRFLOW_STARTUP_TIMEOUT when None)."""
    from .client import broker_error

    return await retry_at_start(
        what, attempt, timeout=settings.startup_timeout.total_seconds(), retryable=_broker_retryable,
        fail=lambda exc: broker_error(settings, exc), log=log, budget=budget,
    )


async def wait_for_case_store(settings: Settings, attempt: Callable[[], Awaitable[T]], *, log: logging.Logger,
                              what: str = "case store unreachable", budget: StartupBudget | None = None) -> T:
    """Run ``attempt`` (something that talks to the case store) until PostgreSQL answers, within
    ``budget`` (a fresh DSRFLOW_STARTUP_TIMEOUT when None)."""
    from .client import case_store_error

    return await retry_at_start(
        what, attempt, timeout=settings.startup_timeout.total_seconds(), retryable=_case_store_retryable,
        fail=lambda exc: case_store_error(settings, exc), log=log, budget=budget,
    )


async def check_case_store(settings: Settings, *, log: logging.Logger, budget: StartupBudget | None = None) -> None:
    """Wait (bounded by ``budget``, or a fresh DSRFLOW_STARTUP_TIMEOUT) until the case store
    accepts a connection."""
    import asyncpg

    async def attempt() -> None:
        conn = await asyncpg.connect(settings.dsn, timeout=10)
        await conn.close()

    await wait_for_case_store(settings, attempt, log=log, budget=budget)
