"""Read-only view of the node's job store (``<data_dir>/jobs.sqlite3``) for the plugin.

The plugin never writes the node's database: it opens it with ``mode=ro`` and reads three things per
study — the job (state, revision, reason), the SOP Instance UIDs the node has received, and the SOP
Instance UIDs the node wrote (our results).  Standard library only.

In WAL mode a read-only reader needs the ``-wal`` and ``-shm`` files to exist (the node creates them)
and to be readable by the Orthanc user; ``docs/orthanc.md`` gives the permissions.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NodeJob", "NodeJobStore", "NodeStoreUnavailable"]


class NodeStoreUnavailable(RuntimeError):
    """The node's job store cannot be read (missing, permissions, locked too long)."""


@dataclass(frozen=True)
class NodeJob:
    state: str
    revision: int
    reason: str | None
    pending_update: bool


class NodeJobStore:
    """Read-only queries on the node's job store.

    Parameters
    ----------
    path
        The node's ``jobs.sqlite3``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            if not self.path.is_file():
                raise NodeStoreUnavailable(f"node job store {self.path} does not exist (node not started?)")
            try:
                db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10,
                                     check_same_thread=False)
                db.execute("PRAGMA query_only = ON")
            except sqlite3.Error as exc:
                raise NodeStoreUnavailable(f"node job store {self.path}: {exc}") from exc
            self._db = db
        return self._db

    def _query(self, sql: str, args: tuple[str, ...]) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return list(self._conn().execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                if self._db is not None:
                    self._db.close()
                    self._db = None
                raise NodeStoreUnavailable(f"node job store {self.path}: {exc}") from exc

    def job(self, study_uid: str) -> NodeJob | None:
        """The node's job for a study, ``None`` when the node never received it."""
        rows = self._query("SELECT state, revision, reason, pending_update FROM jobs WHERE study_uid = ?",
                           (study_uid,))
        if not rows:
            return None
        state, revision, reason, pending = rows[0]
        return NodeJob(str(state), int(revision), None if reason is None else str(reason), bool(pending))  # type: ignore[call-overload]

    def received(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs of the study that the node has durably received."""
        return {str(r[0]) for r in self._query("SELECT sop_instance_uid FROM instances WHERE study_uid = ?",
                                               (study_uid,))}

    def outputs(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs the node wrote for the study (every revision)."""
        return {str(r[0]) for r in self._query("SELECT sop_instance_uid FROM outputs WHERE study_uid = ?",
                                               (study_uid,))}

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
