"""Prior studies from the site's PACS: find a patient's earlier spine studies and fetch our SRs of them.

Follow-up imaging is read against the earlier studies.  This module is the query/retrieve SCU that finds
them; comparing is someone else's job.

* :func:`find_prior_studies` — a Study Root C-FIND at STUDY level (Patient ID, Issuer of Patient ID when
  known, a Study Date range ending at the current study's date), then one SERIES-level C-FIND per
  candidate for Body Part Examined.  The current study, later studies, studies of results only
  (SR/KO/DOC/OT/PR without images) and, when a region is given, studies that clearly show another spine
  region are dropped; newest first.
* :func:`fetch_prior_reports` — SERIES-level C-FIND for SR series of one study, IMAGE-level C-FIND for
  the Comprehensive 3D SRs in them, and a C-GET per instance over the same association (we take the
  Storage SCP role for Comprehensive 3D SR).  Only our TID 1500 measurement reports are written to disk.

Every association sets TCP_NODELAY and takes its ACSE, DIMSE, network and TCP connect timeouts from
``timeout_s``.  The peer is a ``[[destinations]]`` entry of type ``dicom`` (AE title, host, port, TLS).
Failures raise :class:`PriorsError` whose message says what failed (association result, DIMSE status in
hex, sub-operation counts) and never carries a patient identifier or a UID.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from dicom_node.config import DestinationConfig
from dicom_node.errors import NodeError
from dicom_node.network.association import STATUS_SUCCESS, RequestWatch, nodelay_handlers
from dicom_node.network.tls import client_tls_args

__all__ = [
    "PriorStudy",
    "PriorsError",
    "check_find_arguments",
    "dicom_date",
    "fetch_prior_reports",
    "find_prior_studies",
    "image_series_body_parts",
    "is_our_report",
    "select_priors",
    "study_region",
    "write_report",
]

#: C-FIND / C-GET pending statuses (PS3.4 C.4.1.1.4, C.4.3.1.4).
_PENDING = frozenset({0xFF00, 0xFF01})
#: C-GET "sub-operations complete, one or more failures or warnings".
_GET_WARNING = 0xB000
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
#: What our SRs carry (``sr_templates.builder``): the series description is fixed, the manufacturer is the
#: default of ``OutputOptions.manufacturer``.
OUR_SERIES_DESCRIPTION = "SpineMed AI results"
OUR_MANUFACTURER = "SpineMed"
#: Modalities of images a spine study is read from; a study with only other modalities (SR, KO, DOC,
#: OT, PR: results and notes, ours included) is not a prior study.
IMAGE_MODALITIES = frozenset({"MR", "CT", "CR", "DX"})
REGIONS = ("cervical", "thoracic", "lumbar", "whole")

#: Body Part Examined defined terms (PS3.16 Annex L) → the spine regions they show.
_BODY_PART_REGIONS: dict[str, frozenset[str]] = {
    "CSPINE": frozenset({"cervical"}),
    "TSPINE": frozenset({"thoracic"}),
    "LSPINE": frozenset({"lumbar"}),
    "SSPINE": frozenset({"lumbar"}),
    "LSSPINE": frozenset({"lumbar"}),
    "SACRUM": frozenset({"lumbar"}),
    "COCCYX": frozenset({"lumbar"}),
    "CTSPINE": frozenset({"cervical", "thoracic"}),
    "TLSPINE": frozenset({"thoracic", "lumbar"}),
    "SPINE": frozenset({"whole"}),
    "WHOLESPINE": frozenset({"whole"}),
    "WHOLEBODY": frozenset({"whole"}),
}
#: Words of a study description that name a region (English and the German abbreviations HWS/BWS/LWS).
_DESCRIPTION_REGIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(cervical|c-?spine|hws)\b", re.I), "cervical"),
    (re.compile(r"\b(thoracic|dorsal|t-?spine|bws)\b", re.I), "thoracic"),
    (re.compile(r"\b(lumbar|lumbosacral|l-?spine|lws|sacrum|sacral)\b", re.I), "lumbar"),
    (re.compile(r"\b(whole|full|entire|total)[ -]?spine\b|\bscoliosis\b|\bganzwirbels", re.I), "whole"),
)
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class PriorsError(NodeError):
    """The PACS could not be queried or could not deliver (unreachable, rejected, a failure status).

    Marked transient: a PACS that is down or busy now may answer later.  The message names the operation
    and the peer's answer, never a patient or a UID.
    """

    transient = True


@dataclass(frozen=True)
class PriorStudy:
    """One earlier study of the patient, as the PACS describes it.

    Attributes
    ----------
    study_instance_uid : str
        Its Study Instance UID.
    study_date : datetime.date or None
        Study Date (``None``: absent or unreadable).
    modalities : tuple of str
        Modalities in Study, as the PACS returned them.
    description : str
        Study Description ("" when absent).
    body_parts : tuple of str
        Body Part Examined of its series (SERIES-level C-FIND), upper case, without repeats; may be empty.
    """

    study_instance_uid: str
    study_date: _dt.date | None
    modalities: tuple[str, ...]
    description: str
    body_parts: tuple[str, ...]


# ---------------------------------------------------------------------------------------------- helpers
def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    items = value if isinstance(value, MultiValue | list | tuple) else [value]
    return tuple(s for s in (str(v).strip().upper() for v in items) if s)


def dicom_date(value: str) -> _dt.date | None:
    """A DA value (``YYYYMMDD``, extra characters ignored) as a date; ``None`` when absent or unreadable."""
    try:
        return _dt.datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _regions(body_parts: tuple[str, ...], description: str) -> frozenset[str]:
    """The spine regions a study shows, from its body parts and its description (empty: unknown)."""
    found: set[str] = set()
    for part in body_parts:
        found |= _BODY_PART_REGIONS.get(part.replace(" ", "").replace("-", ""), frozenset())
    for pattern, name in _DESCRIPTION_REGIONS:
        if pattern.search(description):
            found.add(name)
    return frozenset(found)


def study_region(body_parts: tuple[str, ...], description: str) -> str | None:
    """The region of a study for :func:`find_prior_studies`: the one region its body parts and description
    name, ``"whole"`` for the whole spine or several regions, ``None`` when they name none."""
    shown = _regions(tuple(p.strip().upper() for p in body_parts if p.strip()), description)
    if not shown:
        return None
    if len(shown) > 1 or "whole" in shown:
        return "whole"
    (only,) = shown
    return only


def _region_matches(region: str | None, shown: frozenset[str]) -> bool:
    """Whether a study showing ``shown`` can be a prior of a study of ``region``; unknown counts as yes."""
    if region is None or region == "whole" or not shown or "whole" in shown:
        return True
    return region in shown


def _check_peer(peer: DestinationConfig) -> tuple[str, int, str]:
    if not isinstance(peer, DestinationConfig):
        raise TypeError(f"peer: expected DestinationConfig, got {type(peer).__name__}")
    if peer.type != "dicom" or peer.host is None or peer.port is None or peer.ae_title is None:
        raise PriorsError(f"destination {peer.name!r}: a priors source must be a dicom destination "
                          "(ae_title, host, port)")
    return peer.host, peer.port, peer.ae_title


def _ae(calling_ae: str, timeout_s: float) -> AE:
    if not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise ValueError(f"timeout_s: must be a positive number, got {timeout_s!r}")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def _associate(ae: AE, peer: DestinationConfig, what: str, *, ext_neg: list[Any] | None = None,
               handlers: list[Any] | None = None) -> Association:
    """An established association to ``peer``, or :class:`PriorsError` saying why not."""
    host, port, called = _check_peer(peer)
    watch = RequestWatch()
    try:
        assoc = ae.associate(host, port, ae_title=called, ext_neg=ext_neg,
                             evt_handlers=[*nodelay_handlers(), *watch.handlers(), *(handlers or [])],
                             tls_args=client_tls_args(peer))
    except (OSError, RuntimeError, ValueError) as exc:
        raise PriorsError(f"{what}: cannot associate with {peer.name}: {exc}") from exc
    if assoc.is_established:
        return assoc
    raise PriorsError(f"{what}: {watch.why_not(assoc, peer.name)}")


def _require_context(assoc: Association, sop_class: str, what: str, peer: DestinationConfig,
                     *, scp_role: bool = False) -> None:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == sop_class and (not scp_role or cx.as_scp):
            return
    name = uid.UID(sop_class).name
    raise PriorsError(f"{what}: {peer.name} did not accept {name}"
                      f"{' with us as Storage SCP (C-GET)' if scp_role else ''}")


def _no_response(assoc: Association, service: str, waited_s: float) -> str:
    """Why a DIMSE request got no response: the peer aborted (well before the timeout) or the timeout."""
    timeout = float(assoc.dimse_timeout or 0)
    if waited_s < timeout - 0.5:
        return (f"{service} refused: the peer aborted the association (does it know our AE title and "
                f"allow us {service}?)")
    return f"no {service} response within {timeout:g} s"


def _responses(assoc: Association, replies: Iterator[tuple[Dataset, Dataset | None]], service: str,
               what: str) -> Iterator[tuple[int, Dataset, Dataset | None]]:
    """``(status code, status, identifier)`` of each response; a missing response raises."""
    while True:
        started = time.monotonic()
        try:
            status, identifier = next(replies)
        except StopIteration:
            raise PriorsError(f"{what}: {service} ended without a final status (association lost)") from None
        if status is None or "Status" not in status:
            raise PriorsError(f"{what}: {_no_response(assoc, service, time.monotonic() - started)}")
        yield int(status.Status), status, identifier


def _find(assoc: Association, query: Dataset, what: str) -> Iterator[Dataset]:
    """The identifiers of one C-FIND, each status checked."""
    replies = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
    for code, _, identifier in _responses(assoc, replies, "C-FIND", what):
        if code in _PENDING:
            if identifier is not None:
                yield identifier
            continue
        if code == STATUS_SUCCESS:
            return
        raise PriorsError(f"{what}: C-FIND failed with status 0x{code:04X}")


def _release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()


# ---------------------------------------------------------------------------------------------- find
def check_find_arguments(patient_id: str, region: str | None, max_count: int, max_age_days: int) -> None:
    """The argument checks of :func:`find_prior_studies` (shared with the DICOMweb variant)."""
    if not patient_id or not patient_id.strip():
        raise ValueError("patient_id: must not be empty")
    if region is not None and region not in REGIONS:
        raise ValueError(f"region: expected one of {', '.join(REGIONS)} or None, got {region!r}")
    if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 0:
        raise ValueError(f"max_count: must be an int >= 0, got {max_count!r}")
    if isinstance(max_age_days, bool) or not isinstance(max_age_days, int) or max_age_days < 0:
        raise ValueError(f"max_age_days: must be an int >= 0, got {max_age_days!r}")


def select_priors(
    idents: Iterable[Dataset],
    *,
    patient_id: str,
    issuer_of_patient_id: str | None,
    current_study_uid: str,
    current_date: _dt.date | None,
    earliest: _dt.date | None,
    region: str | None,
    max_count: int,
    body_parts: Callable[[str], tuple[str, ...]],
) -> list[PriorStudy]:
    """The priors among STUDY-level answers (C-FIND identifiers or QIDO-RS results), newest first.

    Each answer is checked again on our side (a PACS may ignore a key); ``body_parts(study_uid)`` asks the
    PACS for a candidate's series, newest first, until ``max_count`` are kept.
    """
    candidates: list[tuple[tuple[int, str, str], Dataset]] = []
    seen: set[str] = set()
    for ident in idents:
        study_uid = _text(ident, "StudyInstanceUID")
        if not study_uid or study_uid == current_study_uid or study_uid in seen:
            continue
        if _text(ident, "PatientID") not in ("", patient_id):
            continue  # a PACS that ignored the key
        issuer = _text(ident, "IssuerOfPatientID")
        if issuer_of_patient_id and issuer and issuer != issuer_of_patient_id:
            continue
        day = dicom_date(_text(ident, "StudyDate"))
        if current_date is not None and (day is None or day > current_date
                                         or (earliest is not None and day < earliest)):
            continue  # a PACS that ignored the range, or an undated study we cannot place
        modalities = _values(ident, "ModalitiesInStudy")
        if modalities and not IMAGE_MODALITIES.intersection(modalities):
            continue  # results or notes only (our own SR series among them)
        seen.add(study_uid)
        order = (day.toordinal() if day is not None else 0, _text(ident, "StudyTime"), study_uid)
        candidates.append((order, ident))
    candidates.sort(key=lambda c: c[0], reverse=True)

    priors: list[PriorStudy] = []
    for _, ident in candidates:
        if len(priors) >= max_count:
            break
        study_uid = _text(ident, "StudyInstanceUID")
        parts = body_parts(study_uid)
        description = _text(ident, "StudyDescription")
        if not _region_matches(region, _regions(parts, description)):
            continue
        priors.append(PriorStudy(
            study_instance_uid=study_uid,
            study_date=dicom_date(_text(ident, "StudyDate")),
            modalities=_values(ident, "ModalitiesInStudy"),
            description=description,
            body_parts=parts,
        ))
    return priors


def image_series_body_parts(series: Iterable[Dataset]) -> tuple[str, ...]:
    """Body Part Examined of the image series among SERIES-level answers, in answer order."""
    parts: list[str] = []
    for ident in series:
        modality = _text(ident, "Modality").upper()
        if modality and modality not in IMAGE_MODALITIES:
            continue  # an SR's or a note's body part says nothing about the images
        for part in _values(ident, "BodyPartExamined"):
            if part not in parts:
                parts.append(part)
    return tuple(parts)


def find_prior_studies(
    peer: DestinationConfig,
    *,
    patient_id: str,
    issuer_of_patient_id: str | None,
    current_study_uid: str,
    current_date: _dt.date | None,
    region: str | None,
    max_count: int,
    max_age_days: int,
    calling_ae: str,
    timeout_s: float = 30.0,
) -> list[PriorStudy]:
    """The patient's earlier studies on ``peer``, newest first.

    Parameters
    ----------
    peer
        The PACS: a ``type = "dicom"`` destination (AE title, host, port, TLS settings).
    patient_id, issuer_of_patient_id
        Whose studies; the issuer is a matching key only when given.
    current_study_uid
        The study being read: never returned.
    current_date
        Its Study Date: studies dated later are dropped, and only those of the ``max_age_days`` before it
        (inclusive) are asked for.  ``None``: no date range, every other study of the patient counts.
    region
        ``"cervical"``, ``"thoracic"``, ``"lumbar"`` or ``"whole"``: drop studies whose body parts or
        description name only other regions (a study of unknown region, or of the whole spine, is kept).
        ``None``: no region filter.
    max_count
        At most this many studies (0: none, no association).
    max_age_days
        How far back, in days, from ``current_date``.
    calling_ae
        Our AE title (the PACS must know it for C-FIND).
    timeout_s
        ACSE, DIMSE, network and TCP connect timeout.

    Returns
    -------
    list of PriorStudy
        Newest first (date, then time; undated last), at most ``max_count``.

    Raises
    ------
    PriorsError
        The PACS was unreachable, rejected the association or answered a C-FIND with a failure status.
    ValueError
        ``region``, ``max_count``, ``max_age_days`` or ``timeout_s`` out of range, ``patient_id`` empty.
    """
    check_find_arguments(patient_id, region, max_count, max_age_days)
    _check_peer(peer)
    if max_count == 0:
        return []
    earliest = None if current_date is None else current_date - _dt.timedelta(days=max_age_days)

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    if issuer_of_patient_id:
        query.IssuerOfPatientID = issuer_of_patient_id
    query.StudyDate = "" if current_date is None else f"{earliest:%Y%m%d}-{current_date:%Y%m%d}"
    query.StudyTime = ""
    query.StudyInstanceUID = ""
    query.ModalitiesInStudy = ""
    query.StudyDescription = ""

    ae = _ae(calling_ae, timeout_s)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind,
                             [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian])
    assoc = _associate(ae, peer, "prior study query")
    try:
        _require_context(assoc, StudyRootQueryRetrieveInformationModelFind, "prior study query", peer)
        idents = list(_find(assoc, query, "prior study query"))
        return select_priors(idents, patient_id=patient_id, issuer_of_patient_id=issuer_of_patient_id,
                             current_study_uid=current_study_uid, current_date=current_date, earliest=earliest,
                             region=region, max_count=max_count,
                             body_parts=lambda study_uid: _series_body_parts(assoc, study_uid))
    finally:
        _release(assoc)


def _series_body_parts(assoc: Association, study_uid: str) -> tuple[str, ...]:
    """Body Part Examined of the study's image series (SERIES-level C-FIND), in answer order."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.BodyPartExamined = ""
    return image_series_body_parts(_find(assoc, query, "prior series query"))


