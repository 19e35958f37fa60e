"""``dsrflow demo``: the whole flow on the embedded stack, with the two reference systems.

Starts a fresh embedded stack (on Apache Kafka, so kcat and every other client can join in),
runs the coordinator and the CRM and billing workers as processes, submits requests from
realistic subjects in waves, shows progress, prints each case's outcome and bundle, checks the
reference systems' own databases, and tears everything down. Exits 0 only when every case
reached the outcome it should.

The scenario (:func:`run_scenario`) is shared with the end-to-end test and runs on any
broker and PostgreSQL the settings point at.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from . import launcher, topics
from .cli import submit
from .events import RightsRequested
from .rights import TERMINAL_CASE, CaseStatus, Right
from .settings import Settings

SYSTEMS = ("crm", "billing")


@dataclass
class Step:
    """One request of the scenario and the outcome it must reach."""

    label: str
    right: Right
    subject: str  # key in examples.people.SUBJECTS
    expect: CaseStatus
    verified: bool = True
    #: published by a plain Kafka client with only the required ce_* headers, as kcat would
    raw_client: bool = False
    #: no new request: the DPO verifies the identity of the case the step with this label opened
    verifies: str | None = None
    request_id: str = field(default_factory=lambda: f"demo-{uuid.uuid4().hex[:12]}")
    expect_tasks: dict[str, str] = field(default_factory=dict)


@dataclass
class CaseResult:
    step: Step
    case_id: uuid.UUID | None
    status: str | None
    tasks: dict[str, str]
    outcome: dict[str, Any] | None
    bundle_path: Path | None

    @property
    def ok(self) -> bool:
        return self.status == self.step.expect and all(
            self.tasks.get(s) == st for s, st in self.step.expect_tasks.items()
        )


def waves() -> list[list[Step]]:
    """Access before erasure of the same person, so the waves run in order."""
    return [
        [
            Step("access, person in CRM and billing", Right.access, "both", CaseStatus.completed,
                 expect_tasks={"crm": "succeeded", "billing": "succeeded"}),
            Step("access, person in no system (kcat-style client)", Right.access, "nowhere", CaseStatus.completed,
                 expect_tasks={"crm": "not_found", "billing": "not_found"}, raw_client=True),
            Step("erasure, CRM contact only", Right.erasure, "crm_only", CaseStatus.completed,
                 expect_tasks={"crm": "succeeded", "billing": "not_found"}),
            Step("erasure, identity not yet verified", Right.erasure, "billing_only",
                 CaseStatus.awaiting_verification, verified=False),
        ],
        [
            Step("erasure, person with invoices", Right.erasure, "both", CaseStatus.completed_with_exceptions,
                 expect_tasks={"crm": "succeeded", "billing": "retained"}),
            Step("  ... the DPO verifies that identity", Right.erasure, "billing_only",
                 CaseStatus.completed_with_exceptions, expect_tasks={"crm": "not_found", "billing": "retained"},
                 verifies="erasure, identity not yet verified"),
        ],
        [
            Step("access after erasure", Right.access, "both", CaseStatus.completed,
                 expect_tasks={"crm": "not_found", "billing": "not_found"}),
        ],
    ]


def _request(step: Step) -> RightsRequested:
    from examples.people import SUBJECTS

    return RightsRequested(
        request_id=step.request_id,
        right=step.right,
        subject={"identifiers": SUBJECTS[step.subject].identifiers()},  # type: ignore[arg-type]
        jurisdiction="VN",
        received_at=datetime.now(UTC),
        verified=step.verified,
        channel="privacy_centre",
    )


async def prepare(settings: Settings) -> None:
    """Case store migrated, reference systems created and seeded, topics in place."""
    from examples.billing.worker import setup as setup_billing
    from examples.common import system_dsn
    from examples.crm.worker import setup as setup_crm

    from .store import migrate

    await migrate(settings.dsn)
    await setup_crm(system_dsn("crm", settings))
    await setup_billing(system_dsn("billing", settings))
    await topics.apply(settings.kafka_client_options(), topics.specs_for(list(SYSTEMS)),
                       replication_factor=settings.topic_replication_factor)


async def verify_case(settings: Settings, case_id: uuid.UUID) -> None:
    """What ``dsrflow cases verify`` does: the DPO confirms the subject's identity."""
    from .coordinator import Coordinator

    pool = await asyncpg.create_pool(settings.dsn, min_size=1, max_size=1)
    try:
        await Coordinator(settings, pool).verify(case_id, by="dpo@demo")
    finally:
        await pool.close()


