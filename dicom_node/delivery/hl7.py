"""HL7 v2.5.1 ORU^R01 over MLLP: a report's findings and narrative to the RIS or the EHR's interface engine.

One message per report, built from our two SRs (the TID 1500 measurement report and the narrative SR) and
checked against the standard's ORU_R01 2.5.1 structure by hl7apy (segments, groups, cardinalities, required
fields) before it leaves::

    MSH  ORU^R01^ORU_R01, 2.5.1, UNICODE UTF-8, a new control id per attempt
    PID  patient ID (issuer as assigning authority), name, birth date, sex: from the SR
    ORC  RE; placer / filler order numbers from the SR's Referenced Request Sequence
    OBR  the same order numbers; OBR-4 the procedure reported (LOINC Playbook); OBR-7 the study date;
         OBR-18 the accession number, OBR-19 the requested procedure ID (as IHE Scheduled Workflow maps
         them); OBR-22 the SR's content date; OBR-24 RAD; OBR-25 P (preliminary: the SR is UNVERIFIED)
    OBX  RP  18748-4 "Diagnostic imaging study" (LN): the SR's SOP Instance UID (a DICOM reference)
    OBX  HD  110180 "Study Instance UID" (DCM): the study
    OBX  CWE one per level finding: OBX-3 the finding (SNOMED CT where one exists), OBX-5 its severity,
         or Absent (SCT 272519000) for an assessed absent condition; OBX-8 A or N; with OBX-4 = n grouping
         the finding's site (363698007, the level's code), laterality (272741003), Meyerding grade and
         measurements (NM, UCUM units in OBX-6) as further OBX of the same sub-ID
    OBX  TX  one per narrative section, OBX-3 its LOINC heading (CID 7001), the paragraphs repeated

Sending: MLLP framing and the ACK's parsing are python-hl7's asyncio streams.  The ACK decides:
``AA`` delivered; ``AE`` (error) and ``AR`` (reject) are transient — retried with the persisted backoff
until ``export.max_attempts``, then failed with the receiver's text; no ACK within the time-out, a wrong
control id or a refused connection are transient too.  A report that cannot be made into a message (not our
SR, unreadable) is a permanent failure.  No patient identifier goes into a log line or an error message.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import hl7
import hl7.mllp
import pydicom
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.config import DestinationConfig
from dicom_node.delivery.result import SendResult
from dicom_node.log import get_logger
from inference.findings import FindingType, Severity
from sr_templates.codes import (
    FINDING_CODES,
    LATERALITY_CODES,
    MEASUREMENT_CODES,
    MEYERDING_GRADE_CODES,
    SEVERITY_CODES,
    SpineCodes,
    level_code,
    unit_code,
)
from sr_templates.pdf import coded_narrative_sections
from sr_templates.reader import ReadFinding, read_measurement_report

__all__ = ["Acknowledgement", "build_oru", "parse_ack", "report_pair", "send_files_hl7"]

log = get_logger(__name__)

#: LOINC "Diagnostic imaging study" (LOINC Imaging Document Codes, HL7 C-CDA on FHIR value set
#: 1.3.6.1.4.1.12009.10.2.5): the OBX pointing at our SR
DIAGNOSTIC_IMAGING_STUDY = Code("18748-4", "LN", "Diagnostic imaging study")
#: HL7 table 0396 names for the coding schemes we use; a private DICOM scheme keeps its 99zzz name
_HL7_SCHEMES = {"SCT": "SCT", "LN": "LN", "DCM": "DCM", "UCUM": "UCUM"}
_MAX_CONTROL_ID = 20  # MSH-10 is ST(20) in v2.5.1


def _escape(text: str) -> str:
    """HL7 v2 escape sequences (2.5.1 section 2.7.4) for a text value; line breaks become ``\\.br\\``."""
    out = text.replace("\\", "\\E\\")
    for char, seq in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(char, seq)
    return out.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")


def _cwe(code: Code) -> str:
    scheme = _HL7_SCHEMES.get(code.scheme_designator, code.scheme_designator)
    return f"{_escape(code.value)}^{_escape(code.meaning)}^{_escape(scheme)}"


def _dt(date: object, time: object = None) -> str:
    d = str(date or "")
    t = str(time or "").split(".")[0]
    return (d + t)[:14] if d else ""


def _xpn(name: object) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) as HL7 XPN (family^given^middle^suffix^prefix)."""
    parts = (str(name or "").split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (_escape(p) for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


@dataclass(frozen=True)
class _Order:
    placer: str
    filler: str
    accession: str
    requested_procedure_id: str


def _order(sr: pydicom.Dataset) -> _Order:
    """The order the report answers, from the SR's Referenced Request Sequence (its first item naming one)."""
    found = {"placer": "", "filler": "", "accession": str(sr.get("AccessionNumber", "") or ""), "rp": ""}
    keys = {"placer": "PlacerOrderNumberImagingServiceRequest", "filler": "FillerOrderNumberImagingServiceRequest",
            "accession": "AccessionNumber", "rp": "RequestedProcedureID"}
    for item in sr.get("ReferencedRequestSequence", []):
        for name, keyword in keys.items():
            found[name] = found[name] or str(item.get(keyword, "") or "")
    return _Order(found["placer"], found["filler"], found["accession"], found["rp"])


def _finding_obx(f: ReadFinding) -> list[tuple[str, Code, str, str, str]]:
    """``(value type, OBX-3, OBX-5, OBX-6, OBX-8)`` of one finding's observations, the finding first."""
    absent = f.severity is Severity.NONE and f.finding is not FindingType.NO_ABNORMALITY
    if absent:
        value, flag = _cwe(SpineCodes.ABSENT), "N"
    elif f.severity in SEVERITY_CODES:
        value, flag = _cwe(SEVERITY_CODES[f.severity]), "A"
    else:  # no_abnormality, or a present finding the model did not grade
        value, flag = _cwe(codes.SCT.Present), "N" if f.finding is FindingType.NO_ABNORMALITY else "A"
    rows = [("CWE", FINDING_CODES[f.finding], value, "", flag)]
    rows.append(("CWE", codes.SCT.FindingSite, _cwe(level_code(f.level)), "", ""))
    if f.laterality is not None:
        rows.append(("CWE", codes.SCT.Laterality, _cwe(LATERALITY_CODES[f.laterality]), "", ""))
    if f.grade is not None:
        rows.append(("CWE", SpineCodes.MEYERDING_GRADE, _cwe(MEYERDING_GRADE_CODES[f.grade]), "", ""))
    for m in f.measurements:
        rows.append(("NM", MEASUREMENT_CODES[m.type], f"{m.value:g}", _cwe(unit_code(m.unit)), ""))
    return rows


def build_oru(
    measurement_sr: pydicom.Dataset,
    narrative_sr: pydicom.Dataset | None,
    *,
    sending_application: str = "SPINEMED",
    sending_facility: str | None = None,
    receiving_application: str | None = None,
    receiving_facility: str | None = None,
    control_id: str | None = None,
    now: datetime | None = None,
) -> str:
    """The ORU^R01 (v2.5.1, ER7 with ``\\r`` segment ends) of one report, validated against the standard.

    Parameters
    ----------
    measurement_sr
        Our TID 1500 Comprehensive 3D SR.
    narrative_sr
        Our narrative SR of the same report, if any (its sections become TX observations).
    sending_application, sending_facility, receiving_application, receiving_facility
        MSH-3 to MSH-6.
    control_id
        MSH-10 (at most 20 characters); a new random one if not given.
    now
        MSH-7 (default: now, UTC).

    Raises
    ------
    TypeError
        ``measurement_sr`` or ``narrative_sr`` is not a pydicom Dataset.
    ValueError
        ``measurement_sr`` is not a SpineMed measurement report, or ``control_id`` is too long; or the
        message fails the standard's structure (hl7apy strict validation).
    """
    if not isinstance(measurement_sr, pydicom.Dataset):
        raise TypeError(f"measurement_sr: expected a pydicom Dataset, got {type(measurement_sr).__name__}")
    if narrative_sr is not None and not isinstance(narrative_sr, pydicom.Dataset):
        raise TypeError(f"narrative_sr: expected a pydicom Dataset, got {type(narrative_sr).__name__}")
    control_id = control_id or uuid.uuid4().hex[:_MAX_CONTROL_ID]
    if len(control_id) > _MAX_CONTROL_ID:
        raise ValueError(f"control_id: at most {_MAX_CONTROL_ID} characters")
    try:
        report = read_measurement_report(measurement_sr)
    except (KeyError, ValueError, AttributeError) as exc:
        raise ValueError(f"measurement_sr: not a SpineMed measurement report ({type(exc).__name__})") from exc
    sr = measurement_sr
    order = _order(sr)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    status = "F" if str(sr.get("VerificationFlag", "")) == "VERIFIED" else "P"

    content_dt = _dt(sr.get("ContentDate"), sr.get("ContentTime")) or stamp
    issuer = _escape(str(sr.get("IssuerOfPatientID", "") or ""))
    sex = str(sr.get("PatientSex", "") or "")
    if not report.procedure_reported:
        raise ValueError("measurement_sr: no procedure reported")
    proc = report.procedure_reported[0]
    segments: list[list[str]] = [
        ["MSH", "^~\\&", _escape(sending_application), _escape(sending_facility or ""),
         _escape(receiving_application or ""), _escape(receiving_facility or ""), stamp, "",
         "ORU^R01^ORU_R01", control_id, "P", "2.5.1", "", "", "", "", "", "UNICODE UTF-8"],
        ["PID", "1", "", _escape(str(sr.get("PatientID", "") or "")) + (f"^^^{issuer}" if issuer else ""), "",
         _xpn(sr.get("PatientName")) or '""', "", str(sr.get("PatientBirthDate", "") or ""),
         sex if sex in ("M", "F", "O") else ""],
        ["ORC", "RE", _escape(order.placer), _escape(order.filler), "", "CM"],
        ["OBR", "1", _escape(order.placer), _escape(order.filler),
         _cwe(Code(proc.value, proc.scheme_designator, proc.meaning)), "", "",
         _dt(sr.get("StudyDate"), sr.get("StudyTime")), "", "", "", "", "", "", "", "", "", "",
         _escape(order.accession), _escape(order.requested_procedure_id), "", "", content_dt, "", "RAD", status],
    ]
    rows: list[tuple[str, str, str, str, str, str]] = [
        ("RP", _cwe(DIAGNOSTIC_IMAGING_STUDY), "", f"{sr.SOPInstanceUID}^SPINEMED^AP^DICOM", "", ""),
        ("HD", _cwe(codes.DCM.StudyInstanceUID), "", f"^{sr.StudyInstanceUID}^ISO", "", ""),
    ]
    for n, finding in enumerate(report.findings, start=1):
        for vtype, concept, value, units, flag in _finding_obx(finding):
            rows.append((vtype, _cwe(concept), str(n), value, units, flag))
    for heading, paragraphs in coded_narrative_sections(narrative_sr) if narrative_sr is not None else []:
        rows.append(("TX", _cwe(heading), "", "~".join(_escape(p) for p in paragraphs), "", ""))
    for seq, (vtype, ident, sub_id, value, units, flag) in enumerate(rows, start=1):
        segments.append(["OBX", str(seq), vtype, ident, sub_id, value, units, "", flag, "", "", status, "", "",
                         content_dt])
    er7 = "\r".join("|".join(fields).rstrip("|") for fields in segments)
    try:  # parsed back by hl7apy: segments, groups, cardinalities and required fields of ORU_R01 2.5.1
        parse_message(er7, validation_level=VALIDATION_LEVEL.TOLERANT).validate()
    except Exception as exc:  # hl7apy raises its own tree; its message names the element, never a value
        raise ValueError(f"the ORU^R01 fails the v2.5.1 structure: {type(exc).__name__}: {exc}") from exc
    return er7


# ---------------------------------------------------------------------------------------------- sending
@dataclass(frozen=True)
class Acknowledgement:
    """What the receiver answered: MSA-1 (``AA``/``AE``/``AR``, or ``CA``/``CE``/``CR``), MSA-2, its text."""

    code: str
    control_id: str
    text: str

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")


def parse_ack(message: str) -> Acknowledgement:
    """The MSA of an ACK; its text from MSA-3, else the first ERR's user message (ERR-8) or diagnostics (ERR-7).

    Raises
    ------
    ValueError
        ``message`` is not an HL7 v2 message with an MSA segment.
    """
    try:
        parsed = hl7.parse(message)
        msa = parsed.segment("MSA")
    except (KeyError, IndexError, hl7.ParseException) as exc:
        raise ValueError(f"not an HL7 acknowledgement ({type(exc).__name__})") from exc
    text = parsed.unescape(str(msa[3])) if len(msa) > 3 else ""
    errors = [seg for seg in parsed if str(seg[0]) == "ERR"]
    for err, field in ((e, f) for e in errors for f in (8, 7)):  # ERR-8 user message, ERR-7 diagnostics
        if not text and len(err) > field and str(err[field]):
            text = parsed.unescape(str(err[field]))
    return Acknowledgement(str(msa[1]), str(msa[2]) if len(msa) > 2 else "", text)


async def _exchange(host: str, port: int, message: str, timeout_s: float) -> str:
    reader, writer = await asyncio.wait_for(hl7.mllp.open_hl7_connection(host, port, encoding="utf-8"), timeout_s)
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.writemessage(message)
        await asyncio.wait_for(writer.drain(), timeout_s)
        answer = await asyncio.wait_for(reader.readmessage(), timeout_s)
        return str(answer)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2.0)
        except (OSError, TimeoutError) as exc:  # the answer is in hand; a slow close changes nothing
            log.debug("hl7 connection close", error=type(exc).__name__)


def report_pair(paths: Sequence[Path]) -> tuple[pydicom.Dataset, pydicom.Dataset | None]:
    """The measurement and the narrative SR among ``paths`` (DICOM files; the TID 1500 SR is required).

    Raises
    ------
    ValueError
        No TID 1500 SR among them.
    """
    measurement: pydicom.Dataset | None = None
    narrative: pydicom.Dataset | None = None
    for path in paths:
        ds = pydicom.dcmread(path)
        if str(ds.SOPClassUID) == _COMPREHENSIVE_3D_SR:
            measurement = ds
        elif str(ds.get("Modality", "")) == "SR":
            narrative = ds
    if measurement is None:
        raise ValueError("no measurement report (TID 1500 SR) among the objects")
    return measurement, narrative


_COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def send_files_hl7(dest: DestinationConfig, paths: Sequence[Path], *, timeout_s: float = 60.0) -> list[SendResult]:
    """Send one report (its SR files in ``paths``) to ``dest`` as one ORU^R01 and read the ACK.

    Every path gets the same outcome.  Never raises for a network or receiver failure: the reason is in
    the results (see the module docstring for what is permanent).
    """
    uids = []
    for path in paths:
        try:
            uids.append(str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                            .SOPInstanceUID))
        except (OSError, AttributeError, pydicom.errors.InvalidDicomError):
            uids.append("")

    def outcome(delivered: bool, error: str | None, permanent: bool = False) -> list[SendResult]:
        return [SendResult(p, u, delivered, None, error, permanent) for p, u in zip(paths, uids, strict=True)]

    if dest.type != "hl7" or dest.host is None or dest.port is None:
        return outcome(False, f"{dest.type} destination: not an HL7 destination", True)
    try:
        measurement, narrative = report_pair(paths)
        control_id = uuid.uuid4().hex[:_MAX_CONTROL_ID]
        message = build_oru(
            measurement, narrative, sending_application=dest.hl7_sending_application,
            sending_facility=dest.hl7_sending_facility, receiving_application=dest.hl7_receiving_application,
            receiving_facility=dest.hl7_receiving_facility, control_id=control_id,
        )
    except (OSError, ValueError, AttributeError, KeyError, pydicom.errors.InvalidDicomError) as exc:
        return outcome(False, f"cannot build the ORU^R01: {type(exc).__name__}: {exc}"[:500], True)
    try:
        answer = asyncio.run(_exchange(dest.host, dest.port, message, timeout_s))
    except TimeoutError:
        return outcome(False, f"HL7: no acknowledgement within {timeout_s:g} s")
    except (OSError, asyncio.IncompleteReadError, hl7.mllp.InvalidBlockError) as exc:
        return outcome(False, f"HL7: {type(exc).__name__}: {exc}"[:300])
    try:
        ack = parse_ack(answer)
    except ValueError as exc:
        return outcome(False, f"HL7: the answer is {exc}")
    if ack.control_id != control_id:
        return outcome(False, "HL7: the acknowledgement answers another message (MSA-2 differs)")
    if not ack.accepted:
        why = f": {ack.text}" if ack.text else ""
        log.warning("hl7 message not accepted", destination=dest.name, ack=ack.code)
        return outcome(False, f"HL7 {ack.code}{why}"[:500])
    log.info("hl7 message accepted", destination=dest.name, objects=len(paths))
    return outcome(True, None)


def probe_hl7(dest: DestinationConfig, *, timeout_s: float = 10.0) -> tuple[bool, str]:
    """Whether the MLLP port accepts a connection (for ``spinemed-node echo`` and ``doctor``); sends nothing."""
    if dest.type != "hl7" or dest.host is None or dest.port is None:
        return False, f"{dest.type} destination: not an HL7 destination"
    try:
        with socket.create_connection((dest.host, dest.port), timeout=timeout_s):
            return True, "MLLP port accepts connections (no message sent)"
    except OSError as exc:
        return False, f"cannot connect: {type(exc).__name__}: {exc}"[:300]