# ---------------------------------------------------------------------------------------------- fetch
def is_our_report(ds: Dataset) -> bool:
    """A TID 1500 Comprehensive 3D SR written by the node (series description, else manufacturer)."""
    if str(ds.get("SOPClassUID", "")) != COMPREHENSIVE_3D_SR:
        return False
    templates = ds.get("ContentTemplateSequence") or []
    if not any(str(t.get("TemplateIdentifier", "")).strip() == "1500" for t in templates):
        return False
    return (_text(ds, "SeriesDescription").startswith(OUR_SERIES_DESCRIPTION)
            or _text(ds, "Manufacturer") == OUR_MANUFACTURER)


def write_report(ds: Dataset, dest_dir: Path) -> tuple[str, str, Path]:
    """Write one report of ours atomically as ``dest_dir/<SOPInstanceUID>.dcm``; returns (SOP Instance UID,
    content date+time, path).

    Raises
    ------
    ValueError
        Its SOP Instance UID is not a UID.
    OSError
        The file could not be written.
    """
    sop = str(ds.get("SOPInstanceUID", ""))
    if not _UID_RE.match(sop) or len(sop) > 64:
        raise ValueError("an SR with an invalid SOP Instance UID")
    path = dest_dir / f"{sop}.dcm"
    fd, tmp = tempfile.mkstemp(prefix=".priors-", suffix=".tmp", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sop, _text(ds, "ContentDate") + _text(ds, "ContentTime"), path


class _Receiver:
    """The Storage SCP side of our C-GETs: writes our SRs of one study to ``dest_dir`` atomically."""

    def __init__(self, dest_dir: Path, study_uid: str) -> None:
        self.dest_dir = dest_dir
        self.study_uid = study_uid
        self.written: dict[str, tuple[str, Path]] = {}  # SOP Instance UID → (content date+time, path)
        self.ignored = 0
        self.errors: list[str] = []

    def handle(self, event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except (ValueError, AttributeError, TypeError) as exc:
            self.errors.append(f"undecodable object ({type(exc).__name__})")
            return 0xC210
        if str(ds.get("StudyInstanceUID", "")) != self.study_uid or not is_our_report(ds):
            self.ignored += 1
            return STATUS_SUCCESS
        try:
            sop, when, path = write_report(ds, self.dest_dir)
        except ValueError as exc:
            self.errors.append(str(exc))
            return 0xC211
        except OSError as exc:
            self.errors.append(f"cannot write a report into the destination folder: "
                               f"{exc.strerror or type(exc).__name__}")
            return 0xA700
        self.written[sop] = (when, path)
        return STATUS_SUCCESS


def _get(assoc: Association, study_uid: str, series_uid: str, sop_uid: str, receiver: _Receiver) -> None:
    what = "prior report retrieve"
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.SOPInstanceUID = sop_uid
    replies = assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
    final: Dataset | None = None
    for code, status, _ in _responses(assoc, replies, "C-GET", what):
        if code not in _PENDING:
            final = status
            break
    if final is None:  # pragma: no cover - _responses raises rather than end without a final status
        raise PriorsError(f"{what}: C-GET ended without a final status")
    code = int(final.Status)
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    warned = int(final.get("NumberOfWarningSuboperations", 0) or 0)
    reasons = f": {'; '.join(dict.fromkeys(receiver.errors))}" if receiver.errors else ""
    if code == STATUS_SUCCESS and not failed:
        return
    if code == _GET_WARNING or (code == STATUS_SUCCESS and failed):
        raise PriorsError(f"{what}: C-GET status 0x{code:04X}, {failed} failed and {warned} warning "
                          f"sub-operation(s){reasons}")
    raise PriorsError(f"{what}: C-GET failed with status 0x{code:04X}{reasons}")


def fetch_prior_reports(
    peer: DestinationConfig,
    study_instance_uid: str,
    dest_dir: Path,
    *,
    calling_ae: str,
    timeout_s: float = 60.0,
) -> list[Path]:
    """Retrieve our TID 1500 SRs of one (prior) study from ``peer`` into ``dest_dir``.

    C-FIND finds the study's SR series, then the Comprehensive 3D SR instances in each; each is fetched
    with C-GET over the same association.  Objects that are not ours (another vendor's SR, another
    template) are received and discarded, never written.

    Parameters
    ----------
    peer
        The PACS (a ``type = "dicom"`` destination); it must allow C-FIND and C-GET for ``calling_ae``.
    study_instance_uid
        The study whose reports to fetch.
    dest_dir
        Created if missing; each report is written as ``<SOPInstanceUID>.dcm`` (atomically).
    calling_ae
        Our AE title.
    timeout_s
        ACSE, DIMSE, network and TCP connect timeout.

    Returns
    -------
    list of Path
        The files written, newest Content Date/Time first; empty when the study has no SR of ours.

    Raises
    ------
    PriorsError
        The PACS was unreachable, rejected the association or a context, a C-FIND failed, or a C-GET
        failed or reported failed sub-operations (the reasons we know, e.g. a write error, are named).
    """
    if not _UID_RE.match(study_instance_uid or ""):
        raise ValueError("study_instance_uid: not a UID")
    _check_peer(peer)
    dest_dir = Path(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PriorsError(f"prior report retrieve: cannot create {dest_dir}: {exc.strerror or exc}") from exc
    receiver = _Receiver(dest_dir, study_instance_uid)

    ae = _ae(calling_ae, timeout_s)
    syntaxes = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, syntaxes)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet, syntaxes)
    ae.requested_contexts.append(build_context(Comprehensive3DSRStorage, [
        uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
    ]))
    role = build_role(Comprehensive3DSRStorage, scp_role=True)
    assoc = _associate(ae, peer, "prior report retrieve", ext_neg=[role],
                       handlers=[(evt.EVT_C_STORE, receiver.handle)])
    try:
        _require_context(assoc, StudyRootQueryRetrieveInformationModelFind, "prior report query", peer)
        _require_context(assoc, StudyRootQueryRetrieveInformationModelGet, "prior report retrieve", peer)
        _require_context(assoc, Comprehensive3DSRStorage, "prior report retrieve", peer, scp_role=True)

        series_query = Dataset()
        series_query.QueryRetrieveLevel = "SERIES"
        series_query.StudyInstanceUID = study_instance_uid
        series_query.SeriesInstanceUID = ""
        series_query.Modality = "SR"
        series_uids = [s for s in dict.fromkeys(
            _text(i, "SeriesInstanceUID")
            for i in _find(assoc, series_query, "prior report series query")
            if _text(i, "Modality").upper() in ("", "SR")
        ) if s]

        instances: list[tuple[str, str]] = []
        for series_uid in series_uids:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = study_instance_uid
            query.SeriesInstanceUID = series_uid
            query.SOPInstanceUID = ""
            query.SOPClassUID = COMPREHENSIVE_3D_SR
            for ident in _find(assoc, query, "prior report instance query"):
                sop_class = _text(ident, "SOPClassUID")
                sop = _text(ident, "SOPInstanceUID")
                if sop and sop_class in ("", COMPREHENSIVE_3D_SR) and (series_uid, sop) not in instances:
                    instances.append((series_uid, sop))

        for series_uid, sop in instances:
            _get(assoc, study_instance_uid, series_uid, sop, receiver)
    finally:
        _release(assoc)
    ordered = sorted(receiver.written.items(), key=lambda kv: (kv[1][0], kv[0]), reverse=True)
    return [path for _, (_, path) in ordered]
