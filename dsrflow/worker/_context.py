"""What a handler gets: the task, its system, a way to export, and a way to report progress."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import orjson

from ..events import Artifact, TaskAssigned, TaskProgress
from ..exports.store import ExportStore, export_key
from ..identity import DEFAULT_REGION, SubjectMatch, match_subject, region_of
from ..registry import SystemDeclaration
from ..rights import IdentifierType

R = TypeVar("R")

#: Where a task's progress reports go: the Kafka runner sends them beside the receipts;
#: :func:`dsrflow.testing.worker.run_task` keeps them for the test.
ProgressSink = Callable[[TaskProgress], Awaitable[None]]
#: How long one progress report may take to hand over before it is given up (the handler waits).
PROGRESS_SEND_TIMEOUT_S = 5.0
_NOTE_MAX = 200  # TaskProgress.note's limit

log = logging.getLogger("dsrflow.worker")


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


class _Progress:
    """One task attempt's progress reports, at most one per ``interval`` seconds: the first goes
    at once; later calls within the interval only change what the next report says, which goes
    when the interval ends. :meth:`close`, when the handler has returned, cancels what is still to
    go: a report must never come after its task's receipt. Reports are numbered 1, 2, 3... (seq).

    Sending never raises into the handler: progress is a courtesy to the coordinator, and a report
    that cannot be sent (broker down, a value out of range) is logged by class name and dropped."""

    def __init__(self, task: TaskAssigned, *, interval: float, redact: Callable[[str], str],
                 sink: ProgressSink | None) -> None:
        self.task = task
        self.interval = interval
        self.redact = redact
        self.sink = sink
        self.seq = 0
        self._latest: tuple[int | None, int | None, str | None] | None = None
        self._last_sent: float | None = None
        self._timer: asyncio.Task[None] | None = None
        self._closed = False

    async def report(self, done: int | None, total: int | None, note: str | None) -> None:
        if self._closed:
            return
        self._latest = (done, total, note)
        if self._timer is not None:  # a report is due at the end of the interval: it says this
            return
        wait = 0.0 if self._last_sent is None else self._last_sent + self.interval - time.monotonic()
        if wait <= 0:
            await self._send()
        else:
            self._timer = asyncio.create_task(self._send_later(wait))

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _send_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._timer = None
        await self._send()

    async def _send(self) -> None:
        latest, self._latest = self._latest, None
        if latest is None:
            return
        done, total, note = latest
        self._last_sent = time.monotonic()
        task, seq = self.task, self.seq + 1
        try:
            event = TaskProgress(task_id=task.task_id, case_id=task.case_id, system=task.system,
                                 attempt=task.attempt, seq=seq, done=done, total=total,
                                 note=self.redact(note)[:_NOTE_MAX] if note else None, at=datetime.now(UTC))
            self.seq = seq
            if self.sink is not None:
                async with asyncio.timeout(PROGRESS_SEND_TIMEOUT_S):
                    await self.sink(event)
        except Exception as exc:  # noqa: BLE001 - progress never fails the task
            log.warning("system %s task %s attempt %d: progress report %d not sent (%s)", task.system,
                        task.task_id, task.attempt, seq, type(exc).__name__)


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
    _progress: _Progress | None = field(default=None, repr=False)

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

    async def progress(self, done: int | None = None, total: int | None = None, note: str | None = None) -> None:
        """Tell the coordinator that this long task is still at work and how far it got: ``done``
        of ``total`` units (records, tables, files...) and a short ``note`` (up to 200 characters;
        no personal data: the task's identifiers and corrected values are redacted anyway). The
        coordinator waits longer before it sends a task that reports progress again.

        At most one report per ``Worker(progress_interval=...)`` (10 s by default) is sent: a call
        within the interval changes what the report at its end says. Nothing is sent after the
        handler returned. Never raises: a report that cannot be sent is logged and the task goes
        on. Outside Kafka, :func:`dsrflow.testing.worker.run_task` collects the reports in the list
        it is given as ``progress=``.
        """
        if self._progress is not None:
            await self._progress.report(done, total, note)
