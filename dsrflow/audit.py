"""``dsrflow audit verify``: check every case's hash-chained timeline against the anchors kept
outside its table.

Three places hold a case's history, and the audit compares them:

- ``case_timeline``: the entries, each hashed with the one before (:mod:`dsrflow.store.timeline`);
- the case row: the chain's length and head, written in the transaction that appended;
- ``dsr.cases.v1``: every CaseUpdated carries the length and head at that moment; the topic is
  compacted, so its last record per case is the latest anchor published.

An edited, inserted or deleted entry breaks the chain; a truncated table or a cut-off tail no longer
matches the case row; rewriting the table and the case row together no longer matches what was
published on Kafka (the topic's head must be an entry of the chain, at its position).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from . import codec, topics
from .events import CaseUpdated
from .store.timeline import problems

__all__ = ["AuditReport", "published_anchors", "verify"]


@dataclass(slots=True)
class AuditReport:
    checked: int = 0
    #: case id -> what is wrong with it
    failures: dict[uuid.UUID, list[str]] = field(default_factory=dict)
    #: whether dsr.cases.v1 was compared too
    against_topic: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures


async def published_anchors(kafka_options: dict[str, Any], *, timeout: float = 30.0) -> dict[
        uuid.UUID, tuple[int, bytes]]:
    """The last ``(timeline_length, timeline_head)`` published on dsr.cases.v1 for each case, read
    from the beginning of the topic to its end as of now."""
    anchors: dict[uuid.UUID, tuple[int, bytes]] = {}

    def anchor(r: Any) -> None:
        try:
            event = codec.decode(r.value, r.headers, CaseUpdated).data
        except codec.DecodeError:
            return
        if event.timeline_head is not None and event.timeline_length is not None:
            anchors[event.case_id] = (event.timeline_length, bytes.fromhex(event.timeline_head))

    await topics.read_to_end(kafka_options, topics.CASES, anchor, timeout=timeout)  # no topic: no anchors
    return anchors


async def verify(conn: asyncpg.Connection, case_ids: Iterable[uuid.UUID] | None = None, *,
                 anchors: dict[uuid.UUID, tuple[int, bytes]] | None = None) -> AuditReport:
    """Check the timelines of ``case_ids`` (default: every case) against their case rows and, when
    ``anchors`` are given (:func:`published_anchors`), against what dsr.cases.v1 published."""
    wanted = None if case_ids is None else sorted(set(case_ids))
    report = AuditReport(against_topic=anchors is not None)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        cases = await conn.fetch(
            "SELECT case_id, timeline_length, timeline_head FROM cases"
            + ("" if wanted is None else " WHERE case_id = ANY($1::uuid[])") + " ORDER BY case_id",
            *([] if wanted is None else [wanted]))
        for c in cases:
            rows = await conn.fetch("SELECT * FROM case_timeline WHERE case_id = $1 ORDER BY position", c["case_id"])
            head = bytes(c["timeline_head"]) if c["timeline_head"] is not None else None
            found = problems(rows, length=c["timeline_length"], head=head,
                             published=(anchors or {}).get(c["case_id"]))
            report.checked += 1
            if found:
                report.failures[c["case_id"]] = found
        present = {c["case_id"] for c in cases}
    for case_id in sorted(set(anchors or {}) - present):
        if wanted is None or case_id in wanted:
            report.failures[case_id] = ["published on dsr.cases.v1, but missing from the case store: it was deleted"]
    return report

