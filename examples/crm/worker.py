"""The CRM's dsrflow worker: every action a person's rights ask of the CRM.

Every handler finds its candidates by any of the task's identifiers, then acts only on the
contacts that *all* of them agree on (:meth:`TaskContext.match`): when the identifiers point to
different people (one person's email, another's phone) the task ends as ``conflict`` and nothing
is exported, erased or changed. The match runs inside the handler's transaction, before any
write, on rows locked ``FOR UPDATE``. Every handler is idempotent: a task delivered twice leaves
the same rows and gives a receipt that says what the second run found.

What each action does, and what stops (processing.py holds the queries the CRM's features run):

- export: contacts with addresses, notes, tracking identifiers, consents, restrictions;
- erase: deletes all of that; a suppression-list entry (a keyed hash) is kept, and reported;
- rectify: name, email, phone, home address, date of birth;
- restrict / lift_restriction: a restriction per case, for all processing or the purposes an
  objection names; the newsletter, ad audiences, lead scoring and analytics skip it;
- revoke_consent: the named purposes' consents, or all, are withdrawn;
- suppress_marketing: opt-in off and the email and phone on the suppression list;
- suppress_sale_share, suppress_tracking, stop_automated: the contact's opt-out flags.

Run it with ``dsrflow worker crm`` (or ``python -m dsrflow.worker examples.crm.worker``).
Its database is ``DSRFLOW_CRM_DSN``, else the database ``crm`` on the case store's server.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

from dsrflow.events import RetainedItem
from dsrflow.identity import SubjectMatch
from dsrflow.registry import SystemDeclaration
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
    parse_date,
    parse_email,
    parse_name,
    parse_phone,
    parse_text,
    purposes_overlap,
    read_changes,
    require_one_person,
    restrict_records,
    rowcount,
    setup_database,
    subject_identifiers,
    task_purposes,
)
from . import seed as seed_data
from .processing import NEWSLETTER, add_suppressions, listed_suppressions, suppression_entries

NAME = "crm"
SCHEMA = Path(__file__).with_name("schema.sql")
_SETUP_LOCK = 0x63726D  # "crm": serialises concurrent setup() calls

PREFERENCES = "user.privacy_preferences"
SUPPRESSION_BASIS = (
    "Vietnam Law 91/2025/QH15 Art 28(5) (the right to stop receiving advertising) and GDPR Art 21(3): "
    "kept so that the person's objection to direct marketing stays honoured after erasure and on any "
    "re-import; only a keyed hash (HMAC-SHA256) of the email and phone, from which neither can be read back"
)

SYSTEM = SystemDeclaration(
    name=NAME,
    description=(
        "Customer relationship management (an ERP's CRM module): contacts, addresses, sales and support "
        "notes, consents, the marketing newsletter, website and app tracking, automated lead scoring"
    ),
    identifier_types=(IdentifierType.email, IdentifierType.phone, IdentifierType.cookie_id, IdentifierType.device_id),
    categories=(
        "user.name",
        "user.contact.email",
        "user.contact.phone_number",
        "user.contact.address",
        "user.demographic.date_of_birth",
        PREFERENCES,
        "user.content.private",
        "user.device.cookie_id",
        "user.device.device_id",
    ),
    actions=(
        Action.export, Action.erase, Action.rectify, Action.restrict, Action.lift_restriction, Action.revoke_consent,
        Action.suppress_marketing, Action.suppress_sale_share, Action.suppress_tracking, Action.stop_automated,
        Action.export_all, Action.erase_all,
    ),
    purposes=(
        "essential.service",  # sales and customer support
        "marketing.communications",  # the newsletter, by email and Zalo OA
        "marketing.advertising.third_party",  # hashed custom audiences on advertising platforms
        "personalize",  # automated lead scoring
        "analytics",  # website and app analytics by cookie and device identifiers
    ),
    recipients=(
        "advertising platforms (e.g. Zalo Ads, Meta): hashed email and phone of contacts who consented, "
        "as custom audiences",
    ),
    processors=(
        "email and Zalo Official Account messaging provider (newsletter)",
        "cloud hosting provider, data centre in Việt Nam",
    ),
    operated_by="controller",
    storage_country="VN",
    sensitive_categories=("behavioural tracking: cookie and device identifiers linked to a contact",),
    backup_retention=timedelta(days=35),
)

worker = Worker(SYSTEM, ledger=own_ledger(NAME))  # the task ledger in its own database
db = Database(NAME)


async def setup(dsn: str, *, seed: bool = True) -> None:
    """Create the database and its tables if missing; seed them if ``seed`` and empty."""
    await setup_database(dsn, schema=SCHEMA, lock=_SETUP_LOCK, seed=seed_data.seed if seed else None,
                         seeded_table="contacts")


open_with(worker, db, setup)


# -- finding the subject -------------------------------------------------------------------------

#: identifier type -> the column of a candidate row that holds it
_FIELDS = {"email": "email", "phone": "phone", "cookie_id": "cookie_id", "device_id": "device_id"}
_CONTACT = ("id", "full_name", "email", "phone", "date_of_birth", "marketing_opt_in", "sale_share_opt_out",
            "tracking_opt_out", "automated_processing_opt_out", "created_at")

# Contacts found by any identifier. A contact has many cookies and devices: the cookie_id and
# device_id columns hold the task's one when the contact has it, else NULL (unknown, which agrees).
# Contacts this very case already rectified are candidates too (see _locate).
_CANDIDATES = f"""
SELECT {", ".join(f"c.{col}" for col in _CONTACT)},
       (SELECT t.value FROM tracking_ids t
        WHERE t.contact_id = c.id AND t.kind = 'cookie_id' AND t.value = $3::text LIMIT 1) AS cookie_id,
       (SELECT t.value FROM tracking_ids t
        WHERE t.contact_id = c.id AND t.kind = 'device_id' AND t.value = $4::text LIMIT 1) AS device_id
