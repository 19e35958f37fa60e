"""Receipts signed by their system (dsrflow.signing): a producer that knows a task id but not the
system's key can neither close the task, fail the case, nor take the real receipt's event id."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest

from dsrflow import auth, codec, signing, topics
from dsrflow.coordinator import Coordinator
from dsrflow.coordinator.service import Record
from dsrflow.events import RightsRequested, TaskReceipt
from dsrflow.exports import MemoryExportStore
from dsrflow.registry import SystemDeclaration, register
from dsrflow.settings import Settings
from dsrflow.store.outbox import headers_from_json

CRM = SystemDeclaration(name="crm", identifier_types=("email",), actions=("erase",))
BILLING = SystemDeclaration(name="billing", identifier_types=("email",), actions=("erase",))
_offsets = iter(range(10**6))


@pytest.fixture
async def pool(case_store: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(case_store, min_size=1, max_size=2)
    async with p.acquire() as conn:
        for s in (CRM, BILLING):
            await register(conn, s)
    yield p
    await p.close()


def coordinator(pool: asyncpg.Pool, case_store: str, tmp_path: Path, **kw: object) -> Coordinator:
    settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path, **kw)  # type: ignore[arg-type]
    return Coordinator(settings, pool, export_store=MemoryExportStore())


async def erasure(c: Coordinator, pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    req = RightsRequested.model_validate({"request_id": f"sig-{uuid.uuid4().hex[:8]}", "right": "erasure",
                                          "verified": True, "subject": {"identifiers": {"email": "an@example.vn"}}})
    value, headers = codec.encode(req, source="test")
    await c.handle_requests([Record(topics.REQUESTS, 0, next(_offsets), None, value, headers)])
    rows = await pool.fetch("SELECT t.* FROM tasks t JOIN cases c USING (case_id) WHERE c.request_id = $1",
                            req.request_id)
    return {r["system"]: r for r in rows}


def receipt_record(task: asyncpg.Record, status: str, *, credential: auth.Credential | None = None,
                   event_id: str | None = None, source: str | None = None, **kw: object) -> Record:
    r = TaskReceipt.model_validate({"task_id": task["task_id"], "case_id": task["case_id"], "system": task["system"],
                                    "attempt": task["attempt"], "status": status, "completed_at": datetime.now(UTC),
                                    **kw})
    src = source or f"dsrflow/worker/{task['system']}"
    value, headers = codec.encode(r, source=src, event_id=event_id or f"receipt-{task['task_id']}")
    if credential is not None:
        headers += signing.sign_headers(credential, ce_id=event_id or f"receipt-{task['task_id']}", ce_source=src,
                                        value=value)
    return Record(topics.RECEIPTS, 0, next(_offsets), None, value, headers)


async def dead_letters(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch("SELECT headers FROM outbox WHERE topic = $1 ORDER BY id", topics.DEADLETTER)
    return [codec.header_map(headers_from_json(r["headers"])).get("dlq_error_type", "") for r in rows]


async def test_a_forged_receipt_is_refused_and_cannot_take_the_real_ones_id(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    c = coordinator(pool, case_store, tmp_path)
    crm_key = auth.generate_credential("crm")
    stranger = auth.generate_credential("crm")  # a key nobody registered
    async with pool.acquire() as conn:
        await signing.add_system_key(conn, "crm", crm_key.public_pem(), key_id=crm_key.key_id)
    t = await erasure(c, pool)
    real_id = f"receipt-{t['crm']['task_id']}"
    forgeries = [
        receipt_record(t["crm"], "failed", error="forged", event_id=real_id),  # unsigned, the real id
        receipt_record(t["crm"], "not_found", credential=stranger, event_id=real_id),  # an unknown key
    ]
    tampered = receipt_record(t["crm"], "succeeded", credential=crm_key, counts={"erased": 1})
    tampered = Record(tampered.topic, 0, next(_offsets), None,
                      tampered.value.replace(b'"erased":1', b'"erased":0'), tampered.headers)  # type: ignore[union-attr]
    await c.handle_receipts([*forgeries, tampered])
    crm = await pool.fetchrow("SELECT status FROM tasks WHERE task_id = $1", t["crm"]["task_id"])
    assert crm["status"] == "dispatched"  # nothing closed it
    assert await dead_letters(pool) == ["unauthenticated_receipt"] * 3
    # the real receipt, signed, with the id the forgeries tried to take, still counts
    await c.handle_receipts([receipt_record(t["crm"], "succeeded", credential=crm_key, counts={"erased": 2})])
    crm = await pool.fetchrow("SELECT status, result FROM tasks WHERE task_id = $1", t["crm"]["task_id"])
    assert crm["status"] == "succeeded" and orjson.loads(crm["result"])["counts"] == {"erased": 2}
    # billing has no key: its unsigned receipt is accepted, unless every receipt must be signed
    strict = coordinator(pool, case_store, tmp_path, require_signed_receipts=True)
    await strict.handle_receipts([receipt_record(t["billing"], "succeeded")])
    assert (await pool.fetchrow("SELECT status FROM tasks WHERE task_id = $1", t["billing"]["task_id"]))["status"] \
        == "dispatched"
    await c.handle_receipts([receipt_record(t["billing"], "succeeded", event_id="billing-1")])
    assert (await pool.fetchrow("SELECT status FROM tasks WHERE task_id = $1", t["billing"]["task_id"]))["status"] \
        == "succeeded"


async def test_a_revoked_key_signs_nothing_any_more(pool: asyncpg.Pool, case_store: str, tmp_path: Path) -> None:
    c = coordinator(pool, case_store, tmp_path)
    old, new = auth.generate_credential("crm"), auth.generate_credential("crm")
    async with pool.acquire() as conn:
        for cred in (old, new):
            await signing.add_system_key(conn, "crm", cred.public_pem(), key_id=cred.key_id)
        await signing.revoke_system_key(conn, old.key_id)
    t = await erasure(c, pool)
    await c.handle_receipts([receipt_record(t["crm"], "succeeded", credential=old, event_id="old")])
    assert (await pool.fetchrow("SELECT status FROM tasks WHERE task_id = $1", t["crm"]["task_id"]))["status"] \
        == "dispatched"
    await c.handle_receipts([receipt_record(t["crm"], "succeeded", credential=new, event_id="new")])
    assert (await pool.fetchrow("SELECT status FROM tasks WHERE task_id = $1", t["crm"]["task_id"]))["status"] \
        == "succeeded"


def test_a_signature_made_without_dsrflow_verifies() -> None:
    """A worker in another language signs with any Ed25519 library over the documented bytes."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    value = b'{"status":"succeeded"}'
    message = b"dsrflow-receipt-v1\x00" + b"id-1\x00" + b"worker/x\x00" + value
    headers = [("dsr_key_id", b"k_0123456789abcdef"),
               ("dsr_signature", base64.urlsafe_b64encode(private.sign(message)).rstrip(b"="))]
    keys = {"k_0123456789abcdef": private.public_key()}
    assert signing.verify_headers(keys, headers, ce_id="id-1", ce_source="worker/x", value=value) == \
        "k_0123456789abcdef"
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.verify_headers(keys, headers, ce_id="id-2", ce_source="worker/x", value=value)
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.verify_headers(keys, headers, ce_id="id-1", ce_source="worker/y", value=value)


