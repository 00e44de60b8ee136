"""FHIR R4 export (``dicom_node.delivery.fhir``) against a small FHIR server on loopback.

The server (starlette + uvicorn in a thread) parses every POSTed Bundle and each of its resources with the
``fhir.resources`` R4B models, stores them, honours ``ifNoneExist`` (conditional create) and answers a
transaction-response Bundle; it can be switched to refuse (400/401 with an OperationOutcome that echoes
what it was sent, as real servers do), to be unavailable (503, 429) or to answer 200 with something else.
Expectations come from the SR (read back with ``read_measurement_report`` and walked directly) and the code
tables of ``sr_templates.codes``, never from the module's own output.
"""

from __future__ import annotations

import base64
import datetime
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import uvicorn
from conftest import free_port
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from pydicom.sr.coding import Code
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from test_sr_support import CREATED_AT, lumbar_mr_case, scoliosis_case

from dicom_node.config import DestinationConfig
from dicom_node.delivery.fhir import build_report_bundle, fhir_system, send_files_fhir
from dicom_node.work.pipeline import output_kind
from inference.findings import Evidence, FindingType, Laterality, LevelFinding, Severity
from sr_templates import build_outputs, read_measurement_report
from sr_templates.codes import (
    FINDING_CODES,
    LATERALITY_CODES,
    MEYERDING_GRADE_CODES,
    SEVERITY_CODES,
    SpineCodes,
    level_code,
)
from sr_templates.pdf import narrative_sections

#: the mapping the module must apply (docs/fhir-hl7.md), written out here independently of it
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "99SPINEMED": "urn:spinemed:99SPINEMED",
}
FHIR_JSON = "application/fhir+json"


# ------------------------------------------------------------------------------------------ the server
@dataclass
class FhirServer:
    """A FHIR transaction endpoint at ``url``; ``mode`` switches its answer."""

    url: str = ""
    mode: str = "ok"
    stored: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    headers: list[dict[str, str]] = field(default_factory=list)
    statuses: list[list[str]] = field(default_factory=list)

    def reset(self) -> None:
        self.mode = "ok"
        self.stored.clear()
        self.headers.clear()
        self.statuses.clear()

    def of_type(self, rtype: str) -> list[dict[str, Any]]:
        return [r for (t, _), r in self.stored.items() if t == rtype]

    async def metadata(self, request: Request) -> Response:
        self.headers.append(dict(request.headers))
        if self.mode == "503":
            return _outcome(503, "maintenance")
        statement = {"resourceType": "CapabilityStatement", "status": "active", "date": "2026-12-04",
                     "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"]}
        get_fhir_model_class("CapabilityStatement").model_validate(statement)
        return JSONResponse(statement, media_type=FHIR_JSON)

    async def transaction(self, request: Request) -> Response:
        self.headers.append(dict(request.headers))
        if request.headers.get("content-type") != FHIR_JSON:
            return _outcome(415, "expected application/fhir+json")
        raw = await request.body()
        try:
            bundle = Bundle.model_validate_json(raw)
            body = bundle.model_dump(mode="json")
            for entry in body["entry"]:
                get_fhir_model_class(entry["resource"]["resourceType"]).model_validate(entry["resource"])
        except ValueError as exc:
            return _outcome(400, f"invalid Bundle: {exc}")
        if body["type"] != "transaction":
            return _outcome(400, "not a transaction")
        first = body["entry"][0]["resource"]
        subject = first.get("subject", {}).get("identifier", {}).get("value", "")
        if self.mode == "400":  # echoes what it was sent, as servers do (HAPI names the unresolved reference)
            return _outcome(400, f"Patient with identifier {subject} ({first.get('conclusion', '')}) not found "
                                 f"for {first['identifier'][0]['value']}; " + "detail " * 100)
        if self.mode == "401":
            return _outcome(401, f"token rejected: {request.headers.get('authorization')}")
        if self.mode in ("503", "429"):
            return _outcome(int(self.mode), "try later")
        if self.mode == "not-a-transaction-response":
            return JSONResponse({"resourceType": "Bundle", "type": "searchset"}, media_type=FHIR_JSON)
        answers: list[dict[str, Any]] = []
        for entry in body["entry"]:
            resource, req = entry["resource"], entry["request"]
            assert req["method"] == "POST" and req["url"] == resource["resourceType"]
            criterion = req["ifNoneExist"]
            assert criterion.startswith("identifier=")
            key = (resource["resourceType"], criterion.removeprefix("identifier="))
            ident = resource["identifier"][0]
            assert criterion == f"identifier={ident['system']}|{ident['value']}"
            if key in self.stored:
                status = "200 OK"
            else:
                resource["id"] = f"r{len(self.stored) + 1}"
                self.stored[key] = resource
                status = "201 Created"
            location = f"{key[0]}/{self.stored[key]['id']}/_history/1"
            answers.append({"response": {"status": status, "location": location}})
        self.statuses.append([a["response"]["status"] for a in answers])
        answer = {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        Bundle.model_validate(answer)
        return JSONResponse(answer, media_type=FHIR_JSON)


def _outcome(code: int, diagnostics: str) -> Response:
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "processing", "diagnostics": diagnostics}]}
    return JSONResponse(body, status_code=code, media_type=FHIR_JSON)