FROM contacts c
WHERE c.email = $1::text OR c.phone = $2::text
   OR c.id IN (SELECT contact_id FROM tracking_ids
               WHERE (kind = 'cookie_id' AND value = $3::text) OR (kind = 'device_id' AND value = $4::text))
   OR c.id IN (SELECT contact_id FROM rectifications WHERE case_id = $5::uuid)
ORDER BY c.id"""


async def _locate(
    conn: asyncpg.Connection, ctx: TaskContext, *, lock: bool
) -> tuple[SubjectMatch[dict[str, Any]], list[asyncpg.Record]]:
    """The match of the task's identifiers over the CRM's contacts, and the contacts to act on.

    A contact whose email or phone this case has already corrected is compared with the value the
    task was sent with: it agreed when the first delivery changed it, so a second delivery finds
    it again instead of seeing a conflict (or nothing)."""
    ids = subject_identifiers(ctx)
    rows = await conn.fetch(
        _CANDIDATES + (" FOR UPDATE OF c" if lock else ""),
        ids.get(IdentifierType.email), ids.get(IdentifierType.phone),
        ids.get(IdentifierType.cookie_id), ids.get(IdentifierType.device_id), ctx.task.case_id,
    )
    corrected: dict[int, set[str]] = {}
    for r in await conn.fetch("SELECT contact_id, field FROM rectifications WHERE case_id = $1", ctx.task.case_id):
        corrected.setdefault(r["contact_id"], set()).add(r["field"])
    views = []
    for r in rows:
        view = {"id": r["id"], **{col: r[col] for col in _FIELDS.values()}}
        for field in corrected.get(r["id"], set()) & {"email", "phone"}:
            if IdentifierType(field) in ids:
                view[field] = ids[IdentifierType(field)]
        views.append(view)
    match = ctx.match(views, _FIELDS)
    by_id = {r["id"]: r for r in rows}
    return match, [by_id[v["id"]] for v in match.records]


def _categories(contacts: list[asyncpg.Record], n_addresses: int, n_notes: int, tracking: list[str]) -> list[str]:
    found = ["user.name"]
    if any(c["email"] for c in contacts):
        found.append("user.contact.email")
    if any(c["phone"] for c in contacts):
        found.append("user.contact.phone_number")
    if n_addresses:
        found.append("user.contact.address")
    if any(c["date_of_birth"] for c in contacts):
        found.append("user.demographic.date_of_birth")
    found.append(PREFERENCES)  # the opt-in and opt-out flags are always set
    if n_notes:
        found.append("user.content.private")
    found += [f"user.device.{kind}" for kind in ("cookie_id", "device_id") if kind in tracking]
    return found


# -- export and erase ----------------------------------------------------------------------------


@worker.handler(Action.export)
@answering
async def export(ctx: TaskContext) -> Result:
    """Every contact the identifiers agree on, with addresses, notes, tracking identifiers,
    consents, restrictions and whether the suppression list holds them."""
    async with db.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        match, contacts = await _locate(conn, ctx, lock=False)
        require_one_person(match)
        ids = [c["id"] for c in contacts]
        addresses = await conn.fetch(
            "SELECT contact_id, kind, line, ward, district, city FROM addresses WHERE contact_id = ANY($1) ORDER BY id",
            ids,
        )
        notes = await conn.fetch(
            "SELECT contact_id, body, created_at FROM notes WHERE contact_id = ANY($1) ORDER BY created_at, id", ids
        )
        tracking = await conn.fetch(
            """SELECT contact_id, kind, value, first_seen FROM tracking_ids
               WHERE contact_id = ANY($1) ORDER BY kind, value""",
            ids,
        )
        consents = await conn.fetch(
            "SELECT contact_id, purpose, granted, updated_at FROM consents WHERE contact_id = ANY($1) ORDER BY purpose",
            ids,
        )
        restrictions = await conn.fetch(
            """SELECT contact_id, purposes, since, lifted_at FROM restrictions
               WHERE contact_id = ANY($1) ORDER BY since, case_id""",
            ids,
        )
        listed = await listed_suppressions(conn, suppression_entries((c["email"], c["phone"]) for c in contacts))

    def of(rows: list[asyncpg.Record], contact: asyncpg.Record, keys: tuple[str, ...]) -> list[dict[str, Any]]:
        return [{k: r[k] for k in keys} for r in rows if r["contact_id"] == contact["id"]]

    doc: dict[str, Any] = {
        "system": NAME,
        "contacts": [
            {
                **{k: c[k] for k in _CONTACT},
                "marketing_suppressed": bool(suppression_entries([(c["email"], c["phone"])]) & listed),
                "addresses": of(addresses, c, ("kind", "line", "ward", "district", "city")),
                "notes": of(notes, c, ("body", "created_at")),
                "tracking_ids": of(tracking, c, ("kind", "value", "first_seen")),
                "consents": of(consents, c, ("purpose", "granted", "updated_at")),
                "restrictions": [
                    {"purposes": r["purposes"] or "all processing", "since": r["since"], "lifted_at": r["lifted_at"]}
                    for r in restrictions if r["contact_id"] == c["id"]
                ],
            }
            for c in contacts
        ],
    }
    records = len(contacts) + len(addresses) + len(notes) + len(tracking) + len(consents) + len(restrictions)
    artifact = await ctx.export(doc, records=records)
    return Result.succeeded(
        counts={"located": len(contacts), "records": records},
        categories=_categories(contacts, len(addresses), len(notes), [t["kind"] for t in tracking]),
        artifacts=[artifact],
    )


_CHILDREN = ("notes", "addresses", "tracking_ids", "consents", "restrictions", "rectifications")


@worker.handler(Action.erase)
@answering
async def erase(ctx: TaskContext) -> Result:
    """Delete the contacts and every row about them, children first, in one transaction; then
    check that nothing is left. The suppression list keeps its keyed hashes of the person's email
    and phone, so that a later import cannot market to them again: the receipt then says
    ``retained``, with the basis. Erasing twice finds nothing the second time: not_found."""
    ids_given = subject_identifiers(ctx)
    async with db.pool.acquire() as conn:
        async with conn.transaction():
            match, contacts = await _locate(conn, ctx, lock=True)
            require_one_person(match)
            ids = [c["id"] for c in contacts]
            tracking = [r["kind"] for r in await conn.fetch(
                "SELECT DISTINCT kind FROM tracking_ids WHERE contact_id = ANY($1)", ids)]
            deleted = {
                table: rowcount(await conn.execute(f"DELETE FROM {table} WHERE contact_id = ANY($1)", ids))
                for table in _CHILDREN
            }
            n_contacts = rowcount(await conn.execute("DELETE FROM contacts WHERE id = ANY($1)", ids))
            kept = await listed_suppressions(conn, suppression_entries(
                [(c["email"], c["phone"]) for c in contacts]
                + [(ids_given.get(IdentifierType.email), ids_given.get(IdentifierType.phone))]))
        # Verify after commit, as a reader would see it: a contact added meanwhile with the same
        # identifiers would still be here, and the retry erases it.
        again, _ = await _locate(conn, ctx, lock=False)
        left = len(again.found) + await conn.fetchval(
            "SELECT " + " + ".join(f"(SELECT count(*) FROM {table} WHERE contact_id = ANY($1))" for table in _CHILDREN)
            + " + (SELECT count(*) FROM contacts WHERE id = ANY($1))",
            ids,
        )
    if left:
        return Result.failed(f"{left} row(s) still match after erasure", retryable=True)
    counts = {
        "located": len(contacts),
        "erased": n_contacts + sum(deleted[t] for t in _CHILDREN if t != "rectifications"),
        "contacts": n_contacts,
        **{t: deleted[t] for t in _CHILDREN if t != "rectifications"},
    }
    categories = _categories(contacts, deleted["addresses"], deleted["notes"], tracking)
    if not kept:
        return Result.succeeded(counts=counts, categories=categories)
    return Result.retained(
        [RetainedItem(category=PREFERENCES, records=len(kept), legal_basis=SUPPRESSION_BASIS)],
        counts={**counts, "suppression_entries_kept": len(kept)},
        categories=categories,
    )


# -- rectify -------------------------------------------------------------------------------------


def parse_address(raw: str) -> tuple[str, str | None, str | None, str]:
    """``(line, ward, district, city)`` from a one-line Vietnamese address: "street, ward,
    district, city", or "street, ward, city" (the two-level administration since July 2025), or
    "street, city". Extra leading parts (floor, building) stay in the line."""
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if len(parts) >= 4:
        return ", ".join(parts[:-3]), parts[-3], parts[-2], parts[-1]
    if len(parts) == 3:
        return parts[0], parts[1], None, parts[2]
    if len(parts) == 2:
        return parts[0], None, None, parts[1]
    raise ValueError("give the address as 'street, ward, district, city' or 'street, ward, city'")


#: category -> (field, parser): what the CRM can correct. Street and city alone change the home address.
_CORRECTABLE: dict[str, tuple[str, Parser]] = {
    "user.name": ("full_name", parse_name),
    "user.contact.email": ("email", parse_email),
    "user.contact.phone_number": ("phone", parse_phone),
    "user.contact.address": ("address", parse_address),
    "user.contact.address.street": ("address.line", parse_text),
    "user.contact.address.city": ("address.city", parse_text),
    "user.demographic.date_of_birth": ("date_of_birth", parse_date),
}
_COLUMNS = ("full_name", "email", "phone", "date_of_birth")
_CATEGORY_OF = {field: category for category, (field, _) in _CORRECTABLE.items()}
_ADDRESS_KEYS = ("line", "ward", "district", "city")


async def _correct_home_addresses(conn: asyncpg.Connection, ids: list[int], fixes: dict[str, object]) -> int:
    """Apply the address corrections to each contact's home address; returns how many changed."""
    whole = fixes.get("address")
    if whole is None and "address.line" not in fixes and "address.city" not in fixes:
        return 0
    homes: dict[int, asyncpg.Record] = {}
    for r in await conn.fetch(
        """SELECT id, contact_id, line, ward, district, city FROM addresses
           WHERE contact_id = ANY($1) AND kind = 'home' ORDER BY id FOR UPDATE""", ids):
        homes.setdefault(r["contact_id"], r)  # the first home address, if a contact has several
    changed = 0
    for contact_id in ids:
        home = homes.get(contact_id)
        old: dict[str, object] = {k: home[k] for k in _ADDRESS_KEYS} if home else dict.fromkeys(_ADDRESS_KEYS)
        new = dict(old)
        if isinstance(whole, tuple):
            new = dict(zip(_ADDRESS_KEYS, whole, strict=True))
        for key in ("line", "city"):
            if f"address.{key}" in fixes:
                new[key] = fixes[f"address.{key}"]
        if new == old:
            continue
        if home is None:
            if not new["line"] or not new["city"]:
                raise Refusal("a contact has no home address whose street or city could be corrected: "
                              "give the whole address")
            await conn.execute(
                """INSERT INTO addresses (contact_id, kind, line, ward, district, city)
                   VALUES ($1, 'home', $2, $3, $4, $5)""", contact_id, *(new[k] for k in _ADDRESS_KEYS))
        else:
            await conn.execute("UPDATE addresses SET line = $2, ward = $3, district = $4, city = $5 WHERE id = $1",
                               home["id"], *(new[k] for k in _ADDRESS_KEYS))
        changed += 1
    return changed


