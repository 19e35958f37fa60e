"""Shared fixtures: a Kafka broker and an embedded PostgreSQL server, each started on
first use and once per session.

- ``broker``: bootstrap address of the test broker (``DSRFLOW_TEST_BROKER``: apache,
  tansu or host:port; default Apache Kafka when Java 17+ and Maven are at hand; with CI=true
  only Apache Kafka will do), see :mod:`dsrflow.testing.brokers`;
- ``broker_kind``: "apache", "tansu" or "external", for tests that meet a Tansu limit;
- ``pg_server``: DSN of the session's PostgreSQL (``postgres`` database), or
  ``DSRFLOW_TEST_PG_DSN`` when set;
- ``make_database``: ``await make_database(prefix="t") -> dsn`` of a fresh database;
- ``case_store``: DSN of a fresh database with dsrflow's migrations applied.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from dsrflow.testing.brokers import describe_choice, start_test_broker

PG_ENV_VAR = "DSRFLOW_TEST_PG_DSN"

#: what the session actually started, for the terminal summary
_started: dict[str, str] = {}
_broker_kind: dict[str, str] = {}
_broker_data: dict[str, Path | None] = {}


# -- reporting --------------------------------------------------------------
def pytest_report_header(config: pytest.Config) -> list[str]:
    pg = f"external {PG_ENV_VAR}" if os.environ.get(PG_ENV_VAR) else "embedded PostgreSQL"
    return [
        f"dsrflow test broker: {describe_choice()}; started on first use",
        f"dsrflow test database: {pg}; started on first use",
    ]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    terminalreporter.write_sep("-", "dsrflow test services")
    terminalreporter.write_line(f"broker: {_started.get('broker', 'not started (no test used it)')}")
    terminalreporter.write_line(f"postgres: {_started.get('postgres', 'not started (no test used it)')}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use the broker are marked ``kafka``, those that use PostgreSQL ``pg``,
    so ``-m "not kafka"`` works without marking by hand."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"broker", "broker_kind"}:
            item.add_marker(pytest.mark.kafka)
        if names & {"pg_server", "make_database", "case_store"}:
            item.add_marker(pytest.mark.pg)


# -- Kafka -------------------------------------------------------------------
@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap address (``host:port``) of the session's Kafka broker."""
    bootstrap, kind, stop = start_test_broker()
    _broker_kind["kind"] = kind
    _broker_data["dir"] = stop.data_dir
    _started["broker"] = stop.description
    try:
        yield bootstrap
    finally:
        stop()


@pytest.fixture(scope="session")
def broker_kind(broker: str) -> str:
    """"apache", "tansu" or "external"."""
    return _broker_kind["kind"]


@pytest.fixture(scope="session")
def broker_data_dir(broker: str) -> Path:
    """The session broker's log directory: tests read what the broker really stored there."""
    data = _broker_data.get("dir")
    if data is None:
        pytest.skip("the broker's log directory is known only for an Apache Kafka this session started")
    return data


_CODEC_NAMES = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


def stored_codecs(data_dir: Path, topic: str) -> list[str]:
    """The compression of every record batch the broker stored for ``topic``, read from its log
    segments (record batch v2: base offset, length, leader epoch, magic, crc, attributes)."""
    import struct

    codecs = []
    for segment in sorted(data_dir.glob(f"{topic}-*/*.log")):
        data = segment.read_bytes()
        pos = 0
        while pos + 23 <= len(data):
            length = struct.unpack_from(">i", data, pos + 8)[0]
            if length <= 0:
                break
            attributes = struct.unpack_from(">h", data, pos + 21)[0]
            codecs.append(_CODEC_NAMES.get(attributes & 0x7, "?"))
            pos += 12 + length
    return codecs


# -- PostgreSQL ----------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """DSN of the ``postgres`` database of the session's PostgreSQL server."""
    external = os.environ.get(PG_ENV_VAR)
    if external:
        _started["postgres"] = f"external {PG_ENV_VAR}"
        yield external
        return
    from dsrflow.stack.postgres import EmbeddedPostgres, server_version

    workdir = Path(tempfile.mkdtemp(prefix="dsrflow-test-pg-"))
    t0 = time.monotonic()
    pg = EmbeddedPostgres(workdir / "pg", fast=True, remove=True, log_path=workdir / "postgres.log")
    try:
        pg.start()
        _started["postgres"] = (
            f"embedded PostgreSQL {server_version()} on {pg.host}:{pg.port}, "
            f"started in {time.monotonic() - t0:.1f} s"
        )
        yield pg.dsn
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _database_name(prefix: str) -> str:
    clean = re.sub(r"[^a-z0-9_]", "_", prefix.lower())[:40] or "t"
    return f"{clean}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_database(pg_server: str) -> Callable[..., Awaitable[str]]:
    """``await make_database(prefix="t")``: DSN of a new, empty, uniquely named
    database on ``pg_server`` (left in place: the server goes at session end)."""
    from dsrflow.stack.postgres import create_database

    async def make(prefix: str = "t", *, template: str | None = None) -> str:
        return await create_database(pg_server, _database_name(prefix), template=template)

    return make


_case_template: dict[str, str] = {}
_case_template_lock: asyncio.Lock | None = None


@pytest_asyncio.fixture(loop_scope="session")
async def case_store(pg_server: str, make_database: Callable[..., Awaitable[str]]) -> str:
    """DSN of a fresh database with dsrflow's migrations applied (a copy of a template
    database migrated once per session)."""
    global _case_template_lock
    from dsrflow.stack.postgres import create_database
    from dsrflow.store import migrate

    if _case_template_lock is None:
        _case_template_lock = asyncio.Lock()
    async with _case_template_lock:
        if pg_server not in _case_template:
            name = _database_name("case_template")
            await migrate(await create_database(pg_server, name))
            _case_template[pg_server] = name
    return await make_database("case", template=_case_template[pg_server])


# -- a client no one here wrote ---------------------------------------------------
CODECS = ("gzip", "snappy", "lz4", "zstd")


def librdkafka_produce(
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]],
    *,
    compression: str = "none",
) -> None:
    """Produce ``(key, value, headers)`` records with confluent-kafka (librdkafka, the C client
    under the Go, .NET and Node clients too), compressed with ``compression``, and wait until the
    broker has every one of them (acks=all)."""
    from confluent_kafka import KafkaException, Producer

    errors: list[str] = []
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "compression.type": compression,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 200,  # several records per batch: a compressed batch holds more than one
        "message.timeout.ms": 30_000,
    })

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    for key, value, headers in records:
        producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivered)
    left = producer.flush(60)
    if left or errors:
        raise KafkaException(f"librdkafka: {left} record(s) undelivered, errors: {errors}")
