"""The CRM reference system carries out every action it declares, and its own processing stops.

Each test gets a fresh, seeded CRM database, runs tasks through the real handlers with
:func:`dsrflow.testing.worker.run_task`, then reads the rows back, and asks the CRM's own
queries (examples/crm/processing.py) whether the person is still in the newsletter, the ad
audiences, the lead scoring and the analytics.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date

import asyncpg
import orjson
import pytest

from dsrflow.events import TaskProgress, TaskReceipt
from dsrflow.exports import MemoryExportStore
from dsrflow.rights import ACTION_PURPOSES, Action, IdentifierType, ReceiptStatus, Right
from dsrflow.testing.worker import make_task, run_task
from examples.crm import processing
from examples.crm import seed as crm_seed
from examples.crm import worker as crm
from examples.people import CRM_ONLY, IN_BOTH, NOWHERE, Person

pytestmark = pytest.mark.pg

MakeDatabase = Callable[[], Awaitable[str]]
A = IN_BOTH  # in the newsletter, the ad audience, the lead scoring; a cookie and a device
OTHER = CRM_ONLY


@pytest.fixture
async def conn(crm_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(crm_dsn)
    try:
        yield c
    finally:
        await c.close()


async def run(action: Action, identifiers: dict[str, str], *, case_id: uuid.UUID | None = None,
              changes: dict[str, str] | None = None, purposes: list[str] | None = None,
              store: MemoryExportStore | None = None) -> TaskReceipt:
    # make_task cannot infer the right of a lift: it is a command on the restriction case.
    right = Right.restriction if action == Action.lift_restriction else None
    task = make_task("crm", action, identifiers, right=right, case_id=case_id, changes=changes, purposes=purposes)
    return await run_task(crm.worker, task, store=store)


async def contact(conn: asyncpg.Connection, p: Person) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM contacts WHERE email = $1", p.email)
    assert row is not None
    return row


async def emails(rows: Awaitable[list[asyncpg.Record]]) -> set[str]:
    return {r["email"] for r in await rows}


async def everywhere(conn: asyncpg.Connection, p: Person) -> dict[str, bool]:
    """Where the CRM's own processing still uses the person."""
    assert p.cookie_id
    return {
        "newsletter": p.email in await emails(processing.campaign_audience(conn)),
        "ad_audience": p.email in await emails(processing.shared_audience(conn)),
        "lead_scoring": p.email in await emails(processing.lead_scoring_candidates(conn)),
        "tracking": await processing.tracking_allowed(conn, p.cookie_id),
    }


ALL_ON = {"newsletter": True, "ad_audience": True, "lead_scoring": True, "tracking": True}


# -- the declaration -------------------------------------------------------------------------------


def test_crm_declares_every_action_and_what_an_information_request_needs() -> None:
    s = crm.SYSTEM
    assert set(s.actions) == set(Action)
    assert set(s.identifier_types) == {IdentifierType.email, IdentifierType.phone, IdentifierType.cookie_id,
                                       IdentifierType.device_id}
    assert {"marketing.communications", "personalize", "analytics", "essential.service"} <= set(s.purposes)
    # Each opt-out concerns the CRM, so the coordinator asks it (dsrflow.rights.ACTION_PURPOSES).
    for prefixes in ACTION_PURPOSES.values():
        assert any(p == pre or p.startswith(pre + ".") or pre.startswith(p + ".")
                   for p in s.purposes for pre in prefixes)
    assert s.storage_country == "VN" and s.operated_by == "controller"
    assert s.backup_retention is not None and s.backup_retention.days == 35
    assert s.recipients and s.processors and s.sensitive_categories
    assert {"user.device.cookie_id", "user.device.device_id"} <= set(s.categories)
    crm.worker.check()  # a handler for every declared action


# -- finding the person by any identifier they give ------------------------------------------------


async def test_crm_finds_a_contact_by_cookie_or_device_id_alone(crm_dsn: str) -> None:
    assert A.cookie_id and A.device_id
    for identifiers in ({"cookie_id": A.cookie_id}, {"device_id": A.device_id},
                        {"email": A.email, "cookie_id": A.cookie_id}):
        store = MemoryExportStore()
        receipt = await run(Action.export, identifiers, store=store)
        assert receipt.status == ReceiptStatus.succeeded and receipt.counts["located"] == 1, identifiers
        [contact_doc] = orjson.loads(store.get(receipt.artifacts[0].ref))["contacts"]
        assert contact_doc["email"] == A.email
    # A cookie nobody has, and another person's cookie next to A's email.
    assert (await run(Action.export, {"cookie_id": str(uuid.uuid4())})).status == ReceiptStatus.not_found
    assert OTHER.cookie_id
    mixed = await run(Action.export, {"email": A.email, "cookie_id": OTHER.cookie_id})
    assert mixed.status == ReceiptStatus.conflict and mixed.artifacts == []
    # A has no cookie of OTHER's (a person has many: unknown, not a disagreement); OTHER's email disagrees.
    assert mixed.error is not None and "email" in mixed.error
    assert OTHER.cookie_id not in mixed.error and OTHER.email not in mixed.error


