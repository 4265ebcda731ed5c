"""round inputs and shards

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

import fedhl.storage.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "round_shards",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("round_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("blob_key", sa.String(length=64), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("created_at", fedhl.storage.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["rounds.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("round_id", "shard"),
    )
    with op.batch_alter_table("round_shards", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_round_shards_round_id"), ["round_id"], unique=False)

    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("input_state_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("input_plan_key", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column(
                "start_keys",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
                nullable=False,
                server_default="{}",
            )
        )
        batch_op.add_column(sa.Column("shards", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.drop_column("shards")
        batch_op.drop_column("start_keys")
        batch_op.drop_column("input_plan_key")
        batch_op.drop_column("input_state_key")

    with op.batch_alter_table("round_shards", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_round_shards_round_id"))

    op.drop_table("round_shards")
