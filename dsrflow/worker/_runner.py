"""The Kafka side of a worker: consume tasks in batches, produce receipts, then commit.

Per batch: decode every record (undecodable ones and tasks for another system go to the
dead-letter topic with ``dlq_*`` headers), run the handlers concurrently, send every receipt
and dead letter, wait until the broker has them all (acks=all, idempotent producer), and only
then commit the batch's offsets. A crash before the commit redelivers the batch; handlers are
idempotent and a receipt's CloudEvents id is derived from (task, attempt), so the coordinator's
inbox drops the duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CorruptRecordException, KafkaError, UnsupportedCodecError

from .. import codec, registry, topics
from .._startup import StartupBudget, wait_for_broker, wait_for_case_store
from ..codec import DecodeError
from ..events import DeadLetter, TaskAssigned, TaskReceipt
from ..exports.store import ExportStore, LocalExportStore

if TYPE_CHECKING:
    from ..settings import Settings
    from ._worker import Worker

log = logging.getLogger("dsrflow.worker")

POLL_TIMEOUT_MS = 500  # how long an idle worker waits before it looks at the stop event again
BACKOFF_MAX_S = 30.0
_RECEIPT_NS = uuid.UUID("5b0e8f5e-8f7a-4a77-9a55-5d2b1f0c6d11")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-[0-9a-f]{16}-([0-9a-f]{2})$")

Batch = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


def receipt_event_id(receipt: TaskReceipt) -> str:
    """One CloudEvents id per (task, attempt): a receipt sent twice is the same event."""
    return str(uuid.uuid5(_RECEIPT_NS, f"{receipt.task_id}:{receipt.attempt}"))


def child_traceparent(parent: str | None) -> str | None:
    """Continue the task's W3C trace in its receipt (same trace id, new span id)."""
    m = _TRACEPARENT.match(parent or "")
    return f"00-{m.group(1)}-{os.urandom(8).hex()}-{m.group(2)}" if m else None


def group_id(system: str) -> str:
    return f"dsrflow-worker-{system}"


