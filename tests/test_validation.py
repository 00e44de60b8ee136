"""Site validation (``spinemed-node validate``): every metric against values worked out by hand.

Phantom MR studies carry planted anatomy (vertebral body centres in patient mm); a scripted model (the
``SpineModel`` protocol, swapped into the real pipeline) answers with controlled errors: a missed
finding, false positives, a wrong grade, a point off by 10 model pixels, a finding at the wrong level,
Cobb angles off by known amounts and known per-grade probabilities.  An RSNA 2024-format sample is
validated end to end through the CLI with the demo model, and its report is opened in headless Chromium.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import pydicom
import pytest

from dicom_node.config import load_config
from dicom_node.devtools.phantoms import make_lumbar_mr
from dicom_node.work.validate import run_validation
from inference.findings import (
    Evidence,
    FindingType,
    GradeProbabilities,
    ImagePlane,
    LevelFinding,
    Measurement,
    MeasurementType,
    ModelAnswer,
    ModelIdentity,
    NarrativeReport,
    Severity,
    SpineFindings,
)
from inference.inputs import ImageSizePolicy, ModelInput
from inference.validation.labels import Grade, load_labels, parse_grade
from inference.validation.metrics import Resampler, compute_metrics, quadratic_kappa

ROOT = Path(__file__).resolve().parents[1]
Point = tuple[float, float, float]


# ------------------------------------------------------------------------------------------ phantoms
@dataclass(frozen=True)
class Phantom:
    folder: str
    study_instance_uid: str
    disc: dict[str, Point]  # disc centres (midpoint of adjacent vertebral body centres), LPS mm
    mid_instance: int  # Instance Number of the mid-sagittal slice of series 2 (x = 0 mm)
    source_px: dict[str, tuple[float, float]]  # disc centre → (column, row) on that slice


def _phantom(cases: Path, folder: str, seed: int) -> Phantom:
    s = make_lumbar_mr(cases / folder, seed=seed, size=128, slices=7, patient_id=f"SYN-VAL-{seed}")
    c = s.vertebra_centres
    disc = {f"{a}-{b}": tuple((np.add(c[a], c[b]) / 2).tolist()) for a, b in
            (("L2", "L3"), ("L3", "L4"), ("L4", "L5"), ("L5", "S1"))}
    mid = None
    for p in s.paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if int(ds.SeriesNumber) == 2 and abs(float(ds.ImagePositionPatient[0])) < 1e-6:
            mid = ds
    assert mid is not None, "the phantom has a slice at x = 0"
    ipp = np.asarray(mid.ImagePositionPatient, float)
    row, col = np.asarray(mid.ImageOrientationPatient[:3], float), np.asarray(mid.ImageOrientationPatient[3:], float)
    dr, dc = (float(v) for v in mid.PixelSpacing)
    px = {k: (float(np.dot(np.subtract(v, ipp), row) / dc), float(np.dot(np.subtract(v, ipp), col) / dr))
          for k, v in disc.items()}
    return Phantom(folder, s.study_instance_uid, disc, int(mid.InstanceNumber), px)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- scripted model
@dataclass(frozen=True)
class Say:
    """One scripted finding: at ``target`` (LPS mm) moved by ``offset_rows`` model pixels, if given."""

    level: str
    finding: FindingType
    severity: Severity
    target: Point | None = None
    offset_rows: float = 0.0
    cobb: tuple[tuple[float, str, str], ...] = ()


class ScriptedModel:
    """A SpineModel that answers from a script keyed by Study Instance UID."""

    def __init__(self, script: dict[str, list[Say]], probabilities: dict[str, list[GradeProbabilities]]) -> None:
        self.script = script
        self.probabilities = probabilities

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(name="scripted-test-model", version="1", weights_digest="0" * 64, backend="scripted",
                             prompt_version="test", demo=False)

    @property
    def image_size(self) -> ImageSizePolicy:
        return ImageSizePolicy(multiple=28, longest=448)

    def analyze(self, inputs: ModelInput) -> SpineFindings:
        levels: list[LevelFinding] = []
        for say in self.script[inputs.study_instance_uid]:
            evidence: list[Evidence] = []
            if say.target is not None:
                index, x, y = self._locate(inputs, say.target)
                evidence.append(Evidence(image=index, x=x, y=y + say.offset_rows))
            measurements = [Measurement(type=MeasurementType.COBB_ANGLE, value=v, upper_end_vertebra=u,
                                        lower_end_vertebra=lo) for v, u, lo in say.cobb]
            levels.append(LevelFinding(level=say.level, finding=say.finding, severity=say.severity,
                                       evidence=evidence, measurements=measurements))
        text = "scripted"
        answer = ModelAnswer(levels=levels, report=NarrativeReport(
            findings=text, diagnosis=text, treatment_suggestions=text, risk_and_prognosis=text, follow_up=text,
            diagnostic_basis=text))
        return SpineFindings(study_instance_uid=inputs.study_instance_uid, model=self.identity,
                             task=inputs.task.value, images=[i.ref for i in inputs.images], answer=answer,
                             grade_probabilities=tuple(self.probabilities.get(inputs.study_instance_uid, ())))

    @staticmethod
    def _locate(inputs: ModelInput, target: Point) -> tuple[int, float, float]:
        """The model-image pixel of ``target`` on the sagittal input image whose plane holds it."""
        for img in inputs.images:
            ref = img.ref
            if ref.plane is not ImagePlane.SAGITTAL or ref.pixel_to_patient is None:
                continue
            m = np.asarray(ref.pixel_to_patient).reshape(3, 4)
            a, b, t = m[:, 0], m[:, 1], m[:, 3]
            normal = np.cross(a, b)
            if abs(float(np.dot(np.subtract(target, t), normal / np.linalg.norm(normal)))) > 1e-6:
                continue
            (x, y), *_ = np.linalg.lstsq(np.column_stack([a, b]), np.subtract(target, t), rcond=None)
            return ref.index, float(x), float(y)
        raise AssertionError("no input image holds the target point")


# ----------------------------------------------------------------------------------- the scripted run
P = GradeProbabilities
SPINAL = FindingType.SPINAL_CANAL_STENOSIS
#: one model-image row of the phantom's mid-sagittal image: 300 mm field of view over 448 model pixels
MM_PER_MODEL_PX = 300.0 / 448.0


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("validation")
    cases = tmp / "cases"
    ph = {k: _phantom(cases, k, seed) for k, seed in (("A", 11), ("B", 12), ("C", 13), ("D", 14))}
    # the labels, in our own per-level CSV
    rows = [["study", "level", "condition", "grade", "laterality", "series", "instance", "x", "y", "cobb_angle_deg"]]

    def pt(k: str, level: str) -> list[str]:
        x, y = ph[k].source_px[level]
        return ["2", str(ph[k].mid_instance), f"{x:.6f}", f"{y:.6f}"]

    rows += [
        ["A", "L4-L5", "spinal_canal_stenosis", "Severe", "", *pt("A", "L4-L5"), ""],
        ["A", "L3-L4", "spinal_canal_stenosis", "Normal/Mild", "", "", "", "", "", ""],
        ["A", "L4-L5", "disc_herniation", "Moderate", "", *pt("A", "L4-L5"), ""],
        ["A", "T5-T10", "cobb_angle", "", "", "", "", "", "", "20"],
        ["B", "L4/L5", "Spinal Canal Stenosis", "Moderate", "", *pt("B", "L4-L5"), ""],
        ["B", "L3-L4", "spinal_canal_stenosis", "Normal/Mild", "", "", "", "", "", ""],
        ["C", "L4-L5", "spinal_canal_stenosis", "Normal/Mild", "", "", "", "", "", ""],
        ["C", "L3-L4", "spinal_canal_stenosis", "Normal/Mild", "", "", "", "", "", ""],
        ["C", "L4-L5", "left_subarticular_stenosis", "Moderate", "", "", "", "", "", ""],
        ["D", "L4-L5", "spinal_canal_stenosis", "Severe", "", *pt("D", "L4-L5"), ""],
        ["D", "L3-L4", "spinal_canal_stenosis", "Moderate", "", "", "", "", "", ""],
        ["D", "T5-T10", "cobb_angle", "", "", "", "", "", "", "10"],
        ["D", "T11-L3", "cobb_angle", "", "", "", "", "", "", "30"],
    ]
    labels = tmp / "labels.csv"
    with labels.open("w", newline="") as fp:
        csv.writer(fp).writerows(rows)

    uid = {k: p.study_instance_uid for k, p in ph.items()}
    script = {
        # A: spinal L4-L5 right (point exact); herniation graded mild (truth moderate: a wrong grade and a
        # miss, point exact); a Cobb angle of 25° (truth 20°)
        uid["A"]: [Say("L4-L5", SPINAL, Severity.SEVERE, ph["A"].disc["L4-L5"]),
                   Say("L4-L5", FindingType.DISC_HERNIATION, Severity.MILD, ph["A"].disc["L4-L5"]),
                   Say("T8", FindingType.SCOLIOSIS, Severity.MILD, cobb=((25.0, "T5", "T10"),))],
        # B: L4-L5 missed; the finding is reported at L3-L4 (a false positive there) with its point on the
        # L4-L5 label: a wrong level
        uid["B"]: [Say("L3-L4", SPINAL, Severity.MODERATE, ph["B"].disc["L4-L5"])],
        # C: a false positive at L3-L4
        uid["C"]: [Say("L3-L4", SPINAL, Severity.SEVERE)],
        # D: L4-L5 graded moderate (truth severe), its point 10 model pixels down; L3-L4 right; a mild
        # finding at the unlabelled L2-L3; Cobb angles 12° and 27° (truth 10° and 30°)
        uid["D"]: [Say("L4-L5", SPINAL, Severity.MODERATE, ph["D"].disc["L4-L5"], offset_rows=10.0),
                   Say("L3-L4", SPINAL, Severity.MODERATE),
                   Say("L2-L3", SPINAL, Severity.MILD),
                   Say("T8", FindingType.SCOLIOSIS, Severity.MILD, cobb=((12.0, "T5", "T10"), (27.0, "T11", "L3")))],
    }

    def p(level: str, nm: float, mod: float, sev: float) -> P:
        return P(level=level, finding=SPINAL, normal_mild=nm, moderate=mod, severe=sev)

    probabilities = {
        uid["A"]: [p("L4-L5", 0.1, 0.2, 0.7), p("L3-L4", 0.8, 0.1, 0.1)],
        uid["B"]: [p("L4-L5", 0.6, 0.3, 0.1), p("L3-L4", 0.3, 0.6, 0.1)],
        uid["C"]: [p("L4-L5", 0.9, 0.05, 0.05), p("L3-L4", 0.2, 0.2, 0.6)],
        uid["D"]: [p("L4-L5", 0.1, 0.5, 0.4), p("L3-L4", 0.2, 0.7, 0.1)],
    }
    model = ScriptedModel(script, probabilities)
    config = load_config(None)
    config.node.data_dir = tmp / "data"
    out = tmp / "out"
    result = run_validation(config, cases, labels, out, model=model, progress=False)
    return {"result": result, "out": out, "labels": labels, "cases": cases, "model": model, "config": config}


def _v(est: dict[str, Any]) -> float | None:
    return est["value"]  # type: ignore[no-any-return]


def test_binary_metrics_by_hand(scripted: dict[str, Any]) -> None:
    m = scripted["result"].metrics
    spinal = m["conditions"]["spinal_canal_stenosis"]
    # 8 labelled spinal cells; positives (moderate/severe): A45, B45, D45, D34; negatives: A34, B34, C45, C34.
    # model positive: A45, B34, C34, D45, D34 → TP = A45, D45, D34 (3); FN = B45 (1); FP = B34, C34 (2); TN 2
    a = spinal["all_levels"]
    assert _v(a["sensitivity"]) == pytest.approx(3 / 4)
    assert _v(a["specificity"]) == pytest.approx(2 / 4)
    assert _v(a["ppv"]) == pytest.approx(3 / 5)
    assert _v(a["npv"]) == pytest.approx(2 / 3)
    l45, l34 = spinal["levels"]["L4-L5"], spinal["levels"]["L3-L4"]
    # L4-L5: TP A, D; FN B; TN C → 2/3, 1/1, 2/2, 1/2
    assert [_v(l45[k]) for k in ("sensitivity", "specificity", "ppv", "npv")] == pytest.approx([2 / 3, 1, 1, 1 / 2])
    # L3-L4: TP D; FP B, C; TN A → 1/1, 1/3, 1/3, 1/1
    assert [_v(l34[k]) for k in ("sensitivity", "specificity", "ppv", "npv")] == pytest.approx([1, 1 / 3, 1 / 3, 1])
    for est in (a["sensitivity"], a["specificity"], l45["sensitivity"]):
        low, high = est["ci95"]
        assert low <= est["value"] <= high
    # the herniation: one positive label, graded mild by the model → sensitivity 0, and no negatives at all
    hern = m["conditions"]["disc_herniation"]["all_levels"]
    assert _v(hern["sensitivity"]) == 0.0
    assert hern["specificity"]["value"] is None and "no negative" in hern["specificity"]["reason"]
    assert hern["ppv"]["value"] is None and hern["ppv"]["ci95"] is None
    # subarticular stenosis has no counterpart: reported, not dropped
    sub = m["conditions"]["left_subarticular_stenosis"]
    assert sub["assessed"] is False and "not assessed by the model" in sub["note"] and sub["cells"] == 1
    assert m["model_findings_outside_labelled_cells"] == 1  # D's mild L2-L3
    assert m["demo"] is False and m["notice"] is None


def test_kappa_level_localisation_cobb_by_hand(scripted: dict[str, Any]) -> None:
    m = scripted["result"].metrics
    spinal = m["conditions"]["spinal_canal_stenosis"]
    # (truth, model) grades 0/1/2: A45 (2,2) A34 (0,0) B45 (1,0) B34 (0,1) C45 (0,0) C34 (0,2) D45 (2,1) D34 (1,1)
    assert spinal["confusion"] == [[2, 1, 1], [1, 1, 0], [0, 1, 1]]
    # weights (i-j)²/4; observed Σw·O = .25+1+.25+.25 = 1.75; rows 4,2,2, columns 3,3,2, N 8:
    # expected Σw·E = (1.5·.25 + 1·1 + .75·.25 + .5·.25 + .75·1 + .75·.25) = 2.625; κ = 1 − 1.75/2.625 = 1/3
    assert _v(spinal["quadratic_weighted_kappa"]) == pytest.approx(1 / 3)
    # all assessed conditions: the herniation's (1, 0) added: O = [[2,1,1],[2,1,0],[0,1,1]], N 9, rows = columns
    # = 4,3,2: Σw·O = 2.0, Σw·E = 25/9 → κ = 1 − 18/25 = 0.28
    assert _v(m["severity_agreement"]["quadratic_weighted_kappa"]) == pytest.approx(0.28)
    # level identification: A spinal ✓, A herniation ✓, B (said L3-L4, nearest label L4-L5) ✗, D spinal ✓
    assert _v(m["level_identification_accuracy"]) == pytest.approx(3 / 4)
    # localisation: A spinal 0, A herniation 0, D spinal 10 model rows × 300/448 mm = 6.6964 mm
    loc = m["localisation_mm"]
    assert loc["n"] == 3 and loc["median"] == pytest.approx(0.0, abs=1e-6)
    assert _v(loc["mean"]) == pytest.approx(10 * 300 / 448 / 3, abs=1e-4)
    # Cobb: A |25−20| = 5; D |12−10| + |27−30| = 5 → MAE 10/3;
    # SMAPE = mean(5/45, 5/79)·100 = (0.111111 + 0.063291)/2·100 = 8.7201 %
    assert _v(m["cobb"]["mae_deg"]) == pytest.approx(10 / 3)
    assert _v(m["cobb"]["smape_percent"]) == pytest.approx(8.7201, abs=1e-4)


def test_log_loss_by_hand(scripted: dict[str, Any]) -> None:
    ll = scripted["result"].metrics["log_loss"]
    assert ll["available"] is True
    # spinal, weights 1/2/4: [4·−ln .7 + −ln .8 + 2·−ln .3 + −ln .3 + −ln .9 + −ln .2 + 4·−ln .4 + 2·−ln .7] / 16
    spinal = (6 * -math.log(0.7) - math.log(0.8) - 3 * math.log(0.3) - math.log(0.9) - math.log(0.2)
              - 4 * math.log(0.4)) / 16
    assert spinal == pytest.approx(0.709692, abs=1e-6)
    assert _v(ll["per_group"]["spinal"]) == pytest.approx(0.709692, abs=1e-6)
    # any_severe_spinal: A y=1 w4 p=.7; B y=0 w2 p=.1; C y=0 w1 p=.6; D y=1 w4 p=.4
    # (4·−ln .7 + 2·−ln .9 + −ln .4 + 4·−ln .4) / 11 = 0.565352
    assert _v(ll["any_severe_spinal"]) == pytest.approx(0.565352, abs=1e-6)
    # score: the mean of the available RSNA groups (spinal only) and any_severe_spinal
    assert _v(ll["score"]) == pytest.approx((0.709692 + 0.565352) / 2, abs=1e-6)
    assert "foraminal" in ll["score"]["note"]
    assert ll["per_group"]["disc_herniation"]["value"] is None  # no probabilities given for it
    assert scripted["result"].metrics["calibration"]
    html = (scripted["out"] / "report.html").read_text()
    assert 'alt="calibration"' in html and 'alt="localisation error histogram"' in html
    assert "demo — not for clinical use" not in html
    for data in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', html):
        ElementTree.fromstring(base64.b64decode(data))


def test_cases_csv_and_no_identifiers(scripted: dict[str, Any]) -> None:
    out: Path = scripted["out"]
    with (out / "cases.csv").open() as fp:
        rows = list(csv.DictReader(fp))
    assert len(rows) == 10  # A 3, B 2, C 3, D 2 labelled cells
    b34 = next(r for r in rows if r["label_study_id"] == "B" and r["level"] == "L3-L4")
    assert (b34["truth"], b34["prediction"], b34["correct"]) == ("Normal/Mild", "Moderate", "false")
    sub = next(r for r in rows if r["condition"] == "left_subarticular_stenosis")
    assert sub["prediction"] == "not assessed by the model" and sub["correct"] == ""
    d45 = next(r for r in rows if r["label_study_id"] == "D" and r["condition"] == "spinal_canal_stenosis"
               and r["level"] == "L4-L5")
    assert float(d45["distance_mm"]) == pytest.approx(10 * MM_PER_MODEL_PX, abs=0.01)
    text = "".join(p.read_text() for p in out.iterdir())
    for p in scripted["cases"].rglob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for phi in (str(ds.PatientID), str(ds.PatientName), str(ds.StudyInstanceUID)):
            assert phi not in text
        break


def test_bootstrap_is_deterministic_and_degenerate_cases_are_null(scripted: dict[str, Any]) -> None:
    cases = scripted["result"].cases
    a = compute_metrics(cases, resamples=200, seed=7).data
    b = compute_metrics(cases, resamples=200, seed=7).data
    assert a == b
    sens = a["conditions"]["spinal_canal_stenosis"]["all_levels"]["sensitivity"]
    assert sens["ci95"][0] <= sens["value"] <= sens["ci95"][1]
    rs = Resampler(5, 1000, seed=3)
    est = rs.ratio([1, 0, 1, 1, 0], [1, 1, 1, 1, 1], reason="none")
    assert est.value == pytest.approx(0.6) and est.low is not None and est.low <= 0.6 <= (est.high or 0)
    again = Resampler(5, 1000, seed=3).ratio([1, 0, 1, 1, 0], [1, 1, 1, 1, 1], reason="none")
    assert (est.low, est.high) == (again.low, again.high)
    none = rs.ratio([0, 0, 0, 0, 0], [0, 0, 0, 0, 0], reason="no positive case")
    assert none.value is None and none.low is None and none.reason == "no positive case"
    assert json.dumps(none.to_json(), allow_nan=False)  # null, never NaN
    # kappa of hand-made matrices: perfect agreement 1; a single class in both: undefined (NaN → null)
    assert quadratic_kappa(np.diag([3.0, 2.0, 1.0]))[0] == pytest.approx(1.0)
    assert math.isnan(quadratic_kappa(np.array([[4.0, 0, 0], [0, 0, 0], [0, 0, 0]]))[0])
    # the 2-class textbook case [[20, 5], [10, 15]] as 3 classes without the last: p_o .7, p_e .5 → κ .4
    assert quadratic_kappa(np.array([[20.0, 5, 0], [10, 15, 0], [0, 0, 0]]))[0] == pytest.approx(0.4)


def test_studies_not_analysed_are_listed_not_scored(scripted: dict[str, Any], tmp_path: Path) -> None:
    from inference.validation.run import validate_cases

    truth = load_labels(scripted["labels"])
    result = validate_cases(scripted["cases"], truth, lambda study: "skipped: no series selected", tmp_path,
                            progress=False)
    m = result.metrics
    assert m["studies"]["analysed"] == 0 and len(m["studies"]["not_analysed"]) == 4
    assert m["studies"]["not_analysed"][0]["reason"] == "skipped: no series selected"
    assert m["level_identification_accuracy"]["value"] is None and m["conditions"] == {}
    json.dumps(m, allow_nan=False)
    with (tmp_path / "cases.csv").open() as fp:
        assert {r["prediction"] for r in csv.DictReader(fp)} == {"not analysed", "not assessed by the model"}


def test_grades_and_label_errors(tmp_path: Path) -> None:
    assert parse_grade("Normal/Mild") is Grade.NORMAL_MILD and parse_grade("") is None
    assert parse_grade(" severe ") is Grade.SEVERE
    with pytest.raises(ValueError, match="grade"):
        parse_grade("awful")
    bad = tmp_path / "bad.csv"
    bad.write_text("study,level,condition,grade\nX,L9-L10,spinal_canal_stenosis,Severe\n")
    with pytest.raises(ValueError, match=r"bad\.csv line 2"):
        load_labels(bad)
    missing = tmp_path / "m.csv"
    missing.write_text("study,level,grade\nX,L4-L5,Severe\n")
    with pytest.raises(ValueError, match="missing column"):
        load_labels(missing)


def test_sr_as_truth(scripted: dict[str, Any], tmp_path: Path) -> None:
    """A TID 1500 SR (here the node's own, of the scripted answer for study A) read back as truth."""
    from dicom_node.work.pipeline import Pipeline
    from inference.study import load_study

    pipeline = Pipeline(scripted["config"], model=scripted["model"])
    outcome = pipeline.run(load_study([scripted["cases"] / "A"]))
    sr = next(ds for ds in outcome.datasets if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34")
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    truth = load_labels(tmp_path / "sr.dcm")
    (study,) = truth.studies.values()
    cells = {k: c.grade for k, c in study.cells.items()}
    assert cells[("spinal_canal_stenosis", "L4-L5")] is Grade.SEVERE
    assert cells[("disc_herniation", "L4-L5")] is Grade.NORMAL_MILD
    assert [c.angle_deg for c in study.cobb] == [25.0]
    out = tmp_path / "out"
    cases = tmp_path / "cases"
    shutil.copytree(scripted["cases"] / "A", cases / "A")
    m = run_validation(scripted["config"], cases, tmp_path / "sr.dcm", out, model=scripted["model"],
                       progress=False).metrics
    # the model against its own report: every grade agrees, every point is where the SR put it
    assert _v(m["conditions"]["spinal_canal_stenosis"]["all_levels"]["sensitivity"]) == 1.0
    assert _v(m["localisation_mm"]["mean"]) == pytest.approx(0.0, abs=0.05)
    assert _v(m["cobb"]["mae_deg"]) == 0.0


# --------------------------------------------------------------------------------- RSNA, CLI, browser
RSNA_CONDITIONS = ("spinal_canal_stenosis", "left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing",
                   "left_subarticular_stenosis", "right_subarticular_stenosis")
RSNA_LEVELS = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")


def _write_rsna(root: Path, studies: Sequence[tuple[str, Phantom]]) -> None:
    grades = ("Normal/Mild", "Moderate", "Severe")
    header = ["study_id", *(f"{c}_{lv}" for c in RSNA_CONDITIONS for lv in RSNA_LEVELS)]
    with (root / "train.csv").open("w", newline="") as fp:
        w = csv.writer(fp)
        w.writerow(header)
        for i, (sid, _) in enumerate(studies):
            w.writerow([sid, *(grades[(i + j) % 3] for j in range(len(header) - 1))])
    with (root / "train_label_coordinates.csv").open("w", newline="") as fp:
        w = csv.writer(fp)
        w.writerow(["study_id", "series_id", "instance_number", "condition", "level", "x", "y"])
        for sid, ph in studies:
            for level in ("L3-L4", "L4-L5"):
                x, y = ph.source_px[level]
                w.writerow([sid, "2", ph.mid_instance, "Spinal Canal Stenosis", level.replace("-", "/"), x, y])
    with (root / "train_series_descriptions.csv").open("w", newline="") as fp:
        w = csv.writer(fp)
        w.writerow(["study_id", "series_id", "series_description"])
        for sid, _ in studies:
            w.writerows([[sid, "2", "Sagittal T2/STIR"], [sid, "3", "Sagittal T1"]])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("rsna")
    cases, labels = tmp / "train_images", tmp / "labels"
    labels.mkdir()
    studies = [(sid, _phantom(cases, sid, seed)) for sid, seed in (("4003253", 21), ("4646740", 22))]
    _write_rsna(labels, studies)
    config = tmp / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp / "data"}"\n\n[model]\nbackend = "demo"\npath = "{demo_model_dir}"\n')
    out = tmp / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node", "validate", str(cases), "--labels", str(labels), "--out", str(out),
         "--config", str(config), "--resamples", "300"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr}


