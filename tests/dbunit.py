"""Fixtures for in-process unit tests against a real, migrated database, once per backend of
tests/conftest.py (SQLite and Postgres): no coordinator, no threads, no subprocesses.

Unlike `database_url` (a schema dropped and migrated per test, ~0.3 s on Postgres), each
backend is migrated once per session and emptied before every test, which keeps the unit
suites fast. A test elsewhere that drops the Postgres schema in between is detected (the
alembic version is gone) and the schema is migrated again."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from fedhl.storage.db import alembic_config, make_engine, migrate, session_factory
from fedhl.storage.models import Base

BACKENDS = ["sqlite", "postgres"]  # as tests/conftest.py's DATABASE_BACKENDS


def reset_postgres(engine: Engine) -> None:
    with engine.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE"))
        c.execute(text("CREATE SCHEMA public"))


def fast_engine(url: str) -> Engine:
    """The production engine, minus durability: commits do not wait for the disk (these
    databases are thrown away), which is most of a unit test's time on a busy machine."""
    if not url.startswith("sqlite"):
        return make_engine(url, connect_args={"options": "-c synchronous_commit=off"})
    engine = make_engine(url)

    @event.listens_for(engine, "connect")
    def _no_sync(dbapi_conn: Any, _: Any) -> None:
        dbapi_conn.execute("PRAGMA synchronous=OFF")

    return engine


@pytest.fixture(scope="session", params=BACKENDS)
def unit_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Engine]]:
    """(url, engine) of a database migrated once for the session."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('unit-db') / 'fedhl.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = fast_engine(url)
    try:
        if engine.dialect.name == "postgresql":
            reset_postgres(engine)
        migrate(url)
        yield url, engine
    finally:
        engine.dispose()


@functools.cache
def _head(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def _empty(engine: Engine, url: str, head: str | None) -> None:
    """Every table of the models empty, on a schema at the latest migration."""
    try:
        with engine.connect() as c:
            current = c.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except SQLAlchemyError:
        current = None
    if current != head:
        if engine.dialect.name == "postgresql":
            reset_postgres(engine)
        migrate(url)
    tables = [t.name for t in Base.metadata.sorted_tables]
    with engine.begin() as c:  # DELETE, not TRUNCATE: far cheaper on a handful of rows
        for name in reversed(tables):
            c.execute(text(f"DELETE FROM {name}"))


@pytest.fixture
def sessions(unit_database: tuple[str, Engine]) -> sessionmaker[Session]:
    """A session factory over a migrated, empty database."""
    url, engine = unit_database
    _empty(engine, url, _head(url))
    return session_factory(engine)
