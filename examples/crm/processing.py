"""What the CRM does with personal data day to day, and how each use honours what people asked.

The worker (worker.py) records a person's choices: restrictions and objections, withdrawn
consents, opt-outs of marketing, of sale and sharing, of tracking and of automated processing.
These are the queries the CRM's own features run, so those choices stop the processing for
real, not only on paper:

- :func:`campaign_audience`: who gets the marketing newsletter (Zalo OA and email);
- :func:`shared_audience`: who is uploaded, hashed, to advertising platforms' custom audiences;
- :func:`lead_scoring_candidates`: whom the automated lead scoring may score;
- :func:`tracking_allowed`: whether the website's analytics may follow a cookie;
- :func:`import_contact`: how a list from a trade fair or a partner is imported, without
  subscribing again anyone who opted out of marketing.

Purposes are fideslang data uses. A restriction in force covers every purpose (``purposes`` NULL)
or those it names; it stops a use when a named purpose overlaps it (``marketing`` stops
``marketing.communications``). A withdrawn consent stops every use it overlaps.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable

import asyncpg

from dsrflow.identity import normalise
from dsrflow.rights import IdentifierType

#: The data use of each feature below.
NEWSLETTER = "marketing.communications"
AD_AUDIENCE = "marketing.advertising.third_party"
LEAD_SCORING = "personalize"
ANALYTICS = "analytics"

SUPPRESSION_KEY_ENV = "DSRFLOW_CRM_SUPPRESSION_KEY"
#: DEMO ONLY. A fixed, public key: anyone can recompute these hashes from a guessed address. A
#: real deployment sets DSRFLOW_CRM_SUPPRESSION_KEY to a secret of at least 32 random bytes, kept
#: out of the database, and never changes it: a new key orphans every entry already listed.
DEMO_SUPPRESSION_KEY = "dsrflow-demo-only-crm-suppression-key"


def suppression_key() -> bytes:
    return os.environ.get(SUPPRESSION_KEY_ENV, DEMO_SUPPRESSION_KEY).encode()


def suppression_hmac(kind: IdentifierType | str, value: str) -> str:
    """The keyed hash (HMAC-SHA256, hex) the suppression list keeps of an email or a phone, taken
    of its normal form, so ``0901 234 567`` and ``+84901234567`` give the same entry."""
    kind = IdentifierType(kind)
    message = f"{kind}:{normalise(kind, value)}".encode()
    return hmac.new(suppression_key(), message, hashlib.sha256).hexdigest()


def suppression_entries(contacts: Iterable[tuple[str | None, str | None]]) -> set[tuple[str, str]]:
    """``(kind, hmac)`` of every email and phone of ``(email, phone)`` pairs (either may be None)."""
    out: set[tuple[str, str]] = set()
    for email, phone in contacts:
        for kind, value in ((IdentifierType.email, email), (IdentifierType.phone, phone)):
            if value:
                out.add((str(kind), suppression_hmac(kind, value)))
    return out


async def add_suppressions(conn: asyncpg.Connection, entries: Iterable[tuple[str, str]]) -> int:
    """List ``entries`` (from :func:`suppression_entries`); returns how many were new."""
    rows = sorted(set(entries))
    if not rows:
        return 0
    inserted = await conn.fetch(
        """INSERT INTO marketing_suppressions (kind, value_hmac)
           SELECT * FROM unnest($1::text[], $2::text[])
           ON CONFLICT DO NOTHING RETURNING kind""",
        [k for k, _ in rows], [h for _, h in rows],
    )
    return len(inserted)


async def listed_suppressions(conn: asyncpg.Connection, entries: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """Those of ``entries`` that are on the suppression list."""
    rows = sorted(set(entries))
    if not rows:
        return set()
    found = await conn.fetch(
        """SELECT s.kind, s.value_hmac FROM marketing_suppressions s
           JOIN unnest($1::text[], $2::text[]) AS e(kind, value_hmac) USING (kind, value_hmac)""",
        [k for k, _ in rows], [h for _, h in rows],
    )
    return {(r["kind"], r["value_hmac"]) for r in found}


async def is_suppressed(conn: asyncpg.Connection, email: str | None, phone: str | None) -> bool:
    return bool(await listed_suppressions(conn, suppression_entries([(email, phone)])))


def may_process(contact: str, use: str) -> str:
    """SQL: the contact aliased ``contact`` has no restriction in force that covers the data use
    ``use`` (an SQL expression) and has not withdrawn consent for a purpose that overlaps it."""
    return f"""(NOT EXISTS (
                   SELECT 1 FROM restrictions r
                   WHERE r.contact_id = {contact}.id AND r.lifted_at IS NULL
                     AND (r.purposes IS NULL
                          OR EXISTS (SELECT 1 FROM unnest(r.purposes) AS p(purpose)
                                     WHERE purposes_overlap(p.purpose, {use}))))
               AND NOT EXISTS (
                   SELECT 1 FROM consents k
                   WHERE k.contact_id = {contact}.id AND NOT k.granted AND purposes_overlap(k.purpose, {use})))"""


async def campaign_audience(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Who gets the marketing newsletter: opted in, not on the suppression list, no restriction
    covering marketing (or all processing), marketing consent not withdrawn."""
    rows = await conn.fetch(
        f"""SELECT c.id, c.full_name, c.email, c.phone FROM contacts c
            WHERE c.marketing_opt_in AND {may_process("c", "$1")} ORDER BY c.id""",
        NEWSLETTER,
    )
    return await _unlisted(conn, rows)


