"""An ingestion pipeline that keeps erased people erased.

A CRM import, a marketing list upload or a partner feed can bring back a person whose erasure
dsrflow completed last month. This guard keeps the suppression list of ``dsr.suppressions.v1``
in memory and refuses to import anyone whose email or phone is on it:

- :class:`SuppressionList` reads the compacted topic from its beginning (no consumer group: every
  instance keeps the whole list), is :attr:`~SuppressionList.ready` once it has read to the end,
  then follows it, so an erasure completed while the pipeline runs counts from then on;
- :meth:`IngestGuard.guard` hashes a record's email and phone with the same managed key
  (``DSRFLOW_SUPPRESSION_KEY``) in dsrflow's normal form (:func:`dsrflow.suppression.suppression_hash`:
  ``Lan.Nguyen@Example.VN`` and ``0901 234 567`` find what the coordinator published) and says
  whether the record may be imported.

The list holds hashes only: the pipeline learns nothing about people it is not importing.

Run it on JSON lines (``{"email": ..., "phone": ...}`` per line) from stdin; the records it may
import go to stdout::

    DSRFLOW_SUPPRESSION_KEY=/secrets/suppression-key.json python -m examples.ingest_guard < people.jsonl
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Mapping
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from dsrflow import topics
from dsrflow.errors import ConfigError, TopicMissing
from dsrflow.events import SubjectSuppressed
from dsrflow.identity import DEFAULT_REGION, region_of
from dsrflow.settings import Settings, get_settings
from dsrflow.suppression import SuppressionKey, apply_record, configured_key, list_key, suppression_hash

log = logging.getLogger("ingest_guard")

#: the record's fields that hold identifiers, by identifier type
FIELDS = {"email": "email", "phone": "phone"}


class SuppressionList:
    """The hashes on ``dsr.suppressions.v1``: read all of it, then follow it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.entries: dict[str, SubjectSuppressed] = {}
        #: set once the topic was read to the end it had when the list started
        self.ready = asyncio.Event()

    def __contains__(self, listed: object) -> bool:
        """Whether ``<controller>:<hash>`` (:func:`dsrflow.suppression.list_key`) is on the list."""
        return listed in self.entries

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Read the topic from its beginning and keep following it until ``stop`` is set."""
        stop = stop or asyncio.Event()
        consumer = AIOKafkaConsumer(**self.settings.kafka_client_options(), group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            partitions = [TopicPartition(topics.SUPPRESSIONS, p) for p in sorted(await self._partitions(consumer))]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            while not stop.is_set():
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        apply_record(self.entries, r.key, r.value, r.headers)
                if not self.ready.is_set() and all([await consumer.position(tp) >= ends[tp] for tp in partitions]):
                    log.info("suppression list read: %d hash(es); following it", len(self.entries))
                    self.ready.set()
        finally:
            await consumer.stop()

    async def _partitions(self, consumer: AIOKafkaConsumer) -> set[int]:
        cluster = await consumer._client.fetch_all_metadata()  # noqa: SLF001 - fresh metadata
        found: set[int] = cluster.partitions_for_topic(topics.SUPPRESSIONS) or set()
        if not found:
            raise TopicMissing(topics.SUPPRESSIONS, self.settings.bootstrap)
        return found


class IngestGuard:
    """Refuses to import a person whose email or phone is on the suppression list."""

    def __init__(self, suppressed: SuppressionList, key: SuppressionKey, *, region: str | None = DEFAULT_REGION,
                 controller: str = "default") -> None:
        self.suppressed = suppressed
        self.key = key
        self.region = region  # where a local phone number (0901 234 567) is from
        self.controller = controller  # whose list: each controller (tenant) has its own
        self.refused = 0

    def guard(self, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` may be imported: False when its email or phone is suppressed. Call it
        once the list is :attr:`~SuppressionList.ready`. Logs no identifier."""
        if not self.suppressed.ready.is_set():
            raise RuntimeError("the suppression list is still being read: await its ready event first")
        for kind, name in FIELDS.items():
            value = record.get(name)
            if not value:
                continue
            try:
                digest = suppression_hash(self.key, kind, str(value), region=self.region)
            except ValueError:
                continue  # not an email or phone at all: it cannot be an erased person's
            listed = list_key(self.controller, digest)
            if listed in self.suppressed:
                entry = self.suppressed.entries[listed]
                self.refused += 1
                log.info("refused a record: its %s was erased by case %s", kind, entry.case_id)
                return False
        return True


async def main() -> int:
    """JSON lines from stdin; the records that may be imported to stdout."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    settings = get_settings()
    key = configured_key(settings)
    if key is None:
        raise ConfigError("set DSRFLOW_SUPPRESSION_KEY to the suppression key file (dsrflow suppression key)")
    stop = asyncio.Event()
    suppressed = SuppressionList(settings)
    follower = asyncio.create_task(suppressed.run(stop))
    ready = asyncio.create_task(suppressed.ready.wait())
    await asyncio.wait({follower, ready}, return_when=asyncio.FIRST_COMPLETED)
    if follower.done():
        ready.cancel()
        await follower  # raises why it stopped (a missing topic, say)
        return 1
    guard = IngestGuard(suppressed, key, region=region_of(settings.jurisdiction))
    try:
        for line in sys.stdin:
            if line.strip():
                record = orjson.loads(line)
                if guard.guard(record):
                    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await follower
    log.info("%d record(s) refused", guard.refused)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
