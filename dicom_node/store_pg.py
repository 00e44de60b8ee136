"""The job store on PostgreSQL, for several nodes sharing one queue (``[store] url = "postgresql://..."``).

Same interface and state machine as :class:`dicom_node.store.SQLiteJobStore` (the same contract tests
run against both).  What differs:

* every read-modify-write locks the job row (``SELECT … FOR UPDATE``); the worker's :meth:`claim` and the
  completeness check use ``FOR UPDATE SKIP LOCKED``, so N workers on M hosts each lease a different job
  and never wait on each other;
* a job's ``timings`` are ``jsonb``; the schema is created on first use under an advisory lock (several
  nodes may start at once) and is never altered by the node afterwards;
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
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from dicom_node.errors import JobNotFoundError, StoreError
from dicom_node.store import (
    JOB_COLUMNS,
    InstanceRecord,
    Job,
    JobState,
    JobStoreReads,
    OpsStats,
    OutputRecord,
    job_from_row,
)

__all__ = ["PostgresJobStore"]

_FINAL = frozenset({JobState.DONE, JobState.SKIPPED, JobState.FAILED})
_SCHEMA_LOCK = 0x5350494E454D4544 & 0x7FFFFFFFFFFFFFFF  # "SPINEMED": advisory lock key for schema creation

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id BIGSERIAL PRIMARY KEY,
    study_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    source TEXT NOT NULL DEFAULT 'dicom',
    instance_count INTEGER NOT NULL DEFAULT 0,
    first_received_at DOUBLE PRECISION,
    last_received_at DOUBLE PRECISION,
    completed_at DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    next_attempt_at DOUBLE PRECISION,
    lease_owner TEXT,
    lease_until DOUBLE PRECISION,
    pending_update BOOLEAN NOT NULL DEFAULT FALSE,
    timings JSONB NOT NULL DEFAULT '{}'::jsonb
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
    size BIGINT NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL
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
    next_attempt_at DOUBLE PRECISION,
    delivered_at DOUBLE PRECISION,
    PRIMARY KEY (output_uid, destination)
);
CREATE TABLE IF NOT EXISTS events (
    id BIGSERIAL PRIMARY KEY,
    study_uid TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_study ON events(study_uid);
"""


Cursor = psycopg.Cursor[tuple[Any, ...]]


def _redact(url: str) -> str:
    return re.sub(r"://([^/@:]*):[^/@]*@", r"://\1:***@", url)


