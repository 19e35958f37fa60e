"""Signed records between the coordinator and the workers.

**Receipts** are signed by their system: a worker's receipt carries an Ed25519 signature that the
coordinator checks against the keys registered for that system, so that a producer on
``dsr.receipts.v1`` that knows a task id cannot close another system's task, fail a case, or
get the real receipt dropped as a duplicate (its event id is signed too).

**Tasks** are signed by the coordinator (its relay, with ``DSRFLOW_COORDINATOR_CREDENTIAL``), and a
worker given the coordinator's public keys (``DSRFLOW_COORDINATOR_PUBLIC_KEYS``, a file written by
``dsrflow systems coordinator-key``) acts only on tasks they verify.

**Announcements** of a system (``dsr.systems.v1``) are signed with the system's key too.

A record is signed over ``dsrflow-receipt-v1`` (``dsrflow-task-v1`` for a task,
``dsrflow-announcement-v1`` for an announcement), its CloudEvents
``id`` and ``source``, and its value bytes, each separated by a NUL byte; the signature and the
key id travel as the headers ``dsr_signature`` (base64url, no padding) and ``dsr_key_id``. Any
language can make them with an Ed25519 library. An administrator registers a system's public
key (``dsrflow systems key NAME``, table ``system_keys``, migration 0010); the private key stays
with the worker (``DSRFLOW_WORKER_CREDENTIAL``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import asyncpg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .auth import Credential, _load_public, _public_pem, generate_credential, new_key_id
from .errors import ConfigError, DsrflowError, InvalidInput

__all__ = [
    "KEY_HEADER",
    "SIGNATURE_HEADER",
    "SignatureError",
    "add_system_key",
    "coordinator_key_files",
    "new_coordinator_key",
    "new_system_key",
    "system_key_file",
    "load_public_keys",
    "write_public_keys",
    "revoke_system_key",
    "sign_headers",
    "system_keys",
    "verify_headers",
]

KEY_HEADER = "dsr_key_id"
SIGNATURE_HEADER = "dsr_signature"
Kind = Literal["receipt", "task", "announcement"]


class SignatureError(DsrflowError):
    """A record's signature is missing, malformed, by an unknown or revoked key, or wrong."""


def signing_input(ce_id: str, ce_source: str, value: bytes, kind: Kind = "receipt") -> bytes:
    """The bytes a record's signature covers (a receipt's signature never passes for a task's)."""
    return b"\x00".join((f"dsrflow-{kind}-v1".encode(), ce_id.encode(), ce_source.encode(), value))


def sign_headers(credential: Credential, *, ce_id: str, ce_source: str, value: bytes,
                 kind: Kind = "receipt") -> list[tuple[str, bytes]]:
    """The two headers that sign a record made by ``credential``'s holder."""
    signature = credential.private_key.sign(signing_input(ce_id, ce_source, value, kind))
    return [(KEY_HEADER, credential.key_id.encode()),
            (SIGNATURE_HEADER, base64.urlsafe_b64encode(signature).rstrip(b"="))]


def _header(headers: Mapping[str, bytes] | Sequence[tuple[str, bytes]], name: str) -> bytes | None:
    items = headers.items() if isinstance(headers, Mapping) else headers
    found = [v for k, v in items if k == name]
    if len(found) > 1:
        raise SignatureError(f"the record has {len(found)} {name} headers")
    return found[0] if found else None


def verify_headers(keys: Mapping[str, Ed25519PublicKey], headers: Mapping[str, bytes] | Sequence[tuple[str, bytes]],
                   *, ce_id: str, ce_source: str, value: bytes, kind: Kind = "receipt") -> str:
    """Check a record's signature against ``keys`` (key id -> public key: the system's keys that
    are not revoked). Returns the key id; raises :class:`SignatureError`."""
    key_id, signature = _header(headers, KEY_HEADER), _header(headers, SIGNATURE_HEADER)
    if key_id is None or signature is None:
        raise SignatureError(f"the {kind} is not signed (no dsr_key_id / dsr_signature header)")
    kid = key_id.decode(errors="replace")
    key = keys.get(kid)
    if key is None:
        raise SignatureError(f"key {kid[:40]!r} is not one of the keys the {kind} may be signed with")
    try:
        raw = base64.urlsafe_b64decode(signature + b"=" * (-len(signature) % 4))
        key.verify(raw, signing_input(ce_id, ce_source, value, kind))
    except (binascii.Error, ValueError, InvalidSignature):
        raise SignatureError(f"the {kind}'s signature does not verify with key {kid}") from None
    return kid


