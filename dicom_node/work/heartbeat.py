"""The worker's heartbeat: a small JSON status file the receiving process's HTTP side reads.

The worker is another process (another service under systemd), so readiness cannot look into it.
Instead, a thread in the worker rewrites ``<data_dir>/worker-heartbeat.json`` atomically every few
seconds: host, pid, whether the model is loaded (and which), the job it works on, and the time.
``/health/ready`` counts the worker as ready while that file is fresh (``[http] heartbeat_max_age_s``)
and says the model is loaded.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dicom_node.log import get_logger

__all__ = ["Heartbeat", "HeartbeatWriter", "heartbeat_path", "read_heartbeat"]

log = get_logger(__name__)

FILE_NAME = "worker-heartbeat.json"


def heartbeat_path(data_dir: Path) -> Path:
    return Path(data_dir) / FILE_NAME


@dataclass(frozen=True)
class Heartbeat:
    """What the worker last said about itself."""

    host: str
    pid: int
    state: str  # "loading" | "ready" | "stopped"
    model_loaded: bool
    model: str | None
    model_version: str | None
    demo: bool
    job: int | None
    started_at: float
    at: float
    #: ``False`` while the model backend answers with transient errors (server down, out of GPU memory):
    #: studies wait, deferred; ``model_error`` says the last error (its type and message, no patient data)
    model_available: bool = True
    model_error: str | None = None

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.at


def read_heartbeat(path: Path) -> Heartbeat | None:
    """The heartbeat in ``path``; ``None`` when there is none yet.

    Raises
    ------
    ValueError
        The file exists but is not a heartbeat (corrupt or foreign).
    """
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a heartbeat file: {exc}") from exc
    try:
        return Heartbeat(**data)
    except TypeError as exc:
        raise ValueError(f"{path}: not a heartbeat file: {exc}") from exc


class HeartbeatWriter:
    """Rewrites the heartbeat file every ``interval_s`` from a daemon thread.

    Parameters
    ----------
    path
        The heartbeat file (written via a temporary file and ``os.replace``).
    interval_s
        Seconds between writes.
    """

    def __init__(self, path: Path, interval_s: float = 2.0) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self.started_at = time.time()
        self.state = "loading"
        self.model: str | None = None
        self.model_version: str | None = None
        self.demo = False
        self.job: int | None = None
        self.model_available = True
        self.model_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def snapshot(self) -> Heartbeat:
        return Heartbeat(
            host=socket.gethostname(), pid=os.getpid(), state=self.state, model_loaded=self.state == "ready",
            model=self.model, model_version=self.model_version, demo=self.demo, job=self.job,
            started_at=self.started_at, at=time.time(), model_available=self.model_available,
            model_error=self.model_error,
        )

    def write(self) -> None:
        """Write the current status now.

        Raises
        ------
        OSError
            The file could not be written.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one temporary file per thread: the heartbeat thread and ready()/job updates may write at once
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(asdict(self.snapshot())), encoding="utf-8")
        os.replace(tmp, self.path)

    def model_status(self, available: bool, error: str | None = None) -> None:
        """Say whether the model backend answered the last analysis (the next periodic write carries it)."""
        self.model_available, self.model_error = available, error

    def ready(self, model: str, version: str | None, demo: bool) -> None:
        self.state, self.model, self.model_version, self.demo = "ready", model, version, demo
        self.write()

    def start(self) -> None:
        self.write()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.write()
            except OSError as exc:
                log.error("worker heartbeat not written", path=str(self.path), error=exc.strerror or str(exc))

    def stop(self) -> None:
        """Stop the thread and record that this worker stopped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.state = "stopped"
        self.job = None
        try:
            self.write()
        except OSError as exc:
            log.error("worker heartbeat not written", path=str(self.path), error=exc.strerror or str(exc))
