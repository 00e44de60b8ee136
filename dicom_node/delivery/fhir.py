"""FHIR R4 export: one report's two SRs as one transaction Bundle, POSTed to a FHIR server.

Used for ``type = "fhir"`` destinations (``docs/fhir-hl7.md``).  :func:`build_report_bundle` turns the
measurement report (TID 1500 SR) and the narrative SR of one study into a ``transaction`` Bundle of

* one ``DiagnosticReport`` (status ``preliminary``: our SRs are UNVERIFIED), its conclusion the narrative's
  impression, the whole narrative as a ``text/plain`` attachment, and
* one ``Observation`` per finding (finding code, level as body site, severity or Absent as coded value,
  measurements, laterality and Meyerding grade as components),

each entry a conditional create (``ifNoneExist`` on a deterministic identifier), so a retry after a lost
response stores nothing twice.  Patient and ImagingStudy are logical references by identifier (Patient
ID, Study Instance UID): the EHR resolves them; the node creates neither.  Every resource is validated
with the ``fhir.resources`` R4B models before the Bundle leaves.

:func:`send_files_fhir` never raises for network, HTTP or peer errors: they become failed
:class:`~dicom_node.delivery.result.SendResult` objects carrying the reason, ``permanent`` where a retry
cannot change the answer (4xx except 408/429, an SR we cannot read or turn into valid FHIR).  The bearer
token (``token_env``) or basic-auth password (``password_env``) is read from the environment at each call
and never logged; error texts are scrubbed of them and of the report's patient identity and UIDs.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pydicom.errors
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from highdicom.sr import CodedConcept
from pydantic import ValidationError
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from dicom_node.config import DestinationConfig
from dicom_node.delivery.result import SendResult
from dicom_node.log import get_logger
from dicom_node.work.pipeline import output_kind
from inference.findings import MEASUREMENT_UNITS, FindingType, Laterality, Severity
from sr_templates.codes import (
    FINDING_CODES,
    LATERALITY_CODES,
    MEASUREMENT_CODES,
    MEYERDING_GRADE_CODES,
    NARRATIVE_SECTIONS,
    SCHEME_DESIGNATOR,
    SEVERITY_CODES,
    SpineCodes,
    level_code,
    unit_code,
)
from sr_templates.pdf import narrative_sections
from sr_templates.reader import ReadBack, ReadFinding, read_measurement_report

__all__ = ["build_report_bundle", "send_files_fhir"]

log = get_logger(__name__)

#: DICOM Coding Scheme Designator → FHIR code system URI (HL7 "Using SNOMED CT / LOINC / UCUM";
#: DICOM's own FHIR system for DCM).  Our private scheme gets a URN of its own (docs/codes.md).
CODE_SYSTEMS: dict[str, str] = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    SCHEME_DESIGNATOR: f"urn:spinemed:{SCHEME_DESIGNATOR}",
}
DICOM_UID_SYSTEM = "urn:dicom:uid"
FINDING_ID_SYSTEM = "urn:spinemed:finding"
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_FULL_URL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:spinemed:fhir-bundle-entry")
_DEMO_PREFIX = "DEMO — not for clinical use."
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_UID_LIKE = re.compile(r"\b[0-9]+(?:\.[0-9]+){3,}\b")
_FHIR_JSON = "application/fhir+json"
_DIAGNOSTICS_MAX = 300
_IMPRESSION_HEADING = next(heading for name, heading, _ in NARRATIVE_SECTIONS if name == "diagnosis")


# ------------------------------------------------------------------------------------------ codes
def fhir_system(scheme_designator: str) -> str:
    """The FHIR code system URI of a DICOM Coding Scheme Designator.

    Raises
    ------
    ValueError
        The scheme has no FHIR system here (a site's own scheme from ``[output.codes]``, for instance).
    """
    try:
        return CODE_SYSTEMS[scheme_designator]
    except KeyError:
        raise ValueError(f"coding scheme {scheme_designator!r} has no FHIR code system mapping") from None


def _coding(code: Code | CodedConcept) -> dict[str, Any]:
    return {"system": fhir_system(str(code.scheme_designator)), "code": str(code.value),
            "display": str(code.meaning)}


def _concept(code: Code | CodedConcept) -> dict[str, Any]:
    return {"coding": [_coding(code)], "text": str(code.meaning)}


def _hl7_concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}]}


# ------------------------------------------------------------------------------------------ dates
def _local_zone(naive: datetime.datetime, offset: str | None) -> datetime.datetime:
    """``naive`` in the SR's Timezone Offset From UTC, else in this host's zone (our SRs are written with
    the node's local clock, and the modality that made the study stands at the same site)."""
    if offset:
        m = re.fullmatch(r"([+-])(\d\d)(\d\d)", offset.strip())
        if m is None:
            raise ValueError("measurement report: Timezone Offset From UTC is not ±HHMM")
        delta = datetime.timedelta(hours=int(m[2]), minutes=int(m[3]))
        return naive.replace(tzinfo=datetime.timezone(-delta if m[1] == "-" else delta))
    return naive.astimezone()


def _dicom_datetime(ds: pydicom.Dataset, date_kw: str, time_kw: str) -> str | None:
    """FHIR dateTime of a DICOM date + time pair: date only without a time, None without a date."""
    raw_date = str(ds.get(date_kw, "") or "").strip()
    if not raw_date:
        return None
    date = DA(raw_date)
    raw_time = str(ds.get(time_kw, "") or "").strip()
    if not raw_time:
        return date.isoformat()
    t = TM(raw_time)
    naive = datetime.datetime.combine(date, t.replace(tzinfo=None))
    return _local_zone(naive, ds.get("TimezoneOffsetFromUTC")).isoformat()


# ------------------------------------------------------------------------------------------ bundle
def _full_url(sr_uid: str, index: int) -> str:
    return f"urn:uuid:{uuid.uuid5(_FULL_URL_NAMESPACE, f'{sr_uid}/{index}')}"


def _patient_reference(ds: pydicom.Dataset, system: str | None) -> dict[str, Any]:
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not patient_id:
        raise ValueError("measurement report: no Patient ID to name the patient by")
    if system is None:
        issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
        if _OID.match(issuer):
            system = f"urn:oid:{issuer}"
        else:
            for q in ds.get("IssuerOfPatientIDQualifiersSequence", []):
                entity = str(q.get("UniversalEntityID", "") or "").strip()
                if str(q.get("UniversalEntityIDType", "")).strip() == "ISO" and _OID.match(entity):
                    system = f"urn:oid:{entity}"
    identifier: dict[str, Any] = {"value": patient_id}
    if system:
        identifier = {"system": system, "value": patient_id}
    return {"type": "Patient", "identifier": identifier}


def _device_display(ds: pydicom.Dataset, rb: ReadBack) -> str:
    """Algorithm name and version: from the TID 4019 of a measurement group, else the contributing
    equipment's software versions (``<name> <version>``), else the device observer's name."""
    for group in rb.groups:
        if group.algorithm_name:
            return f"{group.algorithm_name} {group.algorithm_version}".strip()
    for equipment in ds.get("ContributingEquipmentSequence", []):
        versions = equipment.get("SoftwareVersions")
        if isinstance(versions, pydicom.multival.MultiValue) and len(versions) > 1:
            return str(versions[1])
    return rb.device_observer_name or "SpineMed algorithm"


def _finding_identifier(sr_uid: str, finding: ReadFinding) -> str:
    parts = [sr_uid, finding.level, finding.finding.value]
    if finding.laterality is not None:
        parts.append(finding.laterality.value)
    return "/".join(parts)


def _components(finding: ReadFinding) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in finding.measurements:
        unit = unit_code(MEASUREMENT_UNITS[m.type])
        out.append({
            "code": _concept(MEASUREMENT_CODES[m.type]),
            "valueQuantity": {"value": m.value, "unit": str(unit.value), "system": fhir_system(unit.scheme_designator),
                              "code": str(unit.value)},
        })
    if finding.laterality is Laterality.CENTRAL:  # coded in the SR as a topographical modifier, not laterality
        out.append({"code": _concept(SpineCodes.TOPOGRAPHICAL_MODIFIER),
                    "valueCodeableConcept": _concept(LATERALITY_CODES[Laterality.CENTRAL])})
    elif finding.laterality is not None:
        out.append({"code": _concept(SpineCodes.LATERALITY),
                    "valueCodeableConcept": _concept(LATERALITY_CODES[finding.laterality])})
    if finding.grade is not None:
        out.append({"code": _concept(SpineCodes.MEYERDING_GRADE),
                    "valueCodeableConcept": _concept(MEYERDING_GRADE_CODES[finding.grade])})
    return out


def _observation(
    finding: ReadFinding, identifier: str, common: dict[str, Any], imaging_study: dict[str, Any], device: str
) -> dict[str, Any]:
    """One finding: code, level (body site), severity or Absent (value), components, provenance."""
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": FINDING_ID_SYSTEM, "value": identifier}],
        "status": "preliminary",
        "category": [_hl7_concept(_OBS_CATEGORY, "imaging", "Imaging")],
        "code": _concept(FINDING_CODES[finding.finding]),
        **common,
        "bodySite": _concept(level_code(finding.level)),
    }
    present = finding.severity is not Severity.NONE
    if present:
        obs["valueCodeableConcept"] = _concept(SEVERITY_CODES[finding.severity])
    elif finding.finding is not FindingType.NO_ABNORMALITY:  # a condition assessed and absent
        obs["valueCodeableConcept"] = _concept(SpineCodes.ABSENT)
    obs["interpretation"] = [_hl7_concept(_INTERPRETATION, "A", "Abnormal") if present
                             else _hl7_concept(_INTERPRETATION, "N", "Normal")]
    if finding.summary:
        obs["note"] = [{"text": finding.summary}]
    obs["derivedFrom"] = [imaging_study]
    obs["device"] = {"display": device}
    components = _components(finding)
    if components:
        obs["component"] = components
    return obs


def _narrative_text(title: str, sections: list[tuple[str, list[str]]], demo: bool) -> str:
    lines = [_DEMO_PREFIX, ""] if demo else []
    lines += [title, ""]
    for heading, paragraphs in sections:
        lines += [heading, *paragraphs, ""]
    return "\n".join(lines).rstrip() + "\n"


def _entry(full_url: str, resource: dict[str, Any], system: str, value: str) -> dict[str, Any]:
    rtype = resource["resourceType"]
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "POST", "url": rtype, "ifNoneExist": f"identifier={system}|{value}"},
    }


