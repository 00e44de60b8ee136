"""Consultations: follow-up questions about an analysed study, answered by the worker's model.

``analysis_findings`` keeps each analysis's findings (the model's typed answer as JSON), which every
turn of a consultation carries;
``consultations`` holds one conversation about one job's revision (who opened it, the SR saved from it);
``consult_turns`` is the durable queue of its questions: the web process inserts a ``queued`` turn, the
worker claims it between studies (``answering``), writes the answer's text into the row as it is
generated, and ends it ``answered`` or ``failed``; a turn no worker took within the timeout is ended
``busy`` by the web process.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TABLES = """
CREATE TABLE analysis_findings (
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    findings TEXT NOT NULL,
    PRIMARY KEY (study_uid, revision)
);
CREATE TABLE consultations (
    id {serial} PRIMARY KEY,
    job_id BIGINT NOT NULL REFERENCES jobs(id),
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    created_at {real} NOT NULL,
    saved_uid TEXT
);
CREATE INDEX consultations_job ON consultations(job_id);
CREATE TABLE consult_turns (
    id {serial} PRIMARY KEY,
    consultation_id BIGINT NOT NULL REFERENCES consultations(id),
    seq INTEGER NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    error TEXT,
    asked_by TEXT NOT NULL,
    asked_at {real} NOT NULL,
    started_at {real},
    answered_at {real},
    worker TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    UNIQUE (consultation_id, seq)
);
CREATE INDEX consult_turns_state ON consult_turns(state, id)
"""


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    sql = _TABLES.format(serial="INTEGER" if sqlite else "BIGSERIAL", real="REAL" if sqlite else "DOUBLE PRECISION")
    for statement in sql.split(";"):
        if statement.strip():
            op.execute(statement)
