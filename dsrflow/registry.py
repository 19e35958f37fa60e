"""Systems that hold personal data, and what each holds and can do.

A worker declares its system and announces it on ``dsr.systems.v1`` (:class:`SystemAnnounced`,
a compacted topic: the last announcement per system) when it starts and then as a heartbeat;
it needs no access to the case store. The coordinator records each announcement in
``system_announcements``. A new system, or a changed declaration, takes effect only once an
administrator approves it (the ``approve_system`` decision, ``dsrflow systems approve``): then it
is registered in the ``systems`` table, the registry the coordinator plans tasks from. Until
then the declaration in force (if any) stays in force, so a misconfigured worker cannot make
cases report that no system holds data. ``dsrflow systems declare FILE`` is the administrator's
direct way: it registers (and so approves) a declaration, a system without a worker included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal

import asyncpg
import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import DsrflowError
from .events import DEFAULT_CONTROLLER, Controller, Event, Sha256, SystemName
from .rights import Action, IdentifierType


class Retention(BaseModel):
    """A category the system must keep for a time, and the law that requires it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    category: str = Field(description="fideslang data category, e.g. user.financial")
    legal_basis: str = Field(min_length=1)
    period: timedelta


class SystemDeclaration(BaseModel):
    """What a system holds and what it can do, and what an information request is answered from
    (Decree 356/2025 Art 4(1), GDPR Art 13-15): purposes, recipients and processors, storage
    country, sensitive categories, retention and backup retention."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: SystemName
    identifier_types: tuple[IdentifierType, ...] = Field(min_length=1)
    categories: tuple[str, ...] = ()
    actions: tuple[Action, ...] = ()
    retention: tuple[Retention, ...] = ()
    description: str | None = None
    purposes: tuple[str, ...] = Field(default=(), description="fideslang data uses, e.g. marketing.communications")
    recipients: tuple[str, ...] = Field(default=(), description="to whom the data is disclosed")
    processors: tuple[str, ...] = Field(default=(), description="processors and sub-processors that handle it")
    operated_by: Literal["controller", "processor", "third_party"] = Field(
        default="controller",
        description="a processor or third party makes a case take the law's longer via-processor deadline",
    )
    storage_country: str | None = Field(default=None, pattern=r"^[A-Z]{2}$", description="ISO 3166 country code")
    sensitive_categories: tuple[str, ...] = Field(default=(), description="Decree 356/2025 Art 4(1) categories held")
    backup_retention: timedelta | None = Field(default=None, description="how long backups keep erased data")
    worker: bool = Field(default=True, description="false: no worker acts for it; every task is manual")
    controller: Controller = Field(
        default=DEFAULT_CONTROLLER,
        description="the controller (tenant) whose data it holds: only that controller's cases ask it")

    @model_validator(mode="after")
    def _a_worker_acts(self) -> SystemDeclaration:
        if self.worker and not self.actions:
            raise ValueError("a system with a worker must declare at least one action")
        return self

    def supports(self, action: Action) -> bool:
        return self.worker and action in self.actions


def declaration_digest(system: SystemDeclaration) -> str:
    """The sha256 of a declaration's canonical JSON: what an administrator approves, and how an
    announcement is told to be the declaration in force or a change."""
    # Fields left at their defaults are left out: a later dsrflow that adds an optional field
    # computes the same digest for an older worker's declaration.
    canonical = orjson.dumps(system.model_dump(mode="json", exclude_defaults=True), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


class SystemAnnounced(Event):
    """A worker's declaration of its system, its versions and a heartbeat. Topic ``dsr.systems.v1``
    (compacted), key: the system's name. Signed with the system's key, as its receipts are. No
    personal data."""

    ce_type: ClassVar[str] = "dsrflow.system.announced.v1"

    declaration: SystemDeclaration
    digest: Sha256 = Field(description="declaration_digest(declaration); checked by the coordinator")
    sdk_version: str = Field(max_length=64, description="the dsrflow version the worker runs")
    version: str | None = Field(default=None, max_length=64, description="the worker's own version, if it says")
    instance: str = Field(max_length=200, description="host/process/run of the announcing instance")
    started_at: datetime
    at: datetime = Field(description="when this announcement was made (a heartbeat)")

    @model_validator(mode="after")
    def _digest_matches(self) -> SystemAnnounced:
        if self.digest != declaration_digest(self.declaration):
            raise ValueError("digest is not the sha256 of the declaration's canonical JSON")
        return self


class SystemOwnedElsewhere(DsrflowError, ValueError):
    """A declaration names a system that another controller (tenant) registered."""


class SystemDecisionError(DsrflowError):
    """An administrator's decision on a system that cannot be applied (nothing announced, the
    declaration changed since it was looked at, another controller's system)."""


