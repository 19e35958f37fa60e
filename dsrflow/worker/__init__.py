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
(:class:`PostgresTaskLedger` in the case store by default; ``Worker(..., ledger=...)`` for the
system's own database).

Test handlers without Kafka with :func:`dsrflow.testing.worker.run_task`.
"""

from ..identity import SubjectMatch, match_subject
from ._context import TaskContext
from ._ledger import LedgerClaim, LedgerFactory, MemoryTaskLedger, PostgresTaskLedger, TaskLedger
from ._result import Result, RetryableError, TaskError
from ._worker import DEFAULT_MAX_RECEIPT_BYTES, DEFAULT_RETRY_ON, Handler, Hook, Worker

__all__ = [
    "DEFAULT_MAX_RECEIPT_BYTES",
    "DEFAULT_RETRY_ON",
    "Handler",
    "Hook",
    "LedgerClaim",
    "LedgerFactory",
    "MemoryTaskLedger",
    "PostgresTaskLedger",
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