async def publish_raw(settings: Settings, key: str, value: bytes) -> None:
    """Publish as any Kafka client following topics/schemas/ would: hand-written JSON and only the
    required CloudEvents headers, no dsrflow code involved."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    try:
        headers = [("ce_specversion", b"1.0"), ("ce_id", f"raw-{uuid.uuid4()}".encode()), ("ce_source", b"demo"),
                   ("ce_type", b"dsrflow.rights.requested.v1"), ("content-type", b"application/json")]
        await producer.send_and_wait(topics.REQUESTS, value, key=key.encode(), headers=headers)
    finally:
        await producer.stop()


async def publish_invalid(settings: Settings) -> None:
    """An event no schema allows: it must reach the dead-letter topic, and nothing must stop."""
    await publish_raw(settings, "demo-invalid", b'{"request_id": "bad one", "right": "teleport"}')


async def _statuses(conn: asyncpg.Connection, request_ids: Sequence[str]) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch(
        """SELECT c.request_id, c.case_id, c.status, c.outcome, c.bundle,
                  coalesce(jsonb_object_agg(t.system, t.status) FILTER (WHERE t.system IS NOT NULL), '{}') AS tasks
           FROM cases c LEFT JOIN tasks t USING (case_id)
           WHERE c.request_id = ANY($1::text[]) GROUP BY c.case_id""",
        list(request_ids),
    )
    return {r["request_id"]: r for r in rows}


def _settled(step: Step, row: asyncpg.Record | None) -> bool:
    if row is None:
        return False
    return CaseStatus(row["status"]) in TERMINAL_CASE or row["status"] == step.expect


async def run_scenario(
    settings: Settings, *, progress: Callable[[str], None] = lambda _: None, timeout: float = 120.0,
    duplicate: bool = True, invalid: bool = True,
) -> list[CaseResult]:
    """Submit the waves and wait for each to settle; returns one result per step."""
    conn = await asyncpg.connect(settings.dsn)
    results: list[CaseResult] = []
    try:
        for n, wave in enumerate(waves(), 1):
            reqs = [_request(s) for s in wave if not s.raw_client and not s.verifies]
            await submit(settings, reqs)
            for s in wave:
                if s.verifies:
                    earlier = next(r for r in results if r.step.label == s.verifies)
                    assert earlier.case_id is not None, f"no case for {s.verifies!r} to verify"
                    s.request_id = earlier.step.request_id
                    await verify_case(settings, earlier.case_id)
            for s in wave:
                if s.raw_client:
                    from examples.people import SUBJECTS

                    body = {"request_id": s.request_id, "right": str(s.right), "verified": s.verified,
                            "subject": {"identifiers": SUBJECTS[s.subject].identifiers()}}
                    await publish_raw(settings, s.request_id, orjson.dumps(body))
            if n == 1 and duplicate:
                # The same request again (a client retry): same request id, new event id.
                await submit(settings, [reqs[0].model_copy()])
            if n == 1 and invalid:
                await publish_invalid(settings)
            progress(f"wave {n}: submitted {len(wave)} request(s)")
            deadline = time.monotonic() + timeout
            last = ""
            while True:
                rows = await _statuses(conn, [s.request_id for s in wave])
                counts: dict[str, int] = {}
                for s in wave:
                    st = rows[s.request_id]["status"] if s.request_id in rows else "submitted"
                    counts[st] = counts.get(st, 0) + 1
                line = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                if line != last:
                    progress(f"wave {n}: {line}")
                    last = line
                if all(_settled(s, rows.get(s.request_id)) for s in wave):
                    break
                if time.monotonic() > deadline:
                    progress(f"wave {n}: timed out after {timeout:.0f}s")
                    break
                await asyncio.sleep(0.25)
            for s in wave:
                r = rows.get(s.request_id)
                bundle = orjson.loads(r["bundle"]) if r is not None and r["bundle"] else None
                results.append(CaseResult(
                    step=s,
                    case_id=r["case_id"] if r else None,
                    status=r["status"] if r else None,
                    tasks=orjson.loads(r["tasks"]) if r else {},
                    outcome=orjson.loads(r["outcome"]) if r is not None and r["outcome"] else None,
                    bundle_path=(settings.exports / bundle["ref"]).resolve() if bundle else None,
                ))
        return results
    finally:
        await conn.close()


async def reference_checks(settings: Settings) -> list[tuple[str, bool]]:
    """Look in the reference systems' own databases, not at what the workers reported."""
    from examples.common import system_dsn
    from examples.people import SUBJECTS

    both, crm_only = SUBJECTS["both"], SUBJECTS["crm_only"]
    crm = await asyncpg.connect(system_dsn("crm", settings))
    billing = await asyncpg.connect(system_dsn("billing", settings))
    try:
        gone = await crm.fetchval(
            "SELECT count(*) FROM contacts WHERE email = ANY($1::text[]) OR phone = ANY($2::text[])",
            [both.email, crm_only.email], [both.phone, crm_only.phone],
        )
        cust = await billing.fetchrow("SELECT * FROM customers WHERE id = $1", both.customer_id)
        invoices = await billing.fetchval("SELECT count(*) FROM invoices WHERE customer_id = $1", both.customer_id)
        found_by_id = await billing.fetchval(
            "SELECT count(*) FROM customers WHERE email = $1 OR phone = $2", both.email, both.phone)
        others = await crm.fetchval("SELECT count(*) FROM contacts")
    finally:
        await crm.close()
        await billing.close()
    return [
        ("CRM: erased contacts are gone (contacts, addresses, notes)", gone == 0),
        ("CRM: other customers are untouched", others > 0),
        ("billing: customer anonymised, email and phone removed",
         cust is not None and cust["anonymised_at"] is not None and cust["email"] is None and cust["phone"] is None
         and found_by_id == 0),
        (f"billing: {invoices} invoice(s) and their payments kept with their amounts (Law on Accounting)",
         invoices > 0),
    ]


