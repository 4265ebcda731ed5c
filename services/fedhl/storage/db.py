"""Engines, sessions and migrations. Migrations are an explicit step (`fedhl migrate`), run
before services start; services refuse to run on a schema that is not at head."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")
READ_ONLY = "fedhl_read_only"  # execution option: this unit of work only reads
# A pooled connection idle longer than this is pinged before use (a restarted Postgres closed
# it); one in steady use is not: a ping per checkout was a round trip per unit of work.
PING_IDLE_S = 1.0


def normalise_url(url: str) -> str:
    """`postgresql://` → the psycopg 3 driver; relative SQLite paths stay relative."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def make_engine(url: str, *, connect_timeout_s: float = 5.0, statement_timeout_s: float = 30.0, **kw: Any) -> Engine:
    """An engine whose every call is bounded: Postgres gets a connect timeout and a server-side
    `statement_timeout` (a hung query fails with QueryCanceled instead of holding a request
    thread; 0 disables it), SQLite a busy timeout. A pool checkout waits at most `connect_timeout_s` too."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kw)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            # pysqlite would run SELECTs outside any transaction (it only BEGINs before DML), so
            # two reads in one unit of work could see different commits; take control of BEGIN.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")  # readers don't block the single writer
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front: every unit of work that may write is
            # serialised, which is what Postgres's row locks (SELECT ... FOR UPDATE) give the same
            # code there. A read-only unit of work takes a deferred BEGIN: in WAL mode it reads one
            # snapshot without waiting for (or blocking) the writer.
            read_only = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    if "poolclass" not in kw:
        kw.update(pool_size=20, max_overflow=20, pool_timeout=max(connect_timeout_s, 1.0))
    # a bounded connect timeout, so /readyz and startup fail fast when Postgres is away
    connect_args = {"connect_timeout": max(1, math.ceil(connect_timeout_s)), **kw.pop("connect_args", {})}
    if statement_timeout_s > 0:  # 0: none (migrations)
        timeout = f"-c statement_timeout={math.ceil(statement_timeout_s * 1000)}"
        connect_args["options"] = f"{timeout} {connect_args['options']}" if "options" in connect_args else timeout
    engine = create_engine(url, connect_args=connect_args, **kw)

    @event.listens_for(engine, "checkin")
    def _idle_from(_: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _: Any) -> None:
        # pool_pre_ping's check, only for a connection that sat in the pool: raising
        # DisconnectionError makes the pool drop it and hand out a fresh one. A connection the
        # server closed while in steady use fails its statement once; that error invalidates
        # the whole pool (SQLAlchemy's disconnect handling), so the next checkouts reconnect.
        since = record.info.get("idle_since")
        if since is not None and time.monotonic() - since > PING_IDLE_S:
            try:
                alive = engine.dialect.do_ping(dbapi_conn)
            except Exception as e:  # any failure means the connection is gone
                raise exc.DisconnectionError(f"pooled connection failed its ping: {e}") from e
            if not alive:
                raise exc.DisconnectionError("pooled connection failed its ping")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session], *, read_only: bool = False) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error.

    `read_only=True` (the unit of work does not write): on SQLite a deferred BEGIN, so the many
    authentication and lookup reads of agent RPCs do not queue behind the write lock. On
    Postgres the reads run in autocommit: at READ COMMITTED every statement takes its own
    snapshot inside a transaction too, so BEGIN and COMMIT bought nothing but two round trips
    per unit of work (`SET TRANSACTION READ ONLY` would cost one more: measured slower in
    bench/control_plane.py)."""
    with factory() as session, session.begin():
        if read_only:
            options: dict[str, Any] = {READ_ONLY: True}
            if session.get_bind().dialect.name == "postgresql":
                options["isolation_level"] = "AUTOCOMMIT"
            session.connection(execution_options=options)
        yield session


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def schema_is_current(engine: Engine) -> bool:
    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() == head
