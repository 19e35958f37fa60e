"""The declarative SQL worker (dsrflow.sqlworker) on a real PostgreSQL: the loyalty example's
database, described by examples/loyalty/loyalty.yaml and nothing else."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from pydantic import SecretStr

from dsrflow.exports import MemoryExportStore
from dsrflow.rights import Action, ReceiptStatus
from dsrflow.settings import Settings
from dsrflow.sqlworker import SpecError, parse_spec, sql_worker
from dsrflow.testing.conformance import CHECKS, Conformance
from dsrflow.testing.worker import make_task, run_task
from dsrflow.worker import Worker
from examples.loyalty import worker as loyalty

MakeDatabase = Callable[[], Awaitable[str]]

HASH_KEY = "test-loyalty-hash-key-0123456789"
LAN = {"email": "lan.nguyen@example.vn", "phone": "+84901234567"}  # member 1: rows in every table
HUNG = {"email": "hung.tran@example.com", "phone": "+84912345678"}  # member 2
TRANG = {"phone": "0978 222 333"}  # member 6: no email, nothing but the member row


@pytest.fixture
async def dsn(make_database: MakeDatabase, monkeypatch: pytest.MonkeyPatch) -> str:
    dsn = await make_database()
    await loyalty.setup(dsn)
    monkeypatch.setenv("DSRFLOW_LOYALTY_DSN", dsn)
    monkeypatch.setenv("DSRFLOW_LOYALTY_HASH_KEY", HASH_KEY)
    return dsn


@pytest.fixture
async def started(dsn: str) -> AsyncIterator[Worker]:
    """A worker of loyalty.yaml without a task ledger (every task runs), started."""
    worker = sql_worker(loyalty.SPEC, dsn=dsn)
    async with worker.lifespan(Settings(pg_dsn=SecretStr(dsn))):
        yield worker


async def _tables(conn: asyncpg.Connection) -> list[str]:
    return [r["tablename"] for r in await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]


def rows(dsn: str) -> Callable[[], Awaitable[dict[str, list[str]]]]:
    async def snapshot() -> dict[str, list[str]]:
        conn = await asyncpg.connect(dsn)
        try:
            return {t: sorted(r[0] for r in await conn.fetch(f'SELECT to_jsonb(x)::text FROM "{t}" x'))
                    for t in await _tables(conn)}
        finally:
            await conn.close()

    return snapshot


async def _sql(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        if not query.lstrip().upper().startswith("SELECT"):
            await conn.execute(query, *args)  # DDL, several statements
            return []
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def _run(worker: Worker, action: Action, ids: dict[str, str], store: MemoryExportStore | None = None,
               **kw: Any) -> Any:
    return await run_task(worker, make_task("loyalty", action, ids, **kw), store=store)


# -- export --------------------------------------------------------------------------------------


async def test_export_finds_the_subjects_rows_in_every_table(started: Worker) -> None:
    store = MemoryExportStore()
    receipt = await _run(started, Action.export, LAN, store)
    assert receipt.status == ReceiptStatus.succeeded, receipt
    [artifact] = receipt.artifacts
    doc = orjson.loads(store.get(artifact.ref))
    tables = doc["tables"]
    assert {t: len(v) for t, v in tables.items()} == {
        "members": 1, "points_ledger": 3, "member_notes": 2, "purchases": 2, "redemptions": 1}
    assert tables["members"][0]["full_name"] == "Nguyễn Thị Lan"
    assert {p["invoice_no"] for p in tables["purchases"]} == {"HD-2023-000881", "HD-2024-001207"}
    assert all(n["body"] for n in tables["member_notes"])
    assert receipt.counts == {"located": 1, "records": 9}
    assert "user.content.private" in receipt.categories and "user.financial" in receipt.categories
    assert b"hung.tran" not in store.get(artifact.ref)
    # by the member code alone, and by a phone written the local way
    assert (await _run(started, Action.export, {"customer_id": "TV000101"})).status == ReceiptStatus.succeeded
    assert (await _run(started, Action.export, {"phone": "0901 234 567"})).counts["located"] == 1
    assert (await _run(started, Action.export, {"email": "nobody@example.vn"})).status == ReceiptStatus.not_found


# -- erase ---------------------------------------------------------------------------------------


async def test_erase_applies_each_strategy_keeps_what_the_law_requires_and_a_second_erase_is_not_found(
        started: Worker, dsn: str) -> None:
    hung_before = await _sql(dsn, "SELECT to_jsonb(m)::text FROM members m WHERE id = 2")
    receipt = await _run(started, Action.erase, LAN)
    assert receipt.status == ReceiptStatus.retained, receipt
    # deleted: the member, 3 points movements, 2 notes; anonymised: the redemption (name, phone and
    # address erased); retained: the 2 purchases (kept whole for the accounting law, only cut from
    # the member), which are not erased
    assert receipt.counts == {"located": 1, "erased": 7, "deleted": 6, "anonymised": 1, "retained": 2,
                              "member_notes": 2, "redemptions": 1, "purchases": 2, "points_ledger": 3, "members": 1}
    basis = loyalty.SPEC.tables["purchases"].retain
    assert basis is not None
    assert [(i.category, i.records, i.legal_basis) for i in receipt.retained] == [
        ("user.financial", 2, basis.legal_basis), ("user.name", 2, basis.legal_basis)]
    # 10 years from the latest purchase (2024-06-11 17:20 +07)
    assert {i.retain_until for i in receipt.retained} == {datetime(2034, 6, 11, 10, 20, tzinfo=UTC)}

    assert await _sql(dsn, "SELECT 1 FROM members WHERE id = 1") == []
    assert await _sql(dsn, "SELECT 1 FROM points_ledger WHERE member_id = 1") == []
    assert await _sql(dsn, "SELECT 1 FROM member_notes WHERE member_id = 1") == []
    [red] = await _sql(dsn, "SELECT * FROM redemptions WHERE reward = 'Bình giữ nhiệt 500ml'")
    assert red["member_id"] is None and red["ledger_entry_id"] is None and red["delivery_address"] is None
    assert red["recipient_name"] == "(đã xoá)"
    assert red["recipient_phone"] == hmac.new(HASH_KEY.encode(), b"+84901234567", hashlib.sha256).hexdigest()
    kept = await _sql(dsn, "SELECT member_id, buyer_name, amount_vnd FROM purchases "
                           "WHERE invoice_no LIKE 'HD-202_-00%' AND buyer_name = 'Nguyễn Thị Lan'")
    assert [(k["member_id"], k["amount_vnd"]) for k in kept] == [(None, 1200000), (None, 3000000)]
    # someone else is untouched
    assert await _sql(dsn, "SELECT to_jsonb(m)::text FROM members m WHERE id = 2") == hung_before
    assert len(await _sql(dsn, "SELECT 1 FROM purchases WHERE member_id = 2")) == 1

    again = await _run(started, Action.erase, LAN)
    assert again.status == ReceiptStatus.not_found, again
    assert (await _run(started, Action.export, LAN)).status == ReceiptStatus.not_found


async def test_erase_of_someone_with_nothing_retained_succeeds(started: Worker, dsn: str) -> None:
    receipt = await _run(started, Action.erase, TRANG)
    assert receipt.status == ReceiptStatus.succeeded, receipt
    assert receipt.counts["members"] == 1 and receipt.counts["retained"] == 0
    assert await _sql(dsn, "SELECT 1 FROM members WHERE id = 6") == []


async def test_conflicting_identifiers_change_nothing(started: Worker, dsn: str) -> None:
    before = await rows(dsn)()
    mixed = {"email": LAN["email"], "phone": HUNG["phone"]}
    for action in (Action.export, Action.erase, Action.rectify, Action.restrict):
        kw: dict[str, Any] = {"changes": {"name": "Ai Đó"}} if action == Action.rectify else {}
        receipt = await _run(started, action, mixed, **kw)
        assert receipt.status == ReceiptStatus.conflict, (action, receipt)
        assert not receipt.artifacts
        assert "lan" not in (receipt.error or "") and "84912345678" not in (receipt.error or "")
    assert await rows(dsn)() == before


# -- proof of erasure ----------------------------------------------------------------------------


async def test_a_trigger_that_puts_the_subject_back_fails_the_erasure_and_nothing_changes(
        started: Worker, dsn: str) -> None:
    await _sql(dsn, """
        CREATE FUNCTION keep_member() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO members (member_code, full_name, email) VALUES ('TV999999', OLD.full_name, OLD.email);
            RETURN OLD;
        END $$;
        CREATE TRIGGER keep_member AFTER DELETE ON members FOR EACH ROW EXECUTE FUNCTION keep_member();""")
    before = await rows(dsn)()
    receipt = await _run(started, Action.erase, LAN)
    assert receipt.status == ReceiptStatus.failed and receipt.retryable is False, receipt
    assert receipt.error is not None
    assert receipt.error.startswith("proof of erasure failed: 1 rows of members still hold the subject"), receipt
    assert "lan" not in receipt.error
    assert await rows(dsn)() == before  # rolled back


async def test_a_trigger_that_copies_the_email_into_an_undescribed_column_is_caught(
        started: Worker, dsn: str) -> None:
    """The column was added after the worker started (at startup it would have refused): the proof
    reads the kept rows back whole."""
    await _sql(dsn, """
        ALTER TABLE purchases ADD COLUMN buyer_contact text;
        CREATE FUNCTION copy_contact() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.buyer_contact := (SELECT email FROM members WHERE id = OLD.member_id);
            RETURN NEW;
        END $$;
        CREATE TRIGGER copy_contact BEFORE UPDATE ON purchases FOR EACH ROW EXECUTE FUNCTION copy_contact();""")
    receipt = await _run(started, Action.erase, LAN)
    assert receipt.status == ReceiptStatus.failed and receipt.retryable is False, receipt
    assert receipt.error is not None and "2 rows of purchases still hold the subject" in receipt.error
    assert len(await _sql(dsn, "SELECT 1 FROM members WHERE id = 1")) == 1
    assert await _sql(dsn, "SELECT 1 FROM purchases WHERE buyer_contact IS NOT NULL") == []


# -- startup checks ------------------------------------------------------------------------------


async def _start(dsn: str, spec: Any = None) -> None:
    worker = sql_worker(spec or loyalty.SPEC, dsn=dsn)
    async with worker.lifespan(Settings(pg_dsn=SecretStr(dsn))):
        pass


async def test_an_undescribed_dependent_table_refuses_to_start(dsn: str) -> None:
    await _sql(dsn, "CREATE TABLE member_devices (id bigint PRIMARY KEY, member_id bigint REFERENCES members (id), "
                    "device text)")
    with pytest.raises(SpecError, match=r"table member_devices depends on described table members "
                                        r"\(foreign key member_devices_member_id_fkey\) but is not described"):
        await _start(dsn)


async def test_an_undescribed_column_refuses_to_start(dsn: str) -> None:
    await _sql(dsn, "ALTER TABLE members ADD COLUMN nickname text")
    with pytest.raises(SpecError, match="table members: column nickname is not described"):
        await _start(dsn)


def _spec_with(**tables: Any) -> Any:
    data = loyalty.SPEC.model_dump(by_alias=True, exclude_none=True)
    data["tables"].update(tables)
    return parse_spec(data)


async def test_unknown_tables_and_columns_and_bad_types_refuse_to_start(dsn: str) -> None:
    with pytest.raises(SpecError, match="table public.vouchers is described but does not exist"):
        await _start(dsn, _spec_with(vouchers={"relation": {"column": "member_id", "references": "members"}}))
    notes = loyalty.SPEC.tables["member_notes"].model_dump(by_alias=True, exclude_none=True)
    notes["columns"]["subject"] = {"category": "user.content.private"}
    with pytest.raises(SpecError, match="table member_notes has no column 'subject'"):
        await _start(dsn, _spec_with(member_notes=notes))
    ledger = loyalty.SPEC.tables["points_ledger"].model_dump(by_alias=True, exclude_none=True)
    ledger["erase"] = "hash"
    ledger["columns"]["member_id"] = {"erase": "null"}
    with pytest.raises(SpecError, match="table points_ledger: column points is int4, and erase: hash writes text"):
        await _start(dsn, _spec_with(points_ledger=ledger))


async def test_a_hash_without_its_key_refuses_to_start(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSRFLOW_LOYALTY_HASH_KEY")
    with pytest.raises(SpecError, match="DSRFLOW_LOYALTY_HASH_KEY is not set"):
        await _start(dsn)


async def test_a_kept_row_pointing_at_a_deleted_one_refuses_to_start(dsn: str) -> None:
    red = loyalty.SPEC.tables["redemptions"].model_dump(by_alias=True, exclude_none=True)
    del red["columns"]["ledger_entry_id"]
    red["other_columns"] = [*red["other_columns"], "ledger_entry_id"]
    with pytest.raises(SpecError, match="table redemptions: its rows are kept but point at rows of points_ledger"):
        await _start(dsn, _spec_with(redemptions=red))


async def test_the_erase_order_follows_the_databases_foreign_keys(dsn: str) -> None:
    from dsrflow.sqlworker import SqlSystem

    system = SqlSystem(loyalty.SPEC, dsn=dsn)
    async with system.worker.lifespan(Settings(pg_dsn=SecretStr(dsn))):
        order = system.plan.order
    # redemptions point at points_ledger (not a described relation, a foreign key): erased first
    assert order.index("redemptions") < order.index("points_ledger") < order.index("members")
    assert order[-1] == "members"


# -- rectify, restrict ---------------------------------------------------------------------------


async def test_rectify(started: Worker, dsn: str) -> None:
    changes = {"name": "Nguyễn  Thị Lan Anh", "phone": "0901 999 888", "date_of_birth": "14/03/1991"}
    receipt = await _run(started, Action.rectify, LAN, changes=changes)
    assert receipt.status == ReceiptStatus.succeeded, receipt
    assert receipt.counts == {"located": 1, "rectified": 1, "fields": 3, "changed": 3}
    [m] = await _sql(dsn, "SELECT full_name, phone, date_of_birth::text AS dob FROM members WHERE id = 1")
    assert (m["full_name"], m["phone"], m["dob"]) == ("Nguyễn Thị Lan Anh", "+84901999888", "1991-03-14")
    refused = await _run(started, Action.rectify, {"email": LAN["email"]}, changes={"tier": "kim_cuong"})
    assert refused.status == ReceiptStatus.refused and "cannot rectify field 'tier'" in (refused.error or "")
    taken = await _run(started, Action.rectify, {"email": LAN["email"]}, changes={"email": HUNG["email"]})
    assert taken.status == ReceiptStatus.refused and "hung" not in (taken.error or ""), taken


async def test_restrict_and_lift(started: Worker, dsn: str) -> None:
    first = await _run(started, Action.restrict, LAN)
    assert first.counts == {"located": 1, "restricted": 1, "already_restricted": 0}
    again = await _run(started, Action.restrict, LAN)
    assert again.counts == {"located": 1, "restricted": 1, "already_restricted": 1}
    assert [r["processing_restricted"] for r in await _sql(dsn, "SELECT processing_restricted FROM members "
                                                                "ORDER BY id")] == [True] + [False] * 6
    lifted = await _run(started, Action.lift_restriction, LAN)
    assert lifted.counts == {"located": 1, "lifted": 1, "already_lifted": 0}
    assert not any(r[0] for r in await _sql(dsn, "SELECT processing_restricted FROM members"))


# -- the conformance suite -----------------------------------------------------------------------


def reseed(dsn: str) -> Callable[[], Awaitable[None]]:
    async def seed() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            tables = ", ".join(f'"{t}"' for t in await _tables(conn))
            await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()
        await loyalty.setup(dsn)

    return seed


@pytest.mark.parametrize("check", CHECKS)
async def test_the_loyalty_worker_passes_the_conformance_suite(dsn: str, check: str) -> None:
    settings = Settings(pg_dsn=SecretStr(dsn))
    async with loyalty.worker.lifespan(settings):
        conformance = Conformance(loyalty.worker, subject=LAN, other=HUNG, seed=reseed(dsn), snapshot=rows(dsn),
                                  settings=settings)
        finding = await conformance.check(check)
    assert finding.passed or finding.skipped, finding
    if check == "retained_has_legal_basis":
        assert finding.reason.startswith("erasure retained user.financial"), finding


async def test_conformance_for_someone_with_nothing_retained(dsn: str) -> None:
    settings = Settings(pg_dsn=SecretStr(dsn))
    async with loyalty.worker.lifespan(settings):
        conformance = Conformance(loyalty.worker, subject={"email": "nhung.pham@example.vn", "phone": "+84987654321"},
                                  other=HUNG, seed=reseed(dsn), snapshot=rows(dsn), settings=settings)
        findings = await conformance.assert_conformant()
    assert all(f.passed for f in findings), findings


# -- a shop: identifiers stored as people typed them, a second link between members ---------------

SHOP_SCHEMA = """
CREATE TABLE members (id bigint PRIMARY KEY, email text, phone text, full_name text);
CREATE TABLE gifts (id bigint PRIMARY KEY, member_id bigint NOT NULL REFERENCES members (id),
                    to_member_id bigint REFERENCES members (id) {on_delete}, message text);
