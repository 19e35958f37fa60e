"""The worker SDK without Kafka: handlers, results, errors, exports, hooks."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from dsrflow.events import RetainedItem, TaskReceipt
from dsrflow.exports import MemoryExportStore
from dsrflow.registry import Retention, SystemDeclaration
from dsrflow.rights import Action, IdentifierType, ReceiptStatus, Right
from dsrflow.settings import Settings
from dsrflow.testing.worker import make_task, run_task
from dsrflow.worker import Result, RetryableError, TaskContext, TaskError, Worker, load_worker

EMAIL = "Lan.Nguyen@Example.VN"
PHONE = "+84 90 123 4567"

PEOPLE = {"lan.nguyen@example.vn": {"full_name": "Nguyễn Thị Lan", "city": "Hà Nội"}}


def declaration(*actions: Action) -> SystemDeclaration:
    return SystemDeclaration(
        name="shop",
        identifier_types=(IdentifierType.email, IdentifierType.phone),
        categories=("user.name", "user.contact.email"),
        actions=actions or (Action.export, Action.erase),
        retention=(Retention(category="user.financial", legal_basis="Law X Art 1", period=timedelta(days=3653)),),
    )


def make_worker(**kwargs: object) -> Worker:
    w = Worker(declaration(), **kwargs)  # type: ignore[arg-type]

    @w.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        person = PEOPLE.get(ctx.identifiers.get(IdentifierType.email, ""))
        if person is None:
            return Result.not_found()
        art = await ctx.export([person], records=1)
        return Result.succeeded(counts={"located": 1}, categories=["user.name"], artifacts=[art])

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        return Result.retained(
            [RetainedItem(category="user.financial", records=2, legal_basis="Law X Art 1")],
            counts={"anonymised": 1, "retained": 2},
            categories=["user.financial"],
        )

    return w


def settings() -> Settings:
    return Settings(kafka_bootstrap="127.0.0.1:1", pg_dsn=SecretStr("postgresql://u@127.0.0.1:1/x"))


async def test_export_writes_claim_check_and_succeeds() -> None:
    store = MemoryExportStore()
    task = make_task("shop", Action.export, {"email": EMAIL, "phone": PHONE})
    receipt = await run_task(make_worker(), task, store=store)

    assert isinstance(receipt, TaskReceipt)
    assert receipt.status == ReceiptStatus.succeeded
    assert (receipt.task_id, receipt.case_id, receipt.attempt) == (task.task_id, task.case_id, 1)
    assert receipt.counts == {"located": 1}
    [art] = receipt.artifacts
    assert art.ref == f"systems/shop/cases/{task.case_id}/{task.task_id}-1-{art.sha256[:16]}.json"
    data = store.get(art.ref)
    assert art.sha256 == hashlib.sha256(data).hexdigest() and art.size == len(data) and art.records == 1
    assert orjson.loads(data) == [PEOPLE["lan.nguyen@example.vn"]]
    # Exported records never travel in the receipt.
    assert "Nguyễn" not in receipt.model_dump_json()


async def test_not_found_and_retained() -> None:
    w = make_worker()
    missing = await run_task(w, make_task("shop", Action.export, {"email": "nobody@example.vn"}))
    assert missing.status == ReceiptStatus.not_found and missing.artifacts == []

    kept = await run_task(w, make_task("shop", Action.erase, {"phone": PHONE}))
    assert kept.status == ReceiptStatus.retained
    assert kept.retained[0].legal_basis == "Law X Art 1" and kept.counts["retained"] == 2


async def test_make_task_normalises_identifiers_and_infers_right() -> None:
    task = make_task("shop", Action.export, {"email": EMAIL, "phone": PHONE})
    assert task.identifiers == {IdentifierType.email: "lan.nguyen@example.vn", IdentifierType.phone: "+84901234567"}
    assert task.right == Right.access
    assert make_task("shop", "erase", {"email": EMAIL}).right == Right.erasure


async def test_unsupported_action_is_refused() -> None:
    receipt = await run_task(make_worker(), make_task("shop", Action.rectify, {"email": EMAIL}, changes={"a": "b"}))
    assert receipt.status == ReceiptStatus.refused
    assert receipt.error is not None and "rectify" in receipt.error and not receipt.retryable


async def test_task_without_a_searchable_identifier_is_refused() -> None:
    receipt = await run_task(make_worker(), make_task("shop", Action.export, {"customer_id": "KH-1"}))
    assert receipt.status == ReceiptStatus.refused


async def test_handler_sees_only_declared_identifier_types() -> None:
    seen: dict[IdentifierType, str] = {}
    w = Worker(SystemDeclaration(name="shop", identifier_types=(IdentifierType.email,), actions=(Action.export,)))

    @w.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        seen.update(ctx.identifiers)
        return Result.not_found()

    await run_task(w, make_task("shop", Action.export, {"email": EMAIL, "phone": PHONE}))
    assert seen == {"email": "lan.nguyen@example.vn"}


def failing_worker(exc: BaseException) -> Worker:
    w = Worker(declaration(Action.erase))

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        raise exc

    return w


async def test_retryable_error_is_failed_and_retryable() -> None:
    receipt = await run_task(
        failing_worker(RetryableError("database unavailable")), make_task("shop", "erase", {"email": EMAIL})
    )
    assert receipt.status == ReceiptStatus.failed and receipt.retryable
    assert receipt.error == "RetryableError: database unavailable"


async def test_other_exception_is_failed_not_retryable_without_its_message() -> None:
    task = make_task("shop", "erase", {"email": EMAIL, "phone": PHONE})
    # An unexpected error whose message echoes personal data (as KeyError or a driver might).
    receipt = await run_task(failing_worker(ValueError(f"no row for {EMAIL.lower()} / Nguyễn Thị Lan")), task)
    assert receipt.status == ReceiptStatus.failed and not receipt.retryable
    assert receipt.error is not None and receipt.error.startswith("ValueError at ")
    assert "Nguyễn" not in receipt.error and "example.vn" not in receipt.error


async def test_task_error_message_never_echoes_identifiers() -> None:
    task = make_task("shop", "erase", {"email": EMAIL, "phone": PHONE})
    msg = f"cannot erase LAN.NGUYEN@EXAMPLE.VN, phone 84901234567 or {task.identifiers[IdentifierType.phone]}"
    receipt = await run_task(failing_worker(TaskError(msg)), task)
    assert receipt.status == ReceiptStatus.failed and not receipt.retryable
    assert receipt.error is not None
    assert "example.vn" not in receipt.error.lower() and "84901234567" not in receipt.error
    assert receipt.error.count("[redacted]") == 3


async def test_task_error_message_never_echoes_the_corrected_values_of_a_rectification() -> None:
    task = make_task("shop", "rectify", {"email": EMAIL}, changes={"address": "12 Phố Hàng Bạc, Hà Nội"})
    w = Worker(declaration(Action.rectify))

    @w.handler(Action.rectify)
    async def rectify(ctx: TaskContext) -> Result:
        raise TaskError("address 12 Phố Hàng Bạc, Hà Nội is too long for the address column")

    receipt = await run_task(w, task)
    assert receipt.error is not None and "Hàng Bạc" not in receipt.error
    assert receipt.error == "TaskError: address [redacted] is too long for the address column"


async def test_redaction_takes_whole_values_before_their_parts_and_keeps_short_names_out() -> None:
    task = make_task("shop", "rectify", {"email": EMAIL},
                     changes={"first_name": "Lan", "full_name": "Nguyễn Thị Lan", "given": "An"})
    w = Worker(declaration(Action.rectify))

    @w.handler(Action.rectify)
    async def rectify(ctx: TaskContext) -> Result:
        raise TaskError("cannot store bad name Nguyễn Thị Lan / An")

    receipt = await run_task(w, task)
    assert receipt.error == "TaskError: cannot store bad name [redacted] / [redacted]"


async def test_transient_library_errors_are_retryable() -> None:
    receipt = await run_task(
        failing_worker(ConnectionResetError("peer reset")), make_task("shop", "erase", {"email": EMAIL})
    )
    assert receipt.status == ReceiptStatus.failed and receipt.retryable
    assert receipt.error is not None and "peer reset" not in receipt.error


async def test_handler_timeout_is_retryable() -> None:
    w = Worker(declaration(Action.erase), task_timeout=timedelta(milliseconds=50))

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        await asyncio.sleep(5)
        return Result.succeeded()

    receipt = await run_task(w, make_task("shop", "erase", {"email": EMAIL}))
    assert receipt.status == ReceiptStatus.failed and receipt.retryable
    assert receipt.error is not None and "timed out" in receipt.error


async def test_handler_returning_garbage_is_failed() -> None:
    w = Worker(declaration(Action.erase))

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        return {"status": "ok"}  # type: ignore[return-value]

    receipt = await run_task(w, make_task("shop", "erase", {"email": EMAIL}))
    assert receipt.status == ReceiptStatus.failed and not receipt.retryable


async def test_result_failed_and_refused_reasons_are_reported() -> None:
    w = Worker(declaration(Action.erase))

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        return Result.failed("2 rows remain after erasure", retryable=True)

    receipt = await run_task(w, make_task("shop", "erase", {"email": EMAIL}))
    assert (receipt.status, receipt.retryable, receipt.error) == ("failed", True, "2 rows remain after erasure")
    assert Result.refused("legal hold").status == ReceiptStatus.refused


def test_result_constructors_validate() -> None:
    with pytest.raises(ValueError):
        Result.retained([])
    with pytest.raises(ValueError):
        Result.succeeded(counts={"erased": -1})


def test_registration_rejects_undeclared_and_duplicate_handlers() -> None:
    w = Worker(declaration(Action.export))
    with pytest.raises(ValueError):
        w.handler(Action.erase)

    @w.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        return Result.not_found()

    with pytest.raises(ValueError):
        w.handler(Action.export)


async def test_declared_action_without_handler_fails_at_start() -> None:
    w = Worker(declaration(Action.export, Action.erase))

    @w.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        return Result.not_found()

    with pytest.raises(RuntimeError, match="erase"):
        async with w.lifespan(settings()):
            pass


async def test_task_for_another_system_is_rejected() -> None:
    with pytest.raises(ValueError):
        await run_task(make_worker(), make_task("billing", "export", {"email": EMAIL}))


async def test_hooks_run_once_around_tasks_in_order() -> None:
    calls: list[str] = []
    w = make_worker()

    @w.on_startup
    async def open_a(s: Settings) -> None:
        calls.append("open a")

    @w.on_startup
    async def open_b(s: Settings) -> None:
        calls.append("open b")

    @w.on_shutdown
    async def close_a(s: Settings) -> None:
        calls.append("close a")

    @w.on_shutdown
    async def close_b(s: Settings) -> None:
        calls.append("close b")

    await run_task(w, make_task("shop", "export", {"email": EMAIL}), settings=settings())
    assert calls == ["open a", "open b", "close b", "close a"]

    calls.clear()
    async with w.lifespan(settings()):
        assert w.started
        for _ in range(3):
            await run_task(w, make_task("shop", "export", {"email": EMAIL}))
    assert calls == ["open a", "open b", "close b", "close a"]
    assert not w.started


async def test_two_exports_in_one_attempt_get_distinct_keys() -> None:
    w = Worker(declaration(Action.export))

    @w.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        a = await ctx.export({"part": 1, "when": datetime(2024, 1, 2, tzinfo=UTC)}, records=1)
        b = await ctx.export(b"raw,csv\n", records=1, media_type="text/csv")
        return Result.succeeded(artifacts=[a, b])

    store = MemoryExportStore()
    task = make_task("shop", "export", {"email": EMAIL}, attempt=2)
    receipt = await run_task(w, task, store=store)
    refs = [a.ref for a in receipt.artifacts]
    digests = [a.sha256[:16] for a in receipt.artifacts]
    assert refs == [
        f"systems/shop/cases/{task.case_id}/{task.task_id}-2-{digests[0]}.json",
        f"systems/shop/cases/{task.case_id}/{task.task_id}-2-2-{digests[1]}.json",
    ]
    assert orjson.loads(store.get(refs[0]))["when"] == "2024-01-02T00:00:00+00:00"
    assert store.get(refs[1]) == b"raw,csv\n"


async def test_redelivered_attempt_never_replaces_the_export_a_receipt_named() -> None:
    store = MemoryExportStore()
    w = make_worker()
    task = make_task("shop", "export", {"email": EMAIL})
    first = await run_task(w, task, store=store)
    second = await run_task(w, task, store=store)
    assert first.artifacts == second.artifacts  # same bytes, same key: written once
    assert store.keys() == [first.artifacts[0].ref]

    changed = Worker(declaration(Action.export))

    @changed.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        art = await ctx.export({"orders": ["a later order"]}, records=1)
        return Result.succeeded(artifacts=[art])

    third = await run_task(changed, task, store=store)  # the data changed before the redelivery
    assert third.artifacts[0].ref != first.artifacts[0].ref
    assert hashlib.sha256(store.get(first.artifacts[0].ref)).hexdigest() == first.artifacts[0].sha256


def test_load_worker() -> None:
    import sys
    import types

    mod = types.ModuleType("_dsrflow_test_workers")
    mod.worker = make_worker()  # type: ignore[attr-defined]
    mod.other = 42  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    try:
        assert load_worker("_dsrflow_test_workers") is mod.worker
        with pytest.raises(TypeError):
            load_worker("_dsrflow_test_workers:other")
    finally:
        del sys.modules[mod.__name__]


# -- the batch loop, with the broker faked: ordering of delivery and commit --------------


class FakeProducer:
    def __init__(self, fail_first: int = 0) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self.fail_first = fail_first
        self.events: list[str] = []

    async def send(
        self, topic: str, value: bytes | None, *, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_first > 0:
            self.fail_first -= 1
            from aiokafka.errors import KafkaTimeoutError

            fut.set_exception(KafkaTimeoutError())
        else:
            self.sent.append((topic, key, value, headers))
            self.events.append(f"delivered {topic}")
            fut.set_result(None)
        return fut


class FakeConsumer:
    def __init__(self, batches: list[dict[Any, list[Any]]], stop: asyncio.Event, events: list[str]) -> None:
        self.batches = batches
        self.stop = stop
        self.events = events
        self.commits: list[dict[Any, int]] = []
        self.seeks: list[tuple[Any, int]] = []

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        if not self.batches:
            self.stop.set()
            return {}
        return self.batches.pop(0)

    async def commit(self, offsets: dict[Any, int]) -> None:
        self.events.append("commit")
        self.commits.append(offsets)

    def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append((tp, offset))


def record(topic: str, offset: int, value: bytes | None, headers: list[tuple[str, bytes]], key: bytes = b"k") -> Any:
    from aiokafka.structs import ConsumerRecord

    return ConsumerRecord(topic, 0, offset, 0, 0, key, value, None, len(key), len(value or b""), headers)


def runner_with(
    worker: Worker, batches: list[dict[Any, list[Any]]], producer: FakeProducer
) -> tuple[Any, FakeConsumer, asyncio.Event]:
    from dsrflow.worker._runner import _Runner

    stop = asyncio.Event()
    runner = _Runner(worker, settings(), MemoryExportStore(), stop)
    consumer = FakeConsumer(batches, stop, producer.events)
    runner.consumer, runner.producer = consumer, producer
    return runner, consumer, stop


async def test_batch_receipts_are_delivered_before_the_commit() -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.codec import read_dead_letter

    w = make_worker()
    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    good = make_task("shop", "export", {"email": EMAIL})
    other = make_task("billing", "export", {"email": EMAIL})
    value, headers = codec.encode(good, source="test")
    batch = {
        tp: [
            record(topic, 10, value, headers),
            record(topic, 11, b"{not json", headers, key=b"bad"),
            record(topic, 12, *codec.encode(other, source="test")),
        ]
    }
    producer = FakeProducer()
    runner, consumer, _ = runner_with(w, [batch], producer)
    await runner._loop()

    assert producer.events == [
        "delivered dsr.deadletter.v1",
        "delivered dsr.deadletter.v1",
        "delivered dsr.receipts.v1",
        "commit",
    ]
    assert consumer.commits == [{tp: 13}]
    dead = [s for s in producer.sent if s[0] == topics.DEADLETTER]
    assert dead[0][1] == b"bad" and dead[0][2] == b"{not json"
    assert read_dead_letter(dead[0][3]).error_type == "bad_json"
    assert read_dead_letter(dead[1][3]).error_type == "wrong_system"
    [(_, key, rvalue, rheaders)] = [s for s in producer.sent if s[0] == topics.RECEIPTS]
    assert key == str(good.case_id).encode()
    receipt = codec.decode(rvalue, rheaders, TaskReceipt)
    assert receipt.data.task_id == good.task_id and receipt.subject == str(good.case_id)
    # The receipt continues the task's trace.
    assert receipt.traceparent is not None
    assert receipt.traceparent.split("-")[1] == dict(headers)["traceparent"].decode().split("-")[1]


async def test_undelivered_batch_is_not_committed_but_processed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.worker import _runner

    monkeypatch.setattr(_runner, "BACKOFF_MAX_S", 0.0)
    w = make_worker()
    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    task = make_task("shop", "export", {"email": EMAIL})
    batch = {tp: [record(topic, 5, *codec.encode(task, source="test"))]}
    producer = FakeProducer(fail_first=1)
    # The consumer hands the same batch again after the rewind, as Kafka would.
    runner, consumer, _ = runner_with(w, [batch, batch], producer)
    await runner._loop()

    assert consumer.seeks == [(tp, 5)]
    assert producer.events == ["delivered dsr.receipts.v1", "commit"]
    assert consumer.commits == [{tp: 6}]


async def test_a_receipt_keeps_its_event_id_and_the_id_of_one_not_yet_made_cannot_be_guessed() -> None:
    from dsrflow.worker._runner import receipt_event_id

    task = make_task("shop", "export", {"email": EMAIL})
    first = await run_task(make_worker(), task)
    # the ledger keeps the receipt whole: sent again, it is the same event
    kept = TaskReceipt.model_validate_json(first.model_dump_json())
    assert receipt_event_id(kept) == receipt_event_id(first) == str(first.receipt_id)
    # another run of the same attempt (which the ledger prevents) would be another event: the id
    # owes nothing to the task's id and attempt, which anyone who saw the task knows
    second = await run_task(make_worker(), task)
    assert first.receipt_id is not None and second.receipt_id is not None
    assert receipt_event_id(second) != receipt_event_id(first)
    assert first.receipt_id.version == 4
    # a receipt an older SDK put in a ledger, without one: one id per (task, attempt), as it was
    legacy = first.model_copy(update={"receipt_id": None})
    later = legacy.model_copy(update={"completed_at": datetime(2030, 1, 1, tzinfo=UTC)})
    assert receipt_event_id(legacy) == receipt_event_id(later)


async def test_tasks_of_one_case_run_in_order_others_concurrently() -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics

    log: list[str] = []
    w = Worker(declaration(Action.erase))

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        log.append(f"start {ctx.task.attempt} {ctx.task.case_id}")
        await asyncio.sleep(0.05)
        log.append(f"end {ctx.task.attempt} {ctx.task.case_id}")
        return Result.succeeded()

    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    a1 = make_task("shop", "erase", {"email": EMAIL})
    a2 = a1.model_copy(update={"attempt": 2})
    b1 = make_task("shop", "erase", {"email": "an@example.vn"})
    batch = {tp: [record(topic, i, *codec.encode(t, source="test")) for i, t in enumerate((a1, b1, a2))]}
    runner, _, _ = runner_with(w, [batch], FakeProducer())
    await runner._loop()
    a, b = a1.case_id, b1.case_id
    assert log.index(f"end 1 {a}") < log.index(f"start 2 {a}")  # same case: in order
    assert log.index(f"start 1 {b}") < log.index(f"end 1 {a}")  # other case: alongside


async def test_a_batch_coming_round_again_resends_its_receipts_without_rerunning_handlers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An erasure that ran, then failed to deliver its receipt, must not be re-run: the re-run
    would find nothing left and report not_found for data it had just erased."""
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.worker import _runner

    monkeypatch.setattr(_runner, "BACKOFF_MAX_S", 0.0)
    calls: list[str] = []
    task = make_task("shop", "erase", {"email": EMAIL})
    held = {task.identifiers[IdentifierType.email]}
    w = Worker(declaration(Action.erase))

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        calls.append("erase")
        if ctx.identifiers[IdentifierType.email] not in held:
            return Result.not_found()
        held.discard(ctx.identifiers[IdentifierType.email])
        return Result.succeeded(counts={"erased": 1})

    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    batch = {tp: [record(topic, 5, *codec.encode(task, source="test"))]}
    producer = FakeProducer(fail_first=1)
    runner, consumer, _ = runner_with(w, [batch, batch], producer)
    await runner._loop()

    assert calls == ["erase"]
    assert consumer.commits == [{tp: 6}]
    [delivered] = [codec.decode(v, h, TaskReceipt).data for t, _, v, h in producer.sent if t == topics.RECEIPTS]
    assert delivered.status == ReceiptStatus.succeeded and delivered.counts == {"erased": 1}