def write_public_keys(path: str | Path, credentials: Iterable[Credential]) -> Path:
    """Write the public halves of ``credentials`` (the coordinator's current and next keys) as
    JSON ``{"keys": [{"key_id", "public_key"}]}``: what workers are given to verify tasks with."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    doc = {"keys": [{"key_id": c.key_id, "public_key": c.public_pem()} for c in credentials]}
    target.write_text(json.dumps(doc, indent=2) + "\n")
    return target


def load_public_keys(path: str | Path) -> dict[str, Ed25519PublicKey]:
    """The keys of a file written by :func:`write_public_keys`; a clear :class:`ConfigError` otherwise."""
    try:
        doc = json.loads(Path(path).read_text())
        keys = {str(k["key_id"]): _load_public(str(k["public_key"])) for k in doc["keys"]}
    except OSError as exc:
        raise ConfigError(f"cannot read the public key file {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, InvalidInput) as exc:
        raise ConfigError(f"{path} is not a public key file ({{\"keys\": [{{\"key_id\", \"public_key\"}}]}}): "
                          f"{exc}") from None
    if not keys:
        raise ConfigError(f"{path} holds no key")
    return keys


async def system_keys(conn: asyncpg.Connection, systems: Iterable[str]) -> dict[str, dict[str, Ed25519PublicKey]]:
    """The unrevoked public keys of each of ``systems`` that has any."""
    rows = await conn.fetch("SELECT system, key_id, public_key FROM system_keys "
                            "WHERE system = ANY($1::text[]) AND revoked_at IS NULL", sorted(set(systems)))
    out: dict[str, dict[str, Ed25519PublicKey]] = {}
    for r in rows:
        out.setdefault(r["system"], {})[r["key_id"]] = _load_public(r["public_key"])
    return out


async def add_system_key(conn: asyncpg.Connection, system: str, public_pem: str, *, key_id: str | None = None) -> str:
    """Register a public key a system's worker signs its receipts with; returns its key id."""
    pem = _public_pem(_load_public(public_pem))
    key_id = key_id or new_key_id()
    try:
        await conn.execute("INSERT INTO system_keys (key_id, system, public_key) VALUES ($1, $2, $3)",
                           key_id, system, pem)
    except asyncpg.UniqueViolationError:
        raise InvalidInput("this key (or key id) is registered already; keys are never reused") from None
    except asyncpg.CheckViolationError:
        raise InvalidInput(f"not a valid system name or key id: {system!r}, {key_id!r}") from None
    return key_id


def system_key_file(folder: Path, system: str) -> Path:
    """Where ``dsrflow systems key NAME`` writes a worker's credential by default, in ``folder``
    (``<state>/credentials``): ``system-<name>.json``."""
    return folder / f"system-{system}.json"


def coordinator_key_files(folder: Path) -> tuple[Path, Path]:
    """The coordinator's credential and the public-key file for workers, in ``folder``."""
    return folder / "coordinator.json", folder / "coordinator-public.json"


def new_coordinator_key(private: Path, public: Path) -> Credential:
    """A new key for the coordinator to sign tasks with: its credential (0600) at ``private``, its
    public half for the workers at ``public``."""
    credential = generate_credential("coordinator")
    credential.save(private)
    write_public_keys(public, [credential])
    return credential


async def new_system_key(conn: asyncpg.Connection, system: str, path: Path) -> Credential:
    """A new key for ``system``'s worker: registered, and its credential written to ``path`` in the
    same transaction (a file that cannot be written registers no key)."""
    credential = generate_credential(system)
    async with conn.transaction():
        await add_system_key(conn, system, credential.public_pem(), key_id=credential.key_id)
        credential.save(path)
    return credential


async def revoke_system_key(conn: asyncpg.Connection, key_id: str) -> None:
    """Stop accepting receipts signed by ``key_id`` (a leaked or retired worker key)."""
    status = await conn.execute("UPDATE system_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1",
                                key_id)
    if status.endswith(" 0"):
        raise InvalidInput(f"no system key {key_id}")