async def test_crm_export_twice_gives_the_same_document(crm_dsn: str) -> None:
    store = MemoryExportStore()
    first = await run(Action.export, A.identifiers(), store=store)
    second = await run(Action.export, A.identifiers(), store=store)
    assert first.status == second.status == ReceiptStatus.succeeded
    assert first.artifacts[0].sha256 == second.artifacts[0].sha256
    assert first.counts == second.counts


# -- rectify ---------------------------------------------------------------------------------------


async def test_crm_rectify_corrects_every_field_and_is_idempotent(crm_dsn: str, conn: asyncpg.Connection) -> None:
    before = await contact(conn, A)
    others_before = await conn.fetch("SELECT * FROM contacts WHERE id <> $1 ORDER BY id", before["id"])
    changes = {
        "name": "Nguyễn Thị Lan Anh",
        "email": "Lan.Anh.Nguyen@Example.VN",
        "phone": "0988 765 432",
        "address": "5 Phố Huế, Phường Hai Bà Trưng, Hà Nội",
        "user.demographic.date_of_birth": "14/04/1990",
    }
    case = uuid.uuid4()
    receipt = await run(Action.rectify, A.identifiers(), case_id=case, changes=changes)
    assert receipt.status == ReceiptStatus.succeeded, receipt.error
    assert receipt.counts == {"rectified": 1, "fields": 5, "changed": 5}
    assert set(receipt.categories) == {"user.name", "user.contact.email", "user.contact.phone_number",
                                       "user.contact.address", "user.demographic.date_of_birth"}

    after = await conn.fetchrow("SELECT * FROM contacts WHERE id = $1", before["id"])
    assert (after["full_name"], after["email"], after["phone"], after["date_of_birth"]) == (
        "Nguyễn Thị Lan Anh", "lan.anh.nguyen@example.vn", "+84988765432", date(1990, 4, 14))
    [home] = await conn.fetch("SELECT * FROM addresses WHERE contact_id = $1 AND kind = 'home'", before["id"])
    assert (home["line"], home["ward"], home["district"], home["city"]) == (
        "5 Phố Huế", "Phường Hai Bà Trưng", None, "Hà Nội")
    assert await conn.fetch("SELECT * FROM contacts WHERE id <> $1 ORDER BY id", before["id"]) == others_before

    # Delivered again with the identifiers it was sent with (the old email and phone): the same
    # contact is found, nothing changes, the receipt says so.
    again = await run(Action.rectify, A.identifiers(), case_id=case, changes=changes)
    assert again.status == ReceiptStatus.succeeded, again.error
    assert again.counts == {"rectified": 1, "fields": 5, "changed": 0}
    assert await conn.fetchrow("SELECT * FROM contacts WHERE id = $1", before["id"]) == after
    assert await conn.fetchval("SELECT count(*) FROM addresses WHERE contact_id = $1", before["id"]) == len(
        crm_seed.addresses(A))
    # Another case with the old email finds no one: the correction is real.
    assert (await run(Action.export, {"email": A.email})).status == ReceiptStatus.not_found


async def test_crm_rectify_street_alone_and_by_category(crm_dsn: str, conn: asyncpg.Connection) -> None:
    receipt = await run(Action.rectify, {"phone": OTHER.phone},
                        changes={"user.contact.address.street": "90 Bạch Đằng", "user.name": "Lê Minh Châu"})
    assert receipt.status == ReceiptStatus.succeeded, receipt.error
    assert receipt.counts == {"rectified": 1, "fields": 2, "changed": 1}  # the name was already right
    row = await contact(conn, OTHER)
    [home] = await conn.fetch("SELECT * FROM addresses WHERE contact_id = $1 AND kind = 'home'", row["id"])
    assert (home["line"], home["ward"], home["city"]) == ("90 Bạch Đằng", OTHER.address.ward, OTHER.address.city)