def test_rsna_sample_through_the_cli(demo_run: dict[str, Any]) -> None:
    out: Path = demo_run["out"]
    assert {"report.html", "metrics.json", "cases.csv"} <= {p.name for p in out.iterdir()}
    m = json.loads((out / "metrics.json").read_text())
    assert m["demo"] is True and m["notice"] == "demo — not for clinical use"
    assert m["labels"]["format"] == "rsna"
    assert m["studies"]["labelled"] == 2 and m["studies"]["found"] == 2
    assert m["studies"]["analysed"] + len(m["studies"]["not_analysed"]) == 2
    assert m["log_loss"] == {"available": False,
                             "reason": "not available (backend gives no per-grade probabilities)"}
    if m["studies"]["analysed"]:
        for side in ("left", "right"):
            assert m["conditions"][f"{side}_subarticular_stenosis"]["assessed"] is False
        assert m["conditions"]["spinal_canal_stenosis"]["assessed"] is True
    with (out / "cases.csv").open() as fp:
        rows = list(csv.DictReader(fp))
    assert len(rows) == 2 * 25 and {r["label_study_id"] for r in rows} == {"4003253", "4646740"}
    # every plot is a well-formed SVG image embedded in the page
    html = (out / "report.html").read_text()
    svgs = re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', html)
    assert svgs
    for data in svgs:
        root = ElementTree.fromstring(base64.b64decode(data))
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "demo model — not for clinical use" in demo_run["stdout"]
    assert "validate" in demo_run["stderr"]  # the progress line


def test_report_in_headless_chromium(demo_run: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    from tests.test_ops_http import _chrome

    browser = _chrome()
    assert isinstance(browser, WebDriver)
    try:
        browser.get((demo_run["out"] / "report.html").as_uri())
        notice = browser.find_element(By.ID, "demo-notice")
        assert "DEMO — NOT FOR CLINICAL USE" in notice.text
        assert notice.location["y"] < 100, "the demo label is at the top"
        images = browser.find_elements(By.CSS_SELECTOR, "img.plot")
        assert images, "the report has plots"
        for img in images:
            decoded = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
            assert decoded and int(decoded) > 0, img.get_attribute("alt")
        shots = ROOT / "docs" / "images"
        shots.mkdir(parents=True, exist_ok=True)
        browser.set_window_size(1200, 1400)
        browser.save_screenshot(str(shots / "validation-report.png"))
    finally:
        browser.quit()
