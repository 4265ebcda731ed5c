"""The admin REST API over a real (unstarted) coordinator, once on SQLite and once on
Postgres: authentication on every route, job lifecycle, spec validation (422 naming the
field), agents and enrolment tokens, rounds, checkpoints, audit, health and metrics."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select

from fedhl.coordinator.api import HTTP_STATUS, create_app
from fedhl.coordinator.app import Coordinator
from fedhl.coordinator.errors import Code, ServiceError
from fedhl.storage.db import transaction
from fedhl.storage.models import Assignment, AssignmentState, RoundState, Update, utcnow
from fedhl.storage.repos import AgentRepo, CheckpointRepo, RoundRepo

API = "/api/v1"
PUBLIC_PATHS = {"/healthz", "/livez", "/readyz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}


class Response(Protocol):
    """What the tests read of a TestClient response (httpx or httpx2, whichever is installed)."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


def job_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "tiny",
        "base_model": "none",
        "target_modules": ["q", "v"],
        "module_shapes": {"layers.0.q": [16, 16], "layers.0.v": [16, 16]},
        "rank_set": [2, 4],
        "rounds": 2,
    }
    body.update(over)
    return body


@pytest.fixture
def app(coordinator: Coordinator) -> FastAPI:
    return create_app(coordinator)


@pytest.fixture
def client(app: FastAPI, coordinator: Coordinator) -> Iterator[TestClient]:
    headers = {"Authorization": f"Bearer {coordinator.settings.admin_token}"}
    with TestClient(app, headers=headers) as c:
        yield c