# -- the client company leaves: all of its data --------------------------------------------------

#: Every table of the CRM, children before the contacts they point to; the suppression list last.
_ALL_TABLES = (*_CHILDREN, "contacts", "marketing_suppressions")


@worker.handler(Action.export_all)
async def export_all(ctx: TaskContext) -> Result:
    """Hand over everything this CRM holds for its controller (the client company leaving): every
    table, as one export, read in one snapshot."""
    tables: dict[str, list[dict[str, Any]]] = {}
    async with db.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        for done, table in enumerate(_ALL_TABLES):  # a long task: the coordinator hears it is alive
            await ctx.progress(done=done, total=len(_ALL_TABLES), note=f"table {table}")
            tables[table] = [dict(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1")]
    records = sum(len(rows) for rows in tables.values())
    artifact = await ctx.export({"system": NAME, "controller": ctx.task.controller, "tables": tables},
                                records=records)
    return Result.succeeded(counts={"records": records, **{t: len(r) for t, r in tables.items()}},
                            categories=list(SYSTEM.categories), artifacts=[artifact])


@worker.handler(Action.erase_all)
async def erase_all(ctx: TaskContext) -> Result:
    """Delete everything this CRM holds for its controller (the client company leaving), children
    first, in one transaction; then check that every table is empty."""
    async with db.pool.acquire() as conn:
        async with conn.transaction():
            deleted = {table: rowcount(await conn.execute(f"DELETE FROM {table}")) for table in _ALL_TABLES}
        left = await conn.fetchval("SELECT " + " + ".join(f"(SELECT count(*) FROM {t})" for t in _ALL_TABLES))
    if left:
        return Result.failed(f"{left} row(s) still here after erasing everything", retryable=True)
    return Result.succeeded(counts={"erased": sum(deleted.values()), **deleted})


@worker.handler(Action.rectify)
@answering
async def rectify(ctx: TaskContext) -> Result:
    """Apply the task's corrections to every contact the identifiers agree on. A field the CRM
    does not keep, or a value that is not valid, refuses the whole task and changes nothing.
    Counts: contacts rectified, fields corrected, values that actually changed (0 the second time)."""
    fixes = read_changes(ctx.task.changes, _CORRECTABLE, system=NAME)
    async with db.pool.acquire() as conn, conn.transaction():
        match, contacts = await _locate(conn, ctx, lock=True)
        require_one_person(match)
        ids = [c["id"] for c in contacts]
        for column in ("email", "phone"):
            if column in fixes and await conn.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM contacts WHERE {column} = $1 AND NOT id = ANY($2))", fixes[column], ids
            ):
                raise Refusal(f"the corrected {column} is already another contact's: a person must check whether "
                              "they are the same person before merging")
        columns = {col: fixes[col] for col in _COLUMNS if col in fixes}
        changed = sum(1 for c in contacts for col, value in columns.items() if c[col] != value)
        if columns:
            assignments = ", ".join(f"{col} = ${i}" for i, col in enumerate(columns, start=2))
            await conn.execute(f"UPDATE contacts SET {assignments} WHERE id = ANY($1)", ids, *columns.values())
        changed += await _correct_home_addresses(conn, ids, fixes)
        await conn.execute(
            """INSERT INTO rectifications (case_id, contact_id, field)
               SELECT $1, c, f FROM unnest($2::bigint[]) AS c CROSS JOIN unnest($3::text[]) AS f
               ON CONFLICT DO NOTHING""",
            ctx.task.case_id, ids, sorted(fixes),
        )
    return Result.succeeded(
        counts={"rectified": len(contacts), "fields": len(fixes), "changed": changed},
        categories=sorted({_CATEGORY_OF[f] for f in fixes}),
    )


