"""The audit trail: an append-only file of JSON lines, separate from the logs.

Each line is one event: who sent which instance (calling AE, peer address, hashed study and instance
UIDs, outcome and status), which association was refused and why, which result went to which
destination with what outcome, and which files retention deleted.  Identifiers are hashed with
:func:`dicom_node.log.phi_hash` (the same digest as the logs, so lines correlate); no patient name or
ID and no UID in clear.

Writing: events are queued and a background thread writes each batch with one ``write`` on a file
descriptor opened ``O_APPEND`` (so the receiving process and the worker process can share the file
and lines never interleave), then ``fsync``.  A *durable* event (results sent) returns only once its
batch is synced — group commit: concurrent callers share the fsync.  Received instances are audited by
the ingest indexer in batches right after their spool file is durable; after a SIGKILL the spool is
reconciled at start and an acknowledged instance whose line was lost is audited as ``recovered``.
Other events (refused associations) wait at most ``[audit] flush_interval_s``.  A clean stop flushes
what is queued.

Nothing ever rewrites or truncates the file.  Rotate it by moving it away (``logrotate`` without
``copytruncate``): every batch opens the path anew, so the next batch creates a fresh file.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig
from dicom_node.log import get_logger

__all__ = ["AuditTrail", "open_audit"]

log = get_logger(__name__)

#: Lines kept in memory while the file cannot be written (disk full); older ones are dropped, loudly.
_MAX_PENDING = 100_000


class AuditTrail:
    """Group-committed, fsynced, append-only JSON-lines writer.

    Parameters
    ----------
    path
        The audit file; its folder is created (mode 0750), the file with mode 0640.
    flush_interval_s
        How long a non-durable event may wait in memory before its batch is written and synced.
    enabled
        ``False``: :meth:`record` does nothing (``[audit] enabled = false``).
    durable_timeout_s
        How long :meth:`record` with ``durable=True`` waits for its line to be on disk before it logs an
        error and returns (a stuck audit disk must not stop reception for good).
    """

    def __init__(self, path: Path, *, flush_interval_s: float = 0.2, enabled: bool = True,
                 durable_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.flush_interval_s = flush_interval_s
        self.durable_timeout_s = durable_timeout_s
        self._pending: list[bytes] = []
        self._seq = 0  # lines queued so far
        self._synced = 0  # lines known to be on disk
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self.written = 0
        if enabled:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)

    # ------------------------------------------------------------------ recording
    def record(self, event: str, *, durable: bool = True, **fields: Any) -> None:
        """Append one event; ``fields`` must already be free of PHI (hash identifiers first).

        With ``durable`` (the default) this returns once the line is written and fsynced — concurrent
        callers share one write and one fsync (group commit): for events whose line must be on disk before
        the caller goes on (results sent).  Received instances are audited by the indexer in batches after
        their spool file is durable (``benchmarks/audit_cost.py`` measures what a durable line would cost).
        ``durable=False`` queues it for the next batch (at most ``flush_interval_s`` later): for
        high-volume events such as refused associations.
        """
        if not self.enabled:
            return
        entry = {
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": event,
            "host": self._host,
            "pid": self._pid,
            **fields,
        }
        line = json.dumps(entry, separators=(",", ":"), default=str).encode() + b"\n"
        with self._cond:
            self._pending.append(line)
            self._seq += 1
            mine = self._seq
            if len(self._pending) > _MAX_PENDING:
                dropped = len(self._pending) - _MAX_PENDING
                del self._pending[:dropped]
                log.error("audit lines dropped: the audit file cannot be written", dropped=dropped)
            if durable:
                self._cond.notify_all()
        if self._thread is None:
            self._ensure_thread()
        if durable:
            deadline = time.monotonic() + self.durable_timeout_s
            with self._cond:
                while self._synced < mine and not self._stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log.error("audit line not on disk in time; continuing", event=event,
                                  timeout_s=self.durable_timeout_s, path=str(self.path))
                        return
                    self._cond.wait(left)

    def flush(self) -> int:
        """Write and fsync every queued line now; returns how many were written.

        Raises
        ------
        OSError
            The file could not be opened, written or synced; the lines stay queued.
        """
        with self._write_lock:
            with self._cond:
                batch, self._pending = self._pending, []
                upto = self._seq
            if not batch:
                return 0
            data = b"".join(batch)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                with self._cond:
                    self._pending[:0] = batch
                raise
            with self._cond:
                self._synced = max(self._synced, upto)
                self._cond.notify_all()
            self.written += len(batch)
            return len(batch)

    # ------------------------------------------------------------------ background writer
    def _ensure_thread(self) -> None:
        with self._cond:
            if self._thread is not None or self._stop:
                return
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._stop:
                    self._cond.wait(self.flush_interval_s)
                if self._stop:
                    return
            try:
                self.flush()
            except OSError as exc:
                log.error("audit trail write failed; lines kept for the next try", path=str(self.path),
                          error=exc.strerror or str(exc))
                time.sleep(min(5.0, self.flush_interval_s * 10))

    def close(self) -> None:
        """Stop the writer and flush what is queued.

        Raises
        ------
        OSError
            The last batch could not be written.
        """
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.enabled:
            self.flush()


def open_audit(config: NodeConfig) -> AuditTrail:
    """The audit trail the configuration asks for (``[audit]``)."""
    a = config.audit
    return AuditTrail(config.audit_path, flush_interval_s=a.flush_interval_s, enabled=a.enabled)
