"""Shadow mode: a real node in dry run (listener, worker thread, HTTP app) with a scripted model whose
grades are known; a phantom study over storescu, then the site's label CSV dropped in the watched folder."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from conftest import running_node, start_storescp, storescu, wait_until

from dicom_node.config import load_config
from dicom_node.devtools.phantoms import make_lumbar_mr
from dicom_node.jobs.model import JobState, ShadowRow
from dicom_node.log import phi_hash
from dicom_node.shadow import iso_week, summarise
from dicom_node.work.pipeline import Pipeline
from inference.findings import (
    FindingType,
    Laterality,
    LevelFinding,
    ModelAnswer,
    ModelIdentity,
    NarrativeReport,
    Severity,
    SpineFindings,
)
from inference.inputs import ConsultAnswer, ImageSizePolicy, ModelInput, Task, Turn

TOKEN = "shadow-test-token-0123456789abcdefghij"

#: what the scripted model says about every study
SAYS = [
    LevelFinding(level="L4-L5", finding=FindingType.SPINAL_CANAL_STENOSIS, severity=Severity.MODERATE),
    LevelFinding(level="L5-S1", finding=FindingType.FORAMINAL_STENOSIS, severity=Severity.SEVERE,
                 laterality=Laterality.LEFT),
    LevelFinding(level="L3-L4", finding=FindingType.DISC_HERNIATION, severity=Severity.MILD),
]


class ScriptedModel:
    """A SpineModel whose findings are :data:`SAYS` for any study."""

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(name="scripted-shadow", version="1", weights_digest="0" * 64, backend="scripted",
                             prompt_version="test", demo=False)

    @property
    def image_size(self) -> ImageSizePolicy:
        return ImageSizePolicy(multiple=28, longest=448)

    def analyze(self, inputs: ModelInput) -> SpineFindings:
        text = "scripted"
        answer = ModelAnswer(levels=SAYS, report=NarrativeReport(
            findings=text, diagnosis=text, treatment_suggestions=text, risk_and_prognosis=text, follow_up=text,
            diagnostic_basis=text))
        return SpineFindings(study_instance_uid=inputs.study_instance_uid, model=self.identity,
                             task=inputs.task.value, images=[i.ref for i in inputs.images], answer=answer)

    def consult(self, inputs: ModelInput, findings: SpineFindings, history: Sequence[Turn], question: str,
                on_text: Any, *, max_new_tokens: int) -> ConsultAnswer:
        raise NotImplementedError


def _radiologist_sr(tmp: Path, paths: Sequence[Path]) -> Path:
    """A TID 1500 SR of the study written by someone else: L4-L5 canal severe, L5-S1 left foramen severe."""
    from inference.study import load_study
    from sr_templates import build_outputs

    st = load_study(list(paths))
    says = [LevelFinding(level="L4-L5", finding=FindingType.SPINAL_CANAL_STENOSIS, severity=Severity.SEVERE),
            LevelFinding(level="L5-S1", finding=FindingType.FORAMINAL_STENOSIS, severity=Severity.SEVERE,
                         laterality=Laterality.LEFT)]
    text = "radiologist"
    findings = SpineFindings(
        study_instance_uid=st.study_instance_uid,
        model=ModelIdentity(name="reading-room", version="1", weights_digest="-", backend="human",
                            prompt_version="-", demo=False),
        task=Task.STRUCTURED_REPORT.value, images=[],
        answer=ModelAnswer(levels=says, report=NarrativeReport(
            findings=text, diagnosis=text, treatment_suggestions=text, risk_and_prognosis=text, follow_up=text,
            diagnostic_basis=text)))
    sr = next(ds for ds in build_outputs(st, findings) if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34")
    sr.SeriesDescription = "Radiology report"
    sr.Manufacturer = "Reading room"
    out = tmp / "radiologist-sr.dcm"
    sr.save_as(out, enforce_file_format=True)
    return out


def _auth() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"x:{TOKEN}".encode()).decode()}


def _cells(html_text: str, table: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table}">(.*?)</table>', html_text, re.S)
    assert body is not None, table
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1), re.S)
            if "<td" in row]


def test_shadow_mode_records_agreement_exports_nothing_and_shows_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHADOW_TEST_TOKEN", TOKEN)
    scp = start_storescp(tmp_path)
    labels = tmp_path / "labels"
    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp_path / "data", "min_free_disk_mb": 0},
        http={"enabled": True, "host": "127.0.0.1", "port": 0, "api_token_env": "SHADOW_TEST_TOKEN"},
        completeness={"quiet_seconds": 1.0, "force_seconds": 60, "check_interval_s": 0.1},
        destinations=[{"name": "pacs", "ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port}],
        routing={"dry_run": True},
        model={"backend": "demo"},
        worker={"poll_interval_s": 0.05},
        shadow={"labels_dir": labels, "poll_s": 0.1},
    )
    try:
        with running_node(cfg, Pipeline(cfg, model=ScriptedModel())) as node:
            study = make_lumbar_mr(tmp_path / "mr", slices=5, size=64, seed=7)
            uid = study.study_instance_uid
            assert storescu(node.receiver.port, list(study.paths)).returncode == 0
            job = wait_until(lambda: (j := node.store.by_study(uid)).state in (JobState.DONE, JobState.FAILED)
                             and j, 60, "the study analysed")
            assert job.state is JobState.DONE and job.reason == "dry run: results written, not exported", job.reason

            # the site's result: 6 labelled cells, 5 of conditions the model assesses
            labels.mkdir(exist_ok=True)
            staged = tmp_path / "site.csv"
            staged.write_text(
                "study,level,condition,grade,laterality\n"
                f"{uid},L4-L5,spinal_canal_stenosis,Moderate,\n"               # model moderate: agree
                f"{uid},L3-L4,Spinal Canal Stenosis,Severe,\n"                 # model nothing: normal/mild
                f"{uid},L1-L2,spinal_canal_stenosis,Normal/Mild,\n"            # agree
                f"{uid},L5-S1,left_neural_foraminal_narrowing,Severe,\n"       # model severe left: agree
                f"{uid},L5-S1,right_neural_foraminal_narrowing,Moderate,\n"    # model left only: disagree
                f"{uid},L2-L3,left_subarticular_stenosis,Moderate,\n",         # not assessed: no row
                encoding="utf-8")
            staged.rename(labels / "site.csv")
            (labels / "broken.csv").write_text("study,level\nx,L4-L5\n", encoding="utf-8")
            (labels / "other.csv").write_text(
                "study,level,condition,grade\n1.2.3.999,L4-L5,spinal_canal_stenosis,Severe\n", encoding="utf-8")
            done = wait_until(lambda: list((labels / "done").glob("*-site.csv")) or None, 30, "labels processed")
            failed = wait_until(lambda: len(list((labels / "failed").glob("*.csv"))) == 2
                                and sorted((labels / "failed").glob("*.csv")), 30, "bad files failed")

            rows = node.store.shadow_rows()
            got = sorted((r.condition, r.level, r.truth_grade, r.model_grade, r.agree) for r in rows)
            assert got == [
                ("left_neural_foraminal_narrowing", "L5-S1", 2, 2, True),
                ("right_neural_foraminal_narrowing", "L5-S1", 1, 0, False),
                ("spinal_canal_stenosis", "L1-L2", 0, 0, True),
                ("spinal_canal_stenosis", "L3-L4", 2, 0, False),
                ("spinal_canal_stenosis", "L4-L5", 1, 1, True),
            ]
            assert {r.study for r in rows} == {phi_hash(uid)} and {r.revision for r in rows} == {1}
            reason = Path(str(done[0]) + ".reason.txt").read_text()
            assert "1 of 1 studies compared: 5 labelled cells, 3 agree" in reason and uid not in reason
            reasons = {p.name.split("-", 1)[1]: Path(str(p) + ".reason.txt").read_text() for p in failed}
            assert "missing column" in reasons["broken.csv"] or "column" in reasons["broken.csv"]
            assert "1 unknown to this node" in reasons["other.csv"]
            assert not list(labels.glob("*.csv")) and not list((labels / "processing").iterdir())

            base = f"http://127.0.0.1:{node.ops.http_port}"
            assert httpx.get(f"{base}/shadow").status_code == 401  # the token is configured
            page = httpx.get(f"{base}/shadow", headers=_auth())
            assert page.status_code == 200
            text = page.text
            assert _cells(text, "total") == [["1 studies", "5", "3", "60.0 %"]]
            assert _cells(text, "conditions") == [
                ["left_neural_foraminal_narrowing", "1", "1", "100.0 %"],
                ["right_neural_foraminal_narrowing", "1", "0", "0.0 %"],
                ["spinal_canal_stenosis", "3", "2", "66.7 %"],
            ]
            assert ["spinal_canal_stenosis", "L3-L4", "1", "0", "0.0 %"] in _cells(text, "levels")
            assert _cells(text, "weeks") == [[iso_week(rows[0].recorded_at), "5", "3", "60.0 %"]]
            assert "<svg" in text
            # no identifiers: neither the UIDs nor the patient's ID nor even the study digest
            ds = pydicom.dcmread(study.paths[0], stop_before_pixels=True)
            for ident in (uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.PatientID),
                          phi_hash(uid)):
                assert ident not in text
            assert not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", text)

            metrics = httpx.get(f"{base}/metrics").text
            assert 'spinemed_shadow_agreement_ratio{condition="spinal_canal_stenosis"} 0.6666' in metrics
            assert 'spinemed_shadow_compared_total{condition="spinal_canal_stenosis"} 3.0' in metrics
            assert 'spinemed_shadow_agreed_total{condition="right_neural_foraminal_narrowing"} 0.0' in metrics
            assert "spinemed_shadow_studies 1.0" in metrics

            # (b) the radiologist's TID 1500 SR arrives over DICOM: truth, not a study update
            sr_file = _radiologist_sr(tmp_path, study.paths)
            sr_uid = str(pydicom.dcmread(sr_file, stop_before_pixels=True).SOPInstanceUID)
            assert storescu(node.receiver.port, [sr_file], extra=["-R"]).returncode == 0  # propose its SOP class
            wait_until(lambda: any(r.source == "sr" for r in node.store.shadow_rows()) or None, 30, "SR compared")
            after = node.store.by_study(uid)
            assert (after.state, after.revision, after.instance_count) == (JobState.DONE, 1, job.instance_count)
            assert sr_uid not in {i.sop_instance_uid for i in node.store.instances(uid)}
            rows = node.store.shadow_rows()
            got = sorted((r.condition, r.level, r.truth_grade, r.model_grade, r.source) for r in rows)
            assert got == [
                ("left_neural_foraminal_narrowing", "L5-S1", 2, 2, "sr"),
                ("right_neural_foraminal_narrowing", "L5-S1", 1, 0, "csv"),
                ("spinal_canal_stenosis", "L1-L2", 0, 0, "csv"),
                ("spinal_canal_stenosis", "L3-L4", 2, 0, "csv"),
                ("spinal_canal_stenosis", "L4-L5", 2, 1, "sr"),  # the SR says severe: replaces the CSV's
            ]
            assert list((labels / "done").glob("*-sr-*.dcm"))
        # dry run: the destination received nothing (it was reachable the whole time)
        assert scp.files() == []
    finally:
        scp.proc.terminate()
        scp.proc.wait(timeout=10)


def test_a_label_file_waits_for_a_study_still_in_work(tmp_path: Path) -> None:
    """A file naming a study the node is still receiving stays in the folder (until wait_s)."""
    from dicom_node.jobs.model import InstanceRecord
    from dicom_node.jobs.stores import open_store
    from dicom_node.shadow import ShadowWatcher

    labels = tmp_path / "labels"
    labels.mkdir()
    cfg = load_config(node={"data_dir": tmp_path / "data"}, shadow={"labels_dir": labels, "wait_s": 100})
    store = open_store(cfg)
    try:
        store.record_instance(InstanceRecord("1.2.3.4.1.1", "1.2.3.4", "1.2.3.4.1", "1.2.840.10008.5.1.4.1.1.4",
                                             "MR", "sag T2", str(tmp_path / "x.dcm"), "1.2.840.10008.1.2.1", 10,
                                             "PACS", 0.0))
        path = labels / "a.csv"
        path.write_text("study,level,condition,grade\n1.2.3.4,L4-L5,spinal_canal_stenosis,Severe\n")
        written = path.stat().st_mtime
        watcher = ShadowWatcher(cfg, store)
        assert watcher.scan(written + 10) == 0 and path.is_file()  # waits for the study
        assert watcher.scan(written + 200) == 1 and not path.exists()  # then gives up waiting
        (reason,) = (labels / "failed").glob("*.reason.txt")
        assert "1 still not analysed after 100 s" in reason.read_text()
        assert store.shadow_rows() == []
    finally:
        store.close()


def test_summary_counts_by_condition_level_and_week() -> None:
    week = 1_764_000_000.0  # a Monday in 2025 (UTC)
    rows = [ShadowRow("a", 1, "spinal_canal_stenosis", "L4-L5", 1, 1, week, "csv"),
            ShadowRow("a", 1, "spinal_canal_stenosis", "L5-S1", 2, 0, week, "csv"),
            ShadowRow("b", 1, "spinal_canal_stenosis", "L4-L5", 0, 0, week + 7 * 86400, "csv")]
    s = summarise(rows)
    assert (s.total.n, s.total.agree, s.studies) == (3, 2, 2)
    assert s.by_level[("spinal_canal_stenosis", "L4-L5")].ratio == 1.0
    assert [(w, a.n) for w, a in s.by_week.items()] == [(iso_week(week), 2), (iso_week(week + 7 * 86400), 1)]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_store_keeps_one_row_per_study_condition_level(backend: str, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    """record_shadow on both stores: a later truth for a cell replaces the earlier one."""
    from dicom_node.jobs.postgres import PostgresJobStore
    from dicom_node.jobs.sqlite import SQLiteJobStore

    store = (SQLiteJobStore(tmp_path / "jobs.sqlite") if backend == "sqlite"
             else PostgresJobStore(request.getfixturevalue("pg_url")))
    try:
        first = ShadowRow("abc", 1, "spinal_canal_stenosis", "L4-L5", 2, 1, 100.0, "csv")
        other = ShadowRow("abc", 1, "spinal_canal_stenosis", "L3-L4", 0, 0, 100.0, "csv")
        assert store.record_shadow([first, other]) == 2
        store.record_shadow([ShadowRow("abc", 2, "spinal_canal_stenosis", "L4-L5", 1, 1, 200.0, "sr")])
        rows = store.shadow_rows()
        assert [(r.level, r.revision, r.truth_grade, r.agree, r.source) for r in rows] == [
            ("L3-L4", 1, 0, True, "csv"), ("L4-L5", 2, 1, True, "sr")]
    finally:
        store.close()
