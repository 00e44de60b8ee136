"""The prior study of a study being read: found on the site's PACS, read from our own SR of it.

:func:`look_up_prior` runs in the worker before the model (network I/O, never in a DIMSE handler): it
asks the ``[priors] source`` PACS for the patient's earlier studies of the same region
(:func:`dicom_node.network.priors.find_prior_studies`), newest first, and fetches our TID 1500 SR of the
newest one that has one (:func:`~dicom_node.network.priors.fetch_prior_reports`); its findings are read
back (:func:`sr_templates.read_measurement_report`), the prior is not analysed again.  Whatever fails —
the PACS down or refusing, no prior, no SpineMed report of any prior — the result says why, and the
study is reported without comparison: a prior never holds a report back.
"""

from __future__ import annotations

import datetime as _dt
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.config import NodeConfig
from dicom_node.log import get_logger
from dicom_node.network.priors import (
    PriorsError,
    dicom_date,
    fetch_prior_reports,
    find_prior_studies,
    study_region,
)
from dicom_node.network.priors_web import fetch_prior_reports_web, find_prior_studies_web
from inference.comparison import PriorReport
from inference.study import Study
from sr_templates import read_measurement_report

__all__ = ["PriorLookup", "look_up_prior", "study_date"]

log = get_logger(__name__)


@dataclass(frozen=True)
class PriorLookup:
    """The prior report to compare with, or why there is none (exactly one is set)."""

    report: PriorReport | None
    reason: str | None = None

    def __post_init__(self) -> None:
        if (self.report is None) == (self.reason is None):
            raise ValueError("report, reason: exactly one must be given")


def study_date(study: Study) -> _dt.date | None:
    """The Study Date of ``study``, or ``None`` when absent or unreadable."""
    return dicom_date(study.study_date)


def look_up_prior(config: NodeConfig, study: Study) -> PriorLookup | None:
    """Find the prior to compare ``study`` with; ``None`` when ``[priors]`` is off.

    Never raises for what the PACS does: its errors become the :attr:`PriorLookup.reason` (which names
    the step and the peer's answer, never a patient or a UID).
    """
    source = config.priors_source
    if source is None:
        return None
    cfg = config.priors
    if not study.patient_id.strip():
        return PriorLookup(None, "the study has no Patient ID")
    calling_ae = config.export.calling_ae_title or config.node.ae_title
    current = study_date(study)
    region = study_region(tuple(s.body_part_examined for s in study.series), study.study_description)
    web = source.type == "dicomweb"
    try:
        if web:
            candidates = find_prior_studies_web(
                source, patient_id=study.patient_id.strip(), issuer_of_patient_id=None,
                current_study_uid=study.study_instance_uid, current_date=current, region=region,
                max_count=cfg.max_count, max_age_days=cfg.max_age_days, timeout_s=cfg.timeout_s,
            )
        else:
            candidates = find_prior_studies(
                source, patient_id=study.patient_id.strip(), issuer_of_patient_id=None,
                current_study_uid=study.study_instance_uid, current_date=current, region=region,
                max_count=cfg.max_count, max_age_days=cfg.max_age_days, calling_ae=calling_ae,
                timeout_s=cfg.timeout_s,
            )
    except PriorsError as exc:
        log.warning("prior studies not available", error=str(exc))
        return PriorLookup(None, str(exc))
    if not candidates:
        return PriorLookup(None, f"no prior study of this region within {cfg.max_age_days} days on {source.name}")
    (config.node.data_dir / "tmp").mkdir(parents=True, exist_ok=True)
    for prior in candidates:  # newest first
        with tempfile.TemporaryDirectory(prefix="prior-", dir=config.node.data_dir / "tmp") as tmp:
            try:
                if web:
                    paths = fetch_prior_reports_web(source, prior.study_instance_uid, Path(tmp),
                                                    timeout_s=cfg.timeout_s)
                else:
                    paths = fetch_prior_reports(source, prior.study_instance_uid, Path(tmp),
                                                calling_ae=calling_ae, timeout_s=cfg.timeout_s)
            except PriorsError as exc:
                log.warning("prior report not available", error=str(exc))
                return PriorLookup(None, str(exc))
            for path in paths:  # newest first: a corrected revision before the first
                try:
                    ds = pydicom.dcmread(path)
                    back = read_measurement_report(ds)
                except (InvalidDicomError, OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
                    log.warning("a prior report could not be read", error=type(exc).__name__)
                    continue
                report = PriorReport(
                    study_instance_uid=prior.study_instance_uid,
                    study_date=prior.study_date,
                    sop_class_uid=str(ds.SOPClassUID),
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    findings=tuple(back.findings),
                )
                log.info("prior report found", prior_findings=len(report.findings),
                         interval_days=(current - prior.study_date).days if current and prior.study_date else None)
                return PriorLookup(report)
    n = len(candidates)
    return PriorLookup(None, f"{n} prior stud{'y' if n == 1 else 'ies'} found, none with a SpineMed report to "
                             "compare with")
