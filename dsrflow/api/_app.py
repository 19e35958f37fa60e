"""The FastAPI application: construction, bearer-token auth, lifespan, serving, OpenAPI document."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import orjson
import uvicorn
from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from ..errors import ConfigError
from ..settings import Settings
from . import _problems, _routes

DESCRIPTION = """\
Read-only access to dsrflow's data-subject-rights cases for the DPO and their tooling.

Every `/v1` route needs `Authorization: Bearer <DSRFLOW_API_TOKEN>`. Case details contain the
subject's identifiers (personal data). Errors are `application/problem+json` (RFC 9457).
"""

#: The API's own version (the document's info.version), independent of the package's.
API_VERSION = "1.0.0"

#: The token used only to build the OpenAPI document offline; never accepted by a served app.
_DOCUMENT_ONLY_TOKEN = "openapi-document-only"


class ApiTokenMissing(ConfigError, RuntimeError):
    """The API was asked to start without DSRFLOW_API_TOKEN: case data is never served anonymously."""


class _App(FastAPI):
    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = _problem_media_types(super().openapi())
        return self.openapi_schema


def _problem_media_types(doc: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents every response as application/json; errors are problem+json."""
    for operations in doc.get("paths", {}).values():
        for op in operations.values():
            for code, response in op.get("responses", {}).items():
                content = response.get("content", {})
                if code[:1] in ("4", "5") and "application/json" in content:
                    content[_problems.MEDIA_TYPE] = content.pop("application/json")
    return doc


_bearer = HTTPBearer(auto_error=False, description="DSRFLOW_API_TOKEN")


class _RequireToken:
    """Dependency: the request carries the configured bearer token (compared in constant time)."""

    def __init__(self, token: SecretStr) -> None:
        self._expected = token.get_secret_value().encode()

    async def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if credentials is None:
            raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(credentials.credentials.encode(), self._expected):
            raise HTTPException(
                401, "the bearer token is not valid", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )


def _build(settings: Settings, token: SecretStr) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The pool opens here, not at construction, so the document can be built without a database.
        pool = await asyncpg.create_pool(settings.dsn, min_size=1, max_size=10, command_timeout=30)
        app.state.pool = pool
        try:
            yield
        finally:
            app.state.pool = None
            await pool.close()

    app = _App(
        title="dsrflow API",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        # Swagger UI and ReDoc load scripts from a CDN; the document is enough for tooling.
        docs_url=None,
        redoc_url=None,
        # operationIds are the route functions' names: stable, and what client generators show.
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.pool = None
    _problems.install(app)
    app.include_router(_routes.health)
    app.include_router(_routes.cases, dependencies=[Depends(_RequireToken(token))])
    return app


def create_app(settings: Settings) -> FastAPI:
    """The HTTP API. Opens its database pool on startup (lifespan), never at construction.

    Raises :class:`ApiTokenMissing` when ``settings.api_token`` is unset or blank.
    """
    token = settings.api_token
    if token is None or not token.get_secret_value().strip():
        raise ApiTokenMissing(
            "refusing to serve case data without authentication: set DSRFLOW_API_TOKEN "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return _build(settings, token)


async def serve(settings: Settings) -> None:
    """Run the API with uvicorn on ``settings.api_host:settings.api_port`` until stopped."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        server_header=False,
    )
    await uvicorn.Server(config).serve()


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document, built without settings, a token or a database."""
    settings = Settings.model_construct(api_token=None, pg_dsn=None)
    return _build(settings, SecretStr(_DOCUMENT_ONLY_TOKEN)).openapi()


def render_openapi() -> bytes:
    """The document as committed in docs/openapi.json."""
    return orjson.dumps(openapi_document(), option=orjson.OPT_INDENT_2) + b"\n"


def write_openapi(path: Path | str) -> None:
    """Write the OpenAPI document to ``path`` (docs/openapi.json in the repository)."""
    Path(path).write_bytes(render_openapi())
