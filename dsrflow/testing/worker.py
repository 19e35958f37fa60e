"""Test a worker's handlers without Kafka, the way dsrflow tests itself::

from dsrflow.testing.worker import make_task, run_task, run_tasks

async def test_export_finds_lan() -> None:
    receipt = await run_task(crm, make_task("crm", Action.export, {"email": "lan@example.vn"}))
    assert receipt.status == "succeeded"

async def test_a_long_erasure_reports_progress() -> None:
    reports: list[TaskProgress] = []
    await run_task(crm, make_task("crm", Action.erase, {"email": "lan@example.vn"}), progress=reports)
    assert reports[0].seq == 1  # the first goes at once, then at most one per worker.progress_interval

async def test_erasures_go_to_the_batch_handler_in_one_call() -> None:
    tasks = [make_task("crm", Action.erase, {"email": e}) for e in ("lan@example.vn", "an@example.vn")]
    receipts = await run_tasks(crm, tasks)  # in the order of tasks
    assert [r.status for r in receipts] == ["succeeded", "succeeded"]
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from uuid import UUID

from .. import identity
from ..codec import decode, encode
from ..events import TaskAssigned, TaskProgress, TaskReceipt
from ..exports.store import ExportStore, MemoryExportStore
from ..rights import ACTION_FOR_RIGHT, Action, IdentifierType, Right
from ..settings import Settings
from ..worker import ProgressSink, Worker

__all__ = ["make_task", "run_task", "run_tasks"]

E = TypeVar("E", TaskReceipt, TaskProgress)

# export -> access rather than portability: the first right listed for an action.
_RIGHT_FOR_ACTION: dict[Action, Right] = {}
for _right, _action in ACTION_FOR_RIGHT.items():
    _RIGHT_FOR_ACTION.setdefault(_action, _right)
_RIGHT_FOR_ACTION[Action.lift_restriction] = Right.restriction  # a command on the restriction's case
# a client company leaving: handing over all of its data, or deleting it
_RIGHT_FOR_ACTION[Action.export_all] = Right.portability
_RIGHT_FOR_ACTION[Action.erase_all] = Right.erasure
_WHOLE_CONTROLLER = frozenset({Action.export_all, Action.erase_all})


def make_task(
    system: str,
    action: Action | str,
    identifiers: Mapping[IdentifierType | str, str],
    *,
    right: Right | str | None = None,
    case_id: UUID | None = None,
    task_id: UUID | None = None,
    attempt: int = 1,
    due_at: datetime | None = None,
    changes: Mapping[str, str] | None = None,
    purposes: list[str] | None = None,
    region: str | None = identity.DEFAULT_REGION,
    controller: str = "default",
) -> TaskAssigned:
    """A TaskAssigned as the coordinator would send it: identifiers in the normal form of
    :mod:`dsrflow.identity` (email lower-cased, phone in E.164 with a local number read in
    ``region``, Vietnam by default), the right inferred from the action."""
    action = Action(action)
    whole = action in _WHOLE_CONTROLLER  # export_all, erase_all: no identifiers, all of the controller's data
    if not identifiers and not whole:
        raise ValueError("make_task needs at least one identifier")
    normalised = {} if whole else {  # a whole client company's task names nobody, as the coordinator sends it
        IdentifierType(k): identity.normalise(k, v, region=region) for k, v in identifiers.items()}
    return TaskAssigned(
        task_id=task_id or uuid.uuid4(),
        case_id=case_id or uuid.uuid4(),
        system=system,
        action=action,
        right=Right(right) if right is not None else _RIGHT_FOR_ACTION[action],
        attempt=attempt,
        identifiers=normalised,
        due_at=due_at or datetime.now(UTC) + timedelta(days=20),
        changes=dict(changes) if changes is not None else None,
        purposes=purposes,
        controller=controller,
        scope="controller" if whole else "subject",
    )


async def run_task(
    worker: Worker,
    task: TaskAssigned,
    *,
    store: ExportStore | None = None,
    settings: Settings | None = None,
    progress: list[TaskProgress] | None = None,
) -> TaskReceipt:
    """Run one task through the worker's handler (its batch handler, alone, if the action has one)
    and return the receipt it would publish.

    If the worker is not started, its startup hooks run before and its shutdown hooks after
    (given ``settings``, default ``Settings()``); to run many tasks against one started worker,
    wrap them in ``async with worker.lifespan(settings):``. Exports go to ``store`` (default: a
    fresh :class:`~dsrflow.exports.MemoryExportStore`). The receipt is encoded and decoded with
    the real codec, so what the test sees is what would go on the wire.

    The progress reports the handler's ``ctx.progress(...)`` calls would send are appended to
    ``progress`` when a list is given, as they would go on the wire: throttled to one per
    ``worker.progress_interval`` (give the worker ``progress_interval=timedelta(0)`` to see one
    per call), the note redacted, none after the handler returned.
    """
    store = store if store is not None else MemoryExportStore()
    sink = _collector(worker, progress)
    async with _started(worker, settings):
        receipt = await worker.handle(task, store=store, progress=sink)
    return _on_the_wire(worker, receipt, TaskReceipt)


async def run_tasks(
    worker: Worker,
    tasks: Sequence[TaskAssigned],
    *,
    store: ExportStore | None = None,
    settings: Settings | None = None,
    progress: list[TaskProgress] | None = None,
) -> list[TaskReceipt]:
    """Run tasks as the Kafka runner runs the tasks of one batch, and return their receipts in
    the order of ``tasks``.

    Tasks of one case run one after another, in the order given; the others alongside, up to the
    worker's ``concurrency`` calls at once and at its ``rate_limit``. It goes in rounds: the first
    task of each case, then the second of each, and so on. In a round, the tasks of an action
    with a batch handler go to it in calls of up to ``max_batch`` tasks (a case's second task, in
    the next round, goes into a following call, as in the runner); the others go to their handler
    one by one. There is no task ledger here: every task runs. ``store``, ``settings`` and
    ``progress`` are as for :func:`run_task`.
    """
    store = store if store is not None else MemoryExportStore()
    sink = _collector(worker, progress)
    rounds: list[list[int]] = []
    seen: dict[UUID, int] = {}
    for i, task in enumerate(tasks):
        n = seen[task.case_id] = seen.get(task.case_id, -1) + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(i)
    receipts: dict[int, TaskReceipt] = {}
    slots = asyncio.Semaphore(worker.concurrency)

    async def call(indexes: list[int]) -> None:
        async with slots:
            await worker.pace(len(indexes))
            batch = [tasks[i] for i in indexes]
            if worker.batched(batch[0].action):
                got = await worker.handle_batch(batch, store=store, progress=sink)
            else:
                got = [await worker.handle(batch[0], store=store, progress=sink)]
        receipts.update(zip(indexes, got, strict=True))

    async with _started(worker, settings):
        for indexes in rounds:
            calls: list[list[int]] = []
            batched: dict[Action, list[int]] = {}
            for i in indexes:
                if worker.batched(tasks[i].action):
                    batched.setdefault(tasks[i].action, []).append(i)
                else:
                    calls.append([i])
            for same in batched.values():
                calls += [same[k:k + worker.max_batch] for k in range(0, len(same), worker.max_batch)]
            await asyncio.gather(*(call(c) for c in calls))
    return [_on_the_wire(worker, receipts[i], TaskReceipt) for i in range(len(tasks))]


def _started(worker: Worker, settings: Settings | None) -> contextlib.AbstractAsyncContextManager[object]:
    """The worker's lifespan, unless it is started already (then its hooks do not run again)."""
    if worker.started:
        return contextlib.nullcontext()
    return worker.lifespan(settings if settings is not None else Settings())


def _collector(worker: Worker, progress: list[TaskProgress] | None) -> ProgressSink | None:
    if progress is None:
        return None
    reports = progress

    async def collect(report: TaskProgress) -> None:
        reports.append(_on_the_wire(worker, report, TaskProgress))

    return collect


def _on_the_wire(worker: Worker, event: E, model: type[E]) -> E:
    """The event as the coordinator would read it: encoded and decoded with the real codec."""
    value, headers = encode(event, source=f"dsrflow/worker/{worker.name}", subject=str(event.case_id))
    return decode(value, headers, model).data
