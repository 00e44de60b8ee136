"""Study completeness: a study is complete after a quiet period with no new instance, when its
required series are present, or in any case after the force timeout.

DICOM has no end-of-study signal; this is the rule mercure and most routers use.  The check runs in
the receiving process (it only touches the job store) so a busy GPU worker never delays it.
"""

from __future__ import annotations

import threading
import time

from dicom_node.config import CompletenessConfig
from dicom_node.log import get_logger
from dicom_node.store import Job, JobStore

__all__ = ["CompletenessMonitor"]

log = get_logger(__name__)


class CompletenessMonitor:
    """Periodically moves quiet studies from ``receiving`` to ``complete``."""

    def __init__(self, config: CompletenessConfig, store: JobStore) -> None:
        self.config = config
        self.store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, now: float | None = None) -> list[Job]:
        c = self.config
        done = self.store.complete_due(
            time.time() if now is None else now, c.quiet_seconds, c.force_seconds, c.required_series
        )
        for job in done:
            log.info("study complete", job=job.id, instances=job.instance_count)
        return done

    def _run(self) -> None:
        while not self._stop.wait(self.config.check_interval_s):
            try:
                self.check()
            except Exception:
                log.exception("completeness check failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="completeness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
