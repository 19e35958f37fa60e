"""A worker announces its system on ``dsr.systems.v1``: when it starts, then as a heartbeat.

The announcement (:class:`~dsrflow.registry.SystemAnnounced`) carries the declaration, its digest,
the dsrflow and worker versions and the instance; it is keyed by the system's name on a
compacted topic, and signed with the worker's credential when it has one. The coordinator records
it; a new or changed declaration takes effect once an administrator approves it. This is how a
worker makes itself known without any access to the case store.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaProducer

from .. import codec, signing, topics
from ..auth import Credential
from ..registry import SystemAnnounced, declaration_digest

if TYPE_CHECKING:
    from ..settings import Settings
    from ._worker import Worker

log = logging.getLogger("dsrflow.worker")

#: How often a running worker announces itself again (its heartbeat).
ANNOUNCE_INTERVAL = timedelta(seconds=60)


def sdk_version() -> str:
    try:
        return metadata.version("dsrflow")
    except metadata.PackageNotFoundError:  # a checkout that is not installed
        return "unknown"


class Announcer:
    """Sends a worker's announcements: :meth:`start` sends the first (and waits for the broker to
    take it), then one every ``interval`` until :meth:`stop`."""

    def __init__(self, worker: Worker, settings: Settings, *, instance: str, credential: Credential | None,
                 interval: timedelta = ANNOUNCE_INTERVAL) -> None:
        self.worker = worker
        self.settings = settings
        self.instance = instance
        self.credential = credential
        self.interval = interval
        self.source = f"dsrflow/worker/{worker.name}"
        self.started_at = datetime.now(UTC)
        self.digest = declaration_digest(worker.system)
        self._producer: AIOKafkaProducer | None = None
        self._beat: asyncio.Task[None] | None = None

    def record(self) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
        """Key, value and headers of an announcement made now."""
        ann = SystemAnnounced(declaration=self.worker.system, digest=self.digest, sdk_version=sdk_version(),
                              version=self.worker.version, instance=self.instance,
                              started_at=self.started_at, at=datetime.now(UTC))
        event_id = str(uuid.uuid4())
        value, headers = codec.encode(ann, source=self.source, subject=self.worker.name, event_id=event_id)
        headers = list(headers)
        if self.credential is not None:
            headers += signing.sign_headers(self.credential, ce_id=event_id, ce_source=self.source, value=value,
                                            kind="announcement")
        return self.worker.name.encode(), value, headers

    async def send(self) -> None:
        assert self._producer is not None
        key, value, headers = self.record()
        await self._producer.send_and_wait(topics.SYSTEMS, value, key=key, headers=headers)

    async def start(self) -> None:
        """Send the first announcement (raises if the broker does not take it: the caller retries),
        then start the heartbeat."""
        self._producer = AIOKafkaProducer(client_id=f"dsrflow-worker-{self.worker.name}-announce",
                                          **self.settings.producer_options())
        try:
            await self._producer.start()
            await self.send()
        except BaseException:
            producer, self._producer = self._producer, None
            await producer.stop()
            raise
        log.info("worker %s announced declaration %s on %s (an administrator approves a new or changed one)",
                 self.worker.name, self.digest[:12], topics.SYSTEMS)
        self._beat = asyncio.create_task(self._heartbeat(), name=f"dsrflow-announce-{self.worker.name}")

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.interval.total_seconds())
            try:
                await self.send()
            except Exception as exc:  # noqa: BLE001 - the next beat tries again; consuming goes on meanwhile
                log.warning("worker %s: announcement not sent (%s)", self.worker.name, type(exc).__name__)

    async def stop(self) -> None:
        try:
            if self._beat is not None:
                beat, self._beat = self._beat, None
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
        finally:
            if self._producer is not None:
                producer, self._producer = self._producer, None
                await producer.stop()
