"""Shared fixtures: a coordinator's storage over each database backend.

`database_url` runs a test once per backend: SQLite (a file under tmp_path) and Postgres
(FEDHL_TEST_DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/test, its `public`
schema dropped and recreated before each test). An unreachable Postgres fails the tests
rather than skipping them, so a CI job without it cannot pass by testing nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from fedhl.coordinator.app import Coordinator
from fedhl.settings import DEV_ADMIN_TOKEN, Settings
from fedhl.storage.db import make_engine

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DATABASE_BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def postgres_url() -> str:
    url = os.environ.get("FEDHL_TEST_DATABASE_URL", DEFAULT_POSTGRES_URL)
    engine = make_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:
        pytest.fail(
            f"Postgres at {url} is unreachable ({e}). These suites run against a real Postgres: "
            "start one or point FEDHL_TEST_DATABASE_URL at one.",
            pytrace=False,
        )
    finally:
        engine.dispose()
    return url


def reset_postgres(url: str) -> None:
    """An empty `public` schema: no tables, no alembic version."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


@pytest.fixture(params=DATABASE_BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend (migrations not yet applied)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fedhl.db'}"
    url: str = request.getfixturevalue("postgres_url")
    reset_postgres(url)
    return url


@pytest.fixture
def coordinator(database_url: str, tmp_path: Path) -> Iterator[Coordinator]:
    """A migrated coordinator (development admin token, in-process coordination, file blobs)
    whose threads are not started: tests drive its services directly."""
    settings = Settings(
        env="development",
        admin_token=DEV_ADMIN_TOKEN,
        database_url=database_url,
        blob_url=f"file://{tmp_path / 'blobs'}",
        redis_url=None,
    )
    c = Coordinator.from_settings(settings, auto_migrate=True)
    try:
        yield c
    finally:
        c.shutdown(grace_s=1.0)
