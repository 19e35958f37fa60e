"""The billing reference system carries out every action it declares, and a restriction stops
its payment reminders.

Each test gets a fresh, seeded billing database, runs tasks through the real handlers with
:func:`dsrflow.testing.worker.run_task`, then reads the rows back and asks billing's own
dunning query (examples/billing/processing.py) whom it would remind.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import orjson
import pytest

from dsrflow.events import TaskReceipt
from dsrflow.exports import MemoryExportStore
from dsrflow.rights import ACTION_PURPOSES, Action, IdentifierType, ReceiptStatus, Right
from dsrflow.testing.worker import make_task, run_task
from examples.billing import processing
from examples.billing import seed as billing_seed
from examples.billing import worker as billing
from examples.people import IN_BOTH, Person, person

pytestmark = pytest.mark.pg

MakeDatabase = Callable[[], Awaitable[str]]
DEBTOR = person("mai.hoang@example.vn")  # one unpaid invoice


@pytest.fixture
async def conn(billing_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(billing_dsn)
    try:
        yield c
    finally:
        await c.close()


async def run(action: Action, identifiers: dict[str, str], *, case_id: uuid.UUID | None = None,
              changes: dict[str, str] | None = None, purposes: list[str] | None = None) -> TaskReceipt:
    right = Right.restriction if action == Action.lift_restriction else None
    task = make_task("billing", action, identifiers, right=right, case_id=case_id, changes=changes, purposes=purposes)
    return await run_task(billing.worker, task)


async def reminded(conn: asyncpg.Connection) -> set[str]:
    return {r["id"] for r in await processing.dunning_candidates(conn)}


def unpaid(p: Person) -> list[str]:
    return [i.number for i in billing_seed.invoices(p) if sum(amount for _, amount, _ in i.payments)
            < i.amount_vnd + i.vat_vnd]


# -- the declaration -------------------------------------------------------------------------------


def test_billing_declares_what_it_does_and_no_marketing() -> None:
    s = billing.SYSTEM
    assert set(s.actions) == {Action.export, Action.erase, Action.rectify, Action.restrict, Action.lift_restriction}
    assert set(s.identifier_types) == {IdentifierType.email, IdentifierType.phone, IdentifierType.customer_id}
    # No purpose of billing's is one an opt-out stops: the coordinator does not ask it for them.
    for prefixes in ACTION_PURPOSES.values():
        assert not any(p == pre or p.startswith(pre + ".") or pre.startswith(p + ".")
                       for p in s.purposes for pre in prefixes)
    assert s.purposes and s.storage_country == "VN" and s.operated_by == "controller"
    assert s.backup_retention is not None and s.backup_retention.days == 35
    assert s.recipients and s.processors and s.sensitive_categories == ()
    assert [r.category for r in s.retention] == ["user.financial"]
    billing.worker.check()


# -- dunning and restriction -----------------------------------------------------------------------


async def test_dunning_reminds_exactly_the_customers_with_unpaid_invoices(conn: asyncpg.Connection) -> None:
    rows = await processing.dunning_candidates(conn)
    assert {r["id"] for r in rows} == {p.customer_id for p in billing_seed.customers() if unpaid(p)}
    [mai] = [r for r in rows if r["id"] == DEBTOR.customer_id]
    assert mai["invoices"] == unpaid(DEBTOR) and mai["outstanding_vnd"] > 0


async def test_billing_restriction_stops_reminders_until_lifted(conn: asyncpg.Connection) -> None:
    everyone = await reminded(conn)
    assert DEBTOR.customer_id in everyone
    invoices = await conn.fetch("SELECT * FROM invoices ORDER BY id")
    case = uuid.uuid4()
    receipt = await run(Action.restrict, {"customer_id": DEBTOR.customer_id, "email": DEBTOR.email}, case_id=case)
    assert receipt.status == ReceiptStatus.succeeded, receipt.error
    assert receipt.counts == {"restricted": 1, "already_restricted": 0}
    [row] = await conn.fetch("SELECT * FROM restrictions")
    assert (row["customer_id"], row["case_id"], row["purposes"], row["lifted_at"]) == (
        DEBTOR.customer_id, case, None, None)
    assert await reminded(conn) == everyone - {DEBTOR.customer_id}
    assert await conn.fetch("SELECT * FROM invoices ORDER BY id") == invoices  # the records stay

    again = await run(Action.restrict, {"phone": DEBTOR.phone}, case_id=case)
    assert again.counts == {"restricted": 1, "already_restricted": 1}
    assert await conn.fetchval("SELECT count(*) FROM restrictions") == 1

    assert (await run(Action.lift_restriction, {"phone": DEBTOR.phone}, case_id=uuid.uuid4())).status == (
        ReceiptStatus.not_found)
    assert await reminded(conn) == everyone - {DEBTOR.customer_id}
    lifted = await run(Action.lift_restriction, {"phone": DEBTOR.phone}, case_id=case)
    assert lifted.status == ReceiptStatus.succeeded and lifted.counts == {"lifted": 1, "already_lifted": 0}
    assert await reminded(conn) == everyone
    twice = await run(Action.lift_restriction, {"phone": DEBTOR.phone}, case_id=case)
    assert twice.counts == {"lifted": 0, "already_lifted": 1} and await reminded(conn) == everyone


async def test_billing_objection_stops_reminders_only_when_it_covers_payment_processing(
    conn: asyncpg.Connection
) -> None:
    everyone = await reminded(conn)
    marketing = await run(Action.restrict, DEBTOR.identifiers(), purposes=["marketing"])
    assert marketing.status == ReceiptStatus.succeeded and marketing.counts["purposes"] == 1
    assert await reminded(conn) == everyone  # billing does no marketing: nothing of it stops
    service = await run(Action.restrict, DEBTOR.identifiers(), purposes=["essential.service"])
    assert service.status == ReceiptStatus.succeeded
    assert await reminded(conn) == everyone - {DEBTOR.customer_id}


async def test_billing_export_shows_the_restriction(conn: asyncpg.Connection) -> None:
    await run(Action.restrict, DEBTOR.identifiers())
    store = MemoryExportStore()
    receipt = await run_task(billing.worker, make_task("billing", Action.export, DEBTOR.identifiers()), store=store)
    assert receipt.status == ReceiptStatus.succeeded
    again = await run_task(billing.worker, make_task("billing", Action.export, DEBTOR.identifiers()), store=store)
    assert again.artifacts[0].sha256 == receipt.artifacts[0].sha256  # the same document
    [customer] = orjson.loads(store.get(receipt.artifacts[0].ref))["customers"]
    [restriction] = customer["restrictions"]
    assert restriction["purposes"] == "all processing" and restriction["lifted_at"] is None
    n_invoices = len(billing_seed.invoices(DEBTOR))
    n_payments = sum(len(i.payments) for i in billing_seed.invoices(DEBTOR))
    assert receipt.counts == {"located": 1, "records": 1 + n_invoices + n_payments + 1}


async def test_billing_erase_takes_the_restriction_with_the_customer(conn: asyncpg.Connection) -> None:
    await run(Action.restrict, DEBTOR.identifiers())
    receipt = await run(Action.erase, DEBTOR.identifiers())
    assert receipt.status == ReceiptStatus.retained, receipt.error
    assert await conn.fetchval("SELECT count(*) FROM restrictions") == 0
    assert DEBTOR.customer_id not in await reminded(conn)  # anonymised: no one to remind
    assert await conn.fetchval("SELECT count(*) FROM invoices WHERE customer_id = $1", DEBTOR.customer_id) == len(
        billing_seed.invoices(DEBTOR))


# -- rectify ---------------------------------------------------------------------------------------


async def test_billing_rectify_corrects_the_customer_and_leaves_issued_invoices(conn: asyncpg.Connection) -> None:
    subject = IN_BOTH
    invoices = await conn.fetch("SELECT * FROM invoices ORDER BY id")
    others = await conn.fetch("SELECT * FROM customers WHERE id <> $1 ORDER BY id", subject.customer_id)
    changes = {
        "name": "Nguyễn Thị Lan Anh",
        "user.contact.email": "lan.anh@example.vn",
        "phone": "+84 988 765 432",
        "address": "5 Phố Huế, Phường Hai Bà Trưng, Hà Nội",
        "user.government_id": "8012345678",
    }
    case = uuid.uuid4()
    receipt = await run(Action.rectify, subject.identifiers(), case_id=case, changes=changes)
    assert receipt.status == ReceiptStatus.succeeded, receipt.error
    n_invoices = len(billing_seed.invoices(subject))
    assert receipt.counts == {"rectified": 1, "fields": 5, "changed": 5, "invoices_unchanged": n_invoices}
    assert set(receipt.categories) == {"user.name", "user.contact.email", "user.contact.phone_number",
                                       "user.contact.address", "user.government_id"}
    row = await conn.fetchrow("SELECT * FROM customers WHERE id = $1", subject.customer_id)
    assert (row["full_name"], row["email"], row["phone"], row["billing_address"], row["tax_code"]) == (
        "Nguyễn Thị Lan Anh", "lan.anh@example.vn", "+84988765432", "5 Phố Huế, Phường Hai Bà Trưng, Hà Nội",
        "8012345678")
    assert await conn.fetch("SELECT * FROM invoices ORDER BY id") == invoices
    assert await conn.fetch("SELECT * FROM customers WHERE id <> $1 ORDER BY id", subject.customer_id) == others

    # Again, with the old email and phone it was sent with: found, nothing changes.
    again = await run(Action.rectify, {**subject.identifiers(), "customer_id": subject.customer_id},
                      case_id=case, changes=changes)
    assert again.status == ReceiptStatus.succeeded, again.error
    assert again.counts == {"rectified": 1, "fields": 5, "changed": 0, "invoices_unchanged": n_invoices}
    assert await conn.fetchrow("SELECT * FROM customers WHERE id = $1", subject.customer_id) == row


@pytest.mark.parametrize(("changes", "named"), [
    ({"date_of_birth": "1990-03-14"}, "date_of_birth"),
    ({"user.contact.address.street": "5 Phố Huế"}, "user.contact.address.street"),
    ({"user.government_id": "80123"}, "user.government_id"),
    ({"name": "   "}, "name"),
])
async def test_billing_rectify_refuses_what_it_cannot_apply(
    conn: asyncpg.Connection, changes: dict[str, str], named: str
) -> None:
    before = await conn.fetch("SELECT * FROM customers ORDER BY id")
    receipt = await run(Action.rectify, IN_BOTH.identifiers(), changes=changes)
    assert receipt.status == ReceiptStatus.refused and receipt.error is not None and named in receipt.error
    for value in changes.values():
        assert value.strip() == "" or value not in receipt.error
    assert await conn.fetch("SELECT * FROM customers ORDER BY id") == before


async def test_billing_rectify_will_not_give_a_customer_another_customers_phone(conn: asyncpg.Connection) -> None:
    before = await conn.fetch("SELECT * FROM customers ORDER BY id")
    receipt = await run(Action.rectify, IN_BOTH.identifiers(), changes={"phone": DEBTOR.phone})
    assert receipt.status == ReceiptStatus.refused and receipt.error is not None
    assert "another customer" in receipt.error
    assert await conn.fetch("SELECT * FROM customers ORDER BY id") == before
