"""The outbox relay: publishes queued events (acks=all, idempotent producer) and marks them sent.

One relay publishes at a time (a PostgreSQL advisory lock), so events for a key leave in the
order they were written even when several coordinators run; the others stand by. A crash
between publish and mark re-publishes (at-least-once), which consumers absorb through their
inbox. A row the broker refuses for good (too large, a topic that never appears) is set aside
as failed, with its error, so it cannot hold up every event behind it.

The lock orders publishing while relays can reach PostgreSQL: a relay cut off in the middle of
a send could still deliver that send late, after its successor took over (fencing it would need
a transactional producer, which the embedded broker lacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidMessageError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)

from ..auth import Credential, load_credential
from ..codec import header_map
from ..settings import Settings
from ..signing import KEY_HEADER, SIGNATURE_HEADER, sign_headers
from ..store.outbox import NOTIFY_CHANNEL, headers_from_json

log = logging.getLogger("dsrflow.relay")

_LOCK_ID = 0x64737272  # "dsrr": the relay's advisory lock
#: A row for a topic the broker lacks is set aside only after this many passes AND this long since
#: its first miss, so a topic that appears a moment late (metadata lag, a brief ACL gap) loses nothing.
MAX_ROW_ATTEMPTS = 5
SET_ASIDE_AFTER = timedelta(minutes=5)


#: Errors about one record that no retry can fix. Anything else (a fenced or failed producer, an
#: authorisation error, a timeout) is about the producer or the cluster: the relay rebuilds its
#: producer and tries again, rather than set aside every row behind a broken producer.
_ROW_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError, CorruptRecordException, InvalidMessageError)


_TASKS_PREFIX = "dsr.tasks."


def sign_task(credential: Credential, headers: list[tuple[str, bytes]], value: bytes) -> list[tuple[str, bytes]]:
    """A task record's headers with the coordinator's signature (any earlier one replaced)."""
    ce = header_map(headers)
    kept = [(k, v) for k, v in headers if k not in (KEY_HEADER, SIGNATURE_HEADER)]
    return kept + sign_headers(credential, ce_id=ce.get("ce_id", ""), ce_source=ce.get("ce_source", ""),
                               value=value, kind="task")


class OutboxRelay:
    def __init__(self, settings: Settings, *, batch_size: int = 500, poll_interval: float = 1.0,
                 standby_interval: float = 2.0, set_aside_after: timedelta = SET_ASIDE_AFTER) -> None:
        self.settings = settings
        self.set_aside_after = set_aside_after
        self._failures = 0
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.standby_interval = standby_interval
        self._wake = asyncio.Event()
        #: the coordinator's signing key: every task leaves signed (workers check it)
        self._credential = load_credential(settings.coordinator_credential) if settings.coordinator_credential \
            else None
        self.published = 0
        self.set_aside = 0

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Relay until ``stop`` is set. Never raises for a broker or database outage: it waits it out."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self._run_connected(stop)
                return
            except Exception as exc:  # noqa: BLE001 - database or broker away: nothing unsent was marked sent
                self._failures += 1
                delay = min(30.0, 0.5 * 2 ** min(self._failures, 6))
                log.warning("relay: %s; reconnecting in %.1fs", type(exc).__name__, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    async def _run_connected(self, stop: asyncio.Event) -> None:
        producer = AIOKafkaProducer(**self.settings.producer_options(), linger_ms=2, client_id="dsrflow-relay")
        conn: asyncpg.Connection | None = None
        try:
            await producer.start()
            conn = await asyncpg.connect(self.settings.dsn)
            while not stop.is_set():
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_ID):
                    break
                with contextlib.suppress(TimeoutError):  # another coordinator's relay is active
                    await asyncio.wait_for(stop.wait(), self.standby_interval)
            else:
                return
            await conn.add_listener(NOTIFY_CHANNEL, self._notified)
            log.info("relay active")
            while not stop.is_set():
                # Cleared before the pass: a NOTIFY that lands during it wakes the next wait at once.
                self._wake.clear()
                sent = await self.relay_once(conn, producer)
                self._failures = 0  # a pass went through: the next outage starts its backoff afresh
                if sent < self.batch_size:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wait(stop), self.poll_interval)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()  # also releases the advisory lock
            with contextlib.suppress(Exception):
                await producer.stop()

    async def _wait(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def relay_once(self, conn: asyncpg.Connection, producer: AIOKafkaProducer) -> int:
        """Publish one batch of unsent rows; returns how many rows were settled (sent or set aside).

        Rows for a topic the broker does not have are not sent (a send would wait out the request
        timeout): they count an attempt and are set aside after ``MAX_ROW_ATTEMPTS``. The rest go
        in one go; if that fails, row by row, so a row the broker refuses for good costs only
        itself. A retriable failure (the broker is away) raises, and the relay backs off without
        counting attempts against any row.
        """
        async with conn.transaction():
            rows = await conn.fetch(
                """SELECT id, topic, key, value, headers, attempts, first_failed_at, now() AS now FROM outbox
                   WHERE sent_at IS NULL AND failed_at IS NULL
                   ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED""",
                self.batch_size,
            )
            if not rows:
                return 0
            failed: list[tuple[int, bool, str]] = []  # (id, set aside now, error)
            wanted = {r["topic"] for r in rows}
            if not wanted <= producer.client.cluster.topics():
                known = (await producer.client.fetch_all_metadata()).topics()  # raises if the broker is away
                for r in rows:
                    if r["topic"] not in known:
                        first = r["first_failed_at"] or r["now"]
                        final = r["attempts"] + 1 >= MAX_ROW_ATTEMPTS and r["now"] - first >= self.set_aside_after
                        failed.append((r["id"], final, f"topic {r['topic']} does not exist"))
                missing = {row_id for row_id, _, _ in failed}
                rows = [r for r in rows if r["id"] not in missing]
            sent: list[int] = []
            try:
                await asyncio.gather(*[await self._send(producer, r) for r in rows])
                sent = [r["id"] for r in rows]
            except Exception:  # noqa: BLE001 - find out which rows; the others go now
                for r in rows:
                    try:
                        await (await self._send(producer, r))
                    except Exception as exc:
                        if not isinstance(exc, _ROW_ERRORS):
                            raise  # the broker or the producer is at fault: roll back, rebuild, count nothing
                        failed.append((r["id"], True, f"{type(exc).__name__}: {exc}"[:1000]))
                    else:
                        sent.append(r["id"])
            await conn.execute("UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])", sent)
            await conn.executemany(
                """UPDATE outbox SET attempts = attempts + 1, error = $3,
                       first_failed_at = coalesce(first_failed_at, now()),
                       failed_at = CASE WHEN $2 THEN now() END WHERE id = $1""",
                failed,
            )
        self.published += len(sent)
        aside = [(row_id, error) for row_id, final, error in failed if final]
        for row_id, error in aside:
            log.error("outbox row %d set aside, it cannot be published: %s", row_id, error)
        self.set_aside += len(aside)
        return len(sent) + len(aside)

    async def _send(self, producer: AIOKafkaProducer, r: asyncpg.Record) -> asyncio.Future[Any]:
        headers = headers_from_json(r["headers"])
        if self._credential is not None and r["topic"].startswith(_TASKS_PREFIX):
            headers = sign_task(self._credential, headers, r["value"] or b"")
        fut: asyncio.Future[Any] = await producer.send(r["topic"], value=r["value"], key=r["key"], headers=headers)
        return fut
