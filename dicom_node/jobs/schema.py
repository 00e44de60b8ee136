"""The job store's schema version and its migrations (Alembic), applied when a store opens.

Each revision in :mod:`dicom_node.jobs.migrations.versions` is written for both dialects.  The version
is kept in Alembic's ``alembic_version`` table.  A database made before versioning (no such table) is
adopted by the baseline revision, whose statements are all ``IF NOT EXISTS``.

Several processes may open the store at once (the receiver and the worker; several nodes on one
PostgreSQL): the upgrade runs in one transaction that first takes the database's migration lock —
``BEGIN IMMEDIATE`` on SQLite, an advisory transaction lock on PostgreSQL — so one process migrates and
the others then find the schema at head.  Alembic (with SQLAlchemy only as its connection layer) is used
for this and for nothing else; the stores talk to ``sqlite3`` and psycopg directly.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from dicom_node.errors import StoreError

__all__ = ["MIGRATIONS_DIR", "head_revision", "upgrade_postgres", "upgrade_sqlite"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x5350494E454D4544 & 0x7FFFFFFFFFFFFFFF  # "SPINEMED": the advisory lock of the upgrade
#: Alembic keeps the running migration's context in module globals (``alembic.context``, ``alembic.op``):
#: two threads of one process must not upgrade at once.  Processes are kept apart by the database's lock.
_THREAD_LOCK = threading.Lock()


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """The newest schema revision this version of the node knows."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def _upgrade(engine: sa.Engine, lock: Any, where: str) -> None:
    cfg = _config()
    try:
        with _THREAD_LOCK, engine.begin() as conn:
            if lock is not None:
                conn.execute(lock)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except sa.exc.SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        raise StoreError(f"job store {where}: schema upgrade failed: {type(cause).__name__}: {cause}") from exc
    finally:
        engine.dispose()


def upgrade_sqlite(path: Path, *, busy_timeout_s: float = 30.0) -> None:
    """Bring the SQLite job store at ``path`` to the head revision (``BEGIN IMMEDIATE`` serialises processes)."""
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": busy_timeout_s}, poolclass=sa.NullPool)

    @sa.event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # the transaction below is ours, DDL included

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    _upgrade(engine, None, str(path))


def upgrade_postgres(url: str, *, password: str | None, connect_timeout_s: int, where: str) -> None:
    """Bring the PostgreSQL job store at ``url`` to the head revision, under an advisory lock."""
    sa_url = sa.engine.make_url(url)
    sa_url = sa_url.set(drivername="postgresql+psycopg")
    args: dict[str, Any] = {"connect_timeout": connect_timeout_s}
    if password is not None:
        args["password"] = password
    engine = sa.create_engine(sa_url, connect_args=args, poolclass=sa.NullPool)
    _upgrade(engine, sa.text(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})"), where)
