"""The billing system's dsrflow worker: export, erase by anonymising, rectify, restrict.

Invoices and payments are accounting records that Vietnamese law requires to be kept, so an
erasure anonymises the customer and keeps them, and the receipt reports what was kept and
under which provision (status ``retained``). A customer with no invoices is deleted outright.
A rectification corrects the customer record; invoices already issued keep the details printed
on them. A restriction keeps the records and stops the rest: no payment reminders
(processing.dunning_candidates) until it is lifted.

Every handler acts only on the customers that *all* the task's identifiers agree on
(:meth:`TaskContext.match`); identifiers that point to different people end the task as
``conflict`` and change nothing. Billing does no marketing, tracking or profiling: it declares
its purposes, so dsrflow does not ask it for those opt-outs.

Run it with ``dsrflow worker billing`` (or ``python -m dsrflow.worker examples.billing.worker``).
Its database is ``DSRFLOW_BILLING_DSN``, else the database ``billing`` on the case store's server.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from dsrflow.events import RetainedItem
from dsrflow.identity import SubjectMatch
from dsrflow.registry import Retention, SystemDeclaration
from dsrflow.rights import Action, IdentifierType
from dsrflow.worker import Result, TaskContext, Worker

from ..common import (
    Database,
    Parser,
    Refusal,
    answering,
    lift_records,
    open_with,
    own_ledger,
    parse_email,
    parse_name,
    parse_phone,
    parse_text,
    read_changes,
    require_one_person,
    restrict_records,
    rowcount,
    setup_database,
    subject_identifiers,
    task_purposes,
)
from . import seed as seed_data

NAME = "billing"
SCHEMA = Path(__file__).with_name("schema.sql")
_SETUP_LOCK = 0x62696C6C  # "bill": serialises concurrent setup() calls

FINANCIAL = "user.financial"
RETENTION_YEARS = 10
LEGAL_BASIS = (
    "Vietnam Law on Accounting 88/2015/QH13 Art 41(5) and Decree 174/2016/ND-CP Art 12 and Art 15: "
    "accounting vouchers used directly for bookkeeping and financial statements (invoices, payment records) "
    "are kept for at least 10 years from the end of the annual accounting period"
)
ANONYMISED = "anonymised"

SYSTEM = SystemDeclaration(
    name=NAME,
    description=(
        "Billing (an ERP's invoicing and accounting module): customers, e-invoices (hóa đơn điện tử) and payments"
    ),
    identifier_types=(IdentifierType.email, IdentifierType.phone, IdentifierType.customer_id),
    categories=(
        "user.name",
        "user.contact.email",
        "user.contact.phone_number",
        "user.contact.address",
        "user.government_id",
        "user.unique_id",
        FINANCIAL,
        "user.privacy_preferences",
    ),
    actions=(Action.export, Action.erase, Action.rectify, Action.restrict, Action.lift_restriction),
    retention=(
        # 10 calendar years plus the up to three leap days they contain.
        Retention(category=FINANCIAL, legal_basis=LEGAL_BASIS, period=timedelta(days=365 * RETENTION_YEARS + 3)),
    ),
    # fideslang data uses: invoicing and collecting payment, accounting and tax, legal obligations.
    # No marketing, tracking or profiling: dsrflow does not ask billing for those opt-outs.
    purposes=("essential.service.payment_processing", "finance", "essential.legal_obligation"),
    recipients=(
        "tax authority: e-invoices, through the e-invoice service provider (Decree 123/2020/ND-CP)",
        "independent auditors",
        "banks and payment intermediaries: payment reconciliation",
    ),
    processors=(
        "e-invoice service provider (T-VAN)",
        "payment gateway",
        "cloud hosting provider, data centre in Việt Nam",
    ),
    operated_by="controller",
    storage_country="VN",
    backup_retention=timedelta(days=35),
)

worker = Worker(SYSTEM, ledger=own_ledger(NAME))  # the task ledger in its own database
db = Database(NAME)


async def setup(dsn: str, *, seed: bool = True) -> None:
    """Create the database and its tables if missing; seed them if ``seed`` and empty."""
    await setup_database(dsn, schema=SCHEMA, lock=_SETUP_LOCK, seed=seed_data.seed if seed else None,
                         seeded_table="customers")


open_with(worker, db, setup)


def retain_until(latest_issued_on: date) -> datetime:
    """The end of the retention period of invoices issued up to ``latest_issued_on``.

    The 10 years run from the end of the annual accounting period in which the document was
    made (Decree 174/2016/ND-CP Art 15); this system's accounting year is the calendar year.
    """
    return datetime(latest_issued_on.year + RETENTION_YEARS, 12, 31, 23, 59, 59, tzinfo=UTC)


# -- finding the subject -------------------------------------------------------------------------

#: identifier type -> the customers column that holds it
_FIELDS = {"email": "email", "phone": "phone", "customer_id": "id"}
_CUSTOMER = ("id", "full_name", "email", "phone", "tax_code", "billing_address", "created_at")

# Customers found by any identifier, and those this very case already rectified (see _locate).
# Anonymised customers are no longer found: they hold nothing that identifies anyone.
_CANDIDATES = f"""
SELECT {", ".join(_CUSTOMER)} FROM customers
WHERE anonymised_at IS NULL
  AND (email = $1::text OR phone = $2::text OR id = $3::text
       OR id IN (SELECT customer_id FROM rectifications WHERE case_id = $4::uuid))
