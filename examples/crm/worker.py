"""The CRM's dsrflow worker: export and erase a contact with their addresses and notes.

Run it with ``dsrflow worker crm`` (or ``python -m dsrflow.worker examples.crm.worker``).
Its database is ``DSRFLOW_CRM_DSN``, else the database ``crm`` on the case store's server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

from dsrflow.registry import SystemDeclaration
from dsrflow.rights import Action, IdentifierType
from dsrflow.worker import Result, TaskContext, Worker

from ..common import Database, open_with, rowcount, setup_database
from . import seed as seed_data

NAME = "crm"
SCHEMA = Path(__file__).with_name("schema.sql")
_SETUP_LOCK = 0x63726D  # "crm": serialises concurrent setup() calls

SYSTEM = SystemDeclaration(
    name=NAME,
    description="Customer relationship management: contacts, addresses, notes from support and sales",
    identifier_types=(IdentifierType.email, IdentifierType.phone),
    categories=(
        "user.name",
        "user.contact.email",
        "user.contact.phone_number",
        "user.contact.address",
        "user.demographic.date_of_birth",
        "user.privacy_preferences",
        "user.content.private",
    ),
    actions=(Action.export, Action.erase),
)

worker = Worker(SYSTEM)
db = Database(NAME)


async def setup(dsn: str, *, seed: bool = True) -> None:
    """Create the database and its tables if missing; seed them if ``seed`` and empty."""
    await setup_database(dsn, schema=SCHEMA, lock=_SETUP_LOCK, seed=seed_data.seed if seed else None,
                         seeded_table="contacts")


open_with(worker, db, setup)


def _keys(ctx: TaskContext) -> tuple[str | None, str | None]:
    ids = ctx.identifiers
    return ids.get(IdentifierType.email), ids.get(IdentifierType.phone)


_MATCH = "(email = $1::text OR phone = $2::text)"


def _categories(contacts: list[asyncpg.Record], n_addresses: int, n_notes: int) -> list[str]:
    found = ["user.name"]
    if any(c["email"] for c in contacts):
        found.append("user.contact.email")
    if any(c["phone"] for c in contacts):
        found.append("user.contact.phone_number")
    if n_addresses:
        found.append("user.contact.address")
    if any(c["date_of_birth"] for c in contacts):
        found.append("user.demographic.date_of_birth")
    found.append("user.privacy_preferences")  # marketing_opt_in is always set
    if n_notes:
        found.append("user.content.private")
    return found


@worker.handler(Action.export)
async def export(ctx: TaskContext) -> Result:
    """Every contact matching the email or phone, with their addresses and notes."""
    email, phone = _keys(ctx)
    async with db.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        contacts = await conn.fetch(
            f"""SELECT id, full_name, email, phone, date_of_birth, marketing_opt_in, created_at
                FROM contacts WHERE {_MATCH} ORDER BY id""",
            email, phone,
        )
        if not contacts:
            return Result.not_found()
        ids = [c["id"] for c in contacts]
        addresses = await conn.fetch(
            "SELECT contact_id, kind, line, ward, district, city FROM addresses WHERE contact_id = ANY($1) ORDER BY id",
            ids,
        )
        notes = await conn.fetch(
            "SELECT contact_id, body, created_at FROM notes WHERE contact_id = ANY($1) ORDER BY created_at, id", ids
        )
    doc: dict[str, Any] = {
        "system": NAME,
        "contacts": [
            {
                **dict(c),
                "addresses": [
                    {k: a[k] for k in ("kind", "line", "ward", "district", "city")}
                    for a in addresses
                    if a["contact_id"] == c["id"]
                ],
                "notes": [
                    {"body": n["body"], "created_at": n["created_at"]}
                    for n in notes
                    if n["contact_id"] == c["id"]
                ],
            }
            for c in contacts
        ],
    }
    records = len(contacts) + len(addresses) + len(notes)
    artifact = await ctx.export(doc, records=records)
    return Result.succeeded(
        counts={"located": len(contacts), "records": records},
        categories=_categories(list(contacts), len(addresses), len(notes)),
        artifacts=[artifact],
    )


@worker.handler(Action.erase)
async def erase(ctx: TaskContext) -> Result:
    """Delete notes, addresses and contacts in foreign-key order in one transaction, then check
    that nothing is left. Erasing twice finds nothing the second time: not_found."""
    email, phone = _keys(ctx)
    async with db.pool.acquire() as conn:
        async with conn.transaction():
            contacts = await conn.fetch(
                f"SELECT id, email, phone, date_of_birth FROM contacts WHERE {_MATCH} ORDER BY id FOR UPDATE",
                email, phone,
            )
            if not contacts:
                return Result.not_found()
            ids = [c["id"] for c in contacts]
            n_notes = rowcount(await conn.execute("DELETE FROM notes WHERE contact_id = ANY($1)", ids))
            n_addresses = rowcount(await conn.execute("DELETE FROM addresses WHERE contact_id = ANY($1)", ids))
            n_contacts = rowcount(await conn.execute("DELETE FROM contacts WHERE id = ANY($1)", ids))
        # Verify after commit, as a reader would see it: a contact added meanwhile with the same
        # email or phone would still be here, and the retry erases it.
        left = await conn.fetchval(
            f"""SELECT (SELECT count(*) FROM contacts WHERE {_MATCH} OR id = ANY($3))
                     + (SELECT count(*) FROM addresses WHERE contact_id = ANY($3))
                     + (SELECT count(*) FROM notes WHERE contact_id = ANY($3))""",
            email, phone, ids,
        )
    if left:
        return Result.failed(f"{left} row(s) still match after erasure", retryable=True)
    return Result.succeeded(
        counts={
            "located": len(contacts),
            "erased": n_contacts + n_addresses + n_notes,
            "contacts": n_contacts,
            "addresses": n_addresses,
            "notes": n_notes,
        },
        categories=_categories(list(contacts), n_addresses, n_notes),
    )
