"""Faults, injected for real: a full disk (tmpfs), 16 concurrent associations, fuzzed DICOM, a destination
that is down (then up, then down for good and retried), and spool retention."""

from __future__ import annotations

import contextlib
import io
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import REPO, free_port, start_storescp, storescu
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pnd_config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.config import NodeConfig, load_config
from dicom_node.devtools.phantoms import make_lumbar_mr
from dicom_node.ingest.spool import study_key
from dicom_node.jobs.model import JobState, OutputRecord
from dicom_node.node import ReceivingNode
from dicom_node.ops.metrics import render_metrics
from dicom_node.ops.retention import RetentionTask
from dicom_node.work.pipeline import Pipeline
from dicom_node.work.worker import Worker

pytestmark = pytest.mark.slow


def _config(data_dir: Path, **tables: Any) -> NodeConfig:
    node = {"port": 0, "host": "127.0.0.1", "data_dir": data_dir, "min_free_disk_mb": 0, **tables.pop("node", {})}
    tables.setdefault("http", {"enabled": False})
    tables.setdefault("completeness", {"quiet_seconds": 0.3, "force_seconds": 60, "check_interval_s": 0.1})
    return load_config(node=node, **tables)


@contextlib.contextmanager
def _node(cfg: NodeConfig) -> Iterator[ReceivingNode]:
    n = ReceivingNode(cfg)
    n.start()
    try:
        yield n
    finally:
        n.stop()


def _instance(study: str, series: str, rows: int = 8, modality: str = "MR") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage if modality == "MR" else CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.SeriesDescription, ds.PatientID, ds.PatientName = modality, "SAG T2", "SYN-LOAD", "Load^Test"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.zeros((rows, rows), np.uint16).tobytes()
    return ds


def _associate(port: int, contexts: list[str], calling: str = "LOADSCU") -> Any:
    ae = AE(ae_title=calling)
    for c in contexts:
        ae.add_requested_context(c, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title="SPINEMED")