# -- the task ledger, receipts too large, partitions handed back (broker faked) ----------------------


def erase_counting(calls: list[str], *, big_for: str | None = None, **options: Any) -> Worker:
    """Erases one record; the receipt of ``big_for``'s task has 5,000 counts more (about 80 kB)."""
    w = Worker(declaration(Action.erase), **options)

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        calls.append(str(ctx.task.task_id))
        many = 5_000 if ctx.identifiers.get(IdentifierType.email) == big_for else 0
        return Result.succeeded(counts={"erased": 1, **{f"part_{i:07d}": 1 for i in range(many)}})

    return w


def sent_receipts(producer: FakeProducer) -> list[TaskReceipt]:
    from dsrflow import codec, topics

    return [codec.decode(v, h, TaskReceipt).data for t, _, v, h in producer.sent if t == topics.RECEIPTS]


async def test_a_task_delivered_again_to_another_instance_sends_the_ledger_receipt_without_running() -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.worker import MemoryTaskLedger

    ledger = MemoryTaskLedger()  # shared, as a PostgreSQL ledger is by the instances of a group
    calls: list[str] = []
    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    task = make_task("shop", "erase", {"email": EMAIL})
    batch = {tp: [record(topic, 5, *codec.encode(task, source="test"))]}
    first, second = FakeProducer(), FakeProducer()
    runner, _, _ = runner_with(erase_counting(calls, ledger=ledger), [batch], first)
    await runner._loop()
    # The first instance died before its commit; the second gets the record again.
    runner, consumer, _ = runner_with(erase_counting(calls, ledger=ledger), [batch], second)
    await runner._loop()
    assert calls == [str(task.task_id)]
    assert sent_receipts(second) == sent_receipts(first) and sent_receipts(first)[0].counts == {"erased": 1}
    assert consumer.commits == [{tp: 6}]


