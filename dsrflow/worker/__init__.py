"""The worker SDK: run a dsrflow worker next to a system that holds personal data.

A worker declares its system (name, identifier types, data categories, actions,
retention rules), supplies one handler per action, and runs::

    from dsrflow.registry import SystemDeclaration
    from dsrflow.rights import Action
    from dsrflow.worker import Result, TaskContext, Worker

    crm = Worker(SystemDeclaration(name="crm", identifier_types=("email",), actions=(Action.export,)))

    @crm.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        m = ctx.match(await find_any(ctx.identifiers), {"email": "email"})  # every identifier must agree
        if m.conflict:
            return Result.conflict(m.reason())
        if m.not_found:
            return Result.not_found()
        rows = m.records
        artifact = await ctx.export(rows, records=len(rows))
        return Result.succeeded(counts={"located": len(rows)}, artifacts=[artifact])

    await crm.run(settings)          # or: python -m dsrflow.worker mymodule:crm

A task delivered again (after a crash, a rebalance or a restart) is not run again: the worker
claims each task attempt in a task ledger first and sends its first receipt again
(``Worker(..., ledger=...)`` for the system's own database; else a :class:`PostgresTaskLedger` in
``DSRFLOW_WORKER_LEDGER_DSN``, else in the case store, as on the embedded stack).

A worker needs no case-store credentials: on start, and every minute after, it announces its
system's declaration on ``dsr.systems.v1`` (signed with ``DSRFLOW_WORKER_CREDENTIAL`` when set);
a new or changed declaration takes effect once an administrator approves it (``dsrflow systems
pending`` / ``approve``). Its handlers' exports go to its own part of the export store,
``[controllers/<c>/]systems/<name>/`` (``ctx.store`` reaches no other).

Also:

- **Progress of long tasks.** ``await ctx.progress(done=120, total=4000, note="orders")`` sends a
  ``TaskProgress`` beside the receipts, at most one per ``Worker(progress_interval=...)`` (10 s);
  the coordinator then waits longer before it sends the task again. It never fails the task.
- **Batch handlers.** ``@crm.batch_handler(Action.erase)`` registers
  ``async def erase(ctxs: list[TaskContext]) -> list[Result]``: up to ``max_batch`` tasks of one
  Kafka batch in one call, one result per task in the same order, never two tasks of one case.
- **Concurrency and rate.** ``Worker(concurrency=16, rate_limit=None)``: handler calls at once,
  and tasks started per second (an :class:`aiolimiter.AsyncLimiter`; a batch call counts its tasks).
- **Errors.** :class:`RetryableError` (and the worker's ``retry_on`` exceptions, and a timeout)
  make a retryable ``failed`` receipt: the coordinator tries again. :class:`PermanentError` (or a
  plain :class:`TaskError`) a final one. Any other exception is reported by class and location
  only. See :mod:`dsrflow.worker._result` for the tree.
- **Graceful shutdown.** On SIGTERM (or the ``stop`` event) no task starts any more; running
  handlers get ``Worker(shutdown_grace=...)`` (30 s) to finish and report, then are cancelled
  and their tasks left, uncommitted, to the next instance.

Test handlers without Kafka with :func:`dsrflow.testing.worker.run_task` (one task; progress
reports are collected in ``progress=[]``) and :func:`dsrflow.testing.worker.run_tasks` (many, in
batch handler calls as the runner makes them).
"""

from ..identity import SubjectMatch, match_subject
from ._context import ProgressSink, TaskContext
from ._ledger import LedgerClaim, LedgerFactory, MemoryTaskLedger, PostgresTaskLedger, TaskLedger
from ._result import PermanentError, Result, RetryableError, TaskError
from ._worker import DEFAULT_MAX_RECEIPT_BYTES, DEFAULT_RETRY_ON, BatchHandler, Handler, Hook, Worker

__all__ = [
    "DEFAULT_MAX_RECEIPT_BYTES",
    "DEFAULT_RETRY_ON",
    "BatchHandler",
    "Handler",
    "Hook",
    "LedgerClaim",
    "LedgerFactory",
    "MemoryTaskLedger",
    "PermanentError",
    "PostgresTaskLedger",
    "ProgressSink",
    "Result",
    "RetryableError",
    "SubjectMatch",
    "TaskContext",
    "TaskError",
    "TaskLedger",
    "Worker",
    "load_worker",
    "match_subject",
]


def load_worker(spec: str) -> Worker:
    """Import ``"package.module:attribute"`` (attribute defaults to ``worker``) and return the Worker."""
    import importlib

    module_name, _, attr = spec.partition(":")
    obj = getattr(importlib.import_module(module_name), attr or "worker")
    if not isinstance(obj, Worker):
        raise TypeError(f"{spec} is a {type(obj).__name__}, not a dsrflow Worker")
    return obj
