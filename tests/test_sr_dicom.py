"""Standards checks of what sr_templates writes: dciodvfy, dsrdump snapshot, dsr2html, determinism,
revisions, argument validation and demo labelling."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from test_sr_support import CREATED_AT, SNAPSHOT_STUDY_UID, Case, lumbar_mr_case, scoliosis_case

import sr_templates
from inference.findings import Severity
from sr_templates import (
    OutputOptions,
    SpineLevelEvaluation,
    SpineNarrativeReport,
    SpinePlanarROIGroup,
    build_outputs,
    read_measurement_report,
)
from sr_templates.codes import (
    FINDING_CODES,
    MEASUREMENT_CODES,
    MEYERDING_GRADE_CODES,
    NARRATIVE_SECTIONS,
    SEVERITY_CODES,
    SpineCodes,
    is_private,
    level_code,
    procedure_code,
)
from sr_templates.text import DEMO_TEXT, NOT_FOR_DIAGNOSTIC_USE

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("SPINEMED_UPDATE_SNAPSHOTS") == "1"

#: dciodvfy findings we accept, with why (anything else - or any "Error" - fails):
#: our private coding scheme designator is, by design, not a DICOM-defined term; it is declared in
#: the Coding Scheme Identification Sequence (PS3.3 C.12.1.1.9 / PS3.16 8.2).
KNOWN_SR_WARNINGS = {
    "Warning - Unrecognized defined term <99SPINEMED> for value 1 of attribute <Coding Scheme Designator>",
}
KNOWN_SC_WARNINGS: set[str] = set()

needs_dcmtk = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk not installed")
needs_dicom3tools = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sr_dicom")


@pytest.fixture(scope="module")
def mr(tmp: Path) -> Case:
    return lumbar_mr_case(tmp / "a", study_instance_uid=SNAPSHOT_STUDY_UID)


@pytest.fixture(scope="module")
def mr_outputs(mr: Case) -> list[pydicom.Dataset]:
    return build_outputs(mr.study, mr.findings, created_at=CREATED_AT)


@pytest.fixture(scope="module")
def demo_outputs(tmp: Path) -> list[pydicom.Dataset]:
    case = lumbar_mr_case(tmp / "demo", demo=True)
    return build_outputs(case.study, case.findings, created_at=CREATED_AT)


@pytest.fixture(scope="module")
def xr_outputs(tmp: Path) -> list[pydicom.Dataset]:
    case = scoliosis_case(tmp / "xr")
    return build_outputs(case.study, case.findings, created_at=CREATED_AT)


# ----------------------------------------------------------------------------------- dciodvfy
@needs_dicom3tools
@pytest.mark.parametrize("which", ["mr", "demo", "xr"])
def test_dciodvfy_clean(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    outputs: list[pydicom.Dataset] = request.getfixturevalue(f"{which}_outputs")
    assert [ds.Modality for ds in outputs] == ["SR", "SR", "OT", "KO"]
    for i, ds in enumerate(outputs):
        path = _write(ds, tmp_path / f"{i}.dcm")
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        iod = lines[0]
        findings = set(lines[1:])
        assert not [ln for ln in findings if "Error" in ln], lines
        known = KNOWN_SR_WARNINGS if iod.endswith("SR") else KNOWN_SC_WARNINGS
        assert findings == known, f"{iod}: unexpected dciodvfy output {sorted(findings - known)}"


# ----------------------------------------------------------------------------------- dsrdump
def _normalise(text: str, case: Case) -> str:
    """Replace the phantom's source UIDs (random per run) with stable placeholders."""
    names: dict[str, str] = {}
    for s_i, series in enumerate(case.study.series):
        for inst in series.instances:
            names[inst.sop_instance_uid] = f"<source series {s_i + 1} instance {inst.instance_number}>"
        names[series.series_instance_uid] = f"<source series {s_i + 1}>"
    return re.sub(r"[0-9]+(?:\.[0-9]+)+", lambda m: names.get(m.group(0), m.group(0)), text)