class RefusingProducer(FakeProducer):
    """A broker that takes records up to ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    async def send(
        self, topic: str, value: bytes | None, *, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        if len(value or b"") <= self.limit:
            return await super().send(topic, value, key=key, headers=headers)
        from aiokafka.errors import MessageSizeTooLargeError

        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_exception(MessageSizeTooLargeError())
        self.events.append(f"refused {topic}")
        return fut


@pytest.mark.parametrize("limit", ["worker", "broker"])
async def test_a_receipt_too_large_goes_as_failed_and_the_batch_is_committed(limit: str) -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics

    calls: list[str] = []
    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    big, small = make_task("shop", "erase", {"email": EMAIL}), make_task("shop", "erase", {"email": "an@example.vn"})
    batch = {tp: [record(topic, 0, *codec.encode(big, source="test")),
                  record(topic, 1, *codec.encode(small, source="test"))]}
    if limit == "worker":  # over max_receipt_bytes before it is sent
        producer, options = FakeProducer(), {"max_receipt_bytes": 50_000}
    else:  # under it, but the broker refuses it
        producer, options = RefusingProducer(50_000), {}
    w = erase_counting(calls, big_for=EMAIL.lower(), **options)
    runner, consumer, _ = runner_with(w, [batch], producer)
    await runner._loop()

    assert len(calls) == 2 and consumer.commits == [{tp: 2}]
    receipts = {r.task_id: r for r in sent_receipts(producer)}
    failed = receipts[big.task_id]
    assert failed.status == ReceiptStatus.failed and not failed.retryable and failed.counts == {}
    assert failed.error is not None and failed.error.startswith("receipt not sent: ")
    assert "succeeded result" in failed.error
    assert ("too large" if limit == "worker" else "MessageSizeTooLargeError") in failed.error
    assert receipts[small.task_id].status == ReceiptStatus.succeeded


async def test_a_partition_handed_back_in_a_rebalance_is_neither_answered_nor_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch cannot finish before the rebalance goes on: its revoked partition is handed back;
    the task running there finishes into the ledger, the one not started is left to the new owner."""
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.worker import MemoryTaskLedger, _runner

    monkeypatch.setattr(_runner, "REVOKE_WAIT_S", 0.05)
    ledger = MemoryTaskLedger()
    release = asyncio.Event()
    calls: list[str] = []
    w = Worker(declaration(Action.erase), concurrency=1, ledger=ledger)

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        calls.append(str(ctx.task.task_id))
        await release.wait()
        return Result.succeeded(counts={"erased": 1})

    topic = topics.tasks_topic("shop")
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    running, waiting = make_task("shop", "erase", {"email": EMAIL}), make_task("shop", "erase", {"email": "an@x.vn"})
    from aiokafka.structs import ConsumerRecord

    r0 = record(topic, 7, *codec.encode(running, source="test"))
    value, headers = codec.encode(waiting, source="test")
    r1 = ConsumerRecord(topic, 1, 3, 0, 0, b"k", value, None, 1, len(value), headers)
    producer = FakeProducer()
    runner, consumer, _ = runner_with(w, [{tp0: [r0], tp1: [r1]}], producer)
    loop = asyncio.create_task(runner._loop())
    while not calls:
        await asyncio.sleep(0.01)
    await runner.revoked({tp1})  # the group rebalances: tp1 goes elsewhere
    release.set()
    await loop

    assert calls == [str(running.task_id)]  # the task of tp1 was not started here
    assert [r.task_id for r in sent_receipts(producer)] == [running.task_id]
    assert consumer.commits == [{tp0: 8}]
    done = await ledger.claim(running, owner="new owner", lease=timedelta(minutes=1))
    assert done.state == "done" and done.receipt is not None and done.receipt.counts == {"erased": 1}