CREATE TABLE tickets (id bigint PRIMARY KEY, member_id bigint REFERENCES members (id), body text);
INSERT INTO members VALUES (1, 'Lan.Nguyen@Example.VN', NULL, 'Lan'),
                           (2, 'q@example.com', NULL, 'Q'),
                           (3, 'p@example.com', '0901234567', 'P'),
                           (4, 'hung@example.com', '+84912345678', 'Hung'),
                           (5, 'mai@example.com', '+84935111222', 'Mai');
INSERT INTO gifts VALUES (1, 4, 5, 'from Hung to Mai'), (2, 5, 4, 'from Mai to Hung');
INSERT INTO tickets VALUES (1, 5, 'Mai called'), (2, 4, 'Hung called');
"""


def shop_spec(to_member: Any = None) -> Any:
    gifts: dict[str, Any] = {"relation": {"column": "member_id", "references": "members"}, "erase": "delete",
                             "columns": {"message": "user.content.private"}}
    if to_member is None:
        gifts["other_columns"] = ["to_member_id"]
    else:
        gifts["columns"]["to_member_id"] = to_member
    return parse_spec({
        "system": {"name": "shop"},
        "subject": {"table": "members", "identifiers": {"email": "email", "phone": "phone", "customer_id": "id"}},
        "tables": {
            "members": {"key": "id", "erase": "delete", "columns": {"email": "user.contact.email",
                                                                    "phone": "user.contact.phone_number",
                                                                    "full_name": "user.name"}},
            "gifts": gifts,
            "tickets": {"relation": {"column": "member_id", "references": "members"}, "erase": "null",
                        "columns": {"member_id": {"erase": "null"},
                                    "body": {"category": "user.content.private", "erase": "anonymise",
                                             "replacement": "x"}}},
        },
    })


async def _shop(make_database: MakeDatabase, on_delete: str = "") -> str:
    dsn = await make_database()
    await _sql(dsn, SHOP_SCHEMA.replace("{on_delete}", on_delete))
    return dsn


async def _shop_run(worker: Worker, action: Action, ids: dict[str, str], **kw: Any) -> Any:
    return await run_task(worker, make_task("shop", action, ids, **kw))


@pytest.mark.parametrize("on_delete", ["ON DELETE CASCADE", "ON DELETE SET DEFAULT"])
async def test_a_cascade_that_is_not_the_relation_refuses_to_start(make_database: MakeDatabase,
                                                                   on_delete: str) -> None:
    """Erasing Mai would delete Hùng's gift to her (its giver is Hùng)."""
    dsn = await _shop(make_database, on_delete)
    with pytest.raises(SpecError, match=rf"table gifts: column to_member_id points at members with {on_delete} "
                                        r"\(foreign key gifts_to_member_id_fkey\) and is not the table's relation"):
        await _start(dsn, shop_spec({"erase": "null"}))


