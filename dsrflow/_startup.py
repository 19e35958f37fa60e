"""How a long-running service (coordinator, worker, API) waits for its broker and case store
at start: retried with backoff and a warning per retry, for at most ``startup_timeout``
(DSRFLOW_STARTUP_TIMEOUT), then a one-line :class:`~dsrflow.errors.DsrflowError`.

The waiting is needed when services start before Kafka or PostgreSQL (compose, Kubernetes);
the bound is there so that a wrong address is an error, not a process that waits forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from .errors import DsrflowError

if TYPE_CHECKING:
    from .settings import Settings

T = TypeVar("T")

BACKOFF_MAX_S = 10.0


async def retry_at_start(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    retryable: Callable[[BaseException], bool],
    fail: Callable[[BaseException], DsrflowError | None],
    log: logging.Logger,
) -> T:
    """``await attempt()`` until it succeeds, retrying errors ``retryable`` accepts for up to
    ``timeout`` seconds. Then (or at once for any other error) raise ``fail(exc)``, or ``exc``
    itself when that is None."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.5
    while True:
        try:
            # Each try is bounded too: a host that drops packets must not outlast the deadline.
            return await asyncio.wait_for(attempt(), timeout=max(deadline - loop.time(), 1.0))
        except Exception as exc:  # noqa: BLE001 - classified below
            remaining = deadline - loop.time()
            transient = retryable(exc)
            if not transient or remaining <= 0:
                mapped = fail(exc)
                if mapped is None:
                    raise
                if transient:
                    mapped.args = (f"{mapped}; waited {timeout:g}s (DSRFLOW_STARTUP_TIMEOUT)",)
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
                          what: str = "broker unreachable") -> T:
    """Run ``attempt`` (something that talks to the broker) until the broker answers."""
    from .client import broker_error

    return await retry_at_start(
        what, attempt, timeout=settings.startup_timeout.total_seconds(), retryable=_broker_retryable,
        fail=lambda exc: broker_error(settings, exc), log=log,
    )


async def wait_for_case_store(settings: Settings, attempt: Callable[[], Awaitable[T]], *, log: logging.Logger,
                              what: str = "case store unreachable") -> T:
    """Run ``attempt`` (something that talks to the case store) until PostgreSQL answers."""
    from .client import case_store_error

    return await retry_at_start(
        what, attempt, timeout=settings.startup_timeout.total_seconds(), retryable=_case_store_retryable,
        fail=lambda exc: case_store_error(settings, exc), log=log,
    )


async def check_case_store(settings: Settings, *, log: logging.Logger) -> None:
    """Wait (bounded) until the case store accepts a connection."""
    import asyncpg

    async def attempt() -> None:
        conn = await asyncpg.connect(settings.dsn, timeout=10)
        await conn.close()

    await wait_for_case_store(settings, attempt, log=log)
