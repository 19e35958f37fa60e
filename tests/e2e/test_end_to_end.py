"""The coordinator and both reference workers as real processes, on the session's broker
and PostgreSQL: access, erasure with retained invoices, a duplicate request and an invalid
event, checked in the reference systems' own databases."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from dsrflow import demo, launcher
from dsrflow.exports import read_bundle
from dsrflow.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.people import SUBJECTS  # noqa: E402

pytestmark = pytest.mark.e2e


async def test_every_right_duplicate_and_invalid_end_to_end(e2e_settings: Settings, tmp_path: Path) -> None:
    import os

    settings = e2e_settings
    await demo.prepare(settings)
    settings = await demo.sign_everything(settings)  # every task and receipt signed, and checked
    extra = {k: os.environ[k] for k in ("DSRFLOW_CRM_DSN", "DSRFLOW_BILLING_DSN")}
    with launcher.running(settings, demo.SYSTEMS, log_dir=tmp_path / "logs", cwd=ROOT, extra_env=extra) as services:
        await demo.approve_systems(settings, demo.SYSTEMS, services)
        people = await demo.cast(settings)
        results = await demo.run_scenario(settings, timeout=90, people=people)
        # Checked in the reference systems' own databases: every right's effect is really there.
        checks = await demo.reference_checks(settings, people) + await demo.late_system(settings, results)
        # the DPO's decisions: signed, on the topic (verify, lift above) and through the core (the CLI's path)
        checks += await demo.dpo_decisions(settings, people)
        services.check_alive()  # nothing died on the invalid event
        dlq = await demo.dead_letters(settings)
        ours = {str(r.case_id) for r in results if r.case_id}
        signed = await _receipts_signed(settings, ours)
        refused = await _refused_as_unauthenticated(settings, ours)
    assert signed and all(signed.values()), signed  # every receipt of these cases, signed by its system
    assert refused == [], refused  # and no task or receipt of theirs refused for its signature

    failed = [label for label, ok in checks if not ok]
    assert not failed, failed
    assert len(checks) >= 16
    rights = {r.step.right for r in results}
    from dsrflow.rights import ACTION_FOR_RIGHT, Right

    assert set(ACTION_FOR_RIGHT) | {Right.information} <= rights  # every right that fans out, and information
    # No case ends completed while a system holding the person's data did nothing.
    for r in results:
        if r.status == "completed" and r.step.right in ACTION_FOR_RIGHT:
            assert all(st in ("succeeded", "not_found") for st in r.tasks.values()), (r.step.label, r.tasks)

    by_label = {r.step.label: r for r in results}
    for r in results:
        assert r.status == r.step.expect, (r.step.label, r.status, r.tasks, services.log_tail("coordinator"))
        for system, status in r.step.expect_tasks.items():
            assert r.tasks.get(system) == status, (r.step.label, r.tasks)

    both = SUBJECTS["both"]
    crm = await asyncpg.connect(extra["DSRFLOW_CRM_DSN"])
    billing = await asyncpg.connect(extra["DSRFLOW_BILLING_DSN"])
    store = await asyncpg.connect(settings.dsn)
    try:
        # Access bundle: both systems' JSON, the manifest's sha256s match the files, the data is the subject's.
        access = by_label["access, person in CRM and billing"]
        bundled = access
        assert access.bundle_path is not None
        # The same person's erasure runs in the same wave: when it finished after the access case, it
        # deleted the access case's bundle and exports and said so; else the bundle is there.
        deleted = (by_label["erasure, person with invoices"].outcome or {}).get("earlier_copies_deleted", {})
        subject = both
        if str(access.case_id) in {c["case_id"] for c in deleted.get("cases", [])}:
            assert not access.bundle_path.exists()
            bundled = by_label["  ... the DPO checks the parent's authority"]  # a bundle nothing erased
            subject = people["child"]
        assert bundled.bundle_path is not None and bundled.bundle_path.exists()
        manifest, files = read_bundle(bundled.bundle_path.read_bytes())
        exported = {system for system, status in bundled.tasks.items() if status == "succeeded"}
        assert "crm" in exported
        assert {f["system"] for f in manifest["files"] if f["kind"] == "export"} == exported
        with zipfile.ZipFile(io.BytesIO(bundled.bundle_path.read_bytes())) as zf:
            crm_export = zf.read("crm.json").decode()
        assert subject.email in crm_export and subject.full_name in crm_export
        assert SUBJECTS["crm_only"].email not in crm_export  # only the subject's own data

        # Erasure: CRM rows gone in FK order; billing customer anonymised, invoices and payments kept.
        for table, column in (("contacts", "email"),):
            assert await crm.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", both.email) == 0
        assert await crm.fetchval(
            "SELECT count(*) FROM addresses a LEFT JOIN contacts c ON c.id = a.contact_id WHERE c.id IS NULL") == 0
        assert await crm.fetchval("SELECT count(*) FROM contacts WHERE email = $1",
                                  SUBJECTS["crm_only"].email) == 0
        customer = await billing.fetchrow("SELECT * FROM customers WHERE id = $1", both.customer_id)
        assert customer["anonymised_at"] is not None
        assert customer["email"] is None and customer["phone"] is None and customer["tax_code"] is None
        assert customer["full_name"] != both.full_name
        kept = await billing.fetchval(
            "SELECT count(*) FROM invoices WHERE customer_id = $1 AND amount_vnd > 0", both.customer_id)
        assert kept > 0
        erasure = by_label["erasure, person with invoices"]
        retained = (erasure.outcome or {})["retained"]
        assert retained and retained[0]["system"] == "billing"
        assert "Accounting" in retained[0]["legal_basis"] and retained[0]["records"] >= kept

        # The request that was not verified waited until the DPO verified it; then it ran.
        waited = by_label["erasure, identity not yet verified"]
        kinds = [r["kind"] for r in await store.fetch(
            "SELECT kind FROM case_timeline WHERE case_id = $1 ORDER BY position", waited.case_id)]
        assert kinds[:5] == ["received", "acknowledged", "awaiting_verification", "verified", "tasks_dispatched"]
        assert await billing.fetchval("SELECT count(*) FROM customers WHERE id = $1 AND anonymised_at IS NOT NULL",
                                      SUBJECTS["billing_only"].customer_id) == 1

        # Duplicate: one case, noted on its timeline; the timeline's hash chain is intact.
        assert await demo.duplicate_ignored(settings, access.step.request_id)
        from dsrflow.store.timeline import verify

        rows = await store.fetch("SELECT * FROM case_timeline WHERE case_id = $1 ORDER BY position", access.case_id)
        assert verify(rows)

        # Receipts carry no personal data.
        for body in await store.fetchval("SELECT array_agg(body::text) FROM receipts"):
            assert both.email not in body and both.phone not in body and both.full_name not in body
    finally:
        await crm.close()
        await billing.close()
        await store.close()

    invalid = [d for d in dlq if d.get("dlq_error_type") == "invalid"]
    assert invalid and invalid[0]["dlq_original_topic"] == "dsr.requests.v1"
    assert "right" in invalid[0]["dlq_error"]
    assert orjson.loads(orjson.dumps(invalid[0]))  # plain strings only


async def _records(settings: Settings, topic: str) -> list[Any]:
    """Every record on ``topic`` (the broker is shared with other tests: callers pick theirs)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, **settings.kafka_client_options(), auto_offset_reset="earliest",
                                group_id=None)
    await consumer.start()
    try:
        batches: list[Any] = []
        while polled := await consumer.getmany(timeout_ms=2000):
            batches += polled.values()
    finally:
        await consumer.stop()
    return [r for recs in batches for r in recs]


