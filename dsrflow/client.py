"""Talking to dsrflow from your own code: publish requests, check that the services answer.

    from dsrflow.client import submit
    from dsrflow.events import RightsRequested
    from dsrflow.settings import get_settings

    ids = await submit(get_settings(), [RightsRequested(request_id="pc-1", right="access",
                                                         subject={"identifiers": {"email": "an@example.vn"}})])

Every function here waits a bounded time and fails with a :class:`~dsrflow.errors.DsrflowError`
whose message is one line: :class:`~dsrflow.errors.BrokerUnavailable`,
:class:`~dsrflow.errors.TopicMissing`, :class:`~dsrflow.errors.CaseStoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import topics
from .errors import BrokerUnavailable, CaseStoreUnavailable, ConfigError, DsrflowError, TopicMissing

if TYPE_CHECKING:
    import asyncpg

    from .events import RightsRequested
    from .settings import Settings

__all__ = [
    "DEFAULT_TIMEOUT", "broker_error", "case_store_error", "case_store_pool", "check_broker", "connect_case_store",
    "seconds", "submit",
]

#: Seconds a call waits for the broker or the case store before it gives up.
DEFAULT_TIMEOUT = 10.0


def seconds(value: float) -> str:
    """A duration for a message: ``2.5s``, ``30s``."""
    return f"{value:.1f}s" if value < 10 else f"{value:.0f}s"


def _no_answer(timeout: float | None, waited: float | None) -> str:
    if waited is not None:
        return f"no answer in {seconds(waited)}"
    return f"no answer within {timeout:g}s" if timeout else "timed out"


def _reason(exc: BaseException, timeout: float | None = None, waited: float | None = None) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, TimeoutError):
        return _no_answer(timeout, waited)
    return type(exc).__name__


def broker_error(settings: Settings, exc: BaseException, timeout: float | None = None, *,
                 waited: float | None = None) -> DsrflowError | None:
    """The DsrflowError for a failure to reach the Kafka broker, or None if ``exc`` is not one.
    ``waited``: the seconds really spent waiting, when the caller measured them."""
    from aiokafka.errors import (
        AuthenticationFailedError,
        KafkaConnectionError,
        KafkaError,
        KafkaTimeoutError,
        NodeNotReadyError,
        RequestTimedOutError,
    )

    if isinstance(exc, DsrflowError):
        return exc
    bootstrap = settings.bootstrap
    origin = settings.bootstrap_origin
    if isinstance(exc, KafkaConnectionError):
        # aiokafka says the same for a refused connection and for a host that never answered
        slow = waited is not None and waited >= 1
        return BrokerUnavailable(bootstrap, _no_answer(timeout, waited) if slow else None, origin=origin)
    if isinstance(exc, KafkaTimeoutError | RequestTimedOutError | TimeoutError):
        return BrokerUnavailable(bootstrap, _no_answer(timeout, waited), origin=origin)
    if isinstance(exc, NodeNotReadyError | OSError):
        return BrokerUnavailable(bootstrap, _reason(exc, timeout, waited), origin=origin)
    if isinstance(exc, AuthenticationFailedError):
        return DsrflowError(f"the Kafka broker at {bootstrap} refused the login: check DSRFLOW_KAFKA_SASL_*")
    if isinstance(exc, KafkaError):
        return DsrflowError(f"the Kafka broker at {bootstrap} refused the request ({type(exc).__name__})")
    return None


def case_store_error(settings: Settings, exc: BaseException, timeout: float | None = None) -> DsrflowError | None:
    """The DsrflowError for a failure to connect to the case store, or None if ``exc`` is not one.
    The database is named ``host:port/dbname``: the message never holds the DSN's password."""
    import asyncpg

    if isinstance(exc, DsrflowError):
        return exc
    where = settings.case_store_location
    origin = settings.case_store_origin
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidCatalogNameError):
        # password authentication failed for user "x" / database "x" does not exist: no secrets
        return CaseStoreUnavailable(where, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                    refused=True, origin=origin)
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return ConfigError(f"DSRFLOW_PG_DSN is not usable ({type(exc).__name__})")
    if isinstance(exc, OSError | TimeoutError):
        return CaseStoreUnavailable(where, _reason(exc, timeout), origin=origin)
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.InterfaceError | asyncpg.CannotConnectNowError
                  | asyncpg.TooManyConnectionsError):
        return CaseStoreUnavailable(where, type(exc).__name__, origin=origin)
    return None