@needs_dcmtk
@pytest.mark.parametrize(("index", "name"), [(0, "lumbar_mr_tid1500"), (1, "lumbar_mr_narrative")])
def test_dsrdump_snapshot(
    index: int, name: str, mr: Case, mr_outputs: list[pydicom.Dataset], tmp_path: Path
) -> None:
    path = _write(mr_outputs[index], tmp_path / f"{name}.dcm")
    proc = subprocess.run(
        ["dsrdump", "+Pl", "+Pu", "+Pc", "+Pt", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = _normalise(proc.stdout, mr)
    snapshot = SNAPSHOTS / f"{name}.dsrdump.txt"
    if UPDATE or not snapshot.exists():
        snapshot.write_text(text)
        if not UPDATE:
            pytest.fail(f"snapshot {snapshot.name} was missing and has been written: review it and rerun")
    assert text == snapshot.read_text()


@needs_dcmtk
def test_dsr2html_renders_both(mr_outputs: list[pydicom.Dataset], tmp_path: Path) -> None:
    for i, ds in enumerate(mr_outputs[:2]):
        path = _write(ds, tmp_path / f"{i}.dcm")
        proc = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        for label in ("L1", "L4-L5", "L5"):
            assert label in proc.stdout
        assert "spondylolisthesis" in proc.stdout.lower()


# ----------------------------------------------------------------------------------- determinism
def test_same_inputs_same_objects(mr: Case, mr_outputs: list[pydicom.Dataset]) -> None:
    again = build_outputs(mr.study, mr.findings, created_at=CREATED_AT)
    assert [_bytes(d) for d in again] == [_bytes(d) for d in mr_outputs]
    # without a fixed timestamp: same UIDs (idempotent resend), content the same apart from times
    later = build_outputs(mr.study, mr.findings)
    assert [d.SOPInstanceUID for d in later] == [d.SOPInstanceUID for d in mr_outputs]
    assert [d.ContentSequence for d in later[:2]] == [d.ContentSequence for d in mr_outputs[:2]]


def test_changed_content_or_options_changes_uids(mr: Case, mr_outputs: list[pydicom.Dataset]) -> None:
    levels = list(mr.findings.answer.levels)
    levels[1] = levels[1].model_copy(update={"severity": Severity.SEVERE})
    answer = mr.findings.answer.model_copy(update={"levels": levels})
    other = build_outputs(mr.study, mr.findings.model_copy(update={"answer": answer}), created_at=CREATED_AT)
    assert not {d.SOPInstanceUID for d in other} & {d.SOPInstanceUID for d in mr_outputs}
    assert other[0].SeriesInstanceUID == mr_outputs[0].SeriesInstanceUID
    site = build_outputs(mr.study, mr.findings, OutputOptions(uid_prefix="1.2.3.4."), created_at=CREATED_AT)
    assert all(d.SOPInstanceUID.startswith("1.2.3.4.") for d in site)
    assert site[0].SeriesInstanceUID.startswith("1.2.3.4.")


def test_revision_references_predecessor(mr: Case, mr_outputs: list[pydicom.Dataset]) -> None:
    rev2 = build_outputs(mr.study, mr.findings, revision=2, predecessors=mr_outputs, created_at=CREATED_AT)
    assert not {d.SOPInstanceUID for d in rev2} & {d.SOPInstanceUID for d in mr_outputs}
    # the two SRs continue their series (1, 2 -> 3, 4); the key image and its KO theirs (1 -> 2)
    assert [d.InstanceNumber for d in rev2] == [3, 4, 2, 2]
    assert [d.SeriesInstanceUID for d in rev2] == [d.SeriesInstanceUID for d in mr_outputs]
    assert {d.SeriesInstanceUID for d in rev2[:2]} == {mr_outputs[0].SeriesInstanceUID}
    for new, old in zip(rev2[:2], mr_outputs[:2], strict=True):
        (study_item,) = new.PredecessorDocumentsSequence
        assert study_item.StudyInstanceUID == mr.study.study_instance_uid
        refs = [i for s in study_item.ReferencedSeriesSequence for i in s.ReferencedSOPSequence]
        assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in refs] == [
            (old.SOPClassUID, old.SOPInstanceUID)
        ]
    old_groups = {g.tracking_identifier: g.tracking_uid for g in read_measurement_report(mr_outputs[0]).groups}
    new_groups = {g.tracking_identifier: g.tracking_uid for g in read_measurement_report(rev2[0]).groups}
    assert old_groups and old_groups == new_groups  # the same regions are tracked across revisions


# ----------------------------------------------------------------------------------- demo
def test_demo_labelled_everywhere(
    demo_outputs: list[pydicom.Dataset], mr_outputs: list[pydicom.Dataset]
) -> None:
    sr, narrative, key, key_object = demo_outputs
    for ds in demo_outputs:
        assert NOT_FOR_DIAGNOSTIC_USE in ds.SeriesDescription and "DEMO" in ds.SeriesDescription
        ours = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "SpineMed"]
        assert "NOT FOR CLINICAL USE" in ours[0].ContributionDescription
    assert read_measurement_report(sr).demo
    assert DEMO_TEXT.startswith("DEMO MODEL OUTPUT") and "not for clinical use" in DEMO_TEXT
    assert any(getattr(i, "TextValue", "") == DEMO_TEXT for i in narrative.ContentSequence)
    assert NOT_FOR_DIAGNOSTIC_USE in key.DerivationDescription
    described = [str(i.TextValue) for i in key_object.ContentSequence if i.ValueType == "TEXT"]
    assert any("DEMO - NOT FOR DIAGNOSTIC USE" in t for t in described)
    # the burned-in banner is longer for the demo model
    demo_red = ((key.pixel_array[:20, :, 0] > 200) & (key.pixel_array[:20, :, 1] < 120)).sum()
    plain = mr_outputs[2].pixel_array
    plain_red = ((plain[:20, :, 0] > 200) & (plain[:20, :, 1] < 120)).sum()
    assert demo_red > plain_red > 0
    assert not read_measurement_report(mr_outputs[0]).demo
    assert "DEMO" not in mr_outputs[0].SeriesDescription


