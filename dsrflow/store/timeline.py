"""The case timeline: append-only and hash-chained per case, so tampering shows.

Each entry's hash is ``sha256(prev_hash || canonical(entry))``; the first entry of a
case chains from 32 zero bytes. :func:`verify` recomputes the chain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from ..domain.timeline import Entry

__all__ = ["GENESIS", "Entry", "append", "canonical", "chain_hash", "verify"]

GENESIS = bytes(32)


def canonical(case_id: UUID, position: int, at: datetime, kind: str, detail: Mapping[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "case_id": str(case_id),
            "position": position,
            "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
            "kind": kind,
            "detail": detail,
        },
        option=orjson.OPT_SORT_KEYS,
    )


def chain_hash(prev_hash: bytes, entry: bytes) -> bytes:
    return hashlib.sha256(prev_hash + entry).digest()




async def append(conn: asyncpg.Connection, entries: Iterable[Entry]) -> dict[UUID, tuple[int, bytes]]:
    """Append entries to their cases' timelines, and anchor each chain's new head (length, hash) in
    its case row. Call inside the transaction that made the change; the caller must hold the case
    rows locked (``SELECT ... FOR UPDATE``) so chains stay linear. Returns the new heads."""
    entries = list(entries)
    if not entries:
        return {}
    case_ids = list({e.case_id for e in entries})
    heads = {
        r["case_id"]: (r["position"], bytes(r["hash"]))
        for r in await conn.fetch(
            """SELECT DISTINCT ON (case_id) case_id, position, hash FROM case_timeline
               WHERE case_id = ANY($1::uuid[]) ORDER BY case_id, position DESC""",
            case_ids,
        )
    }
    rows = []
    for e in entries:
        pos, prev = heads.get(e.case_id, (0, GENESIS))
        pos += 1
        at = e.at.astimezone(UTC)
        h = chain_hash(prev, canonical(e.case_id, pos, at, e.kind, e.detail))
        rows.append((e.case_id, pos, at, e.kind, orjson.dumps(e.detail).decode(), prev, h))
        heads[e.case_id] = (pos, h)
    await conn.executemany(
        """INSERT INTO case_timeline (case_id, position, at, kind, detail, prev_hash, hash)
           VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)""",
        rows,
    )
    moved = {e.case_id: heads[e.case_id] for e in entries}
    await conn.executemany("UPDATE cases SET timeline_length = $2, timeline_head = $3 WHERE case_id = $1",
                           [(case_id, pos, h) for case_id, (pos, h) in sorted(moved.items())])
    return moved


def verify(rows: Iterable[Mapping[str, Any]]) -> bool:
    """True when rows (one case, ordered by position) form an unbroken chain."""
    prev = GENESIS
    expected_pos = 1
    for r in rows:
        detail = r["detail"]
        if isinstance(detail, str):
            detail = orjson.loads(detail)
        if r["position"] != expected_pos or bytes(r["prev_hash"]) != prev:
            return False
        h = chain_hash(prev, canonical(r["case_id"], r["position"], r["at"], r["kind"], detail))
        if h != bytes(r["hash"]):
            return False
        prev = h
        expected_pos += 1
    return True


def problems(rows: Iterable[Mapping[str, Any]], *, length: int, head: bytes | None,
             published: tuple[int, bytes] | None = None) -> list[str]:
    """What is wrong with one case's timeline (rows ordered by position), checked against the
    anchors kept outside the table: the case row's ``(length, head)``, and the last head published
    on ``dsr.cases.v1`` (``published``). Empty when it verifies. Each problem names positions and
    what they show; no entry content (it may hold identifiers' types, never values, but stays out)."""
    found: list[str] = []
    prev = GENESIS
    hashes: list[bytes] = []  # the chain recomputed from the entries' content
    for expected, r in enumerate(rows, start=1):
        detail = r["detail"]
        if isinstance(detail, str):
            detail = orjson.loads(detail)
        if r["position"] != expected:
            found.append(f"entry {expected} is missing or out of place (found position {r['position']}): "
                         "an entry was deleted or inserted")
            break
        if bytes(r["prev_hash"]) != prev:
            found.append(f"entry {expected} does not chain to entry {expected - 1}: an entry was replaced or inserted")
        h = chain_hash(prev, canonical(r["case_id"], r["position"], r["at"], r["kind"], detail))
        if h != bytes(r["hash"]):
            found.append(f"entry {expected}'s content does not match its hash: it was edited")
        hashes.append(h)
        prev = bytes(r["hash"])
    if len(hashes) != length:
        found.append(f"the table holds {len(hashes)} entries, but the case row's anchor says {length}: "
                     "entries were cut off, deleted or added")
    elif hashes and (head is None or bytes(r["hash"]) != head):
        found.append("the last entry is not the one the case row's anchor names: the tail was replaced")
    elif not hashes and head is not None:
        found.append("the case row names a head, but the table holds no entry: the timeline was deleted")
    if published is not None:
        n, h = published
        if n > len(hashes):
            found.append(f"dsr.cases.v1 published a timeline of {n} entries; the table holds {len(hashes)}: "
                         "it was cut off")
        elif n and hashes[n - 1] != h:
            found.append(f"entry {n} differs from the head published on dsr.cases.v1: the timeline was rewritten")
    return found