async def register(conn: asyncpg.Connection, system: SystemDeclaration, *, by: str | None = None,
                   decision: Literal["declared", "approved"] = "declared") -> None:
    """Put a declaration in force: insert or update the system in the registry. Idempotent. The
    coordinator's sweep then plans the tasks the system was not yet given: open cases, and lasting
    effects still in force. ``by`` is who decided (an actor; default: whoever holds the case
    store's credentials, which is how ``dsrflow systems declare`` works); every change is kept in
    ``system_decisions``, and an announcement of the same declaration is marked approved.

    A system belongs to the controller that registered it first: a declaration of the same name
    for another controller raises :class:`SystemOwnedElsewhere` and changes nothing."""
    digest = declaration_digest(system)
    actor = by or "case-store"
    async with conn.transaction():
        row = await conn.fetchrow(
            """
            INSERT INTO systems (name, identifier_types, categories, actions, retention, description, declaration,
                                 active, controller, digest, approved_by, approved_at)
            VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7::jsonb, true, $8, $9, $10, now())
            ON CONFLICT (name) DO UPDATE SET
                identifier_types = EXCLUDED.identifier_types, categories = EXCLUDED.categories,
                actions = EXCLUDED.actions, retention = EXCLUDED.retention,
                description = EXCLUDED.description, declaration = EXCLUDED.declaration, active = true,
                digest = EXCLUDED.digest, approved_by = EXCLUDED.approved_by, approved_at = EXCLUDED.approved_at,
                updated_at = now()
            WHERE systems.controller = EXCLUDED.controller
            RETURNING name, (xmax = 0) AS inserted
            """,
            system.name,
            [str(t) for t in system.identifier_types],
            list(system.categories),
            [str(a) for a in system.actions],
            orjson.dumps([r.model_dump(mode="json") for r in system.retention]).decode(),
            system.description,
            system.model_dump_json(),
            system.controller,
            digest,
            actor,
        )
        if row is None:
            raise SystemOwnedElsewhere(f"system {system.name!r} is registered for another controller; "
                                       f"pick another name for controller {system.controller!r}")
        await conn.execute("INSERT INTO system_decisions (system, controller, decision, digest, actor) "
                           "VALUES ($1, $2, $3, $4, $5)", system.name, system.controller, decision, digest, actor)
        await conn.execute("UPDATE system_announcements SET state = 'approved', reason = NULL "
                           "WHERE system = $1 AND digest = $2", system.name, digest)


AnnouncementState = Literal["pending", "approved", "refused"]


