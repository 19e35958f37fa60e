"""The Kafka side of a worker: consume tasks in batches, produce receipts, then commit.

Per batch: decode every record (undecodable ones and tasks for another system go to the
dead-letter topic with ``dlq_*`` headers), run the handlers concurrently, send every receipt
and dead letter, wait until the broker has them all (acks=all, idempotent producer), and only
then commit the batch's offsets. A crash before the commit redelivers the batch.

Every task attempt is claimed in the task ledger (see :mod:`._ledger`) before its handler runs:
a task delivered again, to this instance or another of the group, is not run again, and its
first receipt is sent again (its CloudEvents id is derived from (task, attempt), so the
coordinator's inbox drops the duplicate).

When the group rebalances, the listener lets the batch in hand finish and commit (up to
``REVOKE_WAIT_S``); a batch that takes longer hands its revoked partitions back uncommitted: no
task of theirs is started any more, none of their receipts is sent, and their new owner gets the
records again, with the results of those already run from the ledger.

A receipt whose record is larger than ``Worker.max_receipt_bytes``, or that the broker refuses
for its size, is sent as ``failed`` with the reason and without counts, categories or artifacts:
a receipt that can never be delivered must not hold up its partition.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CorruptRecordException,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnsupportedCodecError,
)

from .. import codec, registry, signing, topics
from .._startup import StartupBudget, wait_for_broker, wait_for_case_store
from ..auth import load_credential
from ..codec import DecodeError
from ..events import DeadLetter, TaskAssigned, TaskReceipt
from ..exports.store import ExportStore, LocalExportStore
from ..rights import ReceiptStatus
from ..signing import load_public_keys
from ._ledger import MemoryTaskLedger, PostgresTaskLedger, TaskLedger

if TYPE_CHECKING:
    from ..settings import Settings
    from ._worker import Worker

log = logging.getLogger("dsrflow.worker")

POLL_TIMEOUT_MS = 500  # how long an idle worker waits before it looks at the stop event again
BACKOFF_MAX_S = 30.0
#: How long the broker waits for the group's members to rejoin in a rebalance.
REBALANCE_TIMEOUT_MS = 60_000
#: How long a revoked batch may take to finish and commit before its partitions are handed back
#: (under REBALANCE_TIMEOUT_MS, or the group goes on without this member).
REVOKE_WAIT_S = 40.0
#: How often a task held by another instance is looked at again, at most.
CLAIM_POLL_MAX_S = 2.0
#: The broker refuses these for the record itself: sending it again would fail again.
_REFUSED_RECORD = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
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


def instance_name() -> str:
    """Who holds a claim in the ledger: host, process, and a random part for each run."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def undeliverable(receipt: TaskReceipt, reason: str) -> TaskReceipt:
    """The receipt sent instead of one that cannot be: ``failed``, not retryable (trying again
    gives the same receipt), the reason, and nothing else of the result but its status's name."""
    detail = (f"receipt not sent: {reason}; the {receipt.status} result's counts, categories, retained "
              f"items and artifacts were left out (the worker's task ledger keeps the whole receipt)")
    return receipt.model_copy(update={
        "status": ReceiptStatus.failed, "retryable": False, "counts": {}, "categories": [], "retained": [],
        "artifacts": [], "error": detail[:2000],
    })


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    """An upper bound of a record's size in a record batch (the varint lengths at their widest)."""
    return 21 + 5 + len(key or b"") + 5 + len(value or b"") + 5 + sum(10 + len(k) + len(v) for k, v in headers)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka has no type hints
    def __init__(self, runner: _Runner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.runner.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.runner.assigned(set(assigned))


class _HandedBack(Exception):
    """Not an error: a task of a partition handed back, left to its new owner."""


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
        self.instance = instance_name()
        # run() puts the worker's ledger here; a runner driven without run() (unit tests) keeps
        # the worker's ledger if it has an instance, else one in memory.
        self.ledger: TaskLedger = worker.ledger if isinstance(worker.ledger, TaskLedger) else MemoryTaskLedger()
        # Receipts of the batch in hand, kept until its offsets are committed: when delivery fails
        # and the batch comes round again, the same receipts are sent without asking the ledger.
        self._settled: dict[tuple[uuid.UUID, int], TaskReceipt] = {}
        # Settled, but not yet recorded in the ledger (it was unreachable): recorded before sending.
        self._unrecorded: set[tuple[uuid.UUID, int]] = set()
        # The batch in hand, and the partitions of it handed back in a rebalance.
        self._in_hand: Batch | None = None
        self._batch_left = asyncio.Event()
        self._batch_left.set()
        self._handed_back: set[TopicPartition] = set()
        # Trust (dsrflow.signing): the key receipts are signed with, and the coordinator's keys a
        # task must be signed with; read at start, so a bad file stops the worker, not a batch.
        self._credential = load_credential(settings.worker_credential) if settings.worker_credential else None
        self._coordinator_keys = (load_public_keys(settings.coordinator_public_keys)
                                  if settings.coordinator_public_keys else None)

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
        async with worker.lifespan(self.settings):  # the startup hooks may create the ledger's database
            self.ledger = self._resolve_ledger()
            await self.ledger.open()
            try:
                await self._consume()
            finally:
                await self.ledger.close()
        log.info("worker %s stopped", worker.name)

    def _resolve_ledger(self) -> TaskLedger:
        spec = self.worker.ledger
        if spec is None:
            return PostgresTaskLedger(self.settings.dsn)  # the case store
        if isinstance(spec, TaskLedger):
            return spec
        ledger = spec(self.settings)
        if not isinstance(ledger, TaskLedger):
            raise TypeError(f"the ledger factory of worker {self.worker.name!r} returned {type(ledger).__name__}")
        return ledger

    async def _consume(self) -> None:
        worker = self.worker
        opts = self.settings.kafka_client_options()
        # A batch may take ceil(max_batch / concurrency) rounds of task_timeout at worst, plus one
        # lease spent waiting for a task another instance holds.
        rounds = -(-worker.max_batch // worker.concurrency)
        worst = rounds * worker.task_timeout.total_seconds() + worker.ledger_lease.total_seconds()
        poll_interval_ms = max(300_000, int(worst * 1000) + 60_000)
        self.consumer = AIOKafkaConsumer(
            group_id=self.group,
            client_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=poll_interval_ms,
            rebalance_timeout_ms=REBALANCE_TIMEOUT_MS,
            **opts,
        )
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        # acks=all and, where the broker supports it, idempotence (Settings.producer_options).
        # Requests may be as large as the largest receipt allowed; the broker has the last word.
        self.producer = AIOKafkaProducer(client_id=self.group, linger_ms=5,
                                         max_request_size=max(1_048_576, worker.max_receipt_bytes + 65_536),
                                         **self.settings.producer_options())
        await self.producer.start()
        try:
            await self.consumer.start()
            try:
                log.info("worker %s (%s) consuming %s as group %s, task ledger %r", worker.name, self.instance,
                         self.topic, self.group, self.ledger)
                await self._loop()
            finally:
                await self.consumer.stop()
        finally:
            await self.producer.stop()

    # -- rebalances ------------------------------------------------------------------------------
    async def revoked(self, revoked: set[TopicPartition]) -> None:
        """The group is rebalancing: let the batch in hand finish and commit what it delivered,
        for at most REVOKE_WAIT_S, then hand its revoked partitions back uncommitted."""
        batch = self._in_hand
        held = sorted((tp for tp in revoked if batch and batch.get(tp)), key=lambda t: (t.topic, t.partition))
        if not held or batch is None:
            log.info("worker %s (%s): partitions revoked: %s", self.worker.name, self.instance, _names(revoked))
            return
        n = sum(len(batch[tp]) for tp in held)
        log.info("worker %s (%s): partitions revoked: %s, %d record(s) of them in hand; finishing the batch "
                 "(up to %gs)", self.worker.name, self.instance, _names(revoked), n, REVOKE_WAIT_S)
        try:
            await asyncio.wait_for(self._batch_left.wait(), timeout=REVOKE_WAIT_S)
        except TimeoutError:
            self._handed_back.update(held)
            log.warning("worker %s (%s): batch not finished after %gs; handing back %s uncommitted: no more of "
                        "their tasks start here and none of their receipts is sent from here; their new owner gets "
                        "the records again, and the ledger gives it the receipts of the tasks already run",
                        self.worker.name, self.instance, REVOKE_WAIT_S, _names(held))
        else:
            log.info("worker %s (%s): batch finished before the hand-back", self.worker.name, self.instance)

    def assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("worker %s (%s): partitions assigned: %s", self.worker.name, self.instance, _names(assigned))

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
            if await self._take(batch):
                failures = 0
            else:
                failures += 1
                await self._pause(failures)

    async def _take(self, batch: Batch) -> bool:
        """Process and commit one batch; False if it was not delivered (it was rewound)."""
        self._in_hand = batch
        self._handed_back = set()
        self._batch_left.clear()
        try:
            try:
                await self._process(batch)
            except Exception as exc:  # noqa: BLE001 - a consumer never dies on bad input or a broker hiccup
                log.error(
                    "worker %s: batch of %d not delivered (%s); will process it again",
                    self.worker.name,
                    sum(len(v) for v in batch.values()),
                    type(exc).__name__,
                )
                self._rewind({tp: r for tp, r in batch.items() if tp not in self._handed_back})
                return False
            await self._commit({tp: r for tp, r in batch.items() if tp not in self._handed_back})
            if self._handed_back:
                self._take_back(batch)
            self._settled.clear()
            return True
        finally:
            self._in_hand = None
            self._batch_left.set()

    def _take_back(self, batch: Batch) -> None:
        """Partitions handed back and then assigned to this instance again: read their records
        of this batch again (the ledger has the results of those that ran)."""
        assert self.consumer is not None
        try:
            owned = set(self.consumer.assignment())
        except Exception:  # noqa: BLE001 - no assignment at the moment: nothing to take back
            return
        self._rewind({tp: batch[tp] for tp in self._handed_back if tp in owned and tp in batch})

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
        tasks: list[tuple[TopicPartition, TaskAssigned, str | None]] = []
        deliveries: list[asyncio.Future[Any]] = []
        for tp in sorted(batch, key=lambda t: (t.topic, t.partition)):
            for record in batch[tp]:
                try:
                    env = codec.decode(record.value, record.headers, TaskAssigned)
                except DecodeError as exc:
                    deliveries.append(await self._dead_letter(record, exc.kind, str(exc)))
                    continue
                if self._coordinator_keys is not None:
                    try:
                        signing.verify_headers(self._coordinator_keys, list(record.headers or []), ce_id=env.id,
                                               ce_source=env.source, value=record.value or b"", kind="task")
                    except signing.SignatureError as exc:  # never acted on: not what the coordinator sent
                        deliveries.append(await self._dead_letter(record, "unauthenticated_task", str(exc)))
                        continue
                if env.data.system != self.worker.name:
                    deliveries.append(
                        await self._dead_letter(
                            record, "wrong_system", f"task for system {env.data.system!r} on {self.topic}"
                        )
                    )
                    continue
                tasks.append((tp, env.data, env.traceparent))
        receipts = await self._handle_all([(tp, task) for tp, task, _ in tasks])
        sent: list[tuple[TaskReceipt, str | None, asyncio.Future[Any]]] = []
        skipped = 0
        for receipt, (tp, _, traceparent) in zip(receipts, tasks, strict=True):
            if receipt is None or tp in self._handed_back:
                skipped += 1  # the partition's new owner sends it, from the ledger
                continue
            receipt, delivery = await self._send_receipt(receipt, traceparent)
            sent.append((receipt, traceparent, delivery))
        if skipped:
            log.info("worker %s: %d receipt(s) of handed-back partitions not sent from here", self.worker.name,
                     skipped)
        # Every receipt and dead letter acknowledged by the broker before the offsets move on.
        outcomes = await asyncio.gather(*(d for _, _, d in sent), *deliveries, return_exceptions=True)
        error: BaseException | None = None
        for (receipt, traceparent, _), outcome in zip(sent, outcomes, strict=False):
            if isinstance(outcome, _REFUSED_RECORD):
                # Refused for its size by the broker: the same record would be refused forever.
                replacement = undeliverable(receipt, f"the broker refused it ({type(outcome).__name__})")
                log.error("worker %s task %s attempt %d: receipt refused by the broker (%s); sending it as failed",
                          self.worker.name, receipt.task_id, receipt.attempt, type(outcome).__name__)
                try:
                    _, again = await self._send_receipt(replacement, traceparent)
                    await again
                except Exception as exc:  # noqa: BLE001 - the batch is not delivered: tried again later
                    error = error or exc
            elif isinstance(outcome, BaseException):
                error = error or outcome
        for outcome in outcomes[len(sent):]:
            if isinstance(outcome, BaseException):
                error = error or outcome
        if error is not None:
            raise error

    async def _send_receipt(
        self, receipt: TaskReceipt, traceparent: str | None
    ) -> tuple[TaskReceipt, asyncio.Future[Any]]:
        """Send a receipt; one too large to be sent goes as :func:`undeliverable` instead.
        Returns the receipt sent and its delivery."""
        assert self.producer is not None
        key = str(receipt.case_id).encode()
        value, headers = self._encode(receipt, traceparent)
        size = record_size(key, value, headers)
        if size > self.worker.max_receipt_bytes:
            log.error("worker %s task %s attempt %d: receipt of %d bytes is larger than max_receipt_bytes (%d); "
                      "sending it as failed", self.worker.name, receipt.task_id, receipt.attempt, size,
                      self.worker.max_receipt_bytes)
            receipt = undeliverable(receipt, f"too large ({size} bytes; the limit is {self.worker.max_receipt_bytes})")
            value, headers = self._encode(receipt, traceparent)
        try:
            delivery: asyncio.Future[Any] = await self.producer.send(topics.RECEIPTS, value, key=key, headers=headers)
        except _REFUSED_RECORD as exc:  # the producer's own limit (max_request_size)
            log.error("worker %s task %s attempt %d: receipt refused by the producer (%s); sending it as failed",
                      self.worker.name, receipt.task_id, receipt.attempt, type(exc).__name__)
            receipt = undeliverable(receipt, f"too large for the producer ({type(exc).__name__})")
            value, headers = self._encode(receipt, traceparent)
            delivery = await self.producer.send(topics.RECEIPTS, value, key=key, headers=headers)
        return receipt, delivery

    def _encode(self, receipt: TaskReceipt, traceparent: str | None) -> tuple[bytes, list[tuple[str, bytes]]]:
        value, headers = codec.encode(
            receipt,
            source=self.source,
            subject=str(receipt.case_id),
            event_id=receipt_event_id(receipt),
            traceparent=child_traceparent(traceparent),
        )
        if self._credential is not None:  # the coordinator checks it against the system's keys
            headers = [*headers, *signing.sign_headers(self._credential, ce_id=receipt_event_id(receipt),
                                                       ce_source=self.source, value=value)]
        return value, list(headers)

    async def _handle_all(self, tasks: list[tuple[TopicPartition, TaskAssigned]]) -> list[TaskReceipt | None]:
        """Handlers run concurrently (bounded), except that tasks of one case run one after the
        other in log order, as Kafka delivered them (a task and its retry, say). None for a task
        of a partition handed back before it ran."""
        by_case: dict[uuid.UUID, list[int]] = {}
        for i, (_, task) in enumerate(tasks):
            by_case.setdefault(task.case_id, []).append(i)
        receipts: list[TaskReceipt | None] = [None] * len(tasks)

        async def in_order(indexes: list[int]) -> None:
            for i in indexes:
                receipts[i] = await self._handle(*tasks[i])

        # Every handler finishes (or fails) before the batch does: none is left running behind a
        # batch that is about to be processed again.
        outcomes = await asyncio.gather(*(in_order(ix) for ix in by_case.values()), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return receipts

    async def _handle(self, tp: TopicPartition, task: TaskAssigned) -> TaskReceipt | None:
        """The task's receipt: the one settled in this batch, else the one the ledger holds, else
        its handler's, run once the ledger gives this instance the claim. None if its partition
        was handed back before that (its new owner sees to it)."""
        key = (task.task_id, task.attempt)
        if key in self._settled:
            if key in self._unrecorded:  # the ledger was unreachable when it ran: record it now
                self._settled[key] = await self.ledger.finish(task, self._settled[key], owner=self.instance)
                self._unrecorded.discard(key)
            return self._settled[key]
        try:
            receipt = await self._claim_and_run(tp, task)
        except _HandedBack:
            return None
        self._settled[key] = receipt
        return receipt

    async def _claim_and_run(self, tp: TopicPartition, task: TaskAssigned) -> TaskReceipt:
        key = (task.task_id, task.attempt)
        delay = 0.1
        waiting_for: str | None = None
        while True:
            async with self._semaphore:  # claimed only when it can run at once: the lease starts now
                if tp in self._handed_back:
                    raise _HandedBack
                if self.stop.is_set():  # stopping: start nothing new; whoever has it next runs it
                    self._handed_back.add(tp)
                    raise _HandedBack
                claim = await self.ledger.claim(task, owner=self.instance, lease=self.worker.ledger_lease)
                if claim.state == "owned":
                    if claim.takeover:
                        log.warning("worker %s task %s attempt %d: claim taken over from an instance whose lease "
                                    "ran out without a receipt", self.worker.name, task.task_id, task.attempt)
                    receipt = await self._run_claimed(task)
                    try:
                        return await self.ledger.finish(task, receipt, owner=self.instance)
                    except Exception:
                        self._settled[key] = receipt  # sent only once it is recorded
                        self._unrecorded.add(key)
                        raise
            if claim.state == "done":
                assert claim.receipt is not None
                log.info("worker %s task %s attempt %d: already run (%s); sending the receipt the ledger holds",
                         self.worker.name, task.task_id, task.attempt, claim.receipt.status)
                return claim.receipt
            # Another instance is running it: wait for its receipt, or for its lease to run out.
            if claim.holder != waiting_for:
                waiting_for = claim.holder
                log.info("worker %s task %s attempt %d: being run by %s; waiting for its receipt (lease ends in "
                         "%.0fs)", self.worker.name, task.task_id, task.attempt, claim.holder, claim.retry_in)
            if self.stop.is_set():  # stopping: leave it uncommitted to whoever has it next
                self._handed_back.add(tp)
                raise _HandedBack
            await self._sleep(min(delay, max(claim.retry_in, 0.01)))
            delay = min(delay * 2, CLAIM_POLL_MAX_S)

    async def _run_claimed(self, task: TaskAssigned) -> TaskReceipt:
        try:
            return await self.worker.handle(task, store=self.store)
        except BaseException:  # cancelled: give the claim up, the next delivery runs it
            try:
                await asyncio.shield(self.ledger.release(task, owner=self.instance))
            except BaseException as exc:  # noqa: BLE001 - its lease runs out instead
                log.warning("worker %s task %s attempt %d: claim not released (%s)", self.worker.name,
                            task.task_id, task.attempt, type(exc).__name__)
            raise

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

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
        try:
            delivery: asyncio.Future[Any] = await self.producer.send(topics.DEADLETTER, value, key=record.key,
                                                                     headers=headers)
        except _REFUSED_RECORD as exc:  # too large to copy: the letter names where the original is
            letter = letter.model_copy(update={"error": f"{letter.error}; the original ({len(record.value or b'')} "
                                               f"bytes) is not copied: {type(exc).__name__}"[:4000]})
            value, headers = codec.dead_letter(None, [], letter)
            delivery = await self.producer.send(topics.DEADLETTER, value, key=record.key, headers=headers)
        return delivery

    async def _commit(self, batch: Batch) -> None:
        assert self.consumer is not None
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items() if records}
        if not offsets:
            return
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


def _names(tps: Sequence[TopicPartition] | set[TopicPartition]) -> str:
    ordered = sorted(tps, key=lambda t: (t.topic, t.partition))
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in ordered) or "none"


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