@pytest.fixture(scope="module")
def server() -> Iterator[FhirServer]:
    fhir = FhirServer()
    app = Starlette(routes=[Route("/fhir", fhir.transaction, methods=["POST"]),
                            Route("/fhir/metadata", fhir.metadata, methods=["GET"])])
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, name="fhir-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test FHIR server did not start"
        time.sleep(0.05)
    fhir.url = f"http://127.0.0.1:{port}/fhir"
    yield fhir
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def fhir(server: FhirServer) -> FhirServer:
    server.reset()
    return server


# ------------------------------------------------------------------------------------------ the SRs
@dataclass(frozen=True)
class Report:
    measurement: Path
    narrative: Path
    others: tuple[Path, ...]

    @property
    def paths(self) -> list[Path]:
        return [self.narrative, self.measurement]  # narrative first: the module tells them apart

    def sr(self) -> pydicom.Dataset:
        return pydicom.dcmread(self.measurement)


def _write(outputs: list[pydicom.Dataset], folder: Path) -> Report:
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {}
    for i, ds in enumerate(outputs):
        path = folder / f"{i}-{output_kind(ds)}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.setdefault(output_kind(ds), []).append(path)
    others = tuple(p for k, ps in files.items() if k not in ("measurement_report", "narrative_report") for p in ps)
    return Report(files["measurement_report"][0], files["narrative_report"][0], others)


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Report]:
    tmp = tmp_path_factory.mktemp("fhir")
    mr, xr = lumbar_mr_case(tmp / "mr-in"), scoliosis_case(tmp / "xr-in")
    demo = lumbar_mr_case(tmp / "demo-in", demo=True)
    absent = LevelFinding(level="L3-L4", finding="spinal_canal_stenosis", severity="none",
                          evidence=[Evidence(image=1)])
    answer = demo.findings.answer.model_copy(update={"levels": [*demo.findings.answer.levels, absent]})
    demo_findings = demo.findings.model_copy(update={"answer": answer})
    return {
        "mr": _write(build_outputs(mr.study, mr.findings, created_at=CREATED_AT), tmp / "mr"),
        "xr": _write(build_outputs(xr.study, xr.findings, created_at=CREATED_AT), tmp / "xr"),
        "demo": _write(build_outputs(demo.study, demo_findings, created_at=CREATED_AT), tmp / "demo"),
    }


def _dest(fhir: FhirServer, **kw: Any) -> DestinationConfig:
    return DestinationConfig(name="ehr", type="fhir", url=kw.pop("url", fhir.url), **kw)


def _coding(code: Code | Any) -> dict[str, str]:
    return {"system": SYSTEMS[str(code.scheme_designator)], "code": str(code.value)}


def _codings(concept: dict[str, Any]) -> list[dict[str, str]]:
    return [{"system": c["system"], "code": c["code"]} for c in concept["coding"]]


