"""The node's ``/api/v1`` (dicom_node.ops.web.api) and the plugin's client of it (orthanc_plugin.nodestore.NodeApi):
a real node with its HTTP server on loopback, a study received over DICOM, our result recorded; the plugin's
client reads the same answers as its read-only view of the SQLite job store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from conftest import free_port, storescu
from starlette.testclient import TestClient
from test_sr_support import CREATED_AT, lumbar_mr_case

from dicom_node.config import load_config
from dicom_node.devtools.phantoms import SyntheticStudy, make_lumbar_mr
from dicom_node.errors import ConfigError
from dicom_node.jobs.model import JobState, OutputRecord
from dicom_node.node import ReceivingNode
from orthanc_plugin.nodestore import NodeApi, NodeInstances, NodeJobStore, NodeStoreUnavailable
from sr_templates import OutputOptions, build_outputs

TOKEN = "s3cret-" + "x" * 40
ENV = "SPINEMED_TEST_API_TOKEN"


@dataclass
class Live:
    node: ReceivingNode
    base: str
    study: SyntheticStudy
    output_uid: str


def _node(tmp_path: Path, **http: object) -> ReceivingNode:
    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp_path / "data", "min_free_disk_mb": 0},
        http={"port": 0, "require_worker": False, "echo_destinations": False, **http},
        completeness={"quiet_seconds": 60, "force_seconds": 600},
    )
    return ReceivingNode(cfg)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV, TOKEN)
    tmp = tmp_path_factory.mktemp("api")
    node = _node(tmp, api_token_env=ENV)
    node.start()
    try:
        study = make_lumbar_mr(tmp / "mr", slices=2, size=32)
        assert storescu(node.receiver.port, list(study.paths)).returncode == 0
        assert node.receiver.flush(), "acknowledged instances recorded"
        # our result for it, recorded as the worker records one
        store = node.store
        store.complete_due(time.time() + 100, 1, 1000)
        job = store.claim("test", time.time(), 60)
        assert job is not None
        store.transition(job.id, "test", JobState.INFERRING)
        store.transition(job.id, "test", JobState.REPORTING)
        case = lumbar_mr_case(tmp / "case")  # a real TID 1500 SR file for the report route to render
        sr = build_outputs(case.study, case.findings, OutputOptions(), created_at=CREATED_AT)[0]
        sr.save_as(tmp / "sr.dcm", enforce_file_format=True)
        out = OutputRecord(str(sr.SOPInstanceUID), study.study_instance_uid, job.revision,
                           "measurement_report", str(sr.SOPClassUID), str(tmp / "sr.dcm"))
        store.finish_report(job.id, "test", job.revision, [out], [])
        yield Live(node, f"http://127.0.0.1:{node.ops.http_port}", study, out.sop_instance_uid)
    finally:
        node.stop()
        mp.undo()


def test_the_plugin_reads_over_http_what_it_reads_in_the_job_store(live: Live) -> None:
    uid = live.study.study_instance_uid
    api = NodeApi(live.base, TOKEN)
    local = NodeJobStore(live.node.config.db_path)
    try:
        job = api.job(uid)
        assert job is not None and job == local.job(uid)
        known = api.instances(uid)
        assert known == local.instances(uid)
        assert known.received == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                                  for p in live.study.paths}
        assert known.outputs == {live.output_uid}
        assert api.job("1.2.3.4.5") is None, "a study the node never received"
        assert api.instances("1.2.3.4.5") == NodeInstances(frozenset(), frozenset())
    finally:
        local.close()
    assert TOKEN not in repr(api)


@pytest.mark.parametrize("token", [None, "wrong-" + "y" * 40])
def test_without_the_token_the_api_answers_401(live: Live, token: str | None) -> None:
    with pytest.raises(NodeStoreUnavailable, match="the token was refused"):
        NodeApi(live.base, token).job(live.study.study_instance_uid)
    r = httpx.get(f"{live.base}/api/v1/studies/{live.study.study_instance_uid}",
                  headers={"Authorization": f"Bearer {token}"} if token else {})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert live.study.study_instance_uid not in r.text


def test_a_bad_uid_is_400_and_an_unreachable_node_is_unavailable(live: Live) -> None:
    r = httpx.get(f"{live.base}/api/v1/studies/not-a-uid/job", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400
    with pytest.raises(NodeStoreUnavailable, match=r"node API http://127\.0\.0\.1:"):
        NodeApi(f"http://127.0.0.1:{free_port()}", TOKEN, timeout_s=2).job("1.2.3")
    with pytest.raises(ValueError, match="url"):
        NodeApi("gpu-node:8080")


def test_without_a_token_configured_only_loopback_clients_are_answered(tmp_path: Path) -> None:
    node = _node(tmp_path)
    assert node.ops.http is not None
    app = node.ops.http.app
    try:
        with TestClient(app, client=("10.1.2.3", 50000)) as remote:
            r = remote.get("/api/v1/studies/1.2.3/job")
            assert r.status_code == 403 and "api_token_env" in r.text
        with TestClient(app, client=("127.0.0.1", 50000)) as local:
            assert local.get("/api/v1/studies/1.2.3/job").json() == {"study_instance_uid": "1.2.3", "job": None}
        with TestClient(app, client=("::1", 50000)) as local6:
            assert local6.get("/api/v1/studies/1.2.3").status_code == 200
    finally:
        node.store.close()


def test_a_missing_or_short_token_stops_the_node_from_starting(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ConfigError, match=f"http.api_token_env: environment variable {ENV} is not set"):
        _node(tmp_path / "a", api_token_env=ENV)
    monkeypatch.setenv(ENV, "short")
    with pytest.raises(ConfigError, match="shorter than 32 characters"):
        _node(tmp_path / "b", api_token_env=ENV)


def test_reports_need_the_token_too_as_bearer_or_as_a_basic_password(live: Live) -> None:
    job = live.node.store.by_study(live.study.study_instance_uid)
    url = f"{live.base}/jobs/{job.id}/report/measurement_report"
    refused = httpx.get(url)
    assert refused.status_code == 401 and "Basic" in refused.headers["www-authenticate"]
    assert httpx.get(url, auth=("radiologist", "wrong-" + "z" * 40)).status_code == 401
    for passed in (httpx.get(url, auth=("radiologist", TOKEN)),
                   httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"})):
        assert passed.status_code == 200 and "Imaging Measurement Report" in passed.text, passed.text[:300]
    open_routes = [httpx.get(f"{live.base}{p}") for p in ("/health/live", "/metrics", "/jobs")]
    assert [r.status_code for r in open_routes] == [200, 200, 200], "no identifiers there: no login"


def test_without_a_token_reports_answer_loopback_clients_only(tmp_path: Path) -> None:
    node = _node(tmp_path)
    assert node.ops.http is not None
    try:
        with TestClient(node.ops.http.app, client=("10.1.2.3", 50000)) as remote:
            assert remote.get("/jobs/1/report/measurement_report").status_code == 403
            assert remote.get("/jobs").status_code == 200
        with TestClient(node.ops.http.app, client=("127.0.0.1", 50000)) as local:
            assert local.get("/jobs/1/report/measurement_report").status_code == 404, "no such job, but allowed"
    finally:
        node.store.close()