# -- restriction and objection -------------------------------------------------------------------


@worker.handler(Action.restrict)
@answering
async def restrict(ctx: TaskContext) -> Result:
    """Keep the data, stop processing it: a restriction for this case, covering the purposes an
    objection names, or all processing. Counts: contacts restricted by this case, of which already
    before (a second delivery), and the number of purposes (absent: all processing)."""
    purposes = task_purposes(ctx)
    async with db.pool.acquire() as conn, conn.transaction():
        match, contacts = await _locate(conn, ctx, lock=True)
        require_one_person(match)
        counts = await restrict_records(conn, "contact_id", [c["id"] for c in contacts], ctx.task.case_id, purposes)
    return Result.succeeded(counts=counts, categories=[PREFERENCES])


@worker.handler(Action.lift_restriction)
@answering
async def lift_restriction(ctx: TaskContext) -> Result:
    """Lift the restriction this case set (the row stays, with ``lifted_at``, as the record of
    it). not_found when this case restricted none of the contacts."""
    async with db.pool.acquire() as conn, conn.transaction():
        match, contacts = await _locate(conn, ctx, lock=True)
        require_one_person(match)
        lifted, total = await lift_records(conn, "contact_id", [c["id"] for c in contacts], ctx.task.case_id)
    if not total:
        return Result.not_found(counts={"located": len(contacts)})
    return Result.succeeded(counts={"lifted": lifted, "already_lifted": total - lifted}, categories=[PREFERENCES])


