"""Every backend call is bounded: a slow Postgres query is cancelled at the configured
statement_timeout, a Redis server that stops answering (its process paused) fails the call
at the socket timeout, each with an error that says so."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from fedhl.settings import Settings
from fedhl.storage.db import make_engine
from private_backends import PrivateRedis


def test_a_slow_query_is_cancelled_at_the_statement_timeout(postgres_url: str) -> None:
    engine = make_engine(postgres_url, statement_timeout_s=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(OperationalError, match="statement timeout"), engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(5)"))
        assert time.monotonic() - t0 < 3
    finally:
        engine.dispose()


def test_a_hung_redis_fails_the_call_at_the_socket_timeout() -> None:
    server = PrivateRedis()
    server.start()
    coord = Settings(redis_url=server.url, redis_socket_timeout_s=1.5).coordination()
    try:
        coord.liveness.beat("a", 5.0)  # connected
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)  # accepts nothing, answers nothing
        t0 = time.monotonic()
        with pytest.raises(redis.TimeoutError, match="Timeout"):
            coord.liveness.alive(["a"])
        assert time.monotonic() - t0 < 4
        assert coord.ping() is False
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        coord.close()
        server.stop()
