"""Systems announce themselves on dsr.systems.v1 and an administrator approves: a worker with no
case-store credentials makes itself known, a new or changed declaration takes effect only once
approved (by its digest), a refused one stays refused, and an announcement is checked like a
receipt (its key, its signature) before anything is recorded."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from dsrflow import auth, signing, topics
from dsrflow.coordinator import Coordinator
from dsrflow.coordinator.service import Record
from dsrflow.exports import MemoryExportStore
from dsrflow.registry import SystemDeclaration, active_systems, declaration_digest, register
from dsrflow.rights import Action
from dsrflow.settings import Settings
from dsrflow.worker import MemoryTaskLedger, Result, TaskContext, Worker
from dsrflow.worker._announce import Announcer

_offsets = iter(range(10**6))


def declaration(name: str, **kw: object) -> SystemDeclaration:
    return SystemDeclaration.model_validate({"name": name, "identifier_types": ["email"], "actions": ["export"],
                                             "categories": ["user.contact.email"], **kw})


def worker_of(decl: SystemDeclaration) -> Worker:
    w = Worker(decl, ledger=MemoryTaskLedger())

    @w.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        return Result.not_found()

    return w


def announcement(decl: SystemDeclaration, *, credential: auth.Credential | None = None,
                 key: bytes | None = None) -> Record:
    """The record a worker of ``decl`` sends (the worker's own code makes it)."""
    announcer = Announcer(worker_of(decl), Settings(kafka_bootstrap="unused:9092"), instance="test/1/abc",
                          credential=credential)
    k, value, headers = announcer.record()
    return Record(topics.SYSTEMS, 0, next(_offsets), key if key is not None else k, value, headers)


def wrong_source(rec: Record) -> Record:
    headers = [(k, b"dsrflow/worker/billing" if k == "ce_source" else v) for k, v in rec.headers]  # type: ignore[misc]
    return Record(rec.topic, rec.partition, rec.offset, rec.key, rec.value, headers)


@pytest.fixture
async def pool(case_store: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(case_store, min_size=1, max_size=2)
    yield p
    await p.close()


@pytest.fixture
def coordinator(pool: asyncpg.Pool, case_store: str, tmp_path: Path) -> Coordinator:
    settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path)
    return Coordinator(settings, pool, export_store=MemoryExportStore())


async def actor(pool: asyncpg.Pool, name: str, role: str, tenant: str = "default") -> auth.Credential:
    async with pool.acquire() as conn:
        await auth.add_actor(conn, name, role, tenant)
        cred = auth.generate_credential(name)
        await auth.add_key(conn, name, cred.public_pem(), key_id=cred.key_id)
    return cred


async def decide(c: Coordinator, cred: auth.Credential, decision: str, system: str, digest: str,
                 **kw: str) -> tuple[bool, str | None]:
    token = auth.sign_command(cred, {"decision": decision, "system": system, "digest": digest, **kw})
    result = await c.execute(token, fallback_id=f"t-{uuid.uuid4()}")
    return result.accepted, result.error


async def state(pool: asyncpg.Pool, system: str) -> asyncpg.Record | None:
    return await pool.fetchrow("SELECT * FROM system_announcements WHERE system = $1", system)


async def in_force(pool: asyncpg.Pool, system: str) -> SystemDeclaration | None:
    async with pool.acquire() as conn:
        return next((s for s in await active_systems(conn) if s.name == system), None)


async def dead_letters(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch("SELECT headers FROM outbox WHERE topic = $1 ORDER BY id", topics.DEADLETTER)
    import orjson

    from dsrflow.store.outbox import headers_from_json

    out = []
    for r in rows:
        h = dict(headers_from_json(orjson.loads(r["headers"]) if isinstance(r["headers"], str) else r["headers"]))
        out.append(h["dlq_error_type"].decode())
    return out


async def test_a_new_system_waits_for_an_administrator_and_a_change_does_not_replace_what_is_in_force(
        coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    v1 = declaration("loyalty")
    await coordinator.handle_announcements([announcement(v1)])
    row = await state(pool, "loyalty")
    assert row is not None and row["state"] == "pending" and row["digest"] == declaration_digest(v1)
    assert await in_force(pool, "loyalty") is None  # announced is not registered: no case asks it yet

    admin = await actor(pool, "root", "admin")
    dpo = await actor(pool, "dpo", "dpo")
    assert await decide(coordinator, dpo, "approve_system", "loyalty", declaration_digest(v1)) == (
        False, "the role dpo may not make the decision approve_system")
    assert (await decide(coordinator, admin, "approve_system", "loyalty", declaration_digest(v1)))[0]
    assert await in_force(pool, "loyalty") == v1
    assert (await state(pool, "loyalty"))["state"] == "approved"
    sysrow = await pool.fetchrow("SELECT digest, approved_by FROM systems WHERE name = 'loyalty'")
    assert (sysrow["digest"], sysrow["approved_by"]) == (declaration_digest(v1), "root")

    # the same declaration again is a heartbeat: still approved, nothing new to decide
    await coordinator.handle_announcements([announcement(v1)])
    assert (await state(pool, "loyalty"))["state"] == "approved"

    # a worker redeployed with a narrower declaration (it no longer says it holds emails it holds)
    v2 = declaration("loyalty", categories=[])
    await coordinator.handle_announcements([announcement(v2)])
    assert (await state(pool, "loyalty"))["state"] == "pending"
    assert await in_force(pool, "loyalty") == v1  # what cases are planned from has not moved
    # approving what the administrator saw before the change is refused: the digest names a declaration
    ok, error = await decide(coordinator, admin, "approve_system", "loyalty", declaration_digest(v1))
    assert not ok and error is not None and "now announces declaration" in error
    assert (await decide(coordinator, admin, "approve_system", "loyalty", declaration_digest(v2)))[0]
    assert await in_force(pool, "loyalty") == v2
    decisions = await pool.fetch("SELECT decision, digest, actor FROM system_decisions WHERE system = 'loyalty' "
                                 "ORDER BY id")
    assert [(d["decision"], d["digest"], d["actor"]) for d in decisions] == [
        ("approved", declaration_digest(v1), "root"), ("approved", declaration_digest(v2), "root")]


async def test_a_refused_declaration_stays_refused_over_heartbeats_until_another_is_announced(
        coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    admin = await actor(pool, "root", "admin")
    bad = declaration("shop")
    await coordinator.handle_announcements([announcement(bad)])
    ok, _ = await decide(coordinator, admin, "refuse_system", "shop", declaration_digest(bad),
                         reason="declares no phone; the shop searches by phone")
    assert ok
    await coordinator.handle_announcements([announcement(bad)])  # its next heartbeat
    row = await state(pool, "shop")
    assert row["state"] == "refused" and "declares no phone" in row["reason"]
    ok, error = await decide(coordinator, admin, "approve_system", "shop", declaration_digest(bad))
    assert not ok and "cannot be approved" in (error or "")
    assert await in_force(pool, "shop") is None
    fixed = declaration("shop", identifier_types=["email", "phone"])
    await coordinator.handle_announcements([announcement(fixed)])
    assert (await state(pool, "shop"))["state"] == "pending"


async def test_declared_by_an_administrator_then_announced_is_in_force_at_once(
        coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    decl = declaration("helpdesk")
    async with pool.acquire() as conn:
        await register(conn, decl)  # `dsrflow systems declare FILE`, before the worker first starts
    await coordinator.handle_announcements([announcement(decl)])
    assert (await state(pool, "helpdesk"))["state"] == "approved"


async def test_another_controllers_name_is_refused_and_tenants_approve_their_own_systems_only(
        coordinator: Coordinator, pool: asyncpg.Pool, tmp_path: Path) -> None:
    async with pool.acquire() as conn:
        await register(conn, declaration("crm", controller="acme"))
    await coordinator.handle_announcements([announcement(declaration("crm", controller="beta"))])
    row = await state(pool, "crm")
    assert row["state"] == "refused" and "another controller" in row["reason"]
    assert (await in_force(pool, "crm")).controller == "acme"

    beta_admin = await actor(pool, "beta-admin", "admin", "beta")
    acme = declaration("acme-shop", controller="acme")
    await coordinator.handle_announcements([announcement(acme)])
    ok, error = await decide(coordinator, beta_admin, "approve_system", "acme-shop", declaration_digest(acme))
    assert not ok and "has announced itself" in (error or "")  # another tenant's system is not shown to exist
    # anyone who may write dsr.systems.v1 could have sent an unsigned announcement: not for a tenant's admin
    acme_admin = await actor(pool, "acme-admin", "admin", "acme")
    ok, error = await decide(coordinator, acme_admin, "approve_system", "acme-shop", declaration_digest(acme))
    assert not ok and "not signed" in (error or "")
    async with pool.acquire() as conn:
        key = await signing.new_system_key(conn, "acme-shop", tmp_path / "acme-shop.json")
    await coordinator.handle_announcements([announcement(acme, credential=key)])
    assert (await decide(coordinator, acme_admin, "approve_system", "acme-shop", declaration_digest(acme)))[0]


async def test_an_unsigned_announcement_cannot_move_a_system_to_another_controller(
        coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    await coordinator.handle_announcements([announcement(declaration("payroll", controller="acme"))])
    await coordinator.handle_announcements([announcement(declaration("payroll", controller="evil"))])
    row = await state(pool, "payroll")
    assert row["controller"] == "acme" and row["state"] == "pending"
    assert await dead_letters(pool) == ["controller_conflict"]


async def test_a_refusal_holds_while_two_instances_announce_two_declarations(
        coordinator: Coordinator, pool: asyncpg.Pool) -> None:
    old, new = declaration("orders"), declaration("orders", categories=[])
    async with pool.acquire() as conn:
        await register(conn, old)
    admin = await actor(pool, "root", "admin")
    await coordinator.handle_announcements([announcement(new)])  # a rolling deploy: the new instance
    assert (await decide(coordinator, admin, "refuse_system", "orders", declaration_digest(new),
                         reason="drops the email category"))[0]
    # the old instance's heartbeat, then the new one's: the refusal of the new declaration stands
    await coordinator.handle_announcements([announcement(old)])
    assert (await state(pool, "orders"))["state"] == "approved"
    await coordinator.handle_announcements([announcement(new)])
    row = await state(pool, "orders")
    assert row["state"] == "refused" and "drops the email category" in row["reason"]
    assert await in_force(pool, "orders") == old


async def test_an_announcement_is_checked_before_it_is_recorded(
        coordinator: Coordinator, pool: asyncpg.Pool, tmp_path: Path) -> None:
    async with pool.acquire() as conn:
        own = await signing.new_system_key(conn, "ledger", tmp_path / "ledger.json")
    stranger = auth.generate_credential("ledger")
    decl = declaration("ledger")
    await coordinator.handle_announcements([
        announcement(decl),  # the system has a key: unsigned is refused
        announcement(decl, credential=stranger),  # signed by a key that is not the system's
        announcement(decl, credential=own, key=b"other"),  # keyed by another name on a compacted topic
        Record(topics.SYSTEMS, 0, next(_offsets), b"ledger", b"{not json", []),
        wrong_source(announcement(decl, credential=own)),  # another system's source
    ])
    assert await state(pool, "ledger") is None
    assert sorted(await dead_letters(pool)) == ["missing_header", "unauthenticated_announcement",
                                                "unauthenticated_announcement", "wrong_key", "wrong_source"]
    await coordinator.handle_announcements([announcement(decl, credential=own)])
    row = await state(pool, "ledger")
    assert row["state"] == "pending" and row["signed_by"] == own.key_id


async def test_unsigned_announcements_are_refused_when_signatures_are_required(
        pool: asyncpg.Pool, case_store: str, tmp_path: Path) -> None:
    strict = Coordinator(Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path,
                                  require_signed_receipts=True), pool, export_store=MemoryExportStore())
    await strict.handle_announcements([announcement(declaration("nokey"))])
    assert await state(pool, "nokey") is None
    assert await dead_letters(pool) == ["unauthenticated_announcement"]


async def test_a_worker_with_no_case_store_announces_itself_over_kafka(
        broker: str, coordinator: Coordinator, pool: asyncpg.Pool, tmp_path: Path) -> None:
    name = f"ann-{uuid.uuid4().hex[:8]}"
    decl = declaration(name)
    # the worker's settings point at no case store at all: nothing it does may need one
    settings = Settings(kafka_bootstrap=broker, pg_dsn="postgresql://nobody:nothing@127.0.0.1:9/none",
                        state_dir=tmp_path / "w", export_dir=tmp_path / "exports",
                        startup_timeout=timedelta(seconds=30))
    stop = asyncio.Event()
    run = asyncio.create_task(worker_of(decl).run(settings, stop=stop))
    try:
        records = await _announcements_of(broker, name, timeout=30)
        assert not run.done(), run  # still consuming, with no case store
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
    await coordinator.handle_announcements(records)
    row = await state(pool, name)
    assert row is not None and row["state"] == "pending" and row["digest"] == declaration_digest(decl)
    assert row["sdk_version"] and row["instance"]


async def _announcements_of(broker: str, name: str, *, timeout: float) -> list[Record]:
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topics.SYSTEMS, 0)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if topics.SYSTEMS in (await consumer.topics()):
                break
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("dsr.systems.v1 never appeared")
            await asyncio.sleep(0.2)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        while True:
            got = await consumer.getmany(tp, timeout_ms=500)
            found = [Record(m.topic, m.partition, m.offset, m.key, m.value, list(m.headers or []))
                     for m in got.get(tp, []) if m.key == name.encode()]
            if found:
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no announcement of {name}")
    finally:
        await consumer.stop()


async def test_the_administrator_approves_from_the_command_line(
        coordinator: Coordinator, pool: asyncpg.Pool, case_store: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import orjson

    decl = declaration("loyalty", description="the loyalty programme")
    await coordinator.handle_announcements([announcement(decl)])
    admin = await actor(pool, "root", "admin")
    cred = admin.save(tmp_path / "root.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSRFLOW_")}
    env.update(DSRFLOW_PG_DSN=case_store, DSRFLOW_STATE_DIR=str(tmp_path / "state"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dsrflow.cli", "systems", *args], env=env, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)

    shown = cli("pending")
    assert shown.returncode == 0, shown.stderr
    assert "loyalty" in shown.stdout and "a new system" in shown.stdout
    assert f"dsrflow systems approve loyalty --digest {declaration_digest(decl)}" in shown.stdout
    [doc] = orjson.loads(cli("pending", "--json").stdout)
    assert (doc["system"], doc["state"], doc["digest"], doc["changed"]) == (
        "loyalty", "pending", declaration_digest(decl), None)

    no_digest = cli("approve", "loyalty", "--credential", str(cred))
    assert no_digest.returncode != 0 and no_digest.stderr.count("\n") == 1 and "--digest" in no_digest.stderr
    stale = cli("approve", "loyalty", "--digest", "0" * 64, "--credential", str(cred))
    assert stale.returncode == 1 and "look at it again" in stale.stderr
    assert await in_force(pool, "loyalty") is None

    done = cli("approve", "loyalty", "--digest", declaration_digest(decl), "--credential", str(cred))
    assert done.returncode == 0, done.stderr
    assert "approved by root" in done.stdout
    assert await in_force(pool, "loyalty") == decl
    assert cli("pending").stdout.strip() == "nothing waits for approval"
    everything = orjson.loads(cli("pending", "--all", "--json").stdout)
    assert [(d["system"], d["state"], d["changed"]) for d in everything] == [("loyalty", "approved", [])]
