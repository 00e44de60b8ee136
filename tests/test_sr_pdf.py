"""The optional Encapsulated PDF: what the narrative SR says, with the key image, readable by any PDF tool.

Text is read back with poppler's ``pdftotext`` (an independent reader), compared with the narrative SR's
own text items; the DICOM object passes ``dciodvfy``; rebuilds are byte-identical.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from test_sr_support import CREATED_AT, Case, lumbar_mr_case

from sr_templates import OutputOptions, build_outputs
from sr_templates.pdf import SpineEncapsulatedPDF, narrative_sections, render_report_pdf

PDF_OPTIONS = OutputOptions(pdf=True)


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _pdftotext(pdf: bytes, tmp_path: Path) -> str:
    exe = shutil.which("pdftotext")
    if exe is None:
        pytest.fail("pdftotext is missing: apt-get install poppler-utils (scripts/setup installs it)")
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    res = subprocess.run([exe, "-layout", "-enc", "UTF-8", str(path), "-"], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.decode("utf-8")


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return lumbar_mr_case(tmp_path_factory.mktemp("pdf"))


@pytest.fixture(scope="module")
def outputs(case: Case) -> list[pydicom.Dataset]:
    return [_roundtrip(d) for d in build_outputs(case.study, case.findings, PDF_OPTIONS, created_at=CREATED_AT)]


def test_pdf_is_its_own_series_and_a_pdf(outputs: list[pydicom.Dataset], case: Case) -> None:
    assert [d.Modality for d in outputs] == ["SR", "SR", "OT", "KO", "DOC"]
    doc = outputs[-1]
    assert doc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert doc.SeriesNumber == 9904 and doc.SeriesDescription == "SpineMed AI report (PDF)"
    assert len({d.SeriesInstanceUID for d in outputs}) == 4
    assert doc.StudyInstanceUID == case.study.study_instance_uid and doc.PatientID == case.study.patient_id
    assert doc.MIMETypeOfEncapsulatedDocument == "application/pdf"
    data = bytes(doc.EncapsulatedDocument)
    assert data.startswith(b"%PDF-") and len(data) % 2 == 0
    assert doc.EncapsulatedDocumentLength in (len(data), len(data) - 1)
    assert data[: doc.EncapsulatedDocumentLength].rstrip().endswith(b"%%EOF")
    sources = {str(i.ReferencedSOPInstanceUID) for i in doc.SourceInstanceSequence}
    assert sources == {str(outputs[0].SOPInstanceUID), str(outputs[1].SOPInstanceUID)}
    assert (doc.ConceptNameCodeSequence[0].CodeValue, doc.ConceptNameCodeSequence[0].CodingSchemeDesignator) == (
        "18748-4", "LN")


def test_pdf_text_is_the_narrative_srs_text(outputs: list[pydicom.Dataset], case: Case, tmp_path: Path) -> None:
    narrative, doc = outputs[1], outputs[-1]
    text = _flat(_pdftotext(bytes(doc.EncapsulatedDocument)[: doc.EncapsulatedDocumentLength], tmp_path))
    sections = narrative_sections(narrative)
    assert [h for h, _ in sections][:3] == ["Findings", "Impressions", "Recommendations"] and len(sections) == 6
    for heading, paragraphs in sections:
        assert heading in text
        for paragraph in paragraphs:
            assert _flat(paragraph) in text, paragraph
    assert "L4-L5: disc herniation, moderate, left, 9.5 mm" in text
    assert str(case.study.patient_id) in text and "UNVERIFIED" in text
    family, given = str(case.study.patient_name).split("^")[:2]
    assert f"Patient: {family}, {given}" in text
    assert "DEMO" not in text


def test_pdf_demo_banner_unicode_and_determinism(case: Case, tmp_path: Path) -> None:
    report = case.findings.answer.report.model_copy(
        update={"diagnosis": "Bandscheibenvorfall L4/5 ≥ 5 mm – Übergang, Ω"})
    findings = case.findings.model_copy(update={
        "model": case.findings.model.model_copy(update={"demo": True}),
        "answer": case.findings.answer.model_copy(update={"report": report})})
    first = build_outputs(case.study, findings, PDF_OPTIONS, created_at=CREATED_AT)[-1]
    again = build_outputs(case.study, findings, PDF_OPTIONS, created_at=CREATED_AT)[-1]
    assert bytes(first.EncapsulatedDocument) == bytes(again.EncapsulatedDocument)
    text = _flat(_pdftotext(bytes(first.EncapsulatedDocument)[: first.EncapsulatedDocumentLength], tmp_path))
    assert "DEMO MODEL OUTPUT - NOT FOR CLINICAL USE" in text
    assert "Bandscheibenvorfall L4/5 ≥ 5 mm – Übergang, Ω" in text
    assert "DEMO" in first.SeriesDescription and "DEMO" in first.DocumentTitle


def test_pdf_is_off_unless_asked(case: Case) -> None:
    assert "DOC" not in {d.Modality for d in build_outputs(case.study, case.findings, created_at=CREATED_AT)}


def test_pdf_argument_errors(outputs: list[pydicom.Dataset], case: Case) -> None:
    import datetime

    with pytest.raises(TypeError, match=r"^sections:"):
        render_report_pdf(title="t", identification=[], sections=[("h", "not a list")], key_image=None, demo=False,
                          footer="f", created_at=datetime.datetime(2025, 1, 1))
    with pytest.raises(TypeError, match=r"^created_at:"):
        render_report_pdf(title="t", identification=[], sections=[], key_image=None, demo=False, footer="f",
                          created_at="today")  # type: ignore[arg-type]
    src = pydicom.dcmread(case.study.instances[0].path, stop_before_pixels=True)
    args = dict(evidence=[src], pdf=b"%PDF-1.7\n%%EOF\n", referenced_srs=outputs[:2], series_instance_uid="1.2.3",
                series_number=1, sop_instance_uid="1.2.4", instance_number=1, manufacturer="m",
                manufacturer_model_name="n", software_versions="1", document_title="t",
                content_datetime=datetime.datetime(2025, 1, 1), series_description="d")
    with pytest.raises(ValueError, match=r"^pdf:"):
        SpineEncapsulatedPDF(**{**args, "pdf": b"<html>"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^evidence:"):
        SpineEncapsulatedPDF(**{**args, "evidence": []})  # type: ignore[arg-type]
    other = pydicom.Dataset()
    other.StudyInstanceUID, other.SOPClassUID, other.SOPInstanceUID = "1.2.9", "1.2.840.10008.5.1.4.1.1.88.22", "1.9"
    with pytest.raises(ValueError, match=r"^referenced_srs:"):
        SpineEncapsulatedPDF(**{**args, "referenced_srs": [other]})  # type: ignore[arg-type]


def test_pdf_passes_dciodvfy(outputs: list[pydicom.Dataset], tmp_path: Path) -> None:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy is missing: apt-get install dicom3tools (scripts/setup installs it)")
    path = tmp_path / "pdf.dcm"
    outputs[-1].save_as(path, enforce_file_format=True)
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = [ln.strip() for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert lines == ["EncapsulatedPDF"], lines  # no error, no warning