def _validate_bundle(bundle: dict[str, Any]) -> None:
    """Validate each entry's resource with its R4B model, then the Bundle.

    Raises
    ------
    ValueError
        A resource (named by type and entry index) or the Bundle is not valid FHIR R4B; the message
        gives the failing element paths and rules, never the values.
    """

    def why(exc: ValidationError) -> str:
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors()[:5])

    for i, entry in enumerate(bundle.get("entry", [])):
        resource = entry.get("resource", {})
        rtype = str(resource.get("resourceType", "?"))
        try:
            get_fhir_model_class(rtype).model_validate(resource)
        except (KeyError, ValueError) as exc:
            detail = why(exc) if isinstance(exc, ValidationError) else f"unknown resource type {rtype!r}"
            raise ValueError(f"FHIR {rtype} (bundle entry {i}) is invalid: {detail}") from None
    try:
        Bundle.model_validate(bundle)
    except ValidationError as exc:
        raise ValueError(f"FHIR Bundle is invalid: {why(exc)}") from None


def build_report_bundle(
    measurement_sr: pydicom.Dataset,
    narrative_sr: pydicom.Dataset | None,
    *,
    patient_identifier_system: str | None = None,
) -> dict[str, Any]:
    """A FHIR R4 transaction Bundle of one report: a DiagnosticReport and one Observation per finding.

    Parameters
    ----------
    measurement_sr
        Our TID 1500 measurement report (Comprehensive 3D SR).
    narrative_sr
        Our narrative SR of the same study, or None (the conclusion is then the findings' summaries and
        there is no attached text).
    patient_identifier_system
        The identifier system (URI) of the site's Patient IDs; default: the SR's Issuer of Patient ID as
        ``urn:oid:`` when it is an OID, else none.

    Returns
    -------
    dict
        The Bundle as JSON-ready data, validated with the ``fhir.resources`` R4B models.

    Raises
    ------
    TypeError
        An SR argument is not a pydicom Dataset.
    ValueError
        ``measurement_sr`` is not our measurement report (or has no Patient ID or procedure), the
        narrative is of another study, a code's scheme has no FHIR system, or a resource is invalid FHIR
        (the message names it).
    """
    if not isinstance(measurement_sr, pydicom.Dataset):
        raise TypeError(f"measurement_sr: expected a pydicom Dataset, got {type(measurement_sr).__name__}")
    if narrative_sr is not None and not isinstance(narrative_sr, pydicom.Dataset):
        raise TypeError(f"narrative_sr: expected a pydicom Dataset or None, got {type(narrative_sr).__name__}")
    rb = read_measurement_report(measurement_sr)
    if not rb.procedure_reported:
        raise ValueError("measurement report: no Procedure Reported (the DiagnosticReport's code)")
    sr_uid = str(measurement_sr.SOPInstanceUID)
    study_uid = str(measurement_sr.StudyInstanceUID)
    if narrative_sr is not None and str(narrative_sr.get("StudyInstanceUID", "")) != study_uid:
        raise ValueError("narrative report: of another study than the measurement report")

    imaging_study = {"type": "ImagingStudy",
                     "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}}
    issued = _dicom_datetime(measurement_sr, "ContentDate", "ContentTime")
    if issued is None or "T" not in issued:
        raise ValueError("measurement report: no Content Date and Time (the report's issued instant)")
    common: dict[str, Any] = {"subject": _patient_reference(measurement_sr, patient_identifier_system)}
    effective = _dicom_datetime(measurement_sr, "StudyDate", "StudyTime")
    if effective is not None:
        common["effectiveDateTime"] = effective
    common["issued"] = issued
    device = _device_display(measurement_sr, rb)

    entries: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for index, finding in enumerate(rb.findings, start=1):
        ident = _finding_identifier(sr_uid, finding)
        seen[ident] = seen.get(ident, 0) + 1
        if seen[ident] > 1:  # the same finding twice at one level and side: keep them apart, in SR order
            ident = f"{ident}/{seen[ident]}"
        obs = _observation(finding, ident, common, imaging_study, device)
        entries.append(_entry(_full_url(sr_uid, index), obs, FINDING_ID_SYSTEM, ident))

    summaries = [f.summary for f in rb.findings if f.summary]
    conclusion = "\n".join(summaries)
    presented: list[dict[str, Any]] = []
    if narrative_sr is not None:
        sections = narrative_sections(narrative_sr)
        impression = [p for heading, paragraphs in sections if heading == _IMPRESSION_HEADING.meaning
                      for p in paragraphs]
        conclusion = "\n".join(impression) or conclusion
        names = narrative_sr.get("ConceptNameCodeSequence")
        title = str(names[0].CodeMeaning) if names else "Diagnostic Imaging Report"
        text = _narrative_text(title, sections, rb.demo)
        presented.append({
            "contentType": "text/plain; charset=utf-8",
            "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
            "title": f"{title} (preliminary, generated by {device})",
        })
    if rb.demo:
        conclusion = f"{_DEMO_PREFIX} {conclusion}".rstrip()

    verified = str(measurement_sr.get("VerificationFlag", "")).strip() == "VERIFIED"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{sr_uid}"}],
        "status": "final" if verified else "preliminary",  # our SRs are UNVERIFIED: nobody has signed them
        "category": [_hl7_concept(_V2_0074, "RAD", "Radiology")],
        "code": _concept(rb.procedure_reported[0]),
        **common,
        "imagingStudy": [imaging_study],
        "result": [{"reference": e["fullUrl"], "type": "Observation"} for e in entries],
    }
    if conclusion:
        report["conclusion"] = conclusion
    if presented:
        report["presentedForm"] = presented
    entries.insert(0, _entry(_full_url(sr_uid, 0), report, DICOM_UID_SYSTEM, f"urn:oid:{sr_uid}"))
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    _validate_bundle(bundle)
    return bundle