@pytest.fixture
def anon(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def create_job(client: TestClient, **over: Any) -> dict[str, Any]:
    r = client.post(f"{API}/jobs", json=job_body(**over))
    assert r.status_code == 201, r.text
    job: dict[str, Any] = r.json()
    return job


def enrol_agent(client: TestClient, coordinator: Coordinator, name: str = "a1") -> str:
    token = client.post(f"{API}/agents/enrolment-tokens", json={"label": name}).json()["token"]
    agent_id, _ = coordinator.agents.register(token, name, {})
    return agent_id


def names_field(r: Response, field: str) -> bool:
    """Whether a 422 body points at `field`, by its location or in its message."""
    return any(field in ".".join(map(str, e["loc"])) or field in e["msg"] for e in r.json()["detail"])


# -- authentication ---------------------------------------------------------------------


def protected_requests(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route, included routers flattened, path parameters filled."""
    out = []
    for route in iter_route_contexts(app.routes):
        assert route.path is not None
        if route.path in PUBLIC_PATHS or route.path.startswith("/ui"):
            continue  # the web view has its own session login (tests/operator/test_web_ui.py)
        path = re.sub(r"\{[^}]+\}", "1", route.path)
        out += [(m, path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return out


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token",
        "Bearer ",
        "Basic ZGV2LWFkbWluLXRva2Vu",  # the right token under the wrong scheme
        "dev-admin-token",  # no scheme at all
    ],
)
def test_every_route_but_the_public_ones_needs_the_admin_token(
    app: FastAPI, anon: TestClient, authorization: str | None
) -> None:
    # Prepare
    headers = {} if authorization is None else {"Authorization": authorization}
    requests = protected_requests(app)
    assert len(requests) >= 17  # every route of the API, not an empty sweep
    # Execute / Assert
    for method, path in requests:
        r = anon.request(method, path, headers=headers)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"detail": "missing or invalid admin token"}


def test_public_routes_answer_without_a_token(anon: TestClient) -> None:
    assert anon.get("/healthz").status_code == 200
    assert anon.get("/docs").status_code == 200
    assert anon.get("/redoc").status_code == 200
    schema = anon.get("/openapi.json").json()
    assert schema["info"]["title"] == "FedHL coordinator"
    assert "AdminToken" in schema["components"]["securitySchemes"]
    assert f"{API}/jobs" in schema["paths"]


def test_service_error_codes_map_to_http_statuses(app: FastAPI, client: TestClient) -> None:
    # Prepare: a route that raises each domain error
    def boom(code: str) -> None:
        raise ServiceError(Code(code), f"{code} happened")

    app.add_api_route("/boom/{code}", boom)
    expected = {
        "NOT_FOUND": 404,
        "INVALID_ARGUMENT": 422,
        "FAILED_PRECONDITION": 409,
        "ALREADY_EXISTS": 409,
        "PERMISSION_DENIED": 403,
        "UNAUTHENTICATED": 401,
        "RESOURCE_EXHAUSTED": 429,
    }
    assert set(HTTP_STATUS) == set(Code)  # a new code must be given a status
    for code, status in expected.items():
        # Execute
        r = client.get(f"/boom/{code}")
        # Assert
        assert r.status_code == status, code
        if status == 422:  # the documented 422 shape: a list of errors, as for a bad field
            assert r.json() == {"detail": [{"loc": ["body"], "msg": f"{code} happened", "type": "value_error"}]}
        else:
            assert r.json() == {"detail": f"{code} happened"}


# -- health and metrics -----------------------------------------------------------------


def test_readyz_reports_the_backends_the_loops_and_the_role(coordinator: Coordinator, anon: TestClient) -> None:
    coordinator.loops.register("scheduler", 30.0).tick()
    r = anon.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "role": "standby",  # the (unstarted) scheduler does not hold the leader lock
        "database": True,
        "redis": "in-process",
        "checks": {"database": "ok", "redis": "ok", "loop:scheduler": "ok"},
        "failing": [],
    }
    assert anon.get("/healthz").json() == r.json()  # an alias
    assert anon.get("/livez").json() == {"status": "ok"}


def test_readyz_names_a_stuck_loop_and_a_failing_one(coordinator: Coordinator, anon: TestClient) -> None:
    # Prepare: one loop without a tick for an hour, one backing off after an error
    coordinator.loops.register("scheduler", 30.0).last_tick -= 3600
    coordinator.loops.register("aggregator:x", 30.0).error = "ConnectionError: refused"
    # Execute
    r = anon.get("/readyz")
    # Assert
    assert r.status_code == 503, r.text
    assert r.json()["failing"] == ["loop:scheduler", "loop:aggregator:x"]
    stuck = r.json()["checks"]["loop:scheduler"]  # seconds pass between the set-up and the request
    assert stuck.startswith("no tick for ") and 3600 <= int(stuck.removeprefix("no tick for ").rstrip("s")) < 3660
    failing = r.json()["checks"]["loop:aggregator:x"]
    assert failing.startswith("failing for ") and failing.endswith("s: ConnectionError: refused"), failing
    assert anon.get("/livez").status_code == 200  # liveness does not depend on loops or backends


def test_healthz_is_503_when_redis_does_not_answer(coordinator: Coordinator, anon: TestClient) -> None:
    # Prepare: a Redis client whose ping fails
    class DeadRedis:
        def ping(self) -> bool:
            import redis

            raise redis.ConnectionError("connection refused")

        def close(self) -> None:
            pass

    coordinator.deps.coordination = dataclasses.replace(coordinator.deps.coordination, client=DeadRedis())  # type: ignore[arg-type]
    # Execute
    r = anon.get("/healthz")
    # Assert
    assert r.status_code == 503
    body = r.json()
    assert (body["status"], body["database"], body["redis"], body["failing"]) == ("unavailable", True, False, ["redis"])


def test_metrics_expose_the_fedhl_series(client: TestClient, coordinator: Coordinator) -> None:
    # Prepare: one live agent and one open round
    job = create_job(client)
    agent_id = enrol_agent(client, coordinator)
    open_round(coordinator, job["id"], agent_id)
    # Execute
    r = client.get("/metrics")
    # Assert
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "fedhl_upload_bytes_total",
        "fedhl_download_bytes_total",
        "fedhl_aggregation_seconds_bucket",
        "fedhl_agents_alive",
        "fedhl_active_rounds",
    ):
        assert name in text
    assert "fedhl_agents_alive 1.0" in text
    assert "fedhl_active_rounds 1.0" in text


# -- jobs -------------------------------------------------------------------------------


def test_create_job_then_get_and_list_it(client: TestClient) -> None:
    # Execute
    job = create_job(client)
    # Assert
    assert job["name"] == "tiny"
    assert job["status"] == "RUNNING"
    assert job["strategy"] == "fedhl"
    assert (job["current_round"], job["rounds"]) == (0, 2)
    assert job["config"]["module_shapes"] == {"layers.0.q": [16, 16], "layers.0.v": [16, 16]}
    assert job["error"] is None
    assert client.get(f"{API}/jobs/{job['id']}").json() == job
    assert [j["id"] for j in client.get(f"{API}/jobs").json()] == [job["id"]]
    assert [j["id"] for j in client.get(f"{API}/jobs", params={"status": "RUNNING"}).json()] == [job["id"]]
    assert client.get(f"{API}/jobs", params={"status": "PAUSED"}).json() == []
    assert client.get(f"{API}/jobs", params={"status": "SLEEPING"}).status_code == 422


BAD_SPECS = [
    pytest.param({"strategy": "nope"}, "strategy", id="unknown-strategy"),
    pytest.param({"strategy_options": {"bogus": 1}}, "strategy", id="unknown-strategy-option"),
    pytest.param({"rank_set": [0, 2]}, "rank_set", id="rank-not-positive"),
    pytest.param({"rank_set": [2, 32]}, "rank", id="rank-larger-than-module"),
    pytest.param(
        {"rank_policy": {"kind": "fixed", "fixed": {"a1": 3}}}, "rank_policy.fixed", id="fixed-rank-not-in-rank-set"
    ),
    pytest.param(
        {"rank_policy": {"kind": "fixed", "default_rank": 8}}, "default_rank", id="default-rank-not-in-rank-set"
    ),
    pytest.param({"selection": {"fraction": 0.5, "count": 2}}, "selection", id="fraction-and-count"),
    pytest.param({"selection": {"quorum": 0}}, "selection.quorum", id="quorum-zero"),
    pytest.param({"bogus": 1}, "bogus", id="extra-field"),
    pytest.param({"rounds": None}, "rounds", id="rounds-null"),
    pytest.param({"rounds": 0}, "rounds", id="rounds-zero"),
    pytest.param({"base_model_sha256": "xyz"}, "base_model_sha256", id="bad-sha256"),
    pytest.param({"module_shapes": {"layers.0.k": [16, 16]}}, "module_shapes", id="module-matches-no-target"),
    pytest.param({"module_shapes": {"layers.0.q": [0, 16]}}, "module_shapes", id="module-dimension-zero"),
    pytest.param({"task_type": "vision"}, "task_type", id="unknown-task-type"),
    pytest.param({"name": ""}, "name", id="empty-name"),
    pytest.param({"train": {"lr": -1}}, "train.lr", id="negative-lr"),
]


@pytest.mark.parametrize(("over", "field"), BAD_SPECS)
def test_bad_job_spec_is_422_naming_the_field(client: TestClient, over: dict[str, Any], field: str) -> None:
    r = client.post(f"{API}/jobs", json=job_body(**over))
    assert r.status_code == 422, r.text
    assert names_field(r, field), r.json()
    assert client.get(f"{API}/jobs").json() == []  # nothing was created


def test_missing_required_fields_are_422(client: TestClient) -> None:
    body = job_body()
    del body["rounds"]
    r = client.post(f"{API}/jobs", json=body)
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "rounds"]]
    assert r.json()["detail"][0]["type"] == "missing"
    assert client.post(f"{API}/jobs").status_code == 422  # no body at all


def test_job_lifecycle_transitions(client: TestClient) -> None:
    # Prepare
    job_id = create_job(client)["id"]

    def act(action: str) -> Response:
        return client.post(f"{API}/jobs/{job_id}/{action}")

    # Execute / Assert: every allowed move, and a 409 for each move that is not
    r = act("pause")
    assert (r.status_code, r.json()["status"]) == (200, "PAUSED")
    r = act("pause")
    assert r.status_code == 409
    assert "PAUSED" in r.json()["detail"]
    r = act("resume")
    assert (r.status_code, r.json()["status"]) == (200, "RUNNING")
    assert act("resume").status_code == 409
    r = act("cancel")
    assert (r.status_code, r.json()["status"]) == (200, "CANCELLED")
    for action in ("cancel", "pause", "resume"):
        r = act(action)
        assert r.status_code == 409, action
        assert set(r.json()) == {"detail"}
    assert client.get(f"{API}/jobs/{job_id}").json()["status"] == "CANCELLED"
    actions = [e["action"] for e in client.get(f"{API}/audit", params={"job_id": job_id}).json()]
    assert actions == ["job_cancelled", "job_resumed", "job_paused", "job_created"]


def test_unknown_job_is_404_everywhere(client: TestClient) -> None:
    for method, path in [
        ("GET", "/jobs/nope"),
        ("POST", "/jobs/nope/pause"),
        ("POST", "/jobs/nope/resume"),
        ("POST", "/jobs/nope/cancel"),
        ("GET", "/jobs/nope/rounds"),
        ("GET", "/jobs/nope/rounds/1"),
        ("GET", "/jobs/nope/checkpoints"),
        ("GET", "/jobs/nope/checkpoints/0/state"),
    ]:
        r = client.request(method, API + path)
        assert r.status_code == 404, (method, path)
        assert "not found" in r.json()["detail"] or "no round" in r.json()["detail"]


# -- rounds -----------------------------------------------------------------------------


def open_round(coordinator: Coordinator, job_id: str, agent_id: str) -> int:
    """A round with one assignment, as the scheduler would open it."""
    with transaction(coordinator.deps.sessions) as s:
        rnd = RoundRepo(s).open(job_id, 0, 0, utcnow() + timedelta(minutes=5), target=1, quorum=1, ranks={agent_id: 4})
        return rnd.id


def test_rounds_list_and_detail(client: TestClient, coordinator: Coordinator) -> None:
    # Prepare: a round with an accepted update and an aggregation report
    job_id = create_job(client)["id"]
    other_job = create_job(client, name="other")["id"]
    assert client.get(f"{API}/jobs/{job_id}/rounds").json() == []
    agent_id = enrol_agent(client, coordinator)
    round_id = open_round(coordinator, job_id, agent_id)
    with transaction(coordinator.deps.sessions) as s:
        rounds = RoundRepo(s)
        task = s.scalars(select(Assignment).where(Assignment.round_id == round_id)).one()
        rounds.set_assignment_state(task.id, [AssignmentState.ISSUED], AssignmentState.UPLOADED)
        rounds.add_update(
            Update(
                assignment_id=task.id,
                round_id=round_id,
                agent_id=agent_id,
                blob_key="0" * 64,
                sha256="0" * 64,
                size=1234,
                n_examples=7,
                metrics={"loss": 0.5},
                weight=1.0,
            )
        )
        rounds.transition(
            round_id, [RoundState.OPEN], RoundState.COMMITTED, report={"updates": 1}, committed_at=utcnow()
        )
        task_id = task.id
    # Execute
    listed = client.get(f"{API}/jobs/{job_id}/rounds").json()
    detail = client.get(f"{API}/jobs/{job_id}/rounds/{round_id}").json()
    # Assert
    assert [(r["id"], r["number"], r["attempt"], r["state"]) for r in listed] == [(round_id, 0, 0, "COMMITTED")]
    assert listed[0]["report"] == {"updates": 1}
    assert (listed[0]["target"], listed[0]["quorum"]) == (1, 1)
    assert "assignments" not in listed[0]
    assert detail["assignments"] == [{"task_id": task_id, "agent_id": agent_id, "rank": 4, "state": "UPLOADED"}]
    assert detail["updates"] == [
        {"agent_id": agent_id, "n_examples": 7, "size": 1234, "weight": 1.0, "metrics": {"loss": 0.5}}
    ]
    assert client.get(f"{API}/jobs/{other_job}/rounds/{round_id}").status_code == 404
    assert client.get(f"{API}/jobs/{job_id}/rounds/999999").status_code == 404
    assert client.get(f"{API}/jobs/{job_id}/rounds/first").status_code == 422


# -- checkpoints ------------------------------------------------------------------------


def test_checkpoints_list_and_state_download(client: TestClient, coordinator: Coordinator) -> None:
    # Prepare
    job_id = create_job(client)["id"]
    assert client.get(f"{API}/jobs/{job_id}/checkpoints").json() == []
    assert client.get(f"{API}/jobs/{job_id}/checkpoints/1/state").status_code == 404
    state = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 8
    key = coordinator.deps.blobs.put_bytes(state)
    with transaction(coordinator.deps.sessions) as s:
        CheckpointRepo(s).add(job_id, 1, key)
    # Execute
    listed = client.get(f"{API}/jobs/{job_id}/checkpoints").json()
    r = client.get(f"{API}/jobs/{job_id}/checkpoints/1/state")
    # Assert
    assert [(c["round_number"], c["state_key"]) for c in listed] == [(1, key)]
    assert r.status_code == 200
    assert r.content == state
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-length"] == str(len(state))
    assert r.headers["content-disposition"] == (f'attachment; filename="{job_id}-round1.safetensors"')
    assert client.get(f"{API}/jobs/{job_id}/checkpoints/2/state").status_code == 404


def test_checkpoint_with_a_missing_blob_is_404(client: TestClient, coordinator: Coordinator) -> None:
    job_id = create_job(client)["id"]
    with transaction(coordinator.deps.sessions) as s:
        CheckpointRepo(s).add(job_id, 1, "f" * 64)
    r = client.get(f"{API}/jobs/{job_id}/checkpoints/1/state")
    assert r.status_code == 404
    assert "missing" in r.json()["detail"]


# -- enrolment tokens and agents --------------------------------------------------------


def test_enrolment_token_is_shown_once_and_can_be_revoked(client: TestClient, coordinator: Coordinator) -> None:
    # Execute: create
    r = client.post(f"{API}/agents/enrolment-tokens", json={"label": "lab", "uses": 2, "expires_in_s": 3600})
    # Assert: the plaintext token is in this response and nowhere else
    assert r.status_code == 201
    created = r.json()
    token = created["token"]
    assert token.startswith("fedhl-enrol-")
    assert (created["label"], created["uses_left"]) == ("lab", 2)
    assert created["expires_at"] is not None
    listed = client.get(f"{API}/agents/enrolment-tokens")
    assert [t["id"] for t in listed.json()] == [created["id"]]
    assert "token" not in listed.json()[0]
    assert "token_hash" not in listed.json()[0]
    assert token not in listed.text
    assert token not in client.get(f"{API}/audit").text
    # Execute: redeem once, then revoke
    coordinator.agents.register(token, "a1", {})
    assert client.get(f"{API}/agents/enrolment-tokens").json()[0]["uses_left"] == 1
    r = client.delete(f"{API}/agents/enrolment-tokens/{created['id']}")
    # Assert
    assert r.status_code == 200
    assert r.json()["revoked"] is True
    assert "token" not in r.json()
    with pytest.raises(ServiceError) as e:
        coordinator.agents.register(token, "a2", {})
    assert e.value.code is Code.PERMISSION_DENIED
    assert client.get(f"{API}/agents/enrolment-tokens").json()[0]["revoked"] is True
    assert client.delete(f"{API}/agents/enrolment-tokens/nope").status_code == 404
    actions = [e["action"] for e in client.get(f"{API}/audit").json()]
    assert actions[:3] == ["enrolment_token_revoked", "agent_registered", "enrolment_token_created"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"uses": 0}, "uses"),
        ({"uses": 10001}, "uses"),
        ({"expires_in_s": -5}, "expires_in_s"),
        ({"label": "x" * 201}, "label"),
        ({"token": "mine"}, "token"),
    ],
)
def test_bad_enrolment_token_request_is_422(client: TestClient, body: dict[str, Any], field: str) -> None:
    r = client.post(f"{API}/agents/enrolment-tokens", json=body)
    assert r.status_code == 422
    assert names_field(r, field)


def test_agents_list_get_and_revoke(client: TestClient, coordinator: Coordinator) -> None:
    # Prepare
    assert client.get(f"{API}/agents").json() == []
    token = client.post(f"{API}/agents/enrolment-tokens", json={}).json()["token"]
    agent_id, credential = coordinator.agents.register(token, "a1", {"device_type": "cpu"})
    # Execute
    listed = client.get(f"{API}/agents")
    one = client.get(f"{API}/agents/{agent_id}").json()
    # Assert: public fields only, liveness from the heartbeat the registration recorded
    assert listed.json() == [one]
    assert set(one) == {
        "id",
        "name",
        "status",
        "resources",
        "rank_override",
        "alive",
        "created_at",
        "last_seen_at",
        "strikes",
        "quarantine_rounds",
        "quarantine_until",
    }
    assert (one["strikes"], one["quarantine_rounds"], one["quarantine_until"]) == (0, 0, None)
    assert (one["name"], one["status"], one["alive"]) == ("a1", "ACTIVE", True)
    assert one["resources"] == {"device_type": "cpu"}
    assert credential.partition(".")[2] not in listed.text
    assert client.get(f"{API}/agents/nope").status_code == 404
    # Execute: revoke
    r = client.post(f"{API}/agents/{agent_id}/revoke")
    # Assert
    assert (r.status_code, r.json()["status"]) == (200, "REVOKED")
    with pytest.raises(ServiceError) as e:
        coordinator.agents.authenticate(credential)
    assert e.value.code is Code.PERMISSION_DENIED
    assert client.post(f"{API}/agents/{agent_id}/revoke").status_code == 200  # idempotent
    assert client.post(f"{API}/agents/nope/revoke").status_code == 404
    revoked = [e for e in client.get(f"{API}/audit").json() if e["action"] == "agent_revoked"]
    assert [(e["actor"], e["details"]) for e in revoked] == [("admin", {"agent_id": agent_id, "cancelled_tasks": 0})]


def test_a_quarantined_agent_is_shown_and_an_admin_clears_it(client: TestClient, coordinator: Coordinator) -> None:
    # Prepare: three strikes in a row quarantine the agent for 5 rounds
    agent_id = enrol_agent(client, coordinator)
    with transaction(coordinator.deps.sessions) as s:
        until = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)
        assert [AgentRepo(s).strike(agent_id, after=3, rounds=5, until=until) for _ in range(3)] == [False, False, True]
    url = f"{API}/agents/{agent_id}"
    shown = client.get(url).json()
    assert (shown["strikes"], shown["quarantine_rounds"]) == (0, 5)
    assert datetime.fromisoformat(shown["quarantine_until"]) == until
    # Execute
    r = client.post(f"{url}/clear-quarantine")
    # Assert
    assert (r.status_code, r.json()["quarantine_rounds"], r.json()["strikes"]) == (200, 0, 0)
    assert r.json()["quarantine_until"] is None
    cleared = [e for e in client.get(f"{API}/audit").json() if e["action"] == "agent_quarantine_cleared"]
    assert [e["details"] for e in cleared] == [{"agent_id": agent_id, "strikes": 0, "rounds_left": 5}]
    assert client.post(f"{API}/agents/nope/clear-quarantine").status_code == 404


def test_rank_override_set_and_clear(client: TestClient, coordinator: Coordinator) -> None:
    # Prepare
    agent_id = enrol_agent(client, coordinator)
    url = f"{API}/agents/{agent_id}/rank-override"
    # Execute / Assert
    r = client.put(url, json={"rank": 4})
    assert (r.status_code, r.json()["rank_override"]) == (200, 4)
    assert client.get(f"{API}/agents/{agent_id}").json()["rank_override"] == 4
    r = client.put(url, json={"rank": None})
    assert (r.status_code, r.json()["rank_override"]) == (200, None)
    for bad in ({"rank": 0}, {"rank": -3}, {"rank": "four"}, {}):
        r = client.put(url, json=bad)
        assert r.status_code == 422, bad
        assert names_field(r, "rank")
    assert client.put(f"{API}/agents/nope/rank-override", json={"rank": 2}).status_code == 404
    events = [e for e in client.get(f"{API}/audit").json() if e["action"] == "agent_rank_override"]
    assert [(e["actor"], e["details"]["rank"]) for e in events] == [("admin", None), ("admin", 4)]


# -- audit ------------------------------------------------------------------------------


def test_audit_lists_events_newest_first_with_filters(client: TestClient) -> None:
    # Prepare
    a = create_job(client, name="a")["id"]
    b = create_job(client, name="b")["id"]
    client.post(f"{API}/jobs/{a}/pause")
    # Execute
    everything = client.get(f"{API}/audit").json()
    only_b = client.get(f"{API}/audit", params={"job_id": b}).json()
    latest = client.get(f"{API}/audit", params={"limit": 1}).json()
    # Assert
    assert [(e["action"], e["job_id"]) for e in everything] == [
        ("job_paused", a),
        ("job_created", b),
        ("job_created", a),
    ]
    assert all(e["actor"] == "admin" for e in everything)
    assert [e["action"] for e in only_b] == ["job_created"]
    assert only_b[0]["details"] == {"name": "b", "strategy": "fedhl"}
    assert [e["action"] for e in latest] == ["job_paused"]
    assert client.get(f"{API}/audit", params={"limit": 0}).status_code == 422
    assert client.get(f"{API}/audit", params={"limit": 1001}).status_code == 422