async def test_a_forgery_ahead_of_the_real_receipt_in_one_batch_does_not_shadow_it(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    c = coordinator(pool, case_store, tmp_path)
    crm_key = auth.generate_credential("crm")
    async with pool.acquire() as conn:
        await signing.add_system_key(conn, "crm", crm_key.public_pem(), key_id=crm_key.key_id)
    t = await erasure(c, pool)
    same_id = f"receipt-{t['crm']['task_id']}"
    await c.handle_receipts([receipt_record(t["crm"], "failed", error="forged", event_id=same_id),
                             receipt_record(t["crm"], "succeeded", credential=crm_key, event_id=same_id,
                                            counts={"erased": 1})])
    crm = await pool.fetchrow("SELECT status, result FROM tasks WHERE task_id = $1", t["crm"]["task_id"])
    assert crm["status"] == "succeeded" and orjson.loads(crm["result"])["counts"] == {"erased": 1}
    assert await dead_letters(pool) == ["unauthenticated_receipt"]


async def test_the_relay_signs_every_task_with_the_coordinators_key(
    pool: asyncpg.Pool, case_store: str, broker: str, broker_kind: str, tmp_path: Path
) -> None:
    import asyncio

    from aiokafka import AIOKafkaConsumer

    from dsrflow.coordinator.relay import OutboxRelay

    credential = auth.generate_credential("coordinator")
    credential.save(tmp_path / "coordinator.json")
    signing.write_public_keys(tmp_path / "coordinator-public.json", [credential])
    settings = Settings(pg_dsn=case_store, kafka_bootstrap=broker, state_dir=tmp_path,
                        kafka_idempotent_producer=broker_kind != "tansu",
                        coordinator_credential=tmp_path / "coordinator.json")
    await topics.apply(settings.kafka_client_options(), topics.specs_for(["crm", "billing"]))
    c = Coordinator(settings, pool, export_store=MemoryExportStore())
    t = await erasure(c, pool)
    stop = asyncio.Event()
    relay = asyncio.create_task(OutboxRelay(settings, poll_interval=0.1).run(stop))
    consumer = AIOKafkaConsumer(topics.tasks_topic("crm"), **settings.kafka_client_options(),
                                auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    try:
        found = None
        deadline = asyncio.get_running_loop().time() + 30
        while found is None and asyncio.get_running_loop().time() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                found = next((r for r in recs if str(t["crm"]["task_id"]).encode() in (r.value or b"")), found)
        assert found is not None, "the task never reached its topic"
        ce = codec.header_map(found.headers)
        keys = signing.load_public_keys(tmp_path / "coordinator-public.json")
        assert signing.verify_headers(keys, list(found.headers), ce_id=ce["ce_id"], ce_source=ce["ce_source"],
                                      value=found.value or b"", kind="task") == credential.key_id
        with pytest.raises(signing.SignatureError):  # a task's signature never passes for a receipt's
            signing.verify_headers(keys, list(found.headers), ce_id=ce["ce_id"], ce_source=ce["ce_source"],
                                   value=found.value or b"", kind="receipt")
    finally:
        stop.set()
        await relay
        await consumer.stop()


async def test_a_receipt_naming_another_system_cannot_take_the_real_ones_id(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    c = coordinator(pool, case_store, tmp_path)
    crm_key = auth.generate_credential("crm")
    async with pool.acquire() as conn:
        await signing.add_system_key(conn, "crm", crm_key.public_pem(), key_id=crm_key.key_id)
    t = await erasure(c, pool)
    real_id, crm_source = f"receipt-{t['crm']['task_id']}", "dsrflow/worker/crm"
    ghost = dict(t["crm"]) | {"system": "ghost"}  # a system with no key: admitted unsigned, then unknown
    await c.handle_receipts([receipt_record(ghost, "failed", error="x", event_id=real_id,  # type: ignore[arg-type]
                                            source=crm_source)])
    await c.handle_receipts([receipt_record(t["crm"], "succeeded", credential=crm_key, event_id=real_id,
                                            source=crm_source, counts={"erased": 1})])
    crm = await pool.fetchrow("SELECT status FROM tasks WHERE task_id = $1", t["crm"]["task_id"])
    assert crm["status"] == "succeeded"
    assert await dead_letters(pool) == ["wrong_source"]  # crm's source for a receipt of "ghost"


async def test_a_receipt_from_another_systems_source_is_dead_lettered_even_unsigned(
    pool: asyncpg.Pool, case_store: str, tmp_path: Path
) -> None:
    c = coordinator(pool, case_store, tmp_path)
    t = await erasure(c, pool)
    # billing's worker, mixing its systems up, reports crm's task (nothing is signed here)
    await c.handle_receipts([receipt_record(t["crm"], "succeeded", source="dsrflow/worker/billing",
                                            counts={"erased": 1})])
    crm = await pool.fetchrow("SELECT status FROM tasks WHERE task_id = $1", t["crm"]["task_id"])
    assert crm["status"] == "dispatched"
    assert await dead_letters(pool) == ["wrong_source"]
    # its own source is accepted: a source whose last segment is the system's name
    await c.handle_receipts([receipt_record(t["crm"], "succeeded", source="acme/workers/crm", event_id="r-2",
                                            counts={"erased": 1})])
    crm = await pool.fetchrow("SELECT status FROM tasks WHERE task_id = $1", t["crm"]["task_id"])
    assert crm["status"] == "succeeded"