# ------------------------------------------------------------------------------------------ sending
def _auth(dest: DestinationConfig) -> tuple[dict[str, str], httpx.BasicAuth | None, list[str], str | None]:
    """(headers, basic auth, secrets to scrub from errors, problem)."""
    if dest.token_env:
        token = os.environ.get(dest.token_env)
        if not token:
            return {}, None, [], f"bearer token environment variable {dest.token_env} is not set"
        return {"Authorization": f"Bearer {token}"}, None, [token], None
    if dest.username:
        password = os.environ.get(dest.password_env) if dest.password_env else ""
        if password is None:
            return {}, None, [], f"password environment variable {dest.password_env} is not set"
        return {}, httpx.BasicAuth(dest.username, password), [password] if password else [], None
    return {}, None, [], None


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for s in sorted((s for s in secrets if len(s) >= 2), key=len, reverse=True):
        text = text.replace(s, "***")
    return _UID_LIKE.sub("<uid>", text)


def _sensitive(datasets: Sequence[pydicom.Dataset]) -> list[str]:
    """The report's patient identity and UIDs: kept out of error texts."""
    out: list[str] = []
    for ds in datasets:
        for kw in ("PatientID", "AccessionNumber", "PatientBirthDate", "StudyInstanceUID", "SOPInstanceUID"):
            value = str(ds.get(kw, "") or "").strip()
            if value:
                out.append(value)
        name = ds.get("PatientName")
        if name:
            out.append(str(name))
            out.extend(p for p in re.split(r"[\^= ]+", str(name)) if len(p) >= 2)
    return out