ORDER BY id"""


async def _locate(
    conn: asyncpg.Connection, ctx: TaskContext, *, lock: bool
) -> tuple[SubjectMatch[dict[str, Any]], list[asyncpg.Record]]:
    """The match of the task's identifiers over the customers, and the customers to act on. A
    customer whose email or phone this case already corrected is compared with the value the task
    was sent with, so a second delivery of the rectification finds it again."""
    ids = subject_identifiers(ctx)
    rows = await conn.fetch(
        _CANDIDATES + (" FOR UPDATE" if lock else ""),
        ids.get(IdentifierType.email), ids.get(IdentifierType.phone), ids.get(IdentifierType.customer_id),
        ctx.task.case_id,
    )
    corrected: dict[str, set[str]] = {}
    for r in await conn.fetch("SELECT customer_id, field FROM rectifications WHERE case_id = $1", ctx.task.case_id):
        corrected.setdefault(r["customer_id"], set()).add(r["field"])
    views = []
    for r in rows:
        view = {col: r[col] for col in _FIELDS.values()}
        for field in corrected.get(r["id"], set()) & {"email", "phone"}:
            if IdentifierType(field) in ids:
                view[field] = ids[IdentifierType(field)]
        views.append(view)
    match = ctx.match(views, _FIELDS)
    by_id = {r["id"]: r for r in rows}
    return match, [by_id[v["id"]] for v in match.records]


def _categories(customers: list[asyncpg.Record], n_invoices: int) -> list[str]:
    found = ["user.name", "user.unique_id"]
    for column, category in (
        ("email", "user.contact.email"),
        ("phone", "user.contact.phone_number"),
        ("billing_address", "user.contact.address"),
        ("tax_code", "user.government_id"),
    ):
        if any(c[column] for c in customers):
            found.append(category)
    if n_invoices:
        found.append(FINANCIAL)
    return found


# -- export and erase ----------------------------------------------------------------------------


@worker.handler(Action.export)
@answering
async def export(ctx: TaskContext) -> Result:
    """The customer record(s) with every invoice and its payments, and any restriction."""
    async with db.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        match, customers = await _locate(conn, ctx, lock=False)
        require_one_person(match)
        ids = [c["id"] for c in customers]
        invoices = await conn.fetch(
            """SELECT id, customer_id, number, issued_on, amount_vnd, vat_vnd, description
               FROM invoices WHERE customer_id = ANY($1) ORDER BY issued_on, number""",
            ids,
        )
        payments = await conn.fetch(
            """SELECT invoice_id, paid_on, amount_vnd, method FROM payments
               WHERE invoice_id = ANY($1) ORDER BY paid_on, id""",
            [i["id"] for i in invoices],
        )
        restrictions = await conn.fetch(
            """SELECT customer_id, purposes, since, lifted_at FROM restrictions
               WHERE customer_id = ANY($1) ORDER BY since, case_id""",
            ids,
        )
    doc: dict[str, Any] = {
        "system": NAME,
        "customers": [
            {
                "customer_id": c["id"],
                **{k: c[k] for k in ("full_name", "email", "phone", "tax_code", "billing_address", "created_at")},
                "invoices": [
                    {
                        **{k: i[k] for k in ("number", "issued_on", "amount_vnd", "vat_vnd", "description")},
                        "total_vnd": i["amount_vnd"] + i["vat_vnd"],
                        "payments": [
                            {k: p[k] for k in ("paid_on", "amount_vnd", "method")}
                            for p in payments
                            if p["invoice_id"] == i["id"]
                        ],
                    }
                    for i in invoices
                    if i["customer_id"] == c["id"]
                ],
                "restrictions": [
                    {"purposes": r["purposes"] or "all processing", "since": r["since"], "lifted_at": r["lifted_at"]}
                    for r in restrictions if r["customer_id"] == c["id"]
                ],
            }
            for c in customers
        ],
    }
    records = len(customers) + len(invoices) + len(payments) + len(restrictions)
    artifact = await ctx.export(doc, records=records)
    return Result.succeeded(
        counts={"located": len(customers), "records": records},
        categories=_categories(customers, len(invoices)),
        artifacts=[artifact],
    )


@worker.handler(Action.erase)
@answering
async def erase(ctx: TaskContext) -> Result:
    """Anonymise customers with invoices (keeping invoices and payments), delete those without.

    One transaction; afterwards nothing may identify the subject. Erasing twice finds no
    customer the second time: not_found.
    """
    async with db.pool.acquire() as conn:
        async with conn.transaction():
            match, customers = await _locate(conn, ctx, lock=True)
            require_one_person(match)
            ids = [c["id"] for c in customers]
            kept = await conn.fetch(
                """SELECT i.customer_id, count(DISTINCT i.id) AS invoices, count(p.id) AS payments,
                          max(i.issued_on) AS latest
                   FROM invoices i LEFT JOIN payments p ON p.invoice_id = i.id
                   WHERE i.customer_id = ANY($1) GROUP BY i.customer_id""",
                ids,
            )
            with_invoices = [r["customer_id"] for r in kept]
            without = [i for i in ids if i not in set(with_invoices)]
            # What the person asked of billing goes with them: it would say who they were.
            for table in ("restrictions", "rectifications"):
                await conn.execute(f"DELETE FROM {table} WHERE customer_id = ANY($1)", ids)
            deleted = rowcount(await conn.execute("DELETE FROM customers WHERE id = ANY($1)", without))
            anonymised = rowcount(
                await conn.execute(
                    """UPDATE customers SET full_name = $2, email = NULL, phone = NULL, tax_code = NULL,
                              billing_address = NULL, anonymised_at = now()
                       WHERE id = ANY($1)""",
                    with_invoices, ANONYMISED,
                )
            )
        again, _ = await _locate(conn, ctx, lock=False)
        left = len(again.found) + await conn.fetchval(
            """SELECT (SELECT count(*) FROM customers WHERE id = ANY($1) AND (
                           full_name <> $2 OR email IS NOT NULL OR phone IS NOT NULL
                           OR tax_code IS NOT NULL OR billing_address IS NOT NULL OR anonymised_at IS NULL))
                    + (SELECT count(*) FROM customers WHERE id = ANY($3))
                    + (SELECT count(*) FROM restrictions WHERE customer_id = ANY($4))
                    + (SELECT count(*) FROM rectifications WHERE customer_id = ANY($4))""",
            with_invoices, ANONYMISED, without, ids,
        )
    if left:
        return Result.failed(f"{left} customer row(s) still identify the subject after erasure", retryable=True)
    n_invoices = sum(r["invoices"] for r in kept)
    retained_records = n_invoices + sum(r["payments"] for r in kept)
    counts = {"located": len(customers), "anonymised": anonymised, "deleted": deleted, "retained": retained_records}
    categories = _categories(customers, n_invoices)
    if not kept:
        return Result.succeeded(counts=counts, categories=categories)
    return Result.retained(
        [
            RetainedItem(
                category=FINANCIAL,
                records=retained_records,
                legal_basis=LEGAL_BASIS,
                retain_until=retain_until(max(r["latest"] for r in kept)),
            )
        ],
        counts=counts,
        categories=categories,
    )


# -- rectify -------------------------------------------------------------------------------------


def parse_tax_code(raw: str) -> str:
    """A Vietnamese tax code (mã số thuế): 10 digits, 10 digits and a 3-digit branch suffix, or,
    for a person since July 2025, the 12-digit personal identification number."""
    code = raw.strip().replace(" ", "")
    if not re.fullmatch(r"\d{10}(-\d{3})?|\d{12}", code):
        raise ValueError("a tax code has 10 digits (or 10-3), or is a 12-digit personal identification number")
    return code


#: category -> (customers column, parser): what billing can correct. The address is one line.
_CORRECTABLE: dict[str, tuple[str, Parser]] = {
    "user.name": ("full_name", parse_name),
    "user.contact.email": ("email", parse_email),
    "user.contact.phone_number": ("phone", parse_phone),
    "user.contact.address": ("billing_address", parse_text),
    "user.government_id": ("tax_code", parse_tax_code),
}
_CATEGORY_OF = {column: category for category, (column, _) in _CORRECTABLE.items()}


@worker.handler(Action.rectify)
@answering
async def rectify(ctx: TaskContext) -> Result:
    """Correct the customer record: name, email, phone, billing address, tax code. Invoices
    already issued are accounting records and keep the details printed on them; the corrected
    details appear from the next invoice (counted as ``invoices_unchanged``). A field billing does
    not keep, or a value that is not valid, refuses the task and changes nothing."""
    fixes = read_changes(ctx.task.changes, _CORRECTABLE, system=NAME)
    async with db.pool.acquire() as conn, conn.transaction():
        match, customers = await _locate(conn, ctx, lock=True)
        require_one_person(match)
        ids = [c["id"] for c in customers]
        for column in ("email", "phone"):
            if column in fixes and await conn.fetchval(
                f"""SELECT EXISTS (SELECT 1 FROM customers
                                   WHERE {column} = $1 AND NOT id = ANY($2) AND anonymised_at IS NULL)""",
                fixes[column], ids,
            ):
                raise Refusal(f"the corrected {column} is already another customer's: a person must check whether "
                              "they are the same person before merging")
        changed = sum(1 for c in customers for column, value in fixes.items() if c[column] != value)
        assignments = ", ".join(f"{column} = ${i}" for i, column in enumerate(fixes, start=2))
        await conn.execute(f"UPDATE customers SET {assignments} WHERE id = ANY($1)", ids, *fixes.values())
        await conn.execute(
            """INSERT INTO rectifications (case_id, customer_id, field)
               SELECT $1, c, f FROM unnest($2::text[]) AS c CROSS JOIN unnest($3::text[]) AS f
               ON CONFLICT DO NOTHING""",
            ctx.task.case_id, ids, sorted(fixes),
        )
        invoices = await conn.fetchval("SELECT count(*) FROM invoices WHERE customer_id = ANY($1)", ids)
    return Result.succeeded(
        counts={"rectified": len(customers), "fields": len(fixes), "changed": changed,
                "invoices_unchanged": invoices},
        categories=sorted({_CATEGORY_OF[column] for column in fixes}),
    )


# -- restriction ---------------------------------------------------------------------------------


@worker.handler(Action.restrict)
@answering
async def restrict(ctx: TaskContext) -> Result:
    """Keep the records the law requires, stop the rest: a restriction for this case (all
    processing, or the purposes an objection names). A restricted customer gets no payment
    reminders (processing.dunning_candidates). Counts as the CRM's."""
    purposes = task_purposes(ctx)
    async with db.pool.acquire() as conn, conn.transaction():
        match, customers = await _locate(conn, ctx, lock=True)
        require_one_person(match)
        counts = await restrict_records(conn, "customer_id", [c["id"] for c in customers], ctx.task.case_id, purposes)
    return Result.succeeded(counts=counts, categories=["user.privacy_preferences"])


@worker.handler(Action.lift_restriction)
@answering
async def lift_restriction(ctx: TaskContext) -> Result:
    """Lift the restriction this case set (the row stays, with ``lifted_at``); reminders resume.
    not_found when this case restricted none of the customers."""
    async with db.pool.acquire() as conn, conn.transaction():
        match, customers = await _locate(conn, ctx, lock=True)
        require_one_person(match)
        lifted, total = await lift_records(conn, "customer_id", [c["id"] for c in customers], ctx.task.case_id)
    if not total:
        return Result.not_found(counts={"located": len(customers)})
    return Result.succeeded(counts={"lifted": lifted, "already_lifted": total - lifted},
                            categories=["user.privacy_preferences"])
