"""Running the node: the receiving process (listener + completeness) and the worker process.

``serve`` runs both: the listener in this process and the worker as a child process that loads the
model once (so a crash or a CUDA error in the model never takes the listener down, and systemd can
also run them as two services: ``receive`` and ``worker``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dicom_node.config import NodeConfig
from dicom_node.ingest.receive import Receiver
from dicom_node.jobs.completeness import CompletenessMonitor
from dicom_node.jobs.stores import open_store
from dicom_node.log import get_logger, use_phi_key

__all__ = ["ReceivingNode", "run_serve", "run_worker", "worker_command"]

log = get_logger(__name__)


class ReceivingNode:
    """Listener + completeness monitor over one job store."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        config.node.data_dir.mkdir(parents=True, exist_ok=True)
        use_phi_key(config.node.data_dir)  # the digest of identifiers in logs, audit and jobs page
        self.store = open_store(config)
        self.receiver = Receiver(config, self.store)
        self.monitor = CompletenessMonitor(config.completeness, self.store)
        from dicom_node.ops.server import NodeOps  # HTTP side (health, metrics, jobs page) + spool retention

        self.ops = NodeOps(config, self.store, self.receiver)

    def start(self) -> int:
        restarted = self.store.restart_quiet_timers(time.time())
        if restarted:
            log.info("quiet timers restarted for studies still receiving", studies=restarted)
        port = self.receiver.start()
        self.monitor.start()
        self.ops.start()
        return port

    def stop(self) -> None:
        self.ops.stop()
        self.receiver.stop()
        self.monitor.stop()
        self.store.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def worker_command(config_path: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "dicom_node", "worker"]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    return cmd


def run_worker(config: NodeConfig, *, parent_pid: int | None = None) -> int:
    """Run the worker loop until SIGTERM/SIGINT (or the parent process is gone)."""
    from dicom_node.work.worker import Worker

    store = open_store(config)
    worker = Worker(config, store)

    def _stop(*_: object) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if parent_pid is not None:

        def _watch_parent() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            log.warning("parent process gone: worker stopping")
            worker.stop()

        threading.Thread(target=_watch_parent, daemon=True, name="parent-watch").start()
    try:
        worker.run_forever()
    finally:
        store.close()
    return 0


def run_serve(config: NodeConfig, config_path: Path | None, *, ready_file: Path | None = None) -> int:
    """Listener in this process, worker as a supervised child process; returns on SIGTERM/SIGINT."""
    node = ReceivingNode(config)
    port = node.start()
    stop = threading.Event()

    def _stop(*_: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    env = dict(os.environ)
    env["SPINEMED_PARENT_PID"] = str(os.getpid())
    child: subprocess.Popen[bytes] | None = None
    restarts = 0
    if ready_file is not None:
        ready_file.write_text(f"{port}\n")
    try:
        while not stop.is_set():
            if child is None or child.poll() is not None:
                if child is not None:
                    restarts += 1
                    log.error("worker exited; restarting", returncode=child.returncode, restarts=restarts)
                    if stop.wait(min(30.0, 2.0 * restarts)):
                        break
                child = subprocess.Popen(worker_command(config_path), env=env, preexec_fn=_die_with_parent)
            stop.wait(0.5)
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        node.stop()
    return 0
