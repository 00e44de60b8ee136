"""Liveness and readiness.

* ``/health/live``: the receiving process answers (nothing else is checked).
* ``/health/ready``: the node can take studies *and* turn them into delivered results:

  - ``store``: the job store answers a query;
  - ``disk``: the spool's file system has at least ``node.min_free_disk_mb`` free;
  - ``worker``: a worker heartbeat younger than ``[http] heartbeat_max_age_s`` says the model is loaded
    and its backend answered the last analysis (a model server that is down makes the node not ready)
    (``[http] require_worker = false`` skips it, e.g. for a receive-only node of a cluster);
  - ``destinations``: every ``dicom`` destination answers C-ECHO (``[http] echo_destinations``);
    DICOMweb destinations are listed as not checked.

The result is cached for ``[http] ready_cache_s`` so a scraping load balancer does not C-ECHO the PACS
on every probe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.config import DestinationConfig, NodeConfig
from dicom_node.delivery.cstore import echo
from dicom_node.jobs.model import JobStore
from dicom_node.work.heartbeat import heartbeat_path, read_heartbeat

__all__ = ["Check", "Readiness", "ReadyReport"]

EchoFn = Callable[[DestinationConfig], tuple[bool, str]]


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


@dataclass(frozen=True)
class ReadyReport:
    checks: dict[str, Check]
    at: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.ready else "not ready",
            "checked_at": self.at,
            "checks": {k: {"ok": c.ok, "detail": c.detail} for k, c in self.checks.items()},
        }


class Readiness:
    """Runs (and caches) the readiness checks.

    Parameters
    ----------
    config
        The node configuration.
    store
        The job store to query.
    free_bytes
        Free bytes on the spool's file system.
    echo_fn
        C-ECHO one destination (default: :func:`dicom_node.delivery.cstore.echo` with a 3 s timeout).
    """

    def __init__(self, config: NodeConfig, store: JobStore, free_bytes: Callable[[], int],
                 echo_fn: EchoFn | None = None) -> None:
        self.config = config
        self.store = store
        self.free_bytes = free_bytes
        calling = config.export.calling_ae_title or config.node.ae_title
        self.echo_fn: EchoFn = echo_fn or (lambda d: echo(d, calling_ae=calling, timeout_s=3.0))
        self.heartbeat_file: Path = heartbeat_path(config.node.data_dir)
        self._cached: ReadyReport | None = None
        self._lock = threading.Lock()

    def report(self) -> ReadyReport:
        """The cached report, or a fresh one when it is older than ``[http] ready_cache_s``."""
        with self._lock:
            c = self._cached
            if c is None or time.time() - c.at > self.config.http.ready_cache_s:
                c = self._cached = self._check()
            return c

    def _check(self) -> ReadyReport:
        checks = {"store": self._store(), "disk": self._disk()}
        if self.config.http.require_worker:
            checks["worker"] = self._worker()
        if self.config.http.echo_destinations:
            checks.update(self._destinations())
        return ReadyReport(checks)

    def _store(self) -> Check:
        try:
            counts = self.store.counts()
        except Exception as exc:  # any driver error means "not reachable"; reported, not raised
            return Check(False, f"job store not reachable: {type(exc).__name__}: {exc}")
        return Check(True, f"{sum(counts.values())} jobs")

    def _disk(self) -> Check:
        free_mb = self.free_bytes() / (1024 * 1024)
        need = self.config.node.min_free_disk_mb
        return Check(free_mb >= need, f"{free_mb:.0f} MiB free on the spool disk, threshold {need} MiB")

    def _worker(self) -> Check:
        try:
            beat = read_heartbeat(self.heartbeat_file)
        except (OSError, ValueError) as exc:
            return Check(False, f"worker heartbeat unreadable: {exc}")
        if beat is None:
            return Check(False, "no worker heartbeat yet (is the worker running?)")
        age = beat.age()
        if age > self.config.http.heartbeat_max_age_s:
            return Check(False, f"worker heartbeat {age:.0f} s old (worker {beat.state}, pid {beat.pid})")
        if not beat.model_loaded:
            return Check(False, f"worker {beat.state}: model not loaded yet")
        if not beat.model_available:
            return Check(False, f"model backend unavailable, studies wait: {beat.model_error or 'unknown error'}")
        demo = " (demo model, not for clinical use)" if beat.demo else ""
        return Check(True, f"model {beat.model} loaded{demo}, heartbeat {age:.1f} s old")

    def _destinations(self) -> dict[str, Check]:
        dests = self.config.destinations
        out: dict[str, Check] = {}
        dicom = [d for d in dests if d.type == "dicom"]
        for d in dests:
            if d.type != "dicom":
                out[f"destination:{d.name}"] = Check(True, "dicomweb: not checked by C-ECHO")
        if dicom:
            with ThreadPoolExecutor(max_workers=min(8, len(dicom)), thread_name_prefix="ready-echo") as pool:
                for d, (ok, msg) in zip(dicom, pool.map(self.echo_fn, dicom), strict=True):
                    out[f"destination:{d.name}"] = Check(ok, msg)
        return out
