"""The job store on one SQLite file: WAL, ``synchronous=FULL`` (a committed instance survives power loss).

Only the dialect lives here; the state machine is :class:`dicom_node.jobs.machine.SQLJobStore`.  Every
transaction is ``BEGIN IMMEDIATE``: it takes the file's write lock at once, so concurrent workers and the
receiver (threads or processes) serialise instead of deadlocking on a lock upgrade.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicom_node.errors import StoreError
from dicom_node.jobs.machine import Cursor, SQLJobStore
from dicom_node.jobs.schema import upgrade_sqlite

__all__ = ["SQLiteJobStore"]


class SQLiteJobStore(SQLJobStore):
    """:class:`~dicom_node.jobs.model.JobStore` on one SQLite file, safe across threads and processes.

    Parameters
    ----------
    path
        The database file; its folder is created, and its schema brought to the head revision.
    busy_timeout_s
        How long a writer waits for another process's transaction.
    """

    param = "?"
    seconds_between = "json_extract(timings, '$.{b}') - json_extract(timings, '$.{a}')"

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        if not isinstance(path, str | Path):
            raise TypeError("path: expected str or Path")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._conn()  # WAL before the first write, so the migration runs in WAL mode too
        upgrade_sqlite(self.path, busy_timeout_s=busy_timeout_s)

    def _conn(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_ms / 1000,
                                 check_same_thread=False)
            self._enable_wal(db)
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    def _enable_wal(self, db: sqlite3.Connection) -> None:
        """Put the file in WAL mode, waiting out another connection that is doing the same.

        Switching a new file's journal mode takes an exclusive lock, and SQLite answers ``SQLITE_BUSY`` at
        once, without its busy handler, when another connection holds one (receiver and worker starting
        together on a new file).  So the switch is retried here, for up to the busy timeout.
        """
        deadline = time.monotonic() + self._busy_ms / 1000
        delay = 0.005
        while True:
            try:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise StoreError(f"job store {self.path}: cannot enable WAL: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise StoreError(f"job store {self.path}: cannot enable WAL within "
                                     f"{self._busy_ms / 1000:g} s: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            if str(mode).lower() != "wal":
                raise StoreError(f"job store {self.path}: the file system does not allow WAL (journal mode {mode})")
            return

    @contextmanager
    def _tx(self) -> Iterator[Cursor]:
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"job store {self.path}: cannot begin a transaction: {exc}") from exc
        try:
            yield db.cursor()
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        yield self._conn().cursor()

    def _json(self, value: dict[str, float]) -> str:
        return json.dumps(value)

    def schema_version(self) -> str | None:
        """The schema revision of the file (``None`` before the first upgrade)."""
        try:
            row = self._conn().execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:
            return None
        return str(row[0]) if row else None

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()
