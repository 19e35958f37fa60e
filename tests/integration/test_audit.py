"""`dsrflow audit verify` catches each kind of tampering with a case's timeline: an edited, inserted
or deleted entry, a truncated table, a cut-off tail, and the table and the case row rewritten
together (caught against the heads published on dsr.cases.v1, read from the real broker)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import orjson

from dsrflow.audit import published_anchors, verify
from dsrflow.coordinator import Coordinator
from dsrflow.coordinator.relay import OutboxRelay
from dsrflow.settings import Settings
from dsrflow.store.timeline import GENESIS, canonical, chain_hash
from tests.integration.test_coordinator import coordinator, kafka_settings, pool, receipt, request, tasks_of

__all__ = ["coordinator", "kafka_settings", "pool"]  # fixtures
ROOT = Path(__file__).resolve().parents[2]


async def finished_case(coordinator: Coordinator, pool: asyncpg.Pool) -> uuid.UUID:
    rid = f"audit-{uuid.uuid4().hex[:8]}"
    await coordinator.handle_requests([request("erasure", request_id=rid)])
    t = await tasks_of(pool, rid)
    await coordinator.handle_receipts([receipt(t["crm"], "succeeded"), receipt(t["billing"], "not_found")])
    case_id: uuid.UUID = await pool.fetchval("SELECT case_id FROM cases WHERE request_id = $1", rid)
    assert await pool.fetchval("SELECT timeline_length FROM cases WHERE case_id = $1", case_id) >= 4
    return case_id


async def publish(pool: asyncpg.Pool, settings: Settings) -> None:
    """Run the outbox relay until everything is on the broker."""
    stop = asyncio.Event()
    task = asyncio.create_task(OutboxRelay(settings, poll_interval=0.1).run(stop))
    try:
        for _ in range(300):
            if await pool.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the relay did not publish the outbox")
    finally:
        stop.set()
        await task


async def tamper(pool: asyncpg.Pool, *statements: tuple[str, tuple[object, ...]]) -> None:
    """What someone with the database's owner rights could do: the append-only trigger is switched off."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE case_timeline DISABLE TRIGGER case_timeline_no_update")
        for sql, args in statements:
            await conn.execute(sql, *args)
        await conn.execute("ALTER TABLE case_timeline ENABLE TRIGGER case_timeline_no_update")


async def audit(pool: asyncpg.Pool, case_id: uuid.UUID, settings: Settings | None = None) -> list[str]:
    anchors = await published_anchors(settings.kafka_client_options()) if settings else None
    async with pool.acquire() as conn:
        report = await verify(conn, [case_id], anchors=anchors)
    return report.failures.get(case_id, [])


