"""Truthful answers to bad input, against a real ``spinemed-node serve`` subprocess (issue 14).

* An instance whose UIDs are invalid gets a permanent failure status (0x0117 invalid SOP instance, PS3.7
  Annex C; 0xC000 cannot understand for a data set whose own UIDs are invalid), never 0xA700 (out of
  resources: the sender would retry it forever), and the log names the real cause.
* Nothing else on the association is lost: a valid instance sent after it is stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import NodeProcess, free_port, node_config_text, start_node
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom import _config as pnd_config

from dicom_node.devtools.phantoms import make_lumbar_mr

pytestmark = pytest.mark.slow


@pytest.fixture
def node(tmp_path: Path, demo_model_dir: Path) -> Iterator[NodeProcess]:
    data, port = tmp_path / "data", free_port()
    config = tmp_path / "node.toml"
    config.write_text(node_config_text(data, demo_model_dir, port, [], quiet=0.5,
                                       extra='[http]\nenabled = false\n'))
    n = start_node(config, data, port)
    yield n
    n.stop()


def _send(port: int, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title="BADSCU")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINEMED")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _log_lines(node: NodeProcess) -> list[dict[str, Any]]:
    out = []
    for line in node.log.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def test_invalid_uids_get_a_permanent_status_with_the_real_cause(node: NodeProcess, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pnd_config, "ENFORCE_UID_CONFORMANCE", False)
    study = make_lumbar_mr(tmp_path / "mr", slices=3, size=64, seed=41)
    bad_sop, bad_study, good = (pydicom.dcmread(p) for p in study.paths[:3])
    bad_sop.SOPInstanceUID = "1.2.3.4.05.abc"
    bad_sop.file_meta.MediaStorageSOPInstanceUID = bad_sop.SOPInstanceUID
    bad_study.StudyInstanceUID = "1.2.840.99.abc"

    statuses = _send(node.port, [bad_sop, bad_study, good])

    assert statuses == [0x0117, 0xC000, 0x0000]
    job = node.wait_state(good.StudyInstanceUID, {"receiving", "complete", "inferring", "reporting", "exporting",
                                                  "done", "skipped", "failed"}, timeout=60)
    assert job.instance_count == 1  # the valid one, stored and recorded
    lines = _log_lines(node)
    refused = [rec for rec in lines if str(rec.get("event", "")).startswith("instance refused")]
    assert [r["event"] for r in refused] == ["instance refused: invalid SOP Instance UID in the C-STORE request",
                                             "instance refused: invalid UID in the data set"], refused
    assert all(r["level"] == "warning" for r in refused)
    assert not any("spool disk below" in str(rec.get("event", "")) for rec in lines)
    text = node.log.read_text(errors="replace")
    assert "05.abc" not in text and "99.abc" not in text  # UIDs never reach the log


def _truncate_pixels(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path)


def _jobs_show(node: NodeProcess, job_id: int) -> dict[str, Any]:
    import subprocess
    import sys

    from conftest import REPO

    res = subprocess.run([sys.executable, "-m", "dicom_node", "jobs", "show", str(job_id), "--config",
                          str(node.config)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    shown: dict[str, Any] = json.loads(res.stdout)
    return shown


def test_instances_with_truncated_pixels_are_left_out_with_their_reason(node: NodeProcess, tmp_path: Path) -> None:
    """Two of seven slices truncated: the study is analysed from the other five, the two listed with their
    reason; a study with every slice truncated fails with a clear reason, never an internal error."""
    from conftest import storescu

    partly = make_lumbar_mr(tmp_path / "partly", slices=7, size=96, seed=42)
    bad = sorted(partly.paths)[2:4]
    for p in bad:
        _truncate_pixels(p)
    assert storescu(node.port, list(partly.paths)).returncode == 0
    job = node.wait_state(partly.study_instance_uid, {"done", "failed"}, timeout=120)
    assert job.state.value == "done", job.reason
    shown = _jobs_show(node, job.id)
    excluded = shown["excluded_instances"]
    bad_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in bad}
    assert {e["sop_instance_uid"] for e in excluded} == bad_uids
    assert all(e["reason"] == "pixel data truncated: 9216 of 18432 bytes declared" for e in excluded), excluded
    # the key image is never one of the left-out slices; the jobs page says what was left out
    from dicom_node.ops.web.pages import jobs_page

    store = node.store()
    try:
        key = [o for o in store.outputs(partly.study_instance_uid) if o.kind == "key_image"]
        page = jobs_page(store)
    finally:
        store.close()
    assert "2 instances left out: pixel data truncated (2)" in page
    for o in key:
        ref = pydicom.dcmread(o.path, stop_before_pixels=True)
        sources = {str(item.ReferencedSOPInstanceUID) for item in ref.get("SourceImageSequence", [])}
        assert not sources & bad_uids

    whole = make_lumbar_mr(tmp_path / "whole", slices=4, size=96, seed=43)
    for p in whole.paths:
        _truncate_pixels(p)
    assert storescu(node.port, list(whole.paths)).returncode == 0
    job = node.wait_state(whole.study_instance_uid, {"done", "failed"}, timeout=120)
    assert job.state.value == "failed"
    n = len(whole.paths)
    assert job.reason == f"UnusableStudyError: no usable images: {n} instances excluded: pixel data truncated ({n})"
    assert len(_jobs_show(node, job.id)["excluded_instances"]) == n
