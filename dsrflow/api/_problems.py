"""Every error as ``application/problem+json`` (RFC 9457).

Validation problems list the fields at fault but never the values sent: a query may
carry things that should not come back in a response or land in a client's logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

MEDIA_TYPE = "application/problem+json"


# Fixed here rather than taken from http.HTTPStatus, whose phrases change between Python
# versions (422 became "Unprocessable Content" in 3.13) and would change the document.
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def title(status: int) -> str:
    """The problem title for an HTTP status: its RFC 9110 reason phrase."""
    if status in _TITLES:
        return _TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Problem(BaseModel):
    """Problem details for an HTTP API (RFC 9457)."""

    type: str = Field(default="about:blank", description="URI identifying the problem type")
    title: str = Field(description="short summary of the problem type")
    status: int = Field(description="the HTTP status code")
    detail: str | None = Field(default=None, description="explanation of this occurrence")
    instance: str | None = Field(default=None, description="the request path this occurrence is about")


class FieldError(BaseModel):
    """One invalid request field. The value sent is never echoed."""

    loc: list[str | int] = Field(description="where the field is, e.g. ['query', 'limit']")
    msg: str
    type: str = Field(description="pydantic error type, e.g. 'less_than_equal'")


class ValidationProblem(Problem):
    """A request that failed validation, with the fields at fault."""

    errors: list[FieldError]


class ProblemResponse(JSONResponse):
    media_type = MEDIA_TYPE


def problem_response(
    request: Request,
    status: int,
    detail: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    errors: Sequence[FieldError] | None = None,
) -> ProblemResponse:
    body: Problem
    if errors is not None:
        body = ValidationProblem(title=title(status), status=status, detail=detail, instance=request.url.path,
                                 errors=list(errors))
    else:
        body = Problem(title=title(status), status=status, detail=detail, instance=request.url.path)
    return ProblemResponse(body.model_dump(mode="json"), status_code=status, headers=dict(headers or {}))


def _field_error(err: Mapping[str, Any]) -> FieldError:
    msg = str(err.get("msg", "invalid"))
    ctx = err.get("ctx") or {}
    # Parser messages append the parser's complaint, which quotes the input ("found `x` at 1").
    if "error" in ctx and err.get("type") not in ("value_error", "assertion_error"):
        msg = msg.replace(str(ctx["error"]), "").rstrip(" ,:")
    return FieldError(loc=[p if isinstance(p, int) else str(p) for p in err.get("loc", ())], msg=msg,
                      type=str(err.get("type", "invalid")))


async def _http_exception(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    return problem_response(request, exc.status_code, detail, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [_field_error(e) for e in exc.errors()]
    fields = ", ".join(".".join(str(p) for p in e.loc) for e in errors)
    return problem_response(request, 422, f"invalid request fields: {fields}", errors=errors)


async def _unhandled(request: Request, exc: Exception) -> ProblemResponse:
    # Starlette re-raises after sending this, so the server logs the traceback once;
    # the client learns nothing about the internals.
    return problem_response(request, 500, "an unexpected error occurred; it has been logged")


def install(app: FastAPI) -> None:
    """Register the problem+json handlers on ``app``."""
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unhandled)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses (media type fixed up in the app's document)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        model = ValidationProblem if status == 422 else Problem
        out[status] = {"model": model, "description": title(status)}
    return out
