"""The Orthanc plugin end to end: a real Orthanc with the plugin, a real node, the real (tiny) model.

dcmtk storescu → Orthanc → (plugin: stable study → Orthanc job C-STORE) → spinemed-node serve → worker →
STOW-RS back to Orthanc's DICOMweb plugin → the SR is in the same Orthanc study, marked spinemed-done.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import NodeProcess, free_port, node_config_text, start_node, storescu
from pydicom.uid import Comprehensive3DSRStorage, generate_uid
from test_orthanc_harness import OrthancServer, require_orthanc, start_orthanc

from dicom_node.config import load_config
from dicom_node.devtools.phantoms import make_chest_radiograph, make_lumbar_mr
from dicom_node.ops.orthanc_config import orthanc_config

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


@dataclass
class Stack:
    node: NodeProcess
    orthanc: OrthancServer
    state_file: Path

    def plugin_rows(self) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.state_file) as db:
            return list(db.execute("SELECT orthanc_id, state, status, revision, attempts FROM studies"))


def _wait(what: str, check: Callable[[], Any], timeout: float, stack: Stack, *,
          node_down: bool = False) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if not node_down and stack.node.proc.poll() is not None:
            raise RuntimeError(f"node exited:\n{stack.node.log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(
        f"{what} not reached in {timeout}s\n--- plugin rows: {stack.plugin_rows()}\n--- orthanc log:\n"
        f"{stack.orthanc.log()[-4000:]}\n--- node log:\n{stack.node.log.read_text()[-3000:]}"
    )


@pytest.fixture
def stack(tmp_path: Path, demo_model_dir: Path) -> Iterator[Stack]:
    require_orthanc("libOrthancPython.so", "libOrthancDicomWeb.so")
    http_port, dicom_port, node_port = free_port(), free_port(), free_port()
    data = tmp_path / "data"
    node_toml = tmp_path / "node.toml"
    # results go back to Orthanc over STOW-RS (a dicomweb destination, through the worker)
    back = f'\n[[destinations]]\nname = "orthanc"\ntype = "dicomweb"\nurl = "http://127.0.0.1:{http_port}/dicom-web"\n'
    back += "\n[output]\npdf = true\n"  # every kind of object we write goes back into Orthanc
    node_toml.write_text(node_config_text(data, demo_model_dir, node_port, [], quiet=1.0, extra=back))
    state = tmp_path / "plugin-state.sqlite3"
    snippet = orthanc_config(load_config(node_toml), state_file=state, poll_seconds=0.3)
    snippet["HttpPort"], snippet["DicomPort"] = http_port, dicom_port
    snippet["SpineMed"]["BackoffInitialSeconds"] = 0.5
    node = start_node(node_toml, data, node_port)
    orthanc: OrthancServer | None = None
    stk: Stack | None = None
    try:
        orthanc = start_orthanc(tmp_path, snippet)
        assert (orthanc.http_port, orthanc.dicom_port) == (http_port, dicom_port)
        stk = Stack(node, orthanc, state)
        yield stk
    finally:
        if orthanc is not None:
            orthanc.stop(signal.SIGKILL)
        (stk.node if stk is not None else node).stop()  # the test may have restarted the node


def _sr_instances(orthanc: OrthancServer, study_id: str) -> list[pydicom.Dataset]:
    out = []
    for inst in orthanc.instances(study_id):
        sop_class = orthanc.get(f"/instances/{inst['ID']}/metadata/SopClassUid")
        if sop_class == Comprehensive3DSRStorage:
            raw = orthanc.request("GET", f"/instances/{inst['ID']}/tags?simplify")
            out.append(raw)
    return out


def _status(orthanc: OrthancServer, study_id: str | None) -> tuple[str | None, dict[str, Any]]:
    if study_id is None:
        return None, {}
    info = orthanc.metadata(study_id, "SpineMedInfo")
    return orthanc.metadata(study_id, "SpineMedStatus"), json.loads(info) if info else {}


def _reopened(store: Any, study_uid: str) -> list[dict[str, Any]]:
    return [e for e in store.events(study_uid) if e["detail"] == "new instance: re-opened"]


def _extra_slice(template: Path, out: Path) -> Path:
    ds = pydicom.dcmread(template)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = int(ds.InstanceNumber) + 100
    ds.save_as(out, enforce_file_format=True)
    return out


def test_stable_study_gets_its_report_once_across_an_orthanc_crash_then_one_revision(
    stack: Stack, tmp_path: Path
) -> None:
    study = make_lumbar_mr(tmp_path / "mr", slices=5, size=64)
    paths = list(study.paths)
    series = sorted({p.parent for p in paths})
    first = [p for p in paths if p.parent == series[0]]
    rest = [p for p in paths if p.parent != series[0]]
    orthanc, node = stack.orthanc, stack.node

    # half the study, then Orthanc is killed before the study is stable, restarted, and the rest arrives
    res = storescu(orthanc.dicom_port, first, called="ORTHANC")
    assert res.returncode == 0, res.stderr
    orthanc.restart(signal.SIGKILL)
    res = storescu(orthanc.dicom_port, rest, called="ORTHANC")
    assert res.returncode == 0, res.stderr
    study_id = orthanc.study_id(study.study_instance_uid)
    assert study_id is not None

    _, info = _wait("spinemed-done", lambda: _status(orthanc, study_id)[0] == "spinemed-done"
                         and _status(orthanc, study_id), 180, stack)
    assert info["revision"] == 1
    srs = _sr_instances(orthanc, study_id)
    assert len(srs) == 1, "exactly one measurement report in Orthanc"
    assert srs[0]["Modality"] == "SR" and srs[0]["Manufacturer"] == "SpineMed"
    # Orthanc files every object in the series of its own modality: both SRs in one, the key image and its KO
    # in theirs
    ours = {}
    for series in orthanc.get(f"/studies/{study_id}/series"):
        tags = series["MainDicomTags"]
        if tags.get("SeriesDescription", "").startswith("SpineMed AI"):
            modalities = {orthanc.get(f"/instances/{i}/simplified-tags")["Modality"] for i in series["Instances"]}
            name = tags["SeriesDescription"].split(" (")[0]
            ours[name] = (tags.get("Modality"), modalities, len(series["Instances"]))
    assert ours == {"SpineMed AI results": ("SR", {"SR"}, 2), "SpineMed AI key images": ("OT", {"OT"}, 1),
                    "SpineMed AI key image note": ("KO", {"KO"}, 1),
                    "SpineMed AI report": ("DOC", {"DOC"}, 1)}, ours
    store = node.store()
    try:
        job = store.by_study(study.study_instance_uid)
        assert (job.state.value, job.revision, job.instance_count) == ("done", 1, len(paths))
        assert len(store.instances(study.study_instance_uid)) == len(paths), "our SR never went to the node"

        # our SR (and key image) made the study stable again: no new job, no second analysis
        time.sleep(4.0)
        job = store.by_study(study.study_instance_uid)
        assert (job.state.value, job.revision) == ("done", 1)
        assert not _reopened(store, study.study_instance_uid)
        assert len(_sr_instances(orthanc, study_id)) == 1

        # a new source image after the report, while the node is down: Orthanc's job to the node fails,
        # the plugin retries with backoff; the node comes back; exactly one revision
        store.close()
        node.stop()
        extra = _extra_slice(rest[-1], tmp_path / "extra.dcm")
        res = storescu(orthanc.dicom_port, [extra], called="ORTHANC")
        assert res.returncode == 0, res.stderr
        _wait("a failed transfer", lambda: any(r[4] >= 1 for r in stack.plugin_rows()), 60, stack,
              node_down=True)
        node = stack.node = start_node(node.config, node.data_dir, node.port)
        store = node.store()
        _wait("revision 2 done", lambda: _status(orthanc, study_id)[0] == "spinemed-done"
              and _status(orthanc, study_id)[1].get("revision") == 2, 180, stack)
        time.sleep(4.0)
        job = store.by_study(study.study_instance_uid)
        assert (job.state.value, job.revision, job.instance_count) == ("done", 2, len(paths) + 1)
        assert len(_reopened(store, study.study_instance_uid)) == 1
    finally:
        store.close()
    srs = _sr_instances(orthanc, study_id)
    assert len(srs) == 2
    newest = max(srs, key=lambda d: int(d["InstanceNumber"]))
    assert "PredecessorDocumentsSequence" in newest
    rows = stack.plugin_rows()
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [("done", "spinemed-done", 2, 0)]
    assert "failed (" in orthanc.log() and "retry 1 in" in orthanc.log()

    # a chest radiograph is not worth sending: no transfer, no node job, no status
    chest = make_chest_radiograph(tmp_path / "chest")
    res = storescu(orthanc.dicom_port, list(chest.paths), called="ORTHANC")
    assert res.returncode == 0, res.stderr
    chest_id = orthanc.study_id(chest.study_instance_uid)
    _wait("chest ignored", lambda: any(r[0] == chest_id and r[1] == "ignored" for r in stack.plugin_rows()),
          30, stack)
    assert _status(orthanc, chest_id) == (None, {})
    store = stack.node.store()
    try:
        assert [j.study_instance_uid for j in store.jobs()] == [study.study_instance_uid]
    finally:
        store.close()


def test_orthanc_on_another_host_reads_the_nodes_status_over_its_api_with_a_postgresql_job_store(
    tmp_path: Path, demo_model_dir: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No job store file to share: the node keeps its jobs in PostgreSQL and the plugin reads each study's
    status over the node's /api/v1 with a bearer token that Orthanc takes from its own environment."""
    from dicom_node.jobs.postgres import PostgresJobStore

    require_orthanc("libOrthancPython.so", "libOrthancDicomWeb.so")
    token_env, token = "SPINEMED_TEST_API_TOKEN", "t0ken-" + generate_uid()[-40:]
    monkeypatch.setenv(token_env, token)  # the node's and Orthanc's environment (both inherit it)
    http_port, dicom_port, node_port, node_http = free_port(), free_port(), free_port(), free_port()
    data = tmp_path / "data"
    node_toml = tmp_path / "node.toml"
    extra = (f'\n[[destinations]]\nname = "orthanc"\ntype = "dicomweb"\nurl = "http://127.0.0.1:{http_port}/dicom-web"\n'
             f'\n[http]\nport = {node_http}\nrequire_worker = false\napi_token_env = "{token_env}"\n'
             f'\n[store]\nurl = "{pg_url}"\n')
    node_toml.write_text(node_config_text(data, demo_model_dir, node_port, [], quiet=1.0, extra=extra))
    snippet = orthanc_config(load_config(node_toml), state_file=tmp_path / "plugin-state.sqlite3",
                             poll_seconds=0.3)
    assert "JobStore" not in snippet["SpineMed"]
    assert snippet["SpineMed"]["NodeUrl"] == f"http://127.0.0.1:{node_http}"
    assert snippet["SpineMed"]["NodeToken"] == "${" + token_env + "}", "the token never in the file"
    snippet["HttpPort"], snippet["DicomPort"] = http_port, dicom_port
    node = start_node(node_toml, data, node_port)
    orthanc: OrthancServer | None = None
    store = PostgresJobStore(pg_url)
    try:
        orthanc = start_orthanc(tmp_path, snippet)
        study = make_lumbar_mr(tmp_path / "mr", slices=3, size=64)
        res = storescu(orthanc.dicom_port, list(study.paths), called="ORTHANC")
        assert res.returncode == 0, res.stderr
        study_id = orthanc.study_id(study.study_instance_uid)
        stack = Stack(node, orthanc, tmp_path / "plugin-state.sqlite3")
        _, info = _wait("spinemed-done", lambda: _status(orthanc, study_id)[0] == "spinemed-done"
                        and _status(orthanc, study_id), 180, stack)
        assert info["revision"] == 1
        job = store.by_study(study.study_instance_uid)
        assert (job.state.value, job.revision, job.instance_count) == ("done", 1, len(study.paths))
        assert len(_sr_instances(orthanc, study_id)) == 1
        # our SR made the study stable again: the plugin knows it as ours from the node's API, sends nothing
        time.sleep(4.0)
        assert (store.by_study(study.study_instance_uid).revision, len(_sr_instances(orthanc, study_id))) == (1, 1)
        assert not _reopened(store, study.study_instance_uid)
        assert f"status from node API http://127.0.0.1:{node_http}" in orthanc.log()
        assert token not in orthanc.log() and token not in node.log.read_text()
    finally:
        store.close()
        if orthanc is not None:
            orthanc.stop(signal.SIGKILL)
        node.stop()