async def test_a_second_link_between_deleted_rows_must_be_nulled(make_database: MakeDatabase) -> None:
    dsn = await _shop(make_database)
    with pytest.raises(SpecError, match=r"table gifts: column to_member_id points at rows of members, which are "
                                        r"deleted \(foreign key gifts_to_member_id_fkey\), and is not the table's "
                                        r"relation.*give column to_member_id erase: null"):
        await _start(dsn, shop_spec())


async def test_erasing_someone_keeps_the_rows_of_another_person_that_point_at_them(
        make_database: MakeDatabase) -> None:
    dsn = await _shop(make_database)
    worker = sql_worker(shop_spec({"erase": "null"}), dsn=dsn)
    async with worker.lifespan(Settings(pg_dsn=SecretStr(dsn))):
        receipt = await _shop_run(worker, Action.erase, {"email": "mai@example.com"})
    assert receipt.status == ReceiptStatus.succeeded, receipt
    assert receipt.counts == {"located": 1, "erased": 3, "deleted": 2, "anonymised": 1, "retained": 0,
                              "gifts": 1, "tickets": 1, "members": 1}
    # Hùng's gift to Mai is his: kept, only cut from her; Mai's gift to Hùng is deleted
    assert [dict(r) for r in await _sql(dsn, "SELECT * FROM gifts")] == [
        {"id": 1, "member_id": 4, "to_member_id": None, "message": "from Hung to Mai"}]
    assert [r["id"] for r in await _sql(dsn, "SELECT id FROM members ORDER BY id")] == [1, 2, 3, 4]


