"""Opaque pagination cursors: a case's keyset (received_at, case_id), base64url-encoded.

Opaque so clients do not build them; the encoding may change without notice.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from uuid import UUID

import orjson

from ..errors import DsrflowError
from ..store.queries import CaseKey


class BadCursor(DsrflowError, ValueError):
    """The cursor was not made by this API."""


def encode(key: CaseKey) -> str:
    raw = orjson.dumps([1, key.received_at.isoformat(), str(key.case_id)])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode(cursor: str) -> CaseKey:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, received_at, case_id = orjson.loads(raw)
        if version != 1:
            raise BadCursor("unknown cursor version")
        at = datetime.fromisoformat(received_at)
        if at.tzinfo is None:
            raise BadCursor("cursor time has no zone")
        return CaseKey(received_at=at, case_id=UUID(case_id))
    except BadCursor:
        raise
    except (binascii.Error, orjson.JSONDecodeError, ValueError, TypeError, AttributeError) as exc:
        raise BadCursor("malformed cursor") from exc