async def record_announcement(conn: asyncpg.Connection, ann: SystemAnnounced, *,
                              signed_by: str | None = None) -> tuple[AnnouncementState, bool]:
    """Record what a worker announced. Returns its state and whether it is news (a declaration not
    seen before, or a changed state): ``approved`` when it is the declaration in force,
    ``refused`` when it cannot be (the name is another controller's), else ``pending`` until an
    administrator approves it. A repeated announcement (a heartbeat) only moves ``last_seen_at``
    forward and records the versions and instance. Nothing in force changes here."""
    decl = ann.declaration
    # Locked first: a heartbeat and an administrator's decision on the same system never interleave.
    before = await conn.fetchrow("SELECT digest, state, reason, controller FROM system_announcements "
                                 "WHERE system = $1 FOR UPDATE", decl.name)
    current = await conn.fetchrow("SELECT controller, digest, declaration FROM systems WHERE name = $1", decl.name)
    if (before is not None and before["controller"] != decl.controller and current is None
            and signed_by is None):
        raise SystemDecisionError(f"system {decl.name!r} was announced for another controller; an unsigned "
                                  f"announcement cannot move it to controller {decl.controller!r}")
    reason: str | None = None
    if current is not None and current["controller"] != decl.controller:
        state: AnnouncementState = "refused"
        reason = f"system {decl.name!r} is registered for another controller"
    elif current is not None and _digest_in_force(current) == ann.digest:
        state = "approved"
    else:
        state = "pending"
        # an administrator refused this very declaration, whatever was announced in between
        last = await conn.fetchrow("SELECT decision, actor, reason FROM system_decisions WHERE system = $1 "
                                   "AND digest = $2 ORDER BY id DESC LIMIT 1", decl.name, ann.digest)
        if last is not None and last["decision"] == "refused":
            state, reason = "refused", f"refused by {last['actor']}: {last['reason']}"
    await conn.execute(
        """
        INSERT INTO system_announcements (system, controller, declaration, digest, state, reason, sdk_version,
                                          version, instance, started_at, last_seen_at, signed_by)
        VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        ON CONFLICT (system) DO UPDATE SET
            controller = EXCLUDED.controller, declaration = EXCLUDED.declaration, state = EXCLUDED.state,
            reason = EXCLUDED.reason, sdk_version = EXCLUDED.sdk_version, version = EXCLUDED.version,
            instance = EXCLUDED.instance, started_at = EXCLUDED.started_at, signed_by = EXCLUDED.signed_by,
            first_seen_at = CASE WHEN system_announcements.digest = EXCLUDED.digest
                                 THEN system_announcements.first_seen_at ELSE now() END,
            last_seen_at = CASE WHEN system_announcements.digest = EXCLUDED.digest
                                THEN greatest(system_announcements.last_seen_at, EXCLUDED.last_seen_at)
                                ELSE EXCLUDED.last_seen_at END,
            digest = EXCLUDED.digest
        """,
        decl.name, decl.controller, decl.model_dump_json(), ann.digest, state, reason, ann.sdk_version,
        ann.version, ann.instance, ann.started_at, ann.at, signed_by,
    )
    news = before is None or before["digest"] != ann.digest or before["state"] != state
    return state, news


def _digest_in_force(row: asyncpg.Record) -> str | None:
    """The digest of the declaration in force (computed for one registered before digests were kept)."""
    if row["digest"]:
        return str(row["digest"])
    return declaration_digest(_declaration(row["declaration"])) if row["declaration"] else None


def _declaration(value: str | dict[str, Any]) -> SystemDeclaration:
    """A declaration as asyncpg returns a jsonb column (text, unless a codec is set)."""
    return SystemDeclaration.model_validate(orjson.loads(value) if isinstance(value, str) else value)


async def approve(conn: asyncpg.Connection, system: str, digest: str, *, by: str, tenant: str) -> SystemDeclaration:
    """An administrator approves the declaration ``system``'s worker announced, named by its digest
    (what ``dsrflow systems pending`` shows): it is registered and takes effect. Refused when
    nothing was announced, when the announced declaration is no longer that digest (it changed
    since the administrator looked), when it was refused, and for another controller's system
    (the default controller's administrators approve any: they run dsrflow)."""
    row = await conn.fetchrow("SELECT * FROM system_announcements WHERE system = $1 FOR UPDATE", system)
    if row is None:
        raise SystemDecisionError(f"no worker of system {system!r} has announced itself")
    decl = _declaration(row["declaration"])
    if tenant not in (decl.controller, DEFAULT_CONTROLLER):
        raise SystemDecisionError(f"no worker of system {system!r} has announced itself")  # not this tenant's
    if row["digest"] != digest:
        raise SystemDecisionError(f"system {system!r} now announces declaration {row['digest']}, not {digest}: "
                                  f"look at it again (dsrflow systems pending)")
    if row["state"] == "refused":
        raise SystemDecisionError(f"system {system!r} cannot be approved: {row['reason']}")
    if row["signed_by"] is None and tenant != DEFAULT_CONTROLLER:
        raise SystemDecisionError(f"the announcement of system {system!r} is not signed (anyone who may write "
                                  f"dsr.systems.v1 could have sent it): an administrator of the default controller "
                                  f"approves it, or give the system a key (dsrflow systems key {system})")
    await register(conn, decl, by=by, decision="approved")
    return decl


