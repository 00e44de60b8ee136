"""Comparison with priors through the node: a real Orthanc as the PACS holds the patient's prior
scoliosis radiograph and our SR of it; the node receives the current radiograph over DICOM, finds the
prior (C-FIND), fetches our SR of it (C-GET), gives the model the prior's findings, and its TID 1500 SR
states the Cobb change against the prior.  A PACS that refuses the query gives a report without
comparison, with the reason on the report and on the job.

The model is scripted (the test swaps the model, not the pipeline): the demo model's findings are random.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import free_port, running_node, storescu, wait_until
from test_orthanc_harness import OrthancServer, require_orthanc, start_orthanc
from test_sr_support import CREATED_AT, MODEL, REPORT

from dicom_node.config import load_config
from dicom_node.devtools.phantoms import make_scoliosis_radiograph
from dicom_node.errors import JobNotFoundError
from dicom_node.jobs.model import Job, JobState
from dicom_node.node import ReceivingNode
from dicom_node.work.pipeline import Pipeline
from inference.findings import Evidence, LevelFinding, ModelAnswer, ModelIdentity, SpineFindings
from inference.inputs import ImageSizePolicy, ModelInput
from inference.study import load_study
from sr_templates import build_outputs, read_measurement_report

PID = "CMP-0001"
NODE_AE = "SPINEMED"


class ScriptedCobb:
    """A :class:`inference.inputs.SpineModel` that answers one scoliosis with a given Cobb angle and
    records what it was asked."""

    def __init__(self, cobb_deg: float) -> None:
        self.cobb_deg = cobb_deg
        self.asked: list[ModelInput] = []

    @property
    def identity(self) -> ModelIdentity:
        return MODEL

    @property
    def image_size(self) -> ImageSizePolicy:
        return ImageSizePolicy(multiple=28, longest=448)

    def analyze(self, inputs: ModelInput) -> SpineFindings:
        self.asked.append(inputs)
        image = inputs.images[0].ref
        levels = [
            LevelFinding(level="T9", finding="scoliosis", severity="moderate",  # type: ignore[arg-type]
                         measurements=[{"type": "cobb_angle", "value": self.cobb_deg,  # type: ignore[list-item]
                                        "upper_end_vertebra": "T6", "lower_end_vertebra": "T12"}],
                         evidence=[Evidence(image=0, x=image.columns / 2, y=image.rows * 0.4)]),
            LevelFinding(level="L1", finding="vertebral_fracture", severity="none"),  # type: ignore[arg-type]
        ]
        return SpineFindings(study_instance_uid=inputs.study_instance_uid, model=MODEL, task=str(inputs.task),
                             images=[im.ref for im in inputs.images], answer=ModelAnswer(levels=levels, report=REPORT))


def _restamp(paths: tuple[Path, ...], **attrs: str) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """Orthanc knowing our AE (C-FIND, C-GET, C-STORE allowed), with the prior radiograph of 2024-03-01
    and our report of it (Cobb angle T6-T12 24 deg)."""
    require_orthanc("libOrthancDicomWeb.so")
    tmp = tmp_path_factory.mktemp("pacs")
    orthanc = start_orthanc(tmp, {
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {
        "node": [NODE_AE, "127.0.0.1", free_port()],
        # a node this PACS lets query but not retrieve
        "noget": {"AET": "NOGET-AE", "Host": "127.0.0.1", "Port": free_port(), "AllowFind": True, "AllowGet": False,
                  "AllowMove": False, "AllowStore": True, "AllowEcho": True},
    }}, name="pacs")
    try:
        prior = make_scoliosis_radiograph(tmp / "prior", seed=41, cobb_deg=24.0, patient_id=PID)
        _restamp(prior.paths, StudyDate="20240301")
        study = load_study(prior.paths)
        model = ScriptedCobb(24.0)
        from inference.preprocess import prepare_inputs
        from inference.settings import ModelSettings

        inputs = prepare_inputs(study, [study.series[0].series_instance_uid], ModelSettings(), model.image_size)
        sr = build_outputs(study, model.analyze(inputs), created_at=CREATED_AT)[0]
        for path in prior.paths:
            orthanc.request("POST", "/instances", path.read_bytes())
        sr_path = tmp / "prior-sr.dcm"
        sr.save_as(sr_path, enforce_file_format=True)
        orthanc.request("POST", "/instances", sr_path.read_bytes())
        yield orthanc
    finally:
        orthanc.stop(signal.SIGKILL)


@contextlib.contextmanager
def _node(tmp: Path, pacs: OrthancServer, model: ScriptedCobb, *, ae_title: str = NODE_AE,
          web: bool = False) -> Iterator[ReceivingNode]:
    source = ({"name": "pacs", "type": "dicomweb", "url": f"{pacs.url}/dicom-web"} if web else
              {"name": "pacs", "type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port})
    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp / "data", "min_free_disk_mb": 0, "ae_title": ae_title},
        http={"enabled": False},
        completeness={"quiet_seconds": 1.0, "force_seconds": 60, "check_interval_s": 0.1},
        destinations=[source],
        priors={"source": "pacs", "max_count": 3, "max_age_days": 3650, "timeout_s": 10},
        export={"max_attempts": 2, "backoff_initial_s": 0.2, "backoff_max_s": 0.4, "timeout_s": 10},
        worker={"poll_interval_s": 0.05},
    )
    with running_node(cfg, Pipeline(cfg, model=model)) as node:
        yield node


def _current(tmp: Path, seed: int) -> Any:
    cur = make_scoliosis_radiograph(tmp / "current", seed=seed, cobb_deg=32.0, patient_id=PID)
    _restamp(cur.paths, StudyDate="20241001")
    return cur


def _report(node: ReceivingNode, study_uid: str) -> pydicom.Dataset:
    def ended() -> Job | None:
        try:
            job = node.store.by_study(study_uid)
        except JobNotFoundError:  # not indexed yet
            return None
        return job if job.state in (JobState.DONE, JobState.FAILED) else None

    job = wait_until(ended, 120, "the study is reported")
    assert job.state is JobState.DONE, job.reason
    (rec,) = [o for o in node.store.outputs(study_uid) if o.kind == "measurement_report"]
    return pydicom.dcmread(rec.path)


@pytest.mark.parametrize("web", [False, True], ids=["dimse", "dicomweb"])
def test_the_report_states_the_cobb_change_against_the_prior(tmp_path: Path, pacs: OrthancServer, web: bool) -> None:
    """Over DICOM (C-FIND, C-GET; the new report exported by C-STORE) or DICOMweb (QIDO-RS, WADO-RS;
    STOW-RS)."""
    model = ScriptedCobb(32.0)
    cur = _current(tmp_path, seed=42 if not web else 45)
    with _node(tmp_path, pacs, model, web=web) as node:
        assert storescu(node.receiver.port, list(cur.paths)).returncode == 0
        sr = _report(node, cur.study_instance_uid)
        events = [e["detail"] or "" for e in node.store.events(cur.study_instance_uid)]
    back = read_measurement_report(sr)
    (change,) = back.changes
    assert (change.kind, change.level, change.finding.value, change.interval_days) == (
        "increased", "T9", "scoliosis", 214)
    assert change.measurements == (("cobb_angle", 32.0, 8.0, 24.0),)
    assert change.prior_study_date == "20240301"
    prior_sr = pacs.request("GET", f"/instances/{_orthanc_id(pacs, change.prior_sr_instance_uid)}/simplified-tags")
    assert prior_sr["Modality"] == "SR"
    assert sr.PertinentOtherEvidenceSequence[0].StudyInstanceUID == change.prior_study_instance_uid
    # the model was given the prior's findings
    assert "Prior study of 2024-03-01 (214 days before this study): T9 scoliosis moderate Cobb angle 24 deg" in (
        model.asked[-1].clinical_context)
    assert any("compared with a prior study: 1 changes" in e for e in events)
    # and the new report reached the PACS beside the prior
    assert _find(pacs, str(sr.SOPInstanceUID)), "exported to the PACS"


def _find(pacs: OrthancServer, sop_uid: str | None) -> list[str]:
    query = {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}
    return list(pacs.request("POST", "/tools/find", json.dumps(query).encode()))


def _orthanc_id(pacs: OrthancServer, sop_uid: str | None) -> str:
    found = _find(pacs, sop_uid)
    assert len(found) == 1
    return str(found[0])


def test_a_pacs_that_refuses_the_query_gives_a_report_without_comparison_and_why(
        tmp_path: Path, pacs: OrthancServer) -> None:
    """Orthanc stores from any AE but answers C-FIND only to AEs it knows: the node (another AE title)
    reports the study anyway, saying why there is no comparison."""
    model = ScriptedCobb(32.0)
    cur = _current(tmp_path, seed=43)
    with _node(tmp_path, pacs, model, ae_title="UNKNOWN-AE") as node:
        assert storescu(node.receiver.port, list(cur.paths), called="UNKNOWN-AE").returncode == 0
        sr = _report(node, cur.study_instance_uid)
        events = [e["detail"] or "" for e in node.store.events(cur.study_instance_uid)]
    back = read_measurement_report(sr)
    assert back.changes == ()
    assert back.comparison_comment is not None
    assert back.comparison_comment.startswith("Comparison with prior studies: not available (prior study query: "
                                              "C-FIND refused: the peer aborted the association")
    assert "Prior study" not in model.asked[-1].clinical_context
    assert any(e.startswith("revision 1; without comparison: prior study query: C-FIND refused") for e in events)
    assert PID not in back.comparison_comment


def test_a_pacs_that_refuses_to_hand_the_prior_over_gives_a_report_without_comparison(
        tmp_path: Path, pacs: OrthancServer) -> None:
    """The query works, the C-GET of the prior's SR is refused: reported without comparison, the reason says
    which step failed."""
    model = ScriptedCobb(32.0)
    cur = _current(tmp_path, seed=44)
    with _node(tmp_path, pacs, model, ae_title="NOGET-AE") as node:
        assert storescu(node.receiver.port, list(cur.paths), called="NOGET-AE").returncode == 0
        sr = _report(node, cur.study_instance_uid)
    back = read_measurement_report(sr)
    assert back.changes == ()
    assert back.comparison_comment is not None
    assert back.comparison_comment.startswith(
        "Comparison with prior studies: not available (prior report retrieve: C-GET refused: the peer aborted")
    assert "Prior study" not in model.asked[-1].clinical_context
