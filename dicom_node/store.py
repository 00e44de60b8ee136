"""The durable job store: one job per study, explicit states, every change committed before use.

States::

    receiving ──quiet/force──▶ complete ──claim──▶ inferring ──▶ reporting ──▶ exporting ──▶ done
                                   ▲                    │              │            │
                                   └── retry / lease ───┴──────────────┘            ├─▶ failed (reason)
    skipped (reason)   new instance after done/skipped/failed ──▶ receiving (next revision)

:class:`JobStore` is the interface the node uses; :class:`SQLiteJobStore` implements it on SQLite
in WAL mode with ``synchronous=FULL`` (a committed instance survives power loss).  A PostgreSQL
implementation can stand behind the same interface for several nodes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dicom_node.errors import JobNotFoundError, StoreError

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig

__all__ = [
    "ACTIVE_STATES",
    "JOB_COLUMNS",
    "Delivery",
    "InstanceRecord",
    "Job",
    "JobState",
    "JobStore",
    "JobStoreReads",
    "OpsStats",
    "OutputRecord",
    "SQLiteJobStore",
    "job_from_row",
    "open_store",
]


class JobState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    INFERRING = "inferring"
    REPORTING = "reporting"
    EXPORTING = "exporting"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


#: States in which the worker owns the job.
ACTIVE_STATES = frozenset({JobState.INFERRING, JobState.REPORTING, JobState.EXPORTING})
_FINAL = frozenset({JobState.DONE, JobState.SKIPPED, JobState.FAILED})


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str
    series_description: str
    path: str
    transfer_syntax_uid: str
    size: int
    calling_ae: str
    received_at: float


@dataclass(frozen=True)
class Job:
    id: int
    study_instance_uid: str
    state: JobState
    revision: int
    attempts: int
    reason: str | None
    source: str
    instance_count: int
    first_received_at: float | None
    last_received_at: float | None
    completed_at: float | None
    created_at: float
    updated_at: float
    next_attempt_at: float | None
    lease_owner: str | None
    lease_until: float | None
    pending_update: bool
    timings: dict[str, float]


@dataclass(frozen=True)
class OutputRecord:
    sop_instance_uid: str
    study_instance_uid: str
    revision: int
    kind: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class Delivery:
    output_uid: str
    destination: str
    state: str
    attempts: int
    last_status: str | None
    last_error: str | None
    next_attempt_at: float | None
    delivered_at: float | None


@dataclass(frozen=True)
class OpsStats:
    """Aggregates for ``/metrics``, read from the store so every process (and node) sees the same numbers."""

    counts: dict[str, int]
    inference_seconds: list[float]  # per analysed job: reporting - inferring of its latest analysis
    delivery_attempts: int  # every C-STORE/STOW attempt recorded
    delivery_failed_attempts: int  # attempts that did not deliver (each one led to a retry or a give-up)
    deliveries_failed: int  # deliveries that ran out of attempts
    deliveries_delivered: int


class JobStore(Protocol):
    """What the receiver, the scheduler and the worker need from durable storage."""

    def record_instance(self, rec: InstanceRecord, *, source: str = "dicom") -> bool: ...
    def record_instances(self, recs: Sequence[InstanceRecord], *, source: str = "dicom") -> list[bool]: ...
    def instance_paths(self) -> set[str]: ...
    def complete_due(
        self, now: float, quiet_s: float, force_s: float, required_series: Sequence[str] = ()
    ) -> list[Job]: ...
    def restart_quiet_timers(self, now: float) -> int: ...
    def claim(self, owner: str, now: float, lease_s: float) -> Job | None: ...
    def transition(self, job_id: int, owner: str, to: JobState, *, reason: str | None = None) -> Job: ...
    def release(self, job_id: int, owner: str) -> None: ...
    def finish_report(
        self,
        job_id: int,
        owner: str,
        revision: int,
        outputs: Sequence[OutputRecord],
        destinations: Sequence[str],
    ) -> Job: ...
    def get(self, job_id: int) -> Job: ...
    def by_study(self, study_uid: str) -> Job: ...
    def jobs(self, states: Sequence[JobState] = ()) -> list[Job]: ...
    def instances(self, study_uid: str) -> list[InstanceRecord]: ...
    def outputs(self, study_uid: str, revision: int | None = None) -> list[OutputRecord]: ...
    def deliveries(self, study_uid: str, revision: int | None = None) -> list[Delivery]: ...
    def record_delivery(
        self,
        output_uid: str,
        destination: str,
        ok: bool,
        status: str | None,
        error: str | None,
        next_attempt_at: float | None,
        give_up: bool,
    ) -> None: ...
    def set_next_attempt(self, job_id: int, owner: str, at: float) -> None: ...
    def force_release(self, job_id: int) -> None: ...
    def retry(self, job_id: int) -> Job: ...
    def counts(self) -> dict[str, int]: ...
    def events(self, study_uid: str) -> list[dict[str, Any]]: ...
    def ops_stats(self) -> OpsStats: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    source TEXT NOT NULL DEFAULT 'dicom',
    instance_count INTEGER NOT NULL DEFAULT 0,
    first_received_at REAL,
    last_received_at REAL,
    completed_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    next_attempt_at REAL,
    lease_owner TEXT,
    lease_until REAL,
    pending_update INTEGER NOT NULL DEFAULT 0,
    timings TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    series_description TEXT NOT NULL,
    path TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS outputs (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    kind TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outputs_study ON outputs(study_uid, revision);
CREATE TABLE IF NOT EXISTS deliveries (
    output_uid TEXT NOT NULL REFERENCES outputs(sop_instance_uid),
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status TEXT,
    last_error TEXT,
    next_attempt_at REAL,
    delivered_at REAL,
    PRIMARY KEY (output_uid, destination)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_study ON events(study_uid);
"""

