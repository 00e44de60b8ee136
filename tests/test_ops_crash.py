"""SIGKILL of the receiver or the worker at each stage, then restart: exactly one SR per study at the destination.

The node runs as systemd runs it: ``spinemed-node receive`` and ``spinemed-node worker`` as two processes on one
data folder.  The destination is a pynetdicom SCP in this process that can hold a C-STORE, so the worker can be
killed *while* it exports.  The logs of every process of this run are then searched for patient identifiers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import REPO, free_port, storescu, wait_port
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.devtools.phantoms import SyntheticStudy, make_lumbar_mr
from dicom_node.jobs.model import JobState
from dicom_node.jobs.sqlite import SQLiteJobStore
from dicom_node.log import phi_hash, use_phi_key

pytestmark = pytest.mark.slow

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass
class Destination:
    """A C-STORE SCP that records every object it is given and can hold one C-STORE until released."""

    port: int
    received: list[tuple[str, str, str]] = field(default_factory=list)  # (study, sop class, sop instance)
    hold_study: str | None = None
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: Any) -> int:
        ds = event.dataset
        with self.lock:
            self.received.append((str(ds.StudyInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
            hold = self.hold_study == str(ds.StudyInstanceUID)
            if hold:
                self.hold_study = None
        if hold:
            self.arrived.set()
            self.release.wait(60)
        return 0x0000

    def arm(self, study: str) -> None:
        self.arrived.clear()
        self.release.clear()
        self.hold_study = study

    def reports(self, study: str) -> list[str]:
        with self.lock:
            return [s for st, c, s in self.received if st == study and c == COMPREHENSIVE_3D_SR]


@pytest.fixture
def destination() -> Iterator[Destination]:
    dest = Destination(free_port())
    ae = AE(ae_title="RESULTS")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", dest.port), block=False, evt_handlers=[(evt.EVT_C_STORE, dest.on_store)])
    assert server is not None
    yield dest
    dest.release.set()
    server.shutdown()


class Node:
    """``receive`` and ``worker`` subprocesses over one config; each can be killed and restarted."""

    def __init__(self, tmp: Path, model_dir: Path, dest_port: int) -> None:
        self.tmp = tmp
        self.data = tmp / "data"
        self.port = free_port()
        self.config = tmp / "node.toml"
        self.config.write_text(f"""
