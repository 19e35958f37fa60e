"""Workers that break the worker contract, for :mod:`dsrflow.testing.conformance` to catch, and
one that keeps it.

Each is a worker of a made-up shop (system ``shop``: export and erase, by email and phone) over
its own in-memory table of three customers: no database needed. Run the suite on one to see what
it reports::

    from dsrflow.testing import broken

    for finding in await broken.ANY_IDENTIFIER.conformance().run():
        print(finding)

=========================  =====================================================  ============================
specimen                   what it does wrong                                     the check that fails
=========================  =====================================================  ============================
``GOOD``                   nothing: matches on all identifiers, erases, keeps     none
                           order records under the accounting law (``retained``)
``WHOLE_TABLE``            finds the subject, then exports every customer         ``export_finds_subject``
``ORDERS_ONLY``            exports the subject's order count, not what it holds   ``export_finds_subject``
                           about them
``ANY_IDENTIFIER``         acts on whoever any identifier names (OR, not          ``conflicting_identifiers``
                           all-agree): one person's email and another's phone
                           export and erase both
``LATE_CONFLICT``          erases whoever any identifier finds, then sees the     ``conflicting_identifiers``
                           conflict: says ``conflict``, but both are gone
``REPLAYING``              journals an erasure as row positions and replays       ``redelivery_changes_nothing``
                           them when the task comes again: the rows have moved
                           up, so the redelivery erases the next customer
``NOT_FOUND_AFTER_ERASE``  erases, then reports ``not_found``                     ``erase_twice_not_found``
``SAME_ANSWER``            deduplicates erasures by subject, not by task: a new   ``erase_twice_not_found``
                           erasure of someone already erased gets the first
                           receipt again
``SOFT_DELETE``            marks the row deleted and reports ``succeeded``; the   ``retained_has_legal_basis``
                           export still reads it: data kept without a basis
``BLANK_BASIS``            keeps order records as ``retained`` with a blank       ``retained_has_legal_basis``
                           legal basis
=========================  =====================================================  ============================
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..events import RetainedItem
from ..registry import SystemDeclaration
from ..rights import Action, IdentifierType
from ..worker import Handler, Result, TaskContext, Worker
from .conformance import Conformance

__all__ = [
    "ANY_IDENTIFIER",
    "BLANK_BASIS",
    "BROKEN",
    "GOOD",
    "LATE_CONFLICT",
    "NOT_FOUND_AFTER_ERASE",
    "ORDERS_ONLY",
    "OTHER",
    "PEOPLE",
    "REPLAYING",
    "SAME_ANSWER",
    "SOFT_DELETE",
    "SUBJECT",
    "Specimen",
    "WHOLE_TABLE",
    "Table",
    "good_worker",
]

Row = dict[str, Any]

#: The shop's customers, as every table is seeded. Phones in E.164, emails on a reserved domain.
PEOPLE: tuple[Row, ...] = (
    {"full_name": "Nguyễn Thị Lan", "email": "lan.nguyen@example.com", "phone": "+84901234567",
     "city": "Hà Nội", "orders": 2},
    {"full_name": "Trần Văn Hùng", "email": "hung.tran@example.com", "phone": "+84912345678",
     "city": "TP. Hồ Chí Minh", "orders": 0},
    {"full_name": "Lê Minh Châu", "email": "chau.le@example.com", "phone": "+84903456789",
     "city": "Đà Nẵng", "orders": 1},
)
#: The conformance suite's subject (a customer with orders) and the other person (the next row).
SUBJECT = {"email": PEOPLE[0]["email"], "phone": PEOPLE[0]["phone"]}
OTHER = {"email": PEOPLE[1]["email"], "phone": PEOPLE[1]["phone"]}

FIELDS = {"email": "email", "phone": "phone"}
CATEGORIES = ("user.name", "user.contact.email", "user.contact.phone_number", "user.contact.address")
FINANCIAL = "user.financial"
LEGAL_BASIS = ("Vietnam Law on Accounting 88/2015/QH13 Art 41: accounting records are kept for 10 years "
               "from the end of the accounting year")


class Table:
    """A worker's in-memory "database": customer rows, and the anonymised order records kept after
    an erasure (``ledger``). :meth:`seed` recreates it."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.ledger: list[Row] = []
        #: what a worker remembers between tasks (its bug, usually); forgotten on seed
        self.memo: dict[object, Any] = {}

    async def seed(self) -> None:
        self.rows = [dict(p) for p in PEOPLE]
        self.ledger = []
        self.memo = {}

    async def snapshot(self) -> object:
        """A copy of the data, for ``Conformance(snapshot=...)``."""
        return copy.deepcopy((self.rows, self.ledger))

    def find(self, ctx: TaskContext) -> list[Row]:
        """The rows any of the task's identifiers finds (``WHERE email = $1 OR phone = $2``)."""
        ids = ctx.identifiers
        return [r for r in self.rows if any(r.get(FIELDS[k]) == v for k, v in ids.items() if k in FIELDS)]

    def positions(self, rows: list[Row]) -> list[int]:
        return [i for i, r in enumerate(self.rows) if any(r is x for x in rows)]

    def erase(self, rows: list[Row], *, basis: str = LEGAL_BASIS) -> Result:
        """Delete ``rows``; their orders stay in the ledger, anonymised, under ``basis``."""
        orders = sum(r["orders"] for r in rows)
        self.rows = [r for r in self.rows if not any(r is x for x in rows)]
        counts = {"located": len(rows), "erased": len(rows), "orders_kept": orders}
        if not orders:
            return Result.succeeded(counts=counts, categories=CATEGORIES)
        self.ledger.append({"orders": orders})
        until = datetime(datetime.now(UTC).year + 10, 12, 31, tzinfo=UTC)
        return Result.retained([RetainedItem(category=FINANCIAL, records=orders, legal_basis=basis,
                                             retain_until=until)],
                               counts=counts, categories=CATEGORIES)


