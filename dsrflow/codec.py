"""The one codec: CloudEvents 1.0 in Kafka binary mode, with orjson.

The Kafka record value is the event's JSON ``data``; the context attributes are
headers (``ce_specversion``, ``ce_id``, ``ce_source``, ``ce_type``, ``ce_time``,
``ce_subject``, ``content-type``) plus W3C ``traceparent``. Any Kafka client
that writes those headers and a value valid against topics/schemas/ produces an
event dsrflow accepts.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

import orjson
from pydantic import ValidationError

from .errors import DsrflowError
from .events import DeadLetter, Event

E = TypeVar("E", bound=Event)
Headers = list[tuple[str, bytes]]

SPECVERSION = "1.0"
CONTENT_TYPE = "application/json"
REQUIRED = ("ce_specversion", "ce_id", "ce_source", "ce_type")


class DecodeError(DsrflowError, ValueError):
    """An event that cannot be decoded or validated. Its message holds no field values."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Envelope(Generic[E]):
    """A decoded event with its CloudEvents context."""

    id: str
    source: str
    type: str
    time: datetime
    subject: str | None
    traceparent: str | None
    data: E


def new_traceparent() -> str:
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def encode(
    event: Event,
    *,
    source: str,
    subject: str | None = None,
    event_id: str | None = None,
    time: datetime | None = None,
    traceparent: str | None = None,
) -> tuple[bytes, Headers]:
    """Encode an event as (value, headers)."""
    value = orjson.dumps(event.model_dump(mode="json", exclude_none=True))
    headers: Headers = [
        ("ce_specversion", SPECVERSION.encode()),
        ("ce_id", (event_id or str(uuid.uuid4())).encode()),
        ("ce_source", source.encode()),
        ("ce_type", event.ce_type.encode()),
        ("ce_time", (time or datetime.now(UTC)).isoformat().encode()),
        ("content-type", CONTENT_TYPE.encode()),
        ("traceparent", (traceparent or new_traceparent()).encode()),
    ]
    if subject is not None:
        headers.append(("ce_subject", subject.encode()))
    return value, headers


def header_map(headers: Iterable[tuple[str, bytes | None]] | Mapping[str, bytes | None] | None) -> dict[str, str]:
    """Headers as a dict of str (last value wins); accepts aiokafka's and faust's shapes."""
    if headers is None:
        return {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for k, v in items:
        if v is None:
            continue
        try:
            out[k] = bytes(v).decode() if isinstance(v, bytes | bytearray | memoryview) else str(v)
        except UnicodeDecodeError as exc:
            raise DecodeError("bad_header", f"header {k!r} is not UTF-8") from exc
    return out


def validation_message(exc: ValidationError) -> str:
    """A validation error's text without the offending values (they may be personal data)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def decode(
    value: bytes | None,
    headers: Iterable[tuple[str, bytes | None]] | Mapping[str, bytes | None] | None,
    model: type[E],
) -> Envelope[E]:
    """Decode and validate one record. Raises :class:`DecodeError` with a reason."""
    h = header_map(headers)
    missing = [name for name in REQUIRED if not h.get(name)]
    if missing:
        raise DecodeError("missing_header", f"missing CloudEvents header(s): {', '.join(missing)}")
    if h["ce_specversion"] != SPECVERSION:
        raise DecodeError("bad_specversion", f"ce_specversion must be {SPECVERSION}")
    if h["ce_type"] != model.ce_type:
        raise DecodeError("bad_type", f"ce_type {h['ce_type']!r} is not {model.ce_type!r}")
    ctype = h.get("content-type", CONTENT_TYPE).split(";")[0].strip()
    if ctype != CONTENT_TYPE:
        raise DecodeError("bad_content_type", f"content-type must be {CONTENT_TYPE}")
    if value is None:
        raise DecodeError("empty_value", "record has no value")
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("bad_json", f"value is not JSON: {exc.msg} at {exc.pos}") from None
    if not isinstance(raw, dict):
        raise DecodeError("bad_json", "value must be a JSON object")
    try:
        data = model.model_validate(raw)
    except ValidationError as exc:
        raise DecodeError("invalid", validation_message(exc)) from None
    time = datetime.now(UTC)
    if h.get("ce_time"):
        try:
            time = datetime.fromisoformat(h["ce_time"].replace("Z", "+00:00"))
        except ValueError:
            raise DecodeError("bad_header", "ce_time is not RFC 3339") from None
        if time.tzinfo is None:
            time = time.replace(tzinfo=UTC)
    return Envelope(
        id=h["ce_id"],
        source=h["ce_source"],
        type=h["ce_type"],
        time=time,
        subject=h.get("ce_subject"),
        traceparent=h.get("traceparent"),
        data=data,
    )


DLQ_PREFIX = "dlq_"


def dead_letter_headers(original: Sequence[tuple[str, bytes]] | None, record: DeadLetter) -> Headers:
    """Headers for a dead-lettered record: the original headers, then ``dlq_*`` fields."""
    headers: Headers = [(k, v) for k, v in (original or []) if not k.startswith(DLQ_PREFIX) and v is not None]
    for key, val in record.model_dump(mode="json").items():
        headers.append((DLQ_PREFIX + key, str(val).encode()))
    return headers


#: Past this size a dead-lettered value is cut (the broker would refuse the record, and one
#: refused record must not block everything behind it); the original stays in its own topic
#: for that topic's retention, found by dlq_original_topic/partition/offset, and is
#: identified by the dlq_value_sha256 and dlq_value_size headers.
DLQ_MAX_VALUE = 512 * 1024
DLQ_KEPT_PREFIX = 64 * 1024
#: Past this total size the original headers are left out (their count is kept).
DLQ_MAX_HEADERS = 64 * 1024


def dead_letter(
    value: bytes | None, original_headers: Sequence[tuple[str, bytes]] | None, record: DeadLetter
) -> tuple[bytes, Headers]:
    """Value and headers of a dead-lettered record: the original bytes (cut past
    :data:`DLQ_MAX_VALUE`), the original headers (left out past :data:`DLQ_MAX_HEADERS`),
    then the ``dlq_*`` fields."""
    value = value or b""
    original_headers = list(original_headers or [])
    dropped = 0
    if sum(len(k) + len(v) for k, v in original_headers) > DLQ_MAX_HEADERS:
        dropped, original_headers = len(original_headers), []
    headers = dead_letter_headers(original_headers, record)
    if dropped:
        headers.append(("dlq_original_headers_dropped", str(dropped).encode()))
    if len(value) > DLQ_MAX_VALUE:
        headers += [
            ("dlq_value_size", str(len(value)).encode()),
            ("dlq_value_sha256", hashlib.sha256(value).hexdigest().encode()),
            ("dlq_value_truncated", b"true"),
        ]
        value = value[:DLQ_KEPT_PREFIX]
    return value, headers


def read_dead_letter(headers: Iterable[tuple[str, bytes | None]] | Mapping[str, bytes | None]) -> DeadLetter:
    """Parse the ``dlq_*`` headers of a dead-lettered record."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    h = header_map([(k, v) for k, v in items if k.startswith(DLQ_PREFIX)])  # the original's may be any bytes
    fields = DeadLetter.model_fields
    return DeadLetter.model_validate(
        {k[len(DLQ_PREFIX) :]: v for k, v in h.items() if k.startswith(DLQ_PREFIX) and k[len(DLQ_PREFIX) :] in fields}
    )
