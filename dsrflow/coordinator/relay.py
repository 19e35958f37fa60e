"""The outbox relay: publishes queued events (acks=all, idempotent producer) and marks them sent.

Rows are claimed with ``FOR UPDATE SKIP LOCKED`` so several coordinator instances can
relay side by side; a crash between publish and mark re-publishes (at-least-once),
which consumers absorb through their inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
from aiokafka import AIOKafkaProducer

from ..settings import Settings
from ..store.outbox import NOTIFY_CHANNEL, headers_from_json

log = logging.getLogger("dsrflow.relay")


class OutboxRelay:
    def __init__(self, settings: Settings, *, batch_size: int = 500, poll_interval: float = 1.0) -> None:
        self.settings = settings
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self.published = 0

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        producer = AIOKafkaProducer(
            **self.settings.producer_options(),
            linger_ms=2,
            client_id="dsrflow-relay",
        )
        await producer.start()
        conn: asyncpg.Connection | None = None
        listen = await asyncpg.connect(self.settings.dsn)
        await listen.add_listener(NOTIFY_CHANNEL, self._notified)
        failures = 0
        try:
            while not stop.is_set():
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self.settings.dsn)
                    # Cleared before the pass: a NOTIFY that lands during it wakes the next wait at once.
                    self._wake.clear()
                    sent = await self.relay_once(conn, producer)
                    failures = 0
                except Exception as exc:  # noqa: BLE001 - database or broker away: nothing was marked sent
                    failures += 1
                    delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                    log.warning("relay: %s; retrying in %.1fs", type(exc).__name__, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    continue
                if sent < self.batch_size:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wait(stop), self.poll_interval)
        finally:
            with contextlib.suppress(Exception):
                await listen.close()
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            await producer.stop()

    async def _wait(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def relay_once(self, conn: asyncpg.Connection, producer: AIOKafkaProducer) -> int:
        """Publish one batch of unsent rows; returns how many were published."""
        async with conn.transaction():
            rows = await conn.fetch(
                """SELECT id, topic, key, value, headers FROM outbox WHERE sent_at IS NULL
                   ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED""",
                self.batch_size,
            )
            if not rows:
                return 0
            futures = [
                await producer.send(
                    r["topic"], value=r["value"], key=r["key"], headers=headers_from_json(r["headers"])
                )
                for r in rows
            ]
            await asyncio.gather(*futures)
            await conn.execute(
                "UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
            )
        self.published += len(rows)
        return len(rows)
