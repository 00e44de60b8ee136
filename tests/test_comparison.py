"""Comparison with a prior study: the change rules (inference.comparison) and how the SRs carry them
(sr_templates.comparison): dciodvfy, dsrdump, read back, the narrative's follow-up section."""

from __future__ import annotations

import datetime
import io
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from test_sr_dicom import KNOWN_SR_WARNINGS
from test_sr_support import CREATED_AT, scoliosis_case

from inference.comparison import (
    ChangeKind,
    Comparison,
    PriorReport,
    compare_with_prior,
    comparison_context,
    comparison_lines,
)
from inference.findings import LevelFinding, SpineFindings
from sr_templates import build_outputs, read_measurement_report
from sr_templates.pdf import narrative_sections

PRIOR_DATE = datetime.date(2024, 3, 1)
NOW = datetime.date(2024, 10, 1)  # 214 days later


def _f(level: str, finding: str, severity: str = "moderate", **kw: object) -> LevelFinding:
    return LevelFinding(level=level, finding=finding, severity=severity, **kw)  # type: ignore[arg-type]


def _cobb(value: float) -> list[dict[str, object]]:
    return [{"type": "cobb_angle", "value": value, "upper_end_vertebra": "T6", "lower_end_vertebra": "T12"}]


def _prior(*findings: LevelFinding, date: datetime.date | None = PRIOR_DATE) -> PriorReport:
    return PriorReport("1.2.3.4", date, "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4.5", "1.2.3.4.6", tuple(findings))


# ------------------------------------------------------------------------------------------ rules
def test_cobb_progression_by_five_degrees_or_more_is_an_increase() -> None:
    prior = _prior(_f("T9", "scoliosis", measurements=_cobb(24.0)))
    c = compare_with_prior([_f("T8", "scoliosis", measurements=_cobb(32.0))], prior, NOW)
    assert c.interval_days == 214
    (change,) = c.changes
    assert change.kind is ChangeKind.INCREASED  # matched although the apex moved T9 -> T8
    (m,) = change.measurements
    assert (m.prior, m.current, m.difference) == (24.0, 32.0, 8.0)
    # within the measurement error: no significant change, even if the grading moved
    c = compare_with_prior([_f("T9", "scoliosis", "severe", measurements=_cobb(28.5))], prior, NOW)
    assert c.changes[0].kind is ChangeKind.UNCHANGED
    c = compare_with_prior([_f("T9", "scoliosis", measurements=_cobb(19.0))], prior, NOW)
    assert c.changes[0].kind is ChangeKind.DECREASED


def test_grade_and_severity_without_measurement_and_a_narrower_canal() -> None:
    prior = _prior(_f("L5", "spondylolisthesis", "mild", grade=1),
                   _f("L4-L5", "spinal_canal_stenosis", measurements=[{"type": "canal_ap_diameter", "value": 10.0}]),
                   _f("L3-L4", "disc_herniation", "mild"))
    now = [_f("L5", "spondylolisthesis", "mild", grade=2),
           _f("L4-L5", "spinal_canal_stenosis", measurements=[{"type": "canal_ap_diameter", "value": 7.5}]),
           _f("L3-L4", "disc_herniation", "mild")]
    kinds = {(c.level, c.finding.value): c.kind for c in compare_with_prior(now, prior, NOW).changes}
    assert kinds == {("L5", "spondylolisthesis"): ChangeKind.INCREASED,
                     ("L4-L5", "spinal_canal_stenosis"): ChangeKind.INCREASED,  # 2.5 mm narrower
                     ("L3-L4", "disc_herniation"): ChangeKind.UNCHANGED}


def test_new_and_not_seen_only_where_the_other_report_looked() -> None:
    prior = _prior(_f("L1", "vertebral_fracture", "none"), _f("L2", "no_abnormality", "none"),
                   _f("L4-L5", "disc_herniation", laterality="left"))
    now = [_f("L1", "vertebral_fracture", "moderate"),  # new: L1 was assessed (absent) in the prior
           _f("T4", "vertebral_fracture", "mild"),  # outside the prior's span: not compared
           _f("L4-L5", "disc_herniation", laterality="right"),  # the left one is gone, a right one is new
           _f("L2", "no_abnormality", "none")]
    changes = compare_with_prior(now, prior, NOW).changes
    got = [(c.level, c.finding.value, c.laterality.value if c.laterality else None, c.kind) for c in changes]
    assert got == [("L1", "vertebral_fracture", None, ChangeKind.NEW),
                   ("L4-L5", "disc_herniation", "left", ChangeKind.NOT_SEEN),
                   ("L4-L5", "disc_herniation", "right", ChangeKind.NEW)]


def test_a_comparison_has_a_prior_or_a_reason() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Comparison(prior=None, interval_days=None)
    with pytest.raises(ValueError, match="reason"):
        Comparison.without_prior("  ")
    none = Comparison.without_prior("pacs unreachable")
    assert comparison_lines(none) == ["Comparison with prior studies: not available (pacs unreachable)."]
    undated = compare_with_prior([], _prior(date=None), NOW)
    assert undated.interval_days is None
    assert comparison_lines(undated)[0] == "Compared with the prior study of date unknown."


def test_the_model_is_told_the_prior_findings() -> None:
    prior = _prior(_f("T9", "scoliosis", measurements=_cobb(24.0)), _f("L2", "no_abnormality", "none"))
    assert comparison_context(prior, NOW) == (
        "Prior study of 2024-03-01 (214 days before this study): T9 scoliosis moderate Cobb angle 24 deg. "
        "Compare and state changes.")


