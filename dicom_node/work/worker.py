"""The worker: loads the model once and works the job queue.

For each claimed job: (re)analyse when it is ``complete`` — inferring → reporting, result objects
written atomically and recorded together with their pending deliveries — then ``exporting`` until
every destination acknowledged every object (→ ``done``), or a delivery ran out of attempts
(→ ``failed``).  Each step is committed before the next starts, so a killed worker resumes where it
stopped: an analysis is redone, a delivery already acknowledged is never repeated.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.config import NodeConfig
from dicom_node.delivery.dispatch import deliver
from dicom_node.delivery.result import backoff_delay
from dicom_node.errors import is_transient
from dicom_node.ingest.spool import study_key
from dicom_node.jobs.completeness import due_at
from dicom_node.jobs.model import Job, JobState, JobStore, OutputRecord
from dicom_node.log import get_logger, phi_hash, use_phi_key
from dicom_node.ops.audit import open_audit
from dicom_node.shadow import ShadowWatcher
from dicom_node.work.consult import ConsultationServer
from dicom_node.work.heartbeat import HeartbeatWriter, heartbeat_path
from dicom_node.work.pipeline import Pipeline, output_kind
from dicom_node.work.priors import look_up_prior
from inference.errors import InferenceError, UnusableStudyError
from inference.study import StudyError, load_study, read_header
from sr_templates.errors import ReportError

__all__ = ["HeaderCache", "Worker", "write_dataset_atomic"]

log = get_logger(__name__)

#: Short wait of an idle worker around the moment a study falls due.
_SOON_S = 0.01


class HeaderCache:
    """Headers of the instances of studies still arriving, read while the worker is idle.

    By the time a study is complete most of its headers are already read, so the analysis starts without
    reading them (a 300-slice CT: about 0.3 s).  An entry is used only while its file keeps the size and
    modification time it had when read (the spool never rewrites a file); entries of studies that are no
    longer arriving or complete are dropped.
    """

    def __init__(self, max_entries: int = 4000) -> None:  # a CT header is ~30 kB in memory: ~120 MB at most
        self.max_entries = max_entries
        self._headers: dict[str, tuple[int, int, Dataset]] = {}  # path → (size, mtime_ns, header)
        self._read: dict[str, int] = {}  # study UID → instances read for it
        self._lock = threading.Lock()  # analysis threads take while the main loop prefetches

    def __len__(self) -> int:
        return len(self._headers)

    def prefetch(self, store: JobStore, budget_s: float) -> bool:
        """Read headers of arriving studies for about ``budget_s`` (at least one header); True if there is
        more to read."""
        with self._lock:
            return self._prefetch(store, budget_s)

    def _prefetch(self, store: JobStore, budget_s: float) -> bool:
        deadline = time.monotonic() + budget_s
        done = 0
        jobs = store.jobs([JobState.RECEIVING, JobState.COMPLETE])
        wanted = {j.study_instance_uid for j in jobs}
        for uid in [u for u in self._read if u not in wanted]:  # claimed, failed or gone: forget it
            self._forget(uid, store)
        for job in jobs:
            uid = job.study_instance_uid
            if self._read.get(uid, 0) >= job.instance_count:
                continue
            for rec in store.instances(uid):
                if rec.path in self._headers:
                    continue
                if len(self._headers) >= self.max_entries or (done and time.monotonic() > deadline):
                    return len(self._headers) < self.max_entries
                try:
                    st = os.stat(rec.path)
                    ds = read_header(rec.path)
                except (OSError, ValueError, TypeError, EOFError, InvalidDicomError):
                    continue  # load_study reads (or skips) it in its turn
                done += 1
                self._headers[rec.path] = (st.st_size, st.st_mtime_ns, ds)
                self._read[uid] = self._read.get(uid, 0) + 1
        return False

    def take(self, paths: Sequence[str]) -> dict[Path, Dataset]:
        """The still valid headers of ``paths``, removed from the cache."""
        out: dict[Path, Dataset] = {}
        with self._lock:
            entries = [(path, self._headers.pop(path, None)) for path in paths]
        for path, entry in entries:
            if entry is None:
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) == entry[:2]:
                out[Path(path)] = entry[2]
        return out

    def _forget(self, study_uid: str, store: JobStore) -> None:
        self._read.pop(study_uid, None)
        for rec in store.instances(study_uid):
            self._headers.pop(rec.path, None)


def write_dataset_atomic(ds: Dataset, path: Path) -> None:
    """Write a Part 10 file durably: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    ds.save_as(tmp, enforce_file_format=True)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _thread_owner() -> str:
    """The lease owner name of the calling thread: ``host:pid:thread`` (:meth:`Worker.reclaim_dead_leases`
    reads the host and pid back)."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Worker:
    """Works jobs from a :class:`JobStore` (SQLite or PostgreSQL) through a :class:`Pipeline`."""

    def __init__(self, config: NodeConfig, store: JobStore, pipeline: Pipeline | None = None) -> None:
        self.config = config
        config.node.data_dir.mkdir(parents=True, exist_ok=True)
        use_phi_key(config.node.data_dir)  # the digest of identifiers in logs and the audit trail
        self.store = store
        self.pipeline = pipeline or Pipeline(config)
        self.owner = _thread_owner()
        self._stop = threading.Event()
        self._export_due = threading.Event()  # wakes the export threads when a study's results are written
        # operations: audit trail of deliveries, heartbeat file read by /health/ready
        self.audit = open_audit(config)
        self.heartbeat = HeartbeatWriter(heartbeat_path(config.node.data_dir))
        self.headers = HeaderCache()
        self.consultations = ConsultationServer(config, store, self.pipeline, self.audit, self.owner)
        self.shadow = ShadowWatcher(config, store)

    # ------------------------------------------------------------------ lifecycle
    def reclaim_dead_leases(self) -> int:
        """Release leases held by workers on this host that no longer run (after a crash or SIGKILL)."""
        host = socket.gethostname()
        n = 0
        for job in self.store.jobs(list(JobState)):
            owner = job.lease_owner
            if not owner or not owner.startswith(host + ":"):
                continue
            pid = int(owner.split(":")[1])
            if pid != os.getpid() and not _pid_alive(pid):
                self.store.force_release(job.id)
                n += 1
        for owner in self.store.answering_workers():  # consultation turns it was answering: ask again
            if owner.startswith(host + ":") and int(owner.split(":")[1]) != os.getpid() \
                    and not _pid_alive(int(owner.split(":")[1])):
                n += self.store.fail_turns_of(owner, "the worker stopped while answering: ask again")
        return n

    def stop(self) -> None:
        self._stop.set()
        self._export_due.set()

    def run_forever(self) -> None:
        self.reclaim_dead_leases()
        self.heartbeat.start()
        try:
            _ = self.pipeline.model  # load once, before the first job
            warm = self.pipeline.warm_up()  # and the stages' one-time costs (imports, tables)
            ident = self.pipeline.model.identity
            self.heartbeat.ready(ident.name, ident.version, ident.demo)
            log.info("worker ready", model=ident.name, warm_up_s=round(warm, 3))
            exporters = [threading.Thread(target=self._export_loop, name=f"export-{i}", daemon=True)
                         for i in range(self.config.worker.export_threads)]
            for t in exporters:
                t.start()
            inline = not exporters
            analysers = [threading.Thread(target=self._analysis_loop, args=(inline,), name=f"analysis-{i}",
                                          daemon=True) for i in range(1, self.config.worker.analysis_threads)]
            for t in analysers:
                t.start()
            try:
                while not self._stop.is_set():
                    # consultation questions first: someone waits for each; they never interrupt a study
                    if self._shadow() or self._consult() or self.run_once(export_inline=inline):
                        continue
                    # idle: read the headers of studies still arriving, in short turns between claims
                    if not self._prefetch():
                        self._stop.wait(self.idle_wait())
            finally:
                self._export_due.set()
                for t in analysers:
                    t.join(timeout=self.config.model.timeout_s + 10)
                for t in exporters:
                    t.join(timeout=self.config.export.timeout_s + 10)
        finally:
            self.heartbeat.stop()
            self.audit.close()
            self.pipeline.close()

    def run_once(self, *, export_inline: bool = True, owner: str | None = None) -> bool:
        """Claim and work one job; ``False`` when there was nothing to do.

        ``export_inline=False`` (the worker's export threads run): claim analyses only, and hand a study whose
        results are written to the export threads, so that the model starts on the next study while they send.
        ``owner``: the lease owner of the calling thread (default: the worker's main loop).
        """
        owner = owner or self.owner
        job = self.store.claim(owner, time.time(), self.config.worker.lease_seconds,
                               work="any" if export_inline else "analysis")
        if job is None:
            return False
        self.heartbeat.job = job.id
        try:
            if job.state is JobState.COMPLETE:
                job = self._analyse(job, owner)
            if job.state is JobState.EXPORTING:
                if export_inline:
                    self._export(job, owner)
                else:
                    self.store.release(job.id, owner)
                    self._export_due.set()
        except Exception as exc:
            self._internal_error(job, exc, owner)
        return True

    def _analysis_loop(self, export_inline: bool) -> None:
        """A further analysis thread (``[worker] analysis_threads`` > 1): studies analysed side by side, for a
        model that takes concurrent requests (a vLLM server batches them); one that does not is used by one
        thread at a time (:meth:`dicom_node.work.pipeline.Pipeline.run`)."""
        owner = _thread_owner()
        while not self._stop.is_set():
            try:
                if self.run_once(export_inline=export_inline, owner=owner):
                    continue
            except Exception:  # a store problem: the main loop's claim reports it too
                log.exception("analysis claim failed")
            self._stop.wait(self.idle_wait())

    def _export_loop(self) -> None:
        """One export thread: send the results of studies whose deliveries are due, beside the analyses."""
        owner = _thread_owner()
        poll = self.config.worker.poll_interval_s
        while not self._stop.is_set():
            try:
                job = self.store.claim(owner, time.time(), self.config.worker.lease_seconds, work="export")
            except Exception:  # a store problem: the analysis loop's claim reports it too
                log.exception("export claim failed")
                self._stop.wait(poll)
                continue
            if job is None:
                self._export_due.wait(poll)
                self._export_due.clear()
                continue
            try:
                self._export(job, owner)
            except Exception as exc:
                self._internal_error(job, exc, owner)

    def _consult(self) -> bool:
        """Answer the queued consultation questions; ``False`` when there were none."""
        if not self.config.consultation.enabled:
            return False
        try:
            return self.consultations.serve_pending() > 0
        except Exception:  # a store problem: the claim of the next study reports it too
            log.exception("consultation queue failed")
            return False

    def _shadow(self) -> bool:
        """Compare the site's label files with the kept findings (shadow mode), when a look is due."""
        if not self.shadow.enabled:
            return False
        try:
            return self.shadow.poll() > 0
        except Exception:  # a store or folder problem: logged, tried again at the next poll
            log.exception("shadow labels failed")
            return False

    def idle_wait(self, now: float | None = None) -> float:
        """How long an idle worker waits before it looks for work again: ``poll_interval_s``, or until just
        after the next receiving study falls due, then briefly at a short interval while the receiver's
        completeness check completes it — a claim within milliseconds, not up to a poll interval later.
        """
        poll = self.config.worker.poll_interval_s
        completeness = self.config.completeness
        now = time.time() if now is None else now
        try:
            jobs = self.store.jobs([JobState.RECEIVING])
        except Exception:  # the claim that follows reports a store problem
            return poll
        wait = poll
        for job in jobs:
            due = due_at(job, completeness)
            if due is None:
                continue
            if due > now:
                wait = min(wait, due - now + _SOON_S)
            elif now - due <= completeness.check_interval_s + _SOON_S:
                wait = min(wait, _SOON_S)
        return max(wait, 0.0)

    def _prefetch(self) -> bool:
        try:
            return self.headers.prefetch(self.store, budget_s=0.02)
        except Exception:  # an optimisation only: never let it stop the worker
            log.exception("header prefetch failed")
            return False

    def _internal_error(self, job: Job, exc: Exception, owner: str) -> None:
        """A bug or an unexpected store error while working ``job`` (called in its ``except`` block): logged
        with its traceback, and the job failed with the exception as its reason."""
        log.exception("job failed with an internal error", job=job.id)
        self._fail(job, f"internal error: {type(exc).__name__}: {exc}", owner)

    def _fail(self, job: Job, reason: str, owner: str) -> None:
        current = self.store.get(job.id)
        if current.lease_owner == owner:
            self.store.transition(job.id, owner, JobState.FAILED, reason=reason[:1000])

    # ------------------------------------------------------------------ stages
    def _analyse(self, job: Job, owner: str) -> Job:
        job = self.store.transition(job.id, owner, JobState.INFERRING)  # attempts now counts this analysis
        records = self.store.instances(job.study_instance_uid)
        try:
            paths = [r.path for r in records]
            study = load_study(paths, study_instance_uid=job.study_instance_uid, known_headers=self.headers.take(paths))
        except StudyError as exc:
            return self.store.transition(job.id, owner, JobState.FAILED, reason=f"unreadable study: {exc}")
        revision = job.revision + 1
        predecessors = self._previous_outputs(job)
        t_prior = time.perf_counter()
        prior = look_up_prior(self.config, study)  # PACS errors become the reason: never holds the report back
        prior_s = time.perf_counter() - t_prior
        try:
            outcome = self.pipeline.run(study, revision=revision, predecessors=predecessors, prior=prior)
        except UnusableStudyError as exc:
            self.store.mark_unusable(job.study_instance_uid, {e.sop_instance_uid: e.reason for e in exc.excluded})
            return self._analysis_failed(job, exc, owner)
        except InferenceError as exc:
            return self._analysis_failed(job, exc, owner)
        except ReportError as exc:  # highdicom refused what these findings and headers made: final
            log.warning("report could not be built", job=job.id, exc_info=True)
            return self.store.transition(job.id, owner, JobState.FAILED,
                                         reason=f"report could not be built: {exc}"[:1000])
        self.store.mark_unusable(job.study_instance_uid, {e.sop_instance_uid: e.reason for e in outcome.excluded})
        self.heartbeat.model_status(True)
        if outcome.skipped_reason is not None:
            log.info("study skipped", job=job.id)
            return self.store.transition(job.id, owner, JobState.SKIPPED, reason=outcome.skipped_reason)
        self.store.transition(job.id, owner, JobState.REPORTING)
        out_dir = self.config.outputs_dir / study_key(job.study_instance_uid) / f"r{revision}"
        records_out: list[OutputRecord] = []
        for ds in outcome.datasets:
            kind = output_kind(ds)
            path = out_dir / f"{kind}-{ds.SOPInstanceUID}.dcm"
            write_dataset_atomic(ds, path)
            records_out.append(
                OutputRecord(
                    str(ds.SOPInstanceUID),
                    job.study_instance_uid,
                    revision,
                    kind,
                    str(ds.SOPClassUID),
                    str(path),
                )
            )
        destinations = [] if self.config.routing.dry_run else [d.name for d in self.config.destinations]
        log.info(
            "results written",
            job=job.id,
            revision=revision,
            objects=len(records_out),
            seconds={k: round(v, 3) for k, v in outcome.seconds.items()},
            dry_run=self.config.routing.dry_run,
        )
        kinds = {d.name: d.output_kinds for d in self.config.destinations if d.output_kinds is not None}
        note = None
        if outcome.comparison is not None:
            note = (f"without comparison: {outcome.comparison.unavailable}" if outcome.comparison.prior is None
                    else f"compared with a prior study: {len(outcome.comparison.changes)} changes")
            log.info("comparison with prior", job=job.id, compared=outcome.comparison.prior is not None,
                     seconds=round(prior_s, 3))
        if outcome.findings is not None:  # what a consultation about this revision carries
            self.store.record_findings(job.study_instance_uid, revision, outcome.findings.model_dump_json())
        return self.store.finish_report(job.id, owner, revision, records_out, destinations, kinds, note)

    def _analysis_failed(self, job: Job, exc: InferenceError, owner: str) -> Job:
        """A transient failure (the model server down or busy, out of GPU memory, too slow) defers the study
        with the persisted backoff, up to ``[worker] model_max_attempts`` analyses; a permanent one fails it."""
        cfg = self.config.worker
        reason = f"{type(exc).__name__}: {exc}"
        attempts = job.attempts
        if is_transient(exc) and attempts < cfg.model_max_attempts:
            delay = backoff_delay(attempts, cfg.model_backoff_initial_s, cfg.model_backoff_max_s)
            log.warning("analysis deferred: the model is unavailable", job=job.id, error=type(exc).__name__,
                        attempt=attempts, retry_in_s=round(delay, 1), reason=reason[:300])
            self.heartbeat.model_status(False, reason[:300])
            return self.store.defer_analysis(
                job.id, owner, time.time() + delay,
                reason=f"waiting for the model (attempt {attempts} of {cfg.model_max_attempts}): {reason}"[:1000],
            )
        self.heartbeat.model_status(not is_transient(exc), reason[:300] if is_transient(exc) else None)
        if is_transient(exc):
            reason = f"model unavailable after {attempts} attempts: {reason}"
        log.warning("analysis failed", job=job.id, error=type(exc).__name__, reason=reason[:300])
        return self.store.transition(job.id, owner, JobState.FAILED, reason=reason[:1000])

    def _previous_outputs(self, job: Job) -> list[Dataset]:
        if job.revision < 1:
            return []
        out: list[Dataset] = []
        for rec in self.store.outputs(job.study_instance_uid, job.revision):
            if rec.kind in ("measurement_report", "narrative_report") and Path(rec.path).is_file():
                out.append(pydicom.dcmread(rec.path))
        return out

    def _export(self, job: Job, owner: str) -> None:
        cfg = self.config
        pending = [d for d in self.store.deliveries(job.study_instance_uid, job.revision) if d.state != "delivered"]
        failed = [d for d in pending if d.state == "failed"]
        if failed:
            why = "; ".join(f"{d.destination}: {d.last_error}" for d in failed[:5])
            self.store.transition(job.id, owner, JobState.FAILED, reason=f"delivery failed: {why}")
            return
        if not pending:
            reason: str | None = (
                "dry run: results written, not exported"
                if cfg.routing.dry_run
                else (None if cfg.destinations else "no destinations configured: results kept on disk")
            )
            self.store.transition(job.id, owner, JobState.DONE, reason=reason)
            return
        paths = {o.sop_instance_uid: Path(o.path) for o in self.store.outputs(job.study_instance_uid, job.revision)}
        by_dest: dict[str, list[str]] = defaultdict(list)
        for d in pending:
            by_dest[d.destination].append(d.output_uid)
        dests = {d.name: d for d in cfg.destinations}
        max_attempts = 0
        gave_up: list[str] = []
        for name, uids in by_dest.items():
            attempts = max(d.attempts for d in pending if d.destination == name) + 1
            dest = dests.get(name)
            if dest is None:
                for u in uids:
                    self.store.record_delivery(u, name, False, None, "destination no longer configured", None, True)
                gave_up.append(f"{name}: no longer configured")
                continue
            results = deliver(
                dest,
                [paths[u] for u in uids],
                calling_ae=cfg.export.calling_ae_title or cfg.node.ae_title,
                timeout_s=cfg.export.timeout_s,
            )
            give_up = attempts >= cfg.export.max_attempts
            nxt = (
                None
                if give_up
                else time.time() + backoff_delay(attempts, cfg.export.backoff_initial_s, cfg.export.backoff_max_s)
            )
            for r in results:
                # a refusal retrying cannot change (SOP class not supported, HTTP 4xx) ends at once
                final = give_up or (r.permanent and not r.delivered)
                status = None if r.status is None else f"0x{r.status:04X}"
                self.audit.record(
                    "result_sent",
                    destination=name,
                    study=phi_hash(job.study_instance_uid),
                    sop=phi_hash(r.sop_instance_uid),
                    revision=job.revision,
                    attempt=attempts,
                    outcome="delivered" if r.delivered else ("failed" if final else "retry"),
                    status=status,
                    error=r.error,
                )
                self.store.record_delivery(
                    r.sop_instance_uid,
                    name,
                    r.delivered,
                    status,
                    r.error,
                    None if r.delivered or final else nxt,
                    final and not r.delivered,
                )
                if not r.delivered:
                    log.warning("delivery failed", job=job.id, destination=name, attempt=attempts, error=r.error,
                                permanent=r.permanent)
                    if final:
                        gave_up.append(f"{name}: {r.error}" + (" (permanent)" if r.permanent else ""))
            max_attempts = max(max_attempts, attempts)
        remaining = [d for d in self.store.deliveries(job.study_instance_uid, job.revision) if d.state != "delivered"]
        if not remaining:
            log.info("delivered", job=job.id, revision=job.revision)
            self.store.transition(job.id, owner, JobState.DONE)
        elif gave_up or any(d.state == "failed" for d in remaining):
            reason = "; ".join(list(dict.fromkeys(gave_up))[:5]) or "delivery failed"  # each reason once
            self.store.transition(
                job.id,
                owner,
                JobState.FAILED,
                reason=(f"delivery failed after {cfg.export.max_attempts} attempts: {reason}"
                        if max_attempts >= cfg.export.max_attempts else f"delivery refused: {reason}"),
            )
        else:
            nxt_at = min(d.next_attempt_at or time.time() for d in remaining)
            self.store.set_next_attempt(job.id, owner, nxt_at)