@pytest.mark.parametrize(("changes", "named"), [
    ({"name": "Lan", "tax_code": "8012345678"}, "tax_code"),
    ({"user.financial.bank_account": "0123456789"}, "user.financial.bank_account"),
    ({"phone": "12"}, "phone"),
    ({"email": "lan at example"}, "email"),
    ({"date_of_birth": "2999-01-01"}, "date_of_birth"),
    ({"address": "Hà Nội"}, "address"),
])
async def test_crm_rectify_refuses_what_it_cannot_apply_and_changes_nothing(
    crm_dsn: str, conn: asyncpg.Connection, changes: dict[str, str], named: str
) -> None:
    before = await conn.fetch("SELECT * FROM contacts ORDER BY id")
    addresses = await conn.fetch("SELECT * FROM addresses ORDER BY id")
    receipt = await run(Action.rectify, A.identifiers(), changes=changes)
    assert receipt.status == ReceiptStatus.refused
    assert receipt.error is not None and named in receipt.error
    for value in changes.values():
        assert value not in receipt.error  # the field, never the value
    assert await conn.fetch("SELECT * FROM contacts ORDER BY id") == before
    assert await conn.fetch("SELECT * FROM addresses ORDER BY id") == addresses
    assert await conn.fetchval("SELECT count(*) FROM rectifications") == 0


async def test_crm_rectify_will_not_give_a_contact_another_contacts_email(
    crm_dsn: str, conn: asyncpg.Connection
) -> None:
    before = await conn.fetch("SELECT * FROM contacts ORDER BY id")
    receipt = await run(Action.rectify, A.identifiers(), changes={"email": OTHER.email})
    assert receipt.status == ReceiptStatus.refused and receipt.error is not None
    assert "another contact" in receipt.error and OTHER.email not in receipt.error
    assert await conn.fetch("SELECT * FROM contacts ORDER BY id") == before


# -- restriction, objection and lifting ------------------------------------------------------------


async def test_crm_restriction_stops_all_processing_until_lifted(crm_dsn: str, conn: asyncpg.Connection) -> None:
    assert await everywhere(conn, A) == ALL_ON
    case = uuid.uuid4()
    receipt = await run(Action.restrict, A.identifiers(), case_id=case)
    assert receipt.status == ReceiptStatus.succeeded, receipt.error
    assert receipt.counts == {"restricted": 1, "already_restricted": 0}
    row = await contact(conn, A)
    [restriction] = await conn.fetch("SELECT * FROM restrictions WHERE contact_id = $1", row["id"])
    assert restriction["case_id"] == case and restriction["purposes"] is None and restriction["lifted_at"] is None
    assert await everywhere(conn, A) == dict.fromkeys(ALL_ON, False)
    assert OTHER.email in await emails(processing.lead_scoring_candidates(conn))  # only the subject stops

    again = await run(Action.restrict, A.identifiers(), case_id=case)
    assert again.status == ReceiptStatus.succeeded and again.counts == {"restricted": 1, "already_restricted": 1}
    assert await conn.fetchval("SELECT count(*) FROM restrictions") == 1

    # Lifting is the same case's; another case restricted nothing.
    other_case = await run(Action.lift_restriction, A.identifiers(), case_id=uuid.uuid4())
    assert other_case.status == ReceiptStatus.not_found
    assert await everywhere(conn, A) == dict.fromkeys(ALL_ON, False)

    lifted = await run(Action.lift_restriction, A.identifiers(), case_id=case)
    assert lifted.status == ReceiptStatus.succeeded and lifted.counts == {"lifted": 1, "already_lifted": 0}
    assert await conn.fetchval("SELECT lifted_at FROM restrictions WHERE case_id = $1", case) is not None
    assert await everywhere(conn, A) == ALL_ON
    twice = await run(Action.lift_restriction, A.identifiers(), case_id=case)
    assert twice.status == ReceiptStatus.succeeded and twice.counts == {"lifted": 0, "already_lifted": 1}
    assert await everywhere(conn, A) == ALL_ON


async def test_crm_objection_to_marketing_stops_marketing_only(crm_dsn: str, conn: asyncpg.Connection) -> None:
    receipt = await run(Action.restrict, A.identifiers(), purposes=["marketing"], case_id=uuid.uuid4())
    assert receipt.status == ReceiptStatus.succeeded
    assert receipt.counts == {"restricted": 1, "already_restricted": 0, "purposes": 1}
    assert await conn.fetchval("SELECT purposes FROM restrictions") == ["marketing"]
    assert await everywhere(conn, A) == {"newsletter": False, "ad_audience": False, "lead_scoring": True,
                                         "tracking": True}