class PostgresJobStore(JobStoreReads):
    """:class:`dicom_node.store.JobStore` on PostgreSQL (psycopg 3).

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
        The server cannot be reached or the schema cannot be created.
    """

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
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            cur.execute(_SCHEMA)

    def __repr__(self) -> str:
        return f"PostgresJobStore({_redact(self.url)!r})"

    # ------------------------------------------------------------------ connections / transactions
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

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()

    @staticmethod
    def _event(cur: Cursor, study_uid: str, frm: str | None, to: str, detail: str | None) -> None:
        cur.execute(
            "INSERT INTO events(study_uid, at, from_state, to_state, detail) VALUES (%s,%s,%s,%s,%s)",
            (study_uid, time.time(), frm, to, detail),
        )

    @staticmethod
    def _fetch_job(cur: Cursor, where: str, args: tuple[Any, ...], *, lock: bool = False) -> Job | None:
        cur.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where}" + (" FOR UPDATE" if lock else ""), args)
        row = cur.fetchone()
        return job_from_row(row) if row else None

    # ------------------------------------------------------------------ receiving
    def record_instance(self, rec: InstanceRecord, *, source: str = "dicom") -> bool:
        """Record a durably spooled instance; create or re-open its study's job (see the SQLite store)."""
        return self.record_instances([rec], source=source)[0]

    def record_instances(self, recs: Sequence[InstanceRecord], *, source: str = "dicom") -> list[bool]:
        """:meth:`record_instance` for several instances in one transaction (group commit)."""
        now = time.time()
        with self._tx() as cur:
            return [self._record_one(cur, rec, source, now) for rec in recs]

    def instance_paths(self) -> set[str]:
        """The spool paths of every recorded instance (for reconciling the spool after a crash)."""
        with self._tx() as cur:
            cur.execute("SELECT path FROM instances")
            return {p for (p,) in cur.fetchall()}

    def _record_one(self, cur: Cursor, rec: InstanceRecord, source: str, now: float) -> bool:
        cur.execute("SELECT 1 FROM outputs WHERE sop_instance_uid = %s", (rec.sop_instance_uid,))
        if cur.fetchone():
            return False  # one of our own results routed back to us: never a new source
        cur.execute(
            "INSERT INTO instances VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (sop_instance_uid) DO NOTHING",
            (rec.sop_instance_uid, rec.study_instance_uid, rec.series_instance_uid, rec.sop_class_uid,
             rec.modality, rec.series_description, rec.path, rec.transfer_syntax_uid, rec.size,
             rec.calling_ae, rec.received_at),
        )
        if cur.rowcount == 0:
            return False
        cur.execute(
            "INSERT INTO jobs(study_uid, state, source, instance_count, first_received_at, last_received_at, "
            "created_at, updated_at) VALUES (%s,%s,%s,1,%s,%s,%s,%s) ON CONFLICT (study_uid) DO NOTHING "
            "RETURNING id",
            (rec.study_instance_uid, JobState.RECEIVING, source, now, now, now, now),
        )
        if cur.fetchone() is not None:
            self._event(cur, rec.study_instance_uid, None, JobState.RECEIVING, f"first instance from {source}")
            return True
        job = self._fetch_job(cur, "study_uid = %s", (rec.study_instance_uid,), lock=True)
        assert job is not None
        if job.state is JobState.RECEIVING:
            cur.execute(
                "UPDATE jobs SET instance_count = instance_count + 1, last_received_at = %s, updated_at = %s "
                "WHERE id = %s", (now, now, job.id),
            )
        elif job.state in _FINAL:
            cur.execute(
                "UPDATE jobs SET state = %s, instance_count = instance_count + 1, first_received_at = %s, "
                "last_received_at = %s, updated_at = %s, reason = NULL, attempts = 0, next_attempt_at = NULL "
                "WHERE id = %s", (JobState.RECEIVING, now, now, now, job.id),
            )
            self._event(cur, job.study_instance_uid, job.state, JobState.RECEIVING, "new instance: re-opened")
        else:
            cur.execute(
                "UPDATE jobs SET pending_update = TRUE, instance_count = instance_count + 1, "
                "last_received_at = %s, updated_at = %s WHERE id = %s", (now, now, job.id),
            )
        return True

    def complete_due(
        self, now: float, quiet_s: float, force_s: float, required_series: Sequence[str] = ()
    ) -> list[Job]:
        """Move quiet (or too long open) receiving studies to complete; rows another node holds are skipped."""
        patterns = [re.compile(p) for p in required_series]
        done: list[Job] = []
        with self._tx() as cur:
            cur.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = %s AND "
                "(last_received_at <= %s OR first_received_at <= %s) ORDER BY id FOR UPDATE SKIP LOCKED",
                (JobState.RECEIVING, now - quiet_s, now - force_s),
            )
            for job in [job_from_row(r) for r in cur.fetchall()]:
                forced = job.first_received_at is not None and job.first_received_at <= now - force_s
                if patterns and not forced:
                    cur.execute("SELECT DISTINCT series_description FROM instances WHERE study_uid = %s",
                                (job.study_instance_uid,))
                    descs = [d for (d,) in cur.fetchall()]
                    if not all(any(p.search(d) for d in descs) for p in patterns):
                        continue
                detail = "forced: open too long" if forced and (job.last_received_at or 0) > now - quiet_s else "quiet"
                cur.execute("UPDATE jobs SET state = %s, completed_at = %s, updated_at = %s WHERE id = %s",
                            (JobState.COMPLETE, now, now, job.id))
                self._event(cur, job.study_instance_uid, job.state, JobState.COMPLETE, detail)
                fresh = self._fetch_job(cur, "id = %s", (job.id,))
                assert fresh is not None
                done.append(fresh)
        return done

    def restart_quiet_timers(self, now: float) -> int:
        """Give receiving studies a full quiet period again after the listener was down."""
        with self._tx() as cur:
            cur.execute(
                "UPDATE jobs SET last_received_at = %s, updated_at = %s WHERE state = %s AND last_received_at < %s",
                (now, now, JobState.RECEIVING, now),
            )
            return int(cur.rowcount)

    # ------------------------------------------------------------------ worker
    def claim(self, owner: str, now: float, lease_s: float) -> Job | None:
        """Lease the next job with work; ``FOR UPDATE SKIP LOCKED`` so concurrent workers never collide."""
        with self._tx() as cur:
            cur.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE (lease_until IS NULL OR lease_until < %s) AND ("
                "state = %s OR state IN (%s, %s) OR "
                "(state = %s AND (next_attempt_at IS NULL OR next_attempt_at <= %s))"
                ") ORDER BY COALESCE(next_attempt_at, completed_at, created_at), id LIMIT 1 FOR UPDATE SKIP LOCKED",
                (now, JobState.COMPLETE, JobState.INFERRING, JobState.REPORTING, JobState.EXPORTING, now),
            )
            row = cur.fetchone()
            if row is None:
                return None
            job = job_from_row(row)
            cur.execute("UPDATE jobs SET lease_owner = %s, lease_until = %s, updated_at = %s WHERE id = %s",
                        (owner, now + lease_s, now, job.id))
            if job.state in (JobState.INFERRING, JobState.REPORTING):
                cur.execute("UPDATE jobs SET state = %s WHERE id = %s", (JobState.COMPLETE, job.id))
                self._event(cur, job.study_instance_uid, job.state, JobState.COMPLETE, "reclaimed after lease expiry")
            return self._fetch_job(cur, "id = %s", (job.id,))

    def _owned(self, cur: Cursor, job_id: int, owner: str) -> Job:
        job = self._fetch_job(cur, "id = %s", (job_id,), lock=True)
        if job is None:
            raise JobNotFoundError(job_id)
        if job.lease_owner != owner:
            raise StoreError(f"job {job_id}: not leased by {owner} (lease owner {job.lease_owner})")
        return job

    def transition(self, job_id: int, owner: str, to: JobState, *, reason: str | None = None) -> Job:
        """Change the state of a leased job; final states release the lease."""
        now = time.time()
        with self._tx() as cur:
            job = self._owned(cur, job_id, owner)
            attempts = job.attempts + 1 if to is JobState.INFERRING else job.attempts
            timings = dict(job.timings)
            timings[str(to)] = now
            final = to in _FINAL
            cur.execute(
                "UPDATE jobs SET state = %s, reason = %s, attempts = %s, updated_at = %s, timings = %s, "
                "lease_owner = CASE WHEN %s THEN NULL ELSE lease_owner END, "
                "lease_until = CASE WHEN %s THEN NULL ELSE lease_until END WHERE id = %s",
                (to, reason, attempts, now, Jsonb(timings), final, final, job_id),
            )
            self._event(cur, job.study_instance_uid, job.state, to, reason)
            if final and job.pending_update:
                cur.execute(
                    "UPDATE jobs SET state = %s, pending_update = FALSE, first_received_at = %s, reason = NULL "
                    "WHERE id = %s", (JobState.RECEIVING, now, job_id),
                )
                self._event(cur, job.study_instance_uid, to, JobState.RECEIVING, "instances arrived meanwhile")
            out = self._fetch_job(cur, "id = %s", (job_id,))
            assert out is not None
            return out

    def release(self, job_id: int, owner: str) -> None:
        """Give a leased job back without changing its state."""
        with self._tx() as cur:
            self._owned(cur, job_id, owner)
            cur.execute("UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = %s", (job_id,))

    def finish_report(
        self, job_id: int, owner: str, revision: int, outputs: Sequence[OutputRecord], destinations: Sequence[str]
    ) -> Job:
        """Record the written result objects and their pending deliveries, and move to exporting."""
        now = time.time()
        with self._tx() as cur:
            job = self._owned(cur, job_id, owner)
            for o in outputs:
                cur.execute(
                    "INSERT INTO outputs VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (sop_instance_uid) DO UPDATE SET "
                    "study_uid = EXCLUDED.study_uid, revision = EXCLUDED.revision, kind = EXCLUDED.kind, "
                    "sop_class_uid = EXCLUDED.sop_class_uid, path = EXCLUDED.path",
                    (o.sop_instance_uid, o.study_instance_uid, o.revision, o.kind, o.sop_class_uid, o.path),
                )
                for dest in destinations:
                    cur.execute("INSERT INTO deliveries(output_uid, destination) VALUES (%s, %s) "
                                "ON CONFLICT DO NOTHING", (o.sop_instance_uid, dest))
            timings = dict(job.timings)
            timings[str(JobState.EXPORTING)] = now
            cur.execute(
                "UPDATE jobs SET state = %s, revision = %s, updated_at = %s, next_attempt_at = NULL, timings = %s "
                "WHERE id = %s", (JobState.EXPORTING, revision, now, Jsonb(timings), job_id),
            )
            self._event(cur, job.study_instance_uid, job.state, JobState.EXPORTING, f"revision {revision}")
            out = self._fetch_job(cur, "id = %s", (job_id,))
            assert out is not None
            return out

    def record_delivery(
        self, output_uid: str, destination: str, ok: bool, status: str | None, error: str | None,
        next_attempt_at: float | None, give_up: bool,
    ) -> None:
        now = time.time()
        state = "delivered" if ok else ("failed" if give_up else "pending")
        with self._tx() as cur:
            cur.execute(
                "UPDATE deliveries SET state = %s, attempts = attempts + 1, last_status = %s, last_error = %s, "
                "next_attempt_at = %s, delivered_at = %s WHERE output_uid = %s AND destination = %s",
                (state, status, error, next_attempt_at, now if ok else None, output_uid, destination),
            )

    def force_release(self, job_id: int) -> None:
        """Drop a lease whose owner is known to be dead."""
        with self._tx() as cur:
            cur.execute("UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = %s", (job_id,))

    def set_next_attempt(self, job_id: int, owner: str, at: float) -> None:
        with self._tx() as cur:
            self._owned(cur, job_id, owner)
            cur.execute("UPDATE jobs SET next_attempt_at = %s, lease_owner = NULL, lease_until = NULL WHERE id = %s",
                        (at, job_id))

    def retry(self, job_id: int) -> Job:
        """Bring a failed, skipped or done job back: failed deliveries become pending, else re-analyse."""
        now = time.time()
        with self._tx() as cur:
            job = self._fetch_job(cur, "id = %s", (job_id,), lock=True)
            if job is None:
                raise JobNotFoundError(job_id)
            if job.state not in (JobState.FAILED, JobState.SKIPPED, JobState.DONE):
                raise StoreError(f"job {job_id} is {job.state}; only failed, skipped or done jobs can be retried")
            cur.execute(
                "SELECT COUNT(*) FROM deliveries d JOIN outputs o ON o.sop_instance_uid = d.output_uid "
                "WHERE o.study_uid = %s AND o.revision = %s AND d.state != 'delivered'",
                (job.study_instance_uid, job.revision),
            )
            row = cur.fetchone()
            undelivered = int(row[0]) if row else 0
            if job.state is JobState.FAILED and job.revision > 0 and undelivered:
                cur.execute(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = NULL "
                    "WHERE state = 'failed' AND output_uid IN "
                    "(SELECT sop_instance_uid FROM outputs WHERE study_uid = %s AND revision = %s)",
                    (job.study_instance_uid, job.revision),
                )
                to = JobState.EXPORTING
            else:
                to = JobState.COMPLETE
            cur.execute(
                "UPDATE jobs SET state = %s, reason = NULL, attempts = 0, next_attempt_at = NULL, "
                "completed_at = %s, updated_at = %s, lease_owner = NULL, lease_until = NULL WHERE id = %s",
                (to, now, now, job_id),
            )
            self._event(cur, job.study_instance_uid, job.state, to, "retry requested")
            out = self._fetch_job(cur, "id = %s", (job_id,))
            assert out is not None
            return out

    # ------------------------------------------------------------------ reading (JobStoreReads)
    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._read() as cur:
            cur.execute(sql.replace("?", "%s"), args)
            return cur.fetchall()

    def ops_stats(self) -> OpsStats:
        """Job counts by state, inference durations and delivery totals (for ``/metrics``)."""
        with self._read() as cur:
            cur.execute(
                "SELECT (timings->>'reporting')::float8 - (timings->>'inferring')::float8 FROM jobs "
                "WHERE (timings->>'reporting')::float8 >= (timings->>'inferring')::float8"
            )
            secs = [float(x) for (x,) in cur.fetchall()]
            cur.execute(
                "SELECT COALESCE(SUM(attempts), 0), "
                "COALESCE(SUM(CASE WHEN state = 'delivered' THEN attempts - 1 ELSE attempts END), 0), "
                "COUNT(*) FILTER (WHERE state = 'failed'), COUNT(*) FILTER (WHERE state = 'delivered') "
                "FROM deliveries"
            )
            d = cur.fetchone()
        assert d is not None
        return OpsStats(self.counts(), secs, int(d[0]), int(d[1]), int(d[2]), int(d[3]))
