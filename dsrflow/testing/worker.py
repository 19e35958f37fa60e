"""Test a worker's handlers without Kafka, the way dsrflow tests itself::

from dsrflow.testing.worker import make_task, run_task

async def test_export_finds_lan() -> None:
    receipt = await run_task(crm, make_task("crm", Action.export, {"email": "lan@example.vn"}))
    assert receipt.status == "succeeded"
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from uuid import UUID

from .. import identity
from ..codec import decode, encode
from ..events import TaskAssigned, TaskReceipt
from ..exports.store import ExportStore, MemoryExportStore
from ..rights import ACTION_FOR_RIGHT, Action, IdentifierType, Right
from ..settings import Settings
from ..worker import Worker

__all__ = ["make_task", "run_task"]

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
) -> TaskReceipt:
    """Run one task through the worker's handler and return the receipt it would publish.

    If the worker is not started, its startup hooks run before and its shutdown hooks after
    (given ``settings``, default ``Settings()``); to run many tasks against one started worker,
    wrap them in ``async with worker.lifespan(settings):``. Exports go to ``store`` (default: a
    fresh :class:`~dsrflow.exports.MemoryExportStore`). The receipt is encoded and decoded with
    the real codec, so what the test sees is what would go on the wire.
    """
    store = store if store is not None else MemoryExportStore()
    if worker.started:
        receipt = await worker.handle(task, store=store)
    else:
        async with worker.lifespan(settings if settings is not None else Settings()):
            receipt = await worker.handle(task, store=store)
    value, headers = encode(receipt, source=f"dsrflow/worker/{worker.name}", subject=str(receipt.case_id))
    return decode(value, headers, TaskReceipt).data