async def connect_case_store(settings: Settings, *, timeout: float = DEFAULT_TIMEOUT) -> asyncpg.Connection:
    """A connection to the case store, or :class:`CaseStoreUnavailable` within ``timeout`` seconds."""
    import asyncpg

    dsn = settings.dsn
    try:
        return await asyncio.wait_for(asyncpg.connect(dsn, timeout=timeout), timeout + 1)
    except Exception as exc:  # noqa: BLE001 - mapped, or re-raised as it was
        mapped = case_store_error(settings, exc, timeout)
        if mapped is None:
            raise
        raise mapped from exc


async def case_store_pool(settings: Settings, *, max_size: int = 1,
                          timeout: float = DEFAULT_TIMEOUT) -> asyncpg.Pool:
    """A connection pool on the case store, or :class:`CaseStoreUnavailable` within ``timeout`` seconds."""
    import asyncpg

    await (await connect_case_store(settings, timeout=timeout)).close()  # a clear error, within seconds
    try:
        return await asyncpg.create_pool(settings.dsn, min_size=1, max_size=max_size, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - mapped, or re-raised as it was
        mapped = case_store_error(settings, exc, timeout)
        if mapped is None:
            raise
        raise mapped from exc


async def check_broker(settings: Settings, needed: Iterable[str] = (), *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Raise :class:`BrokerUnavailable` unless a broker answers within ``timeout`` seconds, and
    :class:`TopicMissing` for the first of ``needed`` topics it does not have."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(**settings.kafka_client_options(), request_timeout_ms=int(timeout * 1000))
    t0 = time.monotonic()
    try:
        try:
            await asyncio.wait_for(client.bootstrap(), timeout + 1)
            cluster = await asyncio.wait_for(client.fetch_all_metadata(), timeout + 1)
        except Exception as exc:  # noqa: BLE001 - mapped, or re-raised as it was
            mapped = broker_error(settings, exc, timeout, waited=time.monotonic() - t0)
            if mapped is None:
                raise
            raise mapped from exc
        have = cluster.topics()
        for name in needed:
            if name not in have:
                raise TopicMissing(name, settings.bootstrap)
    finally:
        await client.close()


async def submit(settings: Settings, requests: Sequence[RightsRequested], *, timeout: float = DEFAULT_TIMEOUT,
                 source: str = "dsrflow/cli") -> list[str]:
    """Publish RightsRequested events to ``dsr.requests.v1`` (acks=all); returns their event ids.

    Fails within about ``timeout`` seconds with :class:`BrokerUnavailable` when no broker answers,
    or with :class:`TopicMissing` when the topic does not exist (``dsrflow topics apply``
    creates it), instead of waiting for a topic that may never come."""
    from aiokafka import AIOKafkaProducer

    from . import codec

    producer = AIOKafkaProducer(**settings.producer_options(), request_timeout_ms=int(timeout * 1000))
    ids = []
    try:
        try:
            await asyncio.wait_for(producer.start(), timeout + 1)
            # All topics' metadata: asking for the one topic could make a broker auto-create it,
            # with the broker's defaults instead of the declared partitions and retention.
            cluster = await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout + 1)
        except Exception as exc:  # noqa: BLE001 - mapped, or re-raised as it was
            mapped = broker_error(settings, exc, timeout)
            if mapped is None:
                raise
            raise mapped from exc
        if topics.REQUESTS not in cluster.topics():
            raise TopicMissing(topics.REQUESTS, settings.bootstrap)
        futures: list[asyncio.Future[Any]] = []
        try:
            for req in requests:
                value, headers = codec.encode(req, source=source)
                ids.append(dict(headers)["ce_id"].decode())
                futures.append(await producer.send(topics.REQUESTS, value=value, key=req.request_id.encode(),
                                                   headers=headers))
            await asyncio.gather(*futures)
        except Exception as exc:  # noqa: BLE001 - mapped, or re-raised as it was
            mapped = broker_error(settings, exc, timeout)
            if mapped is None:
                raise
            raise mapped from exc
    finally:
        await producer.stop()
    return ids
