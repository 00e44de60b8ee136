"""Study completeness: a study is complete after a quiet period with no new instance, when its
required series are present, or in any case after the force timeout.  The check runs every
``check_interval_s``, and also when a receiving study falls due sooner.

DICOM has no end-of-study signal; this is the rule mercure and most routers use.  The check runs in
the receiving process (it only touches the job store) so a busy GPU worker never delays it.
"""

from __future__ import annotations

import threading
import time

from dicom_node.config import CompletenessConfig
from dicom_node.jobs.model import Job, JobState, JobStore
from dicom_node.log import get_logger

__all__ = ["CompletenessMonitor", "due_at", "seconds_until_due"]

log = get_logger(__name__)

#: Wake this long after a study falls due (clocks of two processes, rounding).
_DUE_MARGIN_S = 0.002


def due_at(job: Job, config: CompletenessConfig) -> float | None:
    """When a receiving study falls due by time (quiet period over, or force timeout reached)."""
    times = []
    if job.last_received_at is not None:
        times.append(job.last_received_at + config.quiet_seconds)
    if job.first_received_at is not None:
        times.append(job.first_received_at + config.force_seconds)
    return min(times) if times else None


def seconds_until_due(store: JobStore, config: CompletenessConfig, now: float) -> float:
    """``config.check_interval_s``, or the (shorter) time until the next receiving study falls due."""
    wait = config.check_interval_s
    for job in store.jobs([JobState.RECEIVING]):
        due = due_at(job, config)
        if due is not None and due > now:
            wait = min(wait, due - now + _DUE_MARGIN_S)
    return wait


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

    def next_wait(self, now: float | None = None) -> float:
        """Seconds until the next check: ``check_interval_s``, or less when a study falls due sooner (its
        quiet period or force timeout ends), so that it is completed then rather than up to a whole
        interval later.  A study already due but not completed (required series missing) changes nothing.
        """
        return seconds_until_due(self.store, self.config, time.time() if now is None else now)

    def _run(self) -> None:
        try:
            wait = self.next_wait()
        except Exception:
            log.exception("completeness check failed")
            wait = self.config.check_interval_s
        while not self._stop.wait(wait):
            wait = self.config.check_interval_s
            try:
                self.check()
                wait = self.next_wait()
            except Exception:
                log.exception("completeness check failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="completeness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