JOB_COLUMNS = (
    "id, study_uid, state, revision, attempts, reason, source, instance_count, first_received_at, "
    "last_received_at, completed_at, created_at, updated_at, next_attempt_at, lease_owner, lease_until, "
    "pending_update, timings"
)


def job_from_row(row: Sequence[Any]) -> Job:
    """A ``jobs`` row (:data:`JOB_COLUMNS`) as a :class:`Job`; ``timings`` is JSON text (SQLite) or already
    decoded (PostgreSQL's ``jsonb``)."""
    r = tuple(row)
    timings = json.loads(r[17]) if isinstance(r[17], str | bytes) else r[17]
    return Job(
        id=int(r[0]),
        study_instance_uid=r[1],
        state=JobState(r[2]),
        revision=r[3],
        attempts=r[4],
        reason=r[5],
        source=r[6],
        instance_count=r[7],
        first_received_at=r[8],
        last_received_at=r[9],
        completed_at=r[10],
        created_at=r[11],
        updated_at=r[12],
        next_attempt_at=r[13],
        lease_owner=r[14],
        lease_until=r[15],
        pending_update=bool(r[16]),
        timings={str(k): float(v) for k, v in (timings or {}).items()},
    )


class JobStoreReads:
    """The reading half of :class:`JobStore`, the same SQL for every driver.

    A store implements :meth:`_rows` (``?`` marks each parameter; a driver with another style replaces it);
    what needs a dialect of its own (``ops_stats``) and every write stay in the store.
    """

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        return {str(s): int(n) for s, n in self._rows("SELECT state, COUNT(*) FROM jobs GROUP BY state")}

    def get(self, job_id: int) -> Job:
        rows = self._rows(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFoundError(job_id)
        return job_from_row(rows[0])

    def by_study(self, study_uid: str) -> Job:
        rows = self._rows(f"SELECT {JOB_COLUMNS} FROM jobs WHERE study_uid = ?", (study_uid,))
        if not rows:
            raise JobNotFoundError(study_uid)
        return job_from_row(rows[0])

    def jobs(self, states: Sequence[JobState] = ()) -> list[Job]:
        if states:
            marks = ",".join("?" * len(states))
            rows = self._rows(f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY id",
                              tuple(str(s) for s in states))
        else:
            rows = self._rows(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY id")
        return [job_from_row(r) for r in rows]

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        rows = self._rows("SELECT * FROM instances WHERE study_uid = ? ORDER BY received_at, sop_instance_uid",
                          (study_uid,))
        return [InstanceRecord(*r) for r in rows]

    def outputs(self, study_uid: str, revision: int | None = None) -> list[OutputRecord]:
        sql = ("SELECT sop_instance_uid, study_uid, revision, kind, sop_class_uid, path FROM outputs "
               "WHERE study_uid = ?")
        if revision is None:
            rows = self._rows(sql + " ORDER BY revision, kind", (study_uid,))
        else:
            rows = self._rows(sql + " AND revision = ? ORDER BY kind", (study_uid, revision))
        return [OutputRecord(*r) for r in rows]

    def deliveries(self, study_uid: str, revision: int | None = None) -> list[Delivery]:
        sql = (
            "SELECT d.output_uid, d.destination, d.state, d.attempts, d.last_status, d.last_error, "
            "d.next_attempt_at, d.delivered_at FROM deliveries d JOIN outputs o ON o.sop_instance_uid = d.output_uid "
            "WHERE o.study_uid = ?"
        )
        args: tuple[Any, ...] = (study_uid,)
        if revision is not None:
            sql += " AND o.revision = ?"
            args += (revision,)
        return [Delivery(*r) for r in self._rows(sql + " ORDER BY d.output_uid, d.destination", args)]

    def events(self, study_uid: str) -> list[dict[str, Any]]:
        rows = self._rows("SELECT at, from_state, to_state, detail FROM events WHERE study_uid = ? ORDER BY id",
                          (study_uid,))
        return [{"at": r[0], "from": r[1], "to": r[2], "detail": r[3]} for r in rows]


class SQLiteJobStore(JobStoreReads):
    """:class:`JobStore` on one SQLite file (WAL, ``synchronous=FULL``), safe across threads and processes.

    Parameters
    ----------
    path
        The database file; its folder is created.
    busy_timeout_s
        How long a writer waits for another process's transaction.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        if not isinstance(path, str | Path):
            raise TypeError("path: expected str or Path")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._conn().executescript(_SCHEMA)

    # ------------------------------------------------------------------ connections / transactions
    def _conn(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                self.path, isolation_level=None, timeout=self._busy_ms / 1000, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"job store {self.path}: cannot begin a transaction: {exc}") from exc
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()

    @staticmethod
    def _event(db: sqlite3.Connection, study_uid: str, frm: str | None, to: str, detail: str | None) -> None:
        db.execute(
            "INSERT INTO events(study_uid, at, from_state, to_state, detail) VALUES (?,?,?,?,?)",
            (study_uid, time.time(), frm, to, detail),
        )

    def _fetch_job(self, db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> Job | None:
        row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where}", args).fetchone()
        return job_from_row(row) if row else None

    # ------------------------------------------------------------------ receiving
    def record_instance(self, rec: InstanceRecord, *, source: str = "dicom") -> bool:
        """Record a durably spooled instance; create or re-open its study's job.

        Returns ``False`` when the SOP Instance UID was already recorded (a resend) or is one of our own
        results coming back (a routing loop): nothing changes.
        """
        return self.record_instances([rec], source=source)[0]

    def record_instances(self, recs: Sequence[InstanceRecord], *, source: str = "dicom") -> list[bool]:
        """:meth:`record_instance` for several instances in one transaction (group commit)."""
        now = time.time()
        with self._tx() as db:
            return [self._record_one(db, rec, source, now) for rec in recs]

    def instance_paths(self) -> set[str]:
        """The spool paths of every recorded instance (for reconciling the spool after a crash)."""
        return {p for (p,) in self._conn().execute("SELECT path FROM instances")}

    def _record_one(self, db: sqlite3.Connection, rec: InstanceRecord, source: str, now: float) -> bool:
        if db.execute(
            "SELECT 1 FROM outputs WHERE sop_instance_uid = ?", (rec.sop_instance_uid,)
        ).fetchone():
            # one of our own results routed back to us (PACS auto-routing, Orthanc): never a new source
            return False
        cur = db.execute(
            "INSERT OR IGNORE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                rec.sop_instance_uid,
                rec.study_instance_uid,
                rec.series_instance_uid,
                rec.sop_class_uid,
                rec.modality,
                rec.series_description,
                rec.path,
                rec.transfer_syntax_uid,
                rec.size,
                rec.calling_ae,
                rec.received_at,
            ),
        )
        if cur.rowcount == 0:
            return False
        job = self._fetch_job(db, "study_uid = ?", (rec.study_instance_uid,))
        if job is None:
            db.execute(
                "INSERT INTO jobs(study_uid, state, source, instance_count, first_received_at, "
                "last_received_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                (rec.study_instance_uid, JobState.RECEIVING, source, 1, now, now, now, now),
            )
            self._event(
                db, rec.study_instance_uid, None, JobState.RECEIVING, f"first instance from {source}"
            )
        elif job.state is JobState.RECEIVING:
            db.execute(
                "UPDATE jobs SET instance_count = instance_count + 1, last_received_at = ?, updated_at = ? "
                "WHERE id = ?",
                (now, now, job.id),
            )
        elif job.state in _FINAL:
            # new source data after a result (or a skip/failure): a new revision is due
            db.execute(
                "UPDATE jobs SET state = ?, instance_count = instance_count + 1, first_received_at = ?, "
                "last_received_at = ?, updated_at = ?, reason = NULL, attempts = 0, next_attempt_at = NULL "
                "WHERE id = ?",
                (JobState.RECEIVING, now, now, now, job.id),
            )
            self._event(
                db, job.study_instance_uid, job.state, JobState.RECEIVING, "new instance: re-opened"
            )
        else:
            # the worker holds it: finish the current revision, then re-open
            db.execute(
                "UPDATE jobs SET pending_update = 1, instance_count = instance_count + 1, "
                "last_received_at = ?, updated_at = ? WHERE id = ?",
                (now, now, job.id),
            )
        return True

    def complete_due(
        self, now: float, quiet_s: float, force_s: float, required_series: Sequence[str] = ()
    ) -> list[Job]:
        """Move every receiving study that has been quiet long enough (or too long open) to complete."""
        import re

        patterns = [re.compile(p) for p in required_series]
        done: list[Job] = []
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = ? AND "
                "(last_received_at <= ? OR first_received_at <= ?)",
                (JobState.RECEIVING, now - quiet_s, now - force_s),
            ).fetchall()
            for row in rows:
                job = job_from_row(row)
                forced = job.first_received_at is not None and job.first_received_at <= now - force_s
                if patterns and not forced:
                    descs = [
                        d
                        for (d,) in db.execute(
                            "SELECT DISTINCT series_description FROM instances WHERE study_uid = ?",
                            (job.study_instance_uid,),
                        )
                    ]
                    if not all(any(p.search(d) for d in descs) for p in patterns):
                        continue
                detail = (
                    "forced: open too long"
                    if forced and (job.last_received_at or 0) > now - quiet_s
                    else "quiet"
                )
                db.execute(
                    "UPDATE jobs SET state = ?, completed_at = ?, updated_at = ? WHERE id = ?",
                    (JobState.COMPLETE, now, now, job.id),
                )
                self._event(db, job.study_instance_uid, job.state, JobState.COMPLETE, detail)
                done.append(self._fetch_job(db, "id = ?", (job.id,)))  # type: ignore[arg-type]
        return done

    def restart_quiet_timers(self, now: float) -> int:
        """After the listener was down, give receiving studies a full quiet period again.

        Senders could not reach us while we were down; completing a study the moment we come back
        would analyse it while its sender is still retrying, and produce a needless revision.
        """
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET last_received_at = ?, updated_at = ? WHERE state = ? AND last_received_at < ?",
                (now, now, JobState.RECEIVING, now),
            )
            return int(cur.rowcount)

    # ------------------------------------------------------------------ worker
    def claim(self, owner: str, now: float, lease_s: float) -> Job | None:
        """Lease the next job that has work: complete, exporting and due, or abandoned by a dead worker."""
        with self._tx() as db:
            row = db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE (lease_until IS NULL OR lease_until < ?) AND ("
                "state = ? OR state IN (?, ?) OR (state = ? AND (next_attempt_at IS NULL OR next_attempt_at <= ?))"
                ") ORDER BY COALESCE(next_attempt_at, completed_at, created_at), id LIMIT 1",
                (now, JobState.COMPLETE, JobState.INFERRING, JobState.REPORTING, JobState.EXPORTING, now),
            ).fetchone()
            if row is None:
                return None
            job = job_from_row(row)
            db.execute(
                "UPDATE jobs SET lease_owner = ?, lease_until = ?, updated_at = ? WHERE id = ?",
                (owner, now + lease_s, now, job.id),
            )
            if job.state in (JobState.INFERRING, JobState.REPORTING):
                # a previous worker died mid-analysis: nothing was exported, start the analysis again
                db.execute("UPDATE jobs SET state = ? WHERE id = ?", (JobState.COMPLETE, job.id))
                self._event(
                    db, job.study_instance_uid, job.state, JobState.COMPLETE, "reclaimed after lease expiry"
                )
            return self._fetch_job(db, "id = ?", (job.id,))

    def _owned(self, db: sqlite3.Connection, job_id: int, owner: str) -> Job:
        job = self._fetch_job(db, "id = ?", (job_id,))
        if job is None:
            raise JobNotFoundError(job_id)
        if job.lease_owner != owner:
            raise StoreError(f"job {job_id}: not leased by {owner} (lease owner {job.lease_owner})")
        return job

    def transition(self, job_id: int, owner: str, to: JobState, *, reason: str | None = None) -> Job:
        """Change the state of a leased job; final states release the lease."""
        now = time.time()
        with self._tx() as db:
            job = self._owned(db, job_id, owner)
            attempts = job.attempts + 1 if to is JobState.INFERRING else job.attempts
            timings = dict(job.timings)
            timings[str(to)] = now
            final = to in _FINAL
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, attempts = ?, updated_at = ?, timings = ?, "
                "lease_owner = CASE WHEN ? THEN NULL ELSE lease_owner END, "
                "lease_until = CASE WHEN ? THEN NULL ELSE lease_until END WHERE id = ?",
                (to, reason, attempts, now, json.dumps(timings), final, final, job_id),
            )
            self._event(db, job.study_instance_uid, job.state, to, reason)
            if final and job.pending_update:
                db.execute(
                    "UPDATE jobs SET state = ?, pending_update = 0, first_received_at = ?, reason = NULL "
                    "WHERE id = ?",
                    (JobState.RECEIVING, now, job_id),
                )
                self._event(db, job.study_instance_uid, to, JobState.RECEIVING, "instances arrived meanwhile")
            out = self._fetch_job(db, "id = ?", (job_id,))
            assert out is not None
            return out

    def release(self, job_id: int, owner: str) -> None:
        """Give a leased job back without changing its state (e.g. an export to retry later)."""
        with self._tx() as db:
            self._owned(db, job_id, owner)
            db.execute("UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = ?", (job_id,))

    def finish_report(
        self,
        job_id: int,
        owner: str,
        revision: int,
        outputs: Sequence[OutputRecord],
        destinations: Sequence[str],
    ) -> Job:
        """Record the written result objects and their pending deliveries, and move to exporting."""
        now = time.time()
        with self._tx() as db:
            job = self._owned(db, job_id, owner)
            for o in outputs:
                db.execute(
                    "INSERT OR REPLACE INTO outputs VALUES (?,?,?,?,?,?)",
                    (o.sop_instance_uid, o.study_instance_uid, o.revision, o.kind, o.sop_class_uid, o.path),
                )
                for dest in destinations:
                    db.execute(
                        "INSERT OR IGNORE INTO deliveries(output_uid, destination) VALUES (?, ?)",
                        (o.sop_instance_uid, dest),
                    )
            timings = dict(job.timings)
            timings[str(JobState.EXPORTING)] = now
            db.execute(
                "UPDATE jobs SET state = ?, revision = ?, updated_at = ?, next_attempt_at = NULL, timings = ? "
                "WHERE id = ?",
                (JobState.EXPORTING, revision, now, json.dumps(timings), job_id),
            )
            self._event(db, job.study_instance_uid, job.state, JobState.EXPORTING, f"revision {revision}")
            out = self._fetch_job(db, "id = ?", (job_id,))
            assert out is not None
            return out

    def record_delivery(
        self,
        output_uid: str,
        destination: str,
        ok: bool,
        status: str | None,
        error: str | None,
        next_attempt_at: float | None,
        give_up: bool,
    ) -> None:
        now = time.time()
        state = "delivered" if ok else ("failed" if give_up else "pending")
        with self._tx() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_status = ?, last_error = ?, "
                "next_attempt_at = ?, delivered_at = ? WHERE output_uid = ? AND destination = ?",
                (state, status, error, next_attempt_at, now if ok else None, output_uid, destination),
            )

    def force_release(self, job_id: int) -> None:
        """Drop a lease whose owner is known to be dead (the worker checks before calling)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = ?", (job_id,))

    def set_next_attempt(self, job_id: int, owner: str, at: float) -> None:
        with self._tx() as db:
            self._owned(db, job_id, owner)
            db.execute(
                "UPDATE jobs SET next_attempt_at = ?, lease_owner = NULL, lease_until = NULL WHERE id = ?",
                (at, job_id),
            )

    def retry(self, job_id: int) -> Job:
        """Bring a failed (or skipped) job back: failed deliveries become pending, else re-analyse."""
        now = time.time()
        with self._tx() as db:
            job = self._fetch_job(db, "id = ?", (job_id,))
            if job is None:
                raise JobNotFoundError(job_id)
            if job.state not in (JobState.FAILED, JobState.SKIPPED, JobState.DONE):
                raise StoreError(
                    f"job {job_id} is {job.state}; only failed, skipped or done jobs can be retried"
                )
            undelivered = db.execute(
                "SELECT COUNT(*) FROM deliveries d JOIN outputs o ON o.sop_instance_uid = d.output_uid "
                "WHERE o.study_uid = ? AND o.revision = ? AND d.state != 'delivered'",
                (job.study_instance_uid, job.revision),
            ).fetchone()[0]
            if job.state is JobState.FAILED and job.revision > 0 and undelivered:
                db.execute(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = NULL "
                    "WHERE state = 'failed' AND output_uid IN "
                    "(SELECT sop_instance_uid FROM outputs WHERE study_uid = ? AND revision = ?)",
                    (job.study_instance_uid, job.revision),
                )
                to = JobState.EXPORTING
            else:
                to = JobState.COMPLETE
            db.execute(
                "UPDATE jobs SET state = ?, reason = NULL, attempts = 0, next_attempt_at = NULL, "
                "completed_at = ?, updated_at = ?, lease_owner = NULL, lease_until = NULL WHERE id = ?",
                (to, now, now, job_id),
            )
            self._event(db, job.study_instance_uid, job.state, to, "retry requested")
            out = self._fetch_job(db, "id = ?", (job_id,))
            assert out is not None
            return out

    # ------------------------------------------------------------------ reading (JobStoreReads)
    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._conn().execute(sql, args).fetchall()]

    def ops_stats(self) -> OpsStats:
        """Job counts by state, inference durations and delivery totals (for ``/metrics``)."""
        db = self._conn()
        secs = db.execute(
            "SELECT json_extract(timings, '$.reporting') - json_extract(timings, '$.inferring') FROM jobs "
            "WHERE json_extract(timings, '$.reporting') >= json_extract(timings, '$.inferring')"
        ).fetchall()
        d = db.execute(
            "SELECT COALESCE(SUM(attempts), 0), "
            "COALESCE(SUM(CASE WHEN state = 'delivered' THEN attempts - 1 ELSE attempts END), 0), "
            "COALESCE(SUM(state = 'failed'), 0), COALESCE(SUM(state = 'delivered'), 0) FROM deliveries"
        ).fetchone()
        return OpsStats(self.counts(), [float(x) for (x,) in secs], int(d[0]), int(d[1]), int(d[2]), int(d[3]))


def open_store(config: NodeConfig) -> JobStore:
    """The job store ``[store]`` selects: PostgreSQL for a ``url``, else SQLite in ``node.data_dir``."""
    if config.store.url:
        from dicom_node.store_pg import PostgresJobStore

        return PostgresJobStore(config.store.url, password_env=config.store.password_env)
    return SQLiteJobStore(config.db_path)
