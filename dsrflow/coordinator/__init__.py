"""The coordinator: intake, planner, aggregator and outbox relay."""

from .service import Coordinator, Record

__all__ = ["Coordinator", "Record"]