[node]
host = "127.0.0.1"
port = {self.port}
data_dir = "{self.data}"
min_free_disk_mb = 0
[completeness]
quiet_seconds = 1.0
force_seconds = 300
check_interval_s = 0.2
[export]
backoff_initial_s = 0.5
backoff_max_s = 1.0
max_attempts = 10
timeout_s = 20
[model]
backend = "demo"
path = "{model_dir}"
[worker]
poll_interval_s = 0.1
lease_seconds = 600
[http]
port = 0
[audit]
flush_interval_s = 0.05
[[destinations]]
name = "results"
ae_title = "RESULTS"
host = "127.0.0.1"
port = {dest_port}
""")
        self.receiver: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def _spawn(self, what: str) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{what}-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as fh:
            return subprocess.Popen([sys.executable, "-m", "dicom_node", what, "--config", str(self.config)],
                                    stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)

    def start_receiver(self) -> None:
        self.receiver = self._spawn("receive")
        wait_port(self.port, 60)

    def start_worker(self) -> None:
        self.worker = self._spawn("worker")
        beat = self.data / "worker-heartbeat.json"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if beat.exists():
                try:
                    b = json.loads(beat.read_text())
                except json.JSONDecodeError:  # being replaced right now
                    b = {}
                if b.get("pid") == self.worker.pid and b.get("state") == "ready":
                    return
            assert self.worker.poll() is None, self.logs[-1].read_text()[-2000:]
            time.sleep(0.1)
        raise TimeoutError("worker not ready")

    @staticmethod
    def kill(proc: subprocess.Popen[bytes] | None) -> None:
        assert proc is not None and proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for p in (self.receiver, self.worker):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()

    def wait_state(self, study: str, states: set[JobState], timeout: float = 120.0) -> Any:
        store = SQLiteJobStore(self.data / "jobs.sqlite3")
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    job = store.by_study(study)
                    if job.state in states:
                        return job
                except KeyError:
                    pass
                time.sleep(0.01)
        finally:
            store.close()
        raise TimeoutError(f"{phi_hash(study)} not in {states}: " + self.logs[-1].read_text()[-2000:])


def _send(node: Node, study: SyntheticStudy, paths: list[Path] | None = None) -> None:
    res = storescu(node.port, paths if paths is not None else list(study.paths))
    assert res.returncode == 0, res.stderr


def test_sigkill_at_every_stage_then_restart_yields_exactly_one_report(tmp_path: Path, demo_model_dir: Path,
                                                                       destination: Destination) -> None:
    node = Node(tmp_path, demo_model_dir, destination.port)
    studies = {name: make_lumbar_mr(tmp_path / name, slices=5, size=96, seed=seed,
                                    patient_id=f"PAT-{name.upper()}-77")
               for seed, name in enumerate(["receiving", "w-inferring", "w-exporting", "r-inferring",
                                            "r-exporting"], start=31)}
    timeline: list[str] = []
    try:
        node.start_receiver()
        node.start_worker()

        # 1. receiver killed while the study is being received; the PACS resends it all
        st = studies["receiving"]
        paths = list(st.paths)
        _send(node, st, paths[: len(paths) // 2])
        node.kill(node.receiver)
        timeline.append(f"receiver SIGKILL while receiving ({len(paths) // 2}/{len(paths)} instances in)")
        node.start_receiver()
        _send(node, st)

        # 2. worker killed while inferring
        st = studies["w-inferring"]
        _send(node, st)
        node.wait_state(st.study_instance_uid, {JobState.INFERRING, JobState.REPORTING})
        node.kill(node.worker)
        timeline.append("worker SIGKILL while inferring")
        node.start_worker()

        # 3. worker killed while exporting: the destination holds the first C-STORE of the study
        st = studies["w-exporting"]
        destination.arm(st.study_instance_uid)
        _send(node, st)
        assert destination.arrived.wait(120), "export never started"
        node.kill(node.worker)
        destination.release.set()
        timeline.append("worker SIGKILL while exporting (first object at the destination, not acknowledged)")
        node.start_worker()

        # 4. receiver killed while the worker infers (separate services: the worker carries on)
        st = studies["r-inferring"]
        _send(node, st)
        node.wait_state(st.study_instance_uid, {JobState.INFERRING, JobState.REPORTING})
        node.kill(node.receiver)
        timeline.append("receiver SIGKILL while inferring")
        node.start_receiver()

        # 5. receiver killed while the worker exports
        st = studies["r-exporting"]
        destination.arm(st.study_instance_uid)
        _send(node, st)
        assert destination.arrived.wait(120)
        node.kill(node.receiver)
        destination.release.set()
        timeline.append("receiver SIGKILL while exporting")
        node.start_receiver()

        for name, st in studies.items():
            job = node.wait_state(st.study_instance_uid, {JobState.DONE, JobState.FAILED})
            assert job.state is JobState.DONE, (name, job.reason)
            assert job.revision == 1, (name, "no needless revision")
            assert job.instance_count == len(st.paths), (name, "nothing lost, nothing counted twice")
        time.sleep(1.0)  # nothing more arrives
        for name, st in studies.items():
            reports = destination.reports(st.study_instance_uid)
            assert len(set(reports)) == 1, (name, reports)
            timeline.append(f"{name}: {len(reports)} C-STORE(s) of its one SR at the destination")
    finally:
        node.stop()
    print("\n" + "\n".join(timeline))

    # ------------------------------------------------------------------ no PHI in any log of this run
    logs = "\n".join(p.read_text(errors="replace") for p in node.logs)
    assert "worker ready" in logs and "delivered" in logs
    for st in studies.values():
        phi = {st.study_instance_uid}
        for p in st.paths:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            phi |= {str(ds.PatientID), str(ds.PatientName), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
            phi |= {str(ds.get("AccessionNumber", "")), str(ds.get("PatientBirthDate", ""))} - {""}
        for uid in destination.reports(st.study_instance_uid):
            phi.add(uid)
        leaked = sorted(x for x in phi if x and x in logs)
        assert not leaked, f"identifiers in the logs: {leaked}"
    # the audit trail has who sent what and where each result went, hashed
    audit = [json.loads(line) for line in (node.data / "audit" / "audit.jsonl").read_text().splitlines()]
    sent = {a["study"] for a in audit if a["event"] == "result_sent" and a["outcome"] == "delivered"}
    use_phi_key(node.data)  # the install's digest key, made by the node at its first start
    assert sent == {phi_hash(st.study_instance_uid) for st in studies.values()}
    assert all(a["calling_ae"] == "STORESCU" for a in audit if a["event"] == "instance_received")
    assert os.stat(node.data / "audit" / "audit.jsonl").st_mode & 0o777 == 0o640
