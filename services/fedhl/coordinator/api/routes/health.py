"""Probes (no token: kubelets and load balancers call them) and the Prometheus scrape
endpoint (`/metrics`, admin token).

- `/livez`: the process serves HTTP. Background loops never exit (they are supervised), so a
  backend outage is not a reason to restart the process: liveness does not look at backends.
- `/readyz`: the database and Redis answer, and every background loop (scheduler, event
  listener, in-process aggregation worker) ticked within `FEDHL_LOOP_STALE_S`; 503 names each
  failing check. Reports this replica's role (scheduler leader or standby).
- `/healthz`: an alias of `/readyz`, kept for existing probes.
"""

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
from ...app import Coordinator
from ..deps import CoordinatorDep, require_admin
from ..schemas import Health, Liveness

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

ACTIVE_ROUND_STATES = (RoundState.OPEN, RoundState.COLLECTING, RoundState.AGGREGATING)


@router.get("/livez")
def livez() -> Liveness:
    """200 while the process serves requests."""
    return Liveness(status="ok")


def readiness(coordinator: Coordinator) -> tuple[bool, Health]:
    checks: dict[str, str] = {}
    try:
        with transaction(coordinator.deps.sessions, read_only=True) as s:
            database = ping(s)
        checks["database"] = "ok" if database else "no answer"
    except SQLAlchemyError as e:
        log.warning("readyz: database check failed: %s", e)
        database = False
        checks["database"] = f"unreachable: {type(e).__name__}"
    coord = coordinator.deps.coordination
    redis: bool | Literal["in-process"] = coord.ping() if coord.client is not None else "in-process"
    checks["redis"] = "ok" if redis else "unreachable"
    for loop in coordinator.loops.all():
        if loop.healthy():
            checks[f"loop:{loop.name}"] = "ok"
        elif loop.error is not None:
            checks[f"loop:{loop.name}"] = f"failing for {loop.age_s():.0f}s: {loop.error}"
        else:
            checks[f"loop:{loop.name}"] = f"no tick for {loop.age_s():.0f}s"
    failing = [name for name, result in checks.items() if result != "ok"]
    ok = not failing
    body = Health(
        status="ok" if ok else "unavailable",
        role=coordinator.scheduler.role,
        database=database,
        redis=redis,
        checks=checks,
        failing=failing,
    )
    return ok, body


@router.get("/readyz", responses={200: {"model": Health}, 503: {"model": Health}})
def readyz(coordinator: CoordinatorDep) -> JSONResponse:
    """200 when every check passes, else 503 with the failing checks named."""
    ok, body = readiness(coordinator)
    return JSONResponse(
        body.model_dump(), status_code=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE
    )


@router.get("/healthz", responses={200: {"model": Health}, 503: {"model": Health}})
def healthz(coordinator: CoordinatorDep) -> JSONResponse:
    """Alias of `/readyz`."""
    return readyz(coordinator)


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