# ----------------------------------------------------------------------------------- codes
def test_private_code_values_fit_sh() -> None:
    concepts = [
        *FINDING_CODES.values(),
        *SEVERITY_CODES.values(),
        *MEYERDING_GRADE_CODES.values(),
        *MEASUREMENT_CODES.values(),
        *(c for s in NARRATIVE_SECTIONS for c in s[1:]),
    ]
    concepts += [level_code(lv) for lv in ("T13", "L6", "S1", "C1-C2", "T12-T13", "T13-L1", "L5-L6", "L6-S1")]
    concepts += [
        procedure_code(m, r)
        for m in ("MR", "CT", "DX", "US")
        for r in ("cervical", "thoracic", "lumbar", "whole")
    ]
    concepts += [v for k, v in vars(SpineCodes).items() if k.isupper()]
    for c in concepts:
        assert len(c.value) <= 16, c  # SH: longer values would move to Long Code Value
        assert len(c.meaning) <= 64, c
    assert not is_private(level_code("L5-S1")) and not is_private(level_code("C7-T1"))
    assert is_private(level_code("S1")) and is_private(level_code("L6"))


# ----------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"manufacturer": 3}, TypeError, "manufacturer"),
        ({"manufacturer": "x" * 65}, ValueError, "manufacturer"),
        ({"manufacturer_model_name": ""}, ValueError, "manufacturer_model_name"),
        ({"software_version": "a\\b"}, ValueError, "software_version"),
        ({"institution_name": 1}, TypeError, "institution_name"),
        ({"institution_department_name": "y" * 70}, ValueError, "institution_department_name"),
        ({"series_number": 0}, ValueError, "series_number"),
        ({"series_number": "9901"}, TypeError, "series_number"),
        ({"series_number": True}, TypeError, "series_number"),
        ({"key_image": "yes"}, TypeError, "key_image"),
        ({"uid_prefix": "1.2.x."}, ValueError, "uid_prefix"),
        ({"uid_prefix": "1.2.3"}, ValueError, "uid_prefix"),
        ({"uid_prefix": "1.02.3."}, ValueError, "uid_prefix"),
        ({"uid_prefix": "1." * 30}, ValueError, "uid_prefix"),
        ({"uid_prefix": 12}, TypeError, "uid_prefix"),
    ],
)
def test_output_options_validation(kwargs: dict[str, object], error: type[Exception], name: str) -> None:
    with pytest.raises(error, match=rf"^{name}:"):
        OutputOptions(**kwargs)  # type: ignore[arg-type]