# ------------------------------------------------------------------------------------------ the SRs
@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[pydicom.Dataset], Comparison]:
    case = scoliosis_case(tmp_path_factory.mktemp("cmp"))
    now = case.findings.answer.levels
    current = [replace_cobb(now[0], 32.0), now[1]]
    findings = SpineFindings.model_validate(
        {**case.findings.model_dump(), "answer": {**case.findings.answer.model_dump(), "levels": current}})
    prior = _prior(_f("T9", "scoliosis", measurements=_cobb(24.0)), _f("L1", "vertebral_fracture", "none"),
                   _f("T13", "no_abnormality", "none"))
    comparison = compare_with_prior(findings.levels, prior, NOW)
    return build_outputs(case.study, findings, created_at=CREATED_AT, comparison=comparison), comparison


def replace_cobb(f: LevelFinding, value: float) -> LevelFinding:
    return f.model_copy(update={"measurements": [replace_measurement(f.measurements[0], value)]})


def replace_measurement(m: object, value: float) -> object:
    return m.model_copy(update={"value": value})  # type: ignore[attr-defined]


def _file(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_tid1500_states_the_cobb_change_and_reads_back(compared: tuple[list[pydicom.Dataset], Comparison]) -> None:
    outputs, _ = compared
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, outputs[0], enforce_file_format=True)
    back = read_measurement_report(pydicom.dcmread(io.BytesIO(buf.getvalue())))
    (change,) = back.changes
    assert (change.kind, change.level, change.finding.value) == ("increased", "T9", "scoliosis")
    assert change.interval_days == 214
    assert change.measurements == (("cobb_angle", 32.0, 8.0, 24.0),)
    assert (change.prior_study_instance_uid, change.prior_study_date, change.prior_sr_instance_uid) == (
        "1.2.3.4", "20240301", "1.2.3.4.5")
    assert "Cobb angle 24 deg then, 32 deg now (+8 deg)" in change.comment
    assert [f.level for f in back.findings] == ["T9", "T13"]  # the change items are not findings
    # the prior SR (another study) is pertinent other evidence of both SRs
    for ds in outputs[:2]:
        other = ds.PertinentOtherEvidenceSequence[0]
        assert other.StudyInstanceUID == "1.2.3.4"
        assert other.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3.4.5"


def test_narrative_follow_up_and_pdf_carry_the_comparison(compared: tuple[list[pydicom.Dataset], Comparison]) -> None:
    outputs, comparison = compared
    sections = dict(narrative_sections(outputs[1]))
    follow = next(v for k, v in sections.items() if k.startswith("Follow-up"))
    assert follow[1:] == comparison_lines(comparison)
    assert follow[1] == "Compared with the prior study of 2024-03-01, 214 days earlier."
    assert "apex T9: scoliosis: increased; Cobb angle 24 deg then, 32 deg now (+8 deg)." in follow


@pytest.mark.skipif(shutil.which("dciodvfy") is None or shutil.which("dsrdump") is None,
                    reason="dicom3tools / dcmtk not installed")
def test_dciodvfy_and_dsrdump(compared: tuple[list[pydicom.Dataset], Comparison], tmp_path: Path) -> None:
    outputs, _ = compared
    for i, ds in enumerate(outputs[:2]):
        path = _file(ds, tmp_path / f"{i}.dcm")
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = {ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()[1:] if ln.strip()}
        assert lines <= KNOWN_SR_WARNINGS, sorted(lines - KNOWN_SR_WARNINGS)
    dump = subprocess.run(["dsrdump", "+Pc", str(tmp_path / "0.dcm")], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    for want in ('(CHANGE,99SPINEMED,"Change since prior study")=(15454001,SCT,"Increase in size")',
                 'NUM:(285285000,SCT,"Cobb angle")="32.0" (deg,UCUM,"Degree")',
                 'NUM:(CHANGE-VALUE,99SPINEMED,"Difference from prior study")="8.0" (deg,UCUM,"Degree")',
                 'NUM:(385673002,SCT,"Interval")="214.0" (d,UCUM,"day")',
                 'CODE:(121069,DCM,"Previous Finding")=(298382003,SCT,"Scoliosis deformity of spine")',
                 'NUM:(285285000,SCT,"Cobb angle")="24.0" (deg,UCUM,"Degree")',
                 'DATE:(111060,DCM,"Study Date")="20240301"',
                 'COMPOSITE:(121112,DCM,"Source of Measurement")=(Comprehensive3DSRStorage,)'):
        assert want in dump.stdout, want


def test_without_prior_the_reports_say_why(tmp_path: Path) -> None:
    case = scoliosis_case(tmp_path)
    none = Comparison.without_prior("prior study query: pacs unreachable (connection refused)")
    outputs = build_outputs(case.study, case.findings, created_at=CREATED_AT, comparison=none)
    back = read_measurement_report(outputs[0])
    assert back.changes == ()
    assert back.comparison_comment == ("Comparison with prior studies: not available "
                                       "(prior study query: pacs unreachable (connection refused)).")
    follow = next(v for k, v in narrative_sections(outputs[1]) if k.startswith("Follow-up"))
    assert follow[-1] == back.comparison_comment
    # and another reason is another object (the UIDs follow the content)
    other = build_outputs(case.study, case.findings, created_at=CREATED_AT,
                          comparison=Comparison.without_prior("no prior study of this region found"))
    assert other[0].SOPInstanceUID != outputs[0].SOPInstanceUID

