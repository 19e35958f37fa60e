"""Billing seed data, derived from examples.people: every person whose systems include "billing".

Invoices come from a generator seeded per person, so the data is the same on every run.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from datetime import date, timedelta

import asyncpg

from ..people import BILLING_WITHOUT_INVOICES, Person, people_in

_SERVICES = [
    ("Cloud Server 2 vCPU / 4 GB RAM - tháng {m:02d}/{y}", 450_000),
    ("Cloud Server 4 vCPU / 8 GB RAM - tháng {m:02d}/{y}", 890_000),
    ("Hosting WordPress Pro - 12 tháng từ {m:02d}/{y}", 1_560_000),
    ("Tên miền .vn - gia hạn 1 năm ({m:02d}/{y})", 750_000),
    ("Email doanh nghiệp 10 hộp thư - 12 tháng từ {m:02d}/{y}", 2_400_000),
    ("Chứng chỉ SSL - 1 năm ({m:02d}/{y})", 1_200_000),
    ("Internet cáp quang 150 Mbps - tháng {m:02d}/{y}", 220_000),
]
_METHODS = ["bank_transfer", "card", "e_wallet", "cash"]
VAT_RATE_PERCENT = 10


@dataclass(frozen=True, slots=True)
class Invoice:
    number: str
    issued_on: date
    amount_vnd: int
    vat_vnd: int
    description: str
    payments: tuple[tuple[date, int, str], ...]  # (paid_on, amount_vnd, method)


def customers() -> list[Person]:
    return people_in("billing")


def tax_code(p: Person) -> str | None:
    """A ten-digit personal tax code for every other customer."""
    return f"8{(p.number * 7_919_003) % 10**9:09d}" if p.number % 2 == 0 else None


def invoices(p: Person) -> list[Invoice]:
    if p == BILLING_WITHOUT_INVOICES:
        return []
    rng = random.Random(f"billing-{p.number}")
    out = []
    for k in range(1 + p.number % 4):
        issued = date(2021, 1, 1) + timedelta(days=rng.randrange(0, 4 * 365 + 150))
        text, price = _SERVICES[rng.randrange(len(_SERVICES))]
        amount = price * rng.choice([1, 1, 1, 2, 3])
        vat = amount * VAT_RATE_PERCENT // 100
        total = amount + vat
        paid_on = issued + timedelta(days=rng.randrange(0, 20))
        method = _METHODS[rng.randrange(len(_METHODS))]
        if (p.number + k) % 5 == 0:
            payments: tuple[tuple[date, int, str], ...] = ()  # not paid yet
        elif (p.number + k) % 7 == 0:
            half = total // 2
            payments = ((paid_on, half, method), (paid_on + timedelta(days=30), total - half, method))
        else:
            payments = ((paid_on, total, method),)
        out.append(
            Invoice(
                number="",  # numbered below, in issue order
                issued_on=issued,
                amount_vnd=amount,
                vat_vnd=vat,
                description=text.format(m=issued.month, y=issued.year),
                payments=payments,
            )
        )
    out.sort(key=lambda i: i.issued_on)
    return [
        dataclasses.replace(inv, number=f"1C{inv.issued_on.year % 100:02d}TAA-{p.number * 100 + k:07d}")
        for k, inv in enumerate(out)
    ]


async def seed(conn: asyncpg.Connection) -> int:
    """Insert every billing customer with invoices and payments; returns the number of customers."""
    people = customers()
    await conn.executemany(
        """INSERT INTO customers (id, full_name, email, phone, tax_code, billing_address, created_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7::date)""",
        [
            (p.customer_id, p.full_name, p.email, p.phone, tax_code(p), p.address.one_line(),
             date(2020, 6, 1) + timedelta(days=23 * p.number))
            for p in people
        ],
    )
    for p in people:
        for inv in invoices(p):
            invoice_id = await conn.fetchval(
                """INSERT INTO invoices (customer_id, number, issued_on, amount_vnd, vat_vnd, description)
                   VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
                p.customer_id, inv.number, inv.issued_on, inv.amount_vnd, inv.vat_vnd, inv.description,
            )
            await conn.executemany(
                "INSERT INTO payments (invoice_id, paid_on, amount_vnd, method) VALUES ($1, $2, $3, $4)",
                [(invoice_id, *pay) for pay in inv.payments],
            )
    return len(people)