async def refuse(conn: asyncpg.Connection, system: str, digest: str, *, by: str, tenant: str,
                 reason: str) -> SystemDeclaration:
    """An administrator refuses the declaration ``system``'s worker announced (by its digest): the
    declaration in force, if any, stays; this one stays refused, with ``reason``, until the worker
    announces another."""
    row = await conn.fetchrow("SELECT * FROM system_announcements WHERE system = $1 FOR UPDATE", system)
    if row is None or tenant not in (row["controller"], DEFAULT_CONTROLLER):
        raise SystemDecisionError(f"no worker of system {system!r} has announced itself")
    if row["digest"] != digest:
        raise SystemDecisionError(f"system {system!r} now announces declaration {row['digest']}, not {digest}: "
                                  f"look at it again (dsrflow systems pending)")
    current = await conn.fetchrow("SELECT controller, digest, declaration FROM systems WHERE name = $1", system)
    if current is not None and _digest_in_force(current) == digest:
        raise SystemDecisionError(f"declaration {digest} of system {system!r} is the one in force already")
    await conn.execute("UPDATE system_announcements SET state = 'refused', reason = $2 WHERE system = $1",
                       system, f"refused by {by}: {reason}")
    await conn.execute("INSERT INTO system_decisions (system, controller, decision, digest, actor, reason) "
                       "VALUES ($1, $2, 'refused', $3, $4, $5)", system, row["controller"], digest, by, reason)
    return _declaration(row["declaration"])


async def announcements(
    conn: asyncpg.Connection, *, controller: str | None = None,
    states: Iterable[AnnouncementState] = ("pending", "approved", "refused"),
) -> list[dict[str, Any]]:
    """The last announcement of each system (optionally one controller's, in some states), with the
    digest of the declaration in force beside it."""
    rows = await conn.fetch(
        """SELECT a.*, s.digest AS digest_in_force, s.approved_by, s.approved_at
             FROM system_announcements a LEFT JOIN systems s ON s.name = a.system
            WHERE a.state = ANY($1::text[]) AND ($2::text IS NULL OR a.controller = $2)
            ORDER BY a.system""", list(states), controller)
    out = []
    for r in rows:
        d = dict(r)
        if isinstance(d["declaration"], str):
            d["declaration"] = orjson.loads(d["declaration"])
        out.append(d)
    return out


def _from_row(row: asyncpg.Record | dict[str, Any]) -> SystemDeclaration:
    declaration = row.get("declaration") if isinstance(row, dict) else row["declaration"]
    if declaration:
        return _declaration(declaration)
    retention = row["retention"]  # registered before declarations were kept whole
    if isinstance(retention, str):
        retention = orjson.loads(retention)
    return SystemDeclaration(
        name=row["name"],
        identifier_types=tuple(row["identifier_types"]),
        categories=tuple(row["categories"]),
        actions=tuple(row["actions"]),
        retention=tuple(Retention.model_validate(r) for r in retention),
        description=row["description"],
        controller=row.get("controller", DEFAULT_CONTROLLER) if isinstance(row, dict) else row["controller"],
    )


async def active_systems(conn: asyncpg.Connection) -> list[SystemDeclaration]:
    rows = await conn.fetch("SELECT * FROM systems WHERE active ORDER BY name")
    return [_from_row(r) for r in rows]


def names(systems: Iterable[SystemDeclaration]) -> list[str]:
    return [s.name for s in systems]
