"""An instance can be excluded from analysis with a reason (undecodable pixels, bad geometry).

The study goes on with the rest; ``jobs show`` and the jobs page list what was left out and why.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE instances ADD COLUMN unusable_reason TEXT")
