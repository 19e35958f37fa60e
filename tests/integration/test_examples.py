"""The reference systems (examples/crm, examples/billing) against a real PostgreSQL.

Each test gets fresh crm and billing databases, seeded by the examples' own ``setup``,
runs tasks through the real handlers with :func:`dsrflow.testing.worker.run_task`, and
then looks at the rows themselves.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest

from dsrflow.events import Artifact
from dsrflow.exports import MemoryExportStore
from dsrflow.rights import Action, IdentifierType, ReceiptStatus
from dsrflow.testing.worker import make_task, run_task
from examples import people
from examples.billing import seed as billing_seed
from examples.billing import worker as billing
from examples.crm import seed as crm_seed
from examples.crm import worker as crm
from examples.people import BILLING_ONLY, BILLING_WITHOUT_INVOICES, CRM_ONLY, IN_BOTH, NOWHERE, Person

pytestmark = pytest.mark.pg

MakeDatabase = Callable[[], Awaitable[str]]


async def _fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


async def _count(dsn: str, table: str) -> int:
    return int((await _fetch(dsn, f"SELECT count(*) AS n FROM {table}"))[0]["n"])


def export_doc(store: MemoryExportStore, artifacts: list[Artifact]) -> Any:
    [art] = artifacts
    return orjson.loads(store.get(art.ref))


def others(subject: Person) -> list[Person]:
    return [p for p in people.PEOPLE if p != subject]


def strings(doc: object) -> set[str]:
    """Every string value in a JSON document."""
    if isinstance(doc, str):
        return {doc}
    if isinstance(doc, dict):
        return set().union(*(strings(v) for v in doc.values())) if doc else set()
    if isinstance(doc, list):
        return set().union(*(strings(v) for v in doc)) if doc else set()
    return set()


# -- setup -------------------------------------------------------------------------------


async def test_setup_seeds_once_and_creates_missing_database(make_database: MakeDatabase) -> None:
    dsn = await make_database()
    await crm.setup(dsn)
    await crm.setup(dsn)  # idempotent: no second seed
    assert await _count(dsn, "contacts") == len(people.people_in("crm"))
    assert await _count(dsn, "addresses") == sum(len(crm_seed.addresses(p)) for p in crm_seed.contacts())
    assert await _count(dsn, "notes") == sum(len(crm_seed.notes(p)) for p in crm_seed.contacts())
    assert await _count(dsn, "tracking_ids") == sum(len(crm_seed.tracking_ids(p)) for p in crm_seed.contacts())
    assert await _count(dsn, "consents") == sum(len(crm_seed.consents(p)) for p in crm_seed.contacts())
    unsubscribed = [p for p in crm_seed.contacts() if crm_seed.unsubscribed(p)]
    assert unsubscribed and await _count(dsn, "marketing_suppressions") == 2 * len(unsubscribed)
    assert await _count(dsn, "restrictions") == 0

    # A database that does not exist yet is created on the same server.
    parts = urlsplit(dsn)
    fresh = urlunsplit(parts._replace(path=f"/billing_{uuid.uuid4().hex[:12]}"))
    await billing.setup(fresh)
    assert await _count(fresh, "customers") == len(people.people_in("billing"))
    assert await _count(fresh, "invoices") == sum(len(billing_seed.invoices(p)) for p in billing_seed.customers())

    empty = await make_database()
    await billing.setup(empty, seed=False)
    assert await _count(empty, "customers") == 0


def test_seed_has_the_promised_subjects() -> None:
    assert len(people.PEOPLE) == 30
    assert len({p.email for p in people.PEOPLE}) == len({p.phone for p in people.PEOPLE}) == 30
    assert IN_BOTH.systems == {"crm", "billing"}
    assert CRM_ONLY.systems == {"crm"} and BILLING_ONLY.systems == {"billing"}
    assert billing_seed.invoices(BILLING_ONLY) and not billing_seed.invoices(BILLING_WITHOUT_INVOICES)
    assert all(p.phone.startswith("+849") and len(p.phone) == 12 for p in people.PEOPLE)
    # The demo's CRM erasures expect "succeeded": its subjects are not on the suppression list.
    assert not any(crm_seed.unsubscribed(p) for p in people.SUBJECTS.values() if "crm" in p.systems)
    assert IN_BOTH.cookie_id and IN_BOTH.device_id and CRM_ONLY.cookie_id
    cookies = [p.cookie_id for p in people.PEOPLE if p.cookie_id]
    assert len(set(cookies)) == len(cookies) > 15 and people.PEOPLE[3].cookie_id is None


# -- crm ---------------------------------------------------------------------------------


async def test_crm_export_holds_the_subject_and_only_them(crm_dsn: str) -> None:
    store = MemoryExportStore()
    receipt = await run_task(crm.worker, make_task("crm", Action.export, IN_BOTH.identifiers()), store=store)
    assert receipt.status == ReceiptStatus.succeeded
    n_addr, n_notes = len(crm_seed.addresses(IN_BOTH)), len(crm_seed.notes(IN_BOTH))
    n_tracking, n_consents = len(crm_seed.tracking_ids(IN_BOTH)), len(crm_seed.consents(IN_BOTH))
    records = 1 + n_addr + n_notes + n_tracking + n_consents
    assert receipt.counts == {"located": 1, "records": records}
    assert receipt.artifacts[0].records == records
    assert {"user.contact.email", "user.device.cookie_id", "user.device.device_id"} <= set(receipt.categories)

    doc = export_doc(store, receipt.artifacts)
    [contact] = doc["contacts"]
    assert (contact["full_name"], contact["email"], contact["phone"]) == (
        IN_BOTH.full_name,
        IN_BOTH.email,
        IN_BOTH.phone,
    )
    assert contact["date_of_birth"] == IN_BOTH.date_of_birth.isoformat()
    assert [a["line"] for a in contact["addresses"]] == [a.line for _, a in crm_seed.addresses(IN_BOTH)]
    assert [n["body"] for n in contact["notes"]] == [b for b, _ in crm_seed.notes(IN_BOTH)]
    assert sorted((t["kind"], t["value"]) for t in contact["tracking_ids"]) == sorted(crm_seed.tracking_ids(IN_BOTH))
    assert sorted((c["purpose"], c["granted"]) for c in contact["consents"]) == sorted(crm_seed.consents(IN_BOTH))
    assert contact["restrictions"] == [] and contact["marketing_suppressed"] is False
    values = strings(doc)
    for other in others(IN_BOTH):
        assert not values & {other.email, other.phone, other.full_name, other.address.line}


async def test_crm_export_by_phone_only_and_not_found(crm_dsn: str) -> None:
    by_phone = await run_task(crm.worker, make_task("crm", Action.export, {"phone": "+84 903 456 789"}))
    assert by_phone.status == ReceiptStatus.succeeded and by_phone.counts["located"] == 1  # CRM_ONLY's phone
    for subject in (BILLING_ONLY, NOWHERE):
        receipt = await run_task(crm.worker, make_task("crm", Action.export, subject.identifiers()))
        assert receipt.status == ReceiptStatus.not_found and receipt.artifacts == []


async def test_crm_erase_deletes_everything_of_the_subject_and_nothing_else(crm_dsn: str) -> None:
    tables = ("contacts", "addresses", "notes", "tracking_ids", "consents")
    before = {t: await _count(crm_dsn, t) for t in tables}
    [row] = await _fetch(crm_dsn, "SELECT id FROM contacts WHERE email = $1", CRM_ONLY.email)
    mine = {
        "contacts": 1,
        "addresses": len(crm_seed.addresses(CRM_ONLY)),
        "notes": len(crm_seed.notes(CRM_ONLY)),
        "tracking_ids": len(crm_seed.tracking_ids(CRM_ONLY)),
        "consents": len(crm_seed.consents(CRM_ONLY)),
    }
    assert mine["tracking_ids"] and mine["consents"]

    receipt = await run_task(crm.worker, make_task("crm", Action.erase, CRM_ONLY.identifiers()))
    assert receipt.status == ReceiptStatus.succeeded, receipt.error
    assert receipt.counts == {"located": 1, "erased": sum(mine.values()), **mine, "restrictions": 0}
    assert (
        await _fetch(crm_dsn, "SELECT 1 FROM contacts WHERE email = $1 OR phone = $2", CRM_ONLY.email, CRM_ONLY.phone)
        == []
    )
    for table in tables[1:]:
        assert await _fetch(crm_dsn, f"SELECT 1 FROM {table} WHERE contact_id = $1", row["id"]) == []
    after = {t: await _count(crm_dsn, t) for t in tables}
    assert after == {t: before[t] - mine[t] for t in tables}

    again = await run_task(crm.worker, make_task("crm", Action.erase, CRM_ONLY.identifiers()))
    assert again.status == ReceiptStatus.not_found and again.error is None
    assert {t: await _count(crm_dsn, t) for t in tables} == after


async def test_crm_erase_takes_every_contact_matching_either_identifier(crm_dsn: str) -> None:
    # A duplicate contact created by a sales rep with the same phone and no email.
    conn = await asyncpg.connect(crm_dsn)
    try:
        dup = await conn.fetchval(
            "INSERT INTO contacts (full_name, phone) VALUES ($1, $2) RETURNING id", IN_BOTH.full_name, IN_BOTH.phone
        )
        await conn.execute("INSERT INTO notes (contact_id, body) VALUES ($1, 'Khách để lại số qua hotline.')", dup)
    finally:
        await conn.close()
    receipt = await run_task(crm.worker, make_task("crm", Action.erase, IN_BOTH.identifiers()))
    assert receipt.status == ReceiptStatus.succeeded and receipt.counts["contacts"] == 2
    assert await _fetch(crm_dsn, "SELECT 1 FROM contacts WHERE full_name = $1", IN_BOTH.full_name) == []


# -- billing -----------------------------------------------------------------------------


async def test_billing_erase_anonymises_and_keeps_invoices(billing_dsn: str) -> None:
    subject = BILLING_ONLY
    invoices_before = await _fetch(
        billing_dsn,
        "SELECT number, issued_on, amount_vnd, vat_vnd FROM invoices WHERE customer_id = $1 ORDER BY number",
        subject.customer_id,
    )
    payments_before = await _fetch(
        billing_dsn,
        """SELECT p.paid_on, p.amount_vnd FROM payments p JOIN invoices i ON i.id = p.invoice_id
           WHERE i.customer_id = $1 ORDER BY p.id""",
        subject.customer_id,
    )
    assert invoices_before

    receipt = await run_task(billing.worker, make_task("billing", Action.erase, subject.identifiers()))
    assert receipt.status == ReceiptStatus.retained, receipt.error
    kept = len(invoices_before) + len(payments_before)
    assert receipt.counts == {"located": 1, "anonymised": 1, "deleted": 0, "retained": kept}
    [item] = receipt.retained
    assert item.category == "user.financial" and item.records == kept
    assert "88/2015/QH13" in item.legal_basis and "174/2016/ND-CP" in item.legal_basis
    latest = max(r["issued_on"] for r in invoices_before)
    assert item.retain_until == datetime(latest.year + 10, 12, 31, 23, 59, 59, tzinfo=UTC)

    [customer] = await _fetch(billing_dsn, "SELECT * FROM customers WHERE id = $1", subject.customer_id)
    assert customer["full_name"] == "anonymised" and customer["anonymised_at"] is not None
    assert [customer[c] for c in ("email", "phone", "tax_code", "billing_address")] == [None] * 4
    assert await _fetch(billing_dsn, "SELECT 1 FROM customers WHERE full_name = $1", subject.full_name) == []
    invoices_after = await _fetch(
        billing_dsn,
        "SELECT number, issued_on, amount_vnd, vat_vnd FROM invoices WHERE customer_id = $1 ORDER BY number",
        subject.customer_id,
    )
    assert invoices_after == invoices_before  # numbers, dates and amounts kept
    assert len(await _fetch(
        billing_dsn,
        "SELECT 1 FROM payments p JOIN invoices i ON i.id = p.invoice_id WHERE i.customer_id = $1",
        subject.customer_id,
    )) == len(payments_before)

    for identifiers in (subject.identifiers(), {"customer_id": subject.customer_id}):
        again = await run_task(billing.worker, make_task("billing", Action.erase, identifiers))
        assert again.status == ReceiptStatus.not_found and again.error is None
    assert await _count(billing_dsn, "invoices") == sum(len(billing_seed.invoices(p)) for p in billing_seed.customers())


async def test_billing_customer_without_invoices_is_deleted(billing_dsn: str) -> None:
    subject = BILLING_WITHOUT_INVOICES
    receipt = await run_task(billing.worker, make_task("billing", Action.erase, {"customer_id": subject.customer_id}))
    assert receipt.status == ReceiptStatus.succeeded and receipt.retained == []
    assert receipt.counts == {"located": 1, "anonymised": 0, "deleted": 1, "retained": 0}
    assert await _fetch(billing_dsn, "SELECT 1 FROM customers WHERE id = $1", subject.customer_id) == []
    assert await _count(billing_dsn, "customers") == len(people.people_in("billing")) - 1


async def test_billing_export_holds_invoices_of_the_subject_only(billing_dsn: str) -> None:
    store = MemoryExportStore()
    receipt = await run_task(
        billing.worker, make_task("billing", Action.export, {"customer_id": IN_BOTH.customer_id}), store=store
    )
    assert receipt.status == ReceiptStatus.succeeded
    expected = billing_seed.invoices(IN_BOTH)
    n_payments = sum(len(i.payments) for i in expected)
    assert receipt.counts == {"located": 1, "records": 1 + len(expected) + n_payments}

    doc = export_doc(store, receipt.artifacts)
    [customer] = doc["customers"]
    assert (customer["customer_id"], customer["full_name"], customer["email"]) == (
        IN_BOTH.customer_id, IN_BOTH.full_name, IN_BOTH.email,
    )
    assert [(i["number"], i["amount_vnd"], i["vat_vnd"]) for i in customer["invoices"]] == [
        (i.number, i.amount_vnd, i.vat_vnd) for i in expected
    ]
    assert sum(len(i["payments"]) for i in customer["invoices"]) == n_payments
    values = strings(doc)
    for other in others(IN_BOTH):
        assert not values & {other.email, other.phone, other.full_name, other.customer_id, other.address.one_line()}


async def test_billing_not_found(billing_dsn: str) -> None:
    for subject in (CRM_ONLY, NOWHERE):
        receipt = await run_task(billing.worker, make_task("billing", Action.erase, subject.identifiers()))
        assert receipt.status == ReceiptStatus.not_found


# -- identity: every identifier must agree -----------------------------------------------------

B = people.person("hung.tran@example.vn")  # in CRM and billing, like IN_BOTH
ATTACK_CHANGES = {"name": "Kẻ Mạo Danh", "email": "ke.mao.danh@example.com", "phone": "+84987654321"}


async def snapshot(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of a database, in a stable order."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")]
        return {t: sorted((tuple(r) for r in await conn.fetch(f"SELECT * FROM {t}")), key=repr) for t in tables}
    finally:
        await conn.close()


def _task(system: str, action: Action, identifiers: dict[str, str], case_id: uuid.UUID) -> Any:
    return make_task(
        system, action, identifiers, case_id=case_id,
        right="restriction" if action == Action.lift_restriction else None,
        changes=ATTACK_CHANGES if action == Action.rectify else None,
    )


async def _attack(worker: Any, system: str, dsn: str, action: Action, identifiers: dict[str, str]) -> None:
    """A task naming two people: nothing exported, nothing changed, in the system's own database."""
    case_id = uuid.uuid4()
    if action == Action.lift_restriction:  # something to lift: both were restricted by this case
        for p in (IN_BOTH, B):
            restricted = await run_task(worker, make_task(system, Action.restrict, p.identifiers(), case_id=case_id))
            assert restricted.status == ReceiptStatus.succeeded
    before = await snapshot(dsn)
    assert any(before.values())
    store = MemoryExportStore()
    receipt = await run_task(worker, _task(system, action, identifiers, case_id), store=store)
    assert receipt.status == ReceiptStatus.conflict, (action, receipt.error)
    assert receipt.artifacts == [] and store.keys() == []
    assert receipt.error is not None and "different people" in receipt.error
    for value in (*identifiers.values(), IN_BOTH.email, B.email, IN_BOTH.phone, B.phone, IN_BOTH.full_name):
        assert value not in receipt.error
    assert await snapshot(dsn) == before


