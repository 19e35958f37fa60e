"""Keeping erased people erased: the suppression list on ``dsr.suppressions.v1``.

When an erasure of a person completes, the coordinator publishes each verified identifier the case
acted on as a keyed hash (HMAC-SHA256 under a managed key, never the identifier itself) to the
compacted topic ``dsr.suppressions.v1``, key: the hash (:class:`dsrflow.events.SubjectSuppressed`).
An ingestion pipeline (a CRM import, a marketing list upload, a partner feed) holds the same key,
hashes each person it is about to import with :func:`suppression_hash` and refuses the ones on the
list: the person erased last month does not come back with next month's import.

Identifiers are hashed in dsrflow's normal form (:mod:`dsrflow.identity`): an email trimmed and
lower-cased, a phone in E.164 (a local number read in ``region``, Vietnam by default), so
``Lan.Nguyen@Example.VN`` and ``lan.nguyen@example.vn``, ``0901 234 567`` and ``+84901234567``
give the same hash. What is hashed is ``<type>:<normal form>`` (as the pseudonymisation of closed
cases does), so an email and a customer id with the same text never collide.

The key: a JSON file ``{"key_id": "s_...", "secret": "<base64 of 32 random bytes>"}``, mode 0600,
written by ``dsrflow suppression key`` and named by ``DSRFLOW_SUPPRESSION_KEY``. Give the same file
to the coordinator and to each pipeline that checks the list; whoever holds it can test whether a
given email was erased, so keep it as secret as a database password. Without a key the
coordinator publishes nothing, and the erasure's outcome says so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .auth import create_private_file, read_private_json
from .errors import ConfigError, InvalidInput
from .identity import DEFAULT_REGION, normalise_lenient
from .rights import IdentifierType

if TYPE_CHECKING:
    from .events import SubjectSuppressed
    from .settings import Settings

__all__ = [
    "SECRET_BYTES",
    "SuppressionKey",
    "SuppressionKeyError",
    "apply_record",
    "configured_key",
    "hash_normal",
    "load_key",
    "new_key",
    "list_key",
    "read_suppressions",
    "suppression_hash",
    "write_key",
]

#: bytes of an HMAC-SHA256 key
SECRET_BYTES = 32
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


class SuppressionKeyError(ConfigError):
    """The suppression key file is missing, unreadable, readable by others or malformed. One line,
    naming the file, never its secret."""


@dataclass(frozen=True)
class SuppressionKey:
    """The managed key of the suppression list: its id (published with every hash, so a pipeline
    knows which key made it) and its secret (never in the repr)."""

    key_id: str
    secret: bytes = field(repr=False)

    def to_json(self) -> bytes:
        return (json.dumps({"key_id": self.key_id, "algorithm": "HMAC-SHA256",
                            "secret": base64.b64encode(self.secret).decode()}, indent=2) + "\n").encode()


def new_key(key_id: str | None = None) -> SuppressionKey:
    """A fresh key: 32 random bytes under a fresh id (``s_`` and 16 hex digits) or ``key_id``."""
    key_id = key_id or "s_" + secrets.token_hex(8)
    if not _KEY_ID.fullmatch(key_id):
        raise InvalidInput(f"{key_id!r} is not a key id (letters, digits, '.', '_', ':' and '-', at most 64)")
    return SuppressionKey(key_id=key_id, secret=secrets.token_bytes(SECRET_BYTES))


def write_key(key: SuppressionKey, path: str | os.PathLike[str]) -> Path:
    """Write ``key`` to a new file with mode 0600. Never replaces a file: the hashes published under
    a key are matched only with that key, so losing it by accident loses the list's use."""
    target = Path(path)
    try:
        return create_private_file(target, key.to_json())
    except FileExistsError:
        raise InvalidInput(f"{target} exists already; not overwritten (give --out FILE)") from None