async def rechain(pool: asyncpg.Pool, case_id: uuid.UUID) -> None:
    """Recompute every hash of the case's (tampered) timeline and its case-row anchor, as a careful
    forger would, so the table and the row agree again."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE case_timeline DISABLE TRIGGER case_timeline_no_update")
        prev = GENESIS
        rows = await conn.fetch("SELECT * FROM case_timeline WHERE case_id = $1 ORDER BY position", case_id)
        for r in rows:
            h = chain_hash(prev, canonical(case_id, r["position"], r["at"], r["kind"], orjson.loads(r["detail"])))
            await conn.execute("UPDATE case_timeline SET prev_hash = $2, hash = $3 WHERE seq = $1", r["seq"], prev, h)
            prev = h
        await conn.execute("UPDATE cases SET timeline_length = $2, timeline_head = $3 WHERE case_id = $1",
                           case_id, len(rows), prev if rows else None)
        await conn.execute("ALTER TABLE case_timeline ENABLE TRIGGER case_timeline_no_update")


async def test_an_untouched_timeline_verifies_against_its_row_and_the_topic(
    coordinator: Coordinator, pool: asyncpg.Pool, kafka_settings: Settings
) -> None:
    case_id = await finished_case(coordinator, pool)
    await publish(pool, kafka_settings)
    anchors = await published_anchors(kafka_settings.kafka_client_options())
    length, head = await pool.fetchrow("SELECT timeline_length, timeline_head FROM cases WHERE case_id = $1", case_id)
    assert anchors[case_id] == (length, bytes(head))  # the last CaseUpdated carries the head
    assert await audit(pool, case_id, kafka_settings) == []


async def test_an_edited_entry_is_caught(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    case_id = await finished_case(coordinator, pool)
    await tamper(pool, ("UPDATE case_timeline SET detail = '{\"status\": \"completed\"}' "
                        "WHERE case_id = $1 AND position = 2", (case_id,)))
    assert any("entry 2's content does not match its hash" in p for p in await audit(pool, case_id))


async def test_an_inserted_entry_is_caught(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    case_id = await finished_case(coordinator, pool)
    row = await pool.fetchrow("SELECT * FROM case_timeline WHERE case_id = $1 AND position = 2", case_id)
    n = await pool.fetchval("SELECT max(position) FROM case_timeline WHERE case_id = $1", case_id)
    shifts = [("UPDATE case_timeline SET position = position + 1 WHERE case_id = $1 AND position = $2", (case_id, p))
              for p in range(n, 2, -1)]
    forged_hash = chain_hash(bytes(row["hash"]), canonical(case_id, 3, row["at"], "verified", {"by": "forger"}))
    await tamper(pool, *shifts, ("""INSERT INTO case_timeline (case_id, position, at, kind, detail, prev_hash, hash)
                                    VALUES ($1, 3, $2, 'verified', '{"by": "forger"}', $3, $4)""",
                                 (case_id, row["at"], bytes(row["hash"]), forged_hash)))
    found = await audit(pool, case_id)
    assert any("entry 4 does not chain to entry 3" in p for p in found), found
    assert any("anchor says" in p for p in found), found


async def test_a_deleted_entry_is_caught(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    case_id = await finished_case(coordinator, pool)
    await tamper(pool, ("DELETE FROM case_timeline WHERE case_id = $1 AND position = 2", (case_id,)))
    assert any("entry 2 is missing or out of place" in p for p in await audit(pool, case_id))


async def test_a_truncated_timeline_and_a_cut_off_tail_are_caught(coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    truncated, cut = await finished_case(coordinator, pool), await finished_case(coordinator, pool)
    await tamper(pool, ("DELETE FROM case_timeline WHERE case_id = $1", (truncated,)),
                 ("DELETE FROM case_timeline WHERE case_id = $1 AND position = "
                  "(SELECT max(position) FROM case_timeline WHERE case_id = $1)", (cut,)))
    for case_id in (truncated, cut):
        found = await audit(pool, case_id)
        assert any("the case row's anchor says" in p and "cut off" in p for p in found), found


async def test_the_table_and_the_case_row_rewritten_together_are_caught_against_the_topic(
    coordinator: Coordinator, pool: asyncpg.Pool, kafka_settings: Settings
) -> None:
    cut, edited = await finished_case(coordinator, pool), await finished_case(coordinator, pool)
    await publish(pool, kafka_settings)
    await tamper(pool, ("DELETE FROM case_timeline WHERE case_id = $1 AND position = "
                        "(SELECT max(position) FROM case_timeline WHERE case_id = $1)", (cut,)),
                 ("UPDATE case_timeline SET detail = '{\"by\": \"nobody\"}' WHERE case_id = $1 AND position = 2",
                  (edited,)))
    await rechain(pool, cut)
    await rechain(pool, edited)
    assert await audit(pool, cut) == [] and await audit(pool, edited) == []  # table and row agree again...
    assert any("it was cut off" in p for p in await audit(pool, cut, kafka_settings))  # ... but not with Kafka
    assert any("the timeline was rewritten" in p for p in await audit(pool, edited, kafka_settings))


async def test_a_deleted_case_is_caught_against_the_topic(
    coordinator: Coordinator, pool: asyncpg.Pool, kafka_settings: Settings
) -> None:
    case_id = await finished_case(coordinator, pool)
    await publish(pool, kafka_settings)
    await tamper(pool, ("DELETE FROM case_timeline WHERE case_id = $1", (case_id,)),
                 ("DELETE FROM receipts WHERE case_id = $1", (case_id,)),
                 ("DELETE FROM tasks WHERE case_id = $1", (case_id,)),
                 ("DELETE FROM cases WHERE case_id = $1", (case_id,)))
    assert await audit(pool, case_id) == []  # the case store alone cannot tell
    assert any("missing from the case store" in p for p in await audit(pool, case_id, kafka_settings))


async def test_dsrflow_audit_verify_exits_1_with_one_error_line(
    coordinator: Coordinator, pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    good, bad = await finished_case(coordinator, pool), await finished_case(coordinator, pool)
    await tamper(pool, ("DELETE FROM case_timeline WHERE case_id = $1 AND position = 2", (bad,)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSRFLOW_")}
    env.update(DSRFLOW_PG_DSN=case_store, DSRFLOW_STATE_DIR=str(tmp_path))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dsrflow.cli", "audit", "verify", *args, "--no-topic"],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)

    ok = await asyncio.to_thread(run, str(good))
    assert ok.returncode == 0 and "1 case(s) checked" in ok.stdout and "none fail" in ok.stdout, ok
    failed = await asyncio.to_thread(run)
    assert failed.returncode == 1, failed
    assert f"{bad}  entry 2 is missing" in failed.stdout
    assert failed.stderr.strip().splitlines()[-1] == "error: 1 case timeline(s) fail the audit"
    assert str(good) not in failed.stdout.replace(f"{bad}", "")
