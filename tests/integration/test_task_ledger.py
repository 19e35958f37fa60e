"""The task ledger on a real broker and a real PostgreSQL: a task delivered again (a rebalance in
the middle of a batch, a crash before the commit) is not run again and its first receipt is the
one reported; a receipt too large to send becomes a ``failed`` receipt and the partition goes on.

Also: a receipt the ledger refuses for good is sent after five refusals; tasks of a batch
handler are claimed each, and a redelivery sends their stored receipts.

Each worker here erases from a small database of its own (``subjects``) and writes every handler
call to it (``calls``), so "the handler ran once per task" is counted where the erasure happens.
Without the ledger, the rebalance and the crash tests see handlers called twice and ``not_found``
receipts with no counts: the second run finds nothing left to erase.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import SecretStr

from dsrflow import codec, topics
from dsrflow.codec import header_map
from dsrflow.events import TaskAssigned, TaskReceipt
from dsrflow.registry import SystemDeclaration
from dsrflow.rights import Action, IdentifierType, ReceiptStatus
from dsrflow.settings import Settings
from dsrflow.testing.worker import make_task
from dsrflow.worker import MemoryTaskLedger, PostgresTaskLedger, Result, TaskContext, TaskLedger, Worker, _runner
from dsrflow.worker._ledger import TABLE
from tests.integration.receipts import Receipts

pytestmark = [pytest.mark.kafka, pytest.mark.pg]

TIMEOUT = 60.0  # any one wait
TEST_TIMEOUT = 150.0  # a whole test
MakeDatabase = Callable[..., Awaitable[str]]

SCHEMA = """
CREATE TABLE subjects (email text PRIMARY KEY);
CREATE TABLE calls (task_id uuid NOT NULL, attempt int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
"""


# -- helpers ---------------------------------------------------------------------------------------




class LogLines(logging.Handler):
    """The dsrflow.worker log of the test, as text."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def wait_for(self, text: str, count: int = 1) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.count(text) < count:
            assert time.monotonic() < deadline, f"no log line with {text!r} after {TIMEOUT}s"
            await asyncio.sleep(0.05)


@pytest.fixture
def worker_log() -> Iterator[LogLines]:
    logger = logging.getLogger("dsrflow.worker")
    handler, level = LogLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def system_database(make_database: MakeDatabase, emails: list[str]) -> str:
    dsn = await make_database("ledger")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        await conn.executemany("INSERT INTO subjects VALUES ($1)", [(e,) for e in emails])
    finally:
        await conn.close()
    return dsn


async def calls_per_task(dsn: str) -> dict[uuid.UUID, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT task_id, count(*) AS n FROM calls GROUP BY task_id")
    finally:
        await conn.close()
    return {r["task_id"]: r["n"] for r in rows}


def erasing_worker(
    system: str, dsn: str, *, gate: asyncio.Event | None = None, ledger: TaskLedger | None = None,
    concurrency: int = 2, **options: Any,
) -> Worker:
    """A worker that erases ``subjects`` rows in its own database ``dsn``, where its task ledger
    is too (unless ``ledger`` is given). Its erase handler waits for ``gate`` after it has recorded
    its call and before it erases. A subject ``big-<n>@example.vn`` gets a receipt with n counts."""
    w = Worker(
        SystemDeclaration(name=system, identifier_types=(IdentifierType.email,), actions=(Action.erase,)),
        concurrency=concurrency,
        ledger=ledger if ledger is not None else (lambda settings: PostgresTaskLedger(dsn)),
        **options,
    )
    pool: list[asyncpg.Pool] = []

    @w.on_startup
    async def open_pool(settings: Settings) -> None:
        pool.append(await asyncpg.create_pool(dsn, min_size=1, max_size=concurrency + 1))

    @w.on_shutdown
    async def close_pool(settings: Settings) -> None:
        await pool.pop().close()

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        email = ctx.identifiers[IdentifierType.email]
        await pool[0].execute("INSERT INTO calls (task_id, attempt) VALUES ($1, $2)", ctx.task.task_id,
                              ctx.task.attempt)
        if gate is not None:
            await gate.wait()
        n = int((await pool[0].execute("DELETE FROM subjects WHERE email = $1", email)).split()[-1])
        if not n:
            return Result.not_found()
        if email.startswith("big-"):
            many = int(email.split("@")[0].removeprefix("big-"))
            return Result.succeeded(counts={"erased": n, **{f"part_{i:07d}": 1 for i in range(many)}})
        return Result.succeeded(counts={"erased": n})

    return w


def settings_for(broker: str, broker_kind: str, case_store: str, tmp_path: Path) -> Settings:
    return Settings(
        kafka_bootstrap=broker,
        pg_dsn=SecretStr(case_store),
        export_dir=tmp_path / "exports",
        kafka_idempotent_producer=broker_kind != "tansu",
    )


async def produce(settings: Settings, system: str, tasks: list[TaskAssigned]) -> dict[int, int]:
    """Create the system's topics and put the tasks on its task topic. Returns, for each partition
    that got a task, the offset after its last one (what a worker that finished commits)."""
    await topics.apply(settings.kafka_client_options(), topics.specs_for([system]))
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    ends: dict[int, int] = {}
    try:
        for task in tasks:
            value, headers = codec.encode(task, source="test")
            meta = await producer.send_and_wait(topics.tasks_topic(system), value, key=str(task.case_id).encode(),
                                                headers=headers)
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return ends


async def committed(broker: str, system: str) -> dict[int, int | None]:
    probe = AIOKafkaConsumer(bootstrap_servers=broker, group_id=f"dsrflow-worker-{system}", enable_auto_commit=False)
    await probe.start()
    try:
        topic = topics.tasks_topic(system)
        parts = range(topics.declared()[topics.TASKS_TEMPLATE].partitions)
        return {p: await probe.committed(TopicPartition(topic, p)) for p in parts}
    finally:
        await probe.stop()


async def stop_all(runs: list[tuple[asyncio.Event, asyncio.Task[None]]]) -> None:
    for stop, _ in runs:
        stop.set()
    for _, task in runs:
        await asyncio.wait_for(task, TIMEOUT)


def started(worker: Worker, settings: Settings) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(worker.run(settings, stop=stop))


async def wind_down(runs: list[tuple[asyncio.Event, asyncio.Task[None]]]) -> None:
    """After a test, pass or fail: stop every worker it started and wait for it (cancelled if it
    will not stop), so that none goes on consuming into the next test."""
    for stop, _ in runs:
        stop.set()
    tasks = [t for _, t in runs]
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=TIMEOUT)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until(condition: Callable[[], Awaitable[bool]], what: str, runs: list[Any]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not await condition():
        for _, task in runs:
            if task.done():
                task.result()  # a worker's own error
        assert time.monotonic() < deadline, f"{what}: not after {TIMEOUT}s"
        await asyncio.sleep(0.1)


# -- the ledger's claim protocol, on its own ---------------------------------------------------------


@pytest.fixture(params=["postgres", "memory"])
async def ledger(request: pytest.FixtureRequest, make_database: MakeDatabase) -> AsyncIterator[TaskLedger]:
    led: TaskLedger = PostgresTaskLedger(await make_database("ledger")) if request.param == "postgres" \
        else MemoryTaskLedger()
    await led.open()
    try:
        yield led
    finally:
        await led.close()


async def test_claim_protocol(ledger: TaskLedger) -> None:
    task = make_task("crm", Action.erase, {"email": "lan.nguyen@example.vn"})
    lease = timedelta(seconds=30)
    first = await ledger.claim(task, owner="a", lease=lease)
    assert first.state == "owned" and not first.takeover
    busy = await ledger.claim(task, owner="b", lease=lease)
    assert busy.state == "busy" and busy.holder == "a" and 0 < busy.retry_in <= 30
    assert (await ledger.claim(task, owner="a", lease=lease)).state == "busy"  # a claim is taken once

    receipt = TaskReceipt(task_id=task.task_id, case_id=task.case_id, system="crm", attempt=1,
                          status=ReceiptStatus.succeeded, counts={"erased": 3}, completed_at=task.due_at)
    assert await ledger.finish(task, receipt, owner="a") == receipt
    done = await ledger.claim(task, owner="b", lease=lease)
    assert done.state == "done" and done.receipt == receipt
    # A later result (a re-run's not_found) never replaces the first.
    later = receipt.model_copy(update={"status": ReceiptStatus.not_found, "counts": {}})
    assert await ledger.finish(task, later, owner="b") == receipt
    # Another attempt of the same task is another entry.
    retry = task.model_copy(update={"attempt": 2})
    assert (await ledger.claim(retry, owner="b", lease=lease)).state == "owned"


async def test_a_claim_whose_holder_died_is_taken_over_after_its_lease(ledger: TaskLedger) -> None:
    task = make_task("crm", Action.erase, {"email": "lan.nguyen@example.vn"})
    assert (await ledger.claim(task, owner="dead", lease=timedelta(seconds=1))).state == "owned"
    assert (await ledger.claim(task, owner="alive", lease=timedelta(seconds=30))).state == "busy"
    await asyncio.sleep(1.2)
    taken = await ledger.claim(task, owner="alive", lease=timedelta(seconds=30))
    assert taken.state == "owned" and taken.takeover
    # Released (a cancelled handler): the next claim runs it at once.
    await ledger.release(task, owner="someone else")
    assert (await ledger.claim(task, owner="third", lease=timedelta(seconds=30))).state == "busy"
    await ledger.release(task, owner="alive")
    assert (await ledger.claim(task, owner="third", lease=timedelta(seconds=30))).state == "owned"


async def test_concurrent_claims_give_one_owner(ledger: TaskLedger) -> None:
    task = make_task("crm", Action.erase, {"email": "lan.nguyen@example.vn"})
    claims = await asyncio.gather(*(ledger.claim(task, owner=f"i{i}", lease=timedelta(seconds=30))
                                    for i in range(8)))
    assert sorted(c.state for c in claims) == ["busy"] * 7 + ["owned"]


# -- on the broker -------------------------------------------------------------------------------------


async def test_a_rebalance_mid_batch_runs_each_task_once_and_reports_its_first_result(
    broker: str, broker_kind: str, case_store: str, make_database: MakeDatabase, tmp_path: Path,
    receipts: Receipts, worker_log: LogLines, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Instance A holds a batch of erasures whose handlers are slow; instance B joins the group.
    A cannot finish in time and hands its partitions back uncommitted; the records go to their
    new owners again, while A's two claimed handlers are still running. Every task still runs
    once, and every receipt sent says erased=1."""
    monkeypatch.setattr(_runner, "REVOKE_WAIT_S", 0.5)
    system = f"led{uuid.uuid4().hex[:10]}"
    emails = [f"subject{i}@example.vn" for i in range(10)]
    dsn = await system_database(make_database, emails)
    settings = settings_for(broker, broker_kind, case_store, tmp_path)
    tasks = [make_task(system, Action.erase, {"email": e}) for e in emails]
    ends = await produce(settings, system, tasks)
    gate = asyncio.Event()
    runs: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def two_calls() -> bool:
        return sum((await calls_per_task(dsn)).values()) >= 2

    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            runs.append(started(erasing_worker(system, dsn, gate=gate), settings))  # A
            await until(two_calls, "A's first two handlers", runs)  # both wait at the gate, claims held
            runs.append(started(erasing_worker(system, dsn, gate=gate), settings))  # B joins: a rebalance
            await worker_log.wait_for("handing back")
            handed_back_at = next(i for i, line in enumerate(worker_log.lines) if "handing back" in line)

            async def both_assigned() -> bool:
                return sum("partitions assigned" in line for line in worker_log.lines[handed_back_at:]) >= 2

            await until(both_assigned, "the rebalance", runs)
            gate.set()
            await receipts.wait_for([t.task_id for t in tasks])
            await asyncio.sleep(1.0)  # any late copy of a receipt arrives too
            await receipts.wait_for([t.task_id for t in tasks])
            await stop_all(runs)
    finally:
        gate.set()
        await wind_down(runs)

    for task in tasks:
        got = [r for _, r in receipts.of(task.task_id)]
        assert got, task.task_id
        assert all(r.status == ReceiptStatus.succeeded and r.counts == {"erased": 1} for r in got), got
        assert len({r.completed_at for r in got}) == 1  # copies of the first receipt, not re-runs
    calls = await calls_per_task(dsn)
    assert calls == {t.task_id: 1 for t in tasks}
    # The ledger was what kept the re-delivered tasks from running again.
    assert worker_log.count("sending the receipt the ledger holds") + worker_log.count("waiting for its receipt") > 0
    # every partition that had tasks committed past its last one (one that got none has nothing to commit)
    assert {p: c for p, c in (await committed(broker, system)).items() if p in ends} == ends


async def test_a_task_redelivered_after_a_crash_sends_its_stored_receipt_without_running_again(
    broker: str, broker_kind: str, case_store: str, make_database: MakeDatabase, tmp_path: Path,
    receipts: Receipts, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first instance erases and sends the receipt, then 'crashes' before its commit; the
    restarted worker gets the task again and sends the same receipt, without calling the handler."""
    system = f"led{uuid.uuid4().hex[:10]}"
    dsn = await system_database(make_database, ["lan.nguyen@example.vn"])
    settings = settings_for(broker, broker_kind, case_store, tmp_path)
    task = make_task(system, Action.erase, {"email": "lan.nguyen@example.vn"})
    await produce(settings, system, [task])

    async def no_commit(self: Any, batch: Any) -> None:  # the crash: receipts out, offsets not committed
        return None

    runs: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            with monkeypatch.context() as m:
                m.setattr(_runner._Runner, "_commit", no_commit)
                runs.append(started(erasing_worker(system, dsn), settings))
                await receipts.wait_for([task.task_id])
                await stop_all(runs)
            assert set((await committed(broker, system)).values()) == {None}

            runs.append(started(erasing_worker(system, dsn), settings))  # the restart: a new instance
            await receipts.wait_for([task.task_id], copies=2)

            async def committed_now() -> bool:
                return any((await committed(broker, system)).values())

            await until(committed_now, "the commit after the redelivery", runs)
            await stop_all(runs)
    finally:
        await wind_down(runs)

    (r1, first), (r2, second) = receipts.of(task.task_id)
    assert first.status == ReceiptStatus.succeeded and first.counts == {"erased": 1}
    assert second == first and r2.value == r1.value  # the stored receipt, byte for byte
    assert header_map(r2.headers)["ce_id"] == header_map(r1.headers)["ce_id"]  # the coordinator drops it
    assert await calls_per_task(dsn) == {task.task_id: 1}


@pytest.mark.parametrize("limit", ["worker", "broker"])
async def test_a_receipt_too_large_to_send_is_sent_as_failed_and_the_partition_goes_on(
    broker: str, broker_kind: str, case_store: str, make_database: MakeDatabase, tmp_path: Path,
    receipts: Receipts, limit: str,
) -> None:
    """worker: the receipt is over max_receipt_bytes (900 kB by default) before it is sent;
    broker: max_receipt_bytes lets it through, and the broker (1 MiB records) refuses it."""
    if limit == "broker" and broker_kind != "apache":
        pytest.skip("the broker's own size limit is tested against Apache Kafka")
    system = f"led{uuid.uuid4().hex[:10]}"
    big, small = "big-120000@example.vn", "lan.nguyen@example.vn"  # ~1.8 MB of counts
    dsn = await system_database(make_database, [big, small])
    settings = settings_for(broker, broker_kind, case_store, tmp_path)
    case_id = uuid.uuid4()  # one case: the same partition for both tasks, and for both receipts
    huge = make_task(system, Action.erase, {"email": big}, case_id=case_id)
    after = make_task(system, Action.erase, {"email": small}, case_id=case_id)
    await produce(settings, system, [huge, after])
    options: dict[str, Any] = {"max_receipt_bytes": 5_000_000} if limit == "broker" else {}
    runs: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            runs.append(started(erasing_worker(system, dsn, **options), settings))
            await receipts.wait_for([huge.task_id, after.task_id])

            async def committed_both() -> bool:
                return sum(v or 0 for v in (await committed(broker, system)).values()) == 2

            await until(committed_both, "the commit of both tasks", runs)
            await stop_all(runs)
    finally:
        await wind_down(runs)

    [(record, failed)] = receipts.of(huge.task_id)
    assert failed.status == ReceiptStatus.failed and not failed.retryable
    assert failed.counts == {} and failed.artifacts == [] and failed.categories == []
    assert failed.error is not None and failed.error.startswith("receipt not sent: ")
    assert ("too large" if limit == "worker" else "the broker refused it") in failed.error
    assert "succeeded result" in failed.error and big not in failed.error
    assert len(record.value) < 10_000
    [(_, ok)] = receipts.of(after.task_id)
    assert ok.status == ReceiptStatus.succeeded and ok.counts == {"erased": 1}
    assert await calls_per_task(dsn) == {huge.task_id: 1, after.task_id: 1}


async def test_a_receipt_whose_error_holds_a_nul_is_stored(ledger: TaskLedger) -> None:
    """PostgreSQL refuses NUL in text and jsonb: a handler's error text with one (from a C library,
    say) must not make the receipt unstorable and its batch stuck."""
    task = make_task("crm", Action.erase, {"email": "lan.nguyen@example.vn"})
    assert (await ledger.claim(task, owner="a", lease=timedelta(seconds=30))).state == "owned"
    receipt = TaskReceipt(task_id=task.task_id, case_id=task.case_id, system="crm", attempt=1,
                          status=ReceiptStatus.failed, error="driver said: bad\x00byte", completed_at=task.due_at)
    stored = await ledger.finish(task, receipt, owner="a")
    assert stored.error == "driver said: badbyte"


async def test_a_receipt_the_ledger_refuses_for_good_is_sent_unrecorded_after_five_refusals(
    broker: str, broker_kind: str, case_store: str, make_database: MakeDatabase, tmp_path: Path,
    receipts: Receipts, worker_log: LogLines, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ledger's table refuses every result (a constraint a migration got wrong, say): not a
    transient error, so after five refusals the receipt goes out all the same, with an error
    logged, and the partition is committed instead of going round for ever."""
    monkeypatch.setattr(_runner, "BACKOFF_MAX_S", 0.2)
    system = f"led{uuid.uuid4().hex[:10]}"
    dsn = await system_database(make_database, ["lan.nguyen@example.vn"])
    ledger = PostgresTaskLedger(dsn)
    await ledger.open()  # creates the table
    await ledger.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT never_done CHECK (state <> 'done')")
    finally:
        await conn.close()
    settings = settings_for(broker, broker_kind, case_store, tmp_path)
    task = make_task(system, Action.erase, {"email": "lan.nguyen@example.vn"})
    await produce(settings, system, [task])
    runs: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            runs.append(started(erasing_worker(system, dsn), settings))
            await receipts.wait_for([task.task_id])

            async def committed_now() -> bool:
                return any((await committed(broker, system)).values())

            await until(committed_now, "the commit", runs)
            await stop_all(runs)
    finally:
        await wind_down(runs)

    [(_, receipt)] = receipts.of(task.task_id)
    assert receipt.status == ReceiptStatus.succeeded and receipt.counts == {"erased": 1}
    assert await calls_per_task(dsn) == {task.task_id: 1}
    assert worker_log.count("not delivered (CheckViolationError)") == 4
    assert worker_log.count("refused its receipt 5 times in a row (CheckViolationError)") == 1
    assert worker_log.count("the ledger did not record it") == 1


def batch_erasing_worker(system: str, dsn: str, calls: list[list[uuid.UUID]]) -> Worker:
    """Erases ``subjects`` rows in its own database in one statement per call; its ledger is there
    too. ``calls`` gets the case ids of each call; ``calls`` in the database, each task run."""
    w = Worker(SystemDeclaration(name=system, identifier_types=(IdentifierType.email,), actions=(Action.erase,)),
               ledger=lambda settings: PostgresTaskLedger(dsn))
    pool: list[asyncpg.Pool] = []

    @w.on_startup
    async def open_pool(settings: Settings) -> None:
        pool.append(await asyncpg.create_pool(dsn, min_size=1, max_size=2))

    @w.on_shutdown
    async def close_pool(settings: Settings) -> None:
        await pool.pop().close()

    @w.batch_handler(Action.erase)
    async def erase(ctxs: list[TaskContext]) -> list[Result]:
        calls.append([ctx.task.case_id for ctx in ctxs])
        await pool[0].executemany("INSERT INTO calls (task_id, attempt) VALUES ($1, $2)",
                                  [(ctx.task.task_id, ctx.task.attempt) for ctx in ctxs])
        erased = {r["email"] for r in await pool[0].fetch("DELETE FROM subjects WHERE email = any($1) RETURNING email",
                                                          [ctx.identifiers[IdentifierType.email] for ctx in ctxs])}
        return [Result.succeeded(counts={"erased": 1}) if ctx.identifiers[IdentifierType.email] in erased
                else Result.not_found() for ctx in ctxs]

    return w


async def test_batch_handled_tasks_are_claimed_each_and_a_redelivery_sends_the_stored_receipts(
    broker: str, broker_kind: str, case_store: str, make_database: MakeDatabase, tmp_path: Path,
    receipts: Receipts, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch handler erases eight subjects (two tasks of one case among them: never in one call,
    the first before the second); the instance 'crashes' before its commit, and the restarted one
    sends every stored receipt again without calling the batch handler."""
    system = f"led{uuid.uuid4().hex[:10]}"
    emails = [f"subject{i}@example.vn" for i in range(8)]
    dsn = await system_database(make_database, emails)
    settings = settings_for(broker, broker_kind, case_store, tmp_path)
    tasks = [make_task(system, Action.erase, {"email": e}) for e in emails[:7]]
    again = make_task(system, Action.erase, {"email": emails[7]}, case_id=tasks[0].case_id)
    await produce(settings, system, [*tasks, again])
    everything = [*tasks, again]

    async def no_commit(self: Any, batch: Any) -> None:
        return None

    calls: list[list[uuid.UUID]] = []
    runs: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            with monkeypatch.context() as m:
                m.setattr(_runner._Runner, "_commit", no_commit)
                runs.append(started(batch_erasing_worker(system, dsn, calls), settings))
                await receipts.wait_for([t.task_id for t in everything])
                await stop_all(runs)
            first_calls = list(calls)
            runs.append(started(batch_erasing_worker(system, dsn, calls), settings))  # the restart
            await receipts.wait_for([t.task_id for t in everything], copies=2)
            await stop_all(runs)
    finally:
        await wind_down(runs)

    assert calls == first_calls  # the restarted instance called nothing
    assert all(len(call) == len(set(call)) for call in calls)  # never two tasks of one case in a call
    first = next(i for i, call in enumerate(calls) if tasks[0].case_id in call)
    assert tasks[0].case_id in calls[first] and any(tasks[0].case_id in call for call in calls[first + 1:])
    assert await calls_per_task(dsn) == {t.task_id: 1 for t in everything}
    for t in everything:
        (r1, one), (r2, two) = receipts.of(t.task_id)
        assert one.status == ReceiptStatus.succeeded and one.counts == {"erased": 1}
        assert r2.value == r1.value  # the stored receipt, byte for byte
