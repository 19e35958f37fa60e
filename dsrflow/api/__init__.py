"""Read-only HTTP API over the case store for the DPO and their tooling.

``create_app(settings)`` builds the FastAPI app (bearer-token auth, problem+json errors);
``serve(settings)`` runs it with uvicorn; ``write_openapi(path)`` writes the OpenAPI
document committed as docs/openapi.json (``python -m dsrflow.api docs/openapi.json``).
"""

from ._app import ApiTokenMissing, create_app, openapi_document, render_openapi, serve, write_openapi
from ._problems import FieldError, Problem, ValidationProblem

__all__ = [
    "ApiTokenMissing",
    "FieldError",
    "Problem",
    "ValidationProblem",
    "create_app",
    "openapi_document",
    "render_openapi",
    "serve",
    "write_openapi",
]
