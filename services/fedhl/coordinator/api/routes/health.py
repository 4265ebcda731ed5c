"""Liveness/readiness (`/healthz`, no token: probes and load balancers call it) and the
Prometheus scrape endpoint (`/metrics`, admin token)."""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import APIRouter, Depends, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from .... import metrics
from ....storage.db import transaction
from ....storage.models import RoundState
from ....storage.repos import AgentRepo, RoundRepo, ping
from ..deps import CoordinatorDep, require_admin
from ..schemas import Health

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

ACTIVE_ROUND_STATES = (RoundState.OPEN, RoundState.COLLECTING, RoundState.AGGREGATING)


@router.get("/healthz", responses={200: {"model": Health}, 503: {"model": Health}})
def healthz(coordinator: CoordinatorDep) -> JSONResponse:
    """200 when the database answers `SELECT 1` and the coordination backend (Redis, or the
    in-process twin) answers a ping; 503 otherwise."""
    try:
        with transaction(coordinator.deps.sessions, read_only=True) as s:
            database = ping(s)
    except SQLAlchemyError as e:
        log.warning("healthz: database check failed: %s", e)
        database = False
    coord = coordinator.deps.coordination
    redis: bool | Literal["in-process"] = coord.ping() if coord.client is not None else "in-process"
    ok = database and redis is not False
    body = Health(status="ok" if ok else "unavailable", database=database, redis=redis)
    return JSONResponse(
        body.model_dump(), status_code=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE
    )


@router.get(
    "/metrics",
    dependencies=[Depends(require_admin)],
    response_class=Response,
    responses={200: {"content": {metrics.CONTENT_TYPE: {}}}},
)
def prometheus_metrics(coordinator: CoordinatorDep) -> Response:
    """Prometheus text format; the cluster gauges are refreshed on each scrape."""
    with transaction(coordinator.deps.sessions, read_only=True) as s:
        agent_ids = AgentRepo(s).active_ids()
        active_rounds = RoundRepo(s).count_in(ACTIVE_ROUND_STATES)
    metrics.AGENTS_ALIVE.set(len(coordinator.deps.coordination.liveness.alive(agent_ids)))
    metrics.ACTIVE_ROUNDS.set(active_rounds)
    return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)