async def test_a_dead_letter_too_large_to_copy_goes_without_the_original_and_the_batch_goes_on() -> None:
    from aiokafka import TopicPartition
    from aiokafka.errors import MessageSizeTooLargeError

    from dsrflow import topics
    from dsrflow.codec import read_dead_letter

    class RefusesBigLetters(FakeProducer):
        async def send(self, topic: str, value: bytes | None, *, key: bytes | None,
                       headers: list[tuple[str, bytes]]) -> asyncio.Future[None]:
            if topic == topics.DEADLETTER and value:  # the client's own size check, before sending
                raise MessageSizeTooLargeError()
            return await super().send(topic, value, key=key, headers=headers)

    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    producer = RefusesBigLetters()
    runner, consumer, _ = runner_with(make_worker(), [{tp: [record(topic, 5, b"{not json" * 1000, [])]}], producer)
    await runner._loop()
    [(_, key, value, headers)] = [s for s in producer.sent if s[0] == topics.DEADLETTER]
    assert key == b"k" and not value
    letter = read_dead_letter(headers)
    assert (letter.original_topic, letter.original_offset) == (topic, 5)
    assert "not copied: MessageSizeTooLargeError" in letter.error
    assert consumer.commits == [{tp: 6}]  # nothing stuck behind it


# -- errors told apart, progress, rate and concurrency, shutdown, review fixes (issue 8) ---------------