# -- consent and opt-outs ------------------------------------------------------------------------


@worker.handler(Action.revoke_consent)
@answering
async def revoke_consent(ctx: TaskContext) -> Result:
    """Withdraw consent for the task's purposes (every consent that overlaps one of them; a
    purpose with no consent on file is recorded as withdrawn, so no later import assumes it), or
    every consent when it names none. Withdrawing marketing consent also turns the opt-in off."""
    purposes = task_purposes(ctx)
    async with db.pool.acquire() as conn, conn.transaction():
        match, contacts = await _locate(conn, ctx, lock=True)
        require_one_person(match)
        ids = [c["id"] for c in contacts]
        revoked = rowcount(await conn.execute(
            """UPDATE consents SET granted = false, updated_at = now()
               WHERE contact_id = ANY($1) AND granted
                 AND ($2::text[] IS NULL OR EXISTS (SELECT 1 FROM unnest($2::text[]) AS p(purpose)
                                                    WHERE purposes_overlap(consents.purpose, p.purpose)))""",
            ids, purposes,
        ))
        recorded = rowcount(await conn.execute(
            """INSERT INTO consents (contact_id, purpose, granted)
               SELECT c, p, false FROM unnest($1::bigint[]) AS c CROSS JOIN unnest($2::text[]) AS p
               WHERE NOT EXISTS (SELECT 1 FROM consents k WHERE k.contact_id = c AND purposes_overlap(k.purpose, p))
               ON CONFLICT DO NOTHING""",
            ids, purposes or [],
        ))
        opted_out = 0
        if purposes is None or any(purposes_overlap(p, NEWSLETTER) for p in purposes):
            opted_out = rowcount(await conn.execute(
                "UPDATE contacts SET marketing_opt_in = false WHERE id = ANY($1) AND marketing_opt_in", ids))
    return Result.succeeded(
        counts={"contacts": len(ids), "revoked": revoked, "recorded": recorded, "marketing_opt_outs": opted_out},
        categories=[PREFERENCES],
    )