# ---------------------------------------------------------------------------------------------- low disk
@pytest.fixture
def tmpfs() -> Iterator[Path]:
    """A real 24 MiB file system that fills up (root only: CI runs as root)."""
    mnt = Path(tempfile.mkdtemp(prefix="spinemed-tmpfs-"))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        mnt.rmdir()
        pytest.fail(f"cannot mount a tmpfs for the low-disk test (needs root, as CI has): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def test_low_disk_refuses_instances_then_associations_before_the_disk_is_full(tmpfs: Path) -> None:
    cfg = _config(tmpfs / "data", node={"min_free_disk_mb": 8})
    with _node(cfg) as n:
        port = n.receiver.port
        study, series = generate_uid(), generate_uid()
        assoc = _associate(port, [MRImageStorage])  # opened while there is room
        assert assoc.is_established
        # leave ~11 MiB free: room for three ~1 MiB instances above the 8 MiB threshold
        free = shutil.disk_usage(tmpfs).free
        (tmpfs / "filler").write_bytes(b"\0" * (free - 11 * 1024 * 1024))
        statuses = []
        for _ in range(12):
            statuses.append(int(assoc.send_c_store(_instance(study, series, rows=724)).Status))
            assert shutil.disk_usage(tmpfs).free > 6 * 1024 * 1024, "refused before the disk fills"
        assoc.release()
        stored = statuses.count(0x0000)
        assert 1 <= stored <= 4 and set(statuses[stored:]) == {0xA700}, statuses
        # a new association is rejected outright: transient, service provider (presentation), local limit
        rj_assoc = _associate(port, [MRImageStorage])
        assert rj_assoc.is_rejected
        rj = rj_assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        assert n.receiver.gate.stats.snapshot() == {"low_disk": 1}
        # what was acknowledged is intact; nothing half-written is left behind
        assert n.receiver.flush(), "acknowledged instances recorded"
        recs = n.store.instances(study)
        assert len(recs) == stored and all(pydicom.dcmread(r.path).Rows == 724 for r in recs)
        assert list((cfg.spool_dir / ".incoming").iterdir()) == []
        # room again: the node accepts at once
        (tmpfs / "filler").unlink()
        again = _associate(port, [MRImageStorage])
        assert again.is_established
        assert again.send_c_store(_instance(study, series)).Status == 0x0000
        again.release()


# ---------------------------------------------------------------------------------------------- concurrency
def test_sixteen_concurrent_associations_store_every_instance_exactly_once(tmp_path: Path) -> None:
    """16 dcmtk storescu processes at once, 100 instances each (4 studies), against the in-process listener.

    dcmtk clients rather than pynetdicom SCU threads: 16 SCU threads in the node's own interpreter compete for
    its GIL on a 2-core machine (36 s here, and a pynetdicom SCU process with 16 threads saw C-STORE responses
    arrive after its 30 s DIMSE timeout); real modalities are separate processes too.
    """
    n_assoc, per_assoc = 16, 100
    studies = [(generate_uid(), generate_uid()) for _ in range(4)]
    # the data folder on a RAM file system (/dev/shm) when there is one: this test is about concurrency, and the
    # same code path's fsyncs on a shared CI disk would only make it slower
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="spinemed-load-", dir=shm if shm.is_dir() else tmp_path))
    cfg = _config(base / "data", completeness={"quiet_seconds": 60, "force_seconds": 600})
    sent: list[str] = []
    for i in range(n_assoc):
        d = base / f"scu{i:02d}"
        d.mkdir()
        for k in range(per_assoc):
            ds = _instance(*studies[i % len(studies)])
            ds.save_as(d / f"{k:03d}.dcm", enforce_file_format=True)
            sent.append(str(ds.SOPInstanceUID))
    try:
        with _node(cfg) as n:
            port = n.receiver.port
            t0 = time.monotonic()
            procs = [subprocess.Popen(["storescu", "-aec", "SPINEMED", "-aet", f"SCU{i:02d}", "+sd", "127.0.0.1",
                                       str(port), str(base / f"scu{i:02d}")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for i in range(n_assoc)]
            outs = [(p.wait(timeout=240), p.stderr.read() if p.stderr else "") for p in procs]
            elapsed = time.monotonic() - t0
            assert all(rc == 0 for rc, _ in outs), [e for rc, e in outs if rc][:2]
            # a resend of 50 of them (pynetdicom SCU) changes nothing
            dup = _associate(port, [MRImageStorage])
            for k in range(50):
                assert dup.send_c_store(pydicom.dcmread(base / "scu00" / f"{k:03d}.dcm")).Status == 0x0000
            dup.release()
            assert n.receiver.flush(), "acknowledged instances recorded"
            recs = [r for st, _ in studies for r in n.store.instances(st)]
            assert len(sent) == len(set(sent)) == n_assoc * per_assoc
            assert sorted(r.sop_instance_uid for r in recs) == sorted(sent), "every instance stored once"
            assert sum(j.instance_count for j in n.store.jobs()) == n_assoc * per_assoc
            files = list(cfg.spool_dir.glob("*/*.dcm"))
            assert len(files) == n_assoc * per_assoc
            assert n.receiver.stats.stored == n_assoc * per_assoc and n.receiver.stats.duplicates == 50
            assert n.receiver.stats.associations == n_assoc + 1
            assert list((cfg.spool_dir / ".incoming").iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n16x100 instances over concurrent associations: {elapsed:.1f} s "
          f"({n_assoc * per_assoc / elapsed:.0f} instances/s)")


# ---------------------------------------------------------------------------------------------- fuzzing
def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.choice(["flip", "flip", "truncate", "insert", "splice", "zero"])
    if op == "flip":
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == "truncate":
        del b[rng.randrange(1, len(b)):]
    elif op == "insert":
        at = rng.randrange(len(b))
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif op == "splice":
        a, c = sorted(rng.sample(range(len(b)), 2))
        at = rng.randrange(len(b))
        b[at:at] = b[a:c]
    else:
        at = rng.randrange(len(b))
        b[at:at + rng.randint(4, 64)] = b"\0" * 4
    return bytes(b)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every mutated value
def test_fuzzed_dicom_never_crashes_the_listener_nor_loses_what_was_stored(tmp_path: Path) -> None:
    rng = random.Random(20261126)
    base_study, series = generate_uid(), generate_uid()
    base = _instance(base_study, series, rows=16)
    base.file_meta.MediaStorageSOPClassUID = base.SOPClassUID
    base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
    buf = io.BytesIO()
    base.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    meta_end = 132 + 12 + int(pydicom.dcmread(io.BytesIO(raw)).file_meta.FileMetaInformationGroupLength)
    head, body = raw[:meta_end], raw[meta_end:]
    fuzz_dir = tmp_path / "fuzz"
    fuzz_dir.mkdir()
    cfg = _config(tmp_path / "data", completeness={"quiet_seconds": 60, "force_seconds": 600})
    statuses: dict[str, int] = {}
    old_chunked = pnd_config.STORE_SEND_CHUNKED_DATASET
    pnd_config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, undecoded
    try:
        with _node(cfg) as n:
            port = n.receiver.port
            good = _associate(port, [MRImageStorage])
            assert good.send_c_store(base).Status == 0x0000
            good.release()
            assert n.receiver.flush(), "acknowledged instances recorded"
            stored = n.store.instances(base_study)[0]
            stored_bytes = Path(stored.path).read_bytes()
            n_sent = 0
            for round_ in range(6):
                assoc = _associate(port, [MRImageStorage], calling=f"FUZZ{round_}")
                for i in range(50):
                    path = fuzz_dir / f"{round_}-{i}.dcm"
                    path.write_bytes(head + _mutate(rng, body))
                    if not assoc.is_established:
                        assoc = _associate(port, [MRImageStorage], calling=f"FUZZ{round_}")
                    try:
                        rsp = assoc.send_c_store(path)
                    except (ValueError, RuntimeError, OSError) as exc:  # the SCU side gave up on it
                        statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                        continue
                    key = f"0x{int(rsp.Status):04X}" if rsp is not None and "Status" in rsp else "no response"
                    statuses[key] = statuses.get(key, 0) + 1
                    n_sent += 1
                if assoc.is_established:
                    assoc.release()
            # raw garbage straight onto the socket, too
            for _ in range(20):
                # the node may drop us mid-send: that is the point
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s, contextlib.suppress(OSError):
                    s.sendall(bytes(rng.randrange(256) for _ in range(rng.randint(1, 2000))))
                    s.settimeout(2)
                    s.recv(100)
            # the listener is alive, the stored instance is untouched, and a good instance still goes in
            echo_ae = AE(ae_title="CHECK")
            echo_ae.add_requested_context(Verification)
            check = echo_ae.associate("127.0.0.1", port, ae_title="SPINEMED")
            assert check.is_established and check.send_c_echo().Status == 0x0000
            check.release()
            assert Path(stored.path).read_bytes() == stored_bytes, "an already received instance was changed"
            assert n.receiver.flush(), "acknowledged instances recorded"
            assert n.store.instances(base_study)[0] == stored
            after = _associate(port, [MRImageStorage])
            assert after.send_c_store(_instance(generate_uid(), generate_uid())).Status == 0x0000
            after.release()
            assert list((cfg.spool_dir / ".incoming").iterdir()) == []
    finally:
        pnd_config.STORE_SEND_CHUNKED_DATASET = old_chunked
    print(f"\nfuzz: {n_sent} mutated C-STOREs answered: {dict(sorted(statuses.items()))}")
    assert n_sent >= 250


# ---------------------------------------------------------------------------------------------- retention
def _drive(n: ReceivingNode, study: str, to: JobState, out_file: Path | None = None) -> None:
    """Move one study's job through the worker's states by the store API (no model needed)."""
    store = n.store
    store.complete_due(time.time() + 100, 1, 1000)
    job = store.claim("test-worker", time.time(), 60)
    assert job is not None and job.study_instance_uid == study
    store.transition(job.id, "test-worker", JobState.INFERRING)
    if to is JobState.DONE:
        store.transition(job.id, "test-worker", JobState.REPORTING)
        assert out_file is not None
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_bytes(b"result")
        out = OutputRecord("1.2.3." + str(job.id), study, 1, "measurement_report", "1.2.840.10008.5.1.4.1.1.88.34",
                           str(out_file))
        store.finish_report(job.id, "test-worker", 1, [out], [])
    store.transition(job.id, "test-worker", to, reason=None if to is JobState.DONE else "test")


def test_retention_deletes_files_of_finished_studies_only(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "data", completeness={"quiet_seconds": 60, "force_seconds": 600},
                  retention={"keep_spool_hours": 0, "keep_outputs_hours": 1, "check_interval_s": 0.2})
    with _node(cfg) as n:
        mr = {s: make_lumbar_mr(tmp_path / f"mr{s}", slices=2, size=32, seed=s) for s in (1, 2, 3)}
        done, failed, receiving = mr[1], mr[2], mr[3]
        out_file = cfg.outputs_dir / study_key(done.study_instance_uid) / "r1" / "measurement_report.dcm"
        for st in (done, failed):
            assert storescu(n.receiver.port, list(st.paths)).returncode == 0
            assert n.receiver.flush(), "acknowledged instances recorded"
            _drive(n, st.study_instance_uid, JobState.DONE if st is done else JobState.FAILED, out_file)
        assert storescu(n.receiver.port, list(receiving.paths)).returncode == 0
        assert n.receiver.flush(), "acknowledged instances recorded"
        spool = {st.study_instance_uid: [Path(r.path) for r in n.store.instances(st.study_instance_uid)]
                 for st in mr.values()}
        deadline = time.monotonic() + 10  # the periodic task in the receiving process does it
        while time.monotonic() < deadline and any(p.exists() for p in spool[done.study_instance_uid]):
            time.sleep(0.1)
        assert not any(p.exists() for p in spool[done.study_instance_uid]), "done: spool deleted"
        assert all(p.exists() for p in spool[failed.study_instance_uid]), "failed: kept for a retry"
        assert all(p.exists() for p in spool[receiving.study_instance_uid]), "not final: never touched"
        assert out_file.exists(), "outputs are kept for keep_outputs_hours"
        assert n.ops.retention.stats.snapshot() == (len(spool[done.study_instance_uid]), 0)
        # an hour later the outputs go too
        task = RetentionTask(cfg, n.store, n.receiver.audit)
        assert task.run_once(now=time.time() + 3601) == (0, 1)
        assert not out_file.exists()
        assert n.receiver.flush(), "acknowledged instances recorded"
        n.receiver.audit.flush()
        assert '"event":"retention_deleted"' in cfg.audit_path.read_text()


def test_retention_never_deletes_a_late_instance_recorded_while_it_runs(tmp_path: Path) -> None:
    """A late instance of a done study arrives and is recorded right after retention has read the study's
    state as final: it re-opens the study, and its file must survive the pass that deletes the others."""
    cfg = _config(tmp_path / "data", completeness={"quiet_seconds": 60, "force_seconds": 600},
                  retention={"keep_spool_hours": 0, "keep_outputs_hours": 1, "check_interval_s": 3600})
    with _node(cfg) as n:
        st = make_lumbar_mr(tmp_path / "mr", slices=2, size=32, seed=4)
        assert storescu(n.receiver.port, list(st.paths)).returncode == 0
        assert n.receiver.flush(), "acknowledged instances recorded"
        _drive(n, st.study_instance_uid, JobState.DONE, cfg.outputs_dir / "r" / "out.dcm")
        first = [Path(r.path) for r in n.store.instances(st.study_instance_uid)]
        late = _instance(st.study_instance_uid, generate_uid())

        class LateArrival:  # the job store, with a late instance recorded just after the state is read
            def __init__(self) -> None:
                self.sent = False

            def __getattr__(self, name: str) -> Any:
                return getattr(n.store, name)

            def get(self, job_id: int) -> Any:
                job = n.store.get(job_id)
                if not self.sent:
                    self.sent = True
                    assoc = _associate(n.receiver.port, [MRImageStorage])
                    assert assoc.send_c_store(late).Status == 0x0000
                    assoc.release()
                    assert n.receiver.flush(), "the late instance recorded"
                return job

        store = LateArrival()
        task = RetentionTask(cfg, store, n.receiver.audit)  # type: ignore[arg-type]
        task.run_once(now=time.time() + 1)
        assert store.sent
        assert not any(p.exists() for p in first), "the finished revision's files are deleted"
        recs = {r.sop_instance_uid: Path(r.path) for r in n.store.instances(st.study_instance_uid)}
        assert recs[late.SOPInstanceUID].exists(), "the late instance is kept"
        assert n.store.by_study(st.study_instance_uid).state is JobState.RECEIVING, "the study re-opened"


# ---------------------------------------------------------------------------------------------- destination down
@pytest.fixture(scope="module")
def pipeline(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    cfg = load_config(model={"backend": "demo", "path": str(demo_model_dir)},
                      node={"data_dir": tmp_path_factory.mktemp("pipe")})
    p = Pipeline(cfg)
    _ = p.model  # loaded once for this module
    return p


def _wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(what)


def test_destination_down_then_up_delivers_and_failed_jobs_retry(tmp_path: Path, pipeline: Pipeline) -> None:
    dest_port = free_port()
    data = tmp_path / "data"
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\ndata_dir = "{data}"\n[http]\nenabled = false\n'
                    f'[[destinations]]\nname = "pacs"\nae_title = "RESULTS"\nhost = "127.0.0.1"\nport = {dest_port}\n')
    cfg = _config(data, destinations=[{"name": "pacs", "ae_title": "RESULTS", "host": "127.0.0.1",
                                       "port": dest_port}],
                  export={"max_attempts": 4, "backoff_initial_s": 0.5, "backoff_max_s": 1.0, "timeout_s": 5},
                  model={"backend": "demo", "path": str(pipeline.config.model_dir)},
                  worker={"poll_interval_s": 0.05})
    with _node(cfg) as n:
        worker = Worker(cfg, n.store, pipeline=Pipeline(cfg, model=pipeline.model))
        wt = threading.Thread(target=worker.run_forever, daemon=True)
        wt.start()
        scp = None
        try:
            a, b = (make_lumbar_mr(tmp_path / f"mr{s}", slices=5, size=96, seed=s) for s in (11, 12))
            # A: the destination stays down for all 4 attempts -> failed, with the reason
            assert storescu(n.receiver.port, list(a.paths)).returncode == 0
            job_a = _wait(lambda: (j := n.store.by_study(a.study_instance_uid)).state is JobState.FAILED and j,
                          120, "A failed")
            assert "delivery failed after 4 attempts" in (job_a.reason or "") and "pacs" in job_a.reason
            assert {d.attempts for d in n.store.deliveries(a.study_instance_uid)} == {4}
            text = render_metrics(n.ops.collector).decode()
            objects = len(n.store.outputs(a.study_instance_uid))  # SRs, key image, its KO
            assert objects == 4
            assert f"spinemed_export_failures_total {objects:.1f}" in text  # each of A's objects gave up
            assert f"spinemed_export_retries_total {3 * objects:.1f}" in text  # x 3 retried attempts
            # B: down at first, up after its first failed attempt -> delivered
            assert storescu(n.receiver.port, list(b.paths)).returncode == 0
            _wait(lambda: any(d.attempts >= 1 for d in n.store.deliveries(b.study_instance_uid)), 120,
                  "B tried once")
            assert n.store.by_study(b.study_instance_uid).state is JobState.EXPORTING
            scp = start_storescp(tmp_path, port=dest_port)
            job_b = _wait(lambda: (j := n.store.by_study(b.study_instance_uid)).state is JobState.DONE and j,
                          60, "B delivered")
            assert job_b.state is JobState.DONE
            # A again: `spinemed-node jobs retry` brings it back and it is delivered
            res = subprocess.run([sys.executable, "-m", "dicom_node", "jobs", "retry", str(job_a.id),
                                  "--config", str(toml)], capture_output=True, text=True, cwd=REPO, timeout=60)
            assert res.returncode == 0 and "exporting" in res.stdout, res.stderr
            _wait(lambda: n.store.by_study(a.study_instance_uid).state is JobState.DONE, 60, "A delivered")
            total = objects + len(n.store.outputs(b.study_instance_uid))
            srs = [pydicom.dcmread(f, stop_before_pixels=True) for f in scp.wait_files(total)]
            reports = [d for d in srs if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"]
            assert sorted(d.StudyInstanceUID for d in reports) == sorted([a.study_instance_uid,
                                                                         b.study_instance_uid])
            n.ops.collector.store_cache_s = 0
            text = render_metrics(n.ops.collector).decode()
            assert 'spinemed_studies{state="done"} 2.0' in text
            assert f"spinemed_export_delivered_total {total:.1f}" in text
        finally:
            worker.stop()
            wt.join(timeout=30)
            if scp is not None:
                scp.proc.terminate()
                scp.proc.wait(timeout=10)


@pytest.mark.parametrize(("status", "attempts_expected"), [(0xA900, 1), (0x0122, 1), (0xA700, 3)])
def test_permanent_refusal_fails_at_once_transient_is_retried(tmp_path: Path, pipeline: Pipeline, status: int,
                                                              attempts_expected: int) -> None:
    """A destination refusing with 0xA900 / 0x0122 (no retry can change it) fails the job after one attempt
    with the reason; 0xA700 (out of resources) is retried up to export.max_attempts."""
    from pynetdicom import AllStoragePresentationContexts, evt

    seen: list[int] = []

    def refuse(event: Any) -> int:
        seen.append(1)
        return status

    dest = AE(ae_title="RESULTS")
    dest.supported_contexts = AllStoragePresentationContexts
    dest_port = free_port()
    server = dest.start_server(("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, refuse)])
    cfg = _config(tmp_path / "data", destinations=[{"name": "pacs", "ae_title": "RESULTS", "host": "127.0.0.1",
                                                   "port": dest_port}],
                  export={"max_attempts": 3, "backoff_initial_s": 0.2, "backoff_max_s": 0.4, "timeout_s": 5},
                  model={"backend": "demo", "path": str(pipeline.config.model_dir)},
                  worker={"poll_interval_s": 0.05})
    try:
        with _node(cfg) as n:
            worker = Worker(cfg, n.store, pipeline=Pipeline(cfg, model=pipeline.model))
            wt = threading.Thread(target=worker.run_forever, daemon=True)
            wt.start()
            try:
                st = make_lumbar_mr(tmp_path / "mr", slices=5, size=96, seed=21)
                assert storescu(n.receiver.port, list(st.paths)).returncode == 0
                job = _wait(lambda: (j := n.store.by_study(st.study_instance_uid)).state is JobState.FAILED and j,
                            120, "failed")
                assert {d.attempts for d in n.store.deliveries(st.study_instance_uid)} == {attempts_expected}
                assert f"0x{status:04X}" in (job.reason or "")
                if attempts_expected == 1:
                    assert (job.reason or "").startswith("delivery refused:") and "(permanent)" in job.reason
                else:
                    assert "delivery failed after 3 attempts" in (job.reason or "")
            finally:
                worker.stop()
                wt.join(timeout=30)
    finally:
        server.shutdown()