def load_key(path: str | os.PathLike[str]) -> SuppressionKey:
    """Read a key file written by :func:`write_key` (or by hand: JSON with ``key_id`` and
    ``secret``, the base64 of 32 bytes). Refuses a file its group or others may read. Every
    failure is one :class:`SuppressionKeyError` line naming the file."""
    p = Path(path)
    what = f"suppression key file {p}"
    data = read_private_json(p, what=what, fields=("key_id", "secret"), error=SuppressionKeyError,
                             max_bytes=64 * 1024, missing=" (`dsrflow suppression key` makes one)")
    if not _KEY_ID.fullmatch(data["key_id"]):
        raise SuppressionKeyError(f"{what}: key_id is not a key id (letters, digits, '.', '_', ':' and '-')")
    try:
        secret = base64.b64decode(data["secret"], validate=True)
    except (binascii.Error, ValueError):
        raise SuppressionKeyError(f"{what}: secret is not base64") from None
    if len(secret) != SECRET_BYTES:
        raise SuppressionKeyError(f"{what}: secret is {len(secret)} bytes, not {SECRET_BYTES}")
    return SuppressionKey(key_id=data["key_id"], secret=secret)


def configured_key(settings: Settings) -> SuppressionKey | None:
    """The key ``DSRFLOW_SUPPRESSION_KEY`` names, or None when it names none."""
    path = settings.suppression_key
    return None if path is None else load_key(path)


def _secret(key: SuppressionKey | bytes) -> bytes:
    secret = key.secret if isinstance(key, SuppressionKey) else bytes(key)
    if not secret:
        raise ValueError("the suppression key is empty")
    return secret


def hash_normal(key: SuppressionKey | bytes, identifier_type: IdentifierType | str, normal: str) -> str:
    """The hash of an identifier already in normal form: hex HMAC-SHA256 of ``<type>:<value>``."""
    kind = IdentifierType(identifier_type)
    return hmac.new(_secret(key), f"{kind.value}:{normal}".encode(), hashlib.sha256).hexdigest()


def suppression_hash(key: SuppressionKey | bytes, identifier_type: IdentifierType | str, value: str, *,
                     region: str | None = DEFAULT_REGION) -> str:
    """The suppression hash of one identifier, however it is written: normalised first (an email
    lower-cased, a phone to E.164 with a local number read in ``region``), then hashed with the
    key (a :class:`SuppressionKey` or its secret). What an ingestion pipeline computes for each
    person it imports, to look up in the list. Raises ValueError (without the value: it is personal
    data) when ``value`` is not an identifier of that type."""
    return hash_normal(key, identifier_type, normalise_lenient(identifier_type, value, region=region))


async def read_suppressions(settings: Settings, *, timeout: float = 30.0) -> dict[str, SubjectSuppressed]:
    """Every entry of ``dsr.suppressions.v1``, read from its beginning to its end as of now (no
    consumer group, nothing committed): :func:`list_key` -> the latest :class:`SubjectSuppressed`. A
    tombstone (a key with no value) takes its hash off the list; a record that does not decode is
    skipped. What ``dsrflow suppression check`` reads; a long-running pipeline keeps following
    instead (examples/ingest_guard.py). Raises TopicMissing when the topic does not exist."""
    from . import topics
    from .errors import TopicMissing

    out: dict[str, SubjectSuppressed] = {}
    if not await topics.read_to_end(settings.kafka_client_options(), topics.SUPPRESSIONS,
                                    lambda r: apply_record(out, r.key, r.value, r.headers), timeout=timeout):
        raise TopicMissing(topics.SUPPRESSIONS, settings.bootstrap)
    return out


def list_key(controller: str, digest: str) -> str:
    """The record key of a suppression on ``dsr.suppressions.v1``: ``<controller>:<hash>``. Each
    controller (tenant) has its own list: one tenant's erasure never suppresses the person for
    another, and compaction keeps one entry per tenant and hash."""
    return f"{controller}:{digest}"


def apply_record(entries: dict[str, SubjectSuppressed], key: bytes | None, value: bytes | None,
                 headers: Any) -> None:
    """Apply one record of ``dsr.suppressions.v1`` to ``entries`` (:func:`list_key` -> entry): an
    entry is added (or replaced), a tombstone removes its key, a record that does not decode is
    ignored."""
    from . import codec
    from .events import SubjectSuppressed

    if key is None:
        return
    if value is None:  # a tombstone: the hash is off the list
        entries.pop(key.decode("ascii", errors="replace"), None)
        return
    try:
        entry = codec.decode(value, headers, SubjectSuppressed).data
    except codec.DecodeError:
        return
    entries[list_key(entry.controller, entry.hash)] = entry
