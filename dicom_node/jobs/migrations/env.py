"""Alembic environment: the node hands in an open connection (see :func:`dicom_node.jobs.schema.upgrade`)."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
