"""Round trip: build → bytes → read back → compare with the input SpineFindings."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from test_sr_support import CREATED_AT, Case, ct_reformat_case, lumbar_mr_case, scoliosis_case

from inference.findings import FindingType, Severity
from sr_templates import OutputOptions, build_outputs, read_measurement_report
from sr_templates.codes import (
    FINDING_CODES,
    LATERALITY_CODES,
    MEASUREMENT_CODES,
    SCHEME_DESIGNATOR,
    SEVERITY_CODES,
    level_code,
)
from sr_templates.evidence import map_to_patient, map_to_source
from sr_templates.reader import ReadBack


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    tmp = tmp_path_factory.mktemp("sr_roundtrip")
    return {"mr": lumbar_mr_case(tmp), "xr": scoliosis_case(tmp), "ct": ct_reformat_case(tmp)}


@pytest.fixture(scope="module")
def built(cases: dict[str, Case]) -> dict[str, list[pydicom.Dataset]]:
    return {
        k: [_roundtrip(d) for d in build_outputs(c.study, c.findings, created_at=CREATED_AT)]
        for k, c in cases.items()
    }


def _evidence_uids(ds: pydicom.Dataset) -> set[str]:
    return {
        str(ref.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def _compare(case: Case, rb: ReadBack, sr: pydicom.Dataset | None = None) -> None:
    """Every level, finding, severity, grade, laterality, measurement, reference and coordinate.

    A finding localised at a point is a TID 1410 region per point; the images it also cited
    without a point stay in the SR's evidence (not in the region group, which has no row for them).
    """
    levels = case.findings.levels
    order = [f.level for f in levels]
    assert [f.level for f in rb.findings] == sorted(order, key=order.index)
    assert [g.level for g in rb.groups] == sorted((g.level for g in rb.groups), key=order.index)
    assert len(rb.findings) == len(levels)

    def key(f: object) -> tuple[int, str, str]:
        return (order.index(f.level), f.finding.value, str(f.laterality))  # type: ignore[attr-defined]

    for want, got in zip(sorted(levels, key=key), sorted(rb.findings, key=key), strict=True):
        assert got.level == want.level
        assert got.finding == want.finding
        assert got.severity == want.severity
        assert got.grade == want.grade
        assert got.laterality == want.laterality
        assert len(got.measurements) == len(want.measurements)
        for wm, gm in zip(want.measurements, got.measurements, strict=True):
            assert gm.type == wm.type and gm.value == pytest.approx(wm.value)
            assert (gm.upper_end_vertebra, gm.lower_end_vertebra) == (
                wm.upper_end_vertebra,
                wm.lower_end_vertebra,
            )
        # evidence: one reference per source instance; a point becomes one SCOORD/SCOORD3D
        expected = []
        for e in want.evidence:
            image = case.findings.images[e.image]
            if e.x is not None and e.y is not None and image.pixel_to_source is not None:
                expected.append(("2d", image.sop_instance_uids[0], map_to_source(image, e.x, e.y)))
            elif e.x is not None and e.y is not None and image.pixel_to_patient is not None:
                expected.append(("3d", "", map_to_patient(image, e.x, e.y)))
            else:
                expected.extend(("ref", uid, None) for uid in image.sop_instance_uids)
        localised = not want.absent and any(kind != "ref" for kind, _, _ in expected)
        if localised:
            if sr is not None:
                assert {uid for kind, uid, _ in expected if kind == "ref"} <= _evidence_uids(sr)
            expected = [e for e in expected if e[0] != "ref"]
        assert len(got.evidence) == len(expected)
        for (kind, uid, point), ge in zip(expected, got.evidence, strict=True):
            if kind == "2d":
                assert ge.sop_instance_uid == uid and ge.point == pytest.approx(point, abs=1e-3)
            elif kind == "3d":
                assert ge.point_3d == pytest.approx(point, abs=1e-3)
                assert ge.frame_of_reference_uid
            else:
                assert ge.sop_instance_uid == uid and ge.point is None and ge.point_3d is None
        assert got.localisation == (
            "LOC-POINT" if localised else "LOC-NONE" if want.evidence else "LOC-NOIMAGE"
        )


@pytest.mark.parametrize("kind", ["mr", "xr", "ct"])
def test_roundtrip_matches_findings(
    cases: dict[str, Case], built: dict[str, list[pydicom.Dataset]], kind: str
) -> None:
    sr = hd.sr.srread(io.BytesIO(_bytes(built[kind][0])))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    _compare(cases[kind], read_measurement_report(built[kind][0]), built[kind][0])


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_group_structure_mr(cases: dict[str, Case], built: dict[str, list[pydicom.Dataset]]) -> None:
    rb = read_measurement_report(built["mr"][0])
    model = cases["mr"].findings.model
    by_level = {g.level: g for g in rb.groups}
    g = by_level["L4-L5"]
    # localised at a point: a TID 1410 planar ROI of its own, named by level and finding
    assert (g.template, g.tracking_identifier) == ("1410", "L4-L5 disc herniation")
    assert len(g.source_images) == 1 and g.findings[0].localisation == "LOC-POINT"
    assert g.finding_site == level_code("L4-L5") and g.finding_site.value == "84020006"
    assert g.laterality == LATERALITY_CODES[cases["mr"].findings.levels[1].laterality]  # type: ignore[index]
    assert g.summary == "L4-L5: disc herniation, moderate, left, 9.5 mm"
    assert (g.algorithm_name, g.algorithm_version) == (model.name, model.version)
    assert g.algorithm_parameters == (
        f"prompt_version={model.prompt_version}",
        f"weights_sha256={model.weights_digest}",
        f"backend={model.backend}",
    )
    assert len({grp.tracking_uid for grp in rb.groups}) == len(rb.groups)
    procedure = rb.procedure_reported[0]
    assert (procedure.value, procedure.scheme_designator, procedure.meaning) == ("24968-0", "LN", "MR Lumbar spine")
    assert rb.device_observer_name == model.name and rb.device_observer_uid
    assert by_level["L5"].summary == "L5: spondylolisthesis, grade I, mild, 18%"
    assert all(g.template == "1410" for g in rb.groups)
    # the unlocalised L1 finding: referenced image, no coordinate, explicit status
    assert "L1" not in by_level  # not localised: a qualitative evaluation of the report, not a region
    l1 = rb.findings[0]
    assert l1.level == "L1" and l1.summary == "L1: vertebral fracture, mild, 20%"
    assert l1.localisation == "LOC-NONE" and all(e.point is None for e in l1.evidence)


def test_codes_standard_and_private(built: dict[str, list[pydicom.Dataset]]) -> None:
    xr = read_measurement_report(built["xr"][0])
    t13 = next(f for f in xr.findings if f.level == "T13")
    assert level_code("T13").scheme_designator == SCHEME_DESIGNATOR  # transitional: private code
    assert "transitional" in t13.summary
    assert t13.finding.value == "no_abnormality"
    assert FINDING_CODES[t13.finding].scheme_designator == "DCM"
    assert SEVERITY_CODES[Severity.MODERATE].scheme_designator == "SCT"
    assert MEASUREMENT_CODES[xr.findings[0].measurements[0].type].value == "285285000"  # Cobb angle
    for ds in built["xr"][:2]:
        schemes = [str(i.CodingSchemeDesignator) for i in ds.CodingSchemeIdentificationSequence]
        assert schemes == [SCHEME_DESIGNATOR]


def test_cobb_units_and_end_vertebrae(built: dict[str, list[pydicom.Dataset]]) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(built["xr"][0])
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    groups = [*report.get_image_measurement_groups(), *report.get_planar_roi_measurement_groups()]
    (group,) = [g for g in groups if str(g.tracking_identifier).split(" ")[0] == "T9"]
    (cobb,) = group.get_measurements()
    assert cobb.value == pytest.approx(25.0)
    assert (cobb.unit.value, cobb.unit.scheme_designator) == ("deg", "UCUM")
    sites = [(s.value.meaning, s.topographical_modifier.meaning) for s in cobb.finding_sites]  # type: ignore[union-attr]
    assert sites == [("T6 vertebra", "Superior"), ("T12 vertebra", "Inferior")]


def test_document_header(cases: dict[str, Case], built: dict[str, list[pydicom.Dataset]]) -> None:
    study = cases["mr"].study
    sr, narrative, key, key_object = built["mr"]
    assert sr.SeriesInstanceUID == narrative.SeriesInstanceUID != key.SeriesInstanceUID
    assert len({sr.SeriesInstanceUID, key.SeriesInstanceUID, key_object.SeriesInstanceUID}) == 3
    assert sr.Modality == narrative.Modality == "SR" and key.Modality != "SR"
    for ds in (sr, narrative, key):
        assert ds.StudyInstanceUID == study.study_instance_uid
        assert ds.PatientID == study.patient_id and str(ds.PatientName) == study.patient_name
        assert ds.AccessionNumber == study.accession_number
        if ds is key:  # one modality per series: the key image (OT) in a series of its own
            assert ds.SeriesNumber == 9902 and ds.SeriesDescription == "SpineMed AI key images"
        else:
            assert ds.SeriesNumber == 9901 and ds.SeriesDescription == "SpineMed AI results"
        assert ds.Manufacturer == "SpineMed" and ds.ManufacturerModelName == "spinemed-node"
        ours = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "SpineMed"]
        assert len(ours) == 1
        purpose = ours[0].PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
        assert "SpineGPT" in ours[0].ContributionDescription
    assert len({sr.SeriesInstanceUID, narrative.SeriesInstanceUID, key.SeriesInstanceUID}) == 2
    assert [sr.InstanceNumber, narrative.InstanceNumber, key.InstanceNumber] == [1, 2, 1]
    for ds in (sr, narrative):
        assert ds.VerificationFlag == "UNVERIFIED" and ds.CompletionFlag == "COMPLETE"
        evidence = {
            i.ReferencedSOPInstanceUID
            for s in ds.CurrentRequestedProcedureEvidenceSequence
            for r in s.ReferencedSeriesSequence
            for i in r.ReferencedSOPSequence
        }
        assert set(cases["mr"].findings.images[0].sop_instance_uids) <= evidence
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert narrative.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"


def test_narrative_sections(cases: dict[str, Case], built: dict[str, list[pydicom.Dataset]]) -> None:
    narrative = built["mr"][1]
    report = cases["mr"].findings.answer.report
    root = narrative.ContentSequence
    sections = [i for i in root if i.ValueType == "CONTAINER"]
    headings = [
        (s.ConceptNameCodeSequence[0].CodeValue, s.ConceptNameCodeSequence[0].CodingSchemeDesignator)
        for s in sections
    ]
    assert headings == [  # LOINC headings of CID 7001 where one exists
        ("59776-5", "LN"),
        ("19005-8", "LN"),
        ("18783-1", "LN"),
        ("SEC-RISK", SCHEME_DESIGNATOR),
        ("SEC-FOLLOW-UP", SCHEME_DESIGNATOR),
        ("SEC-DX-BASIS", SCHEME_DESIGNATOR),
        ("55113-5", "LN"),
    ]
    texts = [[i.TextValue for i in s.ContentSequence if i.ValueType == "TEXT"] for s in sections[:6]]
    assert texts[0][0] == report.findings
    assert texts[0][1:] == [
        "L1: vertebral fracture, mild, 20%",
        "L4-L5: disc herniation, moderate, left, 9.5 mm",
        "L5: spondylolisthesis, grade I, mild, 18%",
    ]
    assert [t[0] for t in texts[1:]] == [
        report.diagnosis,
        report.treatment_suggestions,
        report.risk_and_prognosis,
        report.follow_up,
        report.diagnostic_basis,
    ]
    key_ref = sections[6].ContentSequence[0].ReferencedSOPSequence[0]
    assert key_ref.ReferencedSOPInstanceUID == built["mr"][2].SOPInstanceUID


def test_key_image(cases: dict[str, Case], built: dict[str, list[pydicom.Dataset]]) -> None:
    key = built["mr"][2]
    image0 = cases["mr"].findings.images[0]
    assert key.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert key.BurnedInAnnotation == "YES"
    src = key.SourceImageSequence[0]
    assert src.ReferencedSOPInstanceUID == image0.sop_instance_uids[0]
    pixels = key.pixel_array
    assert pixels.shape == (512, 512, 3) and pixels.dtype == np.uint8
    banner = pixels[:20, :200].astype(int)
    assert ((banner[..., 0] > 200) & (banner[..., 1] < 120)).sum() > 50  # red "NOT FOR DIAGNOSTIC USE"
    src_spacing = pydicom.dcmread(cases["mr"].study.instances[0].path, stop_before_pixels=True).PixelSpacing
    assert float(key.PixelSpacing[0]) == pytest.approx(float(src_spacing[0]) / 4)
    # a label marker around the L4-L5 evidence point (source px x4)
    rb = read_measurement_report(built["mr"][0])
    (col, row) = rb.findings[1].evidence[0].point  # type: ignore[misc]
    patch = pixels[int(row * 4) - 12 : int(row * 4) + 12, int(col * 4) - 12 : int(col * 4) + 12].astype(int)
    assert ((patch[..., 0] > 200) & (patch[..., 1] > 180) & (patch[..., 2] < 80)).sum() > 10  # yellow


def test_reformat_has_no_key_image_and_3d_point(
    cases: dict[str, Case], built: dict[str, list[pydicom.Dataset]]
) -> None:
    assert len(built["ct"]) == 2  # no single-source input image: nothing to label
    rb = read_measurement_report(built["ct"][0])
    ev = rb.findings[0].evidence[0]
    src = pydicom.dcmread(cases["ct"].study.instances[0].path, stop_before_pixels=True)
    assert ev.frame_of_reference_uid == src.FrameOfReferenceUID


def test_unmappable_point_is_not_invented(tmp_path: Path) -> None:
    case = lumbar_mr_case(tmp_path)
    image = case.findings.images[0].model_copy(update={"pixel_to_source": (1.0, 0.0, 500.0, 0.0, 1.0, 0.0)})
    findings = case.findings.model_copy(update={"images": [image, case.findings.images[1]]})
    sr = build_outputs(case.study, findings, OutputOptions(key_image=False), created_at=CREATED_AT)[0]
    rb = read_measurement_report(_roundtrip(sr))
    herniation = rb.findings[1]
    assert herniation.localisation == "LOC-NONE"
    assert all(e.point is None for e in herniation.evidence)
    assert any("outside the source image" in n for n in herniation.notes)


def _referenced_uids(ds: pydicom.Dataset) -> set[str]:
    out: set[str] = set()
    for item in ds.get("ContentSequence", []):
        for ref in item.get("ReferencedSOPSequence", []):
            out.add(str(ref.ReferencedSOPInstanceUID))
        out |= _referenced_uids(item)
    return out


def test_reformat_point_references_the_slice_it_lies_on(
    cases: dict[str, Case], built: dict[str, list[pydicom.Dataset]]
) -> None:
    """A point on a CT reformat references the one axial slice through it, not every slice."""
    case = cases["ct"]
    e = case.findings.levels[0].evidence[0]
    point = map_to_patient(case.findings.images[0], e.x, e.y)  # type: ignore[arg-type]
    nearest = min(case.study.instances, key=lambda i: abs(i.image_position[2] - point[2]))  # type: ignore[index]
    assert _evidence_uids(built["ct"][0]) == {nearest.sop_instance_uid}
    # the region itself is a SCOORD3D in the frame of reference: no image item in the tree
    assert _referenced_uids(built["ct"][0]) <= {nearest.sop_instance_uid}


def test_unicode_text_survives_the_round_trip(tmp_path: Path) -> None:
    """Model text is free Unicode (the demo notice has an em dash): the SRs declare UTF-8 and keep it."""
    case = lumbar_mr_case(tmp_path)
    model = case.findings.model.model_copy(update={"name": "spinemed-demo (demo — not for clinical use)"})
    report = case.findings.answer.report.model_copy(update={"diagnosis": "Bandscheibenvorfall L4/5 ≥ 5 mm — 椎间盘"})
    answer = case.findings.answer.model_copy(update={"report": report})
    findings = case.findings.model_copy(update={"model": model, "answer": answer})
    measurement, narrative = build_outputs(case.study, findings, OutputOptions(key_image=False),
                                           created_at=CREATED_AT)
    for ds, needle in ((measurement, "demo — not for clinical use"), (narrative, "≥ 5 mm — 椎间盘")):
        back = _roundtrip(ds)
        assert back.SpecificCharacterSet == "ISO_IR 192"
        texts = " | ".join(str(e.value) for e in back.iterall() if e.VR in ("UT", "LO", "ST", "LT", "SH"))
        assert needle in texts


def _all_codes(ds: pydicom.Dataset) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for item in ds.get("ContentSequence", []):
        for attr in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(attr, []):
                out.append((str(code.CodingSchemeDesignator), str(code.CodeValue), str(code.CodeMeaning)))
        out.extend(_all_codes(item))
    return out


def test_an_absent_condition_is_coded_absent_not_severity_none(tmp_path: Path) -> None:
    """"Vertebral fracture, severity none" is an assessed, absent fracture: (fracture) = Absent in the
    level's TID 1501 group, "no vertebral fracture" in every text, no region and no key-image marker
    even where the model gave a point; "no abnormality" carries no severity at all."""
    case = lumbar_mr_case(tmp_path)
    levels = list(case.findings.answer.levels)
    point = levels[1].evidence[0]
    levels[0] = levels[0].model_copy(update={"severity": Severity.NONE, "evidence": [point]})
    normal = {"level": "L2", "finding": FindingType.NO_ABNORMALITY, "measurements": []}
    levels.append(levels[0].model_copy(update=normal))
    answer = case.findings.answer.model_copy(update={"levels": levels})
    findings = case.findings.model_copy(update={"answer": answer})
    sr, narrative, key, _ = (_roundtrip(d) for d in build_outputs(case.study, findings, created_at=CREATED_AT))

    codes_used = _all_codes(sr)
    assert not any(meaning.lower() == "none" for _, _, meaning in codes_used), "no severity 'none' anywhere"
    assert ("SCT", "272519000", "Absent") in codes_used
    rb = read_measurement_report(sr)
    assert not any(g.level == "L1" for g in rb.groups), "an absent condition has no region"
    (absent,) = [f for f in rb.findings if f.level == "L1"]
    assert absent.summary == "L1: no vertebral fracture, 20%"
    assert (absent.finding.value, absent.severity) == ("vertebral_fracture", Severity.NONE)
    assert all(e.point is None for e in absent.evidence), "an absent condition has no region"
    (l2,) = [f for f in rb.findings if f.level == "L2"]
    assert l2.finding.value == "no_abnormality" and l2.severity is Severity.NONE
    texts = _texts(narrative)
    assert any("L1: no vertebral fracture" in t for t in texts)
    assert not any("L1: vertebral fracture" in t for t in texts)
    assert key.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


def _texts(ds: pydicom.Dataset) -> list[str]:
    out: list[str] = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out.extend(_texts(item))
    return out


def test_key_object_selection_references_the_key_image_and_its_source(
    cases: dict[str, Case], built: dict[str, list[pydicom.Dataset]]
) -> None:
    """IHE Key Image Note: a KO titled "Of Interest" in a series of its own, naming the algorithm, that
    references the key image and the source image it was rendered from; highdicom reads it back."""
    _, _, key, ko = built["mr"]
    assert ko.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59" and ko.Modality == "KO"
    assert ko.SeriesNumber == 9903 and ko.SeriesDescription == "SpineMed AI key image note"
    assert ko.StudyInstanceUID == key.StudyInstanceUID and ko.PatientID == key.PatientID
    hd.ko.KeyObjectSelectionDocument.from_dataset(ko)  # highdicom reads it back
    title = ko.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")
    source = str(key.SourceImageSequence[0].ReferencedSOPInstanceUID)
    refs = _referenced_uids(ko)
    assert refs == {str(key.SOPInstanceUID), source}
    assert _evidence_uids(ko) == refs
    text = " ".join(_texts(ko))
    assert "SpineMed AI key image" in text and "L4-L5: disc herniation, moderate, left" in text
    observers = [i for i in ko.ContentSequence if i.ValueType == "TEXT" and "Device Observer" in
                 i.ConceptNameCodeSequence[0].CodeMeaning]
    assert observers and str(observers[0].TextValue) == cases["mr"].findings.model.name
