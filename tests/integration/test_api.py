"""The DPO HTTP API against a real PostgreSQL case store.

Each test seeds its own systems, cases, tasks and timeline (through
:func:`dsrflow.store.timeline.append`, so the hash chain is real) under a unique
suffix, and asserts on its own rows only: the tests hold whether or not the
database is shared.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from pydantic import SecretStr

from dsrflow.api import create_app
from dsrflow.settings import Settings
from dsrflow.store.timeline import Entry, append

pytestmark = pytest.mark.pg

TOKEN = "dpo-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROBLEM = "application/problem+json"
BUNDLE = {"ref": "cases/a/bundle.json", "sha256": "ab" * 32, "size": 2048, "records": 17,
          "media_type": "application/json"}


@dataclass
class Seed:
    suffix: str
    ids: dict[str, uuid.UUID] = field(default_factory=dict)

    def names(self, case_ids: Any) -> set[str]:
        back = {v: k for k, v in self.ids.items()}
        return {back[uuid.UUID(str(c))] for c in case_ids if uuid.UUID(str(c)) in back}


# name: (right, status, received days ago, due in days (negative: past), task statuses by system)
CASES: dict[str, tuple[str, str, float, float, dict[str, str]]] = {
    "a": ("access", "in_progress", 40, -10, {"crm": "succeeded", "billing": "dispatched"}),
    "b": ("erasure", "completed", 35, -5, {"crm": "succeeded", "billing": "retained"}),
    "c": ("erasure", "in_progress", 5, 10, {"crm": "dispatched"}),
    "d": ("access", "awaiting_verification", 30, -1 / 24, {}),
    "e": ("rectification", "received", 2, 8, {}),
    "f": ("opt_out_marketing", "received", 2, 13, {"crm": "pending"}),  # same received_at as e
    "g": ("erasure", "denied", 50, -20, {}),
}
OVERDUE = {"a", "d"}


async def _seed(dsn: str) -> Seed:
    seed = Seed(suffix=uuid.uuid4().hex[:8])
    now = datetime.now(UTC).replace(microsecond=123456)
    systems = {s: f"{s}_{seed.suffix}" for s in ("crm", "billing")}
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.executemany(
                "INSERT INTO systems (name, identifier_types, actions) VALUES ($1, $2, $3)",
                [(n, ["email"], ["export", "erase"]) for n in systems.values()],
            )
            entries: list[Entry] = []
            for name, (right, status, ago, due_in, tasks) in CASES.items():
                case_id = uuid.uuid4()
                seed.ids[name] = case_id
                received = now - timedelta(days=ago)
                terminal = status in ("completed", "denied")
                await conn.execute(
                    """INSERT INTO cases (case_id, request_id, request_event, right_name, jurisdiction, status,
                           subject, verified, received_at, ack_due_at, due_at, completed_at, outcome, bundle)
                       VALUES ($1, $2, $3, $4, 'VN', $5, $6::jsonb, true, $7, $8, $9, $10, $11::jsonb, $12::jsonb)""",
                    case_id, f"req-{name}-{seed.suffix}", f"ev-{name}-{seed.suffix}", right, status,
                    orjson.dumps({"email": f"{name}.{seed.suffix}@example.vn"}).decode(),
                    received, received + timedelta(days=2), now + timedelta(days=due_in),
                    now - timedelta(days=1) if terminal else None,
                    orjson.dumps({"status": status}).decode() if terminal else None,
                    orjson.dumps(BUNDLE).decode() if name == "a" else None,
                )
                for system, task_status in tasks.items():
                    done = task_status in ("succeeded", "retained")
                    await conn.execute(
                        """INSERT INTO tasks (task_id, case_id, system, action, status, attempt, dispatched_at,
                               completed_at, result, error)
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10)""",
                        uuid.uuid4(), case_id, systems[system], "erase" if right == "erasure" else "export",
                        task_status, 2 if system == "billing" else 1, received + timedelta(hours=1),
                        received + timedelta(days=1) if done else None,
                        orjson.dumps({"counts": {"located": 3}}).decode() if done else None,
                        "timeout on first attempt" if system == "billing" else None,
                    )
                entries.append(Entry(case_id, "received", {"right": right, "jurisdiction": "VN"}, received))
                if tasks:
                    entries.append(Entry(case_id, "tasks_dispatched", {"systems": sorted(tasks)},
                                         received + timedelta(hours=1)))
                    entries.append(Entry(case_id, "task_succeeded", {"system": "crm", "counts": {"located": 3}},
                                         received + timedelta(days=1)))
            await append(conn, entries)
    finally:
        await conn.close()
    return seed


@pytest.fixture
async def seed(case_store: str) -> Seed:
    return await _seed(case_store)


@pytest.fixture
async def client(case_store: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(api_token=SecretStr(TOKEN), pg_dsn=SecretStr(case_store)))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dsrflow.test") as c:
            yield c


async def _all_pages(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(10_000):
        q = {**params, **({"cursor": cursor} if cursor else {})}
        r = await client.get("/v1/cases", params=q, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) <= int(params.get("limit", 50))
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination did not end")


def _assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert body["type"] == "about:blank"
    assert body["title"]
    assert body["instance"] == r.request.url.path
    assert "detail" in body
    return body


# -- auth ---------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": "Bearer " + TOKEN + "x"}])
@pytest.mark.parametrize("path", ["/v1/cases", f"/v1/cases/{uuid.uuid4()}"])
async def test_case_routes_need_the_token(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> None:
    r = await client.get(path, headers=headers)
    _assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert TOKEN not in r.text


async def test_auth_comes_before_validation(client: httpx.AsyncClient) -> None:
    # An unauthenticated caller learns nothing about the parameters, not even that they are wrong.
    _assert_problem(await client.get("/v1/cases", params={"limit": "0", "status": "x"}), 401)
    _assert_problem(await client.get("/v1/cases/not-a-uuid"), 401)


async def test_health_and_document_need_no_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await client.get("/openapi.json")
    assert r.status_code == 200 and r.json()["info"]["title"] == "dsrflow API"


# -- list -------------------------------------------------------------------------
async def test_list_items_and_task_counts(client: httpx.AsyncClient, seed: Seed) -> None:
    items = {i["case_id"]: i for i in await _all_pages(client, limit=200)}
    a = items[str(seed.ids["a"])]
    assert a["request_id"] == f"req-a-{seed.suffix}"
    assert (a["right"], a["jurisdiction"], a["status"]) == ("access", "VN", "in_progress")
    assert a["task_counts"] == {"succeeded": 1, "dispatched": 1}
    assert a["completed_at"] is None and a["overdue"] is True
    assert set(a) == {"case_id", "request_id", "right", "jurisdiction", "status", "received_at", "ack_due_at",
                      "due_at", "overdue", "completed_at", "task_counts", "controller", "target_at"}
    assert a["controller"] == "default"
    assert "subject" not in a  # the list carries no personal data
    assert items[str(seed.ids["e"])]["task_counts"] == {}
    assert items[str(seed.ids["b"])]["completed_at"] is not None


async def test_list_filters_by_status_and_right(client: httpx.AsyncClient, seed: Seed) -> None:
    items = await _all_pages(client, status="in_progress", limit=200)
    assert {i["status"] for i in items} == {"in_progress"}
    assert seed.names(i["case_id"] for i in items) == {"a", "c"}

    items = await _all_pages(client, right="erasure", limit=200)
    assert {i["right"] for i in items} == {"erasure"}
    assert seed.names(i["case_id"] for i in items) == {"b", "c", "g"}

    items = await _all_pages(client, right="erasure", status="in_progress")
    assert seed.names(i["case_id"] for i in items) == {"c"}


async def test_overdue_is_derived_from_due_date_and_status(client: httpx.AsyncClient, seed: Seed) -> None:
    # b and g are past due too, but terminal: not overdue.
    items = await _all_pages(client, limit=200)
    flags = {n: i["overdue"] for i in items for n in seed.names([i["case_id"]])}
    assert flags == {n: n in OVERDUE for n in CASES}

    overdue = await _all_pages(client, overdue="true")
    assert all(i["overdue"] for i in overdue)
    assert seed.names(i["case_id"] for i in overdue) == OVERDUE

    on_time = await _all_pages(client, overdue="false")
    assert not any(i["overdue"] for i in on_time)
    assert seed.names(i["case_id"] for i in on_time) == set(CASES) - OVERDUE


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_pagination_returns_every_case_once_newest_first(
    client: httpx.AsyncClient, seed: Seed, limit: int
) -> None:
    items = await _all_pages(client, limit=limit)
    ids = [i["case_id"] for i in items]
    assert len(ids) == len(set(ids))
    assert seed.names(ids) == set(CASES)
    keys = [(datetime.fromisoformat(i["received_at"]), uuid.UUID(i["case_id"])) for i in items]
    assert keys == sorted(keys, reverse=True)
    # e and f share received_at: the case_id breaks the tie, and neither is lost at a page boundary.
    mine = [n for i in items for n in seed.names([i["case_id"]])]
    assert mine[:2] == sorted(["e", "f"], key=lambda n: seed.ids[n], reverse=True)

    filtered = await _all_pages(client, limit=limit, right="access")
    assert seed.names(i["case_id"] for i in filtered) == {"a", "d"}
    assert len(filtered) == len({i["case_id"] for i in filtered})


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "bogus-status-value"}, "status"),
        ({"right": "bogus-right-value"}, "right"),
        ({"overdue": "bogus-bool-value"}, "overdue"),
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"cursor": "bogus-cursor-value"}, "cursor"),
        ({"cursor": "WzEsIm5vdC1hLWRhdGUiLCJ4Il0"}, "cursor"),  # base64url of [1,"not-a-date","x"]
    ],
)
async def test_invalid_list_parameters_are_422_problems(
    client: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    r = await client.get("/v1/cases", params=params, headers=AUTH)
    body = _assert_problem(r, 422)
    assert [e["loc"] for e in body["errors"]] == [["query", field]]
    assert all(e["msg"] and e["type"] for e in body["errors"])
    assert field in body["detail"]
    for value in params.values():
        if len(value) > 3:
            assert value not in r.text  # the input is never echoed


# -- detail ----------------------------------------------------------------------
async def test_case_detail(client: httpx.AsyncClient, seed: Seed) -> None:
    r = await client.get(f"/v1/cases/{seed.ids['a']}", headers=AUTH)
    assert r.status_code == 200, r.text
    case = r.json()
    assert case["case_id"] == str(seed.ids["a"])
    assert case["subject"] == {"identifiers": {"email": f"a.{seed.suffix}@example.vn"}}
    assert case["status"] == "in_progress" and case["overdue"] is True
    assert case["bundle"] == BUNDLE
    assert case["outcome"] is None and case["verified"] is True
    assert case["task_counts"] == {"succeeded": 1, "dispatched": 1}

    tasks = {t["system"]: t for t in case["tasks"]}
    assert set(tasks) == {f"crm_{seed.suffix}", f"billing_{seed.suffix}"}
    crm, billing = tasks[f"crm_{seed.suffix}"], tasks[f"billing_{seed.suffix}"]
    assert (crm["action"], crm["status"], crm["attempt"]) == ("export", "succeeded", 1)
    assert crm["result"] == {"counts": {"located": 3}} and crm["error"] is None
    assert crm["dispatched_at"] is not None and crm["completed_at"] is not None
    assert (billing["status"], billing["attempt"], billing["error"]) == ("dispatched", 2, "timeout on first attempt")
    assert billing["completed_at"] is None and billing["result"] is None

    assert [(e["position"], e["kind"]) for e in case["timeline"]] == [
        (1, "received"), (2, "tasks_dispatched"), (3, "task_succeeded"),
    ]
    assert case["timeline"][1]["detail"] == {"systems": ["billing", "crm"]}
    assert set(case["timeline"][0]) == {"position", "at", "kind", "detail"}
    assert case["timeline_verified"] is True

    r = await client.get(f"/v1/cases/{seed.ids['b']}", headers=AUTH)
    assert r.status_code == 200
    b = r.json()
    assert (b["status"], b["overdue"], b["outcome"], b["bundle"]) == ("completed", False, {"status": "completed"}, None)
    assert b["timeline_verified"] is True

    r = await client.get(f"/v1/cases/{seed.ids['d']}", headers=AUTH)
    d = r.json()
    assert (d["tasks"], len(d["timeline"]), d["timeline_verified"]) == ([], 1, True)


async def test_tampered_timeline_is_not_verified(client: httpx.AsyncClient, seed: Seed, case_store: str) -> None:
    case_id = seed.ids["c"]
    conn = await asyncpg.connect(case_store)
    try:
        # One transaction: the trigger is off only for this update, and no one else sees it off.
        async with conn.transaction():
            await conn.execute("ALTER TABLE case_timeline DISABLE TRIGGER case_timeline_no_update")
            await conn.execute(
                """UPDATE case_timeline SET detail = '{"systems": ["nothing-to-see"]}'::jsonb
                   WHERE case_id = $1 AND position = 2""",
                case_id,
            )
            await conn.execute("ALTER TABLE case_timeline ENABLE TRIGGER case_timeline_no_update")
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("UPDATE case_timeline SET kind = 'x' WHERE case_id = $1", case_id)
    finally:
        await conn.close()

    r = await client.get(f"/v1/cases/{case_id}", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["timeline"][1]["detail"] == {"systems": ["nothing-to-see"]}
    assert r.json()["timeline_verified"] is False
    # Other cases' chains are untouched.
    r = await client.get(f"/v1/cases/{seed.ids['a']}", headers=AUTH)
    assert r.json()["timeline_verified"] is True


async def test_unknown_case_is_404_problem(client: httpx.AsyncClient) -> None:
    missing = uuid.uuid4()
    body = _assert_problem(await client.get(f"/v1/cases/{missing}", headers=AUTH), 404)
    assert body["title"] == "Not Found"


async def test_malformed_case_id_is_422_problem(client: httpx.AsyncClient) -> None:
    body = _assert_problem(await client.get("/v1/cases/not-a-uuid", headers=AUTH), 422)
    assert [e["loc"] for e in body["errors"]] == [["path", "case_id"]]
    assert all("`" not in e["msg"] for e in body["errors"])  # the parser's quote of the input is dropped


async def test_unexpected_errors_are_500_problems(case_store: str) -> None:
    app = create_app(Settings(api_token=SecretStr(TOKEN), pg_dsn=SecretStr(case_store)))

    async def boom() -> None:
        raise RuntimeError("secret internals")

    app.add_api_route("/v1/boom", boom)
    async with app.router.lifespan_context(app):
        # Starlette re-raises after answering (so servers log it); the client still gets the problem.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://dsrflow.test") as c:
            r = await c.get("/v1/boom", headers=AUTH)
    body = _assert_problem(r, 500)
    assert "secret internals" not in r.text
    assert body["title"] == "Internal Server Error"


async def test_unknown_route_and_method_are_problems(client: httpx.AsyncClient) -> None:
    _assert_problem(await client.get("/v1/nope", headers=AUTH), 404)
    r = await client.post("/v1/cases", headers=AUTH)
    _assert_problem(r, 405)
    assert r.headers["allow"] == "GET"
