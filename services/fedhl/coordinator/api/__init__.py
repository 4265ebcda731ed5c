"""The admin REST API: a thin FastAPI edge over the coordinator's services.

Routes decode and validate requests (422 with the offending field), call the same service
layer the gRPC servicer uses, and map its domain errors to HTTP statuses here, in one place.
Everything under /api/v1 and /metrics needs the admin bearer token, checked by `guard` before
any body is read; /healthz and, when enabled (`api_docs`: development only by default), the
OpenAPI pages (/docs, /redoc, /openapi.json) are public and expose no data.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request, status
from fastapi.responses import JSONResponse

from ... import __version__
from ...storage.repos import NotFound
from ..app import Coordinator
from ..errors import Code, ServiceError
from .deps import require_admin
from .guard import RequestGuard
from .routes import agents, audit, checkpoints, health, jobs, rounds, ui

API_PREFIX = "/api/v1"

HTTP_STATUS: dict[Code, int] = {
    Code.NOT_FOUND: status.HTTP_404_NOT_FOUND,
    Code.INVALID_ARGUMENT: status.HTTP_422_UNPROCESSABLE_CONTENT,
    Code.FAILED_PRECONDITION: status.HTTP_409_CONFLICT,
    Code.ALREADY_EXISTS: status.HTTP_409_CONFLICT,
    Code.ABORTED: status.HTTP_409_CONFLICT,  # a concurrent change won: retry
    Code.PERMISSION_DENIED: status.HTTP_403_FORBIDDEN,
    Code.UNAUTHENTICATED: status.HTTP_401_UNAUTHORIZED,
    Code.RESOURCE_EXHAUSTED: status.HTTP_429_TOO_MANY_REQUESTS,
    Code.OUT_OF_RANGE: status.HTTP_416_RANGE_NOT_SATISFIABLE,
    Code.DATA_LOSS: status.HTTP_500_INTERNAL_SERVER_ERROR,
    Code.DEADLINE_EXCEEDED: status.HTTP_504_GATEWAY_TIMEOUT,
}


def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    code = HTTP_STATUS.get(exc.code, status.HTTP_500_INTERNAL_SERVER_ERROR)
    headers = {"WWW-Authenticate": "Bearer"} if code == status.HTTP_401_UNAUTHORIZED else None
    if code == status.HTTP_422_UNPROCESSABLE_CONTENT:  # the documented 422 shape (a list), as for a bad field
        body: dict[str, object] = {"detail": [{"loc": ["body"], "msg": exc.message, "type": "value_error"}]}
    else:
        body = {"detail": exc.message}
    return JSONResponse(body, status_code=code, headers=headers)


def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_404_NOT_FOUND)


def create_app(coordinator: Coordinator) -> FastAPI:
    """The admin API of `coordinator` (whose threads, if any, the caller starts and stops)."""
    docs = bool(coordinator.settings.api_docs)
    app = FastAPI(
        title="FedHL coordinator",
        version=__version__,
        summary="Admin API: jobs, rounds, agents, checkpoints, audit log, health and metrics.",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.coordinator = coordinator

    api = APIRouter(prefix=API_PREFIX, dependencies=[Depends(require_admin)])
    for resource in (jobs, rounds, checkpoints, agents, audit):
        api.include_router(resource.router)
    app.include_router(api)
    app.include_router(health.router)
    app.include_router(ui.router)  # the web view, /ui (its own session login)

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(NotFound, _not_found)
    app.add_middleware(
        RequestGuard,
        admin_token=coordinator.settings.admin_token,
        max_body_bytes=coordinator.settings.max_request_bytes,
    )
    return app
