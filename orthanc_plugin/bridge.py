"""The bridge between Orthanc and the node, run on one background thread inside Orthanc.

Orthanc's ``OnChange`` callback only wakes this thread (callbacks are serialised under one GIL and must
return at once).  The thread does all the work, from durable sources only:

1. **Events** come from Orthanc's change log (``GET /changes``), which Orthanc persists: a
   ``StableStudy`` marks the study *pending* in the plugin's outbox.  The cursor stored in the outbox
   only moves past a change once its study is stable and recorded, so a crash of Orthanc between an
   instance's arrival and the study becoming stable is caught up at the next start (Orthanc itself
   does not re-fire ``StableStudy`` after a restart).
2. **Sending**: for a pending study the bridge lists its instances, drops our own result objects (the
   loop guard: :mod:`orthanc_plugin.guard` plus the node's own output UIDs) and every instance the node
   already received (the node's job store or its HTTP API, read-only), and hands the rest to Orthanc's job engine:
   ``POST /modalities/<node>/store`` with ``"Asynchronous": true``.  Orthanc persists the job and runs
   it off this thread; the node receives the instances on its ordinary C-STORE listener, so the study
   enters the same spool → job store → completeness → worker path as from any PACS.
3. **Status**: the bridge follows the Orthanc job, then the node's job, and writes the study's status
   (``spinemed-queued`` / ``spinemed-done`` / ``spinemed-failed`` / ``spinemed-skipped``) as study
   metadata, plus labels where Orthanc has them (1.12+).

The node sends its results back to Orthanc as an ordinary destination (C-STORE or STOW-RS).  They make
the study stable again; the bridge finds nothing unsent and leaves it.  New source images make it find
exactly those, send them, and the node re-opens its job for one new revision.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

from orthanc_plugin.guard import split_series
from orthanc_plugin.nodestore import NodeStoreUnavailable, NodeView
from orthanc_plugin.outbox import Outbox, StudyRow
from orthanc_plugin.settings import INFO_METADATA, STATUS_METADATA, PluginSettings

__all__ = ["STATUSES", "Bridge", "Logger", "Rest", "RestError"]

QUEUED, DONE, FAILED, SKIPPED = "spinemed-queued", "spinemed-done", "spinemed-failed", "spinemed-skipped"
#: Every status value (also the label names on Orthanc 1.12+).
STATUSES = (QUEUED, DONE, FAILED, SKIPPED)


class RestError(RuntimeError):
    """An Orthanc REST call failed; ``not_found`` when the resource does not exist (any more)."""

    def __init__(self, message: str, *, not_found: bool = False) -> None:
        super().__init__(message)
        self.not_found = not_found


class Rest(Protocol):
    """Orthanc's REST API as seen from inside the plugin (JSON in, JSON out)."""

    def get(self, uri: str) -> Any: ...
    def post(self, uri: str, body: Any) -> Any: ...
    def put(self, uri: str, body: str) -> None: ...
    def delete(self, uri: str) -> None: ...


class Logger(Protocol):
    def info(self, message: str) -> None: ...
    def warning(self, message: str) -> None: ...
    def error(self, message: str) -> None: ...


def _version_at_least(version: str, wanted: tuple[int, int]) -> bool:
    parts = version.split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= wanted
    except (ValueError, IndexError):
        return version == "mainline"


