"""The worker: a system's declaration, its handlers and hooks, and how tasks become receipts."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import asyncpg
from aiolimiter import AsyncLimiter

from ..events import TaskAssigned, TaskReceipt
from ..exports.store import ExportStore, system_prefix
from ..registry import SystemDeclaration
from ..rights import Action
from ._context import ProgressSink, TaskContext, _Progress
from ._ledger import LedgerFactory, TaskLedger
from ._result import Result, TaskError

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger("dsrflow.worker")

Handler = Callable[[TaskContext], Awaitable[Result]]
#: ``async def fn(ctxs: list[TaskContext]) -> list[Result]``: one result per context, in order.
BatchHandler = Callable[[list[TaskContext]], Awaitable[list[Result]]]
Hook = Callable[["Settings"], Awaitable[None]]
H = TypeVar("H", bound=Handler)
B = TypeVar("B", bound=BatchHandler)
K = TypeVar("K", bound=Hook)

#: Exceptions that mean "try again later" even when the handler did not say so.
DEFAULT_RETRY_ON: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,  # includes a connection lost mid-query
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.LockNotAvailableError,
)

_ERROR_MAX = 2000  # TaskReceipt.error's limit
REDACTED = "[redacted]"
#: A receipt whose record would be larger is sent as ``failed`` without its details (brokers take
#: 1 MiB records by default; a receipt is normally a few kB).
DEFAULT_MAX_RECEIPT_BYTES = 900_000
#: How much longer than ``task_timeout`` a ledger claim lasts by default before another instance
#: may take it over (the holder must have died: its handler would have timed out by then).
LEASE_MARGIN = timedelta(minutes=1)


def _redact(text: str, *tasks: TaskAssigned) -> str:
    """Belt and braces: a handler's message should hold no personal data, but never let the
    tasks' own identifiers, nor the corrected values of a rectification, through even if it does.
    A batch handler's messages are redacted of the identifiers of every task of its call: a
    message about one task may name another subject of the call.

    All values go into one pattern, longest first, so a value inside another ("Lan" inside
    "Nguyễn Thị Lan") cannot leave the rest of the longer one behind."""
    variants: set[str] = set()
    for value in [v for task in tasks for v in (*task.identifiers.values(), *(task.changes or {}).values())]:
        if len(value) < 2:  # one character is no one's data, and replacing it would shred the message
            continue
        variants.add(value)
        digits = re.sub(r"\D", "", value)
        if len(digits) >= 8:  # a phone number may be echoed without its '+'
            variants.add(digits)
    if not variants:
        return text
    # Whole words only: "An" is a name to hide, but not the "an" in "cannot".
    pattern = "|".join(re.escape(v) for v in sorted(variants, key=len, reverse=True))
    return re.sub(rf"(?<!\w)(?:{pattern})(?!\w)", REDACTED, text, flags=re.IGNORECASE)


def _where(exc: BaseException) -> str:
    """Where an exception was raised (module:function:line): enough to find the bug, no data."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown location"
    f = frames[-1]
    module = f.filename.rsplit("/", 1)[-1]
    return f"{module}:{f.name}:{f.lineno}"


