"""Batch handlers without Kafka: one call for many tasks, results in order, failures of the call
given to each of its tasks, a case's tasks in successive calls, refusals kept out of the call."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from dsrflow.registry import SystemDeclaration
from dsrflow.rights import Action, IdentifierType, ReceiptStatus
from dsrflow.testing.worker import make_task, run_task, run_tasks
from dsrflow.worker import PermanentError, Result, RetryableError, TaskContext, TaskError, Worker

EMAILS = [f"subject{i}@example.vn" for i in range(5)]


def declaration() -> SystemDeclaration:
    return SystemDeclaration(name="crm", identifier_types=(IdentifierType.email,),
                             actions=(Action.erase, Action.export))


def batch_worker(calls: list[list[str]], **options: object) -> Worker:
    """Erases in one call; exports one by one. ``calls`` gets the emails of each erase call."""
    w = Worker(declaration(), **options)  # type: ignore[arg-type]

    @w.batch_handler(Action.erase)
    async def erase(ctxs: list[TaskContext]) -> list[Result]:
        calls.append([ctx.identifiers[IdentifierType.email] for ctx in ctxs])
        return [Result.succeeded(counts={"erased": i + 1}) for i, _ in enumerate(ctxs)]

    @w.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        return Result.not_found()

    return w


def failing_worker(raise_: BaseException | None = None, *, returns: object = None, **options: object) -> Worker:
    w = Worker(declaration(), **options)  # type: ignore[arg-type]

    @w.batch_handler(Action.erase)
    async def erase(ctxs: list[TaskContext]) -> list[Result]:
        if raise_ is not None:
            raise raise_
        return returns  # type: ignore[return-value]

    @w.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        return Result.not_found()

    return w


async def test_a_batch_handler_gets_the_tasks_in_one_call_and_its_results_go_to_them_in_order() -> None:
    calls: list[list[str]] = []
    tasks = [make_task("crm", Action.erase, {"email": e}) for e in EMAILS]
    receipts = await run_tasks(batch_worker(calls), tasks)
    assert calls == [EMAILS]
    assert [r.task_id for r in receipts] == [t.task_id for t in tasks]
    assert [r.counts for r in receipts] == [{"erased": i + 1} for i in range(5)]
    assert all(r.status == ReceiptStatus.succeeded for r in receipts)


async def test_a_case_s_second_task_goes_into_a_following_call_and_max_batch_splits_calls() -> None:
    calls: list[list[str]] = []
    first = [make_task("crm", Action.erase, {"email": e}) for e in EMAILS]
    again = first[1].model_copy(update={"attempt": 2})  # the same case: must not share a call with attempt 1
    export = make_task("crm", Action.export, {"email": EMAILS[0]})
    receipts = await run_tasks(batch_worker(calls, max_batch=3), [*first, again, export])
    assert calls == [EMAILS[:3], EMAILS[3:], [EMAILS[1]]]
    assert [r.status for r in receipts] == [ReceiptStatus.succeeded] * 6 + [ReceiptStatus.not_found]
    assert receipts[5].attempt == 2


async def test_run_task_gives_a_batch_handled_task_to_the_batch_handler_alone() -> None:
    calls: list[list[str]] = []
    receipt = await run_task(batch_worker(calls), make_task("crm", Action.erase, {"email": EMAILS[0]}))
    assert calls == [[EMAILS[0]]] and receipt.counts == {"erased": 1}


async def test_a_wrong_number_of_results_fails_every_task_of_the_call() -> None:
    tasks = [make_task("crm", Action.erase, {"email": e}) for e in EMAILS[:3]]
    returns = [Result.succeeded(), Result.succeeded()]
    receipts = await run_tasks(failing_worker(returns=returns), tasks)
    assert [r.status for r in receipts] == [ReceiptStatus.failed] * 3
    assert not any(r.retryable for r in receipts)
    assert receipts[0].error == "erase batch handler returned 2 results for 3 tasks"
    garbage = await run_tasks(failing_worker(returns="done"), tasks)
    assert {r.error for r in garbage} == {"erase batch handler returned str for 3 tasks"}


async def test_a_result_that_is_not_a_result_fails_only_its_task() -> None:
    tasks = [make_task("crm", Action.erase, {"email": e}) for e in EMAILS[:2]]
    receipts = await run_tasks(failing_worker(returns=[Result.succeeded(), None]), tasks)
    assert [r.status for r in receipts] == [ReceiptStatus.succeeded, ReceiptStatus.failed]
    assert receipts[1].error == "erase batch handler returned NoneType, not Result"


async def test_a_task_error_of_the_call_goes_to_each_task_redacted_of_every_subject_of_the_call() -> None:
    tasks = [make_task("crm", Action.erase, {"email": e}) for e in EMAILS[:3]]
    receipts = await run_tasks(failing_worker(TaskError(f"locked rows of {EMAILS[0]} and {EMAILS[2]}")), tasks)
    assert {r.error for r in receipts} == {"TaskError: locked rows of [redacted] and [redacted]"}
    assert not any(r.retryable for r in receipts)
    permanent = await run_tasks(failing_worker(PermanentError("schema v2 expected")), tasks)
    assert {(r.status, r.retryable, r.error) for r in permanent} == {
        (ReceiptStatus.failed, False, "PermanentError: schema v2 expected")}


async def test_a_result_reason_naming_another_subject_of_the_call_is_redacted() -> None:
    tasks = [make_task("crm", Action.erase, {"email": e}) for e in EMAILS[:2]]
    returns = [Result.failed(f"merged into {EMAILS[1]}"), Result.succeeded()]
    receipts = await run_tasks(failing_worker(returns=returns), tasks)
    assert receipts[0].error == "merged into [redacted]"


@pytest.mark.parametrize(("exc", "retryable", "error"), [
    (RetryableError("database restarting"), True, "RetryableError: database restarting"),
    (ConnectionResetError("peer 10.0.0.7 reset for subject0@example.vn"), True, "ConnectionResetError at "),
    (KeyError("subject0@example.vn"), False, "KeyError at "),
])
async def test_an_exception_of_the_call_fails_every_task_retryable_as_a_single_handler_s_would_be(
    exc: BaseException, retryable: bool, error: str,
) -> None:
    tasks = [make_task("crm", Action.erase, {"email": e}) for e in EMAILS[:2]]
    receipts = await run_tasks(failing_worker(exc), tasks)
    for r in receipts:
        assert r.status == ReceiptStatus.failed and r.retryable is retryable
        assert r.error is not None and r.error.startswith(error)
        assert "10.0.0.7" not in r.error and "subject0" not in r.error  # class and location only


async def test_task_timeout_bounds_the_whole_call_and_is_retryable() -> None:
    w = Worker(declaration(), task_timeout=timedelta(milliseconds=100))

    @w.batch_handler(Action.erase)
    async def erase(ctxs: list[TaskContext]) -> list[Result]:
        await asyncio.sleep(10)
        return [Result.succeeded() for _ in ctxs]

    @w.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        return Result.not_found()

    tasks = [make_task("crm", Action.erase, {"email": e}) for e in EMAILS[:2]]
    receipts = await asyncio.wait_for(run_tasks(w, tasks), 5)
    assert {(r.status, r.retryable) for r in receipts} == {(ReceiptStatus.failed, True)}
    assert receipts[0].error == "erase batch handler timed out after 0.1s (2 task(s) in the call)"


async def test_tasks_refused_before_a_handler_are_not_given_to_the_call() -> None:
    calls: list[list[str]] = []
    ok = make_task("crm", Action.erase, {"email": EMAILS[0]})
    other_controller = make_task("crm", Action.erase, {"email": EMAILS[1]}, controller="acme")
    no_email = make_task("crm", Action.erase, {"phone": "+84901234567"})
    receipts = await run_tasks(batch_worker(calls), [ok, other_controller, no_email])
    assert calls == [[EMAILS[0]]]
    assert [r.status for r in receipts] == [ReceiptStatus.succeeded, ReceiptStatus.refused, ReceiptStatus.refused]


def test_an_action_has_a_handler_or_a_batch_handler_not_both() -> None:
    w = Worker(declaration())

    @w.batch_handler(Action.erase)
    async def erase(ctxs: list[TaskContext]) -> list[Result]:
        return []

    with pytest.raises(ValueError, match="already has a handler"):
        w.handler(Action.erase)
    with pytest.raises(ValueError, match="already has a handler"):
        w.batch_handler(Action.erase)
    with pytest.raises(RuntimeError, match="export without a handler"):
        w.check()

    @w.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        return Result.not_found()

    w.check()  # a batch handler counts
    other = Worker(declaration())
    other.handler(Action.export)(export)
    with pytest.raises(ValueError, match="already has a handler"):
        other.batch_handler(Action.export)


async def test_handle_batch_takes_tasks_of_one_batch_handled_action() -> None:
    from dsrflow.exports import MemoryExportStore

    w = batch_worker([])
    erase = make_task("crm", Action.erase, {"email": EMAILS[0]})
    export = make_task("crm", Action.export, {"email": EMAILS[0]})
    with pytest.raises(ValueError):
        await w.handle_batch([erase, export], store=MemoryExportStore())
    with pytest.raises(ValueError):
        await w.handle_batch([export], store=MemoryExportStore())
    assert await w.handle_batch([], store=MemoryExportStore()) == []


async def test_a_progress_note_in_a_batch_call_is_redacted_of_every_subject_of_the_call() -> None:
    from dsrflow.events import TaskProgress

    w = Worker(declaration(), progress_interval=timedelta(0))

    @w.batch_handler(Action.erase)
    async def erase(ctxs: list[TaskContext]) -> list[Result]:
        # a careless note about the second subject, sent through the first task's context
        await ctxs[0].progress(done=1, total=2, note=f"now at {ctxs[1].identifiers[IdentifierType.email]}")
        return [Result.succeeded() for _ in ctxs]

    @w.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        return Result.not_found()

    reports: list[TaskProgress] = []
    tasks = [make_task("crm", Action.erase, {"email": e}) for e in EMAILS[:2]]
    await run_tasks(w, tasks, progress=reports)
    assert [r.note for r in reports] == ["now at [redacted]"]
    assert reports[0].task_id == tasks[0].task_id