async def test_permanent_error_is_failed_and_not_retryable() -> None:
    from dsrflow.worker import PermanentError

    receipt = await run_task(failing_worker(PermanentError("table orders_2019 is read-only")),
                             make_task("shop", "erase", {"email": EMAIL}))
    assert receipt.status == ReceiptStatus.failed and not receipt.retryable
    assert receipt.error == "PermanentError: table orders_2019 is read-only"
    assert issubclass(PermanentError, TaskError) and not PermanentError.retryable and RetryableError.retryable


def progressing_worker(steps: Any, **options: Any) -> Worker:
    """Its erase handler runs ``await steps(ctx)`` and succeeds."""
    w = Worker(declaration(Action.erase), **options)

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        await steps(ctx)
        return Result.succeeded(counts={"erased": 3})

    return w


async def test_progress_is_throttled_numbered_redacted_and_never_sent_after_the_handler_returned() -> None:
    from dsrflow.events import TaskProgress

    async def steps(ctx: TaskContext) -> None:
        await ctx.progress(0, 3, note=f"looking up {EMAIL.lower()}")  # sent at once
        await ctx.progress(1, 3)  # within the interval: only changes the next report...
        await ctx.progress(2, 3, note="orders")  # ...which says this, at the end of the interval
        await asyncio.sleep(0.5)
        await ctx.progress(3, 3, note="invoices")  # the interval is over: sent at once
        await ctx.progress(3, 3, note="done")  # within it again: the handler returns before it ends

    reports: list[TaskProgress] = []
    task = make_task("shop", "erase", {"email": EMAIL})
    receipt = await run_task(progressing_worker(steps, progress_interval=timedelta(milliseconds=200)), task,
                             progress=reports)
    await asyncio.sleep(0.4)  # long enough for a report that was still due to show up
    assert receipt.status == ReceiptStatus.succeeded
    assert [(p.seq, p.done, p.total, p.note) for p in reports] == [
        (1, 0, 3, "looking up [redacted]"), (2, 2, 3, "orders"), (3, 3, 3, "invoices")]
    assert {(p.task_id, p.case_id, p.system, p.attempt) for p in reports} == {
        (task.task_id, task.case_id, "shop", 1)}


async def test_progress_that_cannot_be_sent_never_fails_the_task(caplog: pytest.LogCaptureFixture) -> None:
    from dsrflow.events import TaskProgress

    async def steps(ctx: TaskContext) -> None:
        await ctx.progress(1, 3, note=f"erasing {EMAIL}")
        await ctx.progress(-1)  # out of range: dropped, not raised

    async def broken(report: TaskProgress) -> None:
        raise ConnectionError(f"broker gone while sending {report.note}")

    task = make_task("shop", "erase", {"email": EMAIL})
    w = progressing_worker(steps, progress_interval=timedelta(0))
    with caplog.at_level("WARNING", logger="dsrflow.worker"):
        receipt = await w.handle(task, store=MemoryExportStore(), progress=broken)
    assert receipt.status == ReceiptStatus.succeeded and receipt.counts == {"erased": 3}
    lines = [r.getMessage() for r in caplog.records if "progress" in r.getMessage()]
    assert len(lines) == 2 and "(ConnectionError)" in lines[0] and "(ValidationError)" in lines[1]
    assert not any("broker gone" in line or "lan.nguyen" in line.lower() for line in lines)


