"""Actors and their keys on a real PostgreSQL (migration 0008), and command tokens checked against
the stored keys: a revoked key, a disabled actor, a key that claims another actor's name, and a
token made without PyJWT, as a DPO tool in another language makes it."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import pytest

from dsrflow.auth import (
    AuthError,
    Credential,
    Refusal,
    Role,
    add_actor,
    add_key,
    disable_actor,
    generate_credential,
    list_actors,
    revoke_key,
    sign_command,
    verify_command,
)
from dsrflow.commands import check_role, parse_command
from dsrflow.errors import InvalidInput

CMD = {"decision": "lift", "case_id": str(uuid.UUID(int=5))}


@pytest.fixture
async def conn(case_store: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(case_store)
    yield c
    await c.close()


async def db_now(conn: asyncpg.Connection) -> datetime:
    now: datetime = await conn.fetchval("SELECT now()")
    return now


async def enrolled(conn: asyncpg.Connection, name: str, role: str = "dpo", tenant: str = "default") -> Credential:
    """An actor with one key, as `dsrflow actors add` would make it."""
    await add_actor(conn, name, role, tenant)
    cred = generate_credential(name)
    assert await add_key(conn, name, cred.public_pem(), key_id=cred.key_id) == cred.key_id
    return cred


async def refused(conn: asyncpg.Connection, token: str, reason: Refusal) -> AuthError:
    with pytest.raises(AuthError) as info:
        await verify_command(conn, token, now=await db_now(conn))
    assert info.value.reason_code == reason, str(info.value)
    assert all(len(part) < 8 or part not in str(info.value) for part in token.split("."))
    return info.value


async def test_a_token_verifies_against_the_stored_key(conn: asyncpg.Connection) -> None:
    cred = await enrolled(conn, "lan.dpo@example.vn", tenant="acme")
    now = await db_now(conn)
    cid = uuid.uuid4()
    a = await verify_command(conn, sign_command(cred, CMD, now=now, command_id=cid), now=now)
    assert (a.actor, a.role, a.tenant, a.key_id, a.command_id, a.cmd) == (
        "lan.dpo@example.vn", Role.dpo, "acme", cred.key_id, cid, CMD)
    assert a.issued_at == now.replace(microsecond=0) and a.expires_at - a.issued_at == timedelta(minutes=5)
    check_role(a.role, parse_command(a.cmd))  # what the coordinator does next


async def test_verify_works_through_a_pool(case_store: str) -> None:
    pool = await asyncpg.create_pool(case_store, min_size=1, max_size=1)
    try:
        async with pool.acquire() as c:
            cred = await enrolled(c, "pooled")
            now = await db_now(c)
        a = await verify_command(pool, sign_command(cred, CMD, now=now), now=now)
        assert a.actor == "pooled"
    finally:
        await pool.close()


async def test_a_token_made_without_pyjwt_verifies(conn: asyncpg.Connection) -> None:
    """base64url(header).base64url(claims).base64url(Ed25519 signature), signed with the
    ``cryptography`` library alone: what a Go, Java or JavaScript tool produces."""
    cred = await enrolled(conn, "tool")
    now = await db_now(conn)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    iat = int(now.timestamp())
    header = b64(json.dumps({"alg": "EdDSA", "kid": cred.key_id}, separators=(",", ":")).encode())
    claims = b64(json.dumps({"iss": "tool", "aud": "dsrflow", "jti": str(uuid.uuid4()), "iat": iat,
                             "exp": iat + 60, "cmd": CMD}).encode())
    signature = b64(cred.private_key.sign(f"{header}.{claims}".encode()))
    a = await verify_command(conn, f"{header}.{claims}.{signature}", now=now)
    assert a.actor == "tool" and a.cmd == CMD


async def test_an_unknown_key_is_refused(conn: asyncpg.Connection) -> None:
    stranger = generate_credential("lan")  # never registered
    await add_actor(conn, "lan", "dpo")
    exc = await refused(conn, sign_command(stranger, CMD, now=await db_now(conn)), Refusal.unknown_key)
    assert stranger.key_id in str(exc)


async def test_a_revoked_key_is_refused_and_a_new_one_works(conn: asyncpg.Connection) -> None:
    old = await enrolled(conn, "binh")
    now = await db_now(conn)
    signed_before = sign_command(old, CMD, now=now)
    await verify_command(conn, signed_before, now=now)
    await revoke_key(conn, old.key_id)
    await refused(conn, signed_before, Refusal.key_revoked)  # a token signed before the revocation too
    await refused(conn, sign_command(old, CMD, now=await db_now(conn)), Refusal.key_revoked)
    await revoke_key(conn, old.key_id)  # again: nothing changes
    new = generate_credential("binh")
    await add_key(conn, "binh", new.public_pem(), key_id=new.key_id)
    assert (await verify_command(conn, sign_command(new, CMD, now=now), now=now)).actor == "binh"
    with pytest.raises(InvalidInput, match="registered already"):  # a revoked key does not come back
        await add_key(conn, "binh", old.public_pem())


async def test_a_forged_signature_under_a_revoked_key_is_a_bad_signature(conn: asyncpg.Connection) -> None:
    real = await enrolled(conn, "chi")
    await revoke_key(conn, real.key_id)
    forger = generate_credential("chi", key_id=real.key_id)
    await refused(conn, sign_command(forger, CMD, now=await db_now(conn)), Refusal.bad_signature)


async def test_a_disabled_actor_is_refused_with_every_key(conn: asyncpg.Connection) -> None:
    first = await enrolled(conn, "dung")
    second = generate_credential("dung")
    await add_key(conn, "dung", second.public_pem(), key_id=second.key_id)
    await disable_actor(conn, "dung")
    now = await db_now(conn)
    for cred in (first, second):
        await refused(conn, sign_command(cred, CMD, now=now), Refusal.actor_disabled)
    with pytest.raises(InvalidInput, match="disabled"):
        await add_key(conn, "dung", generate_credential("dung").public_pem())
    await disable_actor(conn, "dung")  # again: nothing changes


async def test_a_key_claiming_another_actors_name_is_refused(conn: asyncpg.Connection) -> None:
    """An operator signs with their own, valid key but names the DPO as the issuer."""
    await enrolled(conn, "dpo-lan")
    op = await enrolled(conn, "op-minh", role="operator")
    impostor = Credential(actor="dpo-lan", key_id=op.key_id, private_key=op.private_key)
    exc = await refused(conn, sign_command(impostor, CMD, now=await db_now(conn)), Refusal.issuer_mismatch)
    assert "op-minh" in str(exc)


async def test_a_key_of_another_actor_under_this_actors_kid_is_a_bad_signature(conn: asyncpg.Connection) -> None:
    dpo = await enrolled(conn, "dpo-hoa")
    op = await enrolled(conn, "op-khanh", role="operator")
    impostor = Credential(actor="dpo-hoa", key_id=dpo.key_id, private_key=op.private_key)
    await refused(conn, sign_command(impostor, CMD, now=await db_now(conn)), Refusal.bad_signature)


async def test_time_is_the_callers_clock(conn: asyncpg.Connection) -> None:
    cred = await enrolled(conn, "time")
    now = await db_now(conn)
    token = sign_command(cred, CMD, now=now, ttl=timedelta(minutes=1))
    with pytest.raises(AuthError) as info:
        await verify_command(conn, token, now=now + timedelta(minutes=1))
    assert info.value.reason_code == Refusal.expired
    with pytest.raises(AuthError) as info:
        await verify_command(conn, sign_command(cred, CMD, now=now + timedelta(minutes=2)), now=now)
    assert info.value.reason_code == Refusal.issued_in_future


async def test_malformed_tokens_never_reach_the_database(conn: asyncpg.Connection) -> None:
    class NoDatabase:
        async def fetchrow(self, *args: object) -> None:
            raise AssertionError("queried the database")

    now = await db_now(conn)
    cred = generate_credential("nobody")
    unsigned = sign_command(cred, CMD, now=now).rsplit(".", 1)[0] + "."
    for token, reason in (("", Refusal.malformed), ("a.b.c", Refusal.malformed), (unsigned, Refusal.malformed)):
        with pytest.raises(AuthError) as info:
            await verify_command(NoDatabase(), token, now=now)
        assert info.value.reason_code == reason


async def test_actors_and_keys_are_listed(conn: asyncpg.Connection) -> None:
    a = await enrolled(conn, "eve", role="admin")
    second = await add_key(conn, "eve", generate_credential("eve").public_pem())
    await revoke_key(conn, a.key_id)
    await enrolled(conn, "op", role="operator", tenant="acme")
    await disable_actor(conn, "op")
    listed = {x.name: x for x in await list_actors(conn)}
    assert list(listed) == ["eve", "op"]
    eve, op = listed["eve"], listed["op"]
    assert (eve.role, eve.tenant, eve.disabled_at) == (Role.admin, "default", None)
    assert [k.key_id for k in eve.keys] == [a.key_id, second]
    assert eve.keys[0].revoked_at is not None and eve.keys[1].revoked_at is None
    assert (op.role, op.tenant) == (Role.operator, "acme") and op.disabled_at is not None


async def test_bad_administration_is_refused(conn: asyncpg.Connection) -> None:
    await add_actor(conn, "fay", Role.dpo)
    with pytest.raises(InvalidInput, match="exists already"):
        await add_actor(conn, "fay", "operator")
    with pytest.raises(InvalidInput, match="role"):
        await add_actor(conn, "gil", "superuser")
    with pytest.raises(InvalidInput, match="actor name"):
        await add_actor(conn, "gil bert", "dpo")
    with pytest.raises(InvalidInput, match="tenant"):
        await add_actor(conn, "gil", "dpo", tenant="")
    with pytest.raises(InvalidInput, match="no actor"):
        await add_key(conn, "nobody", generate_credential("nobody").public_pem())
    with pytest.raises(InvalidInput, match="PEM public key"):
        await add_key(conn, "fay", "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(InvalidInput, match="no key"):
        await revoke_key(conn, "k_0000000000000000")
    with pytest.raises(InvalidInput, match="no actor"):
        await disable_actor(conn, "nobody")
    cred = generate_credential("fay")
    await add_key(conn, "fay", cred.public_pem(), key_id=cred.key_id)
    with pytest.raises(InvalidInput, match="taken"):
        await add_key(conn, "fay", generate_credential("fay").public_pem(), key_id=cred.key_id)


async def test_the_store_itself_refuses_bad_rows(conn: asyncpg.Connection) -> None:
    """The CHECK constraints hold even for rows written without dsrflow.auth."""
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO actors (name, role) VALUES ('hal', 'root')")
    await conn.execute("INSERT INTO actors (name, role) VALUES ('hal', 'dpo')")
    assert await conn.fetchval("SELECT tenant FROM actors WHERE name = 'hal'") == "default"
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO actor_keys (key_id, actor, public_key) VALUES ('key1', 'hal', "
                           "'-----BEGIN PUBLIC KEY-----')")
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO actor_keys (key_id, actor, public_key) VALUES ('k_0000000000000001', 'hal', "
                           "'-----BEGIN PRIVATE KEY-----')")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute("INSERT INTO actor_keys (key_id, actor, public_key) VALUES ('k_0000000000000001', 'ivy', "
                           "'-----BEGIN PUBLIC KEY-----')")