async def test_locate_finds_identifiers_however_they_are_stored(make_database: MakeDatabase) -> None:
    dsn = await _shop(make_database)
    worker = sql_worker(shop_spec({"erase": "null"}), dsn=dsn)
    async with worker.lifespan(Settings(pg_dsn=SecretStr(dsn))):
        # an email stored in mixed case
        export = await _shop_run(worker, Action.export, {"email": "lan.nguyen@example.vn"})
        assert export.status == ReceiptStatus.succeeded and export.counts["located"] == 1, export
        # a phone stored the national way, asked for in E.164
        found = await _shop_run(worker, Action.export, {"phone": "+84901234567"})
        assert found.status == ReceiptStatus.succeeded and found.counts["located"] == 1, found
        # Q's email with P's phone: two people, not Q alone
        before = await rows(dsn)()
        mixed = await _shop_run(worker, Action.erase, {"email": "q@example.com", "phone": "+84901234567"})
        assert mixed.status == ReceiptStatus.conflict, mixed
        assert await rows(dsn)() == before
        erased = await _shop_run(worker, Action.erase, {"email": "LAN.nguyen@example.vn"})
        assert erased.status == ReceiptStatus.succeeded, erased
    assert await _sql(dsn, "SELECT 1 FROM members WHERE id = 1") == []


