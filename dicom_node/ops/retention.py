"""Retention: delete the spool and result files of finished studies after a while.

Run by a thread in the receiving process every ``[retention] check_interval_s``:

* **Spool** (the received instances): for studies ``done`` or ``skipped`` for at least
  ``keep_spool_hours`` (0 = at the next check).  Never while a job is not final: each study's state is
  read again right before its files go.  ``failed`` studies keep their spool, so ``spinemed-node jobs
  retry`` can analyse them again.
* **Outputs** (our result objects): for studies ``done`` for at least ``keep_outputs_hours``; every
  destination has acknowledged them by then.

Only files the job store lists are deleted (and then emptied study folders), so an instance that arrives
for the same study while retention runs is never touched.  The job rows stay: they are the record.
A late instance after retention re-opens the study and its revision is analysed from what is still in
the spool.  Each deletion is written to the audit trail.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.config import NodeConfig
from dicom_node.ingest.spool import study_key
from dicom_node.jobs.model import Job, JobState, JobStore
from dicom_node.log import get_logger, phi_hash
from dicom_node.ops.audit import AuditTrail

__all__ = ["RetentionStats", "RetentionTask"]

log = get_logger(__name__)

_SPOOL_STATES = (JobState.DONE, JobState.SKIPPED)


@dataclass
class RetentionStats:
    """Files deleted since start."""

    spool_files: int = 0
    output_files: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, spool: int, outputs: int) -> None:
        with self.lock:
            self.spool_files += spool
            self.output_files += outputs

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.spool_files, self.output_files


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _prune_dirs(start: Path, stop: Path) -> None:
    """Remove ``start`` and its parents up to (not including) ``stop`` while they are empty."""
    d = start
    while d != stop and stop in d.parents:
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): the files of a newer revision or instance live there
            return
        d = d.parent


class RetentionTask:
    """Deletes expired spool and output files; :meth:`run_once` for one pass, :meth:`start` for the thread.

    Parameters
    ----------
    config
        ``[retention]`` and the data paths.
    store
        The job store (states, instance and output paths).
    audit
        Where deletions are recorded.
    """

    def __init__(self, config: NodeConfig, store: JobStore, audit: AuditTrail) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self.stats = RetentionStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self, now: float | None = None) -> tuple[int, int]:
        """One pass; returns (spool files, output files) deleted."""
        r = self.config.retention
        if not r.enabled:
            return 0, 0
        now = time.time() if now is None else now
        spool_cut = now - r.keep_spool_hours * 3600
        out_cut = now - r.keep_outputs_hours * 3600
        n_spool = n_out = 0
        for job in self.store.jobs(_SPOOL_STATES):
            key = study_key(job.study_instance_uid)
            spool_due = job.updated_at <= spool_cut and (self.config.spool_dir / key).is_dir()
            out_due = (job.state is JobState.DONE and job.updated_at <= out_cut
                       and (self.config.outputs_dir / key).is_dir())
            if not (spool_due or out_due):
                continue
            a, b = self._expire(job, spool_due, out_due)
            n_spool += a
            n_out += b
        if n_spool or n_out:
            self.stats.add(n_spool, n_out)
            log.info("retention deleted files", spool_files=n_spool, output_files=n_out)
        return n_spool, n_out

    def _expire(self, job: Job, spool_due: bool, out_due: bool) -> tuple[int, int]:
        # The files first, the state second: an instance is recorded in the same transaction that re-opens
        # its study, so one recorded after this listing is not in it, and one recorded before it has
        # changed the state read next.  (Read the other way round, a late instance recorded in between
        # was deleted, though acknowledged and wanted by the re-opened study.)
        instances = self.store.instances(job.study_instance_uid) if spool_due else []
        outputs = self.store.outputs(job.study_instance_uid) if out_due else []
        current = self.store.get(job.id)  # read again: never delete for a study that is not final
        if current.state not in _SPOOL_STATES or current.updated_at != job.updated_at:
            return 0, 0
        n_spool = n_out = 0
        if spool_due:
            root = self.config.spool_dir
            for rec in instances:
                path = Path(rec.path)
                if root in path.parents and _unlink(path):
                    n_spool += 1
                    _prune_dirs(path.parent, root)
        if out_due and current.state is JobState.DONE:
            root = self.config.outputs_dir
            for o in outputs:
                path = Path(o.path)
                if root in path.parents and _unlink(path):
                    n_out += 1
                    _prune_dirs(path.parent, root)
        if n_spool or n_out:
            self.audit.record("retention_deleted", study=phi_hash(job.study_instance_uid), job=job.id,
                              state=current.state.value, spool_files=n_spool, output_files=n_out)
        return n_spool, n_out

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        while not self._stop.wait(self.config.retention.check_interval_s):
            try:
                self.run_once()
            except Exception:  # keep the task alive; the error is logged with its traceback
                log.exception("retention pass failed")

    def start(self) -> None:
        if not self.config.retention.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