def _sr_nums(ds: pydicom.Dataset) -> list[tuple[str, str, float, str, str]]:
    """Every NUM item of the SR: (scheme, code, value, unit scheme, unit code)."""
    out: list[tuple[str, str, float, str, str]] = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "NUM":
            name, mv = item.ConceptNameCodeSequence[0], item.MeasuredValueSequence[0]
            unit = mv.MeasurementUnitsCodeSequence[0]
            out.append((str(name.CodingSchemeDesignator), str(name.CodeValue), float(mv.NumericValue),
                        str(unit.CodingSchemeDesignator), str(unit.CodeValue)))
        out.extend(_sr_nums(item))
    return out


def _quantities(obs: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in obs.get("component", []) if "valueQuantity" in c]


# ------------------------------------------------------------------------------------------ tests
def test_lumbar_mr_report_arrives_as_a_diagnostic_report_with_one_observation_per_finding(
    fhir: FhirServer, reports: dict[str, Report]
) -> None:
    report = reports["mr"]
    results = send_files_fhir(_dest(fhir), report.paths, timeout_s=10)
    assert [r.path for r in results] == report.paths
    assert all(r.delivered and r.status is None and r.error is None for r in results), results
    assert {h["content-type"] for h in fhir.headers} == {FHIR_JSON} and {h["accept"] for h in fhir.headers} == {
        FHIR_JSON}

    sr, narrative = report.sr(), pydicom.dcmread(report.narrative)
    rb = read_measurement_report(sr)
    (dr,) = fhir.of_type("DiagnosticReport")
    observations = fhir.of_type("Observation")
    assert len(observations) == len(rb.findings) == 3

    assert dr["status"] == "preliminary" and str(sr.VerificationFlag) == "UNVERIFIED"
    assert dr["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{sr.SOPInstanceUID}"}]
    assert _codings(dr["category"][0]) == [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                             "code": "RAD"}]
    assert _codings(dr["code"]) == [_coding(rb.procedure_reported[0])]
    assert dr["code"]["coding"][0]["system"] == "http://loinc.org"
    assert dr["subject"] == {"type": "Patient", "identifier": {"value": str(sr.PatientID)}}  # no display, no system
    assert dr["imagingStudy"] == [{"type": "ImagingStudy", "identifier": {
        "system": "urn:dicom:uid", "value": f"urn:oid:{sr.StudyInstanceUID}"}}]
    assert len(dr["result"]) == 3
    issued = datetime.datetime.fromisoformat(dr["issued"])
    assert issued.tzinfo is not None
    assert issued.replace(tzinfo=None) == datetime.datetime.combine(
        pydicom.valuerep.DA(sr.ContentDate), pydicom.valuerep.TM(sr.ContentTime))
    assert dr["effectiveDateTime"].startswith("2024-01-15T12:43:00") and sr.StudyDate == "20240115"
    sections = dict(narrative_sections(narrative))
    assert dr["conclusion"] == "\n".join(sections["Impressions"])
    (form,) = dr["presentedForm"]
    assert form["contentType"] == "text/plain; charset=utf-8" and form["title"]
    text = base64.b64decode(form["data"]).decode("utf-8")
    assert all(p in text for paragraphs in sections.values() for p in paragraphs)

    nums = _sr_nums(sr)
    by_site = {(o["bodySite"]["coding"][0]["code"], o["code"]["coding"][0]["code"]): o for o in observations}
    for f in rb.findings:
        obs = by_site[(level_code(f.level).value, FINDING_CODES[f.finding].value)]
        assert obs["status"] == "preliminary"
        assert _codings(obs["category"][0]) == [
            {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}]
        assert _codings(obs["code"]) == [_coding(FINDING_CODES[f.finding])]
        assert _codings(obs["bodySite"]) == [_coding(level_code(f.level))]
        assert _codings(obs["valueCodeableConcept"]) == [_coding(SEVERITY_CODES[f.severity])]
        assert _codings(obs["interpretation"][0]) == [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "A"}]
        assert obs["subject"] == dr["subject"] and obs["derivedFrom"] == dr["imagingStudy"]
        assert obs["device"]["display"] == f"{rb.groups[0].algorithm_name} {rb.groups[0].algorithm_version}"
        assert obs["note"] == [{"text": f.summary}]
        assert obs["identifier"][0]["system"] == "urn:spinemed:finding"
        assert obs["identifier"][0]["value"].startswith(f"{sr.SOPInstanceUID}/{f.level}/{f.finding.value}")
        quantities = _quantities(obs)
        assert len(quantities) == len(f.measurements) >= 1
        for c in quantities:
            q = c["valueQuantity"]
            (coding,) = c["code"]["coding"]
            scheme = {v: k for k, v in SYSTEMS.items()}[coding["system"]]
            assert (scheme, coding["code"], q["value"], "UCUM", q["code"]) in nums
            assert q["system"] == "http://unitsofmeasure.org" and q["unit"] == q["code"]
        coded = {(c["code"]["coding"][0]["code"]): _codings(c["valueCodeableConcept"])
                 for c in obs.get("component", []) if "valueCodeableConcept" in c}
        if f.laterality is not None and f.laterality is not Laterality.CENTRAL:
            assert coded.pop(SpineCodes.LATERALITY.value) == [_coding(LATERALITY_CODES[f.laterality])]
        if f.grade is not None:
            assert coded.pop(SpineCodes.MEYERDING_GRADE.value) == [_coding(MEYERDING_GRADE_CODES[f.grade])]
        assert coded == {}
    assert {f.laterality for f in rb.findings} >= {Laterality.LEFT} and {f.grade for f in rb.findings} >= {1}