def _declaration() -> SystemDeclaration:
    return SystemDeclaration(name="shop", identifier_types=(IdentifierType.email, IdentifierType.phone),
                             categories=(*CATEGORIES, FINANCIAL), actions=(Action.export, Action.erase))


def _one_person(ctx: TaskContext, rows: list[Row]) -> Result | list[Row]:
    """The rows every identifier agrees on, or the answer when there are none to act on."""
    match = ctx.match(rows, FIELDS)
    if match.conflict:
        return Result.conflict(match.reason())
    if match.not_found:
        return Result.not_found()
    return match.records


async def _export(ctx: TaskContext, rows: list[Row]) -> Result:
    artifact = await ctx.export({"system": "shop", "customers": rows}, records=len(rows))
    return Result.succeeded(counts={"located": len(rows)}, categories=CATEGORIES, artifacts=[artifact])


def _export_of(table: Table) -> Handler:
    """The export every specimen shares: the rows all identifiers agree on."""

    async def export(ctx: TaskContext) -> Result:
        found = _one_person(ctx, table.find(ctx))
        return found if isinstance(found, Result) else await _export(ctx, found)

    return export


@dataclass(frozen=True, slots=True)
class Specimen:
    """A worker, its table, and what is wrong with it."""

    name: str
    worker: Worker
    table: Table
    bug: str

    def conformance(self, **kwargs: Any) -> Conformance:
        """The suite bound to this worker: :data:`SUBJECT`, :data:`OTHER`, seeded by its table."""
        return Conformance(self.worker, subject=SUBJECT, other=OTHER, seed=self.table.seed, **kwargs)


def _good() -> Specimen:
    table, worker = Table(), Worker(_declaration())
    worker.handler(Action.export)(_export_of(table))

    @worker.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        found = _one_person(ctx, table.find(ctx))
        return found if isinstance(found, Result) else table.erase(found)

    return Specimen("good", worker, table, "none")


def _whole_table() -> Specimen:
    table, worker = Table(), Worker(_declaration())

    @worker.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        found = _one_person(ctx, table.find(ctx))
        return found if isinstance(found, Result) else await _export(ctx, table.rows)  # BUG: not just `found`

    @worker.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        found = _one_person(ctx, table.find(ctx))
        return found if isinstance(found, Result) else table.erase(found)

    return Specimen("whole_table", worker, table, "exports every customer once the subject is found")


def _orders_only() -> Specimen:
    table, worker = Table(), Worker(_declaration())

    @worker.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        found = _one_person(ctx, table.find(ctx))
        if isinstance(found, Result):
            return found
        orders = [{"orders": r["orders"]} for r in found]  # BUG: not the customer record itself
        artifact = await ctx.export({"system": "shop", "orders": orders}, records=len(orders))
        return Result.succeeded(counts={"located": len(found)}, categories=[FINANCIAL], artifacts=[artifact])

    @worker.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        found = _one_person(ctx, table.find(ctx))
        return found if isinstance(found, Result) else table.erase(found)

    return Specimen("orders_only", worker, table, "exports the order count, not the customer's data")


