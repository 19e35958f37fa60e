"""The billing system's dsrflow worker: export a customer's invoices; erase by anonymising.

Invoices and payments are accounting records that Vietnamese law requires to be kept, so an
erasure anonymises the customer and keeps them, and the receipt reports what was kept and
under which provision (status ``retained``). A customer with no invoices is deleted outright.

Run it with ``dsrflow worker billing`` (or ``python -m dsrflow.worker examples.billing.worker``).
Its database is ``DSRFLOW_BILLING_DSN``, else the database ``billing`` on the case store's server.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from dsrflow.events import RetainedItem
from dsrflow.registry import Retention, SystemDeclaration
from dsrflow.rights import Action, IdentifierType
from dsrflow.worker import Result, TaskContext, Worker

from ..common import Database, open_with, rowcount, setup_database
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
    description="Billing: customers, invoices (hóa đơn) and payments",
    identifier_types=(IdentifierType.email, IdentifierType.phone, IdentifierType.customer_id),
    categories=(
        "user.name",
        "user.contact.email",
        "user.contact.phone_number",
        "user.contact.address",
        "user.government_id",
        "user.unique_id",
        FINANCIAL,
    ),
    actions=(Action.export, Action.erase),
    retention=(
        # 10 calendar years plus the up to three leap days they contain.
        Retention(category=FINANCIAL, legal_basis=LEGAL_BASIS, period=timedelta(days=365 * RETENTION_YEARS + 3)),
    ),
)

worker = Worker(SYSTEM)
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


# Anonymised customers are no longer found: they hold nothing that identifies anyone.
_MATCH = "anonymised_at IS NULL AND (email = $1::text OR phone = $2::text OR id = $3::text)"


def _keys(ctx: TaskContext) -> tuple[str | None, str | None, str | None]:
    ids = ctx.identifiers
    return ids.get(IdentifierType.email), ids.get(IdentifierType.phone), ids.get(IdentifierType.customer_id)


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


@worker.handler(Action.export)
async def export(ctx: TaskContext) -> Result:
    """The customer record(s) with every invoice and its payments."""
    email, phone, customer_id = _keys(ctx)
    async with db.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        customers = await conn.fetch(
            f"""SELECT id, full_name, email, phone, tax_code, billing_address, created_at
                FROM customers WHERE {_MATCH} ORDER BY id""",
            email, phone, customer_id,
        )
        if not customers:
            return Result.not_found()
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
            }
            for c in customers
        ],
    }
    records = len(customers) + len(invoices) + len(payments)
    artifact = await ctx.export(doc, records=records)
    return Result.succeeded(
        counts={"located": len(customers), "records": records},
        categories=_categories(list(customers), len(invoices)),
        artifacts=[artifact],
    )


@worker.handler(Action.erase)
async def erase(ctx: TaskContext) -> Result:
    """Anonymise customers with invoices (keeping invoices and payments), delete those without.

    One transaction; afterwards nothing may identify the subject. Erasing twice finds no
    customer the second time: not_found.
    """
    email, phone, customer_id = _keys(ctx)
    async with db.pool.acquire() as conn:
        async with conn.transaction():
            customers = await conn.fetch(
                f"""SELECT id, email, phone, tax_code, billing_address FROM customers
                    WHERE {_MATCH} ORDER BY id FOR UPDATE""",
                email, phone, customer_id,
            )
            if not customers:
                return Result.not_found()
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
            deleted = rowcount(await conn.execute("DELETE FROM customers WHERE id = ANY($1)", without))
            anonymised = rowcount(
                await conn.execute(
                    """UPDATE customers SET full_name = $2, email = NULL, phone = NULL, tax_code = NULL,
                              billing_address = NULL, anonymised_at = now()
                       WHERE id = ANY($1)""",
                    with_invoices, ANONYMISED,
                )
            )
        left = await conn.fetchval(
            f"""SELECT (SELECT count(*) FROM customers WHERE {_MATCH})
                     + (SELECT count(*) FROM customers WHERE id = ANY($4) AND (
                           full_name <> $5 OR email IS NOT NULL OR phone IS NOT NULL
                           OR tax_code IS NOT NULL OR billing_address IS NOT NULL OR anonymised_at IS NULL))
                     + (SELECT count(*) FROM customers WHERE id = ANY($6))""",
            email, phone, customer_id, with_invoices, ANONYMISED, without,
        )
    if left:
        return Result.failed(f"{left} customer row(s) still identify the subject after erasure", retryable=True)
    n_invoices = sum(r["invoices"] for r in kept)
    retained_records = n_invoices + sum(r["payments"] for r in kept)
    counts = {"located": len(customers), "anonymised": anonymised, "deleted": deleted, "retained": retained_records}
    categories = _categories(list(customers), n_invoices)
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