class _Runner:
    def __init__(self, worker: Worker, settings: Settings, store: ExportStore, stop: asyncio.Event) -> None:
        self.worker = worker
        self.settings = settings
        self.store = store
        self.stop = stop
        self.topic = topics.tasks_topic(worker.name)
        self.group = group_id(worker.name)
        self.source = f"dsrflow/worker/{worker.name}"
        self._semaphore = asyncio.Semaphore(worker.concurrency)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        # Receipts of the batch in hand, kept until its offsets are committed: when delivery fails
        # and the batch comes round again, the same receipts are sent, not a re-run's view of a
        # store the first run already changed (an erasure re-run would find nothing: not_found).
        self._settled: dict[tuple[uuid.UUID, int], TaskReceipt] = {}

    async def register(self, budget: StartupBudget | None = None) -> None:
        """Register the system in the case store, waiting for PostgreSQL within ``budget``
        (startup_timeout when None)."""

        async def attempt() -> None:
            conn = await asyncpg.connect(self.settings.dsn, timeout=10)
            try:
                await registry.register(conn, self.worker.system)
            finally:
                await conn.close()

        await wait_for_case_store(self.settings, attempt, log=log, budget=budget)

    async def ensure_topic(self, budget: StartupBudget | None = None) -> None:
        """Create the system's task topic, waiting for the broker within ``budget``
        (startup_timeout when None)."""
        spec = topics.declared()[topics.TASKS_TEMPLATE].for_system(self.worker.name)

        async def attempt() -> topics.ApplyReport:
            return await topics.apply(self.settings.kafka_client_options(), [spec],
                                      replication_factor=self.settings.topic_replication_factor)

        report = await wait_for_broker(self.settings, attempt, log=log, budget=budget)
        for name, diffs in report.drift.items():
            log.warning("topic %s differs from its declaration: %s", name, "; ".join(diffs))

    async def run(self) -> None:
        """Raises :class:`~dsrflow.errors.ServiceUnavailable` when the broker or the case store
        does not answer within ``settings.startup_timeout`` (one deadline for both)."""
        worker = self.worker
        worker.check()
        budget = StartupBudget.of(self.settings)
        # The topic first: a system registered without its topic would get tasks the relay cannot deliver.
        await self.ensure_topic(budget)
        await self.register(budget)
        async with worker.lifespan(self.settings):
            opts = self.settings.kafka_client_options()
            # A batch may take ceil(max_batch / concurrency) rounds of task_timeout at worst.
            rounds = -(-worker.max_batch // worker.concurrency)
            poll_interval_ms = max(300_000, int(rounds * worker.task_timeout.total_seconds() * 1000) + 60_000)
            self.consumer = AIOKafkaConsumer(
                self.topic,
                group_id=self.group,
                client_id=self.group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_interval_ms=poll_interval_ms,
                **opts,
            )
            # acks=all and, where the broker supports it, idempotence (Settings.producer_options).
            self.producer = AIOKafkaProducer(client_id=self.group, linger_ms=5, **self.settings.producer_options())
            await self.producer.start()
            try:
                await self.consumer.start()
                try:
                    log.info("worker %s consuming %s as group %s", worker.name, self.topic, self.group)
                    await self._loop()
                finally:
                    await self.consumer.stop()
            finally:
                await self.producer.stop()
        log.info("worker %s stopped", worker.name)

    async def _loop(self) -> None:
        assert self.consumer is not None
        failures = 0
        while not self.stop.is_set():
            try:
                batch: Batch = await self.consumer.getmany(
                    timeout_ms=POLL_TIMEOUT_MS, max_records=self.worker.max_batch
                )
            except (UnsupportedCodecError, CorruptRecordException) as exc:
                await self._skip_undecodable(exc)
                continue
            except KafkaError as exc:
                failures += 1
                log.warning("worker %s: fetch failed (%s); retrying", self.worker.name, type(exc).__name__)
                await self._pause(failures)
                continue
            except Exception as exc:  # noqa: BLE001 - a decompressor's own error: the batch, not the broker
                await self._skip_undecodable(exc)
                continue
            if not batch:
                continue
            try:
                await self._process(batch)
            except Exception as exc:  # noqa: BLE001 - a consumer never dies on bad input or a broker hiccup
                failures += 1
                log.error(
                    "worker %s: batch of %d not delivered (%s); will process it again",
                    self.worker.name,
                    sum(len(v) for v in batch.values()),
                    type(exc).__name__,
                )
                self._rewind(batch)
                await self._pause(failures)
                continue
            failures = 0
            await self._commit(batch)
            self._settled.clear()

    async def _skip_undecodable(self, exc: Exception) -> None:
        """A record batch that cannot be decoded (a codec missing, corrupt bytes) would fail every
        fetch of its partition for good. Find the partition by fetching each on its own, dead-letter
        the offset it is stuck at with the reason (no bytes: there are none to keep), commit past
        it and go on. A compressed batch of n records takes n rounds, one dead letter each."""
        assert self.consumer is not None
        for tp in sorted(self.consumer.assignment(), key=lambda t: (t.topic, t.partition)):
            try:
                got = await self.consumer.getmany(tp, timeout_ms=POLL_TIMEOUT_MS, max_records=1)
            except Exception as err:  # noqa: BLE001 - this is the partition
                if isinstance(err, KafkaError) and not isinstance(err, UnsupportedCodecError | CorruptRecordException):
                    continue  # a broker hiccup on this one: the next round looks again
                offset = await self.consumer.position(tp)
                record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
                    tp.topic, tp.partition, offset, -1, 0, None, b"", None, 0, 0, ())
                reason = f"record batch at offset {offset} cannot be decoded: {type(err).__name__}"
                try:
                    await (await self._dead_letter(record, "undecodable_batch", reason))
                    await self.consumer.commit({tp: offset + 1})
                except Exception as send_err:  # noqa: BLE001 - not recorded: do not skip it
                    log.error("worker %s: could not dead-letter %s@%d (%s)", self.worker.name, tp, offset,
                              type(send_err).__name__)
                    await self._pause(1)
                    return
                self.consumer.seek(tp, offset + 1)
                return
            for records in got.values():  # decodable: read again in the normal loop
                if records:
                    self.consumer.seek(tp, records[0].offset)
        log.warning("worker %s: fetch failed (%s), but no partition on its own does; retrying", self.worker.name,
                    type(exc).__name__)
        await self._pause(1)

    async def _pause(self, failures: int) -> None:
        delay = min(BACKOFF_MAX_S, 0.5 * 2 ** min(failures, 10))
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=delay)
        except TimeoutError:
            pass

    async def _process(self, batch: Batch) -> None:
        assert self.producer is not None
        tasks: list[tuple[TaskAssigned, str | None]] = []
        deliveries: list[asyncio.Future[Any]] = []
        for tp in sorted(batch, key=lambda t: (t.topic, t.partition)):
            for record in batch[tp]:
                try:
                    env = codec.decode(record.value, record.headers, TaskAssigned)
                except DecodeError as exc:
                    deliveries.append(await self._dead_letter(record, exc.kind, str(exc)))
                    continue
                if env.data.system != self.worker.name:
                    deliveries.append(
                        await self._dead_letter(
                            record, "wrong_system", f"task for system {env.data.system!r} on {self.topic}"
                        )
                    )
                    continue
                tasks.append((env.data, env.traceparent))
        receipts = await self._handle_all([task for task, _ in tasks])
        for receipt, (_, traceparent) in zip(receipts, tasks, strict=True):
            value, headers = codec.encode(
                receipt,
                source=self.source,
                subject=str(receipt.case_id),
                event_id=receipt_event_id(receipt),
                traceparent=child_traceparent(traceparent),
            )
            deliveries.append(
                await self.producer.send(topics.RECEIPTS, value, key=str(receipt.case_id).encode(), headers=headers)
            )
        # Every receipt and dead letter acknowledged by the broker before the offsets move on.
        await asyncio.gather(*deliveries)

    async def _handle_all(self, tasks: list[TaskAssigned]) -> list[TaskReceipt]:
        """Handlers run concurrently (bounded), except that tasks of one case run one after the
        other in log order, as Kafka delivered them (a task and its retry, say)."""
        by_case: dict[uuid.UUID, list[int]] = {}
        for i, task in enumerate(tasks):
            by_case.setdefault(task.case_id, []).append(i)
        receipts: list[TaskReceipt | None] = [None] * len(tasks)

        async def in_order(indexes: list[int]) -> None:
            for i in indexes:
                receipts[i] = await self._handle(tasks[i])

        await asyncio.gather(*(in_order(ix) for ix in by_case.values()))
        return [r for r in receipts if r is not None]

    async def _handle(self, task: TaskAssigned) -> TaskReceipt:
        key = (task.task_id, task.attempt)
        if key not in self._settled:
            async with self._semaphore:
                self._settled[key] = await self.worker.handle(task, store=self.store)
        return self._settled[key]

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], kind: str, message: str) -> asyncio.Future[Any]:
        assert self.producer is not None
        letter = DeadLetter(
            original_topic=record.topic,
            original_partition=record.partition,
            original_offset=record.offset,
            consumer=self.group,
            error_type=kind,
            error=message[:4000],
            failed_at=datetime.now(UTC),
        )
        original: Sequence[tuple[str, bytes]] = [(k, v) for k, v in (record.headers or ()) if v is not None]
        log.warning(
            "worker %s: %s[%d]@%d dead-lettered: %s",
            self.worker.name,
            record.topic,
            record.partition,
            record.offset,
            kind,
        )
        value, headers = codec.dead_letter(record.value, original, letter)
        delivery: asyncio.Future[Any] = await self.producer.send(topics.DEADLETTER, value, key=record.key,
                                                                 headers=headers)
        return delivery

    async def _commit(self, batch: Batch) -> None:
        assert self.consumer is not None
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items() if records}
        try:
            await self.consumer.commit(offsets)
        except (KafkaError, AssertionError) as exc:
            # Lost the partitions in a rebalance: their new owner redelivers, and duplicates are harmless.
            log.warning("worker %s: commit failed (%s); batch may be redelivered", self.worker.name, type(exc).__name__)

    def _rewind(self, batch: Batch) -> None:
        assert self.consumer is not None
        for tp, records in batch.items():
            if not records:
                continue
            try:
                self.consumer.seek(tp, records[0].offset)
            except Exception as exc:  # noqa: BLE001 - partition revoked meanwhile: its new owner has it
                log.warning("worker %s: could not rewind %s (%s)", self.worker.name, tp, type(exc).__name__)


async def run_worker(
    worker: Worker, settings: Settings, *, stop: asyncio.Event | None = None, store: ExportStore | None = None
) -> None:
    installed: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        if threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, stop.set)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):  # Windows, or not the main loop
                    pass
    runner = _Runner(worker, settings, store or LocalExportStore(settings.exports), stop)
    try:
        await runner.run()
    finally:
        loop = asyncio.get_running_loop()
        for sig in installed:
            loop.remove_signal_handler(sig)
