"""Who makes a decision: actors, their keys, and signed command tokens.

A decision on a case records the actor the channel established, never a name the sender made up.
Kafka does not tell a consumer who produced a record, so a command event carries a **command
token**: a JWT (RFC 7519) signed with the actor's Ed25519 key (JWS ``alg`` "EdDSA", RFC 8037),
which any language's JWT library can make::

    header  {"alg": "EdDSA", "typ": "JWT", "kid": "k_0123456789abcdef"}
    claims  {"iss": "<actor name>", "aud": "dsrflow", "jti": "<command id, a UUID>",
             "iat": <seconds>, "exp": <seconds, at most 600 after iat>, "cmd": {<the command>}}

The coordinator checks it with :func:`verify_command` against the public keys in the case store
(tables ``actors`` and ``actor_keys``, migration 0008). Only public keys are stored; the private
key lives in a credential file (mode 0600) that the CLI or the DPO's tool holds.

Refusals raise :class:`AuthError` with a stable ``reason_code`` (:class:`Refusal`); its message
never contains the token.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import stat
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import asyncpg
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError, DsrflowError, InvalidInput

__all__ = [
    "ALGORITHM",
    "AUDIENCE",
    "MAX_LIFETIME",
    "MAX_SKEW",
    "Actor",
    "ActorKey",
    "AuthError",
    "Authenticated",
    "Credential",
    "CredentialError",
    "Refusal",
    "Role",
    "VerifiedToken",
    "add_actor",
    "add_key",
    "disable_actor",
    "generate_credential",
    "list_actors",
    "load_credential",
    "new_key_id",
    "revoke_key",
    "sign_command",
    "token_key_id",
    "verify_command",
    "verify_with_key",
]

#: The only JWS algorithm accepted: Ed25519 signatures (RFC 8037). Never "none", never HS*.
ALGORITHM = "EdDSA"
#: The ``aud`` claim a command token must carry.
AUDIENCE = "dsrflow"
#: The longest a token may live (``exp - iat``).
MAX_LIFETIME = timedelta(minutes=10)
#: How far ``iat`` may be ahead of the verifier's clock.
MAX_SKEW = timedelta(seconds=60)
#: A token longer than this is refused before it is parsed.
MAX_TOKEN_LENGTH = 64 * 1024
#: Claims a command token must carry.
REQUIRED_CLAIMS = ("iss", "aud", "jti", "iat", "exp", "cmd")

_ACTOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_ID = re.compile(r"^k_[0-9a-f]{16}$")


class Role(StrEnum):
    """What an actor may do (see ``dsrflow.commands.ROLES_FOR``)."""

    dpo = "dpo"  # every decision on a case
    operator = "operator"  # carries out tasks: retry, complete, decline
    admin = "admin"  # manages actors and keys; no decision on a case


class Refusal(StrEnum):
    """Why a command token was refused: :attr:`AuthError.reason_code`."""

    malformed = "malformed"  # not a JWS compact serialisation, or its header/claims are not JSON
    algorithm = "algorithm"  # alg is not EdDSA
    unknown_key = "unknown_key"  # no key with that kid (or no kid)
    key_revoked = "key_revoked"
    actor_disabled = "actor_disabled"
    issuer_mismatch = "issuer_mismatch"  # iss is not the actor the key belongs to
    bad_signature = "bad_signature"
    wrong_audience = "wrong_audience"
    expired = "expired"
    issued_in_future = "issued_in_future"  # iat (or nbf) later than now + MAX_SKEW
    lifetime_too_long = "lifetime_too_long"  # exp - iat over MAX_LIFETIME
    missing_claim = "missing_claim"
    bad_claim = "bad_claim"  # a claim of the wrong type: jti not a UUID, cmd not an object, exp not after iat, ...


class AuthError(DsrflowError):
    """A command token was refused. ``reason_code`` is stable (a :class:`Refusal`); the message is
    one line for a person and never contains the token."""

    def __init__(self, reason_code: Refusal, message: str) -> None:
        self.reason_code = reason_code
        super().__init__(message)


class CredentialError(ConfigError):
    """A credential file is missing, unreadable, readable by others, or holds the wrong kind of key."""


# -- credentials ---------------------------------------------------------------------------------
def new_key_id() -> str:
    """A fresh random key id: ``k_`` and 16 hex digits."""
    return "k_" + secrets.token_hex(8)


def _public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass(frozen=True)
class Credential:
    """An actor's signing credential: what the CLI or a DPO tool acts with. The private key never
    leaves it (and is not in its repr)."""

    actor: str
    key_id: str
    private_key: Ed25519PrivateKey = field(repr=False)

    def public_pem(self) -> str:
        """The public key, PEM (SubjectPublicKeyInfo): what ``add_key`` registers."""
        return _public_pem(self.private_key.public_key())

    def to_json(self) -> bytes:
        pem = self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode()
        return (json.dumps({"actor": self.actor, "key_id": self.key_id, "private_key": pem}, indent=2)
                + "\n").encode()

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the credential as JSON with mode 0600. Refuses to replace an existing file unless
        ``overwrite`` (a lost private key cannot be recovered, only replaced)."""
        target = Path(path)
        body = self.to_json()
        if not overwrite:
            try:
                return create_private_file(target, body)
            except FileExistsError:
                raise CredentialError(f"credential file {target} exists already; not overwritten") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".credential-", dir=target.parent)  # created with mode 0600
        try:
            _write_private(fd, body)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return target


