"""The job store on PostgreSQL, for several nodes sharing one queue (``[store] url = "postgresql://..."``).

The state machine is :class:`dicom_node.jobs.machine.SQLJobStore`, the same as SQLite's (the same contract
tests run against both); only the dialect lives here.  What differs:

* every read-modify-write locks the job row (``SELECT … FOR UPDATE``); the worker's :meth:`claim` and the
  completeness check use ``FOR UPDATE SKIP LOCKED``, so N workers on M hosts each lease a different job
  and never wait on each other;
* a job's ``timings`` are ``jsonb``; the schema is brought to the head revision when the store opens
  (:mod:`dicom_node.jobs.schema`, under an advisory lock: several nodes may start at once);
* each thread has its own connection (autocommit, explicit transactions); a broken connection is
  replaced on the next call and the failed call raises :class:`~dicom_node.errors.StoreError`.

Spool paths in ``instances`` are local to the node that received the instance: in a cluster the
spool (``node.data_dir``) must be shared storage, or each node's worker must run on that node — see
``docs/scaling.md``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from dicom_node.errors import StoreError
from dicom_node.jobs.machine import Cursor, SQLJobStore
from dicom_node.jobs.schema import upgrade_postgres

__all__ = ["PostgresJobStore"]


def _redact(url: str) -> str:
    return re.sub(r"://([^/@:]*):[^/@]*@", r"://\1:***@", url)


class PostgresJobStore(SQLJobStore):
    """:class:`~dicom_node.jobs.model.JobStore` on PostgreSQL (psycopg 3).

    Parameters
    ----------
    url
        A libpq connection URL, e.g. ``postgresql://spinemed@db.example.org:5432/spinemed``.
    password_env
        Name of an environment variable holding the password (keeps it out of the config file).
    connect_timeout_s
        How long a connection attempt may take.

    Raises
    ------
    StoreError
        The server cannot be reached or the schema cannot be brought up to date.
    """

    param = "%s"
    lock_row = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    seconds_between = "(timings->>'{b}')::float8 - (timings->>'{a}')::float8"

    def __init__(self, url: str, *, password_env: str | None = None, connect_timeout_s: float = 10.0) -> None:
        self.url = url
        self._kwargs: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout_s)), "autocommit": True}
        if password_env:
            password = os.environ.get(password_env)
            if password is None:
                raise StoreError(f"store.password_env: environment variable {password_env} is not set")
            self._kwargs["password"] = password
        self._local = threading.local()
        self._all: list[psycopg.Connection[tuple[Any, ...]]] = []
        self._lock = threading.Lock()
        self._conn()  # fail early, with the store's own message, when the server cannot be reached
        upgrade_postgres(url, password=self._kwargs.get("password"), connect_timeout_s=self._kwargs["connect_timeout"],
                         where=_redact(url))

    def __repr__(self) -> str:
        return f"PostgresJobStore({_redact(self.url)!r})"

    def _conn(self) -> psycopg.Connection[tuple[Any, ...]]:
        db: psycopg.Connection[tuple[Any, ...]] | None = getattr(self._local, "db", None)
        if db is not None and (db.closed or db.broken):
            with self._lock:
                if db in self._all:
                    self._all.remove(db)
            db = None
        if db is None:
            try:
                db = psycopg.connect(self.url, **self._kwargs)
            except psycopg.Error as exc:
                raise StoreError(f"job store {_redact(self.url)}: cannot connect: {exc}") from exc
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    @contextmanager
    def _tx(self) -> Iterator[Cursor]:
        db = self._conn()
        try:
            with db.transaction(), db.cursor() as cur:
                yield cur
        except psycopg.OperationalError as exc:
            raise StoreError(f"job store {_redact(self.url)}: {exc}") from exc

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        db = self._conn()
        try:
            with db.cursor() as cur:
                yield cur
        except psycopg.OperationalError as exc:
            raise StoreError(f"job store {_redact(self.url)}: {exc}") from exc

    def _json(self, value: dict[str, float]) -> Jsonb:
        return Jsonb(value)

    def schema_version(self) -> str | None:
        """The schema revision of the database (``None`` before the first upgrade)."""
        rows = self._rows("SELECT version_num FROM alembic_version")
        return str(rows[0][0]) if rows else None

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()
