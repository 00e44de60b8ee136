"""One background thread working through submitted items in batches, with a flush that waits for them.

The indexer (:mod:`dicom_node.ingest.indexer`) and the receive slots (:mod:`dicom_node.ingest.slots`) both take work
from the listener's threads and finish it in batches on a thread of their own; this is their shared part.
"""

from __future__ import annotations

import threading
import time

__all__ = ["BatchThread"]


class BatchThread:
    """Counters of submitted and finished items, the thread, :meth:`flush` and stopping.

    A subclass implements :meth:`_run`, counts ``self._submitted`` up under ``self._cond`` as work arrives,
    counts ``self._done`` up and notifies as it finishes it, and returns once ``self._stop`` is set and
    nothing is left.  While ``self._flushers`` is above 0 someone waits in :meth:`flush`: a batch should not
    wait to fill.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._flushers = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        raise NotImplementedError

    def _start_thread(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        """Items submitted and not yet finished."""
        with self._cond:
            return self._submitted - self._done

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is finished; ``False`` on timeout (or no thread)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            self._flushers += 1
            self._cond.notify_all()
            try:
                while self._done < target:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._thread is None:
                        return False
                    self._cond.wait(left)
            finally:
                self._flushers -= 1
        return True

    def _stop_thread(self, timeout: float) -> None:
        """Finish what was submitted (up to ``timeout``), then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