async def _unlisted(conn: asyncpg.Connection, contacts: list[asyncpg.Record]) -> list[asyncpg.Record]:
    """The contacts whose email and phone are not on the suppression list."""
    listed = await listed_suppressions(conn, suppression_entries((r["email"], r["phone"]) for r in contacts))
    return [r for r in contacts if not suppression_entries([(r["email"], r["phone"])]) & listed]


async def shared_audience(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Who may be uploaded (hashed) to advertising platforms' custom audiences: consent to
    third-party advertising given and not withdrawn, no opt-out of sale and sharing, no
    restriction covering it, not on the suppression list (advertising is marketing too)."""
    rows = await conn.fetch(
        f"""SELECT c.id, c.full_name, c.email, c.phone FROM contacts c
            WHERE NOT c.sale_share_opt_out AND {may_process("c", "$1")}
              AND EXISTS (SELECT 1 FROM consents k
                          WHERE k.contact_id = c.id AND k.granted AND purpose_covers(k.purpose, $1))
            ORDER BY c.id""",
        AD_AUDIENCE,
    )
    return await _unlisted(conn, rows)


async def lead_scoring_candidates(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Whom the automated lead scoring may score: not opted out of automated processing
    (Decree 356/2025 Art 10(3)), no restriction covering it, consent to it not withdrawn."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT c.id, c.full_name, c.email, c.phone, c.created_at FROM contacts c
            WHERE NOT c.automated_processing_opt_out AND {may_process("c", "$1")} ORDER BY c.id""",
        LEAD_SCORING,
    )
    return rows


async def tracking_allowed(conn: asyncpg.Connection, cookie_id: str) -> bool:
    """Whether the website's analytics may follow this cookie: not when it belongs to a contact
    who opted out of tracking (Law 91/2025/QH15 Art 29), restricted its use for analytics, or
    withdrew consent to it. A cookie the CRM does not know is the consent banner's business."""
    rows = await conn.fetch(
        f"""SELECT NOT c.tracking_opt_out AND {may_process("c", "$2")} AS allowed
            FROM tracking_ids t JOIN contacts c ON c.id = t.contact_id
            WHERE t.kind = 'cookie_id' AND t.value = $1""",
        cookie_id.strip(), ANALYTICS,
    )
    return all(r["allowed"] for r in rows)


async def import_contact(
    conn: asyncpg.Connection, *, full_name: str, email: str | None, phone: str | None, marketing_opt_in: bool
) -> int:
    """Insert a contact from an imported list and return its id. Identifiers are stored in normal
    form; a person on the suppression list is imported without the marketing opt-in, whatever
    the list says."""
    email = normalise(IdentifierType.email, email) if email else None
    phone = normalise(IdentifierType.phone, phone) if phone else None
    opt_in = marketing_opt_in and not await is_suppressed(conn, email, phone)
    contact_id: int = await conn.fetchval(
        "INSERT INTO contacts (full_name, email, phone, marketing_opt_in) VALUES ($1, $2, $3, $4) RETURNING id",
        full_name, email, phone, opt_in,
    )
    return contact_id