# every action about one person (export_all and erase_all are about a whole client company: no identifiers)
@pytest.mark.parametrize("action", [a for a in crm.SYSTEM.actions if a not in (Action.export_all, Action.erase_all)],
                         ids=str)
async def test_crm_identifiers_of_two_people_change_nothing(crm_dsn: str, action: Action) -> None:
    await _attack(crm.worker, "crm", crm_dsn, action, {"email": IN_BOTH.email, "phone": B.phone})


@pytest.mark.parametrize("action", billing.SYSTEM.actions, ids=str)
@pytest.mark.parametrize("mix", ["email+phone", "customer_id+email"])
async def test_billing_identifiers_of_two_people_change_nothing(billing_dsn: str, action: Action, mix: str) -> None:
    identifiers = ({"email": IN_BOTH.email, "phone": B.phone} if mix == "email+phone"
                   else {"customer_id": IN_BOTH.customer_id, "email": B.email})
    await _attack(billing.worker, "billing", billing_dsn, action, identifiers)


async def test_both_systems_refuse_the_same_mixed_request_and_keep_both_people(crm_dsn: str, billing_dsn: str) -> None:
    """The identity attack end to end: A's email with B's phone, for export, erase, rectify and
    restrict, against both systems; then both people are still whole, and each alone is found."""
    crm_before, billing_before = await snapshot(crm_dsn), await snapshot(billing_dsn)
    store = MemoryExportStore()
    mixed = {"email": IN_BOTH.email, "phone": B.phone}
    for action in (Action.export, Action.erase, Action.rectify, Action.restrict):
        for worker, system in ((crm.worker, "crm"), (billing.worker, "billing")):
            receipt = await run_task(worker, _task(system, action, mixed, uuid.uuid4()), store=store)
            assert receipt.status == ReceiptStatus.conflict, (system, action)
    assert store.keys() == []
    assert await snapshot(crm_dsn) == crm_before and await snapshot(billing_dsn) == billing_before
    for p in (IN_BOTH, B):
        for worker, system in ((crm.worker, "crm"), (billing.worker, "billing")):
            found = await run_task(worker, make_task(system, Action.export, p.identifiers()))
            assert found.status == ReceiptStatus.succeeded and found.counts["located"] == 1