@pytest.mark.parametrize(("column", "value"), [
    ("contact text", "'0' || substr((SELECT phone FROM members WHERE id = OLD.member_id), 4)"),  # 0912345678
    ("contact text", "'Gọi +84 912 345 678'"),
    ("contact bigint", "OLD.member_id"),  # the member's number (customer_id), as a number
])
async def test_the_proof_finds_the_subject_in_another_format(make_database: MakeDatabase, column: str,
                                                             value: str) -> None:
    dsn = await _shop(make_database)
    worker = sql_worker(shop_spec({"erase": "null"}), dsn=dsn)
    async with worker.lifespan(Settings(pg_dsn=SecretStr(dsn))):
        # added after the start (at startup it would have refused the undescribed column)
        await _sql(dsn, f"""
            ALTER TABLE tickets ADD COLUMN {column};
            CREATE FUNCTION copy_contact() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                NEW.contact := {value};
                RETURN NEW;
            END $$;
            CREATE TRIGGER copy_contact BEFORE UPDATE ON tickets FOR EACH ROW EXECUTE FUNCTION copy_contact();""")
        before = await rows(dsn)()
        ids = {"email": "hung@example.com", "phone": "+84912345678"}
        receipt = await _shop_run(worker, Action.erase, ids)
        assert receipt.status == ReceiptStatus.failed and receipt.retryable is False, receipt
        assert receipt.error is not None and "1 rows of tickets still hold the subject" in receipt.error
        assert await rows(dsn)() == before  # rolled back
        # without the trigger the same erasure proves (nothing else is taken for the subject)
        await _sql(dsn, "DROP TRIGGER copy_contact ON tickets")
        assert (await _shop_run(worker, Action.erase, ids)).status == ReceiptStatus.succeeded


async def test_rectify_reads_a_local_phone_in_the_tasks_jurisdiction(started: Worker, dsn: str) -> None:
    task = make_task("loyalty", Action.rectify, {"email": LAN["email"]}, changes={"phone": "(201) 555-0123"})
    receipt = await run_task(started, task.model_copy(update={"jurisdiction": "US-CA"}))
    assert receipt.status == ReceiptStatus.succeeded, receipt
    assert [r["phone"] for r in await _sql(dsn, "SELECT phone FROM members WHERE id = 1")] == ["+12015550123"]


@pytest.mark.parametrize("key", ["full_name", "email"])  # not unique; unique but nullable
async def test_a_key_that_is_not_unique_and_not_null_refuses_to_start(dsn: str, key: str) -> None:
    members = loyalty.SPEC.tables["members"].model_dump(by_alias=True, exclude_none=True)
    members["key"] = key
    with pytest.raises(SpecError, match=f"table members: key column {key} is not unique and NOT NULL"):
        await _start(dsn, _spec_with(members=members))