class Bridge:
    """Watches Orthanc's change log and moves stable spine studies through the node.

    Parameters
    ----------
    rest
        Orthanc's REST API.
    settings
        The ``SpineMed`` configuration section.
    outbox
        The plugin's durable state.
    node
        What the node says of each study: its job store file or its HTTP API, read-only.
    log
        Where to log (Orthanc's log).  Messages carry Orthanc resource IDs (opaque hashes), never
        patient data or DICOM UIDs.
    """

    def __init__(self, rest: Rest, settings: PluginSettings, outbox: Outbox, node: NodeView,
                 log: Logger) -> None:
        self.rest = rest
        self.settings = settings
        self.outbox = outbox
        self.node = node
        self.log = log
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: int | None = None  # last change sequence number read
        self._open: dict[str, int] = {}  # study id → first change seq not yet followed by StableStudy
        self._series_study: dict[str, str] = {}
        self._labels: bool | None = None
        self._node_down_logged = False

    # ------------------------------------------------------------------ lifecycle
    def notify(self) -> None:
        """Wake the thread (called from Orthanc's change callback: must stay trivial)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spinemed-bridge", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        try:
            self.recover(time.time())
        except Exception as exc:
            self.log.error(f"SpineMed: recovery from the change log failed: {type(exc).__name__}: {exc}")
        while not self._stop.is_set():
            try:
                self.tick(time.time())
            except Exception as exc:
                self.log.error(f"SpineMed: bridge round failed: {type(exc).__name__}: {exc}")
            self._wake.wait(self.settings.poll_seconds)
            self._wake.clear()

    # ------------------------------------------------------------------ change log
    def recover(self, now: float) -> None:
        """At start: catch up with changes since the stored cursor.

        Studies that received instances but never became stable before Orthanc stopped are marked
        pending, due one stability period from now (a sender still sending makes them unstable again
        and Orthanc fires ``StableStudy`` as usual).  On the very first start the cursor is set to the
        end of the log: installing the plugin does not send the existing archive.
        """
        cursor = self.outbox.cursor()
        if cursor is None:
            last = self.rest.get("/changes?last")
            seq = int(last.get("Last", 0)) if isinstance(last, Mapping) else 0
            self.outbox.set_cursor(seq)
            self._seen = seq
            self.log.info(f"SpineMed: first start, following Orthanc's change log from sequence {seq}")
            return
        self._seen = cursor
        self.scan_changes()
        if self._open:
            self.log.warning(f"SpineMed: {len(self._open)} study(ies) were not yet stable when Orthanc "
                             "stopped: looking at them again")
        for study_id in self._open:
            self.outbox.mark_pending(study_id, at=now + self.settings.stable_age_s)
        self._open.clear()
        if self._seen is not None:
            self.outbox.set_cursor(self._seen)

    def scan_changes(self) -> None:
        """Read new entries of the change log; stable studies become pending."""
        if self._seen is None:
            self._seen = self.outbox.cursor() or 0
        while True:
            page = self.rest.get(f"/changes?since={self._seen}&limit=500")
            changes = page.get("Changes", []) if isinstance(page, Mapping) else []
            for change in changes:
                self._on_change(change)
                self._seen = max(self._seen, int(change.get("Seq", self._seen)))
            if not changes or page.get("Done", True):
                break
        cursor = min(self._open.values()) - 1 if self._open else self._seen
        if cursor != self.outbox.cursor():
            self.outbox.set_cursor(cursor)

    def _on_change(self, change: Mapping[str, Any]) -> None:
        kind = change.get("ChangeType")
        rid = change.get("ID")
        seq = int(change.get("Seq", 0))
        if not isinstance(rid, str):
            return
        if kind == "NewInstance":
            study = self._study_of_instance(rid)
            if study is not None:
                self._open.setdefault(study, seq)
        elif kind == "StableStudy":
            self._open.pop(rid, None)
            self.outbox.mark_pending(rid)
        elif kind == "Deleted" and change.get("ResourceType") == "Study":
            self._open.pop(rid, None)
            self.outbox.delete(rid)

    def _study_of_instance(self, instance_id: str) -> str | None:
        try:
            series = self.rest.get(f"/instances/{instance_id}").get("ParentSeries")
            if not isinstance(series, str):
                return None
            if series not in self._series_study:
                if len(self._series_study) > 10000:
                    self._series_study.clear()
                self._series_study[series] = str(self.rest.get(f"/series/{series}")["ParentStudy"])
            return self._series_study[series]
        except RestError as exc:
            if exc.not_found:
                return None  # deleted since
            raise

    # ------------------------------------------------------------------ studies
    def tick(self, now: float) -> None:
        """One round: read the change log, then work every study that is due."""
        self.scan_changes()
        for row in self.outbox.due(now):
            if self._stop.is_set():
                return
            try:
                self._process(row, now)
            except NodeStoreUnavailable as exc:
                if not self._node_down_logged:
                    self.log.warning(f"SpineMed: {exc}; will retry")
                    self._node_down_logged = True
                self.outbox.update(row.orthanc_id, next_at=now + max(self.settings.poll_seconds, 5.0))
            except Exception as exc:
                self.log.error(f"SpineMed: study {row.orthanc_id}: {type(exc).__name__}: {exc}")
                self.outbox.update(row.orthanc_id, next_at=now + self._backoff(row.attempts + 1))
            else:
                self._node_down_logged = False

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return float(min(s.backoff_max_s, s.backoff_initial_s * 2 ** max(0, attempt - 1)))

    def _process(self, row: StudyRow, now: float) -> None:
        if row.state == "sending":
            self._check_transfer(row, now)
        elif row.state == "waiting":
            study = self._study(row)
            if study is not None:
                self._check_node(row, study, now)
        else:  # pending, failed (slow re-check)
            self._examine(row, now)

    def _study(self, row: StudyRow) -> dict[str, Any] | None:
        try:
            study = self.rest.get(f"/studies/{row.orthanc_id}")
        except RestError as exc:
            if exc.not_found:
                self.outbox.delete(row.orthanc_id)
                return None
            raise
        return study if isinstance(study, dict) else None

    def _examine(self, row: StudyRow, now: float) -> None:
        """Send what the node lacks, or go on waiting for its result."""
        study = self._study(row)
        if study is None:
            return
        if not study.get("IsStable", True):
            # more instances are arriving: Orthanc fires StableStudy again; this is only the fallback
            fallback = self.settings.stable_age_s + self.settings.poll_seconds
            self.outbox.update(row.orthanc_id, next_at=now + fallback)
            return
        tags = study.get("MainDicomTags", {})
        study_uid = str(tags.get("StudyInstanceUID", ""))
        series = self.rest.get(f"/studies/{row.orthanc_id}/series")
        own, source, candidate = split_series(series, self.settings.markers, self.settings.study_filter, tags)
        node_job = self.node.job(study_uid)
        if not candidate and node_job is None:
            self.outbox.update(row.orthanc_id, state="ignored", dirty=0)
            return
        known = self.node.instances(study_uid)
        received, ours = known.received, known.outputs
        unsent: list[str] = []
        for inst in self.rest.get(f"/studies/{row.orthanc_id}/instances"):
            sop = str(inst.get("MainDicomTags", {}).get("SOPInstanceUID", ""))
            if inst.get("ParentSeries") in source and sop not in ours and sop not in received:
                unsent.append(str(inst["ID"]))
        if unsent:
            reply = self.rest.post(
                f"/modalities/{self.settings.node_modality}/store",
                {"Resources": unsent, "Asynchronous": True, "Synchronous": False},
            )
            job_id = str(reply["ID"])
            self.outbox.update(row.orthanc_id, state="sending", job_id=job_id, sent=len(unsent), dirty=0,
                               next_at=now + self.settings.poll_seconds)
            self.log.info(f"SpineMed: study {row.orthanc_id}: {len(unsent)} instance(s) handed to Orthanc "
                          f"job {job_id} for the node ({len(own)} own series skipped)")
            self._set_status(row, QUEUED, revision=node_job.revision if node_job else 0, reason=None)
            return
        if node_job is None:
            self.outbox.update(row.orthanc_id, state="ignored", dirty=0)
            return
        self.outbox.update(row.orthanc_id, state="waiting", dirty=0, next_at=now)
        self._check_node(row, study, now)

    def _check_transfer(self, row: StudyRow, now: float) -> None:
        """Follow the Orthanc job that sends instances to the node."""
        try:
            job = self.rest.get(f"/jobs/{row.job_id}")
        except RestError as exc:
            if not exc.not_found:
                raise
            # the job is gone (history trimmed, or lost in a crash): look again, the node dedups
            self.outbox.update(row.orthanc_id, state="pending", job_id=None, next_at=now)
            return
        state = str(job.get("State", ""))
        if state == "Success":
            nxt = "pending" if row.dirty else "waiting"
            self.outbox.update(row.orthanc_id, state=nxt, job_id=None, attempts=0, dirty=0, next_at=now)
            return
        if state == "Failure":
            attempts = row.attempts + 1
            why = str(job.get("ErrorDescription") or job.get("ErrorCode") or "unknown error")
            if attempts >= self.settings.max_attempts:
                self.log.error(f"SpineMed: study {row.orthanc_id}: sending to the node failed {attempts} "
                               f"times ({why}); retrying every {self.settings.backoff_max_s:.0f} s")
                self.outbox.update(row.orthanc_id, state="failed", job_id=None, attempts=attempts,
                                   next_at=now + self.settings.backoff_max_s)
                self._set_status(row, FAILED, revision=row.revision, reason=f"cannot send to the node: {why}")
            else:
                delay = self._backoff(attempts)
                self.log.warning(f"SpineMed: study {row.orthanc_id}: Orthanc job {row.job_id} failed "
                                 f"({why}); retry {attempts} in {delay:.0f} s")
                self.outbox.update(row.orthanc_id, state="pending", job_id=None, attempts=attempts,
                                   next_at=now + delay)
            return
        self.outbox.update(row.orthanc_id, next_at=now + self.settings.poll_seconds)

    def _check_node(self, row: StudyRow, study: Mapping[str, Any], now: float) -> None:
        """Follow the node's job for the study and mirror it in Orthanc."""
        study_uid = str(study.get("MainDicomTags", {}).get("StudyInstanceUID", ""))
        job = self.node.job(study_uid)
        if job is None:
            # sent, yet unknown to the node (its job store was reset?): look again later
            self.outbox.update(row.orthanc_id, state="pending", next_at=now + self._backoff(row.attempts + 1),
                               attempts=row.attempts + 1)
            return
        if job.state == "done" and not job.pending_update:
            self.outbox.update(row.orthanc_id, state="done", attempts=0)
            self._set_status(row, DONE, revision=job.revision, reason=job.reason)
        elif job.state == "skipped" and not job.pending_update:
            self.outbox.update(row.orthanc_id, state="skipped", attempts=0)
            self._set_status(row, SKIPPED, revision=job.revision, reason=job.reason)
        elif job.state == "failed" and not job.pending_update:
            # kept under slow watch: `spinemed-node jobs retry` on the node brings it back
            self.outbox.update(row.orthanc_id, state="failed", next_at=now + self.settings.backoff_max_s)
            self._set_status(row, FAILED, revision=job.revision, reason=job.reason)
        else:
            self.outbox.update(row.orthanc_id, state="waiting", next_at=now + self.settings.poll_seconds)
            self._set_status(row, QUEUED, revision=job.revision, reason=None)

    # ------------------------------------------------------------------ status in Orthanc
    def _labels_supported(self) -> bool:
        if self._labels is None:
            system = self.rest.get("/system")
            self._labels = _version_at_least(str(system.get("Version", "")), (1, 12))
        return self._labels

    def _set_status(self, row: StudyRow, status: str, *, revision: int, reason: str | None) -> None:
        current = self.outbox.get(row.orthanc_id)
        if current is not None and current.status == status and current.revision == revision:
            return
        sid = row.orthanc_id
        info = {"status": status, "revision": revision, "reason": (reason or "")[:500],
                "updated": int(time.time())}
        try:
            self.rest.put(f"/studies/{sid}/metadata/{STATUS_METADATA}", status)
            self.rest.put(f"/studies/{sid}/metadata/{INFO_METADATA}", json.dumps(info))
            if self._labels_supported():
                for other in STATUSES:
                    if other != status:
                        self.rest.delete(f"/studies/{sid}/labels/{other}")
                self.rest.put(f"/studies/{sid}/labels/{status}", "")
        except RestError as exc:
            if exc.not_found:
                self.outbox.delete(sid)
                return
            raise RestError(f"cannot write study status (are {STATUS_METADATA} and {INFO_METADATA} declared "
                            f"in UserMetadata?): {exc}") from exc
        self.outbox.update(sid, status=status, revision=revision, reason=(reason or "")[:500] or None)
        self.log.info(f"SpineMed: study {sid}: {status} (revision {revision})")