async def test_crm_objection_to_profiling_stops_lead_scoring_only(crm_dsn: str, conn: asyncpg.Connection) -> None:
    receipt = await run(Action.restrict, A.identifiers(), purposes=["personalize", "personalize"])
    assert receipt.status == ReceiptStatus.succeeded and receipt.counts["purposes"] == 1
    assert await everywhere(conn, A) == {**ALL_ON, "lead_scoring": False}


async def test_crm_restrict_refuses_a_purpose_that_is_not_a_data_use(crm_dsn: str, conn: asyncpg.Connection) -> None:
    receipt = await run(Action.restrict, A.identifiers(), purposes=["Marketing emails!"])
    assert receipt.status == ReceiptStatus.refused
    assert await conn.fetchval("SELECT count(*) FROM restrictions") == 0


# -- consent ---------------------------------------------------------------------------------------


async def test_crm_withdrawing_analytics_consent_stops_tracking_only(crm_dsn: str, conn: asyncpg.Connection) -> None:
    row = await contact(conn, A)
    receipt = await run(Action.revoke_consent, A.identifiers(), purposes=["analytics"])
    assert receipt.status == ReceiptStatus.succeeded, receipt.error
    assert receipt.counts == {"contacts": 1, "revoked": 1, "recorded": 0, "marketing_opt_outs": 0}
    consents = {r["purpose"]: r["granted"] for r in await conn.fetch(
        "SELECT purpose, granted FROM consents WHERE contact_id = $1", row["id"])}
    assert consents == {**dict(crm_seed.consents(A)), "analytics": False}
    assert await everywhere(conn, A) == {**ALL_ON, "tracking": False}

    again = await run(Action.revoke_consent, A.identifiers(), purposes=["analytics"])
    assert again.counts == {"contacts": 1, "revoked": 0, "recorded": 0, "marketing_opt_outs": 0}
    assert {r["purpose"]: r["granted"] for r in await conn.fetch(
        "SELECT purpose, granted FROM consents WHERE contact_id = $1", row["id"])} == consents


async def test_crm_withdrawing_every_consent(crm_dsn: str, conn: asyncpg.Connection) -> None:
    row = await contact(conn, A)
    granted = sum(1 for _, g in crm_seed.consents(A) if g)
    receipt = await run(Action.revoke_consent, A.identifiers())
    assert receipt.status == ReceiptStatus.succeeded
    assert receipt.counts == {"contacts": 1, "revoked": granted, "recorded": 0, "marketing_opt_outs": 1}
    assert not await conn.fetchval("SELECT bool_or(granted) FROM consents WHERE contact_id = $1", row["id"])
    assert (await contact(conn, A))["marketing_opt_in"] is False
    assert await everywhere(conn, A) == {**ALL_ON, "newsletter": False, "ad_audience": False, "tracking": False}
    # Others keep theirs.
    assert await conn.fetchval("SELECT count(*) FROM consents WHERE granted") == sum(
        1 for p in crm_seed.contacts() for _, g in crm_seed.consents(p) if g) - granted


async def test_crm_withdrawing_a_consent_not_on_file_records_it(crm_dsn: str, conn: asyncpg.Connection) -> None:
    row = await contact(conn, A)
    receipt = await run(Action.revoke_consent, A.identifiers(), purposes=["personalize"])
    assert receipt.counts == {"contacts": 1, "revoked": 0, "recorded": 1, "marketing_opt_outs": 0}
    assert await conn.fetchval(
        "SELECT granted FROM consents WHERE contact_id = $1 AND purpose = 'personalize'", row["id"]) is False
    assert await everywhere(conn, A) == {**ALL_ON, "lead_scoring": False}
    again = await run(Action.revoke_consent, A.identifiers(), purposes=["personalize"])
    assert again.counts["recorded"] == 0


# -- opt-outs --------------------------------------------------------------------------------------