class ProgressRefusingProducer(FakeProducer):
    """Takes receipts; every progress report fails at the broker."""

    async def send(
        self, topic: str, value: bytes | None, *, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        if dict(headers).get("ce_type") != b"dsrflow.task.progress.v1":
            return await super().send(topic, value, key=key, headers=headers)
        from aiokafka.errors import KafkaTimeoutError

        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_exception(KafkaTimeoutError())
        self.events.append("progress refused")
        return fut


async def test_the_runner_sends_progress_before_the_receipt_and_a_refused_one_fails_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.codec import header_map
    from dsrflow.events import TaskProgress

    async def steps(ctx: TaskContext) -> None:
        await ctx.progress(1, 2)
        await ctx.progress(2, 2)

    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    task = make_task("shop", "erase", {"email": EMAIL})
    batch = {tp: [record(topic, 3, *codec.encode(task, source="test"))]}
    producer = FakeProducer()
    runner, consumer, _ = runner_with(progressing_worker(steps, progress_interval=timedelta(0)), [batch], producer)
    await runner._loop()
    assert producer.events == ["delivered dsr.receipts.v1"] * 3 + ["commit"]
    progress = [codec.decode(v, h, TaskProgress) for _, _, v, h in producer.sent[:2]]
    assert [p.data.seq for p in progress] == [1, 2]
    assert {k for _, k, _, _ in producer.sent} == {str(task.case_id).encode()}
    ids = [header_map(h)["ce_id"] for _, _, _, h in producer.sent]
    assert len(set(ids)) == 3  # each report an event of its own, and not the receipt's id
    assert {p.source for p in progress} == {"dsrflow/worker/shop"}

    refusing = ProgressRefusingProducer()
    runner, consumer, _ = runner_with(progressing_worker(steps, progress_interval=timedelta(0)), [batch], refusing)
    with caplog.at_level("WARNING", logger="dsrflow.worker"):
        await runner._loop()
    assert refusing.events == ["progress refused", "progress refused", "delivered dsr.receipts.v1", "commit"]
    assert sent_receipts(refusing)[0].status == ReceiptStatus.succeeded and consumer.commits == [{tp: 4}]
    assert sum("not delivered (KafkaTimeoutError)" in r.getMessage() for r in caplog.records) == 2


def many_tasks(n: int) -> tuple[Any, dict[Any, list[Any]], list[Any]]:
    """n erasures of n cases in one batch of partition 0."""
    from aiokafka import TopicPartition

    from dsrflow import codec, topics

    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    tasks = [make_task("shop", "erase", {"email": f"s{i}@example.vn"}) for i in range(n)]
    return tp, {tp: [record(topic, i, *codec.encode(t, source="test")) for i, t in enumerate(tasks)]}, tasks


def busiest_second(times: list[float]) -> int:
    return max(sum(t <= u < t + 1.0 for u in times) for t in times)


@pytest.mark.parametrize("batched", [False, True])
async def test_the_rate_limit_holds_for_handler_calls_and_batch_calls(batched: bool) -> None:
    """10 tasks a second: the first 10 at once (the limiter's burst), then 10 a second: 30 tasks
    take about two seconds. Without the limit all 30 start in the same instant."""
    loop = asyncio.get_running_loop()
    started: list[float] = []
    w = Worker(declaration(Action.erase), rate_limit=10, max_batch=5)
    if batched:
        @w.batch_handler(Action.erase)
        async def erase_all(ctxs: list[TaskContext]) -> list[Result]:
            started.extend(loop.time() for _ in ctxs)
            return [Result.succeeded() for _ in ctxs]
    else:
        @w.handler(Action.erase)
        async def erase(ctx: TaskContext) -> Result:
            started.append(loop.time())
            return Result.succeeded()

    tp, batch, tasks = many_tasks(30)
    producer = FakeProducer()
    runner, consumer, _ = runner_with(w, [batch], producer)
    await asyncio.wait_for(runner._loop(), 30)
    assert len(started) == 30 and len(sent_receipts(producer)) == 30 and consumer.commits == [{tp: 30}]
    assert max(started) - min(started) >= 1.2  # ideally 2.0
    assert busiest_second(started) <= 22  # ideally 20: the burst of 10 and 10 more


async def test_concurrency_bounds_the_handler_calls_running_at_once() -> None:
    running, most = 0, 0
    w = Worker(declaration(Action.erase), concurrency=3)

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.02)
        running -= 1
        return Result.succeeded()

    _, batch, _ = many_tasks(12)
    producer = FakeProducer()
    runner, _, _ = runner_with(w, [batch], producer)
    await runner._loop()
    assert most == 3 and len(sent_receipts(producer)) == 12


