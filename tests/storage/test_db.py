"""Units of work on both backends: a read-only one does not wait for an open writer (SQLite
takes a deferred BEGIN for it, Postgres readers never wait) and sees the last committed state."""

from __future__ import annotations

import threading
import time

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from fedhl.storage.db import make_engine, session_factory, transaction


def _setup(database_url: str) -> tuple[Engine, sessionmaker[Session]]:
    engine = make_engine(database_url)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t (x INTEGER)"))
        c.execute(text("INSERT INTO t VALUES (1)"))
    return engine, session_factory(engine)


def test_a_read_only_unit_of_work_reads_the_committed_state(database_url: str) -> None:
    engine, sessions = _setup(database_url)
    try:
        with transaction(sessions) as s:
            s.execute(text("UPDATE t SET x = 2"))
        with transaction(sessions, read_only=True) as s:
            assert s.execute(text("SELECT x FROM t")).scalar_one() == 2
    finally:
        engine.dispose()


def test_a_read_only_unit_of_work_does_not_wait_for_an_open_writer(database_url: str) -> None:
    engine, sessions = _setup(database_url)
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:
        with transaction(sessions) as s:
            s.execute(text("UPDATE t SET x = 3"))  # uncommitted while the reader runs
            holding.set()
            release.wait(10)

    th = threading.Thread(target=writer)
    th.start()
    try:
        assert holding.wait(10)
        t0 = time.monotonic()
        with transaction(sessions, read_only=True) as s:
            assert s.execute(text("SELECT x FROM t")).scalar_one() == 1  # the snapshot before the writer
        assert time.monotonic() - t0 < 1.0
    finally:
        release.set()
        th.join(10)
        engine.dispose()
    with transaction(sessions, read_only=True) as s:
        assert s.execute(text("SELECT x FROM t")).scalar_one() == 3