async def test_crm_marketing_opt_out_lists_hashes_and_survives_erasure_and_reimport(
    crm_dsn: str, conn: asyncpg.Connection
) -> None:
    assert (await contact(conn, A))["marketing_opt_in"] is True
    entries_before = await conn.fetchval("SELECT count(*) FROM marketing_suppressions")
    receipt = await run(Action.suppress_marketing, {"email": A.email})  # an opt-out may name only an email
    assert receipt.status == ReceiptStatus.succeeded, receipt.error
    assert receipt.counts == {"suppressed": 1, "opted_out": 1, "suppression_entries": 2}  # its email and phone
    assert (await contact(conn, A))["marketing_opt_in"] is False
    listed = {(r["kind"], r["value_hmac"]) for r in await conn.fetch("SELECT * FROM marketing_suppressions")}
    assert {("email", processing.suppression_hmac("email", A.email)),
            ("phone", processing.suppression_hmac("phone", A.phone))} <= listed
    dump = str(await conn.fetch("SELECT * FROM marketing_suppressions"))
    assert A.email not in dump and A.phone not in dump and A.phone[1:] not in dump
    assert await everywhere(conn, A) == {**ALL_ON, "newsletter": False, "ad_audience": False}

    again = await run(Action.suppress_marketing, {"email": A.email})
    assert again.counts == {"suppressed": 1, "opted_out": 0, "suppression_entries": 0}
    assert await conn.fetchval("SELECT count(*) FROM marketing_suppressions") == entries_before + 2

    # Erasure keeps the hashes, and says so.
    erased = await run(Action.erase, A.identifiers())
    assert erased.status == ReceiptStatus.retained, erased.error
    [item] = erased.retained
    assert item.category == "user.privacy_preferences" and item.records == 2 and "21(3)" in item.legal_basis
    assert erased.counts["contacts"] == 1 and erased.counts["suppression_entries_kept"] == 2
    assert await conn.fetchval("SELECT count(*) FROM contacts WHERE email = $1 OR phone = $2", A.email, A.phone) == 0

    # A trade-fair list brings them back, opted in: the import does not subscribe them.
    new_id = await processing.import_contact(conn, full_name=A.full_name, email=A.email.upper(),
                                             phone="0" + A.phone[3:], marketing_opt_in=True)
    assert await conn.fetchval("SELECT marketing_opt_in FROM contacts WHERE id = $1", new_id) is False
    assert A.email not in await emails(processing.campaign_audience(conn))
    fresh = await processing.import_contact(conn, full_name="Khách Mới", email="khach.moi@example.vn",
                                            phone=None, marketing_opt_in=True)
    assert await conn.fetchval("SELECT marketing_opt_in FROM contacts WHERE id = $1", fresh) is True
    assert "khach.moi@example.vn" in await emails(processing.campaign_audience(conn))


async def test_crm_marketing_opt_out_of_someone_not_held_is_listed_for_the_future(
    crm_dsn: str, conn: asyncpg.Connection
) -> None:
    receipt = await run(Action.suppress_marketing, {"email": NOWHERE.email})
    assert receipt.status == ReceiptStatus.not_found and receipt.counts == {"suppression_entries": 1}
    assert await conn.fetchval("SELECT count(*) FROM contacts WHERE email = $1", NOWHERE.email) == 0
    new_id = await processing.import_contact(conn, full_name=NOWHERE.full_name, email=NOWHERE.email, phone=None,
                                             marketing_opt_in=True)
    assert await conn.fetchval("SELECT marketing_opt_in FROM contacts WHERE id = $1", new_id) is False


async def test_crm_suppression_hashes_are_keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    demo = processing.suppression_hmac("email", A.email)
    assert processing.suppression_hmac("email", " " + A.email.upper()) == demo  # the normal form is hashed
    assert processing.suppression_hmac("phone", "0901234567") == processing.suppression_hmac("phone", "+84901234567")
    monkeypatch.setenv(processing.SUPPRESSION_KEY_ENV, "a-real-secret-from-the-vault")
    assert processing.suppression_hmac("email", A.email) != demo


async def test_crm_sale_share_opt_out_stops_ad_audience_uploads(crm_dsn: str, conn: asyncpg.Connection) -> None:
    receipt = await run(Action.suppress_sale_share, A.identifiers())
    assert receipt.status == ReceiptStatus.succeeded and receipt.counts == {"opted_out": 1, "changed": 1}
    assert (await contact(conn, A))["sale_share_opt_out"] is True
    assert await everywhere(conn, A) == {**ALL_ON, "ad_audience": False}
    again = await run(Action.suppress_sale_share, A.identifiers())
    assert again.counts == {"opted_out": 1, "changed": 0}