class Worker:
    """A dsrflow worker for one system.

    ::

        crm = Worker(SystemDeclaration(name="crm", identifier_types=("email",), actions=(Action.export,)))

        @crm.handler(Action.export)
        async def export(ctx: TaskContext) -> Result: ...

        await crm.run(settings)

    ``concurrency`` bounds the handler calls running at once (a batch handler's call is one),
    ``rate_limit`` the handler calls per second, counted in tasks (a batch call of n tasks waits
    until n tasks' worth of the rate is free), ``max_batch`` the records taken from
    Kafka per batch and the tasks given to one batch handler call, ``task_timeout`` one handler
    call, a batch handler's included (a timeout is reported as retryable). ``retry_on`` lists
    exceptions that are transient even when the handler raises them unwrapped.

    ``ledger`` is the task ledger that keeps a task redelivered to the group (after a crash, a
    rebalance, a restart) from running twice: a :class:`~dsrflow.worker.TaskLedger`, or a function
    of the settings that returns one, e.g. ``lambda s: PostgresTaskLedger(my_dsn(s))`` for the
    system's own database. By default it is a :class:`~dsrflow.worker.PostgresTaskLedger` in
    ``DSRFLOW_WORKER_LEDGER_DSN``, else in the case store (``settings.dsn``, the embedded stack's
    way). It is opened after the startup hooks. ``ledger_lease`` is how
    long a claim holds without a receipt before another instance may take it over (default
    ``task_timeout`` plus a minute; it must be longer than ``task_timeout``).
    ``max_receipt_bytes`` bounds a receipt's record: a larger one is sent as ``failed``.

    ``progress_interval`` is the least time between two progress reports of one task
    (:meth:`TaskContext.progress`). ``shutdown_grace`` is how long handlers still running when
    the worker is told to stop may take to finish (their receipts are sent and their records
    committed); those running longer are cancelled and their tasks left to the next instance.
    ``version`` is the worker's own version, announced with its declaration (``dsr.systems.v1``).
    """

    def __init__(
        self,
        system: SystemDeclaration,
        *,
        concurrency: int = 16,
        rate_limit: float | None = None,
        max_batch: int = 200,
        task_timeout: timedelta = timedelta(minutes=2),
        retry_on: tuple[type[BaseException], ...] = DEFAULT_RETRY_ON,
        ledger: TaskLedger | LedgerFactory | None = None,
        ledger_lease: timedelta | None = None,
        max_receipt_bytes: int = DEFAULT_MAX_RECEIPT_BYTES,
        progress_interval: timedelta = timedelta(seconds=10),
        shutdown_grace: timedelta = timedelta(seconds=30),
        version: str | None = None,
    ) -> None:
        if concurrency < 1 or max_batch < 1:
            raise ValueError("concurrency and max_batch must be >= 1")
        if rate_limit is not None and not rate_limit > 0:
            raise ValueError("rate_limit must be > 0 (handler calls per second), or None for no limit")
        if ledger_lease is not None and ledger_lease <= task_timeout:
            raise ValueError("ledger_lease must be longer than task_timeout")
        if max_receipt_bytes < 4096:
            raise ValueError("max_receipt_bytes must be at least 4096")
        if progress_interval < timedelta(0) or shutdown_grace < timedelta(0):
            raise ValueError("progress_interval and shutdown_grace must not be negative")
        self.system = system
        self.concurrency = concurrency
        self.rate_limit = rate_limit
        self.max_batch = max_batch
        self.task_timeout = task_timeout
        self.retry_on = retry_on
        self.ledger = ledger
        self.ledger_lease = ledger_lease or task_timeout + LEASE_MARGIN
        self.max_receipt_bytes = max_receipt_bytes
        self.progress_interval = progress_interval
        self.shutdown_grace = shutdown_grace
        if version is not None and not 0 < len(version) <= 64:
            raise ValueError("version is 1 to 64 characters")
        self.version = version
        self._handlers: dict[Action, Handler] = {}
        self._batch_handlers: dict[Action, BatchHandler] = {}
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._started = 0
        # An AsyncLimiter belongs to one event loop; a worker may be run in several (tests).
        self._limiter: tuple[asyncio.AbstractEventLoop, AsyncLimiter] | None = None

    def __repr__(self) -> str:
        return f"Worker({self.name!r})"

    @property
    def name(self) -> str:
        return self.system.name

    @property
    def started(self) -> bool:
        """True inside :meth:`lifespan` (startup hooks have run)."""
        return self._started > 0

    # -- registration ------------------------------------------------------
    def _registrable(self, action: Action) -> Action:
        action = Action(action)
        if not self.system.supports(action):
            raise ValueError(f"system {self.name!r} does not declare action {action!s}")
        if action in self._handlers or action in self._batch_handlers:
            raise ValueError(f"system {self.name!r} already has a handler for {action!s}")
        return action

    def handler(self, action: Action) -> Callable[[H], H]:
        """Register the handler of a declared action: ``async def fn(ctx: TaskContext) -> Result``."""
        action = self._registrable(action)

        def register(fn: H) -> H:
            self._handlers[action] = fn
            return fn

        return register

    def batch_handler(self, action: Action) -> Callable[[B], B]:
        """Register a handler that takes many tasks of a declared action in one call, for a system
        where one query for many subjects is much cheaper than one each::

            @crm.batch_handler(Action.erase)
            async def erase(ctxs: list[TaskContext]) -> list[Result]: ...

        It returns one Result per context, in the same order. A list of another length, or an
        exception, fails every task of the call (a :class:`TaskError`'s message goes into each
        receipt, redacted for each task; :class:`RetryableError`, ``retry_on`` and a timeout are
        retryable). The runner gives it up to ``max_batch`` tasks of one Kafka batch, never two
        of one case: a case's next task goes into a following call. ``task_timeout`` bounds the
        whole call. An action has a handler or a batch handler, not both."""
        action = self._registrable(action)

        def register(fn: B) -> B:
            self._batch_handlers[action] = fn
            return fn

        return register

    def batched(self, action: Action) -> bool:
        """True if ``action`` has a batch handler."""
        return action in self._batch_handlers

    def on_startup(self, fn: K) -> K:
        """Run ``await fn(settings)`` before consuming (open a pool, check the schema...)."""
        self._startup.append(fn)
        return fn

    def on_shutdown(self, fn: K) -> K:
        """Run ``await fn(settings)`` after consuming stops; shutdown hooks run in reverse order."""
        self._shutdown.append(fn)
        return fn

    def check(self) -> None:
        """Raise if a declared action has no handler: better at start than as refusals later."""
        missing = [str(a) for a in self.system.actions if a not in self._handlers and a not in self._batch_handlers]
        if missing:
            raise RuntimeError(f"system {self.name!r} declares {', '.join(missing)} without a handler")

    @asynccontextmanager
    async def lifespan(self, settings: Settings) -> AsyncIterator[Worker]:
        """Run the startup hooks, then the shutdown hooks on exit. Nested use runs them once."""
        self.check()
        if self._started:
            self._started += 1
            try:
                yield self
            finally:
                self._started -= 1
            return
        for hook in self._startup:
            await hook(settings)
        self._started = 1
        try:
            yield self
        finally:
            self._started = 0
            for hook in reversed(self._shutdown):
                try:
                    await hook(settings)
                except Exception as exc:  # noqa: BLE001 - one failing hook must not skip the others
                    log.error("system %s: shutdown hook %s failed: %s", self.name, hook.__name__, type(exc).__name__)

    # -- pace ----------------------------------------------------------------
    async def pace(self, tasks: int = 1) -> None:
        """Wait until ``rate_limit`` lets a handler call of ``tasks`` tasks start (at once without
        a limit). The Kafka runner and :mod:`dsrflow.testing.worker` call it before each handler
        call; :meth:`handle` and :meth:`handle_batch` do not, so that they run at once."""
        if self.rate_limit is None:
            return
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._limiter[0] is not loop:
            # Up to rate_limit calls in any second, or one per 1/rate_limit seconds below 1 a second.
            rate, period = (self.rate_limit, 1.0) if self.rate_limit >= 1 else (1.0, 1 / self.rate_limit)
            self._limiter = (loop, AsyncLimiter(rate, period))
        limiter = self._limiter[1]
        left: float = max(tasks, 1)
        while left > 0:  # a batch call of many tasks waits for every one of them, a capacity at a time
            chunk = min(left, limiter.max_rate)
            await limiter.acquire(chunk)
            left -= chunk

    # -- one task, or a batch of tasks ---------------------------------------
    def _admit(self, task: TaskAssigned, store: ExportStore, progress: ProgressSink | None,
               call: Sequence[TaskAssigned] = ()) -> TaskContext | Result:
        """The task's context, or the refusal it gets without reaching a handler. ``call``: every
        task of a batch handler's call, whose identifiers its progress notes are redacted of too."""
        everyone = (task, *call)
        if task.system != self.name:
            raise ValueError(f"task for system {task.system!r} given to worker {self.name!r}")
        action = task.action
        if not self.system.supports(action) or (action not in self._handlers and action not in self._batch_handlers):
            return Result.refused(f"system {self.name!r} does not support action {action!s}")
        ctx = TaskContext(
            task=task,
            system=self.system,
            store=store.scoped(system_prefix(self.name, self.system.controller)),  # its own part only
            log=logging.LoggerAdapter(
                log, {"task_id": str(task.task_id), "case_id": str(task.case_id), "system": self.name}
            ),
            _progress=_Progress(task, interval=self.progress_interval.total_seconds(),
                                redact=lambda text: _redact(text, *everyone), sink=progress),
        )
        if task.controller != self.system.controller:
            return Result.refused(f"task of controller {task.controller!r}; system {self.name!r} holds the data of "
                                  f"{self.system.controller!r}")
        if task.scope == "subject" and not ctx.identifiers:
            return Result.refused(f"task carries no identifier type that system {self.name!r} searches by")
        if (task.scope == "controller") != (action in (Action.export_all, Action.erase_all)):
            return Result.refused(f"a task about all of a controller's data is export_all or erase_all, not {action!s}")
        return ctx

    async def _call(self, ctx: TaskContext) -> Result:
        task = ctx.task
        action = task.action
        if action in self._batch_handlers:
            [result] = await self._call_batch(action, [ctx])
            return result
        handler = self._handlers[action]
        timeout = self.task_timeout.total_seconds()
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                result = await handler(ctx)
        except TimeoutError as exc:
            if deadline.expired():
                return Result.failed(f"{action!s} handler timed out after {timeout:g}s", retryable=True)
            return self._from_exception(exc, [task])[0]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a receipt
            return self._from_exception(exc, [task])[0]
        finally:
            _close_progress([ctx])
        if not isinstance(result, Result):
            return Result.failed(f"{action!s} handler returned {type(result).__name__}, not Result")
        return result

    async def _call_batch(self, action: Action, ctxs: list[TaskContext]) -> list[Result]:
        handler = self._batch_handlers[action]
        tasks = [ctx.task for ctx in ctxs]
        timeout = self.task_timeout.total_seconds()
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                results = await handler(list(ctxs))  # a copy: the handler may consume its list
        except TimeoutError as exc:
            if deadline.expired():
                return [Result.failed(f"{action!s} batch handler timed out after {timeout:g}s "
                                      f"({len(ctxs)} task(s) in the call)", retryable=True)] * len(ctxs)
            return self._from_exception(exc, tasks)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a receipt
            return self._from_exception(exc, tasks)
        finally:
            _close_progress(ctxs)
        if not isinstance(results, list) or len(results) != len(ctxs):
            got = f"{len(results)} results" if isinstance(results, list) else type(results).__name__
            log.error("system %s: %s batch handler returned %s for %d task(s)", self.name, action, got, len(ctxs))
            return [Result.failed(f"{action!s} batch handler returned {got} for {len(ctxs)} tasks")] * len(ctxs)
        checked: list[Result] = []
        for r in results:
            if not isinstance(r, Result):
                r = Result.failed(f"{action!s} batch handler returned {type(r).__name__}, not Result")
            elif r.reason:  # a reason may name another subject of the call
                r = dataclasses.replace(r, reason=_redact(r.reason, *tasks))
            checked.append(r)
        return checked

    def _from_exception(self, exc: Exception, tasks: list[TaskAssigned]) -> list[Result]:
        """The result of each task of a call that raised ``exc``."""
        name = type(exc).__name__
        if isinstance(exc, TaskError):
            return [Result.failed(f"{name}: {_redact(str(exc), *tasks)}", retryable=exc.retryable)] * len(tasks)
        where = _where(exc)
        # Only the class and location: the message of an unexpected error may hold personal data.
        first = tasks[0]
        log.error("system %s task %s%s: %s handler raised %s at %s", self.name, first.task_id,
                  f" and {len(tasks) - 1} more" if len(tasks) > 1 else "", first.action, name, where)
        if log.isEnabledFor(logging.DEBUG):  # frames and source lines, never the message or locals
            log.debug("traceback of %s:\n%s", name, "".join(traceback.format_tb(exc.__traceback__)))
        return [Result.failed(f"{name} at {where}", retryable=isinstance(exc, self.retry_on))] * len(tasks)

    async def handle(
        self, task: TaskAssigned, *, store: ExportStore, progress: ProgressSink | None = None
    ) -> TaskReceipt:
        """Run one task through its handler (its batch handler, alone, if the action has one) and
        build the receipt. Never raises for a handler's failure (cancellation excepted): every
        outcome is a receipt. The task's progress reports go to ``progress``."""
        t0 = time.perf_counter()
        admitted = self._admit(task, store, progress)
        result = admitted if isinstance(admitted, Result) else await self._call(admitted)
        return self._receipt(task, result, t0)

    async def handle_batch(
        self, tasks: list[TaskAssigned], *, store: ExportStore, progress: ProgressSink | None = None
    ) -> list[TaskReceipt]:
        """Run tasks of one batch-handled action through one call of its batch handler and build
        their receipts, in the order of ``tasks``. A task refused before any handler (another
        controller, no identifier the system searches by...) is not given to the call. Never
        raises for a handler's failure (cancellation excepted)."""
        if not tasks:
            return []
        action = tasks[0].action
        if any(task.action != action for task in tasks) or action not in self._batch_handlers:
            raise ValueError(f"handle_batch takes tasks of one action that has a batch handler, not {action!s}")
        t0 = time.perf_counter()
        refused: dict[int, Result] = {}
        admitted: list[TaskContext] = []
        for i, task in enumerate(tasks):
            outcome = self._admit(task, store, progress, tasks)
            if isinstance(outcome, Result):
                refused[i] = outcome
            else:
                admitted.append(outcome)
        called = iter(await self._call_batch(action, admitted) if admitted else [])
        results = [refused[i] if i in refused else next(called) for i in range(len(tasks))]
        return [self._receipt(task, result, t0) for task, result in zip(tasks, results, strict=True)]

    def _receipt(self, task: TaskAssigned, result: Result, t0: float) -> TaskReceipt:
        try:
            receipt = _receipt(task, result)
        except Exception as exc:  # noqa: BLE001 - e.g. an invalid category list from the handler
            receipt = _receipt(task, Result.failed(f"invalid result: {type(exc).__name__}"))
        log.info(
            "system %s task %s case %s action %s attempt %d: %s%s in %.0f ms",
            self.name,
            task.task_id,
            task.case_id,
            task.action,
            task.attempt,
            receipt.status,
            " (retryable)" if receipt.retryable else "",
            (time.perf_counter() - t0) * 1000,
        )
        return receipt

    # -- Kafka ---------------------------------------------------------------
    async def run(
        self,
        settings: Settings,
        *,
        stop: asyncio.Event | None = None,
        store: ExportStore | None = None,
    ) -> None:
        """Register the system, ensure its task topic, run the startup hooks, and consume tasks
        until ``stop`` is set (or SIGTERM/SIGINT when no ``stop`` is given).

        At-least-once: a batch's receipts are delivered before its offsets are committed; the task
        ledger keeps a task delivered again from running again (its first receipt is sent again).
        On stop, no task starts any more; running handlers get ``shutdown_grace`` to finish, then
        are cancelled and their tasks left, uncommitted, to the next instance.
        The export store defaults to ``LocalExportStore(settings.exports)``.
        """
        from ._runner import run_worker

        await run_worker(self, settings, stop=stop, store=store)


def _close_progress(ctxs: list[TaskContext]) -> None:
    """The handler returned: no progress report of its tasks goes after this."""
    for ctx in ctxs:
        if ctx._progress is not None:
            ctx._progress.close()


def _receipt(task: TaskAssigned, result: Result) -> TaskReceipt:
    error = _redact(result.reason, task)[:_ERROR_MAX] if result.reason else None
    return TaskReceipt(
        task_id=task.task_id,
        case_id=task.case_id,
        system=task.system,
        attempt=task.attempt,
        status=result.status,
        retryable=result.retryable,
        counts=dict(result.counts),
        categories=list(result.categories),
        retained=list(result.retained_items),
        artifacts=list(result.artifacts),
        error=error,
        completed_at=datetime.now(UTC),
        receipt_id=uuid.uuid4(),
    )
