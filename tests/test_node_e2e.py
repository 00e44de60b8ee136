"""The node end to end: real processes, real associations, the real (tiny) model.

PACS (dcmtk storescu) → spinemed-node serve (listener + worker process) → dcmtk storescp destination.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import (
    REPO,
    NodeProcess,
    StoreSCP,
    free_port,
    node_config_text,
    start_node,
    start_storescp,
    storescu,
)
from pydicom.uid import Comprehensive3DSRStorage

from dicom_node.devtools.phantoms import make_chest_radiograph, make_lumbar_mr

pytestmark = pytest.mark.slow


def _sop_classes(files: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files]


def _measurement_reports(scp: StoreSCP) -> list[pydicom.Dataset]:
    out = []
    for f in scp.files():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.SOPClassUID == Comprehensive3DSRStorage:
            out.append(ds)
    return out


@pytest.fixture
def node_and_dest(tmp_path: Path, demo_model_dir: Path) -> Iterator[tuple[NodeProcess, StoreSCP]]:
    scp = start_storescp(tmp_path)
    port = free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        node_config_text(tmp_path / "data", demo_model_dir, port, [("results", scp.ae_title, scp.port)])
    )
    node = start_node(cfg, tmp_path / "data", port)
    yield node, scp
    node.stop()
    scp.proc.terminate()
    scp.proc.wait(timeout=10)


def test_study_over_storescu_yields_exactly_one_report(
    node_and_dest: tuple[NodeProcess, StoreSCP], tmp_path: Path
) -> None:
    node, scp = node_and_dest
    study = make_lumbar_mr(tmp_path / "mr", slices=7, size=128)
    res = storescu(node.port, list(study.paths))
    assert res.returncode == 0, res.stderr
    job = node.wait_state(study.study_instance_uid, {"done", "failed", "skipped"})
    assert job.state.value == "done", job.reason
    assert job.revision == 1
    files = scp.wait_files(2)
    time.sleep(1.0)  # nothing more arrives
    files = scp.files()
    reports = _measurement_reports(scp)
    assert len(reports) == 1, "exactly one TID 1500 SR per study"
    sr = reports[0]
    assert sr.StudyInstanceUID == study.study_instance_uid
    assert sr.PatientID == pydicom.dcmread(study.paths[0], stop_before_pixels=True).PatientID
    assert sr.VerificationFlag == "UNVERIFIED"
    classes = _sop_classes(files)
    assert len(classes) == len(set(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files))
    # the job history shows every state in order
    store = node.store()
    states = [e["to"] for e in store.events(study.study_instance_uid)]
    store.close()
    assert states[:6] == ["receiving", "complete", "inferring", "reporting", "exporting", "done"]


def test_non_spine_study_is_skipped_with_reason(
    node_and_dest: tuple[NodeProcess, StoreSCP], tmp_path: Path
) -> None:
    node, scp = node_and_dest
    chest = make_chest_radiograph(tmp_path / "chest")
    assert storescu(node.port, list(chest.paths)).returncode == 0
    job = node.wait_state(chest.study_instance_uid, {"done", "failed", "skipped"})
    assert job.state.value == "skipped"
    assert "routing rules" in (job.reason or "") and "CHEST" in (job.reason or "")
    time.sleep(1.0)
    assert scp.files() == []


def test_sigkill_mid_study_then_restart_yields_one_report(tmp_path: Path, demo_model_dir: Path) -> None:
    scp = start_storescp(tmp_path)
    port = free_port()
    cfg = tmp_path / "node.toml"
    # a long quiet period so the study is still receiving when the node dies
    cfg.write_text(
        node_config_text(
            tmp_path / "data", demo_model_dir, port, [("results", scp.ae_title, scp.port)], quiet=3.0
        )
    )
    study = make_lumbar_mr(tmp_path / "mr", slices=7, size=128)
    paths = list(study.paths)
    node = start_node(cfg, tmp_path / "data", port)
    try:
        assert storescu(port, paths[: len(paths) // 2]).returncode == 0
        node.stop(signal.SIGKILL)
        time.sleep(0.5)
        node = start_node(cfg, tmp_path / "data", port)
        # the PACS resends the whole study (as it would after a failed transfer)
        assert storescu(port, paths).returncode == 0
        job = node.wait_state(study.study_instance_uid, {"done", "failed"})
        assert job.state.value == "done", job.reason
        assert job.instance_count == len(paths), "nothing lost, nothing counted twice"
        scp.wait_files(2)
        time.sleep(1.5)
        assert len(_measurement_reports(scp)) == 1
    finally:
        node.stop()
        scp.proc.terminate()


def test_late_instance_produces_a_revision(
    node_and_dest: tuple[NodeProcess, StoreSCP], tmp_path: Path
) -> None:
    node, scp = node_and_dest
    study = make_lumbar_mr(tmp_path / "mr", slices=7, size=128, with_axial=True)
    axial = [
        p for p in study.paths if pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription == "AX T2"
    ]
    first = [p for p in study.paths if p not in axial]
    assert storescu(node.port, first).returncode == 0
    job = node.wait_state(study.study_instance_uid, {"done", "failed"})
    assert job.state.value == "done" and job.revision == 1
    assert storescu(node.port, axial[:1]).returncode == 0
    deadline = time.monotonic() + 120
    store = node.store()
    while time.monotonic() < deadline:
        job = store.by_study(study.study_instance_uid)
        if job.revision == 2 and job.state.value in {"done", "failed"}:
            break
        time.sleep(0.2)
    store.close()
    assert job.state.value == "done" and job.revision == 2, job.reason
    time.sleep(1.0)
    reports = _measurement_reports(scp)
    assert len(reports) == 2
    second = next(r for r in reports if "PredecessorDocumentsSequence" in r)
    first_uid = next(r.SOPInstanceUID for r in reports if r is not second)
    refs = [
        i.ReferencedSOPInstanceUID
        for s in second.PredecessorDocumentsSequence
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    ]
    assert first_uid in refs


def test_destination_down_then_up_is_delivered(tmp_path: Path, demo_model_dir: Path) -> None:
    dest_port = free_port()
    port = free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        node_config_text(tmp_path / "data", demo_model_dir, port, [("results", "RESULTS", dest_port)])
    )
    node = start_node(cfg, tmp_path / "data", port)
    scp = None
    try:
        study = make_lumbar_mr(tmp_path / "mr", slices=5, size=128)
        assert storescu(port, list(study.paths)).returncode == 0
        store = node.store()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for at least one failed delivery attempt
            ds = store.deliveries(study.study_instance_uid)
            if ds and any(d.attempts >= 1 for d in ds):
                break
            time.sleep(0.2)
        assert store.by_study(study.study_instance_uid).state.value == "exporting"
        assert any(d.last_error for d in store.deliveries(study.study_instance_uid))
        store.close()
        scp = start_storescp(tmp_path, port=dest_port)
        job = node.wait_state(study.study_instance_uid, {"done", "failed"})
        assert job.state.value == "done", job.reason
        assert len(_measurement_reports(scp)) == 1
    finally:
        node.stop()
        if scp is not None:
            scp.proc.terminate()


def test_analyze_cli_writes_results_without_network(tmp_path: Path, demo_model_dir: Path) -> None:
    make_lumbar_mr(tmp_path / "mr", slices=5, size=128)
    out = tmp_path / "out"
    env_cfg = tmp_path / "a.toml"
    env_cfg.write_text(
        f'[model]\nbackend = "demo"\npath = "{demo_model_dir}"\n[node]\ndata_dir = "{tmp_path}"\n'
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "analyze",
            str(tmp_path / "mr"),
            "--out",
            str(out),
            "--config",
            str(env_cfg),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "not for clinical use" in res.stdout
    assert (out / "findings.json").is_file()
    assert any(Comprehensive3DSRStorage == str(pydicom.dcmread(p).SOPClassUID) for p in out.glob("*.dcm"))
    chest = make_chest_radiograph(tmp_path / "chest")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "analyze",
            *map(str, chest.paths),
            "--out",
            str(tmp_path / "o2"),
            "--config",
            str(env_cfg),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 3 and "skipped" in res.stdout


def test_jobs_and_echo_cli(node_and_dest: tuple[NodeProcess, StoreSCP], tmp_path: Path) -> None:
    node, _scp = node_and_dest
    chest = make_chest_radiograph(tmp_path / "chest")
    storescu(node.port, list(chest.paths))
    job = node.wait_state(chest.study_instance_uid, {"skipped"})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True, cwd=REPO, timeout=60
        )

    res = cli("jobs", "list", "--config", str(node.config))
    assert res.returncode == 0 and "skipped" in res.stdout
    assert chest.study_instance_uid not in res.stdout, "no identifiers in the listing"
    res = cli("jobs", "show", str(job.id), "--config", str(node.config))
    assert res.returncode == 0 and '"state": "skipped"' in res.stdout
    res = cli("jobs", "retry", str(job.id), "--config", str(node.config))
    assert res.returncode == 0 and "complete" in res.stdout
    node.wait_state(chest.study_instance_uid, {"skipped"})
    res = cli("echo", "--config", str(node.config))
    assert res.returncode == 0 and "C-ECHO success" in res.stdout
    res = cli("jobs", "show", "9999", "--config", str(node.config))
    assert res.returncode != 0