def test_build_outputs_validation(mr: Case, mr_outputs: list[pydicom.Dataset], tmp: Path) -> None:
    study, findings = mr.study, mr.findings
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"study": "x"}, TypeError, "study"),
        ({"findings": {}}, TypeError, "findings"),
        ({"options": {}}, TypeError, "options"),
        ({"revision": "2"}, TypeError, "revision"),
        ({"revision": 0}, ValueError, "revision"),
        ({"revision": 1, "predecessors": mr_outputs}, ValueError, "predecessors"),
        ({"revision": 2}, ValueError, "predecessors"),
        ({"revision": 2, "predecessors": mr_outputs[0]}, TypeError, "predecessors"),
        ({"revision": 2, "predecessors": ["x"]}, TypeError, "predecessors"),
        ({"created_at": "2025-01-01"}, TypeError, "created_at"),
        ({"findings": findings.model_copy(update={"study_instance_uid": "1.2.3"})}, ValueError, "findings"),
    ]
    other = pydicom.Dataset()
    other.SOPClassUID, other.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4"
    other.SeriesInstanceUID, other.StudyInstanceUID = "1.2.3", "9.9.9"
    cases.append(({"revision": 2, "predecessors": [other]}, ValueError, "predecessors"))
    stray = findings.images[0].model_copy(update={"sop_instance_uids": ("1.2.3.4.5",)})
    cases.append(
        (
            {"findings": findings.model_copy(update={"images": [stray, findings.images[1]]})},
            ValueError,
            "findings",
        )
    )
    for overrides, error, name in cases:
        args: dict[str, object] = {"study": study, "findings": findings, **overrides}
        positional = [args.pop("study"), args.pop("findings")]
        if "options" in args:
            positional.append(args.pop("options"))
        with pytest.raises(error, match=rf"^{name}:"):
            build_outputs(*positional, **args)  # type: ignore[arg-type]


