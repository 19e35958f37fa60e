"""Systems that hold personal data, and what each holds and can do.

A worker declares its system; on start it registers the declaration in the case
store's ``systems`` table, and the coordinator plans tasks from that registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any, Literal

import asyncpg
import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import DsrflowError
from .events import DEFAULT_CONTROLLER, Controller, SystemName
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


class SystemOwnedElsewhere(DsrflowError, ValueError):
    """A declaration names a system that another controller (tenant) registered."""


async def register(conn: asyncpg.Connection, system: SystemDeclaration) -> None:
    """Insert or update a system's declaration. Idempotent. The coordinator's sweep then plans the
    tasks the system was not yet given: open cases, and lasting effects still in force.

    A system belongs to the controller that registered it first: a declaration of the same name
    for another controller raises :class:`SystemOwnedElsewhere` and changes nothing."""
    row = await conn.fetchrow(
        """
        INSERT INTO systems (name, identifier_types, categories, actions, retention, description, declaration,
                             active, controller)
        VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7::jsonb, true, $8)
        ON CONFLICT (name) DO UPDATE SET
            identifier_types = EXCLUDED.identifier_types, categories = EXCLUDED.categories,
            actions = EXCLUDED.actions, retention = EXCLUDED.retention,
            description = EXCLUDED.description, declaration = EXCLUDED.declaration, active = true,
            updated_at = now()
        WHERE systems.controller = EXCLUDED.controller
        RETURNING name
        """,
        system.name,
        [str(t) for t in system.identifier_types],
        list(system.categories),
        [str(a) for a in system.actions],
        orjson.dumps([r.model_dump(mode="json") for r in system.retention]).decode(),
        system.description,
        system.model_dump_json(),
        system.controller,
    )
    if row is None:
        raise SystemOwnedElsewhere(f"system {system.name!r} is registered for another controller; "
                                   f"pick another name for controller {system.controller!r}")


def _from_row(row: asyncpg.Record | dict[str, Any]) -> SystemDeclaration:
    declaration = row.get("declaration") if isinstance(row, dict) else row["declaration"]
    if isinstance(declaration, str):
        declaration = orjson.loads(declaration)
    if declaration:
        return SystemDeclaration.model_validate(declaration)
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
