"""dsrflow's own exceptions, under one root.

Catch :class:`DsrflowError` to handle every failure dsrflow explains itself; its message is
one line meant for a person, with no personal data and no secrets (a database is named
``host:port/dbname``, never by its DSN). The command line prints it as ``error: <message>``.

What can go wrong::

    DsrflowError
    ├── ConfigError               a setting is missing or invalid (names the DSRFLOW_* variable)
    │   ├── StackNotRunning       no connection setting, and no embedded stack running (dsrflow.settings)
    │   └── ApiTokenMissing       the API has no strong token to require (dsrflow.api)
    ├── InvalidInput              bad arguments: a case id that is no UUID, an unknown
    │                             jurisdiction, a worker that cannot be found (CLI exit code 2)
    ├── ServiceUnavailable        a service dsrflow needs did not answer in time
    │   ├── BrokerUnavailable     no Kafka broker answers at the bootstrap address
    │   └── CaseStoreUnavailable  PostgreSQL is unreachable or refuses the connection
    ├── TopicMissing              a topic dsrflow needs does not exist (`dsrflow topics apply`)
    ├── DecodeError               an event that cannot be decoded or validated (dsrflow.codec; dead-lettered)
    ├── UnknownJurisdiction       no data file for a jurisdiction code (dsrflow.policy)
    ├── UnsupportedRight          a jurisdiction's data file has no deadline for the right (dsrflow.policy)
    ├── PolicyDataError           a jurisdiction data file is malformed (dsrflow.policy)
    ├── CaseError                 a transition a case refuses (dsrflow.domain.case)
    │   ├── InvalidTransition     the case or task is not in a state that allows it
    │   └── CaseNotFound          no case with that id (dsrflow.coordinator.service)
    ├── ExportError               the export store failed (dsrflow.exports)
    │   ├── InvalidKey, ArtifactNotFound
    │   └── BundleError           an export does not match its receipt: the case fails, not the coordinator
    ├── TaskError                 a worker handler's own failure, reported in the receipt (dsrflow.worker)
    │   └── RetryableError        transient: the coordinator sends the task again
    ├── BadCursor                 an API page cursor that is not one (dsrflow.api)
    └── TestBrokerError           the test broker asked for cannot be used (dsrflow.testing.brokers)

The embedded stack's start-up errors (``StackError``, ``KafkaUnavailable``, ``ServiceStartError``
in dsrflow.stack, a development tool) are not under this root; the CLI turns them into one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "BrokerUnavailable",
    "CaseStoreUnavailable",
    "ConfigError",
    "DsrflowError",
    "InvalidInput",
    "ServiceUnavailable",
    "TopicMissing",
    "validation_summary",
]


class DsrflowError(Exception):
    """The root of dsrflow's exceptions. ``str(exc)`` is one line fit to show a person."""


class ConfigError(DsrflowError):
    """A setting is missing or invalid. The message names the ``DSRFLOW_*`` variable."""


class InvalidInput(DsrflowError):
    """The arguments are wrong: the caller can fix them. The CLI exits with code 2."""


class ServiceUnavailable(DsrflowError):
    """A service dsrflow needs (the Kafka broker, the case store) did not answer in time."""


def _details(*parts: str | None) -> str:
    joined = "; ".join(p for p in parts if p)
    return f" ({joined})" if joined else ""


class BrokerUnavailable(ServiceUnavailable):
    """No Kafka broker answers at the bootstrap address.

    ``origin`` says where the address came from when it was not a setting ("from the embedded
    stack in DIR")."""

    def __init__(self, bootstrap: str, reason: str | None = None, *, origin: str | None = None) -> None:
        self.bootstrap = bootstrap
        self.reason = reason
        self.origin = origin
        super().__init__(f"no Kafka broker answers at {bootstrap}" + _details(reason, origin))


class CaseStoreUnavailable(ServiceUnavailable):
    """The case store (PostgreSQL) is unreachable, or refuses the connection.

    ``location`` is ``host:port/dbname``: never the DSN, which may hold a password. ``origin``
    says where the DSN came from when it was not a setting ("from the embedded stack in DIR")."""

    def __init__(self, location: str, reason: str | None = None, *, refused: bool = False,
                 origin: str | None = None) -> None:
        self.location = location
        self.reason = reason
        self.origin = origin
        if refused:
            message = (f"case store at {location} refused the connection" + (f": {reason}" if reason else "")
                       + _details(origin))
        else:
            message = f"case store unreachable at {location}" + _details(reason, origin)
        super().__init__(message)


class TopicMissing(DsrflowError):
    """A topic dsrflow needs does not exist on the broker."""

    def __init__(self, topic: str, bootstrap: str) -> None:
        self.topic = topic
        self.bootstrap = bootstrap
        super().__init__(f"topic {topic} does not exist on {bootstrap}: run `dsrflow topics apply`")


def validation_summary(exc: Any, name: Callable[[tuple[Any, ...]], str] | None = None) -> str:
    """One line from a pydantic ``ValidationError``: where and what, never the input value
    (it may be personal data or a secret). ``name`` turns an error's ``loc`` into a label
    (an empty label, as for a model-level error, leaves just the message)."""
    label = name or (lambda loc: ".".join(str(p) for p in loc))
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        where = label(tuple(err.get("loc", ())))
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid input"
