"""Alembic environment: the URL comes from the Config built in fedhl.storage.db."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from fedhl.storage.db import make_engine
from fedhl.storage.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    # no statement_timeout: a migration may rewrite a large table
    engine = (
        make_engine(url, poolclass=pool.NullPool, statement_timeout_s=0)
        if not url.startswith("sqlite")
        else make_engine(url)
    )
    with engine.connect() as connection:
        # render_as_batch: SQLite cannot ALTER most things; batch mode recreates tables
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