def _any_identifier() -> Specimen:
    table, worker = Table(), Worker(_declaration())

    @worker.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        found = table.find(ctx)  # BUG: no ctx.match: whoever any identifier names
        return await _export(ctx, found) if found else Result.not_found()

    @worker.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        found = table.find(ctx)  # BUG: erases both people of a conflicting task
        return table.erase(found) if found else Result.not_found()

    return Specimen("any_identifier", worker, table, "acts on whoever any identifier names")


def _late_conflict() -> Specimen:
    table, worker = Table(), Worker(_declaration())
    worker.handler(Action.export)(_export_of(table))

    @worker.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        candidates = table.find(ctx)
        result = table.erase(candidates)  # BUG: the check comes after the deletes (and nothing rolls them back)
        found = _one_person(ctx, candidates)
        return found if isinstance(found, Result) else result

    return Specimen("late_conflict", worker, table, "erases before it checks that the identifiers agree")


def _replaying() -> Specimen:
    table, worker = Table(), Worker(_declaration())
    worker.handler(Action.export)(_export_of(table))

    @worker.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        if ctx.task.task_id in table.memo:
            # BUG: "replay to be safe": the positions now hold the customers after the subject.
            positions: list[int]
            first: Result
            positions, first = table.memo[ctx.task.task_id]
            table.erase([table.rows[i] for i in positions if i < len(table.rows)])
            return first
        found = _one_person(ctx, table.find(ctx))
        if isinstance(found, Result):
            return found
        where = table.positions(found)
        result = table.erase(found)
        table.memo[ctx.task.task_id] = (where, result)
        return result

    return Specimen("replaying", worker, table, "replays an erasure by row position on redelivery")


def _not_found_after_erase() -> Specimen:
    table, worker = Table(), Worker(_declaration())
    worker.handler(Action.export)(_export_of(table))

    @worker.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        found = _one_person(ctx, table.find(ctx))
        if isinstance(found, Result):
            return found
        table.erase(found)
        return Result.not_found()  # BUG: it did find, and erase, the subject

    return Specimen("not_found_after_erase", worker, table, "erases, then reports not_found")


def _same_answer() -> Specimen:
    table, worker = Table(), Worker(_declaration())
    worker.handler(Action.export)(_export_of(table))
    @worker.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        key = tuple(sorted(ctx.identifiers.items()))
        if key in table.memo:  # BUG: the same person again is not the same task: nothing is left to erase
            result: Result = table.memo[key]
            return result
        found = _one_person(ctx, table.find(ctx))
        if isinstance(found, Result):
            return found
        table.memo[key] = result = table.erase(found)
        return result

    return Specimen("same_answer", worker, table, "answers a new erasure of the same person with the first receipt")


def _soft_delete() -> Specimen:
    table, worker = Table(), Worker(_declaration())
    worker.handler(Action.export)(_export_of(table))  # reads deleted rows too

    @worker.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        found = _one_person(ctx, [r for r in table.find(ctx) if not r.get("deleted")])
        if isinstance(found, Result):
            return found
        for row in found:
            row["deleted"] = True  # BUG: the data stays, with no legal basis, and the receipt says erased
        return Result.succeeded(counts={"located": len(found), "erased": len(found)}, categories=CATEGORIES)

    return Specimen("soft_delete", worker, table, "marks rows deleted and keeps them, reporting succeeded")


def _blank_basis() -> Specimen:
    table, worker = Table(), Worker(_declaration())
    worker.handler(Action.export)(_export_of(table))

    @worker.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        found = _one_person(ctx, table.find(ctx))
        return found if isinstance(found, Result) else table.erase(found, basis=" ")  # BUG: no basis

    return Specimen("blank_basis", worker, table, "keeps order records with a blank legal basis")


GOOD = _good()
WHOLE_TABLE = _whole_table()
ORDERS_ONLY = _orders_only()
ANY_IDENTIFIER = _any_identifier()
LATE_CONFLICT = _late_conflict()
REPLAYING = _replaying()
NOT_FOUND_AFTER_ERASE = _not_found_after_erase()
SAME_ANSWER = _same_answer()
SOFT_DELETE = _soft_delete()
BLANK_BASIS = _blank_basis()

#: The broken specimens by name.
BROKEN: dict[str, Specimen] = {
    s.name: s for s in (WHOLE_TABLE, ORDERS_ONLY, ANY_IDENTIFIER, LATE_CONFLICT, REPLAYING,
                        NOT_FOUND_AFTER_ERASE, SAME_ANSWER, SOFT_DELETE, BLANK_BASIS)}

#: A worker that keeps the contract: the suite passes it.
good_worker = GOOD.worker
