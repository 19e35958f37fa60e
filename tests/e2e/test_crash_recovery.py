"""Crash the coordinator and a worker (SIGKILL) in the middle of a burst, restart them, and check
that every case completes exactly once: at-least-once delivery with inbox, outbox and
idempotent handlers gives exactly-once effects."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest

from dsrflow import demo, launcher
from dsrflow.client import submit
from dsrflow.events import RightsRequested
from dsrflow.settings import Settings
from dsrflow.store.timeline import verify

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

N = 400


async def _completed(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM cases WHERE request_id LIKE 'crash-%' "
                                   "AND completed_at IS NOT NULL"))


async def test_killed_coordinator_and_worker_lose_nothing_and_double_nothing(
    e2e_settings: Settings, tmp_path: Path
) -> None:
    from examples.people import PEOPLE

    settings = e2e_settings
    await demo.prepare(settings)
    extra = {k: os.environ[k] for k in ("DSRFLOW_CRM_DSN", "DSRFLOW_BILLING_DSN")}
    requests = [
        RightsRequested(request_id=f"crash-{i}", right="access", verified=True, received_at=datetime.now(UTC),
                        subject={"identifiers": PEOPLE[i % len(PEOPLE)].identifiers()})  # type: ignore[arg-type]
        for i in range(N)
    ]
    conn = await asyncpg.connect(settings.dsn)
    try:
        with launcher.running(settings, demo.SYSTEMS, log_dir=tmp_path / "logs", cwd=ROOT,
                              extra_env=extra) as services:
            await demo.approve_systems(settings, demo.SYSTEMS, services)
            await submit(settings, requests)
            deadline = time.monotonic() + 60
            while await _completed(conn) < 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            done_at_crash = await _completed(conn)
            services.kill("coordinator")
            services.kill("worker-crm")
            assert done_at_crash < N, "the burst finished before the crash: nothing was tested"
            services.restart("coordinator")
            services.restart("worker-crm")
            deadline = time.monotonic() + 180
            while await _completed(conn) < N and time.monotonic() < deadline:
                services.check_alive()
                await asyncio.sleep(0.5)
            # anything redelivered after the last completion has had time to arrive
            await asyncio.sleep(3)

        assert await _completed(conn) == N, services.log_tail("coordinator")
        assert await conn.fetchval("SELECT count(*) FROM cases WHERE request_id LIKE 'crash-%'") == N
        statuses = await conn.fetch("SELECT status, count(*) FROM cases GROUP BY status")
        assert {r["status"]: r["count"] for r in statuses} == {"completed": N}
        assert await conn.fetchval("SELECT count(*) FROM tasks") == 2 * N
        # each system found exactly the people it holds
        got = {(r["request_id"], r["system"]): r["status"] for r in await conn.fetch(
            "SELECT c.request_id, t.system, t.status FROM tasks t JOIN cases c USING (case_id)")}
        want = {(f"crash-{i}", system): "succeeded" if system in PEOPLE[i % len(PEOPLE)].systems else "not_found"
                for i in range(N) for system in demo.SYSTEMS}
        assert got == want
        # each case completed once: one "completed" entry per timeline, and every chain intact
        per_case = await conn.fetch(
            "SELECT case_id, count(*) FILTER (WHERE kind = 'completed') AS n FROM case_timeline GROUP BY case_id")
        assert len(per_case) == N and all(r["n"] == 1 for r in per_case)
        bad_chains = []
        for r in per_case[:50]:
            rows = await conn.fetch("SELECT * FROM case_timeline WHERE case_id = $1 ORDER BY position", r["case_id"])
            if not verify(rows):
                bad_chains.append(r["case_id"])
        assert bad_chains == []
        # every case's bundle holds the exports of exactly the systems that hold the person
        from dsrflow.exports import read_bundle

        for r in await conn.fetch("SELECT request_id, bundle FROM cases"):
            ref = orjson.loads(r["bundle"])["ref"]
            manifest, _ = read_bundle((settings.exports / ref).read_bytes())  # checks every sha256
            person = PEOPLE[int(r["request_id"].removeprefix("crash-")) % len(PEOPLE)]
            exported = {f["system"] for f in manifest["files"] if f["kind"] == "export"}
            assert exported == set(person.systems), r["request_id"]
        # redelivered receipts were absorbed by the inbox, not dead-lettered as unknown. (The broker
        # is shared by the session: letters about other tests' cases may be there and are not ours.)
        ours = {str(c) for c in await conn.fetchval("SELECT array_agg(case_id) FROM cases")}
        dlq = await demo.dead_letters(settings, timeout=3)
        assert [d for d in dlq if d.get("dlq_error_type") == "unknown_task"
                and any(c in d.get("dlq_error", "") for c in ours)] == []
    finally:
        await conn.close()
