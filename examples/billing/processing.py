"""What the billing system does with personal data beyond keeping its records, and how a
restriction stops it.

A restriction in force (all processing, or an objection naming a purpose that overlaps the
one below) leaves the customer's invoices and payments where the Law on Accounting wants them,
and takes the customer out of :func:`dunning_candidates`: no payment reminders.
"""

from __future__ import annotations

import asyncpg

#: The data use of payment reminders (fideslang).
DUNNING = "essential.service.payment_processing"


async def dunning_candidates(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Customers with unpaid invoices who may be sent a payment reminder: not anonymised, and no
    restriction in force that covers payment processing (or all processing). One row per
    customer with what is outstanding."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """WITH due AS (
               SELECT i.customer_id, i.number,
                      i.amount_vnd + i.vat_vnd - COALESCE((SELECT sum(p.amount_vnd) FROM payments p
                                                          WHERE p.invoice_id = i.id), 0) AS outstanding
               FROM invoices i)
           SELECT c.id, c.full_name, c.email, c.phone, sum(d.outstanding)::bigint AS outstanding_vnd,
                  array_agg(d.number ORDER BY d.number) AS invoices
           FROM customers c JOIN due d ON d.customer_id = c.id
           WHERE d.outstanding > 0 AND c.anonymised_at IS NULL
             AND NOT EXISTS (
                 SELECT 1 FROM restrictions r
                 WHERE r.customer_id = c.id AND r.lifted_at IS NULL
                   AND (r.purposes IS NULL
                        OR EXISTS (SELECT 1 FROM unnest(r.purposes) AS p(purpose)
                                   WHERE purposes_overlap(p.purpose, $1))))
           GROUP BY c.id ORDER BY c.id""",
        DUNNING,
    )
    return rows