def test_scoliosis_cobb_angle_is_a_quantity_in_degrees(fhir: FhirServer, reports: dict[str, Report]) -> None:
    report = reports["xr"]
    results = send_files_fhir(_dest(fhir), report.paths, timeout_s=10)
    assert all(r.delivered for r in results), results
    rb = read_measurement_report(report.sr())
    cobb = next(m for f in rb.findings for m in f.measurements if m.type.value == "cobb_angle")
    obs = {o["code"]["coding"][0]["code"]: o for o in fhir.of_type("Observation")}
    scoliosis = obs[FINDING_CODES[FindingType.SCOLIOSIS].value]
    (component,) = _quantities(scoliosis)
    assert _codings(component["code"]) == [{"system": "http://snomed.info/sct", "code": "285285000"}]
    assert component["valueQuantity"] == {"value": cobb.value, "unit": "deg",
                                          "system": "http://unitsofmeasure.org", "code": "deg"}
    assert "T6-T12" in scoliosis["note"][0]["text"]
    normal = obs[FINDING_CODES[FindingType.NO_ABNORMALITY].value]  # T13: no abnormality, no severity
    assert "valueCodeableConcept" not in normal
    assert normal["interpretation"][0]["coding"][0]["code"] == "N"
    assert normal["bodySite"]["coding"][0]["system"] == "urn:spinemed:99SPINEMED"  # T13 is a private level


def test_absent_condition_demo_model_and_patient_identifier_system(reports: dict[str, Report]) -> None:
    sr = reports["demo"].sr()
    narrative = pydicom.dcmread(reports["demo"].narrative)
    rb = read_measurement_report(sr)
    (absent,) = [f for f in rb.findings if f.severity is Severity.NONE]
    assert rb.demo
    bundle = build_report_bundle(sr, narrative, patient_identifier_system="https://hospital.example/mrn")
    resources = [e["resource"] for e in bundle["entry"]]
    dr = resources[0]
    assert dr["conclusion"].startswith("DEMO — not for clinical use.")
    assert base64.b64decode(dr["presentedForm"][0]["data"]).decode().startswith("DEMO — not for clinical use.")
    assert dr["subject"]["identifier"] == {"system": "https://hospital.example/mrn", "value": str(sr.PatientID)}
    obs = next(r for r in resources[1:] if r["bodySite"]["coding"][0]["code"] == level_code(absent.level).value)
    assert _codings(obs["code"]) == [_coding(FINDING_CODES[absent.finding])]
    assert _codings(obs["valueCodeableConcept"]) == [_coding(SpineCodes.ABSENT)]
    assert obs["interpretation"][0]["coding"][0]["code"] == "N"

    sr.IssuerOfPatientID = "1.2.3.4.5"  # an OID issuer: the default system
    assert build_report_bundle(sr, None)["entry"][0]["resource"]["subject"]["identifier"]["system"] == \
        "urn:oid:1.2.3.4.5"
    sr.IssuerOfPatientID = "HOSPITAL A"  # not an OID: no system
    without = build_report_bundle(sr, None)["entry"][0]["resource"]
    assert "system" not in without["subject"]["identifier"] and "presentedForm" not in without
    assert without["conclusion"].startswith("DEMO — not for clinical use. ")
    assert all(f.summary in without["conclusion"] for f in rb.findings)


