"""Open the job store the configuration selects."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicom_node.jobs.model import JobStore
from dicom_node.jobs.sqlite import SQLiteJobStore

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig

__all__ = ["open_store"]


def open_store(config: NodeConfig) -> JobStore:
    """The job store ``[store]`` selects: PostgreSQL for a ``url``, else SQLite in ``node.data_dir``.

    Either way its schema is brought to the head revision first (:mod:`dicom_node.jobs.schema`).
    """
    if config.store.url:
        from dicom_node.jobs.postgres import PostgresJobStore  # psycopg only where PostgreSQL is used

        return PostgresJobStore(config.store.url, password_env=config.store.password_env)
    return SQLiteJobStore(config.db_path)