def test_template_validation(mr: Case) -> None:
    from sr_templates import algorithm_identification

    alg = algorithm_identification(mr.findings.model)
    herniation = mr.findings.levels[1]
    from sr_templates.evidence import SourceIndex

    index = SourceIndex(mr.study, mr.findings)
    point = index.resolve(herniation.evidence[0])
    fracture = mr.findings.levels[0]
    image_only = index.resolve(fracture.evidence[0])
    with pytest.raises(TypeError, match=r"^finding:"):
        SpinePlanarROIGroup("L4-L5", point, "1.2.3", "L4-L5 x", alg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^evidence:"):
        SpinePlanarROIGroup(herniation, image_only, "1.2.3", "L4-L5 x", alg)
    with pytest.raises(ValueError, match=r"^finding:"):
        SpinePlanarROIGroup(herniation.model_copy(update={"severity": Severity.NONE}), point, "1.2.3", "x", alg)
    with pytest.raises(TypeError, match=r"^tracking_uid:"):
        SpinePlanarROIGroup(herniation, point, None, "L4-L5 x", alg)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^algorithm:"):
        SpinePlanarROIGroup(herniation, point, "1.2.3", "L4-L5 x", "SpineGPT")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^evidence:"):
        SpineLevelEvaluation(herniation, [point])  # localised: a region, not an evaluation
    with pytest.raises(TypeError, match=r"^evidence:"):
        SpineLevelEvaluation(fracture, image_only)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^finding:"):
        SpineLevelEvaluation("L1", [image_only])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^model:"):
        algorithm_identification("SpineGPT")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^report:"):
        SpineNarrativeReport("text", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^observation_context:"):
        SpineNarrativeReport(mr.findings.answer.report, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^region:"):
        procedure_code("MR", "sacral")
    g1 = SpinePlanarROIGroup(herniation, point, "1.2.3", "L4-L5 disc herniation", alg)
    g0 = SpinePlanarROIGroup(mr.findings.levels[2], index.resolve(mr.findings.levels[2].evidence[0]), "1.2.4",
                             "L5 spondylolisthesis", alg)
    e0 = SpineLevelEvaluation(fracture, [image_only])
    from sr_templates.builder import _observation_context

    ctx = _observation_context(mr.findings, OutputOptions())
    with pytest.raises(ValueError, match=r"^groups:"):
        sr_templates.SpineMeasurementReport(ctx, procedure_code("MR", "lumbar"), [g0, g1])
    with pytest.raises(ValueError, match=r"^groups:"):
        sr_templates.SpineMeasurementReport(ctx, procedure_code("MR", "lumbar"), [g1, g1])
    with pytest.raises(ValueError, match=r"^groups:"):
        sr_templates.SpineMeasurementReport(ctx, procedure_code("MR", "lumbar"), [])
    with pytest.raises(TypeError, match=r"^evaluations:"):
        sr_templates.SpineMeasurementReport(ctx, procedure_code("MR", "lumbar"), [g1], [g0])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"^procedure_reported:"):
        sr_templates.SpineMeasurementReport(ctx, "MR", [g1, g0])  # type: ignore[arg-type]
    # no region at all: TID 1500 rows 1-6 and 12 only (no empty Imaging Measurements container)
    only = sr_templates.SpineMeasurementReport(ctx, procedure_code("MR", "lumbar"), [], [e0])
    names = [i.ConceptNameCodeSequence[0].CodeValue for i in only[0].ContentSequence]
    assert "126010" not in names and "C0034375" in names


def test_a_refusal_while_building_is_a_report_build_error(mr: Case) -> None:
    """Valid arguments, content that cannot be built (evidence naming an instance the study does not hold):
    ReportBuildError, a ValueError the worker turns into a failed job with the reason."""
    from sr_templates import ReportBuildError

    image = mr.findings.images[0].model_copy(update={"sop_instance_uids": ("1.2.826.0.1.99999.1",)})
    findings = mr.findings.model_copy(update={"images": (image, *mr.findings.images[1:])})
    with pytest.raises(ReportBuildError) as err:
        build_outputs(mr.study, findings, created_at=CREATED_AT)
    assert isinstance(err.value, ValueError) and not getattr(err.value, "transient", True)


# ----------------------------------------------------------------------------------- what users get
def _dciodvfy_problems(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    known = KNOWN_SC_WARNINGS | KNOWN_SR_WARNINGS
    return [f"{path.name}: {ln}" for ln in lines
            if "Error" in ln or (ln.startswith("Warning") and ln not in known)]


@needs_dicom3tools
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mr", "xr"])
def test_dciodvfy_clean_on_what_the_demo_and_analyze_write(kind: str, tmp_path: Path, demo_model_dir: Path) -> None:
    """The objects ``spinemed-node demo`` (scripts/demo) receives back and ``spinemed-node analyze`` writes,
    with the real demo backend's identity ("demo — not for clinical use"): no dciodvfy error."""
    import sys

    from conftest import REPO

    from dicom_node.devtools.phantoms import make_lumbar_mr, make_scoliosis_radiograph

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    demo = subprocess.run([sys.executable, "-m", "dicom_node", "demo", "--workdir", str(tmp_path / "demo"), "--kind",
                           kind, "--model-dir", str(demo_model_dir)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    received = sorted((tmp_path / "demo" / "results").rglob("*.dcm"))
    assert len(received) >= 2

    src = (make_lumbar_mr(tmp_path / "src", slices=5, size=96, seed=61) if kind == "mr"
           else make_scoliosis_radiograph(tmp_path / "src", seed=61))
    config = tmp_path / "analyze.toml"
    config.write_text(f'[model]\nbackend = "demo"\npath = "{demo_model_dir}"\n[node]\ndata_dir = "{tmp_path / "d"}"\n'
                      '[output]\npdf = true\n')
    out = tmp_path / "analyze"
    res = subprocess.run([sys.executable, "-m", "dicom_node", "analyze", "--config", str(config), "--out", str(out),
                          *map(str, src.paths)], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    written = sorted(out.glob("*.dcm"))
    assert len(written) >= 2
    modalities = {str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in [*received, *written]}
    assert {"SR", "DOC"} <= modalities, modalities  # the demo and this config ask for the PDF too
    problems = [p for path in [*received, *written] for p in _dciodvfy_problems(path)]
    assert not problems, problems
