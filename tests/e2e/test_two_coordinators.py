"""Two coordinators share the request and receipt partitions; one of them relays the outbox.
Every case completes exactly once."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from dsrflow import demo, launcher
from dsrflow.client import submit
from dsrflow.events import RightsRequested
from dsrflow.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
N = 300

pytestmark = pytest.mark.e2e


async def test_two_coordinators_complete_every_case_once(e2e_settings: Settings, tmp_path: Path) -> None:
    from examples.people import PEOPLE

    settings = e2e_settings
    await demo.prepare(settings)
    extra = {k: os.environ[k] for k in ("DSRFLOW_CRM_DSN", "DSRFLOW_BILLING_DSN")}
    logs = tmp_path / "logs"
    conn = await asyncpg.connect(settings.dsn)
    try:
        with launcher.running(settings, demo.SYSTEMS, log_dir=logs, cwd=ROOT, extra_env=extra) as services:
            services.start("coordinator-2", ["coordinator"], launcher.service_env(settings, extra), ROOT)
            await demo.approve_systems(settings, demo.SYSTEMS, services)
            # both in the group before the burst, so the partitions are shared while it runs
            deadline = time.monotonic() + 90
            while not all("coordinator ready" in (logs / f"{n}.log").read_text()
                          for n in ("coordinator", "coordinator-2")):
                assert time.monotonic() < deadline, "the coordinators did not both start"
                services.check_alive()
                await asyncio.sleep(0.5)
            await asyncio.sleep(3)  # the rebalance that coordinator-2 triggered settles
            await submit(settings, [
                RightsRequested(request_id=f"two-{i}", right="access", verified=True, received_at=datetime.now(UTC),
                                subject={"identifiers": PEOPLE[i % len(PEOPLE)].identifiers()})  # type: ignore[arg-type]
                for i in range(N)
            ])
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                done = await conn.fetchval("SELECT count(*) FROM cases WHERE completed_at IS NOT NULL")
                if done >= N:
                    break
                services.check_alive()
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)  # late duplicates, if any, have time to land
            services.check_alive()
        # the broker is shared with earlier tests (a request an earlier test's killed coordinator never
        # committed comes back to this one, into this fresh case store): only this test's requests count
        others = await conn.fetch("SELECT request_id, status FROM cases WHERE request_id NOT LIKE 'two-%'")
        assert await conn.fetchval("SELECT count(*) FROM cases WHERE request_id LIKE 'two-%'") == N, others
        assert await conn.fetchval(
            "SELECT count(*) FROM cases WHERE status = 'completed' AND request_id LIKE 'two-%'") == N
        assert await conn.fetchval("""SELECT count(*) FROM case_timeline t JOIN cases c USING (case_id)
                                      WHERE t.kind = 'completed' AND c.request_id LIKE 'two-%'""") == N
        active = [name for name in ("coordinator", "coordinator-2")
                  if "relay active" in (logs / f"{name}.log").read_text()]
        assert len(active) == 1, active
        for name in ("coordinator", "coordinator-2"):  # each consumed its share
            log = (logs / f"{name}.log").read_text()
            assert "intake: " in log and "receipts: " in log, name
    finally:
        await conn.close()