def _write_private(fd: int, body: bytes) -> None:
    with os.fdopen(fd, "wb") as f:
        if hasattr(os, "fchmod"):
            os.fchmod(f.fileno(), 0o600)  # whatever the umask or an older file said
        f.write(body)
        f.flush()
        os.fsync(f.fileno())


def create_private_file(target: Path, body: bytes) -> Path:
    """Write ``body`` to a new file with mode 0600 (a key: a credential, the suppression key),
    fsynced; raises FileExistsError rather than replace one. Nothing is left of a failed write."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_private(fd, body)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise
    return target


def read_private_json(path: Path, *, what: str, fields: Sequence[str], error: type[DsrflowError],
                      max_bytes: int, missing: str = "") -> dict[str, Any]:
    """The JSON object of a key file only its owner may read, with ``fields`` non-empty strings.
    Every failure is one ``error`` naming the file (``what``), never its content; ``missing`` is
    added to the line of a file that does not exist (how to make one)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise error(f"{what} does not exist{missing}") from None
    except OSError as exc:
        raise error(f"{what} cannot be read: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # before fdopen, which refuses a directory with its own error
        os.close(fd)
        raise error(f"{what} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if os.name == "posix" and st.st_mode & 0o077:
            raise error(f"{what} may be read by others (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        try:
            raw = f.read(max_bytes)
        except OSError as exc:
            raise error(f"{what} cannot be read: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise error(f"{what} is not JSON") from None
    if not isinstance(data, dict):
        raise error(f"{what} is not a JSON object")
    absent = [k for k in fields if not isinstance(data.get(k), str) or not data[k]]
    if absent:
        raise error(f"{what} lacks {', '.join(absent)} (strings)")
    return data


def generate_credential(actor: str, *, key_id: str | None = None) -> Credential:
    """A new Ed25519 key pair for ``actor``, under a fresh key id (or ``key_id``). Register its
    public half with :func:`add_key` (passing ``key_id=credential.key_id``), then save it."""
    _check_actor_name(actor)
    key_id = key_id or new_key_id()
    _check_key_id(key_id)
    return Credential(actor=actor, key_id=key_id, private_key=Ed25519PrivateKey.generate())


def load_credential(path: str | os.PathLike[str]) -> Credential:
    """Read a credential file written by :meth:`Credential.save` (or by hand: JSON with ``actor``,
    ``key_id`` and ``private_key``, an unencrypted PKCS#8 PEM Ed25519 key). Refuses a file that
    its group or others may read."""
    p = Path(path)
    data = read_private_json(p, what=f"credential file {p}", fields=("actor", "key_id", "private_key"),
                             error=CredentialError, max_bytes=1024 * 1024)
    try:
        _check_actor_name(data["actor"])
        _check_key_id(data["key_id"])
    except InvalidInput as exc:
        raise CredentialError(f"credential file {p}: {exc}") from None
    try:
        key = serialization.load_pem_private_key(data["private_key"].encode(), password=None)
    except TypeError:
        raise CredentialError(f"credential file {p}: the private key is encrypted; "
                              "dsrflow reads an unencrypted PKCS#8 PEM key (protect the file instead)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CredentialError(f"credential file {p}: private_key is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CredentialError(f"credential file {p}: the private key is {type(key).__name__.removeprefix('_')}, "
                              "not Ed25519")
    return Credential(actor=data["actor"], key_id=data["key_id"], private_key=key)


# -- tokens --------------------------------------------------------------------------------------
def _numeric_date(when: datetime) -> int:
    if when.tzinfo is None:
        raise InvalidInput("a token's time must be timezone-aware")
    return int(when.timestamp())


def sign_command(credential: Credential, command: Mapping[str, Any], *, now: datetime | None = None,
                 ttl: timedelta = timedelta(minutes=5), command_id: uuid.UUID | None = None) -> str:
    """A command token for ``command`` (JSON-ready: a model's ``model_dump(mode="json")``), signed
    with ``credential``: valid from ``now`` for ``ttl`` (at most :data:`MAX_LIFETIME`). The command
    id (``jti``) is ``command_id`` or a new UUID."""
    if ttl < timedelta(seconds=1) or ttl > MAX_LIFETIME:
        raise InvalidInput(f"a command token lives at least 1 s and at most {int(MAX_LIFETIME.total_seconds())} s")
    iat = _numeric_date(now or datetime.now(UTC))
    claims = {
        "iss": credential.actor,
        "aud": AUDIENCE,
        "jti": str(command_id or uuid.uuid4()),
        "iat": iat,
        "exp": iat + int(ttl.total_seconds()),
        "cmd": dict(command),
    }
    return jwt.encode(claims, credential.private_key, algorithm=ALGORITHM,
                      headers={"kid": credential.key_id, "typ": "JWT"})


@dataclass(frozen=True)
class VerifiedToken:
    """A token whose signature, audience, times and claims were checked against one public key."""

    key_id: str
    issuer: str
    command_id: uuid.UUID
    issued_at: datetime
    expires_at: datetime
    cmd: dict[str, Any]


@dataclass(frozen=True)
class Authenticated:
    """A command whose token :func:`verify_command` accepted: who sent it, as the case store knows them."""

    actor: str
    role: Role
    tenant: str
    key_id: str
    command_id: uuid.UUID
    issued_at: datetime
    expires_at: datetime
    cmd: dict[str, Any]


def _segment_json(segment: str, what: str) -> dict[str, Any]:
    try:
        padded = segment + "=" * (-len(segment) % 4)
        if not re.fullmatch(r"[A-Za-z0-9_-]*=*", padded):
            raise ValueError
        value = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise AuthError(Refusal.malformed, f"the token's {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise AuthError(Refusal.malformed, f"the token's {what} is not a JSON object")
    return value


def _header(token: object) -> dict[str, Any]:
    """The token's header, unverified, once its shape is checked."""
    if not isinstance(token, str):
        raise AuthError(Refusal.malformed, "the token is not a string")
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthError(Refusal.malformed, f"the token is longer than {MAX_TOKEN_LENGTH} characters")
    parts = token.split(".")
    if len(parts) != 3 or not parts[0]:
        raise AuthError(Refusal.malformed, "the token is not a signed JWT (header.payload.signature)")
    header = _segment_json(parts[0], "header")
    alg = header.get("alg")
    if alg != ALGORITHM:  # first: an unsigned ("none") or HMAC token is refused as such
        shown = alg if isinstance(alg, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,16}", alg) else "not one"
        raise AuthError(Refusal.algorithm, f"the token's algorithm is {shown}; only {ALGORITHM} (Ed25519) is accepted")
    if not parts[1] or not parts[2]:
        raise AuthError(Refusal.malformed, "the token has no payload or no signature")
    if "crit" in header or "b64" in header:  # RFC 7515 crit, RFC 7797 unencoded payloads: none of ours
        raise AuthError(Refusal.malformed, "the token's header has extensions dsrflow does not know (crit, b64)")
    return header


def token_key_id(token: str) -> str:
    """The ``kid`` of a token's header, unverified (to look the key up). Raises :class:`AuthError`."""
    kid = _header(token).get("kid")
    if not isinstance(kid, str) or not _KEY_ID.fullmatch(kid):
        raise AuthError(Refusal.unknown_key, "the token names no key id of dsrflow (kid: k_ and 16 hex digits)")
    return kid


def _load_public(public_pem: str | Ed25519PublicKey) -> Ed25519PublicKey:
    if isinstance(public_pem, Ed25519PublicKey):
        return public_pem
    try:
        key = serialization.load_pem_public_key(public_pem.encode())
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidInput("not a PEM public key (SubjectPublicKeyInfo, -----BEGIN PUBLIC KEY-----)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInput(f"the public key is {type(key).__name__.removeprefix('_')}, not Ed25519")
    return key


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(Refusal.bad_claim, f"the token's {name} is not a NumericDate (seconds since the epoch)")
    return float(value)


_DECODER = jwt.PyJWT()


def verify_with_key(token: str, public_pem: str | Ed25519PublicKey, *, now: datetime) -> VerifiedToken:
    """Check a command token against one public key, with no database: the algorithm (EdDSA only),
    the signature, the claims (:data:`REQUIRED_CLAIMS`), the audience, and the times against ``now``
    (expired; ``iat`` more than :data:`MAX_SKEW` ahead; a lifetime over :data:`MAX_LIFETIME`).
    Whose key it is, and whether it is revoked, is :func:`verify_command`'s business."""
    if now.tzinfo is None:
        raise InvalidInput("now must be timezone-aware")
    kid = token_key_id(token)
    key = _load_public(public_pem)
    try:
        claims: dict[str, Any] = _DECODER.decode(
            token, key, algorithms=[ALGORITHM], audience=AUDIENCE,
            options={"verify_signature": True, "verify_aud": True, "verify_iss": False, "verify_exp": False,
                     "verify_iat": False, "verify_nbf": False, "verify_sub": False, "verify_jti": False,
                     "require": list(REQUIRED_CLAIMS)})
    except jwt.InvalidSignatureError:
        raise AuthError(Refusal.bad_signature, f"the token's signature does not verify with key {kid}") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError(Refusal.algorithm, f"the token's algorithm is not {ALGORITHM}") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(Refusal.missing_claim, f"the token has no {exc.claim} claim") from None
    except jwt.InvalidAudienceError:
        raise AuthError(Refusal.wrong_audience, f"the token is not meant for {AUDIENCE} (aud)") from None
    except jwt.DecodeError:
        raise AuthError(Refusal.malformed, "the token cannot be decoded") from None
    except jwt.InvalidTokenError as exc:  # anything else PyJWT refuses: never accept it
        raise AuthError(Refusal.malformed, f"the token is invalid ({type(exc).__name__})") from None

    iat, exp = _number(claims, "iat"), _number(claims, "exp")
    if exp <= iat:
        raise AuthError(Refusal.bad_claim, "the token expires before it was issued (exp <= iat)")
    if exp - iat > MAX_LIFETIME.total_seconds():
        raise AuthError(Refusal.lifetime_too_long,
                        f"the token lives {int(exp - iat)} s; at most {int(MAX_LIFETIME.total_seconds())} s")
    t = now.timestamp()
    if iat > t + MAX_SKEW.total_seconds():
        raise AuthError(Refusal.issued_in_future,
                        f"the token was issued {int(iat - t)} s in the future; check the sender's clock")
    if "nbf" in claims and _number(claims, "nbf") > t + MAX_SKEW.total_seconds():
        raise AuthError(Refusal.issued_in_future, "the token is not valid yet (nbf)")
    if t >= exp:
        raise AuthError(Refusal.expired, f"the token expired {int(t - exp)} s ago")
    iss, jti, cmd = claims["iss"], claims["jti"], claims["cmd"]
    if not isinstance(iss, str) or not _ACTOR_NAME.fullmatch(iss):
        raise AuthError(Refusal.bad_claim, "the token's iss is not an actor name")
    try:
        command_id = uuid.UUID(jti) if isinstance(jti, str) else None
    except ValueError:
        command_id = None
    if command_id is None:
        raise AuthError(Refusal.bad_claim, "the token's jti (the command id) is not a UUID")
    if not isinstance(cmd, dict):
        raise AuthError(Refusal.bad_claim, "the token's cmd (the command) is not a JSON object")
    return VerifiedToken(key_id=kid, issuer=iss, command_id=command_id,
                         issued_at=datetime.fromtimestamp(iat, UTC), expires_at=datetime.fromtimestamp(exp, UTC),
                         cmd=cmd)


async def verify_command(conn: asyncpg.Connection, token: str, *, now: datetime) -> Authenticated:
    """Check a command token against the case store's keys (``conn``: a connection or a pool).
    ``now`` is the verifier's clock (pass the database's). Raises :class:`AuthError` unless the
    token is well formed, signed by a known key whose actor is enabled and is the token's ``iss``,
    is meant for dsrflow, and is valid at ``now``.

    The command id (``jti``) is unique per command: dedupe on it (the inbox), not on the record's
    id, so a token sent again in another record is not acted on twice."""
    kid = token_key_id(token)
    row = await conn.fetchrow(
        """SELECT k.actor, k.public_key, k.revoked_at, a.role, a.tenant, a.disabled_at
             FROM actor_keys k JOIN actors a ON a.name = k.actor WHERE k.key_id = $1""", kid)
    if row is None:
        raise AuthError(Refusal.unknown_key, f"no key {kid} is registered")
    verified = verify_with_key(token, row["public_key"], now=now)  # a forger learns nothing more below
    if row["revoked_at"] is not None:
        raise AuthError(Refusal.key_revoked, f"key {kid} of {row['actor']} was revoked")
    if row["disabled_at"] is not None:
        raise AuthError(Refusal.actor_disabled, f"actor {row['actor']} is disabled")
    if verified.issuer != row["actor"]:
        raise AuthError(Refusal.issuer_mismatch,
                        f"the token claims to be from {verified.issuer}, but key {kid} belongs to {row['actor']}")
    return Authenticated(actor=row["actor"], role=Role(row["role"]), tenant=row["tenant"], key_id=kid,
                         command_id=verified.command_id, issued_at=verified.issued_at,
                         expires_at=verified.expires_at, cmd=verified.cmd)


# -- actors and keys in the case store -----------------------------------------------------------
@dataclass(frozen=True)
class ActorKey:
    key_id: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Actor:
    name: str
    role: Role
    tenant: str
    created_at: datetime
    disabled_at: datetime | None
    keys: tuple[ActorKey, ...] = ()


def _check_actor_name(name: str) -> None:
    if not isinstance(name, str) or not _ACTOR_NAME.fullmatch(name):
        raise InvalidInput("an actor name is 1 to 128 letters, digits and . _ @ -, starting with a letter or digit")


def _check_key_id(key_id: str) -> None:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise InvalidInput("a key id is k_ and 16 lower-case hex digits")


async def add_actor(conn: asyncpg.Connection, name: str, role: Role | str, tenant: str = "default") -> Actor:
    """Register an actor. Raises :class:`InvalidInput` for a bad name, role or tenant, or a name
    that exists already (even disabled: names stay on the timelines that recorded them)."""
    _check_actor_name(name)
    try:
        role = Role(role)
    except ValueError:
        raise InvalidInput(f"a role is one of {', '.join(Role)}") from None
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise InvalidInput("a tenant is 1 to 64 letters, digits and . _ -, starting with a letter or digit")
    row = await conn.fetchrow(
        """INSERT INTO actors (name, role, tenant) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING
           RETURNING name, role, tenant, created_at, disabled_at""", name, str(role), tenant)
    if row is None:
        raise InvalidInput(f"actor {name} exists already")
    return Actor(name=row["name"], role=Role(row["role"]), tenant=row["tenant"], created_at=row["created_at"],
                 disabled_at=row["disabled_at"])


async def add_key(conn: asyncpg.Connection, actor: str, public_pem: str, *, key_id: str | None = None) -> str:
    """Register an Ed25519 public key (PEM) for an enabled actor; returns its key id (``key_id``,
    as a credential from :func:`generate_credential` carries it, or a new one). A key already
    registered, even revoked, is refused."""
    _check_actor_name(actor)
    pem = _public_pem(_load_public(public_pem))  # normalised, so the same key is the same text
    key_id = key_id or new_key_id()
    _check_key_id(key_id)
    found = await conn.fetchrow("SELECT disabled_at FROM actors WHERE name = $1", actor)
    if found is None:
        raise InvalidInput(f"no actor {actor}")
    if found["disabled_at"] is not None:
        raise InvalidInput(f"actor {actor} is disabled")
    try:
        await conn.execute("INSERT INTO actor_keys (key_id, actor, public_key) VALUES ($1, $2, $3)",
                           key_id, actor, pem)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "actor_keys_public_key":
            raise InvalidInput("this public key is registered already (keys are never reused)") from None
        raise InvalidInput(f"key id {key_id} is taken") from None
    except asyncpg.ForeignKeyViolationError:  # the actor went between the two statements
        raise InvalidInput(f"no actor {actor}") from None
    return key_id


async def revoke_key(conn: asyncpg.Connection, key_id: str) -> None:
    """Revoke a key: tokens it signed are refused from now on. Revoking it again changes nothing."""
    _check_key_id(key_id)
    row = await conn.fetchrow(
        "UPDATE actor_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1 RETURNING key_id", key_id)
    if row is None:
        raise InvalidInput(f"no key {key_id}")


async def disable_actor(conn: asyncpg.Connection, name: str) -> None:
    """Disable an actor: tokens signed by any of its keys are refused from now on. Disabling it
    again changes nothing."""
    _check_actor_name(name)
    row = await conn.fetchrow(
        "UPDATE actors SET disabled_at = coalesce(disabled_at, now()) WHERE name = $1 RETURNING name", name)
    if row is None:
        raise InvalidInput(f"no actor {name}")


async def list_actors(conn: asyncpg.Connection) -> list[Actor]:
    """Every actor, by name, with its keys (oldest first)."""
    actors = await conn.fetch("SELECT name, role, tenant, created_at, disabled_at FROM actors ORDER BY name")
    keys: dict[str, list[ActorKey]] = {}
    for k in await conn.fetch("SELECT key_id, actor, created_at, revoked_at FROM actor_keys "
                              "ORDER BY created_at, key_id"):
        keys.setdefault(k["actor"], []).append(ActorKey(key_id=k["key_id"], created_at=k["created_at"],
                                                        revoked_at=k["revoked_at"]))
    return [Actor(name=a["name"], role=Role(a["role"]), tenant=a["tenant"], created_at=a["created_at"],
                  disabled_at=a["disabled_at"], keys=tuple(keys.get(a["name"], ()))) for a in actors]