def _diagnostics(response: httpx.Response) -> str:
    """The issues of an OperationOutcome body, else the reason phrase."""
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    texts: list[str] = []
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        for issue in body.get("issue", []) if isinstance(body.get("issue"), list) else []:
            if not isinstance(issue, dict):
                continue
            text = issue.get("diagnostics")
            details = issue.get("details")
            if not isinstance(text, str) and isinstance(details, dict):
                text = details.get("text")
            if isinstance(text, str) and text.strip():
                texts.append(text.strip())
    return "; ".join(texts) or response.reason_phrase


def _transaction_outcome(response: httpx.Response, sent: int) -> str | None:
    """None if ``response`` is a transaction-response Bundle with a 2xx status for every entry we sent,
    else what is wrong with it (no values quoted)."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return "the answer is not JSON"
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle" or body.get("type") != "transaction-response":
        return "the answer is not a transaction-response Bundle"
    entries = body.get("entry")
    if not isinstance(entries, list) or len(entries) != sent:
        return f"the transaction-response has {len(entries) if isinstance(entries, list) else 0} entries for {sent}"
    for i, entry in enumerate(entries):
        response_part = entry.get("response") if isinstance(entry, dict) else None
        status = response_part.get("status") if isinstance(response_part, dict) else None
        if not isinstance(status, str) or not status.strip().startswith("2"):
            return f"entry {i} of the transaction-response has no 2xx status"
    return None


def send_files_fhir(
    dest: DestinationConfig,
    paths: Sequence[Path],
    *,
    timeout_s: float = 60.0,
    transport: httpx.BaseTransport | None = None,
) -> list[SendResult]:
    """POST one report (its measurement SR and narrative SR) to ``dest.url`` as one transaction Bundle.

    Parameters
    ----------
    dest
        A ``type = "fhir"`` destination: ``url`` is the FHIR base URL; ``token_env`` names the env var of
        a bearer token, else ``username`` + ``password_env`` give basic auth; ``patient_identifier_system``
        the system of the Patient reference.
    paths
        The two SR files of one report, in any order (told apart by
        :func:`dicom_node.work.pipeline.output_kind`).
    timeout_s
        Connect, write and read time-out of the request.
    transport
        An httpx transport to use instead of the network (for injection only).

    Returns
    -------
    list of SendResult
        One per path, in order; every SR of the report gets the same outcome.  A path that cannot be
        read or is not one of our SRs fails permanently with the reason.  Never raises for network,
        HTTP or peer errors.

    Raises
    ------
    ValueError
        ``dest`` is not a fhir destination with a url.
    """
    if dest.type != "fhir" or not dest.url:
        raise ValueError(f"destination {dest.name}: not a fhir destination with a url")
    results: dict[Path, SendResult] = {}
    reports: dict[str, list[tuple[Path, pydicom.Dataset]]] = {"measurement_report": [], "narrative_report": []}
    for p in map(Path, paths):
        try:
            ds = pydicom.dcmread(p)
            kind = output_kind(ds)
            sop = str(ds.SOPInstanceUID)
        except (OSError, pydicom.errors.InvalidDicomError, AttributeError, KeyError, ValueError) as exc:
            results[p] = SendResult(p, "", False, None, f"cannot read result file: {type(exc).__name__}",
                                    permanent=True)
            continue
        if kind not in reports:
            results[p] = SendResult(p, sop, False, None, f"a {kind} is not sent to a FHIR destination",
                                    permanent=True)
            continue
        reports[kind].append((p, ds))
    if reports["measurement_report"] or reports["narrative_report"]:
        for r in _send_report(dest, reports["measurement_report"], reports["narrative_report"], timeout_s, transport):
            results[r.path] = r
    return [results[Path(p)] for p in paths]


def _send_report(
    dest: DestinationConfig,
    measurements: list[tuple[Path, pydicom.Dataset]],
    narratives: list[tuple[Path, pydicom.Dataset]],
    timeout_s: float,
    transport: httpx.BaseTransport | None,
) -> list[SendResult]:
    items = [(p, str(ds.SOPInstanceUID)) for p, ds in (*measurements, *narratives)]
    datasets = [ds for _, ds in (*measurements, *narratives)]

    def all_failed(why: str, permanent: bool) -> list[SendResult]:
        return [SendResult(p, sop, False, None, why, permanent=permanent) for p, sop in items]

    if len(measurements) != 1 or len(narratives) > 1:
        return all_failed(f"a FHIR report takes one measurement report and at most one narrative report "
                          f"(got {len(measurements)} and {len(narratives)})", True)
    try:
        bundle = build_report_bundle(measurements[0][1], narratives[0][1] if narratives else None,
                                     patient_identifier_system=dest.patient_identifier_system)
    except (ValueError, KeyError, AttributeError, IndexError, TypeError) as exc:
        why = _scrub(str(exc), _sensitive(datasets)) if isinstance(exc, ValueError) else type(exc).__name__
        return all_failed(f"cannot build the FHIR Bundle: {why}", True)
    headers, auth, secrets, problem = _auth(dest)
    if problem is not None:
        return all_failed(problem, False)
    secrets = [*secrets, *_sensitive(datasets)]
    assert dest.url is not None
    headers.update({"Content-Type": _FHIR_JSON, "Accept": _FHIR_JSON})
    body = json.dumps(bundle, ensure_ascii=False).encode("utf-8")
    sent = len(bundle["entry"])
    try:
        with httpx.Client(timeout=timeout_s, transport=transport, auth=auth, follow_redirects=False) as client:
            response = client.post(dest.url.rstrip("/"), content=body, headers=headers)
    except httpx.TimeoutException:
        return all_failed(f"FHIR to {dest.name}: no answer within {timeout_s:g} s", False)
    except httpx.HTTPError as exc:
        return all_failed(f"FHIR to {dest.name}: cannot connect: {type(exc).__name__}", False)
    except httpx.InvalidURL:
        return all_failed(f"FHIR to {dest.name}: the url is not a valid URL", True)
    code = response.status_code
    if 200 <= code < 300:
        problem = _transaction_outcome(response, sent)
        if problem is None:
            return [SendResult(p, sop, True, None, None) for p, sop in items]
        log.warning("FHIR answer not understood", destination=dest.name, http_status=code)
        return all_failed(f"FHIR to {dest.name} answered HTTP {code}, but {problem}", False)
    # 4xx (but 408 time-out, 429 too many requests) will not change by retrying; 5xx may; a redirect
    # (not followed: it would carry our credentials elsewhere) means the url needs changing
    permanent = (300 <= code < 500) and code not in (408, 429)
    diagnostics = _scrub(_diagnostics(response), secrets)
    if len(diagnostics) > _DIAGNOSTICS_MAX:
        diagnostics = diagnostics[: _DIAGNOSTICS_MAX - 1] + "…"
    log.warning("FHIR transaction refused", destination=dest.name, http_status=code, permanent=permanent)
    return all_failed(f"HTTP {code}: {diagnostics}".rstrip(": "), permanent)


def probe_fhir(dest: DestinationConfig, *, timeout_s: float = 10.0,
               transport: httpx.BaseTransport | None = None) -> tuple[bool, str]:
    """``GET <base>/metadata`` with the destination's credentials: (ok, what the server said).

    For ``spinemed-node echo`` and ``doctor``: ok when it answers a CapabilityStatement.
    """
    if dest.type != "fhir" or not dest.url:
        return False, f"{dest.type} destination: not a FHIR destination"
    headers, auth, secrets, problem = _auth(dest)
    if problem is not None:
        return False, problem
    try:
        with httpx.Client(timeout=timeout_s, transport=transport, auth=auth, follow_redirects=False) as client:
            response = client.get(dest.url.rstrip("/") + "/metadata",
                                  headers={**headers, "Accept": "application/fhir+json"})
    except httpx.HTTPError as exc:
        return False, _scrub(f"cannot reach the FHIR server: {type(exc).__name__}: {exc}", secrets)[:300]
    if response.status_code != 200:
        return False, f"GET metadata: HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return False, "GET metadata: not JSON"
    if not isinstance(body, dict) or body.get("resourceType") != "CapabilityStatement":
        return False, "GET metadata: not a CapabilityStatement"
    return True, f"FHIR server answers (CapabilityStatement, fhirVersion {body.get('fhirVersion', '?')})"
