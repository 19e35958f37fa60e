"""The routes. They parse, call :mod:`dsrflow.store.queries` and shape the answer; no SQL here."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import Annotated
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError

from ..rights import CaseStatus, Right
from ..store import queries, timeline
from . import _cursor, _problems
from ._models import CaseDetail, CaseList, CaseSummary, Health

#: How long /healthz waits for the database before calling it unhealthy.
HEALTH_TIMEOUT = 2.0


def _pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool | None = getattr(request.app.state, "pool", None)
    if pool is None:
        raise HTTPException(503, "the database pool is not open")
    return pool


Pool = Annotated[asyncpg.Pool, Depends(_pool)]

health = APIRouter(tags=["health"])
cases = APIRouter(prefix="/v1", tags=["cases"])


@health.get(
    "/healthz",
    response_model=Health,
    summary="Liveness and database reachability",
    responses=_problems.responses(503, 500),
)
async def healthz(pool: Pool) -> Health:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            await pool.fetchval("SELECT 1")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise HTTPException(503, f"database unreachable: {type(exc).__name__}") from exc
    return Health()


@cases.get(
    "/cases",
    response_model=CaseList,
    summary="List cases, newest first",
    responses=_problems.responses(401, 422, 500),
)
async def list_cases(
    pool: Pool,
    status: Annotated[CaseStatus | None, Query(description="only cases in this status")] = None,
    right: Annotated[Right | None, Query(description="only cases for this right")] = None,
    overdue: Annotated[bool | None, Query(description="only cases that are (true) or are not (false) overdue")] = None,
    controller: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9_-]{0,62}$",
                                            description="only cases of this controller (tenant)")] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="page size")] = 50,
    cursor: Annotated[
        str | None, Query(max_length=512, description="`next_cursor` of the previous page")
    ] = None,
) -> CaseList:
    after = None
    if cursor is not None:
        try:
            after = _cursor.decode(cursor)
        except _cursor.BadCursor as exc:
            raise RequestValidationError(
                [{"loc": ("query", "cursor"), "msg": "malformed cursor: use a next_cursor this API returned",
                  "type": "value_error"}]
            ) from exc
    page = await queries.list_cases(
        pool, now=datetime.now(UTC), status=status, right=right, overdue=overdue, controller=controller,
        after=after, limit=limit,
    )
    return CaseList(
        items=[CaseSummary.of(c) for c in page.items],
        next_cursor=_cursor.encode(page.next_after) if page.next_after is not None else None,
    )


@cases.get(
    "/cases/{case_id}",
    response_model=CaseDetail,
    summary="One case with its subject, tasks and verified timeline",
    responses=_problems.responses(401, 404, 422, 500),
)
async def get_case(case_id: UUID, pool: Pool) -> CaseDetail:
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        # One snapshot, so the tasks and timeline belong to the case as read.
        case = await queries.get_case(conn, case_id, now=datetime.now(UTC))
        if case is None:
            raise HTTPException(404, f"no case {case_id}")
        tasks = await queries.case_tasks(conn, case_id)
        entries = await queries.case_timeline(conn, case_id)
        anchor = await conn.fetchrow("SELECT timeline_length, timeline_head FROM cases WHERE case_id = $1", case_id)
    # The chain, and its anchor in the case row (a cut-off tail shows too).
    head = bytes(anchor["timeline_head"]) if anchor["timeline_head"] is not None else None
    verified = not timeline.problems([dataclasses.asdict(e) for e in entries], length=anchor["timeline_length"],
                                     head=head)
    return CaseDetail.build(case, tasks, entries, timeline_verified=verified)
