"""The committed OpenAPI document (docs/openapi.json) is the app's own, and building it needs no database."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from pydantic import SecretStr

from dsrflow.api import ApiTokenMissing, create_app, render_openapi
from dsrflow.settings import Settings

NOWHERE = SecretStr("postgresql://nobody@127.0.0.1:1/none")
COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_committed_document_matches_the_app() -> None:
    generated = render_openapi()
    assert COMMITTED.exists(), "docs/openapi.json is missing: run `python -m dsrflow.api docs/openapi.json`"
    committed = COMMITTED.read_bytes()
    assert orjson.loads(committed) == orjson.loads(generated), (
        "docs/openapi.json drifted from the app: run `python -m dsrflow.api docs/openapi.json` and commit it"
    )
    assert committed == generated, "docs/openapi.json is not formatted as generated: regenerate it"


def test_served_document_is_the_committed_one() -> None:
    # A configured app (pointing at no reachable database) builds the same document without connecting.
    app = create_app(Settings(api_token=SecretStr("t" * 32), pg_dsn=NOWHERE))
    assert app.openapi() == orjson.loads(COMMITTED.read_bytes())


def test_errors_are_documented_as_problem_json() -> None:
    doc = orjson.loads(render_openapi())
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for code, response in op["responses"].items():
                if code.startswith(("4", "5")):
                    assert list(response["content"]) == ["application/problem+json"], (path, method, code)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path in ("/v1/cases", "/v1/cases/{case_id}"):
        assert doc["paths"][path]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]


@pytest.mark.parametrize("token", [None, "", "   "])
def test_refuses_to_start_without_a_token(token: str | None) -> None:
    with pytest.raises(ApiTokenMissing, match="DSRFLOW_API_TOKEN"):
        create_app(Settings(api_token=None if token is None else SecretStr(token), pg_dsn=NOWHERE))