async def test_crm_tracking_opt_out_by_cookie_alone_covers_every_identifier(
    crm_dsn: str, conn: asyncpg.Connection
) -> None:
    assert A.cookie_id
    receipt = await run(Action.suppress_tracking, {"cookie_id": A.cookie_id})
    assert receipt.status == ReceiptStatus.succeeded, receipt.error
    assert receipt.counts == {"opted_out": 1, "changed": 1, "tracking_ids": len(crm_seed.tracking_ids(A))}
    assert (await contact(conn, A))["tracking_opt_out"] is True
    assert await everywhere(conn, A) == {**ALL_ON, "tracking": False}
    assert OTHER.cookie_id and await processing.tracking_allowed(conn, OTHER.cookie_id)
    again = await run(Action.suppress_tracking, {"device_id": A.device_id or ""})
    assert again.counts == {"opted_out": 1, "changed": 0, "tracking_ids": 2}
    unknown = await run(Action.suppress_tracking, {"cookie_id": str(uuid.uuid4())})
    assert unknown.status == ReceiptStatus.not_found
    assert await conn.fetchval("SELECT count(*) FROM contacts WHERE tracking_opt_out") == 1


async def test_crm_automated_processing_opt_out_stops_lead_scoring(crm_dsn: str, conn: asyncpg.Connection) -> None:
    scored = await emails(processing.lead_scoring_candidates(conn))
    receipt = await run(Action.stop_automated, {"phone": A.phone})
    assert receipt.status == ReceiptStatus.succeeded and receipt.counts == {"opted_out": 1, "changed": 1}
    assert (await contact(conn, A))["automated_processing_opt_out"] is True
    assert await emails(processing.lead_scoring_candidates(conn)) == scored - {A.email}
    assert await everywhere(conn, A) == {**ALL_ON, "lead_scoring": False}
    again = await run(Action.stop_automated, {"phone": A.phone})
    assert again.counts == {"opted_out": 1, "changed": 0}


# -- erasure of what the person asked for ----------------------------------------------------------


async def test_crm_erase_takes_restrictions_consents_and_tracking_with_the_contact(
    crm_dsn: str, conn: asyncpg.Connection
) -> None:
    row = await contact(conn, A)
    await run(Action.restrict, A.identifiers(), purposes=["marketing"])
    await run(Action.rectify, A.identifiers(), changes={"name": "Nguyễn Thị Lan Anh"})
    receipt = await run(Action.erase, A.identifiers())
    assert receipt.status == ReceiptStatus.succeeded, receipt.error
    assert receipt.counts["restrictions"] == 1 and receipt.counts["tracking_ids"] == 2
    for table in ("restrictions", "consents", "tracking_ids", "rectifications", "notes", "addresses"):
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE contact_id = $1", row["id"]) == 0
    assert await conn.fetchval("SELECT count(*) FROM contacts") == len(crm_seed.contacts()) - 1



async def test_the_client_company_leaving_gets_everything_handed_over_then_deleted(
    conn: asyncpg.Connection,
) -> None:
    store = MemoryExportStore()
    before = {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in crm._ALL_TABLES}
    assert before["contacts"] > 20 and before["addresses"] > 0
    reports: list[TaskProgress] = []
    handed = await run_task(crm.worker, make_task("crm", Action.export_all, {}), store=store, progress=reports)
    assert handed.status == ReceiptStatus.succeeded
    # a long task: it said how far it got (the first report at once; later ones at most every 10 s)
    assert reports and reports[0].note == f"table {crm._ALL_TABLES[0]}" and reports[0].total == len(crm._ALL_TABLES)
    assert {t: handed.counts[t] for t in crm._ALL_TABLES} == before
    package = orjson.loads(store.get(handed.artifacts[0].ref))
    assert len(package["tables"]["contacts"]) == before["contacts"]
    assert A.email in {c["email"] for c in package["tables"]["contacts"]}
    # a task about one person is never an erase_all, and a task of another controller is refused
    forged = make_task("crm", Action.erase_all, {"email": A.email}).model_copy(update={"scope": "subject"})
    assert (await run_task(crm.worker, forged)).status == ReceiptStatus.refused
    other = make_task("crm", Action.erase_all, {}, controller="acme")
    assert (await run_task(crm.worker, other)).status == ReceiptStatus.refused
    assert await conn.fetchval("SELECT count(*) FROM contacts") == before["contacts"]

    deleted = await run_task(crm.worker, make_task("crm", Action.erase_all, {}))
    assert deleted.status == ReceiptStatus.succeeded
    assert deleted.counts["erased"] == sum(before.values())
    assert {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in crm._ALL_TABLES} == dict.fromkeys(before, 0)
