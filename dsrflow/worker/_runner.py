"""The Kafka side of a worker: consume tasks in batches, produce receipts, then commit.

Per batch: decode every record (undecodable ones and tasks for another system go to the
dead-letter topic with ``dlq_*`` headers), run the handlers concurrently, send every receipt
and dead letter, wait until the broker has them all (acks=all, idempotent producer), and only
then commit the batch's offsets. A crash before the commit redelivers the batch.

Handlers run concurrently up to ``Worker.concurrency`` calls at once and, with
``Worker.rate_limit``, up to that many tasks a second (an :class:`aiolimiter.AsyncLimiter`, waited
for before a task is claimed, so that a claim's lease starts when its handler can). Tasks of one
case run one after another, in log order. Tasks of an action with a batch handler are gathered
into calls of up to ``max_batch`` tasks, each claimed in the ledger on its own; a call holds the
first task not yet run of each case, and a case's next task goes into a following call.

A handler may report progress (:meth:`TaskContext.progress`): a ``TaskProgress`` goes on the
receipts topic with the receipt's key, so it comes before its task's receipt; it has a random id
of its own and is signed like a receipt. Its delivery is not waited for, and a report that
cannot be sent fails nothing.

Every task attempt is claimed in the task ledger (see :mod:`._ledger`) before its handler runs:
a task delivered again, to this instance or another of the group, is not run again, and its
first receipt is sent again (its CloudEvents id is derived from (task, attempt), so the
coordinator's inbox drops the duplicate).

When the group rebalances, the listener lets the batch in hand finish and commit (up to
``REVOKE_WAIT_S``); a batch that takes longer hands its revoked partitions back uncommitted: no
task of theirs is started any more, none of their receipts is sent, and their new owner gets the
records again, with the results of those already run from the ledger.

When the worker is told to stop (SIGTERM, or the ``stop`` event), no task starts any more; the
handlers running get ``Worker.shutdown_grace`` to finish, and their receipts are sent and their
records committed. Those still running then are cancelled (their claims are given up in the
ledger): their records, and any after them in their partitions, are left uncommitted to the
next instance, which runs them. Then the worker leaves the group and exits.

Nothing that can never be delivered holds up its partition:

- a receipt whose record is larger than ``Worker.max_receipt_bytes``, or that the producer or
  the broker refuses for its size, is sent as ``failed`` with the reason and without counts,
  categories or artifacts;
- a dead letter refused for its size, by the producer or by the broker, is sent again without the
  original's bytes and headers (it names the topic, partition and offset instead);
- a receipt the ledger refuses to record ``LEDGER_REFUSALS_MAX`` times in a row (an error that is
  not transient) is sent all the same, with an error logged that the ledger does not have it.
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
from functools import partial
from typing import TYPE_CHECKING, Any

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

from .. import codec, signing, topics
from .._startup import StartupBudget, wait_for_broker
from ..auth import load_credential
from ..codec import DecodeError
from ..events import DeadLetter, TaskAssigned, TaskProgress, TaskReceipt
from ..exports.store import ExportStore, LocalExportStore
from ..rights import Action, ReceiptStatus
from ..signing import load_public_keys
from ._announce import Announcer
from ._ledger import LedgerClaim, MemoryTaskLedger, PostgresTaskLedger, TaskLedger

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
#: How many times in a row the ledger may refuse a receipt (not for a transient error) before the
#: receipt is sent unrecorded: a receipt the ledger can never store must not hold its partition.
LEDGER_REFUSALS_MAX = 5
#: The broker refuses these for the record itself: sending it again would fail again.
_REFUSED_RECORD = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
_RECEIPT_NS = uuid.UUID("5b0e8f5e-8f7a-4a77-9a55-5d2b1f0c6d11")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-[0-9a-f]{16}-([0-9a-f]{2})$")

Batch = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
Key = tuple[uuid.UUID, int]  # (task_id, attempt)


def receipt_event_id(receipt: TaskReceipt) -> str:
    """The receipt's CloudEvents id: its ``receipt_id`` (random, kept with it in the task ledger, so
    a receipt sent again is the same event and the id of one not yet sent cannot be guessed), or
    for a receipt made without one (an older SDK's, in a ledger), one per (task, attempt)."""
    if receipt.receipt_id is not None:
        return str(receipt.receipt_id)
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
    """Not an error: a task left to whoever gets its record next, not started here because its
    partition was handed back in a rebalance or because the worker is stopping."""


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
        self._settled: dict[Key, TaskReceipt] = {}
        # Settled, but not yet recorded in the ledger (it was unreachable): recorded before sending.
        self._unrecorded: set[Key] = set()
        # How many times in a row the ledger refused to record a settled receipt (not transiently).
        self._refusals: dict[Key, int] = {}
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

    async def ensure_topic(self, budget: StartupBudget | None = None) -> None:
        """Create the system's task topic and the announcements topic when missing, waiting for the
        broker within ``budget`` (startup_timeout when None)."""
        declared = topics.declared()
        specs = [declared[topics.TASKS_TEMPLATE].for_system(self.worker.name), declared[topics.SYSTEMS]]

        async def attempt() -> topics.ApplyReport:
            return await topics.apply(self.settings.kafka_client_options(), specs,
                                      replication_factor=self.settings.topic_replication_factor)

        report = await wait_for_broker(self.settings, attempt, log=log, budget=budget)
        for name, diffs in report.drift.items():
            log.warning("topic %s differs from its declaration: %s", name, "; ".join(diffs))

    async def run(self) -> None:
        """Raises :class:`~dsrflow.errors.ServiceUnavailable` when the broker does not answer within
        ``settings.startup_timeout``. The worker needs no case store: it announces its system on
        ``dsr.systems.v1`` (an administrator approves a new or changed declaration); only a task
        ledger left at its default lives in a PostgreSQL (see :meth:`_resolve_ledger`)."""
        worker = self.worker
        worker.check()
        budget = StartupBudget.of(self.settings)
        await self.ensure_topic(budget)
        announcer = Announcer(worker, self.settings, instance=self.instance, credential=self._credential)
        await wait_for_broker(self.settings, announcer.start, log=log, budget=budget)
        try:
            async with worker.lifespan(self.settings):  # the startup hooks may create the ledger's database
                self.ledger = self._resolve_ledger()
                await self.ledger.open()
                try:
                    await self._consume()
                finally:
                    await self.ledger.close()
        finally:
            await announcer.stop()
        log.info("worker %s stopped", worker.name)

    def _resolve_ledger(self) -> TaskLedger:
        """The worker's ledger; by default a :class:`PostgresTaskLedger` in
        ``DSRFLOW_WORKER_LEDGER_DSN`` (the system's own database, say), else in the case store
        (``DSRFLOW_PG_DSN``: the embedded stack's way; a production worker sets its own)."""
        spec = self.worker.ledger
        if spec is None:
            dsn = self.settings.worker_ledger_dsn
            if dsn is None:
                log.warning("worker %s: task ledger in the case store (set DSRFLOW_WORKER_LEDGER_DSN, or give the "
                            "Worker a ledger, to keep it in a database the worker owns)", self.worker.name)
            return PostgresTaskLedger(dsn.get_secret_value() if dsn is not None else self.settings.dsn)
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
        # lease spent waiting for a task another instance holds, plus what the rate limit spreads
        # its tasks over.
        rounds = -(-worker.max_batch // worker.concurrency)
        worst = rounds * worker.task_timeout.total_seconds() + worker.ledger_lease.total_seconds()
        if worker.rate_limit is not None:
            worst += worker.max_batch / worker.rate_limit
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
                answered = await self._process(batch)
            except Exception as exc:  # noqa: BLE001 - a consumer never dies on bad input or a broker hiccup
                log.error(
                    "worker %s: batch of %d not delivered (%s); will process it again",
                    self.worker.name,
                    sum(len(v) for v in batch.values()),
                    type(exc).__name__,
                )
                self._rewind({tp: r for tp, r in batch.items() if tp not in self._handed_back})
                return False
            # Short of the whole batch only when stopping: the loop ends, the rest is the next instance's.
            await self._commit({tp: r for tp, r in answered.items() if tp not in self._handed_back})
            if self._handed_back:
                self._take_back(batch)
            self._forget_settled(set())
            return True
        finally:
            self._in_hand = None
            self._batch_left.set()

    def _forget_settled(self, keep: set[Key]) -> None:
        """Forget the receipts settled for tasks other than ``keep``: those of a batch committed,
        or of records no longer in hand (their partitions went to another instance while the batch
        was being processed again)."""
        for key in [k for k in self._settled if k not in keep]:
            del self._settled[key]
            self._refusals.pop(key, None)
            if key in self._unrecorded:
                self._unrecorded.discard(key)
                log.warning("worker %s task %s attempt %d: its receipt was never recorded in the task ledger and "
                            "its record is no longer in hand; whoever gets the record runs it again once its claim's "
                            "lease is over", self.worker.name, key[0], key[1])

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

    async def _process(self, batch: Batch) -> Batch:
        """Run the batch's tasks and deliver their receipts and its dead letters. Returns what may
        be committed: every record, or when stopping, of each partition the records before the
        first task left unanswered (not started, or cancelled at the end of the shutdown grace)."""
        assert self.producer is not None
        tasks: list[tuple[TopicPartition, int, TaskAssigned, str | None]] = []
        letters: list[tuple[ConsumerRecord[bytes, bytes], str, str, asyncio.Future[Any]]] = []

        async def dead_letter(record: ConsumerRecord[bytes, bytes], kind: str, message: str) -> None:
            letters.append((record, kind, message, await self._dead_letter(record, kind, message)))

        for tp in sorted(batch, key=lambda t: (t.topic, t.partition)):
            for record in batch[tp]:
                try:
                    env = codec.decode(record.value, record.headers, TaskAssigned)
                except DecodeError as exc:
                    await dead_letter(record, exc.kind, str(exc))
                    continue
                if self._coordinator_keys is not None:
                    try:
                        signing.verify_headers(self._coordinator_keys, list(record.headers or []), ce_id=env.id,
                                               ce_source=env.source, value=record.value or b"", kind="task")
                    except signing.SignatureError as exc:  # never acted on: not what the coordinator sent
                        await dead_letter(record, "unauthenticated_task", str(exc))
                        continue
                if env.data.system != self.worker.name:
                    await dead_letter(record, "wrong_system", f"task for system {env.data.system!r} on {self.topic}")
                    continue
                tasks.append((tp, record.offset, env.data, env.traceparent))
        self._forget_settled({(task.task_id, task.attempt) for _, _, task, _ in tasks})
        receipts = await self._handle_all([(tp, task) for tp, _, task, _ in tasks])
        sent: list[tuple[TaskReceipt, str | None, asyncio.Future[Any]]] = []
        unanswered: dict[TopicPartition, int] = {}  # the first offset of each partition left unanswered
        skipped = 0
        for receipt, (tp, offset, _, traceparent) in zip(receipts, tasks, strict=True):
            if receipt is None or tp in self._handed_back:
                skipped += 1  # sent by whoever gets the record next, from the ledger if it ran
                if receipt is None:
                    unanswered[tp] = min(offset, unanswered.get(tp, offset))
                continue
            receipt, delivery = await self._send_receipt(receipt, traceparent)
            sent.append((receipt, traceparent, delivery))
        if skipped:
            log.info("worker %s: %d task(s) left to whoever gets their records next (partitions handed back, or "
                     "stopping)", self.worker.name, skipped)
        # Every receipt and dead letter acknowledged by the broker before the offsets move on.
        outcomes = await asyncio.gather(*(d for _, _, d in sent), *(d for *_, d in letters), return_exceptions=True)
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
        for (record, kind, message, _), outcome in zip(letters, outcomes[len(sent):], strict=True):
            if isinstance(outcome, _REFUSED_RECORD):
                # Refused for its size by the broker: the same letter would be refused forever.
                log.error("worker %s: dead letter of %s[%d]@%d refused by the broker (%s); sending it without the "
                          "original", self.worker.name, record.topic, record.partition, record.offset,
                          type(outcome).__name__)
                try:
                    await (await self._bare_dead_letter(record, kind, message, outcome))
                except Exception as exc:  # noqa: BLE001 - the batch is not delivered: tried again later
                    error = error or exc
            elif isinstance(outcome, BaseException):
                error = error or outcome
        if error is not None:
            raise error
        return {tp: [r for r in records if r.offset < unanswered.get(tp, r.offset + 1)]
                for tp, records in batch.items()}

    async def _send_receipt(
        self, receipt: TaskReceipt, traceparent: str | None
    ) -> tuple[TaskReceipt, asyncio.Future[Any]]:
        """Send a receipt; one too large to be sent goes as :func:`undeliverable` instead.
        Returns the receipt sent and its delivery."""
        assert self.producer is not None
        key = str(receipt.case_id).encode()
        value, headers = self._encode(receipt, receipt_event_id(receipt), traceparent)
        size = record_size(key, value, headers)
        if size > self.worker.max_receipt_bytes:
            log.error("worker %s task %s attempt %d: receipt of %d bytes is larger than max_receipt_bytes (%d); "
                      "sending it as failed", self.worker.name, receipt.task_id, receipt.attempt, size,
                      self.worker.max_receipt_bytes)
            receipt = undeliverable(receipt, f"too large ({size} bytes; the limit is {self.worker.max_receipt_bytes})")
            value, headers = self._encode(receipt, receipt_event_id(receipt), traceparent)
        try:
            delivery: asyncio.Future[Any] = await self.producer.send(topics.RECEIPTS, value, key=key, headers=headers)
        except _REFUSED_RECORD as exc:  # the producer's own limit (max_request_size)
            log.error("worker %s task %s attempt %d: receipt refused by the producer (%s); sending it as failed",
                      self.worker.name, receipt.task_id, receipt.attempt, type(exc).__name__)
            receipt = undeliverable(receipt, f"too large for the producer ({type(exc).__name__})")
            value, headers = self._encode(receipt, receipt_event_id(receipt), traceparent)
            delivery = await self.producer.send(topics.RECEIPTS, value, key=key, headers=headers)
        return receipt, delivery

    async def _send_progress(self, progress: TaskProgress) -> None:
        """Send a handler's progress report beside the receipts, with the receipts' key (so it comes
        before its task's receipt) and a random id (every report is an event of its own). Its
        delivery is not waited for: one the broker does not take is logged, and nothing else."""
        assert self.producer is not None
        value, headers = self._encode(progress, str(uuid.uuid4()), None)
        delivery = await self.producer.send(topics.RECEIPTS, value, key=str(progress.case_id).encode(),
                                            headers=headers)
        delivery.add_done_callback(partial(self._progress_delivered, progress))

    def _progress_delivered(self, progress: TaskProgress, delivery: asyncio.Future[Any]) -> None:
        error = None if delivery.cancelled() else delivery.exception()
        if delivery.cancelled() or error is not None:
            log.warning("worker %s task %s attempt %d: progress report %d not delivered (%s)", self.worker.name,
                        progress.task_id, progress.attempt, progress.seq,
                        type(error).__name__ if error is not None else "cancelled")

    def _encode(
        self, event: TaskReceipt | TaskProgress, event_id: str, traceparent: str | None
    ) -> tuple[bytes, list[tuple[str, bytes]]]:
        value, headers = codec.encode(
            event,
            source=self.source,
            subject=str(event.case_id),
            event_id=event_id,
            traceparent=child_traceparent(traceparent),
        )
        if self._credential is not None:  # the coordinator checks it against the system's keys
            headers = [*headers, *signing.sign_headers(self._credential, ce_id=event_id, ce_source=self.source,
                                                       value=value)]
        return value, list(headers)

    async def _handle_all(self, tasks: list[tuple[TopicPartition, TaskAssigned]]) -> list[TaskReceipt | None]:
        """Handlers run concurrently (bounded), except that tasks of one case run one after the
        other in log order, as Kafka delivered them (a task and its retry, say); tasks of an action
        with a batch handler go to it in calls (:class:`_BatchCalls`). None for a task left to
        whoever gets its record next: its partition was handed back before it ran, or the worker
        is stopping and it had not started, or was still running when the shutdown grace ended."""
        by_case: dict[uuid.UUID, list[int]] = {}
        for i, (_, task) in enumerate(tasks):
            by_case.setdefault(task.case_id, []).append(i)
        receipts: list[TaskReceipt | None] = [None] * len(tasks)
        calls = _BatchCalls(self)

        async def in_order(indexes: list[int]) -> None:
            for i in indexes:
                receipts[i] = await self._handle(*tasks[i], calls)

        # Every handler finishes (or fails, or is cancelled) before the batch does: none is left
        # running behind a batch that is about to be processed again.
        chains = [asyncio.create_task(in_order(ix)) for ix in by_case.values()]
        everything = asyncio.gather(*chains, return_exceptions=True)
        stopping = asyncio.ensure_future(self.stop.wait())
        cancelled = False
        try:
            watched: set[asyncio.Future[Any]] = {everything, stopping}
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if not everything.done():  # stopping: nothing starts any more; what runs gets the grace
                grace = self.worker.shutdown_grace.total_seconds()
                log.info("worker %s (%s): stopping; the handlers running get up to %gs to finish", self.worker.name,
                         self.instance, grace)
                await asyncio.wait({everything}, timeout=grace)
                if not everything.done():
                    cancelled = True
                    log.warning("worker %s (%s): handlers still running after the shutdown grace of %gs: cancelling "
                                "them; their claims are given up and their records left uncommitted to the next "
                                "instance", self.worker.name, self.instance, grace)
                    for running in (*chains, *calls.running):
                        running.cancel()
            outcomes = await everything
        except BaseException:
            everything.cancel()
            for running in calls.running:
                running.cancel()
            raise
        finally:
            stopping.cancel()
        await asyncio.gather(*calls.running, return_exceptions=True)  # a call's last steps after its results
        for outcome in outcomes:
            if isinstance(outcome, asyncio.CancelledError) and cancelled:
                continue
            if isinstance(outcome, BaseException):
                raise outcome
        return receipts

    async def _handle(self, tp: TopicPartition, task: TaskAssigned, calls: _BatchCalls) -> TaskReceipt | None:
        """The task's receipt: the one settled in this batch, else the one the ledger holds, else
        its handler's, run once the ledger gives this instance the claim. None if it is left to
        whoever gets its record next (see :meth:`_handle_all`)."""
        key = (task.task_id, task.attempt)
        if key in self._settled:
            if key in self._unrecorded:  # the ledger was unreachable when it ran: record it now
                self._settled[key] = await self._record(task, self._settled[key])
            return self._settled[key]
        try:
            receipt = await self._claim_and_run(tp, task, calls)
        except _HandedBack:
            return None
        self._settled[key] = receipt
        return receipt

    async def _claim_and_run(self, tp: TopicPartition, task: TaskAssigned, calls: _BatchCalls) -> TaskReceipt:
        delay = 0.1
        waiting_for: str | None = None
        while True:
            outcome = await (calls.run(tp, task) if self.worker.batched(task.action) else self._claim_once(tp, task))
            if isinstance(outcome, TaskReceipt):
                return outcome
            # Another instance is running it: wait for its receipt, or for its lease to run out.
            if outcome.holder != waiting_for:
                waiting_for = outcome.holder
                log.info("worker %s task %s attempt %d: being run by %s; waiting for its receipt (lease ends in "
                         "%.0fs)", self.worker.name, task.task_id, task.attempt, outcome.holder, outcome.retry_in)
            if self.stop.is_set():  # stopping: leave it uncommitted to whoever has it next
                raise _HandedBack
            await self._sleep(min(delay, max(outcome.retry_in, 0.01)))
            delay = min(delay * 2, CLAIM_POLL_MAX_S)

    async def _claim_once(self, tp: TopicPartition, task: TaskAssigned) -> TaskReceipt | LedgerClaim:
        """Claim a single-handled task and run it: its receipt, the ledger's if it ran already, or
        the claim of the instance running it."""
        async with self._semaphore:  # claimed only when it can run at once: the lease starts now
            await self._pace(1)
            self._startable(tp)
            claim = await self._claim(task)
            if claim.state == "owned":
                self._owned(task, claim)
                [receipt] = await self._run_claimed([task])
                return await self._record(task, receipt)
        if claim.state == "done":
            return self._from_ledger(task, claim)
        return claim

    async def _claim(self, task: TaskAssigned) -> LedgerClaim:
        """Claim ``task`` in the ledger. Cancelled meanwhile (the shutdown grace ran out), the claim
        may have been taken all the same: it is given up, so the next instance need not wait out
        its lease (a release by an instance that does not hold the claim changes nothing)."""
        try:
            return await self.ledger.claim(task, owner=self.instance, lease=self.worker.ledger_lease)
        except asyncio.CancelledError:
            try:
                await asyncio.shield(self.ledger.release(task, owner=self.instance))
            except BaseException as exc:  # noqa: BLE001 - its lease runs out instead
                log.warning("worker %s task %s attempt %d: claim not released (%s)", self.worker.name,
                            task.task_id, task.attempt, type(exc).__name__)
            raise

    def _startable(self, tp: TopicPartition) -> None:
        if tp in self._handed_back:
            raise _HandedBack
        if self.stop.is_set():  # stopping: start nothing new; whoever has it next runs it
            raise _HandedBack

    async def _pace(self, tasks: int) -> None:
        """Wait until the rate limit lets a call of ``tasks`` tasks start; raise :class:`_HandedBack`
        if the worker is told to stop first."""
        if self.worker.rate_limit is None:
            return
        pacing = asyncio.ensure_future(self.worker.pace(tasks))
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            done, _ = await asyncio.wait({pacing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pacing.cancel()
            stopping.cancel()
        if pacing not in done:
            raise _HandedBack
        pacing.result()

    def _owned(self, task: TaskAssigned, claim: LedgerClaim) -> None:
        if claim.takeover:
            log.warning("worker %s task %s attempt %d: claim taken over from an instance whose lease ran out "
                        "without a receipt", self.worker.name, task.task_id, task.attempt)

    def _from_ledger(self, task: TaskAssigned, claim: LedgerClaim) -> TaskReceipt:
        """The receipt of a task the ledger shows done."""
        assert claim.receipt is not None
        log.info("worker %s task %s attempt %d: already run (%s); sending the receipt the ledger holds",
                 self.worker.name, task.task_id, task.attempt, claim.receipt.status)
        return claim.receipt

    async def _run_claimed(self, tasks: list[TaskAssigned]) -> list[TaskReceipt]:
        """Run claimed tasks: one through its handler, or those of one batch handler call."""
        try:
            if self.worker.batched(tasks[0].action):
                return await self.worker.handle_batch(tasks, store=self.store, progress=self._send_progress)
            [task] = tasks
            return [await self.worker.handle(task, store=self.store, progress=self._send_progress)]
        except BaseException:  # cancelled: give the claims up, the next delivery runs them
            releases = asyncio.gather(*(self.ledger.release(t, owner=self.instance) for t in tasks),
                                      return_exceptions=True)
            try:
                outcomes: list[Any] = await asyncio.shield(releases)
            except BaseException as exc:  # noqa: BLE001 - their leases run out instead
                outcomes = [exc] * len(tasks)
            for task, outcome in zip(tasks, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    log.warning("worker %s task %s attempt %d: claim not released (%s)", self.worker.name,
                                task.task_id, task.attempt, type(outcome).__name__)
            raise

    async def _record(self, task: TaskAssigned, receipt: TaskReceipt) -> TaskReceipt:
        """Store the receipt in the ledger; return the one stored (the first). Not stored, it is
        kept as settled and unrecorded, and the batch goes round again; after LEDGER_REFUSALS_MAX
        refusals in a row that are not transient (not of the worker's ``retry_on``), it is
        returned unrecorded, to be sent: a receipt the ledger can never store must not hold its
        partition up for good. The write goes on if the batch is cancelled meanwhile (the shutdown
        grace ran out): the next instance then finds the receipt instead of a claim to wait out."""
        key = (task.task_id, task.attempt)
        try:
            stored = await asyncio.shield(self.ledger.finish(task, receipt, owner=self.instance))
        except Exception as exc:
            self._settled[key] = receipt  # sent only once it is recorded
            self._unrecorded.add(key)
            if not isinstance(exc, self.worker.retry_on):
                refusals = self._refusals[key] = self._refusals.get(key, 0) + 1
                if refusals >= LEDGER_REFUSALS_MAX:
                    log.error("worker %s task %s attempt %d: the task ledger refused its receipt %d times in a row "
                              "(%s); sending the receipt all the same: the ledger did not record it, so a delivery "
                              "of this task after a crash runs it again", self.worker.name, task.task_id,
                              task.attempt, refusals, type(exc).__name__)
                    self._unrecorded.discard(key)
                    del self._refusals[key]
                    return receipt
            raise
        self._unrecorded.discard(key)
        self._refusals.pop(key, None)
        return stored

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], kind: str, message: str) -> asyncio.Future[Any]:
        assert self.producer is not None
        original: Sequence[tuple[str, bytes]] = [(k, v) for k, v in (record.headers or ()) if v is not None]
        log.warning(
            "worker %s: %s[%d]@%d dead-lettered: %s",
            self.worker.name,
            record.topic,
            record.partition,
            record.offset,
            kind,
        )
        value, headers = codec.dead_letter(record.value, original, self._letter(record, kind, message))
        try:
            delivery: asyncio.Future[Any] = await self.producer.send(topics.DEADLETTER, value, key=record.key,
                                                                     headers=headers)
        except _REFUSED_RECORD as exc:  # the producer's own limit
            delivery = await self._bare_dead_letter(record, kind, message, exc)
        return delivery

    async def _bare_dead_letter(self, record: ConsumerRecord[bytes, bytes], kind: str, message: str,
                                refused: BaseException) -> asyncio.Future[Any]:
        """The dead letter of a record too large to copy: without the original's bytes and headers,
        naming where the original is (topic, partition, offset) and why it is not copied."""
        assert self.producer is not None
        why = f"; the original ({len(record.value or b'')} bytes) is not copied: {type(refused).__name__}"
        letter = self._letter(record, kind, message[:4000 - len(why)] + why)
        value, headers = codec.dead_letter(None, [], letter)
        delivery: asyncio.Future[Any] = await self.producer.send(topics.DEADLETTER, value, key=record.key,
                                                                 headers=headers)
        return delivery

    def _letter(self, record: ConsumerRecord[bytes, bytes], kind: str, message: str) -> DeadLetter:
        return DeadLetter(
            original_topic=record.topic,
            original_partition=record.partition,
            original_offset=record.offset,
            consumer=self.group,
            error_type=kind,
            error=message[:4000],
            failed_at=datetime.now(UTC),
        )

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


#: A task handed in for a batch handler call: its partition, the task, and where its outcome goes.
_Waiting = tuple[TopicPartition, TaskAssigned, "asyncio.Future[TaskReceipt | LedgerClaim]"]


class _BatchCalls:
    """The tasks of batch-handled actions that the case chains of one Kafka batch have come to,
    run in calls of up to ``max_batch`` tasks. A chain hands in one task and waits for its outcome
    before it hands in the next, so a call never holds two tasks of one case, and a case's tasks
    run one after another in log order, as single-handled ones do.

    A call takes one of the runner's concurrency slots and the rate limit's share of its tasks,
    then claims each task in the ledger: the owned ones go to the batch handler together; one the
    ledger shows done gets the receipt stored there, and one another instance holds goes back to
    its chain, which waits for it as for a single-handled task."""

    def __init__(self, runner: _Runner) -> None:
        self.runner = runner
        self.waiting: dict[Action, list[_Waiting]] = {}
        self.running: set[asyncio.Task[None]] = set()

    async def run(self, tp: TopicPartition, task: TaskAssigned) -> TaskReceipt | LedgerClaim:
        """The task's receipt, from its call or from the ledger, or the claim of the instance that
        holds it. Raises :class:`_HandedBack` for a task not started here."""
        outcome: asyncio.Future[TaskReceipt | LedgerClaim] = asyncio.get_running_loop().create_future()
        waiting = self.waiting.setdefault(task.action, [])
        waiting.append((tp, task, outcome))
        if len(waiting) == 1:
            call = asyncio.create_task(self._calls(task.action))
            self.running.add(call)
            call.add_done_callback(self.running.discard)
        return await outcome

    async def _calls(self, action: Action) -> None:
        await asyncio.sleep(0)  # the chains that start with this one hand their tasks in first
        waiting = self.waiting.pop(action)
        size = self.runner.worker.max_batch
        await asyncio.gather(*(self._call(waiting[i:i + size]) for i in range(0, len(waiting), size)))

    async def _call(self, waiting: list[_Waiting]) -> None:
        runner = self.runner
        try:
            async with runner._semaphore:
                await runner._pace(len(waiting))
                startable: list[_Waiting] = []
                for entry in waiting:
                    tp, _, outcome = entry
                    if tp in runner._handed_back or runner.stop.is_set():
                        _settle(outcome, _HandedBack())
                    else:
                        startable.append(entry)
                claims = await asyncio.gather(*(runner._claim(task) for _, task, _ in startable),
                                              return_exceptions=True)
                owned: list[_Waiting] = []
                for entry, claim in zip(startable, claims, strict=True):
                    _, task, outcome = entry
                    if isinstance(claim, BaseException):
                        _settle(outcome, claim)
                    elif claim.state == "owned":
                        runner._owned(task, claim)
                        owned.append(entry)
                    elif claim.state == "done":
                        _settle(outcome, runner._from_ledger(task, claim))
                    else:
                        _settle(outcome, claim)
                if not owned:
                    return
                receipts = await runner._run_claimed([task for _, task, _ in owned])
                recorded = await asyncio.gather(*(runner._record(task, receipt) for (_, task, _), receipt
                                                  in zip(owned, receipts, strict=True)), return_exceptions=True)
                for (_, _, outcome), stored in zip(owned, recorded, strict=True):
                    _settle(outcome, stored)
        except _HandedBack as exc:  # stopping while it waited for the rate limit
            for _, _, outcome in waiting:
                _settle(outcome, exc)
        except BaseException as exc:
            for _, _, outcome in waiting:
                if isinstance(exc, Exception):
                    _settle(outcome, exc)
                elif not outcome.done():
                    outcome.cancel()
            if not isinstance(exc, Exception):
                raise


def _settle(outcome: asyncio.Future[TaskReceipt | LedgerClaim], result: object) -> None:
    """Give a waiting chain its task's outcome, unless it stopped waiting (it was cancelled)."""
    if outcome.done():
        return
    if isinstance(result, BaseException):
        outcome.set_exception(result)
    else:
        assert isinstance(result, TaskReceipt | LedgerClaim)
        outcome.set_result(result)


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
