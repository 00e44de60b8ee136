"""The plugin's durable state: one row per Orthanc study it handles, and the change-log cursor.

A small SQLite file (WAL, ``synchronous=FULL``) owned by the Orthanc process.  Every decision the
bridge takes is committed here before it acts on it, so a restart of Orthanc resumes each study where
it stopped.  Study states::

    pending ──(unsent source instances)──▶ sending ──(Orthanc job Success)──▶ waiting ──▶ done
       ▲  └──(nothing unsent, node knows it)──────────────────────────────────▲          │ failed
       │                                     job Failure: backoff ─▶ pending             │ skipped
       └──────────── StableStudy again (new instances, or our SR arrived) ───────────────┘
    ignored: not a spine study (the pre-filter said no) and unknown to the node
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ACTIVE", "Outbox", "StudyRow"]

#: States the bridge keeps polling.
ACTIVE = ("pending", "sending", "waiting", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    orthanc_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    job_id TEXT,
    sent INTEGER NOT NULL DEFAULT 0,
    dirty INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    status TEXT,
    revision INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_due ON studies(state, next_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class StudyRow:
    orthanc_id: str
    state: str
    job_id: str | None
    sent: int
    dirty: bool
    attempts: int
    next_at: float
    status: str | None
    revision: int
    reason: str | None
    updated_at: float


_COLUMNS = "orthanc_id, state, job_id, sent, dirty, attempts, next_at, status, revision, reason, updated_at"


def _row(r: tuple[Any, ...]) -> StudyRow:
    return StudyRow(r[0], r[1], r[2], int(r[3]), bool(r[4]), int(r[5]), float(r[6]), r[7], int(r[8]), r[9],
                    float(r[10]))


class Outbox:
    """The state file.  Safe to use from Orthanc's callback thread and the bridge thread.

    Parameters
    ----------
    path
        The SQLite file; its folder is created.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ cursor
    def cursor(self) -> int | None:
        """The change-log sequence number up to which every change was handled (``None``: never ran)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'changes_cursor'").fetchone()
        return None if row is None else int(row[0])

    def set_cursor(self, seq: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES ('changes_cursor', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(seq),),
            )

    # ------------------------------------------------------------------ studies
    def mark_pending(self, orthanc_id: str, *, at: float | None = None) -> None:
        """A study (re)became stable: look at it again.

        A study whose transfer to the node is in flight keeps its Orthanc job and is only flagged
        ``dirty``: when the job ends it is looked at again instead of waiting for the node.
        """
        now = time.time()
        due = now if at is None else at
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT state FROM studies WHERE orthanc_id = ?",
                                       (orthanc_id,)).fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT INTO studies(orthanc_id, state, next_at, updated_at) "
                        "VALUES (?, 'pending', ?, ?)",
                        (orthanc_id, due, now),
                    )
                elif row[0] == "sending":
                    self._db.execute("UPDATE studies SET dirty = 1, updated_at = ? WHERE orthanc_id = ?",
                                     (now, orthanc_id))
                else:
                    # already pending: keep its attempts (backoff) and the earlier due time
                    sql = (
                        "UPDATE studies SET next_at = MIN(next_at, ?), updated_at = ? WHERE orthanc_id = ?"
                        if row[0] == "pending" else
                        "UPDATE studies SET state = 'pending', attempts = 0, next_at = ?, updated_at = ? "
                        "WHERE orthanc_id = ?"
                    )
                    self._db.execute(sql, (due, now, orthanc_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def update(self, orthanc_id: str, **values: Any) -> None:
        """Set columns of one study (``state``, ``job_id``, ``next_at`` ...)."""
        allowed = set(_COLUMNS.split(", ")) - {"orthanc_id"}
        bad = set(values) - allowed
        if bad:
            raise ValueError(f"unknown column(s): {', '.join(sorted(bad))}")
        values["updated_at"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            self._db.execute(f"UPDATE studies SET {cols} WHERE orthanc_id = ?",
                             (*values.values(), orthanc_id))

    def delete(self, orthanc_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM studies WHERE orthanc_id = ?", (orthanc_id,))

    def get(self, orthanc_id: str) -> StudyRow | None:
        with self._lock:
            r = self._db.execute(f"SELECT {_COLUMNS} FROM studies WHERE orthanc_id = ?",
                                 (orthanc_id,)).fetchone()
        return None if r is None else _row(r)

    def due(self, now: float, limit: int = 100) -> list[StudyRow]:
        """Studies in an active state whose next look is due, oldest first."""
        marks = ",".join("?" * len(ACTIVE))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM studies WHERE state IN ({marks}) AND next_at <= ? "
                "ORDER BY next_at LIMIT ?",
                (*ACTIVE, now, limit),
            ).fetchall()
        return [_row(r) for r in rows]

    def rows(self) -> list[StudyRow]:
        with self._lock:
            return [_row(r) for r in self._db.execute(f"SELECT {_COLUMNS} FROM studies ORDER BY updated_at")]
