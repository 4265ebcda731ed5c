"""an index on assignments (agent_id, state): the pending-task check of every PullTask

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_assignments_agent_state", "assignments", ["agent_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_assignments_agent_state", table_name="assignments")