async def duplicate_ignored(settings: Settings, request_id: str) -> bool:
    """The resubmitted request opened no second case and is on the first case's timeline."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        cases = await conn.fetchval("SELECT count(*) FROM cases WHERE request_id = $1", request_id)
        noted = await conn.fetchval(
            """SELECT count(*) FROM case_timeline t JOIN cases c USING (case_id)
               WHERE c.request_id = $1 AND t.kind = 'duplicate_request'""", request_id)
    finally:
        await conn.close()
    return bool(cases == 1 and noted >= 1)


async def dead_letters(settings: Settings, timeout: float = 10.0) -> list[dict[str, str]]:
    """The dlq_* headers of the records on the dead-letter topic."""
    from aiokafka import AIOKafkaConsumer

    from .codec import header_map

    consumer = AIOKafkaConsumer(topics.DEADLETTER, **settings.kafka_client_options(),
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list[dict[str, str]] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not out:
            batches = await consumer.getmany(timeout_ms=500)
            for recs in batches.values():
                out += [{k: v for k, v in header_map(r.headers).items() if k.startswith("dlq_")} for r in recs]
    finally:
        await consumer.stop()
    return out


def _print(msg: str) -> None:
    print(msg, flush=True)


def main(base: Settings) -> int:
    """Entry point of ``dsrflow demo``."""
    from . import stack

    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # the services log to files; keep the screen for the story
    state_dir = base.state_dir / "demo"
    if state_dir.exists():
        stack.down(state_dir)
        shutil.rmtree(state_dir)
    _print(f"starting the embedded stack in {state_dir} ...")
    t0 = time.monotonic()
    info = stack.up(state_dir)
    try:
        settings = Settings(state_dir=state_dir, kafka_bootstrap=None, pg_dsn=None, export_dir=None,
                            log_level="INFO")
        _print(f"  broker {settings.bootstrap} ({info['broker']}), PostgreSQL {settings.dsn}")
        asyncio.run(prepare(settings))
        _print("case store migrated; CRM and billing databases seeded; topics applied")
        with launcher.running(settings, SYSTEMS, log_dir=state_dir / "logs") as services:
            asyncio.run(launcher.wait_registered(settings.dsn, SYSTEMS, services))
            _print("coordinator and workers (crm, billing) running")
            results = asyncio.run(run_scenario(settings, progress=lambda m: _print("  " + m)))
            checks = asyncio.run(reference_checks(settings))
            dlq = asyncio.run(dead_letters(settings))
            checks.append(("duplicate request: no second case, noted on the first case's timeline",
                           asyncio.run(duplicate_ignored(settings, results[0].step.request_id))))
            services.check_alive()
        _print("")
        _print(f"{'request':<52} {'right':<9} {'outcome':<26} tasks")
        for r in results:
            mark = "ok " if r.ok else "BAD"
            tasks = ", ".join(f"{k}={v}" for k, v in sorted(r.tasks.items())) or "-"
            _print(f"{mark} {r.step.label:<48} {r.step.right:<9} {r.status or 'no case':<26} {tasks}")
            for item in (r.outcome or {}).get("retained", []):
                _print(f"      kept by {item['system']}: {item['records']} {item['category']} record(s) until "
                       f"{item.get('retain_until', '?')[:10]}; basis: {item['legal_basis']}")
            if r.bundle_path:
                _print(f"      access bundle: {r.bundle_path}")
        _print("")
        for label, ok in checks:
            _print(f"{'ok ' if ok else 'BAD'} {label}")
        invalid_ok = any(d.get("dlq_error_type") == "invalid" for d in dlq)
        _print(f"{'ok ' if invalid_ok else 'BAD'} invalid event dead-lettered "
               f"({', '.join(sorted({d.get('dlq_error_type', '?') for d in dlq})) or 'none'})")
        all_ok = all(r.ok for r in results) and all(ok for _, ok in checks) and invalid_ok
        _print(f"\ndemo {'succeeded' if all_ok else 'FAILED'} in {time.monotonic() - t0:.1f}s; "
               f"logs in {state_dir / 'logs'}")
        return 0 if all_ok else 1
    finally:
        stack.down(state_dir)
        _print("embedded stack stopped")
