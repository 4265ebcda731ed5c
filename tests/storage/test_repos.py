"""Every repository method, once per database backend, in process: each test prepares rows
through the repositories, executes one method and asserts hand-computed results."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from fedhl.jobspec import JobSpec
from fedhl.storage.db import transaction
from fedhl.storage.leader import LeaderLock
from fedhl.storage.models import (
    Agent,
    AgentStatus,
    AssignmentState,
    Job,
    JobStatus,
    Round,
    RoundState,
    Update,
    utcnow,
)
from fedhl.storage.repos import (
    AgentRepo,
    AuditRepo,
    AuthError,
    CheckpointRepo,
    JobRepo,
    NotFound,
    RevokedError,
    RoundRepo,
    SpecCache,
    ping,
)

KEY = "ab" * 32
SPEC: dict[str, Any] = {
    "name": "unit",
    "base_model": "none",
    "target_modules": ["q"],
    "module_shapes": {"layers.0.q": [8, 8]},
    "rank_set": [2, 4],
    "rounds": 3,
}
Sessions = sessionmaker[Session]


def add_job(s: Session, status: JobStatus = JobStatus.RUNNING, name: str = "unit") -> Job:
    spec = JobSpec.model_validate({**SPEC, "name": name})
    return JobRepo(s).add(
        Job(
            name=name,
            status=status,
            strategy=spec.strategy,
            base_model=spec.base_model,
            config=spec.model_dump(mode="json"),
            state_key=KEY,
            plan_key=None,
            start_keys={"2": KEY, "4": KEY},
        )
    )


def add_agent(s: Session, name: str = "a", resources: dict[str, Any] | None = None) -> tuple[Agent, str]:
    repo = AgentRepo(s)
    token, _ = repo.create_token("t", 1, None)
    return repo.redeem(token, name, resources or {})


def open_round(s: Session, job_id: str, agent_ids: list[str], number: int = 0, attempt: int = 0) -> Round:
    deadline = utcnow() + timedelta(minutes=5)
    return RoundRepo(s).open(job_id, number, attempt, deadline, 2, 1, {a: 2 for a in agent_ids})


def add_upload(s: Session, rnd: Round, agent_id: str) -> Update:
    rounds = RoundRepo(s)
    a = next(a for a in rnd.assignments if a.agent_id == agent_id)
    assert rounds.set_assignment_state(
        a.id, [AssignmentState.ISSUED, AssignmentState.RUNNING], AssignmentState.UPLOADED
    )
    return rounds.add_update(
        Update(assignment_id=a.id, round_id=rnd.id, agent_id=agent_id, blob_key=KEY, sha256=KEY, size=10, n_examples=5)
    )


# ------------------------------------------------------------------------------ health


def test_ping_answers_on_a_live_database(sessions: Sessions) -> None:
    with transaction(sessions, read_only=True) as s:
        assert ping(s) is True


# ------------------------------------------------------------------------------ agents and tokens


def test_create_token_stores_only_a_hash_and_lists_tokens_oldest_first(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        t1, _ = AgentRepo(s).create_token("first", 3, None)
        t2, _ = AgentRepo(s).create_token("second", 1, None)
    with transaction(sessions) as s:
        rows = AgentRepo(s).list_tokens()
    assert [r.label for r in rows] == ["first", "second"]
    assert [r.uses_left for r in rows] == [3, 1]
    assert t1.startswith("fedhl-enrol-") and t1 != t2
    assert all(t not in (r.token_hash for r in rows) for t in (t1, t2))


def test_revoke_token_reports_whether_it_changed_anything(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        _, row = AgentRepo(s).create_token("t", 1, None)
    with transaction(sessions) as s:
        first = AgentRepo(s).revoke_token(row.id)
        second = AgentRepo(s).revoke_token(row.id)
    assert (first[1], second[1]) == (True, False)
    assert first[0].revoked
    with transaction(sessions) as s, pytest.raises(NotFound):
        AgentRepo(s).revoke_token("missing")


def test_redeem_creates_an_agent_and_consumes_one_use(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        token, row = AgentRepo(s).create_token("t", 2, None)
    with transaction(sessions) as s:
        agent, credential = AgentRepo(s).redeem(token, "gpu-1", {"device_type": "cuda"})
    with transaction(sessions) as s:
        assert [t.uses_left for t in AgentRepo(s).list_tokens()] == [1]
        stored = AgentRepo(s).get(agent.id)
        assert (stored.name, stored.resources, stored.status) == ("gpu-1", {"device_type": "cuda"}, AgentStatus.ACTIVE)
        assert stored.enrolment_token_id == row.id and stored.last_seen_at is not None
    assert credential.startswith(agent.id + ".")


@pytest.mark.parametrize(
    ("case", "uses", "expires_in_s", "revoked", "message"),
    [
        ("unknown", 1, None, False, "unknown or revoked"),
        ("revoked", 1, None, True, "unknown or revoked"),
        ("expired", 1, -1.0, False, "expired"),
        ("used up", 0, None, False, "used up"),
    ],
)
def test_redeem_refuses_a_bad_token_with_auth_error_and_creates_nothing(
    sessions: Sessions, case: str, uses: int, expires_in_s: float | None, revoked: bool, message: str
) -> None:
    expires = None if expires_in_s is None else utcnow() + timedelta(seconds=expires_in_s)
    with transaction(sessions) as s:
        token, row = AgentRepo(s).create_token("t", uses, expires)
        if revoked:
            AgentRepo(s).revoke_token(row.id)
    presented = "fedhl-enrol-nope" if case == "unknown" else token
    with transaction(sessions) as s, pytest.raises(AuthError, match=message) as err:
        AgentRepo(s).redeem(presented, "x", {})
    assert not isinstance(err.value, PermissionError)  # never the OSError subclass
    with transaction(sessions) as s:
        assert AgentRepo(s).list() == []
        assert [t.uses_left for t in AgentRepo(s).list_tokens()] == [uses]


def test_authenticate_accepts_the_credential_and_refuses_every_variant(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        agent, credential = add_agent(s)
    agent_id, _, secret = credential.partition(".")
    with transaction(sessions) as s:
        assert AgentRepo(s).authenticate(credential).id == agent.id
    for bad in ["", agent_id, f"{agent_id}.", f".{secret}", f"{agent_id}.{secret}x", f"{'0' * 32}.{secret}"]:
        with transaction(sessions) as s, pytest.raises(AuthError, match="unknown agent or bad credential") as err:
            AgentRepo(s).authenticate(bad)
        assert type(err.value) is AuthError
    with transaction(sessions) as s:
        AgentRepo(s).revoke(agent.id)
    with transaction(sessions) as s, pytest.raises(RevokedError):
        AgentRepo(s).authenticate(credential)


def test_get_find_list_active_and_active_ids(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        a, _ = add_agent(s, "a")
        b, _ = add_agent(s, "b")
        AgentRepo(s).revoke(a.id)
    with transaction(sessions) as s:
        repo = AgentRepo(s)
        assert repo.get(b.id).name == "b"
        assert repo.find(b.id) is not None and repo.find("missing") is None
        assert [x.name for x in repo.list()] == ["a", "b"]
        assert [x.id for x in repo.active()] == [b.id]
        assert list(repo.active_ids()) == [b.id]
        with pytest.raises(NotFound):
            repo.get("missing")


def test_touch_sets_last_seen_and_merges_resources(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        a, _ = add_agent(s, resources={"device_type": "cpu", "steps_per_second": 1.5})
    when = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    with transaction(sessions) as s:
        assert AgentRepo(s).touch(a.id, {"steps_per_second": 3.0, "device_memory_bytes": 1024}, when)
        assert AgentRepo(s).touch("missing", {}, when) is False
    with transaction(sessions) as s:
        got = AgentRepo(s).get(a.id)
        assert got.last_seen_at == when
        assert got.resources == {"device_type": "cpu", "steps_per_second": 3.0, "device_memory_bytes": 1024}


def test_revoke_is_idempotent_and_set_rank_override_returns_the_previous_value(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        a, _ = add_agent(s)
    with transaction(sessions) as s:
        repo = AgentRepo(s)
        assert (repo.revoke(a.id), repo.revoke(a.id)) == (True, False)
        assert repo.set_rank_override(a.id, 8) is None
        assert repo.set_rank_override(a.id, None) == 8
        assert repo.set_rank_override(a.id, 4) is None
        with pytest.raises(NotFound):
            repo.revoke("missing")
        with pytest.raises(NotFound):
            repo.set_rank_override("missing", 2)
    with transaction(sessions) as s:
        got = AgentRepo(s).get(a.id)
        assert (got.status, got.rank_override) == (AgentStatus.REVOKED, 4)


# ------------------------------------------------------------------------------ jobs


def test_job_add_get_list_and_ids_by_status(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        running = add_job(s, JobStatus.RUNNING, "r")
        paused = add_job(s, JobStatus.PAUSED, "p")
        done = add_job(s, JobStatus.COMPLETED, "c")
    with transaction(sessions) as s:
        jobs = JobRepo(s)
        assert jobs.get(paused.id).name == "p"
        assert jobs.get(running.id, lock=True).status is JobStatus.RUNNING
        assert [j.name for j in jobs.list()] == ["r", "p", "c"]
        assert [j.id for j in jobs.list(JobStatus.COMPLETED)] == [done.id]
        assert set(jobs.ids([JobStatus.RUNNING, JobStatus.PAUSED])) == {running.id, paused.id}
        assert list(jobs.ids([JobStatus.FAILED])) == []
        with pytest.raises(NotFound):
            jobs.get("missing")


@pytest.mark.parametrize(
    ("start", "allowed", "to", "applied", "final"),
    [
        (JobStatus.RUNNING, [JobStatus.RUNNING], JobStatus.PAUSED, True, JobStatus.PAUSED),
        (JobStatus.PAUSED, [JobStatus.RUNNING], JobStatus.CANCELLED, False, JobStatus.PAUSED),
        (JobStatus.COMPLETED, [JobStatus.RUNNING, JobStatus.PAUSED], JobStatus.FAILED, False, JobStatus.COMPLETED),
    ],
)
def test_job_transition_applies_only_from_an_allowed_status(
    sessions: Sessions, start: JobStatus, allowed: list[JobStatus], to: JobStatus, applied: bool, final: JobStatus
) -> None:
    with transaction(sessions) as s:
        job = add_job(s, start)
    with transaction(sessions) as s:
        assert JobRepo(s).transition(job.id, allowed, to, error="e" if applied else None) is applied
    with transaction(sessions) as s:
        assert JobRepo(s).get(job.id).status is final


def test_job_spec_is_parsed_once_per_job_and_config(sessions: Sessions) -> None:
    cache = SpecCache(size=2)
    with transaction(sessions) as s:
        j1, j2, j3 = add_job(s, name="one"), add_job(s, name="two"), add_job(s, name="three")
    with transaction(sessions) as s:
        repo = JobRepo(s)
        first = repo.spec(JobRepo(s).get(j1.id), cache)
        again = repo.spec(JobRepo(s).get(j1.id), cache)
        assert first is again and first.name == "one" and cache.parses == 1
        repo.spec(j2, cache)
        assert cache.parses == 2
        j1.config = {**j1.config, "rounds": 7}  # a changed config has another digest: parsed again
        changed = repo.spec(j1, cache)
        assert (changed.rounds, cache.parses) == (7, 3)
        repo.spec(j3, cache)  # size 2: evicts the least recently used (j2)
        repo.spec(j2, cache)
        assert cache.parses == 5


def test_spec_of_reads_the_config_only_when_the_job_is_not_cached(sessions: Sessions) -> None:
    cache = SpecCache(size=2)
    with transaction(sessions) as s:
        job = add_job(s, name="one")
    with transaction(sessions) as s:
        repo = JobRepo(s)
        assert cache.cached(job.id) is None
        first = repo.spec_of(job.id, cache)
        assert first.name == "one" and cache.parses == 1
        assert repo.spec_of(job.id, cache) is first and cache.cached(job.id) is first and cache.parses == 1
        with pytest.raises(NotFound, match="job missing not found"):
            repo.spec_of("missing", cache)


# ------------------------------------------------------------------------------ rounds and assignments


def test_round_open_records_inputs_and_one_assignment_per_agent(sessions: Sessions) -> None:
    deadline = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    with transaction(sessions) as s:
        job = add_job(s)
        a, _ = add_agent(s, "a")
        b, _ = add_agent(s, "b")
        rnd = RoundRepo(s).open(job.id, 4, 1, deadline, 2, 1, {b.id: 4, a.id: 2}, inputs=job)
    with transaction(sessions) as s:
        got = RoundRepo(s).get(rnd.id)
        assert (got.number, got.attempt, got.state, got.deadline, got.target, got.quorum) == (
            4,
            1,
            RoundState.OPEN,
            deadline,
            2,
            1,
        )
        assert (got.input_state_key, got.input_plan_key, got.start_keys) == (KEY, None, {"2": KEY, "4": KEY})
        assert sorted((x.agent_id, x.rank, x.state) for x in got.assignments) == sorted(
            [(a.id, 2, AssignmentState.ISSUED), (b.id, 4, AssignmentState.ISSUED)]
        )
        with pytest.raises(NotFound):
            RoundRepo(s).get(10_000)


def test_active_for_job_attempts_and_count_in(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        job, other = add_job(s), add_job(s)
        a, _ = add_agent(s)
        failed = open_round(s, job.id, [a.id], number=0, attempt=0)
        RoundRepo(s).transition(failed.id, [RoundState.OPEN], RoundState.FAILED)
        retry = open_round(s, job.id, [a.id], number=0, attempt=1)
        open_round(s, other.id, [a.id])
    with transaction(sessions) as s:
        rounds = RoundRepo(s)
        active = rounds.active(job.id)
        assert active is not None and active.id == retry.id
        assert [r.attempt for r in rounds.for_job(job.id)] == [0, 1]
        assert (rounds.attempts(job.id, 0), rounds.attempts(job.id, 1)) == (2, 0)
        assert rounds.count_in([RoundState.OPEN]) == 2
        assert rounds.count_in([RoundState.FAILED, RoundState.COMMITTED]) == 1
        rounds.transition(retry.id, [RoundState.OPEN], RoundState.COMMITTED)
        assert rounds.active(job.id) is None


def test_validation_summaries_reads_committed_rounds_of_the_job_in_range(sessions: Sessions) -> None:
    screened = {"effects": {"a": 0.25, "b": -0.5}, "threshold": 5.0}
    with transaction(sessions) as s:
        job, other = add_job(s), add_job(s)
        a, _ = add_agent(s)
        rounds = RoundRepo(s)
        for number, state, report in [
            (0, RoundState.COMMITTED, {"round": 0, "validation": screened}),  # before the window
            (1, RoundState.FAILED, {"round": 1, "validation": {"effects": {"a": 9.0}}}),  # a failed attempt
            (1, RoundState.COMMITTED, {"round": 1, "validation": screened}),
            (2, RoundState.COMMITTED, {"round": 2}),  # no screen that round
            (3, RoundState.OPEN, None),  # the round being aggregated
        ]:
            rnd = open_round(s, job.id, [a.id], number=number, attempt=int(state is RoundState.FAILED))
            if state is not RoundState.OPEN:
                rounds.transition(rnd.id, [RoundState.OPEN], state, report=report)
        o = open_round(s, other.id, [a.id], number=2)
        rounds.transition(o.id, [RoundState.OPEN], RoundState.COMMITTED, report={"validation": {"effects": {"x": 1.0}}})
    with transaction(sessions) as s:
        assert RoundRepo(s).validation_summaries(job.id, 1, 3) == {1: screened, 2: None}
        assert RoundRepo(s).validation_summaries(job.id, 4, 3) == {}


@pytest.mark.parametrize(
    ("start", "allowed", "applied", "final"),
    [
        (RoundState.OPEN, [RoundState.OPEN, RoundState.COLLECTING], True, RoundState.AGGREGATING),
        (RoundState.COMMITTED, [RoundState.OPEN, RoundState.COLLECTING], False, RoundState.COMMITTED),
    ],
)
def test_round_transition_is_conditional(
    sessions: Sessions, start: RoundState, allowed: list[RoundState], applied: bool, final: RoundState
) -> None:
    now = datetime(2031, 1, 1, tzinfo=UTC)
    with transaction(sessions) as s:
        job = add_job(s)
        a, _ = add_agent(s)
        rnd = open_round(s, job.id, [a.id])
        RoundRepo(s).transition(rnd.id, [RoundState.OPEN], start)
    with transaction(sessions) as s:
        assert RoundRepo(s).transition(rnd.id, allowed, RoundState.AGGREGATING, closed_at=now, shards=3) is applied
    with transaction(sessions) as s:
        got = RoundRepo(s).get(rnd.id)
        assert got.state is final
        assert (got.closed_at, got.shards) == ((now, 3) if applied else (None, 1))


def test_assignment_lookups(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        job = add_job(s)
        a, _ = add_agent(s)
        task_id = open_round(s, job.id, [a.id]).assignments[0].id
    with transaction(sessions) as s:
        rounds = RoundRepo(s)
        assert rounds.assignment(task_id).agent_id == a.id
        found = rounds.find_assignment(task_id)
        assert found is not None and found.id == task_id
        assert rounds.find_assignment("missing") is None
        with pytest.raises(NotFound, match="task missing not found"):
            rounds.assignment("missing")


@pytest.mark.parametrize(
    ("assignment", "round_state", "job_status", "pending", "busy"),
    [
        (AssignmentState.ISSUED, RoundState.OPEN, JobStatus.RUNNING, True, True),
        (AssignmentState.RUNNING, RoundState.COLLECTING, JobStatus.RUNNING, True, True),
        (AssignmentState.UPLOADED, RoundState.COLLECTING, JobStatus.RUNNING, False, False),
        (AssignmentState.ISSUED, RoundState.AGGREGATING, JobStatus.RUNNING, False, False),
        (AssignmentState.ISSUED, RoundState.OPEN, JobStatus.PAUSED, False, True),  # paused: no pull, still busy
    ],
)
def test_pending_for_agent_and_busy_agents(
    sessions: Sessions,
    assignment: AssignmentState,
    round_state: RoundState,
    job_status: JobStatus,
    pending: bool,
    busy: bool,
) -> None:
    with transaction(sessions) as s:
        job = add_job(s, job_status)
        a, _ = add_agent(s)
        rnd = open_round(s, job.id, [a.id])
        task_id = rnd.assignments[0].id
        if assignment is not AssignmentState.ISSUED:
            RoundRepo(s).set_assignment_state(task_id, [AssignmentState.ISSUED], assignment)
        if round_state is not RoundState.OPEN:
            RoundRepo(s).transition(rnd.id, [RoundState.OPEN], round_state)
    with transaction(sessions) as s:
        got = RoundRepo(s).pending_for_agent(a.id)
        assert (got.id if got else None) == (task_id if pending else None)
        row = RoundRepo(s).pending_row(a.id)  # the agent plane's narrow form decides the same
        assert (row.id if row else None) == (task_id if pending else None)
        assert RoundRepo(s).pending_id_for_agent(a.id) == (task_id if pending else None)
        assert RoundRepo(s).busy_agents() == ({a.id} if busy else set())


def test_pending_for_agent_is_the_oldest_open_assignment(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        j1, j2 = add_job(s), add_job(s)
        a, _ = add_agent(s)
        first = open_round(s, j1.id, [a.id]).assignments[0].id
    with transaction(sessions) as s:
        open_round(s, j2.id, [a.id])
    with transaction(sessions) as s:
        got = RoundRepo(s).pending_for_agent(a.id)
        assert got is not None and got.id == first
        row = RoundRepo(s).pending_row(a.id)
        assert row is not None and row.id == first


def test_task_row_holds_the_assignment_round_and_job_fields(sessions: Sessions) -> None:
    deadline = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    with transaction(sessions) as s:
        job = add_job(s)
        a, _ = add_agent(s)
        rnd = RoundRepo(s).open(job.id, 3, 0, deadline, 2, 1, {a.id: 4}, inputs=job)
        task_id = rnd.assignments[0].id
    with transaction(sessions) as s:
        row = RoundRepo(s).task_row(task_id)
        assert RoundRepo(s).task_row("missing") is None
    assert row is not None
    assert (row.id, row.agent_id, row.rank, row.state, row.round_id, row.number) == (
        task_id,
        a.id,
        4,
        AssignmentState.ISSUED,
        rnd.id,
        3,
    )
    assert (row.round_state, row.round_open, row.deadline, row.job_id, row.job_status) == (
        RoundState.OPEN,
        True,
        deadline,
        job.id,
        JobStatus.RUNNING,
    )
    assert (row.start_keys, row.input_state_key) == ({"2": KEY, "4": KEY}, KEY)


def test_move_assignment_is_conditional_on_the_state(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        job = add_job(s)
        a, _ = add_agent(s)
        task_id = open_round(s, job.id, [a.id]).assignments[0].id
    with transaction(sessions) as s:
        rounds = RoundRepo(s)
        assert rounds.move_assignment(task_id, [AssignmentState.ISSUED], AssignmentState.RUNNING)
        assert not rounds.move_assignment(task_id, [AssignmentState.ISSUED], AssignmentState.RUNNING)
        assert not rounds.move_assignment("missing", [AssignmentState.ISSUED], AssignmentState.RUNNING)
    with transaction(sessions) as s:
        row = RoundRepo(s).task_row(task_id)
        assert row is not None and row.state is AssignmentState.RUNNING


def test_insert_update_and_audit_record_write_one_row_each(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        job = add_job(s)
        a, _ = add_agent(s)
        rnd = open_round(s, job.id, [a.id])
        task_id = rnd.assignments[0].id
    with transaction(sessions) as s:
        uid = RoundRepo(s).insert_update(
            assignment_id=task_id,
            round_id=rnd.id,
            agent_id=a.id,
            blob_key=KEY,
            sha256=KEY,
            size=10,
            n_examples=7,
            metrics={"loss": 0.5},
        )
        AuditRepo(s).record("agent:x", "upload_accepted", job.id, round=0, bytes=10)
    with transaction(sessions) as s:
        (upd,) = RoundRepo(s).updates(rnd.id)
        assert (upd.id, upd.agent_id, upd.n_examples, upd.metrics) == (uid, a.id, 7, {"loss": 0.5})
        (event,) = AuditRepo(s).list(job.id)
        assert (event.actor, event.action, event.details) == ("agent:x", "upload_accepted", {"round": 0, "bytes": 10})
    with pytest.raises(IntegrityError), transaction(sessions) as s:  # one upload per assignment
        RoundRepo(s).insert_update(
            assignment_id=task_id, round_id=rnd.id, agent_id=a.id, blob_key=KEY, sha256=KEY, size=1, n_examples=1
        )


def test_assignment_state_expire_and_cancel(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        job, other = add_job(s), add_job(s)
        a, _ = add_agent(s, "a")
        b, _ = add_agent(s, "b")
        c, _ = add_agent(s, "c")
        rnd = open_round(s, job.id, [a.id, b.id, c.id])
        elsewhere = open_round(s, other.id, [a.id])
        ids = {x.agent_id: x.id for x in rnd.assignments}
    with transaction(sessions) as s:
        rounds = RoundRepo(s)
        assert rounds.set_assignment_state(ids[a.id], [AssignmentState.ISSUED], AssignmentState.RUNNING)
        assert not rounds.set_assignment_state(ids[a.id], [AssignmentState.ISSUED], AssignmentState.RUNNING)
        assert rounds.set_assignment_state(ids[b.id], [AssignmentState.ISSUED], AssignmentState.UPLOADED)
        assert rounds.cancel_open_assignments(c.id) == 1  # c's only open assignment
        assert rounds.expire_open_assignments(rnd.id) == 1  # a's RUNNING one; b uploaded, c cancelled
    with transaction(sessions) as s:
        states = {x.agent_id: x.state for x in RoundRepo(s).get(rnd.id).assignments}
        assert states == {
            a.id: AssignmentState.EXPIRED,
            b.id: AssignmentState.UPLOADED,
            c.id: AssignmentState.CANCELLED,
        }
        assert RoundRepo(s).get(elsewhere.id).assignments[0].state is AssignmentState.ISSUED


def test_updates_add_list_and_count(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        job = add_job(s)
        b, _ = add_agent(s, "b")
        a, _ = add_agent(s, "a")
        rnd = open_round(s, job.id, [a.id, b.id])
        empty = open_round(s, add_job(s).id, [a.id])
        add_upload(s, rnd, b.id)
        add_upload(s, rnd, a.id)
    with transaction(sessions) as s:
        rounds = RoundRepo(s)
        assert [u.agent_id for u in rounds.updates(rnd.id)] == sorted([a.id, b.id])
        assert (rounds.update_count(rnd.id), rounds.update_count(empty.id)) == (2, 0)
        assert rounds.updates(empty.id) == []


# ------------------------------------------------------------------------------ checkpoints and audit


def test_checkpoints_add_list_and_get(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        job = add_job(s)
        repo = CheckpointRepo(s)
        repo.add(job.id, 2, "2" * 64)
        repo.add(job.id, 1, "1" * 64)
    with transaction(sessions) as s:
        repo = CheckpointRepo(s)
        assert [(c.round_number, c.state_key) for c in repo.for_job(job.id)] == [(1, "1" * 64), (2, "2" * 64)]
        assert repo.get(job.id, 2).state_key == "2" * 64
        with pytest.raises(NotFound, match="no checkpoint for round 3"):
            repo.get(job.id, 3)


def test_audit_record_and_list_newest_first_filtered_and_limited(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        job = add_job(s)
        audit = AuditRepo(s)
        audit.record("admin", "one", job.id, n=1)
        audit.record("scheduler", "two")
        audit.record("agent:x", "three", job.id, n=3)
    with transaction(sessions) as s:
        audit = AuditRepo(s)
        assert [e.action for e in audit.list()] == ["three", "two", "one"]
        assert [(e.action, e.details) for e in audit.list(job.id)] == [("three", {"n": 3}), ("one", {"n": 1})]
        assert [e.action for e in audit.list(limit=1)] == ["three"]


# ------------------------------------------------------------------------------ leader lock


def test_leader_lock_is_exclusive_on_postgres_and_trivial_on_sqlite(sessions: Sessions) -> None:
    engine = sessions.kw["bind"]
    first, second = LeaderLock(engine, lock_id=0x7E57), LeaderLock(engine, lock_id=0x7E57)
    try:
        assert first.acquire()
        exclusive = engine.dialect.name == "postgresql"
        assert second.acquire() is not exclusive
        first.release()
        assert second.acquire()
    finally:
        first.release()
        second.release()


# ------------------------------------------------------------------------------ attribution (issue 12)


def test_strikes_quarantine_and_rounds_passing(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        a, _ = add_agent(s, "a")
        b, _ = add_agent(s, "b")
    with transaction(sessions) as s:
        repo = AgentRepo(s)
        assert [repo.strike(a.id, after=2, rounds=2) for _ in range(2)] == [False, True]
        assert repo.strike(b.id, after=2, rounds=2) is False
        assert repo.strike(b.id, after=2, rounds=0) is False  # quarantine off: no strike counted
    with transaction(sessions) as s:
        repo = AgentRepo(s)
        assert repo.quarantined_ids() == {a.id}
        repo.clear_strikes([b.id])
        repo.pass_quarantine_round()
    with transaction(sessions) as s:
        assert (AgentRepo(s).get(a.id).quarantine_rounds, AgentRepo(s).get(b.id).strikes) == (1, 0)
        AgentRepo(s).pass_quarantine_round()
    with transaction(sessions) as s:
        assert AgentRepo(s).quarantined_ids() == set()
        assert AgentRepo(s).get(a.id).quarantine_rounds == 0


def test_quarantine_ends_at_its_wall_time_limit_whatever_rounds_are_left(sessions: Sessions) -> None:
    t0 = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)
    with transaction(sessions) as s:
        a, _ = add_agent(s, "a")
        b, _ = add_agent(s, "b")
        c, _ = add_agent(s, "c")
    with transaction(sessions) as s:
        repo = AgentRepo(s)
        assert repo.strike(a.id, after=1, rounds=5, until=t0 + timedelta(seconds=100))
        assert repo.strike(b.id, after=1, rounds=5, until=t0 + timedelta(seconds=300))
        assert repo.strike(c.id, after=1, rounds=5)  # no wall-time limit
        # a second quarantine while one runs keeps the later limit
        assert repo.strike(b.id, after=1, rounds=2, until=t0 + timedelta(seconds=200))
    with transaction(sessions) as s:
        repo = AgentRepo(s)
        assert repo.expire_quarantines(t0 + timedelta(seconds=99)) == []
        assert repo.expire_quarantines(t0 + timedelta(seconds=100)) == [a.id]
        assert repo.quarantined_ids() == {b.id, c.id}
    with transaction(sessions) as s:
        assert (AgentRepo(s).get(a.id).quarantine_rounds, AgentRepo(s).get(a.id).quarantine_until) == (0, None)
        b_row = AgentRepo(s).get(b.id)
        assert (b_row.quarantine_rounds, b_row.quarantine_until) == (5, t0 + timedelta(seconds=300))
        assert AgentRepo(s).expire_quarantines(t0 + timedelta(days=365)) == [b.id]  # c has no limit
        assert AgentRepo(s).quarantined_ids() == {c.id}


def test_rounds_passing_end_a_quarantine_and_its_limit(sessions: Sessions) -> None:
    until = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)
    with transaction(sessions) as s:
        a, _ = add_agent(s, "a")
        assert AgentRepo(s).strike(a.id, after=1, rounds=1, until=until)
    with transaction(sessions) as s:
        AgentRepo(s).pass_quarantine_round()
    with transaction(sessions) as s:
        agent = AgentRepo(s).get(a.id)
        assert (agent.quarantine_rounds, agent.quarantine_until) == (0, None)
        assert AgentRepo(s).strike(a.id, after=1, rounds=3, until=until)  # a new quarantine
        assert AgentRepo(s).clear_quarantine(a.id) == (0, 3)
        assert AgentRepo(s).get(a.id).quarantine_until is None


def test_withdraw_unmerged_updates_only_from_collecting_rounds(sessions: Sessions) -> None:
    with transaction(sessions) as s:
        j1, j2 = add_job(s), add_job(s)
        a, _ = add_agent(s, "a")
        collecting = open_round(s, j1.id, [a.id])
        aggregating = open_round(s, j2.id, [a.id])
        add_upload(s, collecting, a.id)
        add_upload(s, aggregating, a.id)
        RoundRepo(s).transition(aggregating.id, [RoundState.OPEN], RoundState.AGGREGATING)
        ids = (collecting.id, aggregating.id)
    with transaction(sessions) as s:
        assert RoundRepo(s).withdraw_unmerged_updates(a.id) == [(j1.id, 0, ids[0])]
    with transaction(sessions) as s:
        rounds = RoundRepo(s)
        assert (rounds.update_count(ids[0]), rounds.update_count(ids[1])) == (0, 1)
        assert rounds.get(ids[0]).assignments[0].state is AssignmentState.CANCELLED
