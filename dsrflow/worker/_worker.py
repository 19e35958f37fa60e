"""The worker: a system's declaration, its handlers and hooks, and how one task becomes a receipt."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import asyncpg

from ..events import TaskAssigned, TaskReceipt
from ..exports.store import ExportStore
from ..registry import SystemDeclaration
from ..rights import Action
from ._context import TaskContext
from ._ledger import LedgerFactory, TaskLedger
from ._result import Result, TaskError

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger("dsrflow.worker")

Handler = Callable[[TaskContext], Awaitable[Result]]
Hook = Callable[["Settings"], Awaitable[None]]
H = TypeVar("H", bound=Handler)
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


def _redact(text: str, task: TaskAssigned) -> str:
    """Belt and braces: a handler's message should hold no personal data, but never let the
    task's own identifiers, nor the corrected values of a rectification, through even if it does.

    All values go into one pattern, longest first, so a value inside another ("Lan" inside
    "Nguyễn Thị Lan") cannot leave the rest of the longer one behind."""
    variants: set[str] = set()
    for value in [*task.identifiers.values(), *(task.changes or {}).values()]:
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

    ``concurrency`` bounds the handlers running at once, ``max_batch`` the records taken from Kafka
    per batch, ``task_timeout`` one handler call (a timeout is reported as retryable).
    ``retry_on`` lists exceptions that are transient even when the handler raises them unwrapped.

    ``ledger`` is the task ledger that keeps a task redelivered to the group (after a crash, a
    rebalance, a restart) from running twice: a :class:`~dsrflow.worker.TaskLedger`, or a function
    of the settings that returns one, e.g. ``lambda s: PostgresTaskLedger(my_dsn(s))`` for the
    system's own database. By default it is a :class:`~dsrflow.worker.PostgresTaskLedger` in the
    case store (``settings.dsn``). It is opened after the startup hooks. ``ledger_lease`` is how
    long a claim holds without a receipt before another instance may take it over (default
    ``task_timeout`` plus a minute; it must be longer than ``task_timeout``).
    ``max_receipt_bytes`` bounds a receipt's record: a larger one is sent as ``failed``.
    """

    def __init__(
        self,
        system: SystemDeclaration,
        *,
        concurrency: int = 16,
        max_batch: int = 200,
        task_timeout: timedelta = timedelta(minutes=2),
        retry_on: tuple[type[BaseException], ...] = DEFAULT_RETRY_ON,
        ledger: TaskLedger | LedgerFactory | None = None,
        ledger_lease: timedelta | None = None,
        max_receipt_bytes: int = DEFAULT_MAX_RECEIPT_BYTES,
    ) -> None:
        if concurrency < 1 or max_batch < 1:
            raise ValueError("concurrency and max_batch must be >= 1")
        if ledger_lease is not None and ledger_lease <= task_timeout:
            raise ValueError("ledger_lease must be longer than task_timeout")
        if max_receipt_bytes < 4096:
            raise ValueError("max_receipt_bytes must be at least 4096")
        self.system = system
        self.concurrency = concurrency
        self.max_batch = max_batch
        self.task_timeout = task_timeout
        self.retry_on = retry_on
        self.ledger = ledger
        self.ledger_lease = ledger_lease or task_timeout + LEASE_MARGIN
        self.max_receipt_bytes = max_receipt_bytes
        self._handlers: dict[Action, Handler] = {}
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._started = 0

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
    def handler(self, action: Action) -> Callable[[H], H]:
        """Register the handler of a declared action."""
        action = Action(action)
        if not self.system.supports(action):
            raise ValueError(f"system {self.name!r} does not declare action {action!s}")
        if action in self._handlers:
            raise ValueError(f"system {self.name!r} already has a handler for {action!s}")

        def register(fn: H) -> H:
            self._handlers[action] = fn
            return fn

        return register

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
        missing = [str(a) for a in self.system.actions if a not in self._handlers]
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

    # -- one task ------------------------------------------------------------
    async def _call(self, task: TaskAssigned, store: ExportStore) -> Result:
        action = task.action
        if not self.system.supports(action) or action not in self._handlers:
            return Result.refused(f"system {self.name!r} does not support action {action!s}")
        ctx = TaskContext(
            task=task,
            system=self.system,
            store=store,
            log=logging.LoggerAdapter(
                log, {"task_id": str(task.task_id), "case_id": str(task.case_id), "system": self.name}
            ),
        )
        if task.controller != self.system.controller:
            return Result.refused(f"task of controller {task.controller!r}; system {self.name!r} holds the data of "
                                  f"{self.system.controller!r}")
        if task.scope == "subject" and not ctx.identifiers:
            return Result.refused(f"task carries no identifier type that system {self.name!r} searches by")
        if (task.scope == "controller") != (action in (Action.export_all, Action.erase_all)):
            return Result.refused(f"a task about all of a controller's data is export_all or erase_all, not {action!s}")
        handler = self._handlers[action]
        timeout = self.task_timeout.total_seconds()
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                result = await handler(ctx)
        except TimeoutError as exc:
            if deadline.expired():
                return Result.failed(f"{action!s} handler timed out after {timeout:g}s", retryable=True)
            return self._from_exception(exc, task)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a receipt
            return self._from_exception(exc, task)
        if not isinstance(result, Result):
            return Result.failed(f"{action!s} handler returned {type(result).__name__}, not Result")
        return result

    def _from_exception(self, exc: Exception, task: TaskAssigned) -> Result:
        name = type(exc).__name__
        if isinstance(exc, TaskError):
            return Result.failed(f"{name}: {_redact(str(exc), task)}", retryable=exc.retryable)
        where = _where(exc)
        # Only the class and location: the message of an unexpected error may hold personal data.
        log.error("system %s task %s: %s handler raised %s at %s", self.name, task.task_id, task.action, name, where)
        if log.isEnabledFor(logging.DEBUG):  # frames and source lines, never the message or locals
            log.debug("traceback of %s:\n%s", name, "".join(traceback.format_tb(exc.__traceback__)))
        return Result.failed(f"{name} at {where}", retryable=isinstance(exc, self.retry_on))

    async def handle(self, task: TaskAssigned, *, store: ExportStore) -> TaskReceipt:
        """Run one task through its handler and build the receipt. Never raises for a handler's
        failure (cancellation excepted): every outcome is a receipt."""
        if task.system != self.name:
            raise ValueError(f"task for system {task.system!r} given to worker {self.name!r}")
        t0 = time.perf_counter()
        result = await self._call(task, store)
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
        The export store defaults to ``LocalExportStore(settings.exports)``.
        """
        from ._runner import run_worker

        await run_worker(self, settings, stop=stop, store=store)


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
    )
