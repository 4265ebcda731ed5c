"""Units of work on both backends: a read-only one does not wait for an open writer (SQLite
takes a deferred BEGIN for it, Postgres readers never wait) and sees the last committed state."""

from __future__ import annotations

import threading
import time

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.orm import Session, sessionmaker

from fedhl.storage.db import alembic_config, make_engine, migrate, session_factory, transaction
from fedhl.storage.models import Base


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


def test_migration_0003_matches_the_models_and_downgrades(database_url: str) -> None:
    """The strikes/quarantine columns: upgrade, the schema equals the models (alembic's own
    comparison), downgrade to 0002 drops them, upgrade again restores them (both backends)."""
    migrate(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert [d for d in diff if "agents" in repr(d)] == []
        command.downgrade(alembic_config(database_url), "0002")
        assert {"strikes", "quarantine_rounds"}.isdisjoint(c["name"] for c in inspect(engine).get_columns("agents"))
        migrate(database_url)
        assert {"strikes", "quarantine_rounds"} <= {c["name"] for c in inspect(engine).get_columns("agents")}
    finally:
        engine.dispose()


def test_migration_0004_adds_the_quarantine_time_limit_and_downgrades(database_url: str) -> None:
    """agents.quarantine_until: the schema equals the models, downgrade to 0003 drops only it."""
    migrate(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert [d for d in diff if "agents" in repr(d)] == []
        command.downgrade(alembic_config(database_url), "0003")
        columns = {c["name"] for c in inspect(engine).get_columns("agents")}
        assert "quarantine_until" not in columns and "quarantine_rounds" in columns
        migrate(database_url)
        assert "quarantine_until" in {c["name"] for c in inspect(engine).get_columns("agents")}
    finally:
        engine.dispose()
