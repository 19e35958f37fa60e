"""Systems that hold personal data, and what each holds and can do.

A worker declares its system; on start it registers the declaration in the case
store's ``systems`` table, and the coordinator plans tasks from that registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
from pydantic import BaseModel, ConfigDict, Field

from .events import SystemName
from .rights import Action, IdentifierType


class Retention(BaseModel):
    """A category the system must keep for a time, and the law that requires it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    category: str = Field(description="fideslang data category, e.g. user.financial")
    legal_basis: str = Field(min_length=1)
    period: timedelta


class SystemDeclaration(BaseModel):
    """What a system holds and what it can do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: SystemName
    identifier_types: tuple[IdentifierType, ...] = Field(min_length=1)
    categories: tuple[str, ...] = ()
    actions: tuple[Action, ...] = Field(min_length=1)
    retention: tuple[Retention, ...] = ()
    description: str | None = None

    def supports(self, action: Action) -> bool:
        return action in self.actions


async def register(conn: asyncpg.Connection, system: SystemDeclaration) -> None:
    """Insert or update a system's declaration. Idempotent."""
    await conn.execute(
        """
        INSERT INTO systems (name, identifier_types, categories, actions, retention, description, active)
        VALUES ($1, $2, $3, $4, $5::jsonb, $6, true)
        ON CONFLICT (name) DO UPDATE SET
            identifier_types = EXCLUDED.identifier_types, categories = EXCLUDED.categories,
            actions = EXCLUDED.actions, retention = EXCLUDED.retention,
            description = EXCLUDED.description, active = true, updated_at = now()
        """,
        system.name,
        [str(t) for t in system.identifier_types],
        list(system.categories),
        [str(a) for a in system.actions],
        orjson.dumps([r.model_dump(mode="json") for r in system.retention]).decode(),
        system.description,
    )


def _from_row(row: asyncpg.Record | dict[str, Any]) -> SystemDeclaration:
    retention = row["retention"]
    if isinstance(retention, str):
        retention = orjson.loads(retention)
    return SystemDeclaration(
        name=row["name"],
        identifier_types=tuple(row["identifier_types"]),
        categories=tuple(row["categories"]),
        actions=tuple(row["actions"]),
        retention=tuple(Retention.model_validate(r) for r in retention),
        description=row["description"],
    )


async def active_systems(conn: asyncpg.Connection) -> list[SystemDeclaration]:
    rows = await conn.fetch("SELECT * FROM systems WHERE active ORDER BY name")
    return [_from_row(r) for r in rows]


def names(systems: Iterable[SystemDeclaration]) -> list[str]:
    return [s.name for s in systems]
