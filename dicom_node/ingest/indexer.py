"""The instance index: acknowledged instances recorded in the job store and the audit trail, in batches.

The listener answers Success once an instance's bytes are fsynced and linked into the spool
(:mod:`dicom_node.ingest.receive`); the spool file is the durable record.  This indexer then records the
instances in the job store and appends their audit lines, one transaction and one audit fsync per
batch (group commit): with several associations sending at once, a batch holds one instance from
each.  Recording usually follows the Success within a few milliseconds.

If the process dies between the two, :func:`reconcile` finds the spool files the job store does not
know and records them at the next start, so no acknowledged instance is ever missing from a study.
If the job store is unavailable, batches are retried with backoff and nothing is dropped.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_node.errors import StoreError
from dicom_node.ingest.batching import BatchThread
from dicom_node.ingest.header import HeaderFields
from dicom_node.jobs.model import InstanceRecord, JobStore
from dicom_node.log import get_logger, phi_hash
from dicom_node.ops.audit import AuditTrail

__all__ = ["InstanceIndexer", "instance_record", "reconcile"]

log = get_logger(__name__)

_MAX_BATCH = 256
#: How long the indexer lets a batch fill before committing it.  Every commit costs two fsyncs (job
#: store, audit trail), and on one file system they queue behind the listener's own (spool file and
#: directory) — so a short window keeps the listener's fsyncs alone on the disk.
BATCH_WINDOW_S = 0.05
_RETRY_S = (0.1, 0.5, 2.0, 5.0)


@dataclass(frozen=True)
class _Pending:
    record: InstanceRecord
    audit: dict[str, Any]


class InstanceIndexer(BatchThread):
    """Background group commit of received instances into the job store and the audit trail.

    Parameters
    ----------
    store
        The job store.
    audit
        The audit trail; each recorded instance gets an ``instance_received`` line.
    truth_dir
        ``[shadow] labels_dir``: where a radiologist's TID 1500 SR for a study the node knows goes, as the
        site's truth for shadow mode, instead of into the study (``None``: shadow mode off).
    """

    def __init__(self, store: JobStore, audit: AuditTrail, truth_dir: Path | None = None) -> None:
        super().__init__("instance-indexer")
        self.store = store
        self.audit = audit
        self.truth_dir = truth_dir
        self.diverted = 0
        self._diverted_sops: set[str] = set()  # moved out of the spool, in a batch not yet committed
        self.batches = 0
        self.recorded = 0
        self.failures = 0
        self._queue: list[_Pending] = []

    def start(self) -> None:
        self._start_thread()

    def submit(self, record: InstanceRecord, **audit_fields: Any) -> None:
        """Queue one acknowledged instance (its spool file is already durable)."""
        with self._cond:
            self._queue.append(_Pending(record, audit_fields))
            self._submitted += 1
            if len(self._queue) == 1 or len(self._queue) >= _MAX_BATCH:
                self._cond.notify_all()

    def _is_truth(self, rec: InstanceRecord) -> bool:
        """Whether ``rec`` is a radiologist's TID 1500 SR (not ours) for a study the node knows; if so it has
        been moved from the spool into ``truth_dir``."""
        if rec.sop_instance_uid in self._diverted_sops:
            return True  # a retried batch: the file is in truth_dir already
        if _is_truth_of(self, rec):
            self._diverted_sops.add(rec.sop_instance_uid)
            return True
        return False

    def stop(self, timeout: float = 30.0) -> None:
        """Record what is queued (up to ``timeout``), then stop."""
        self._stop_thread(timeout)
        if self._queue:
            log.error("indexer stopped with instances not recorded; they are recovered at the next start",
                      instances=len(self._queue))

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop and not self._queue:
                    return
                deadline = time.monotonic() + BATCH_WINDOW_S
                while len(self._queue) < _MAX_BATCH and not self._stop and not self._flushers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._queue[:_MAX_BATCH]
            try:
                truth = {id(p) for p in batch if self._is_truth(p.record)} if self.truth_dir is not None else set()
                recorded = [p for p in batch if id(p) not in truth]
                fresh_of = dict(zip((id(p) for p in recorded),
                                    self.store.record_instances([p.record for p in recorded]), strict=True))
                fresh = [fresh_of.get(id(p), False) for p in batch]
            except (StoreError, OSError) as exc:
                failures += 1
                self.failures += 1
                delay = _RETRY_S[min(failures, len(_RETRY_S)) - 1]
                log.error("job store write failed; instances stay queued and are retried", detail=str(exc),
                          queued=len(batch), retry_in_s=delay)
                with self._cond:
                    if not self._stop:
                        self._cond.wait(delay)
                    elif failures > len(_RETRY_S):
                        return  # stopping and the store stays down: reconcile() recovers them at the next start
                continue
            failures = 0
            for pending, new in zip(batch, fresh, strict=True):
                outcome = "stored" if new else "ignored (a resend, or one of our own results)"
                if id(pending) in truth:
                    outcome = "shadow-mode truth (a radiologist's SR): not a study update"
                self.audit.record("instance_received", durable=False, status="0x0000", outcome=outcome,
                                  **pending.audit)
            try:
                self.audit.flush()
            except OSError as exc:  # the audit trail keeps the lines queued and retries on its own
                log.error("audit trail not writable", detail=str(exc))
            self._diverted_sops.difference_update(p.record.sop_instance_uid for p in batch)
            with self._cond:
                del self._queue[: len(batch)]
                self._done += len(batch)
                self.batches += 1
                self.recorded += len(batch)
                self._cond.notify_all()


_SR_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
})


def _tid1500(path: Path) -> Any:
    """The data set at ``path`` when it is a TID 1500 measurement report, else ``None``."""
    ds = dcmread(path, stop_before_pixels=True)
    templates = ds.get("ContentTemplateSequence") or []
    return ds if any(str(t.get("TemplateIdentifier", "")).strip() == "1500" for t in templates) else None


def _is_truth_of(indexer: InstanceIndexer, rec: InstanceRecord) -> bool:
    from dicom_node.errors import JobNotFoundError
    from dicom_node.network.priors import is_our_report

    assert indexer.truth_dir is not None
    if rec.sop_class_uid not in _SR_CLASSES:
        return False
    try:
        indexer.store.by_study(rec.study_instance_uid)
    except JobNotFoundError:
        return False  # not a study the node knows: an SR like any other instance
    try:
        ds = _tid1500(Path(rec.path))
    except Exception as exc:  # unreadable: it goes the ordinary way (and its study's analysis says so)
        log.warning("SR not readable as shadow-mode truth", error=type(exc).__name__,
                    sop=phi_hash(rec.sop_instance_uid))
        return False
    if ds is None or is_our_report(ds):
        return False
    folder = indexer.truth_dir
    folder.mkdir(parents=True, exist_ok=True)
    name = f"sr-{phi_hash(rec.sop_instance_uid)}.dcm"
    tmp = folder / f".{name}.{os.getpid()}"
    shutil.copyfile(rec.path, tmp)
    os.replace(tmp, folder / name)  # the watcher sees the whole file or none
    Path(rec.path).unlink()  # out of the spool: never a source instance, not even after a crash
    indexer.diverted += 1
    log.info("radiologist's SR taken as shadow-mode truth", study=phi_hash(rec.study_instance_uid))
    return True


def instance_record(fields: HeaderFields, path: Path, transfer_syntax_uid: str, size: int, calling_ae: str,
                    received_at: float) -> InstanceRecord:
    """The job-store record of a spooled instance."""
    return InstanceRecord(
        sop_instance_uid=fields.sop_instance_uid,
        study_instance_uid=fields.study_instance_uid,
        series_instance_uid=fields.series_instance_uid,
        sop_class_uid=fields.sop_class_uid,
        modality=fields.modality,
        series_description=fields.series_description,
        path=str(path),
        transfer_syntax_uid=transfer_syntax_uid,
        size=size,
        calling_ae=calling_ae,
        received_at=received_at,
    )


def _record_from_file(path: Path) -> InstanceRecord:
    ds = dcmread(path, stop_before_pixels=True)
    meta = ds.file_meta
    st = path.stat()
    return instance_record(HeaderFields.from_dataset(ds), path, str(meta.TransferSyntaxUID), st.st_size,
                           str(meta.get("SourceApplicationEntityTitle", "") or "").strip(), st.st_mtime)


def reconcile(spool_root: Path, store: JobStore, audit: AuditTrail) -> int:
    """Record every spool file the job store does not know (acknowledged just before a crash).

    Returns the number of instances recovered.  Our own results routed back to us are in the spool
    too and are never recorded as sources; they are skipped again here.
    """
    known = store.instance_paths()
    found: list[InstanceRecord] = []
    for study_dir in os.scandir(spool_root):
        if not study_dir.is_dir() or study_dir.name.startswith("."):
            continue
        for entry in os.scandir(study_dir.path):
            if not entry.name.endswith(".dcm") or entry.path in known:
                continue
            try:
                found.append(_record_from_file(Path(entry.path)))
            except Exception as exc:  # a spool file is complete by construction; say so loudly if not
                log.error("spool file unreadable during reconcile; left in place", file=entry.name,
                          error=type(exc).__name__)
    recovered = 0
    for at in range(0, len(found), _MAX_BATCH):
        batch = found[at : at + _MAX_BATCH]
        for rec, new in zip(batch, store.record_instances(batch), strict=True):
            if new:
                recovered += 1
                audit.record("instance_received", durable=False, status="0x0000", outcome="recovered",
                             calling_ae=rec.calling_ae, study=phi_hash(rec.study_instance_uid),
                             sop=phi_hash(rec.sop_instance_uid))
    audit.flush()
    if recovered:
        log.warning("instances acknowledged before a crash recorded from the spool", instances=recovered)
    return recovered