async def test_a_phone_written_locally_finds_the_person_in_both_systems(crm_dsn: str, billing_dsn: str) -> None:
    assert IN_BOTH.phone == "+84901234567"
    for worker, system, key in ((crm.worker, "crm", "contacts"), (billing.worker, "billing", "customers")):
        with_email = make_task(system, Action.export, {"phone": "0901234567", "email": IN_BOTH.email})
        alone = make_task(system, Action.export, {"phone": "0901234567"})
        # As an older coordinator would send it: the number exactly as the person wrote it.
        raw = alone.model_copy(update={"identifiers": {IdentifierType.phone: "0901 234 567"}})
        for task in (with_email, alone, raw):
            store = MemoryExportStore()
            receipt = await run_task(worker, task, store=store)
            assert receipt.status == ReceiptStatus.succeeded, (system, receipt.error)
            [found] = export_doc(store, receipt.artifacts)[key]
            assert (found["email"], found["phone"]) == (IN_BOTH.email, IN_BOTH.phone)
    # And an erasure by the local number alone takes A's contact, nobody else's.
    erased = await run_task(crm.worker, make_task("crm", Action.erase, {"phone": "0901234567"}))
    assert erased.status == ReceiptStatus.succeeded and erased.counts["contacts"] == 1
    assert await _fetch(crm_dsn, "SELECT 1 FROM contacts WHERE phone = $1", IN_BOTH.phone) == []
    assert await _count(crm_dsn, "contacts") == len(people.people_in("crm")) - 1