async def test_the_receipt_of_a_record_no_longer_in_hand_is_forgotten(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch ran, its ledger was unreachable, and before it came round again its partition went
    to another instance: the next batch holds other records. The receipt settled for the first
    is dropped then (with a warning: the ledger never recorded it), not kept for good."""
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.worker import MemoryTaskLedger, _runner

    monkeypatch.setattr(_runner, "BACKOFF_MAX_S", 0.0)

    class Unreachable(MemoryTaskLedger):
        async def finish(self, task: Any, receipt: TaskReceipt, *, owner: str) -> TaskReceipt:
            if task.task_id == moved.task_id:
                raise ConnectionRefusedError()
            return await super().finish(task, receipt, owner=owner)

    topic = topics.tasks_topic("shop")
    moved, kept = make_task("shop", "erase", {"email": EMAIL}), make_task("shop", "erase", {"email": "an@x.vn"})
    seen: list[bool] = []
    w = Worker(declaration(Action.erase), ledger=Unreachable())

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        seen.append((moved.task_id, 1) in runner._settled)
        return Result.succeeded()

    from aiokafka.structs import ConsumerRecord

    value, headers = codec.encode(kept, source="test")
    other = ConsumerRecord(topic, 1, 0, 0, 0, b"k", value, None, 1, len(value), headers)
    runner, consumer, _ = runner_with(w, [{TopicPartition(topic, 0): [record(topic, 0, *codec.encode(
        moved, source="test"))]}, {TopicPartition(topic, 1): [other]}], FakeProducer())
    with caplog.at_level("WARNING", logger="dsrflow.worker"):
        await runner._loop()
    assert seen == [False, False]  # the first run; then the second batch's, without the stale entry
    assert runner._settled == {} and runner._unrecorded == set()
    assert consumer.commits == [{TopicPartition(topic, 1): 1}]
    assert any(f"task {moved.task_id} attempt 1: its receipt was never recorded" in r.getMessage()
               for r in caplog.records)


class RefusingLedger:
    """A memory ledger whose finish raises ``exc`` the first ``times`` times."""

    def __new__(cls, exc: type[Exception], times: int) -> Any:
        from dsrflow.worker import MemoryTaskLedger

        class Refusing(MemoryTaskLedger):
            refused = 0

            async def finish(self, task: Any, receipt: TaskReceipt, *, owner: str) -> TaskReceipt:
                if self.refused < times:
                    self.refused += 1
                    raise exc("value too long for type character varying(10)")
                return await super().finish(task, receipt, owner=owner)

        return Refusing()


async def test_a_receipt_the_ledger_refuses_for_good_is_sent_after_five_refusals(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.worker import _runner

    monkeypatch.setattr(_runner, "BACKOFF_MAX_S", 0.0)
    calls: list[str] = []
    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    task = make_task("shop", "erase", {"email": EMAIL})
    batch = {tp: [record(topic, 5, *codec.encode(task, source="test"))]}
    ledger = RefusingLedger(ValueError, times=1000)
    producer = FakeProducer()
    # Exactly five rounds: the fifth refusal sends the receipt and the batch is committed.
    runner, consumer, _ = runner_with(erase_counting(calls, ledger=ledger), [batch] * 5, producer)
    with caplog.at_level("ERROR", logger="dsrflow.worker"):
        await asyncio.wait_for(runner._loop(), 10)
    assert calls == [str(task.task_id)] and ledger.refused == 5
    [receipt] = sent_receipts(producer)
    assert receipt.status == ReceiptStatus.succeeded and receipt.counts == {"erased": 1}
    assert consumer.commits == [{tp: 6}] and len(consumer.seeks) == 4
    assert any("ledger did not record it" in r.getMessage() and "(ValueError)" in r.getMessage()
               for r in caplog.records)
    assert not any("varying" in r.getMessage() for r in caplog.records)


async def test_a_ledger_that_is_only_unreachable_is_waited_for_however_long(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.worker import _runner

    monkeypatch.setattr(_runner, "BACKOFF_MAX_S", 0.0)
    calls: list[str] = []
    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    task = make_task("shop", "erase", {"email": EMAIL})
    batch = {tp: [record(topic, 5, *codec.encode(task, source="test"))]}
    ledger = RefusingLedger(ConnectionRefusedError, times=7)  # transient: no count towards the five
    producer = FakeProducer()
    runner, consumer, _ = runner_with(erase_counting(calls, ledger=ledger), [batch] * 8, producer)
    with caplog.at_level("ERROR", logger="dsrflow.worker"):
        await asyncio.wait_for(runner._loop(), 10)
    assert calls == [str(task.task_id)] and consumer.commits == [{tp: 6}] and len(consumer.seeks) == 7
    assert len(sent_receipts(producer)) == 1
    assert (await ledger.claim(task, owner="other", lease=timedelta(minutes=1))).state == "done"
    assert not any("did not record" in r.getMessage() for r in caplog.records)


async def test_a_dead_letter_the_broker_refuses_as_too_large_goes_again_without_the_original() -> None:
    from aiokafka import TopicPartition
    from aiokafka.errors import RecordTooLargeError

    from dsrflow import topics
    from dsrflow.codec import read_dead_letter

    class BrokerRefusesBigLetters(FakeProducer):
        async def send(self, topic: str, value: bytes | None, *, key: bytes | None,
                       headers: list[tuple[str, bytes]]) -> asyncio.Future[None]:
            if topic == topics.DEADLETTER and value:  # taken by the client, refused by the broker
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                fut.set_exception(RecordTooLargeError())
                self.events.append("refused dsr.deadletter.v1")
                return fut
            return await super().send(topic, value, key=key, headers=headers)

    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    producer = BrokerRefusesBigLetters()
    runner, consumer, _ = runner_with(make_worker(), [{tp: [record(topic, 5, b"{not json" * 1000, [])]}], producer)
    await asyncio.wait_for(runner._loop(), 10)
    assert producer.events == ["refused dsr.deadletter.v1", "delivered dsr.deadletter.v1", "commit"]
    [(_, key, value, headers)] = [s for s in producer.sent if s[0] == topics.DEADLETTER]
    assert key == b"k" and not value
    letter = read_dead_letter(headers)
    assert (letter.original_topic, letter.original_offset, letter.error_type) == (topic, 5, "missing_header")
    assert "the original (9000 bytes) is not copied: RecordTooLargeError" in letter.error
    assert consumer.commits == [{tp: 6}] and consumer.seeks == []


def stoppable(release: asyncio.Event, started: list[str], cancelled: list[str], **options: Any) -> Worker:
    """Erases once ``release`` is set; a subject named ``quick...`` at once."""
    w = Worker(declaration(Action.erase), **options)

    @w.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        started.append(ctx.identifiers[IdentifierType.email])
        try:
            if not ctx.identifiers[IdentifierType.email].startswith("quick"):
                await release.wait()
        except asyncio.CancelledError:
            cancelled.append(ctx.identifiers[IdentifierType.email])
            raise
        return Result.succeeded(counts={"erased": 1})

    return w


async def stop_when(stop: asyncio.Event, started: list[str], n: int) -> None:
    while len(started) < n:
        await asyncio.sleep(0.01)
    stop.set()


async def test_on_stop_a_running_handler_within_the_grace_finishes_reports_and_is_committed() -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics

    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    slow, never = make_task("shop", "erase", {"email": EMAIL}), make_task("shop", "erase", {"email": "an@x.vn"})
    never = never.model_copy(update={"case_id": slow.case_id})  # the same case: it would run after the first
    release, started, cancelled = asyncio.Event(), [], []
    w = stoppable(release, started, cancelled, shutdown_grace=timedelta(seconds=10))
    batch = {tp: [record(topic, 7, *codec.encode(slow, source="test")),
                  record(topic, 8, *codec.encode(never, source="test"))]}
    producer = FakeProducer()
    runner, consumer, stop = runner_with(w, [batch], producer)
    loop = asyncio.create_task(runner._loop())
    await stop_when(stop, started, 1)
    await asyncio.sleep(0.1)
    release.set()  # well within the grace
    await asyncio.wait_for(loop, 10)
    assert started == [EMAIL.lower()] and cancelled == []  # the second was not started after the stop
    assert [r.task_id for r in sent_receipts(producer)] == [slow.task_id]
    assert consumer.commits == [{tp: 8}]  # up to the task not started: the next instance runs it


async def test_on_stop_a_handler_still_running_after_the_grace_is_cancelled_released_and_left_uncommitted() -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.worker import MemoryTaskLedger

    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    quick = make_task("shop", "erase", {"email": "quick@example.vn"})
    slow = make_task("shop", "erase", {"email": EMAIL})
    release, started, cancelled = asyncio.Event(), [], []
    ledger = MemoryTaskLedger()
    w = stoppable(release, started, cancelled, shutdown_grace=timedelta(milliseconds=200), ledger=ledger)
    batch = {tp: [record(topic, 7, *codec.encode(quick, source="test")),
                  record(topic, 8, *codec.encode(slow, source="test"))]}
    producer = FakeProducer()
    runner, consumer, stop = runner_with(w, [batch], producer)
    loop = asyncio.create_task(runner._loop())
    await stop_when(stop, started, 2)
    await asyncio.wait_for(loop, 10)
    assert cancelled == [EMAIL.lower()]
    assert [r.task_id for r in sent_receipts(producer)] == [quick.task_id]  # it finished: its receipt goes
    assert consumer.commits == [{tp: 8}]  # the cancelled one's record is not committed
    assert (await ledger.claim(slow, owner="next instance", lease=timedelta(minutes=1))).state == "owned"


# -- batch handlers in the runner (broker faked; tests/unit/test_worker_batch.py has them without it) -------


def batch_erasing(calls: list[list[str]], release: asyncio.Event | None = None, **options: Any) -> Worker:
    """Erases in one call per batch; ``calls`` gets the emails of each call."""
    w = Worker(SystemDeclaration(name="shop", identifier_types=(IdentifierType.email,), actions=(Action.erase,)),
               **options)

    @w.batch_handler(Action.erase)
    async def erase(ctxs: list[TaskContext]) -> list[Result]:
        calls.append([ctx.identifiers[IdentifierType.email] for ctx in ctxs])
        if release is not None:
            await release.wait()
        return [Result.succeeded(counts={"erased": 1}) for _ in ctxs]

    return w


async def test_the_runner_claims_each_task_of_a_batch_call_and_keeps_a_case_s_tasks_in_order() -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.worker import MemoryTaskLedger

    ledger = MemoryTaskLedger()
    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    emails = [f"s{i}@example.vn" for i in range(4)]
    tasks = [make_task("shop", "erase", {"email": e}) for e in emails]
    retry = tasks[0].model_copy(update={"attempt": 2})  # the same case as tasks[0]: a following call
    other = make_task("shop", "erase", {"email": "x@example.vn"}, controller="acme")  # refused before any call
    # tasks[1] ran already (another instance, before a crash): its stored receipt is sent, it is not called
    done = TaskReceipt(task_id=tasks[1].task_id, case_id=tasks[1].case_id, system="shop", attempt=1,
                       status=ReceiptStatus.not_found, completed_at=datetime.now(UTC))
    assert (await ledger.claim(tasks[1], owner="gone", lease=timedelta(minutes=1))).state == "owned"
    await ledger.finish(tasks[1], done, owner="gone")
    records = [record(topic, i, *codec.encode(t, source="test")) for i, t in enumerate([*tasks, retry, other])]
    calls: list[list[str]] = []
    producer = FakeProducer()
    runner, consumer, _ = runner_with(batch_erasing(calls, ledger=ledger), [{tp: records}], producer)
    await runner._loop()

    assert calls == [[emails[0], emails[2], emails[3]], [emails[0]]]
    receipts = {(r.task_id, r.attempt): r for r in sent_receipts(producer)}
    assert len(receipts) == 6 and consumer.commits == [{tp: 6}]
    assert receipts[(tasks[1].task_id, 1)] == done
    assert receipts[(retry.task_id, 2)].counts == {"erased": 1}
    assert receipts[(other.task_id, 1)].status == ReceiptStatus.refused
    for t in (tasks[0], tasks[2], tasks[3], retry):  # each recorded in the ledger on its own
        assert (await ledger.claim(t, owner="x", lease=timedelta(minutes=1))).state == "done"


async def test_a_batch_task_held_by_another_instance_waits_for_its_receipt() -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.worker import MemoryTaskLedger

    ledger = MemoryTaskLedger()
    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    held, free = make_task("shop", "erase", {"email": EMAIL}), make_task("shop", "erase", {"email": "an@x.vn"})
    assert (await ledger.claim(held, owner="other", lease=timedelta(minutes=1))).state == "owned"
    theirs = TaskReceipt(task_id=held.task_id, case_id=held.case_id, system="shop", attempt=1,
                         status=ReceiptStatus.succeeded, counts={"erased": 7}, completed_at=datetime.now(UTC))
    calls: list[list[str]] = []
    producer = FakeProducer()
    batch = {tp: [record(topic, 0, *codec.encode(held, source="test")),
                  record(topic, 1, *codec.encode(free, source="test"))]}
    runner, consumer, _ = runner_with(batch_erasing(calls, ledger=ledger), [batch], producer)
    loop = asyncio.create_task(runner._loop())
    while not calls:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    await ledger.finish(held, theirs, owner="other")  # the other instance finishes
    await asyncio.wait_for(loop, 10)
    assert calls == [["an@x.vn"]]
    assert {r.task_id: r for r in sent_receipts(producer)}[held.task_id] == theirs
    assert consumer.commits == [{tp: 2}]


async def test_a_batch_call_still_running_after_the_shutdown_grace_gives_up_every_claim() -> None:
    from aiokafka import TopicPartition

    from dsrflow import codec, topics
    from dsrflow.worker import MemoryTaskLedger

    ledger = MemoryTaskLedger()
    topic = topics.tasks_topic("shop")
    tp = TopicPartition(topic, 0)
    tasks = [make_task("shop", "erase", {"email": f"s{i}@example.vn"}) for i in range(3)]
    calls: list[list[str]] = []
    producer = FakeProducer()
    w = batch_erasing(calls, asyncio.Event(), ledger=ledger, shutdown_grace=timedelta(milliseconds=100))
    batch = {tp: [record(topic, i, *codec.encode(t, source="test")) for i, t in enumerate(tasks)]}
    runner, consumer, stop = runner_with(w, [batch], producer)
    loop = asyncio.create_task(runner._loop())
    while not calls:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(loop, 10)
    assert len(calls) == 1 and sent_receipts(producer) == [] and consumer.commits == []
    for t in tasks:
        assert (await ledger.claim(t, owner="next instance", lease=timedelta(minutes=1))).state == "owned"
