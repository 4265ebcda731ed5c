"""The server paces agents over real gRPC: the heartbeat reply carries the interval (a third of
the liveness TTL for an agent with a task; twice the long-poll for an idle one, which its open
long-poll keeps alive) and an empty pull says how long to wait; the client keeps both, and a
task past its round's deadline reads as expired."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from fedhl.agent.client import DEFAULT_HEARTBEAT_INTERVAL_S, AgentClient, Task
from fedhl.storage.db import transaction
from fedhl.storage.repos import AgentRepo
from stack import running, settings_for


def test_heartbeat_interval_and_retry_after_reach_the_client(tmp_path: Path) -> None:
    settings = settings_for("sqlite+inprocess", tmp_path, heartbeat_ttl_s=6.0)
    with running(settings) as c:
        with transaction(c.deps.sessions) as s:
            tok, _ = AgentRepo(s).create_token("test", 1, None)
        client = AgentClient(f"127.0.0.1:{c.grpc_port}")
        try:
            client.register(tok, "a")
            assert client.heartbeat_interval_s == DEFAULT_HEARTBEAT_INTERVAL_S
            assert client.heartbeat() == "CONTINUE"
            assert client.heartbeat_interval_s == 10.0  # idle: twice the 5 s long-poll (settings_for)
            assert client.heartbeat(task_id="no-such-task") == "CANCEL_TASK"
            assert client.heartbeat_interval_s == 2.0  # with a task: 6 s TTL / 3
            assert client.heartbeat() == "CONTINUE"  # idle again (answered without a query)
            assert client.heartbeat_interval_s == 10.0
            assert client.pull_task(wait_s=0) is None
            assert client.retry_after_s == 1.0  # a zero-wait poller is paced
            assert client.pull_task(wait_s=1) is None
            assert client.retry_after_s == 0.0  # after a long poll: pull again at once
        finally:
            client.close()


def test_task_expiry_follows_its_deadline() -> None:
    now_ms = int(time.time() * 1000)
    task = Task("t", "j", 0, {}, "fedhl", 8.0, "alpha/r", [], "m", "", "classification", {}, now_ms + 60_000)
    assert not task.expired
    assert dataclasses.replace(task, deadline_unix_ms=now_ms - 1).expired
    assert not dataclasses.replace(task, deadline_unix_ms=0).expired  # no deadline given