@worker.handler(Action.suppress_marketing)
@answering
async def suppress_marketing(ctx: TaskContext) -> Result:
    """Opt the contacts out of marketing and put their emails and phones, and the task's, on the
    suppression list (keyed hashes), so that no re-import subscribes them again. Someone the CRM
    does not hold is still listed (the receipt says not_found, with the entries added): an opt-out
    only suppresses, so it is honoured for the future too."""
    given = subject_identifiers(ctx)
    async with db.pool.acquire() as conn, conn.transaction():
        match, contacts = await _locate(conn, ctx, lock=True)
        if match.conflict:
            return Result.conflict(match.reason())
        entries = suppression_entries(
            [(c["email"], c["phone"]) for c in contacts]
            + [(given.get(IdentifierType.email), given.get(IdentifierType.phone))])
        listed = await add_suppressions(conn, entries)
        if match.not_found:
            return Result.not_found(counts={"suppression_entries": listed})
        ids = [c["id"] for c in contacts]
        opted_out = rowcount(await conn.execute(
            "UPDATE contacts SET marketing_opt_in = false WHERE id = ANY($1) AND marketing_opt_in", ids))
    return Result.succeeded(
        counts={"suppressed": len(ids), "opted_out": opted_out, "suppression_entries": listed},
        categories=[PREFERENCES],
    )