def test_a_retry_stores_each_resource_once(fhir: FhirServer, reports: dict[str, Report]) -> None:
    report = reports["mr"]
    first = send_files_fhir(_dest(fhir), report.paths, timeout_s=10)
    stored = dict(fhir.stored)
    again = send_files_fhir(_dest(fhir), list(reversed(report.paths)), timeout_s=10)
    assert all(r.delivered for r in [*first, *again])
    assert fhir.stored == stored and len(stored) == 4
    assert fhir.statuses == [["201 Created"] * 4, ["200 OK"] * 4]


def test_a_refusal_is_permanent_with_the_diagnostics_and_no_phi(fhir: FhirServer, reports: dict[str, Report]) -> None:
    fhir.mode = "400"
    report = reports["mr"]
    results = send_files_fhir(_dest(fhir), report.paths, timeout_s=10)
    sr = report.sr()
    for r in results:
        assert not r.delivered and r.permanent
        assert r.error is not None and r.error.startswith("HTTP 400: Patient with identifier ")
        assert "not found" in r.error and len(r.error.removeprefix("HTTP 400: ")) <= 300
        for phi in (str(sr.PatientID), "SYNTHETIC", "SPINE", str(sr.SOPInstanceUID), str(sr.StudyInstanceUID)):
            assert phi not in r.error
    assert fhir.stored == {}


@pytest.mark.parametrize("mode", ["503", "429", "not-a-transaction-response"])
def test_unavailable_or_unexpected_answers_are_transient(
    fhir: FhirServer, reports: dict[str, Report], mode: str
) -> None:
    fhir.mode = mode
    results = send_files_fhir(_dest(fhir), reports["mr"].paths, timeout_s=10)
    assert all(not r.delivered and not r.permanent and r.error for r in results), results
    if mode == "not-a-transaction-response":
        assert "not a transaction-response" in (results[0].error or "")
    else:
        assert (results[0].error or "").startswith(f"HTTP {mode}: try later")


def test_a_closed_port_is_transient(reports: dict[str, Report]) -> None:
    dest = DestinationConfig(name="ehr", type="fhir", url=f"http://127.0.0.1:{free_port()}/fhir")
    results = send_files_fhir(dest, reports["mr"].paths, timeout_s=5)
    assert all(not r.delivered and not r.permanent for r in results), results
    assert "cannot connect" in (results[0].error or "")