async def _refused_as_unauthenticated(settings: Settings, case_ids: set[str]) -> list[dict[str, str]]:
    """Dead letters of these cases' tasks and receipts (keyed by case id) refused for their signature."""
    from dsrflow import codec, topics

    letters = [codec.header_map(r.headers) for r in await _records(settings, topics.DEADLETTER)
               if (r.key or b"").decode() in case_ids]
    return [h for h in letters if h.get("dlq_error_type", "").startswith("unauthenticated")]


async def _receipts_signed(settings: Settings, case_ids: set[str]) -> dict[str, bool]:
    """Each receipt of these cases on dsr.receipts.v1: whether its signature verifies with its
    system's key in the case store."""
    import asyncpg

    from dsrflow import codec, signing, topics

    conn = await asyncpg.connect(settings.dsn)
    try:
        keys = await signing.system_keys(conn, demo.SYSTEMS)
    finally:
        await conn.close()
    out: dict[str, bool] = {}
    for r in await _records(settings, topics.RECEIPTS):
        ce = codec.header_map(r.headers)
        if (r.key or b"").decode() not in case_ids:
            continue
        system = ce.get("ce_source", "").rsplit("/", 1)[-1]
        try:
            signing.verify_headers(keys.get(system, {}), list(r.headers), ce_id=ce["ce_id"],
                                   ce_source=ce["ce_source"], value=r.value or b"")
            out[ce["ce_id"]] = True
        except signing.SignatureError:
            out[ce["ce_id"]] = False
    return out