async def _opt_out(ctx: TaskContext, flag: str, *, extra: str | None = None) -> Result:
    """Set the contacts' opt-out ``flag``. Counts: contacts opted out, of which newly."""
    async with db.pool.acquire() as conn, conn.transaction():
        match, contacts = await _locate(conn, ctx, lock=True)
        require_one_person(match)
        ids = [c["id"] for c in contacts]
        changed = rowcount(await conn.execute(f"UPDATE contacts SET {flag} = true WHERE id = ANY($1) AND NOT {flag}",
                                              ids))
        counts = {"opted_out": len(ids), "changed": changed}
        if extra:
            counts[extra] = await conn.fetchval("SELECT count(*) FROM tracking_ids WHERE contact_id = ANY($1)", ids)
    return Result.succeeded(counts=counts, categories=[PREFERENCES])


@worker.handler(Action.suppress_sale_share)
@answering
async def suppress_sale_share(ctx: TaskContext) -> Result:
    """No more uploads to advertising platforms' custom audiences (processing.shared_audience)."""
    return await _opt_out(ctx, "sale_share_opt_out")


@worker.handler(Action.suppress_tracking)
@answering
async def suppress_tracking(ctx: TaskContext) -> Result:
    """No more analytics on any of the contact's cookies and devices (processing.tracking_allowed);
    counts the tracking identifiers this covers."""
    return await _opt_out(ctx, "tracking_opt_out", extra="tracking_ids")


@worker.handler(Action.stop_automated)
@answering
async def stop_automated(ctx: TaskContext) -> Result:
    """No more automated lead scoring (processing.lead_scoring_candidates)."""
    return await _opt_out(ctx, "automated_processing_opt_out")