def test_bearer_token_reaches_the_server_and_never_an_error(
    fhir: FhirServer, reports: dict[str, Report], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "tok-s3cret-9f8e7d"
    dest = _dest(fhir, token_env="FHIR_TEST_TOKEN")
    missing = send_files_fhir(dest, reports["mr"].paths, timeout_s=10)
    assert all(not r.delivered and not r.permanent for r in missing)
    assert "FHIR_TEST_TOKEN" in (missing[0].error or "") and fhir.headers == []

    monkeypatch.setenv("FHIR_TEST_TOKEN", token)
    assert all(r.delivered for r in send_files_fhir(dest, reports["mr"].paths, timeout_s=10))
    assert fhir.headers[-1]["authorization"] == f"Bearer {token}"

    fhir.mode = "401"  # a server that quotes the credentials it refused
    refused = send_files_fhir(dest, reports["mr"].paths, timeout_s=10)
    assert all(not r.delivered and r.permanent for r in refused)
    assert fhir.headers[-1]["authorization"] == f"Bearer {token}"
    for r in [*missing, *refused]:
        assert token not in (r.error or "")
    assert (refused[0].error or "").startswith("HTTP 401: token rejected")


def test_basic_auth_from_the_password_env(
    fhir: FhirServer, reports: dict[str, Report], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIR_TEST_PW", "pw-s3cret")
    dest = _dest(fhir, username="spinemed", password_env="FHIR_TEST_PW")
    assert all(r.delivered for r in send_files_fhir(dest, reports["mr"].paths, timeout_s=10))
    expected = base64.b64encode(b"spinemed:pw-s3cret").decode()
    assert fhir.headers[-1]["authorization"] == f"Basic {expected}"


def test_an_invalid_resource_is_refused_before_sending(
    fhir: FhirServer, reports: dict[str, Report], tmp_path: Path
) -> None:
    sr = reports["mr"].sr()
    procedure = next(i for i in sr.ContentSequence
                     if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121058")
    procedure.ConceptCodeSequence[0].CodeValue = "MR  LUMBAR"  # two spaces: not a FHIR code
    with pytest.raises(ValueError, match=r"FHIR DiagnosticReport \(bundle entry 0\) is invalid: code\.coding"):
        build_report_bundle(sr, None)
    bad = tmp_path / "bad.dcm"
    pydicom.dcmwrite(bad, sr, enforce_file_format=True)
    results = send_files_fhir(_dest(fhir), [bad, reports["mr"].narrative], timeout_s=10)
    assert all(not r.delivered and r.permanent and "DiagnosticReport" in (r.error or "") for r in results)
    assert fhir.headers == []  # nothing left

    sr.ContentSequence = [i for i in sr.ContentSequence if i is not procedure]
    with pytest.raises(ValueError, match="Procedure Reported"):
        build_report_bundle(sr, None)
    with pytest.raises(ValueError, match="99MYHOSP"):
        fhir_system("99MYHOSP")
    assert {k: fhir_system(k) for k in SYSTEMS} == SYSTEMS


def test_files_that_are_not_our_srs_fail_permanently_and_the_report_still_goes(
    fhir: FhirServer, reports: dict[str, Report], tmp_path: Path
) -> None:
    report = reports["mr"]
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM")
    paths = [*report.paths, junk, *report.others, tmp_path / "missing.dcm"]
    results = send_files_fhir(_dest(fhir), paths, timeout_s=10)
    assert [r.path for r in results] == paths
    assert [r.delivered for r in results] == [True, True] + [False] * (len(paths) - 2)
    assert all(r.permanent and r.error for r in results[2:])
    assert len(fhir.stored) == 4

    fhir.reset()
    lone = send_files_fhir(_dest(fhir), [report.narrative], timeout_s=10)  # no measurement report
    assert not lone[0].delivered and lone[0].permanent and fhir.headers == []


def test_check_reads_the_capability_statement_with_the_credentials(fhir: FhirServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``spinemed-node echo`` / ``doctor`` for a FHIR destination: GET metadata, with the token."""
    from dicom_node.delivery.dispatch import check

    monkeypatch.setenv("EHR_TOKEN_FOR_CHECK", "t0k3n-for-the-check")
    ok, msg = check(_dest(fhir, token_env="EHR_TOKEN_FOR_CHECK"), calling_ae="SPINEMED", timeout_s=5)
    assert ok and "fhirVersion 4.0.1" in msg
    assert fhir.headers[-1]["authorization"] == "Bearer t0k3n-for-the-check"
    fhir.mode = "503"
    ok, msg = check(_dest(fhir, token_env="EHR_TOKEN_FOR_CHECK"), calling_ae="SPINEMED", timeout_s=5)
    assert not ok and msg == "GET metadata: HTTP 503"
    ok, msg = check(_dest(fhir, url=f"http://127.0.0.1:{free_port()}/fhir"), calling_ae="SPINEMED", timeout_s=5)
    assert not ok and "cannot reach the FHIR server" in msg
