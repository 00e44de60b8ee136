"""The job state machine, written once in SQL for every backend.

Every state change, claim, lease, retry and delivery record lives here.  A backend
(:mod:`dicom_node.jobs.sqlite`, :mod:`dicom_node.jobs.postgres`) supplies only what its dialect needs:

* :meth:`SQLJobStore._tx` — one transaction, yielding a DB-API cursor, with the isolation the backend
  needs (SQLite: ``BEGIN IMMEDIATE``, the whole file; PostgreSQL: row locks, below);
* :meth:`SQLJobStore._read` — a cursor for reads outside a transaction;
* :attr:`SQLJobStore.param` — the driver's parameter mark (every statement here is written with ``?``);
* :attr:`SQLJobStore.lock_row` / :attr:`SQLJobStore.skip_locked` — ``FOR UPDATE`` and
  ``FOR UPDATE SKIP LOCKED`` where rows can be locked (empty for SQLite, whose transaction locks the file);
* :meth:`SQLJobStore._json` — how a JSON value is bound (text for SQLite, ``jsonb`` for PostgreSQL);
* :attr:`SQLJobStore.seconds_between` — the SQL of a difference of two ``timings`` entries.

The SQL is the common subset of SQLite ≥ 3.35 and PostgreSQL ≥ 12 (``ON CONFLICT``, ``RETURNING``,
``TRUE``/``FALSE``); the schema itself is created and upgraded by :mod:`dicom_node.jobs.schema`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

from dicom_node.errors import ConsultationError, ConsultationLimitError, JobNotFoundError, StoreError
from dicom_node.jobs.model import (
    FINAL_STATES,
    JOB_COLUMNS,
    TURN_COLUMNS,
    ClaimWork,
    Consultation,
    ConsultTurn,
    Delivery,
    EndEvent,
    InstanceRecord,
    Job,
    JobState,
    OpsStats,
    OutputRecord,
    ShadowRow,
    TurnState,
    job_from_row,
    turn_from_row,
)

__all__ = ["Cursor", "SQLJobStore"]


class Cursor(Protocol):
    """The part of a DB-API cursor the state machine uses (sqlite3 and psycopg both fit)."""

    @property
    def rowcount(self) -> int: ...
    def execute(self, sql: Any, args: Any = ..., /) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class SQLJobStore:
    """:class:`~dicom_node.jobs.model.JobStore` in SQL; subclasses supply the dialect (see the module)."""

    param: ClassVar[str] = "?"
    lock_row: ClassVar[str] = ""
    skip_locked: ClassVar[str] = ""
    seconds_between: ClassVar[str] = ""  # SQL for timings[b] - timings[a], with {a} and {b} as names

    # ------------------------------------------------------------------ what a backend supplies
    def _tx(self) -> AbstractContextManager[Cursor]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Cursor]:
        raise NotImplementedError

    def _json(self, value: dict[str, float]) -> Any:
        raise NotImplementedError

    def schema_version(self) -> str | None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _x(self, cur: Cursor, sql: str, args: tuple[Any, ...] = ()) -> Cursor:
        cur.execute(sql if self.param == "?" else sql.replace("?", self.param), args)
        return cur

    def _event(self, cur: Cursor, study_uid: str, frm: str | None, to: str, detail: str | None) -> None:
        self._x(cur, "INSERT INTO events(study_uid, at, from_state, to_state, detail) VALUES (?,?,?,?,?)",
                (study_uid, time.time(), frm, to, detail))

    def _fetch_job(self, cur: Cursor, where: str, args: tuple[Any, ...], *, lock: bool = False) -> Job | None:
        row = self._x(cur, f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where}" + (self.lock_row if lock else ""),
                      args).fetchone()
        return job_from_row(row) if row else None

    def _job(self, cur: Cursor, job_id: int) -> Job:
        job = self._fetch_job(cur, "id = ?", (job_id,))
        if job is None:
            raise JobNotFoundError(job_id)
        return job

    def _owned(self, cur: Cursor, job_id: int, owner: str) -> Job:
        job = self._fetch_job(cur, "id = ?", (job_id,), lock=True)
        if job is None:
            raise JobNotFoundError(job_id)
        if job.lease_owner != owner:
            raise StoreError(f"job {job_id}: not leased by {owner} (lease owner {job.lease_owner})")
        return job

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._read() as cur:
            return [tuple(r) for r in self._x(cur, sql, args).fetchall()]

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
        with self._tx() as cur:
            return [self._record_one(cur, rec, source, now) for rec in recs]

    def instance_paths(self) -> set[str]:
        """The spool paths of every recorded instance (for reconciling the spool after a crash)."""
        return {p for (p,) in self._rows("SELECT path FROM instances")}

    def _record_one(self, cur: Cursor, rec: InstanceRecord, source: str, now: float) -> bool:
        if self._x(cur, "SELECT 1 FROM outputs WHERE sop_instance_uid = ?", (rec.sop_instance_uid,)).fetchone():
            # one of our own results routed back to us (PACS auto-routing, Orthanc): never a new source
            return False
        inserted = self._x(
            cur,
            "INSERT INTO instances(sop_instance_uid, study_uid, series_uid, sop_class_uid, modality, "
            "series_description, path, transfer_syntax, size, calling_ae, received_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (sop_instance_uid) DO NOTHING",
            (rec.sop_instance_uid, rec.study_instance_uid, rec.series_instance_uid, rec.sop_class_uid,
             rec.modality, rec.series_description, rec.path, rec.transfer_syntax_uid, rec.size,
             rec.calling_ae, rec.received_at),
        ).rowcount
        if inserted == 0:
            return False  # a resend
        created = self._x(
            cur,
            "INSERT INTO jobs(study_uid, state, source, instance_count, first_received_at, last_received_at, "
            "created_at, updated_at) VALUES (?,?,?,1,?,?,?,?) ON CONFLICT (study_uid) DO NOTHING RETURNING id",
            (rec.study_instance_uid, JobState.RECEIVING, source, now, now, now, now),
        ).fetchone()
        if created is not None:
            self._event(cur, rec.study_instance_uid, None, JobState.RECEIVING, f"first instance from {source}")
            return True
        job = self._fetch_job(cur, "study_uid = ?", (rec.study_instance_uid,), lock=True)
        assert job is not None
        if job.state is JobState.RECEIVING:
            self._x(cur, "UPDATE jobs SET instance_count = instance_count + 1, last_received_at = ?, "
                    "updated_at = ? WHERE id = ?", (now, now, job.id))
        elif job.state in FINAL_STATES:
            # new source data after a result (or a skip/failure): a new revision is due
            self._x(cur, "UPDATE jobs SET state = ?, instance_count = instance_count + 1, first_received_at = ?, "
                    "last_received_at = ?, updated_at = ?, reason = NULL, attempts = 0, next_attempt_at = NULL "
                    "WHERE id = ?", (JobState.RECEIVING, now, now, now, job.id))
            self._event(cur, job.study_instance_uid, job.state, JobState.RECEIVING, "new instance: re-opened")
        else:
            # the worker holds it: finish the current revision, then re-open
            self._x(cur, "UPDATE jobs SET pending_update = TRUE, instance_count = instance_count + 1, "
                    "last_received_at = ?, updated_at = ? WHERE id = ?", (now, now, job.id))
        return True

    def complete_due(
        self, now: float, quiet_s: float, force_s: float, required_series: Sequence[str] = ()
    ) -> list[Job]:
        """Move every receiving study that has been quiet long enough (or too long open) to complete.

        Rows another node holds locked are skipped (PostgreSQL); they are looked at again next time.
        """
        patterns = [re.compile(p) for p in required_series]
        done: list[Job] = []
        with self._tx() as cur:
            rows = self._x(
                cur,
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = ? AND (last_received_at <= ? OR "
                f"first_received_at <= ?) ORDER BY id{self.skip_locked}",
                (JobState.RECEIVING, now - quiet_s, now - force_s),
            ).fetchall()
            for job in [job_from_row(r) for r in rows]:
                forced = job.first_received_at is not None and job.first_received_at <= now - force_s
                if patterns and not forced:
                    descs = [d for (d,) in self._x(cur, "SELECT DISTINCT series_description FROM instances "
                                                   "WHERE study_uid = ?", (job.study_instance_uid,)).fetchall()]
                    if not all(any(p.search(d) for d in descs) for p in patterns):
                        continue
                detail = "forced: open too long" if forced and (job.last_received_at or 0) > now - quiet_s else "quiet"
                self._x(cur, "UPDATE jobs SET state = ?, completed_at = ?, updated_at = ? WHERE id = ?",
                        (JobState.COMPLETE, now, now, job.id))
                self._event(cur, job.study_instance_uid, job.state, JobState.COMPLETE, detail)
                done.append(self._job(cur, job.id))
        return done

    def restart_quiet_timers(self, now: float) -> int:
        """After the listener was down, give receiving studies a full quiet period again.

        Senders could not reach us while we were down; completing a study the moment we come back
        would analyse it while its sender is still retrying, and produce a needless revision.
        """
        with self._tx() as cur:
            return int(self._x(cur, "UPDATE jobs SET last_received_at = ?, updated_at = ? WHERE state = ? "
                               "AND last_received_at < ?", (now, now, JobState.RECEIVING, now)).rowcount)

    # ------------------------------------------------------------------ worker: claim, lease, transitions
    def claim(self, owner: str, now: float, lease_s: float, *, work: ClaimWork = "any") -> Job | None:
        """Lease the next job that has work: complete or exporting and due (a deferred analysis or delivery
        waits for its ``next_attempt_at``), or abandoned by a dead worker.  ``work`` limits it to analyses
        (complete, abandoned mid-analysis) or to exports (a worker's export threads).

        Concurrent workers never collide: SQLite serialises the transaction, PostgreSQL skips locked rows.
        """
        if work not in ("any", "analysis", "export"):
            raise ValueError(f"work: expected 'any', 'analysis' or 'export', got {work!r}")
        abandoned = [] if work == "export" else [JobState.INFERRING, JobState.REPORTING]
        due = {"any": [JobState.COMPLETE, JobState.EXPORTING], "analysis": [JobState.COMPLETE],
               "export": [JobState.EXPORTING]}[work]
        marks_a = ", ".join("?" * len(abandoned)) or "NULL"
        marks_d = ", ".join("?" * len(due))
        with self._tx() as cur:
            row = self._x(
                cur,
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE (lease_until IS NULL OR lease_until < ?) AND ("
                f"state IN ({marks_a}) OR (state IN ({marks_d}) AND (next_attempt_at IS NULL OR next_attempt_at <= ?))"
                f") ORDER BY COALESCE(next_attempt_at, completed_at, created_at), id LIMIT 1{self.skip_locked}",
                (now, *abandoned, *due, now),
            ).fetchone()
            if row is None:
                return None
            job = job_from_row(row)
            self._x(cur, "UPDATE jobs SET lease_owner = ?, lease_until = ?, updated_at = ? WHERE id = ?",
                    (owner, now + lease_s, now, job.id))
            if job.state in (JobState.INFERRING, JobState.REPORTING):
                # a previous worker died mid-analysis: nothing was exported, start the analysis again
                self._x(cur, "UPDATE jobs SET state = ? WHERE id = ?", (JobState.COMPLETE, job.id))
                self._event(cur, job.study_instance_uid, job.state, JobState.COMPLETE, "reclaimed after lease expiry")
            return self._job(cur, job.id)

    def transition(self, job_id: int, owner: str, to: JobState, *, reason: str | None = None) -> Job:
        """Change the state of a leased job; final states release the lease."""
        now = time.time()
        with self._tx() as cur:
            job = self._owned(cur, job_id, owner)
            attempts = job.attempts + 1 if to is JobState.INFERRING else job.attempts
            timings = dict(job.timings)
            timings[str(to)] = now
            final = to in FINAL_STATES
            self._x(
                cur,
                "UPDATE jobs SET state = ?, reason = ?, attempts = ?, updated_at = ?, timings = ?, "
                "lease_owner = CASE WHEN ? THEN NULL ELSE lease_owner END, "
                "lease_until = CASE WHEN ? THEN NULL ELSE lease_until END WHERE id = ?",
                (to, reason, attempts, now, self._json(timings), final, final, job_id),
            )
            self._event(cur, job.study_instance_uid, job.state, to, reason)
            if final and job.pending_update:
                self._x(cur, "UPDATE jobs SET state = ?, pending_update = FALSE, first_received_at = ?, "
                        "reason = NULL WHERE id = ?", (JobState.RECEIVING, now, job_id))
                self._event(cur, job.study_instance_uid, to, JobState.RECEIVING, "instances arrived meanwhile")
            return self._job(cur, job_id)

    def release(self, job_id: int, owner: str) -> None:
        """Give a leased job back without changing its state (e.g. an export to retry later)."""
        with self._tx() as cur:
            self._owned(cur, job_id, owner)
            self._x(cur, "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = ?", (job_id,))

    def set_next_attempt(self, job_id: int, owner: str, at: float) -> None:
        """Release a leased job until ``at`` (a delivery or analysis to try again later)."""
        with self._tx() as cur:
            self._owned(cur, job_id, owner)
            self._x(cur, "UPDATE jobs SET next_attempt_at = ?, lease_owner = NULL, lease_until = NULL WHERE id = ?",
                    (at, job_id))

    def mark_unusable(self, study_uid: str, reasons: Mapping[str, str]) -> None:
        """Record which instances of a study the latest analysis left out and why (``{sop uid: reason}``);
        every other instance of the study is marked usable again."""
        with self._tx() as cur:
            self._x(cur, "UPDATE instances SET unusable_reason = NULL WHERE study_uid = ? "
                    "AND unusable_reason IS NOT NULL", (study_uid,))
            for sop, reason in reasons.items():
                self._x(cur, "UPDATE instances SET unusable_reason = ? WHERE sop_instance_uid = ? AND study_uid = ?",
                        (reason[:500], sop, study_uid))

    def unusable_summary(self) -> dict[str, dict[str, int]]:
        """``{study uid: {reason kind: instances}}`` for every study with instances left out (the jobs page)."""
        out: dict[str, dict[str, int]] = {}
        for study_uid, reason, n in self._rows("SELECT study_uid, unusable_reason, COUNT(*) FROM instances "
                                               "WHERE unusable_reason IS NOT NULL GROUP BY study_uid, unusable_reason"):
            kinds = out.setdefault(study_uid, {})
            kind = str(reason).split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + int(n)
        return out

    def defer_analysis(self, job_id: int, owner: str, at: float, reason: str) -> Job:
        """Put a leased job whose analysis failed for a transient reason (the model server down, out of GPU
        memory) back to ``complete`` until ``at``, with the reason shown meanwhile; its ``attempts`` count
        the analyses tried."""
        now = time.time()
        with self._tx() as cur:
            job = self._owned(cur, job_id, owner)
            self._x(cur, "UPDATE jobs SET state = ?, reason = ?, next_attempt_at = ?, updated_at = ?, "
                    "lease_owner = NULL, lease_until = NULL WHERE id = ?", (JobState.COMPLETE, reason, at, now, job_id))
            self._event(cur, job.study_instance_uid, job.state, JobState.COMPLETE, reason)
            return self._job(cur, job_id)

    def force_release(self, job_id: int) -> None:
        """Drop a lease whose owner is known to be dead (the worker checks before calling)."""
        with self._tx() as cur:
            self._x(cur, "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = ?", (job_id,))

    def finish_report(
        self,
        job_id: int,
        owner: str,
        revision: int,
        outputs: Sequence[OutputRecord],
        destinations: Sequence[str],
        kinds: Mapping[str, frozenset[str]] | None = None,
        note: str | None = None,
    ) -> Job:
        """Record the written result objects and their pending deliveries, and move to exporting.

        ``kinds`` limits a destination to the output kinds it takes (an HL7 or FHIR destination: the two
        SRs); a destination absent from it takes every object.  ``note`` is added to the job's event (e.g.
        why the report has no comparison with a prior study).
        """
        now = time.time()
        with self._tx() as cur:
            job = self._owned(cur, job_id, owner)
            for o in outputs:
                self._x(
                    cur,
                    "INSERT INTO outputs(sop_instance_uid, study_uid, revision, kind, sop_class_uid, path) "
                    "VALUES (?,?,?,?,?,?) ON CONFLICT (sop_instance_uid) DO UPDATE SET "
                    "study_uid = excluded.study_uid, revision = excluded.revision, kind = excluded.kind, "
                    "sop_class_uid = excluded.sop_class_uid, path = excluded.path",
                    (o.sop_instance_uid, o.study_instance_uid, o.revision, o.kind, o.sop_class_uid, o.path),
                )
                for dest in destinations:
                    if kinds is not None and dest in kinds and o.kind not in kinds[dest]:
                        continue
                    self._x(cur, "INSERT INTO deliveries(output_uid, destination) VALUES (?, ?) "
                            "ON CONFLICT DO NOTHING", (o.sop_instance_uid, dest))
            timings = dict(job.timings)
            timings[str(JobState.EXPORTING)] = now
            self._x(cur, "UPDATE jobs SET state = ?, revision = ?, updated_at = ?, next_attempt_at = NULL, "
                    "timings = ? WHERE id = ?", (JobState.EXPORTING, revision, now, self._json(timings), job_id))
            detail = f"revision {revision}" + (f"; {note}" if note else "")
            self._event(cur, job.study_instance_uid, job.state, JobState.EXPORTING, detail[:1000])
            return self._job(cur, job_id)

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
        """Record one delivery attempt: delivered, pending (a retry is due at ``next_attempt_at``) or failed."""
        now = time.time()
        state = "delivered" if ok else ("failed" if give_up else "pending")
        with self._tx() as cur:
            self._x(cur, "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_status = ?, last_error = ?, "
                    "next_attempt_at = ?, delivered_at = ? WHERE output_uid = ? AND destination = ?",
                    (state, status, error, next_attempt_at, now if ok else None, output_uid, destination))

    def retry(self, job_id: int) -> Job:
        """Bring a failed, skipped or done job back: failed deliveries become pending, else re-analyse.  A job
        waiting for the model (a deferred analysis) is made due now."""
        now = time.time()
        with self._tx() as cur:
            job = self._fetch_job(cur, "id = ?", (job_id,), lock=True)
            if job is None:
                raise JobNotFoundError(job_id)
            waiting = job.state is JobState.COMPLETE and job.next_attempt_at is not None and job.lease_owner is None
            if job.state not in FINAL_STATES and not waiting:
                raise StoreError(f"job {job_id} is {job.state}; only failed, skipped or done jobs, or one waiting "
                                 "for the model, can be retried")
            row = self._x(cur, "SELECT COUNT(*) FROM deliveries d JOIN outputs o ON o.sop_instance_uid = d.output_uid "
                          "WHERE o.study_uid = ? AND o.revision = ? AND d.state != 'delivered'",
                          (job.study_instance_uid, job.revision)).fetchone()
            undelivered = int(row[0]) if row else 0
            if job.state is JobState.FAILED and job.revision > 0 and undelivered:
                self._x(cur, "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = NULL "
                        "WHERE state = 'failed' AND output_uid IN "
                        "(SELECT sop_instance_uid FROM outputs WHERE study_uid = ? AND revision = ?)",
                        (job.study_instance_uid, job.revision))
                to = JobState.EXPORTING
            else:
                to = JobState.COMPLETE
            self._x(cur, "UPDATE jobs SET state = ?, reason = NULL, attempts = 0, next_attempt_at = NULL, "
                    "completed_at = ?, updated_at = ?, lease_owner = NULL, lease_until = NULL WHERE id = ?",
                    (to, now, now, job_id))
            self._event(cur, job.study_instance_uid, job.state, to, "retry requested")
            return self._job(cur, job_id)

    def add_outputs(
        self,
        job_id: int,
        outputs: Sequence[OutputRecord],
        destinations: Sequence[str],
        kinds: Mapping[str, frozenset[str]] | None = None,
        *,
        detail: str,
    ) -> Job:
        """Add result objects to a done job's current revision (a saved consultation) with their pending
        deliveries; with any delivery to make, the job goes back to ``exporting`` and the worker sends them
        like every result (acknowledged ones are never sent again).

        Raises
        ------
        ConsultationError
            The job is not done, or an output is not of its current revision.
        """
        now = time.time()
        with self._tx() as cur:
            job = self._fetch_job(cur, "id = ?", (job_id,), lock=True)
            if job is None:
                raise JobNotFoundError(job_id)
            if job.state is not JobState.DONE or job.lease_owner is not None:
                raise ConsultationError(f"job {job_id} is {job.state}: results can be added to a done job only "
                                        "(its results are being sent: save again in a moment)")
            queued = 0
            for o in outputs:
                if o.revision != job.revision or o.study_instance_uid != job.study_instance_uid:
                    raise ConsultationError(f"job {job_id}: an output is not of the job's revision {job.revision}")
                self._x(cur, "INSERT INTO outputs(sop_instance_uid, study_uid, revision, kind, sop_class_uid, path) "
                        "VALUES (?,?,?,?,?,?) ON CONFLICT (sop_instance_uid) DO NOTHING",
                        (o.sop_instance_uid, o.study_instance_uid, o.revision, o.kind, o.sop_class_uid, o.path))
                for dest in destinations:
                    if kinds is not None and dest in kinds and o.kind not in kinds[dest]:
                        continue
                    queued += self._x(cur, "INSERT INTO deliveries(output_uid, destination) VALUES (?, ?) "
                                      "ON CONFLICT DO NOTHING", (o.sop_instance_uid, dest)).rowcount
            if queued:
                timings = dict(job.timings)
                timings[str(JobState.EXPORTING)] = now
                self._x(cur, "UPDATE jobs SET state = ?, updated_at = ?, next_attempt_at = NULL, timings = ? "
                        "WHERE id = ?", (JobState.EXPORTING, now, self._json(timings), job_id))
                self._event(cur, job.study_instance_uid, job.state, JobState.EXPORTING, detail)
            return self._job(cur, job_id)

    # ------------------------------------------------------------------ consultations
    def record_findings(self, study_uid: str, revision: int, findings_json: str) -> None:
        """Keep one analysis's findings (JSON) for consultations about it."""
        with self._tx() as cur:
            self._x(cur, "INSERT INTO analysis_findings(study_uid, revision, findings) VALUES (?,?,?) "
                    "ON CONFLICT (study_uid, revision) DO UPDATE SET findings = excluded.findings",
                    (study_uid, revision, findings_json))

    def findings(self, study_uid: str, revision: int) -> str | None:
        """The findings JSON of one analysis (``None``: not kept, e.g. analysed by an older node)."""
        rows = self._rows("SELECT findings FROM analysis_findings WHERE study_uid = ? AND revision = ?",
                          (study_uid, revision))
        return str(rows[0][0]) if rows else None

    def record_shadow(self, rows: Sequence[ShadowRow]) -> int:
        """Record shadow-mode comparisons (a later one for the same study, condition and level replaces
        the earlier); returns how many were written."""
        with self._tx() as cur:
            for r in rows:
                self._x(cur, "INSERT INTO shadow_agreement(study, revision, condition, level, truth_grade, "
                        "model_grade, agree, recorded_at, source) VALUES (?,?,?,?,?,?,?,?,?) "
                        "ON CONFLICT (study, condition, level) DO UPDATE SET revision = excluded.revision, "
                        "truth_grade = excluded.truth_grade, model_grade = excluded.model_grade, "
                        "agree = excluded.agree, recorded_at = excluded.recorded_at, source = excluded.source",
                        (r.study, r.revision, r.condition, r.level, r.truth_grade, r.model_grade,
                         int(r.agree), r.recorded_at, r.source))
        return len(rows)

    def shadow_rows(self) -> list[ShadowRow]:
        """Every shadow-mode comparison, oldest first."""
        rows = self._rows("SELECT study, revision, condition, level, truth_grade, model_grade, recorded_at, source "
                          "FROM shadow_agreement ORDER BY recorded_at, id")
        return [ShadowRow(str(r[0]), int(r[1]), str(r[2]), str(r[3]), int(r[4]), int(r[5]), float(r[6]), str(r[7]))
                for r in rows]

    _CONSULT_COLUMNS: ClassVar[str] = "id, job_id, study_uid, revision, created_by, created_at, saved_uid"

    @staticmethod
    def _consultation_of(row: Sequence[Any]) -> Consultation:
        r = tuple(row)
        return Consultation(int(r[0]), int(r[1]), r[2], int(r[3]), r[4], float(r[5]), r[6])

    @staticmethod
    def _consultable(job: Job) -> None:
        if job.state not in (JobState.DONE, JobState.EXPORTING) or job.revision < 1:
            raise ConsultationError(f"job {job.id} is {job.state}: only a study the node has analysed and "
                                    "delivered (job done, with results) can be consulted")

    def open_consultation(self, job_id: int, created_by: str) -> Consultation:
        """Start a consultation about the job's current revision.

        Raises
        ------
        JobNotFoundError
            No such job.
        ConsultationError
            The job is not done with results.
        """
        with self._tx() as cur:
            job = self._fetch_job(cur, "id = ?", (job_id,), lock=True)
            if job is None:
                raise JobNotFoundError(job_id)
            self._consultable(job)
            row = self._x(cur, "INSERT INTO consultations(job_id, study_uid, revision, created_by, created_at) "
                          f"VALUES (?,?,?,?,?) RETURNING {self._CONSULT_COLUMNS}",
                          (job.id, job.study_instance_uid, job.revision, created_by, time.time())).fetchone()
            return self._consultation_of(row)

    def consultation(self, consultation_id: int) -> Consultation:
        """One consultation; :class:`ConsultationError` when there is none with that id."""
        rows = self._rows(f"SELECT {self._CONSULT_COLUMNS} FROM consultations WHERE id = ?", (consultation_id,))
        if not rows:
            raise ConsultationError(f"no consultation {consultation_id}")
        return self._consultation_of(rows[0])

    def consultations(self, job_id: int) -> list[Consultation]:
        """The job's consultations, oldest first."""
        rows = self._rows(f"SELECT {self._CONSULT_COLUMNS} FROM consultations WHERE job_id = ? ORDER BY id", (job_id,))
        return [self._consultation_of(r) for r in rows]

    def ask(self, consultation_id: int, question: str, asked_by: str, *, max_turns: int,
            token_budget: int) -> ConsultTurn:
        """Queue a question (one at a time per consultation), within the study's turn limit and token budget.

        Turns answered ``busy`` (no worker took them) do not count.

        Raises
        ------
        ConsultationError
            No such consultation; the study is no longer done with this revision; a question is still
            being answered; the turn limit or the token budget is reached.
        """
        now = time.time()
        with self._tx() as cur:
            row = self._x(cur, f"SELECT {self._CONSULT_COLUMNS} FROM consultations WHERE id = ?",
                          (consultation_id,)).fetchone()
            if row is None:
                raise ConsultationError(f"no consultation {consultation_id}")
            c = self._consultation_of(row)
            job = self._fetch_job(cur, "id = ?", (c.job_id,), lock=True)
            if job is None:
                raise JobNotFoundError(c.job_id)
            self._consultable(job)
            if job.revision != c.revision:
                raise ConsultationError("the study was analysed again since this consultation began: start a new one")
            open_turns = self._x(cur, "SELECT COUNT(*) FROM consult_turns WHERE consultation_id = ? "
                                 "AND state IN (?, ?)",
                                 (c.id, TurnState.QUEUED, TurnState.ANSWERING)).fetchone()[0]
            if int(open_turns):
                raise ConsultationError("the previous question is still being answered")
            used_turns, used_tokens = self._x(
                cur, "SELECT COUNT(*), COALESCE(SUM(t.prompt_tokens + t.completion_tokens), 0) FROM consult_turns t "
                "JOIN consultations c ON c.id = t.consultation_id WHERE c.study_uid = ? AND t.state != ?",
                (c.study_instance_uid, TurnState.BUSY)).fetchone()
            if int(used_turns) >= max_turns:
                raise ConsultationLimitError(f"turn limit reached: {max_turns} questions per study "
                                        "([consultation] max_turns)")
            if int(used_tokens) >= token_budget:
                raise ConsultationLimitError(f"token budget spent: {int(used_tokens)} of {token_budget} tokens "
                                             "for this study ([consultation] token_budget)")
            seq = int(self._x(cur, "SELECT COALESCE(MAX(seq), 0) FROM consult_turns WHERE consultation_id = ?",
                              (c.id,)).fetchone()[0]) + 1
            row = self._x(cur, "INSERT INTO consult_turns(consultation_id, seq, question, state, asked_by, asked_at) "
                          f"VALUES (?,?,?,?,?,?) RETURNING {TURN_COLUMNS}",
                          (c.id, seq, question, TurnState.QUEUED, asked_by, now)).fetchone()
            return turn_from_row(row)

    def turn(self, turn_id: int) -> ConsultTurn:
        rows = self._rows(f"SELECT {TURN_COLUMNS} FROM consult_turns WHERE id = ?", (turn_id,))
        if not rows:
            raise ConsultationError(f"no consultation turn {turn_id}")
        return turn_from_row(rows[0])

    def turns(self, consultation_id: int) -> list[ConsultTurn]:
        rows = self._rows(f"SELECT {TURN_COLUMNS} FROM consult_turns WHERE consultation_id = ? ORDER BY seq",
                          (consultation_id,))
        return [turn_from_row(r) for r in rows]

    def study_tokens(self, study_uid: str) -> int:
        """Tokens the study's consultations have used (prompt and answer, every turn)."""
        rows = self._rows("SELECT COALESCE(SUM(t.prompt_tokens + t.completion_tokens), 0) FROM consult_turns t "
                          "JOIN consultations c ON c.id = t.consultation_id WHERE c.study_uid = ?", (study_uid,))
        return int(rows[0][0])

    def claim_turn(self, owner: str, now: float) -> ConsultTurn | None:
        """Take the oldest queued question (``answering``, by ``owner``); ``None`` when none waits."""
        with self._tx() as cur:
            row = self._x(cur, f"SELECT {TURN_COLUMNS} FROM consult_turns WHERE state = ? ORDER BY id "
                          f"LIMIT 1{self.skip_locked}", (TurnState.QUEUED,)).fetchone()
            if row is None:
                return None
            turn = turn_from_row(row)
            self._x(cur, "UPDATE consult_turns SET state = ?, worker = ?, started_at = ? WHERE id = ?",
                    (TurnState.ANSWERING, owner, now, turn.id))
            return turn_from_row(self._x(cur, f"SELECT {TURN_COLUMNS} FROM consult_turns WHERE id = ?",
                                         (turn.id,)).fetchone())

    def write_answer(self, turn_id: int, owner: str, answer: str) -> None:
        """Store the answer generated so far (the web side streams it from here)."""
        with self._tx() as cur:
            self._x(cur, "UPDATE consult_turns SET answer = ? WHERE id = ? AND worker = ? AND state = ?",
                    (answer, turn_id, owner, TurnState.ANSWERING))

    def finish_turn(self, turn_id: int, owner: str, state: TurnState, answer: str, *, error: str | None = None,
                    prompt_tokens: int = 0, completion_tokens: int = 0) -> ConsultTurn:
        """End a turn the worker answered (``answered``) or could not answer (``failed``, with ``error``)."""
        if state not in (TurnState.ANSWERED, TurnState.FAILED):
            raise ValueError(f"state: a worker ends a turn answered or failed, not {state}")
        with self._tx() as cur:
            self._x(cur, "UPDATE consult_turns SET state = ?, answer = ?, error = ?, prompt_tokens = ?, "
                    "completion_tokens = ?, answered_at = ? WHERE id = ? AND worker = ?",
                    (state, answer, error, prompt_tokens, completion_tokens, time.time(), turn_id, owner))
            row = self._x(cur, f"SELECT {TURN_COLUMNS} FROM consult_turns WHERE id = ?", (turn_id,)).fetchone()
            if row is None:
                raise ConsultationError(f"no consultation turn {turn_id}")
            return turn_from_row(row)

    def give_up_turn(self, turn_id: int, error: str) -> bool:
        """End a turn no worker has taken (``busy``); ``False`` when a worker took it meanwhile."""
        with self._tx() as cur:
            return self._x(cur, "UPDATE consult_turns SET state = ?, error = ?, answered_at = ? WHERE id = ? "
                           "AND state = ?", (TurnState.BUSY, error, time.time(), turn_id, TurnState.QUEUED)
                           ).rowcount == 1

    def answering_workers(self) -> set[str]:
        """The workers holding a turn ``answering`` (to find turns of a worker that died)."""
        return {str(w) for (w,) in self._rows("SELECT DISTINCT worker FROM consult_turns WHERE state = ?",
                                              (TurnState.ANSWERING,)) if w}

    def fail_turns_of(self, owner: str, error: str) -> int:
        """End ``failed`` every turn a dead worker was answering; returns how many."""
        with self._tx() as cur:
            return int(self._x(cur, "UPDATE consult_turns SET state = ?, error = ?, answered_at = ? WHERE state = ? "
                               "AND worker = ?", (TurnState.FAILED, error, time.time(), TurnState.ANSWERING, owner)
                               ).rowcount)

    def mark_saved(self, consultation_id: int, sop_instance_uid: str) -> None:
        with self._tx() as cur:
            self._x(cur, "UPDATE consultations SET saved_uid = ? WHERE id = ?", (sop_instance_uid, consultation_id))

    # ------------------------------------------------------------------ reading
    def counts(self) -> dict[str, int]:
        """Jobs by state."""
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
        rows = self._rows(
            "SELECT sop_instance_uid, study_uid, series_uid, sop_class_uid, modality, series_description, path, "
            "transfer_syntax, size, calling_ae, received_at, unusable_reason FROM instances WHERE study_uid = ? "
            "ORDER BY received_at, sop_instance_uid", (study_uid,))
        return [InstanceRecord(*r) for r in rows]

    def outputs(self, study_uid: str, revision: int | None = None) -> list[OutputRecord]:
        sql = "SELECT sop_instance_uid, study_uid, revision, kind, sop_class_uid, path FROM outputs WHERE study_uid = ?"
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

    def end_events(self, after_id: int, limit: int = 100) -> list[EndEvent]:
        """Final-state transitions with an event id above ``after_id``, oldest first (the webhook's outbox)."""
        finals = tuple(str(s) for s in FINAL_STATES)
        rows = self._rows(
            "SELECT id, study_uid, at, to_state, detail FROM events WHERE id > ? AND to_state IN (?, ?, ?) "
            "ORDER BY id LIMIT ?", (after_id, *finals, limit))
        return [EndEvent(int(r[0]), r[1], float(r[2]), JobState(r[3]), r[4]) for r in rows]

    def last_event_id(self) -> int:
        """The newest event's id (0 when there is none)."""
        rows = self._rows("SELECT COALESCE(MAX(id), 0) FROM events", ())
        return int(rows[0][0])

    def ops_stats(self) -> OpsStats:
        """Job counts by state, inference durations and delivery totals (for ``/metrics``)."""
        delta = self.seconds_between.format(a="inferring", b="reporting")
        secs = [float(x) for (x,) in self._rows(f"SELECT {delta} FROM jobs WHERE {delta} >= 0")]
        d = self._rows(
            "SELECT COALESCE(SUM(attempts), 0), "
            "COALESCE(SUM(CASE WHEN state = 'delivered' THEN attempts - 1 ELSE attempts END), 0), "
            "COALESCE(SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN state = 'delivered' THEN 1 ELSE 0 END), 0) FROM deliveries"
        )[0]
        return OpsStats(self.counts(), secs, int(d[0]), int(d[1]), int(d[2]), int(d[3]))


