"""Shadow mode: agreement of the node's findings with the site's own results.

``shadow_agreement`` holds one row per study (by its pseudonym: the keyed digest the logs use, never the
UID), labelled condition and level: the site's grade, the node's grade (0 normal/mild, 1 moderate,
2 severe), whether they agree, when it was recorded and where the truth came from.  A later truth for the
same study, condition and level replaces the row.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TABLES = """
CREATE TABLE shadow_agreement (
    id {serial} PRIMARY KEY,
    study TEXT NOT NULL,
    revision INTEGER NOT NULL,
    condition TEXT NOT NULL,
    level TEXT NOT NULL,
    truth_grade INTEGER NOT NULL,
    model_grade INTEGER NOT NULL,
    agree INTEGER NOT NULL,
    recorded_at {real} NOT NULL,
    source TEXT NOT NULL,
    UNIQUE (study, condition, level)
);
CREATE INDEX shadow_agreement_time ON shadow_agreement(recorded_at)
"""


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    sql = _TABLES.format(serial="INTEGER" if sqlite else "BIGSERIAL", real="REAL" if sqlite else "DOUBLE PRECISION")
    for statement in sql.split(";"):
        if statement.strip():
            op.execute(statement)
