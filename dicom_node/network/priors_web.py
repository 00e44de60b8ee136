"""Prior studies from a DICOMweb PACS: QIDO-RS to find them, WADO-RS to fetch our reports of them.

The DICOMweb twin of :mod:`dicom_node.network.priors` (same arguments, same answers, same
:class:`~dicom_node.network.priors.PriorsError`), for a ``[priors] source`` of ``type = "dicomweb"``:

* ``GET {url}/studies?PatientID=…&StudyDate=YYYYMMDD-YYYYMMDD&includefield=…`` — the patient's studies;
  each answer is checked again on our side (:func:`~dicom_node.network.priors.select_priors`);
* ``GET {url}/studies/{study}/series?includefield=BodyPartExamined`` — the region of each candidate;
* ``GET {url}/studies/{study}/series?Modality=SR`` and ``…/series/{series}/instances?SOPClassUID=…`` —
  the Comprehensive 3D SR instances of a prior;
* ``GET {url}/studies/{study}/series/{series}/instances/{instance}`` (WADO-RS, ``application/dicom``) —
  each; written only when it is ours (:func:`~dicom_node.network.priors.is_our_report`).

HTTP basic auth as for STOW-RS (``username`` + ``password_env``); dicomweb-client does the requests, its own
retries off (a failed prior is reported, not retried: the report goes out without comparison).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from dicom_node.config import DestinationConfig
from dicom_node.network.priors import (
    COMPREHENSIVE_3D_SR,
    PriorsError,
    PriorStudy,
    check_find_arguments,
    image_series_body_parts,
    is_our_report,
    select_priors,
    write_report,
)

__all__ = ["fetch_prior_reports_web", "find_prior_studies_web"]

_T = TypeVar("_T")

_STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "ModalitiesInStudy", "StudyDescription",
                 "PatientID", "IssuerOfPatientID")


@contextmanager
def _client(peer: DestinationConfig, timeout_s: float, what: str) -> Iterator[DICOMwebClient]:
    if not isinstance(peer, DestinationConfig):
        raise TypeError(f"peer: expected DestinationConfig, got {type(peer).__name__}")
    if peer.type != "dicomweb" or not peer.url:
        raise ValueError(f"peer: {peer.name} must be a dicomweb destination with a url")
    session = requests.Session()
    if peer.username:
        password = os.environ.get(peer.password_env or "") if peer.password_env else ""
        if password is None:
            raise PriorsError(f"{what}: password environment variable {peer.password_env} is not set")
        session.auth = (peer.username, password)
    try:
        client = DICOMwebClient(peer.url.rstrip("/"), session=session, timeout=timeout_s)
        client.set_http_retry_params(retry=False)
        yield client
    finally:
        session.close()


def _call(peer: DestinationConfig, what: str, timeout_s: float, fn: Callable[[], _T]) -> _T:
    """Run one DICOMweb request; its failure becomes a :class:`PriorsError` naming the HTTP answer."""
    try:
        return fn()
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        reason = exc.response.reason if exc.response is not None else ""
        raise PriorsError(f"{what}: {peer.name} answered HTTP {code} {reason}".rstrip()) from exc
    except requests.Timeout as exc:
        raise PriorsError(f"{what}: no answer from {peer.name} within {timeout_s:g} s") from exc
    except requests.RequestException as exc:
        raise PriorsError(f"{what}: {peer.name} unreachable ({type(exc).__name__})") from exc
    except ValueError as exc:  # an answer dicomweb-client cannot decode
        raise PriorsError(f"{what}: unreadable answer from {peer.name} ({type(exc).__name__})") from exc


def _datasets(items: list[dict[str, Any]]) -> list[Dataset]:
    return [Dataset.from_json(item) for item in items]


def find_prior_studies_web(
    peer: DestinationConfig,
    *,
    patient_id: str,
    issuer_of_patient_id: str | None,
    current_study_uid: str,
    current_date: _dt.date | None,
    region: str | None,
    max_count: int,
    max_age_days: int,
    timeout_s: float = 30.0,
) -> list[PriorStudy]:
    """:func:`dicom_node.network.priors.find_prior_studies` over QIDO-RS (same parameters but the AE).

    Raises
    ------
    PriorsError
        The server was unreachable, slow, or answered an HTTP error.
    ValueError
        An argument out of range, or ``peer`` not a dicomweb destination.
    """
    check_find_arguments(patient_id, region, max_count, max_age_days)
    what = "prior study query"
    with _client(peer, timeout_s, what) as client:
        if max_count == 0:
            return []
        earliest = None if current_date is None else current_date - _dt.timedelta(days=max_age_days)
        filters: dict[str, Any] = {"PatientID": patient_id}
        if issuer_of_patient_id:
            filters["IssuerOfPatientID"] = issuer_of_patient_id
        if current_date is not None:
            filters["StudyDate"] = f"{earliest:%Y%m%d}-{current_date:%Y%m%d}"
        studies = _call(peer, what, timeout_s, lambda: client.search_for_studies(
            fields=list(_STUDY_FIELDS), search_filters=filters, get_remaining=True))

        def body_parts(study_uid: str) -> tuple[str, ...]:
            series = _call(peer, "prior series query", timeout_s, lambda: client.search_for_series(
                study_instance_uid=study_uid, fields=["Modality", "BodyPartExamined"], get_remaining=True))
            return image_series_body_parts(_datasets(series))

        return select_priors(_datasets(studies), patient_id=patient_id, issuer_of_patient_id=issuer_of_patient_id,
                             current_study_uid=current_study_uid, current_date=current_date, earliest=earliest,
                             region=region, max_count=max_count, body_parts=body_parts)


def fetch_prior_reports_web(
    peer: DestinationConfig, study_instance_uid: str, dest_dir: Path, *, timeout_s: float = 60.0
) -> list[Path]:
    """:func:`dicom_node.network.priors.fetch_prior_reports` over QIDO-RS + WADO-RS.

    Returns
    -------
    list of Path
        Our TID 1500 SRs of the study written to ``dest_dir``, newest Content Date/Time first.

    Raises
    ------
    PriorsError
        The server was unreachable, slow, answered an HTTP error, or a report could not be written.
    """
    what = "prior report retrieve"
    dest_dir = Path(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PriorsError(f"{what}: cannot create {dest_dir}: {exc.strerror or exc}") from exc
    written: dict[str, tuple[str, Path]] = {}
    with _client(peer, timeout_s, what) as client:
        series = _datasets(_call(peer, "prior report series query", timeout_s, lambda: client.search_for_series(
            study_instance_uid=study_instance_uid, search_filters={"Modality": "SR"},
            fields=["Modality"], get_remaining=True)))
        for s in series:
            series_uid = str(s.get("SeriesInstanceUID", ""))
            if not series_uid or str(s.get("Modality", "SR")).upper() not in ("", "SR"):
                continue
            instances = _datasets(_call(peer, "prior report instance query", timeout_s,
                                        lambda su=series_uid: client.search_for_instances(  # type: ignore[misc]
                                            study_instance_uid=study_instance_uid, series_instance_uid=su,
                                            search_filters={"SOPClassUID": COMPREHENSIVE_3D_SR},
                                            fields=["SOPClassUID"], get_remaining=True)))
            for inst in instances:
                sop = str(inst.get("SOPInstanceUID", ""))
                if not sop or str(inst.get("SOPClassUID", COMPREHENSIVE_3D_SR)) != COMPREHENSIVE_3D_SR:
                    continue
                ds = _call(peer, what, timeout_s, lambda su=series_uid, i=sop: client.retrieve_instance(  # type: ignore[misc]
                    study_instance_uid, su, i))
                if str(ds.get("StudyInstanceUID", "")) != study_instance_uid or not is_our_report(ds):
                    continue  # another vendor's SR: read, never written
                try:
                    uid, when, path = write_report(ds, dest_dir)
                except (ValueError, OSError) as exc:
                    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                    raise PriorsError(f"{what}: cannot write a report into the destination folder: {detail}") from exc
                written[uid] = (when, path)
    ordered = sorted(written.items(), key=lambda kv: (kv[1][0], kv[0]), reverse=True)
    return [path for _, (_, path) in ordered]
