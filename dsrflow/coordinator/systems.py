"""The coordinator's side of system announcements (``dsr.systems.v1``, :mod:`dsrflow.registry`).

Each record is a worker's :class:`~dsrflow.registry.SystemAnnounced`, keyed by the system's name.
It is checked before anything is recorded:

- it decodes, its key is the name of the system it declares, and its CloudEvents source is that
  system's (it ends in ``/<name>``);
- it is signed by one of the system's keys when the system has any (``dsrflow systems key``), and
  always when ``require_signed_receipts`` is set: the same rule as for receipts;

then recorded (:func:`~dsrflow.registry.record_announcement`): a heartbeat of the declaration in
force, or a new declaration waiting for an administrator. An unsigned announcement that would
move a system announced for one controller to another is refused (``controller_conflict``). A
record that fails a check is dead-lettered with the reason. Nothing a worker announces changes
what is in force: that takes an administrator's ``approve_system``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import asyncpg

from .. import codec, signing
from ..registry import SystemAnnounced, SystemDecisionError, record_announcement
from ..settings import Settings
from ..store import outbox
from .service import Record, _decode_all, _Work, from_system

log = logging.getLogger("dsrflow.coordinator")

ANNOUNCEMENTS = "coordinator.systems"


async def handle_announcements(pool: asyncpg.Pool, settings: Settings, records: Sequence[Record]) -> None:
    """Check and record a batch of announcements, in one transaction (dead letters included)."""
    work = _Work()
    checked: list[tuple[Record, codec.Envelope[SystemAnnounced]]] = []
    for rec, env in _decode_all(records, SystemAnnounced, ANNOUNCEMENTS, work):
        name = env.data.declaration.name
        if (rec.key or b"").decode(errors="replace") != name:
            work.dead_letter(rec, ANNOUNCEMENTS, "wrong_key", f"an announcement of system {name} must be keyed by "
                             f"its name (the topic is compacted by key)")
            continue
        if not from_system(env.source, name):
            work.dead_letter(rec, ANNOUNCEMENTS, "wrong_source", f"ce_source {env.source[:200]!r} is not system "
                             f"{name}'s (it ends in /{name})")
            continue
        checked.append((rec, env))
    async with pool.acquire() as conn, conn.transaction():
        keys = await signing.system_keys(conn, {env.data.declaration.name for _, env in checked})
        for rec, env in checked:
            ann = env.data
            name = ann.declaration.name
            own = keys.get(name)
            signed_by: str | None = None
            if own is not None or settings.require_signed_receipts:
                try:
                    signed_by = signing.verify_headers(own or {}, rec.headers, ce_id=env.id, ce_source=env.source,
                                                       value=rec.value or b"", kind="announcement")
                except signing.SignatureError as exc:
                    work.dead_letter(rec, ANNOUNCEMENTS, "unauthenticated_announcement", f"system {name}: {exc}")
                    continue
            try:
                state, news = await record_announcement(conn, ann, signed_by=signed_by)
            except SystemDecisionError as exc:
                work.dead_letter(rec, ANNOUNCEMENTS, "controller_conflict", str(exc))
                continue
            if news:
                if state == "pending":
                    log.warning("system %s announced a declaration that is not in force (%s): an administrator "
                                "approves it with `dsrflow systems approve %s --digest %s`", name, ann.digest[:12],
                                name, ann.digest)
                else:
                    log.info("system %s announced declaration %s: %s", name, ann.digest[:12], state)
        await outbox.add(conn, work.dead)
