"""What a handler gets: the task, its system, and a way to export."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import orjson

from ..events import Artifact, TaskAssigned
from ..exports.store import ExportStore, export_key
from ..identity import DEFAULT_REGION, SubjectMatch, match_subject, region_of
from ..registry import SystemDeclaration
from ..rights import IdentifierType

R = TypeVar("R")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)  # exact, unlike a float
    if isinstance(obj, Mapping):  # asyncpg.Record is a Mapping
        return dict(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"cannot export {type(obj).__name__} as JSON")


def to_json(data: Any) -> bytes:
    """How exports are encoded: orjson, indented for the person who reads the bundle."""
    return orjson.dumps(data, default=_json_default, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)


@dataclass(slots=True)
class TaskContext:
    """One task attempt as a handler sees it.

    ``identifiers`` holds only the identifier types the system declared; values arrive
    normalised (email lower-cased, phone as ``+`` and digits).
    """

    task: TaskAssigned
    system: SystemDeclaration
    store: ExportStore
    log: logging.LoggerAdapter[logging.Logger]
    _parts: int = field(default=0, repr=False)

    @property
    def identifiers(self) -> dict[IdentifierType, str]:
        declared = set(self.system.identifier_types)
        return {k: v for k, v in self.task.identifiers.items() if k in declared}

    def match(self, records: Iterable[R], fields: Mapping[IdentifierType, str] | Mapping[str, str]) -> SubjectMatch[R]:
        """The records this task may act on: :func:`dsrflow.identity.match_subject` with the task's
        identifiers. ``records`` are the candidates found by any identifier; ``fields`` names the
        record field of each identifier type. On ``conflict``, return ``Result.conflict(m.reason())``."""
        region = region_of(self.task.jurisdiction) if self.task.jurisdiction else DEFAULT_REGION
        return match_subject(self.identifiers, records, fields, region=region)

    async def export(self, data: Any, *, records: int, media_type: str = "application/json") -> Artifact:
        """Write an export to the export store and return its claim check for the receipt.

        ``data`` is encoded as JSON (dates, datetimes, UUIDs, Decimals and asyncpg records
        included) unless it is already ``bytes``. The key is
        ``cases/<case_id>/<system>/<task_id>-<attempt>-<sha256 prefix>.json`` (see
        :func:`~dsrflow.exports.store.export_key`): an export is never replaced, so the one a
        receipt names always matches its checksum; a second export in the same attempt gets
        ``-2`` before the digest, and so on.
        """
        body = data if isinstance(data, bytes) else to_json(data)
        self._parts += 1
        key = export_key(self.task.case_id, self.system.name, self.task.task_id, self.task.attempt,
                         digest=hashlib.sha256(body).hexdigest(), part=self._parts,
                         controller=self.task.controller)
        # File I/O off the event loop: other tasks of the batch keep running.
        return await asyncio.to_thread(self.store.put, key, body, records=records, media_type=media_type)
