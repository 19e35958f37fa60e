"""Outbox and inbox: every event leaves through the outbox, written in the transaction
that caused it; every consumer records processed event ids in the inbox, in the
transaction of the effect, so redelivery changes nothing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg
import orjson

from .. import codec
from ..events import Event

NOTIFY_CHANNEL = "dsrflow_outbox"


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    topic: str
    key: bytes | None
    value: bytes
    headers: codec.Headers


def message(topic: str, key: str | None, event: Event, *, source: str, subject: str | None = None,
            traceparent: str | None = None) -> OutboxMessage:
    value, headers = codec.encode(event, source=source, subject=subject, traceparent=traceparent)
    return OutboxMessage(topic, key.encode() if key is not None else None, value, headers)


def _headers_json(headers: codec.Headers) -> str:
    # Names and values may be anything a foreign client sent (a dead-lettered record keeps its own
    # headers), including bytes jsonb refuses such as NUL: hex keeps both exact and storable.
    return orjson.dumps([[k.encode("utf-8", "surrogateescape").hex(), v.hex()] for k, v in headers]).decode()


def headers_from_json(data: str | list[list[str]]) -> codec.Headers:
    items = orjson.loads(data) if isinstance(data, str) else data
    return [(bytes.fromhex(k).decode("utf-8", "surrogateescape"), bytes.fromhex(v)) for k, v in items]


async def add(conn: asyncpg.Connection, messages: Iterable[OutboxMessage]) -> int:
    """Queue messages for the relay; call inside the transaction of the state change."""
    rows = [(m.topic, m.key, m.value, _headers_json(m.headers)) for m in messages]
    if not rows:
        return 0
    await conn.executemany(
        "INSERT INTO outbox (topic, key, value, headers) VALUES ($1, $2, $3, $4::jsonb)", rows
    )
    # Delivered at commit; wakes the relay without waiting for its poll interval.
    await conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
    return len(rows)


async def claim_inbox(
    conn: asyncpg.Connection, consumer: str, events: Sequence[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Record events, as (source, id), as processed by ``consumer``; returns those not seen before."""
    if not events:
        return set()
    rows = await conn.fetch(
        """INSERT INTO inbox (consumer, source, event_id)
           SELECT $1, s, e FROM unnest($2::text[], $3::text[]) AS t(s, e)
           ON CONFLICT DO NOTHING RETURNING source, event_id""",
        consumer,
        [source for source, _ in events],
        [event_id for _, event_id in events],
    )
    return {(r["source"], r["event_id"]) for r in rows}
