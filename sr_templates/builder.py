"""``build_outputs``: SpineMed findings → the DICOM objects the node sends back.

1. TID 1500 Measurement Report in a Comprehensive 3D SR (one group per level).
2. Narrative report (six sections) in an Enhanced SR.
3. Optionally a labelled key image (Secondary Capture).

All three share one series per study (deterministic Series Instance UID), carry deterministic
SOP Instance UIDs (same inputs → same UIDs), VerificationFlag UNVERIFIED, Contributing Equipment
with purpose "Processing Equipment" naming our algorithm, and, for the demo model, a
"NOT FOR DIAGNOSTIC USE" statement in every object.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.valuerep import PersonName

from inference.comparison import Comparison, PriorReport, comparison_lines
from inference.findings import LevelFinding, SpineFindings, level_sort_key
from inference.study import Study
from sr_templates import uids
from sr_templates.codes import SpineCodes, coding_scheme_identification, procedure_code, spine_region
from sr_templates.comparison import comparison_items
from sr_templates.errors import ReportBuildError
from sr_templates.evidence import ResolvedEvidence, SourceIndex, requested_procedures
from sr_templates.key_image import SpineKeyImage, choose_key_image
from sr_templates.key_object import SpineKeyObjectSelection
from sr_templates.measurement_report import (
    SpineLevelEvaluation,
    SpineMeasurementReport,
    SpinePlanarROIGroup,
    algorithm_identification,
    is_localised,
)
from sr_templates.narrative import SpineNarrativeReport
from sr_templates.pdf import SpineEncapsulatedPDF, narrative_sections, render_report_pdf
from sr_templates.text import DEMO_SERIES_SUFFIX, finding_name, finding_summary, short_string

__all__ = ["SERIES_DESCRIPTION", "OutputOptions", "build_outputs"]

SERIES_DESCRIPTION = "SpineMed AI results"
KEY_IMAGE_SERIES_DESCRIPTION = "SpineMed AI key images"
KEY_OBJECT_SERIES_DESCRIPTION = "SpineMed AI key image note"
PDF_SERIES_DESCRIPTION = "SpineMed AI report (PDF)"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
_LO = 64  # VR LO maximum length


def _package_version() -> str:
    try:
        return metadata.version("spinemed-node")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.1.0"


def _check_lo(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected str{' or None' if optional else ''}, got {type(value).__name__}")
    if not value.strip() or len(value) > _LO or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"{name}: must be 1-{_LO} printable characters without backslash, got {value!r}")


@dataclass(frozen=True)
class OutputOptions:
    """Site settings for the objects :func:`build_outputs` writes.

    Raises
    ------
    TypeError
        A field has the wrong type.
    ValueError
        A field has a value DICOM cannot carry (too long, series number out of range, bad UID root).
    """

    manufacturer: str = "SpineMed"
    manufacturer_model_name: str = "spinemed-node"
    software_version: str = field(default_factory=_package_version)
    institution_name: str | None = None
    institution_department_name: str | None = None
    series_number: int = 9901  # the SR series; key image n+1, key object selection n+2, PDF n+3
    key_image: bool = True  # with its Key Object Selection document (IHE Key Image Note)
    pdf: bool = False  # an Encapsulated PDF of the narrative report and the key image
    uid_prefix: str | None = None  # site UID root; None → pydicom's root

    def __post_init__(self) -> None:
        _check_lo("manufacturer", self.manufacturer)
        _check_lo("manufacturer_model_name", self.manufacturer_model_name)
        _check_lo("software_version", self.software_version)
        _check_lo("institution_name", self.institution_name, optional=True)
        _check_lo("institution_department_name", self.institution_department_name, optional=True)
        if isinstance(self.series_number, bool) or not isinstance(self.series_number, int):
            raise TypeError(f"series_number: expected int, got {type(self.series_number).__name__}")
        if not 1 <= self.series_number <= 2**31 - 4:
            raise ValueError(f"series_number: {self.series_number} outside 1..2147483644 "
                             "(the key image, key object and PDF series take the next three numbers)")
        if not isinstance(self.key_image, bool):
            raise TypeError(f"key_image: expected bool, got {type(self.key_image).__name__}")
        if not isinstance(self.pdf, bool):
            raise TypeError(f"pdf: expected bool, got {type(self.pdf).__name__}")
        uids.check_uid_prefix(self.uid_prefix)


def _check_arguments(
    study: object,
    findings: object,
    options: object,
    revision: object,
    predecessors: object,
    created_at: object,
) -> None:
    if not isinstance(study, Study):
        raise TypeError(f"study: expected inference.study.Study, got {type(study).__name__}")
    if not isinstance(findings, SpineFindings):
        raise TypeError(f"findings: expected SpineFindings, got {type(findings).__name__}")
    if not isinstance(options, OutputOptions):
        raise TypeError(f"options: expected OutputOptions, got {type(options).__name__}")
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise TypeError(f"revision: expected int, got {type(revision).__name__}")
    if revision < 1:
        raise ValueError(f"revision: must be 1 or more, got {revision}")
    if isinstance(predecessors, pydicom.Dataset | str | bytes) or not isinstance(predecessors, Sequence):
        raise TypeError("predecessors: expected a sequence of pydicom Datasets")
    if created_at is not None and not isinstance(created_at, datetime.datetime):
        raise TypeError(f"created_at: expected datetime or None, got {type(created_at).__name__}")
    if findings.study_instance_uid != study.study_instance_uid:
        raise ValueError(
            f"findings: study_instance_uid {findings.study_instance_uid} is not the study's {study.study_instance_uid}"
        )
    if not study.instances:
        raise ValueError("study: has no instances")
    for i, pre in enumerate(predecessors):
        if not isinstance(pre, pydicom.Dataset):
            raise TypeError(f"predecessors: item {i} is a {type(pre).__name__}, not a pydicom Dataset")
        for kw in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            if kw not in pre:
                raise ValueError(f"predecessors: item {i} has no {kw}")
        if pre.StudyInstanceUID != study.study_instance_uid:
            raise ValueError(f"predecessors: item {i} belongs to another study")
    if revision == 1 and predecessors:
        raise ValueError("predecessors: revision 1 has no predecessors")
    if revision > 1 and not predecessors:
        raise ValueError(f"predecessors: revision {revision} needs the objects it replaces")


def _observation_context(findings: SpineFindings, options: OutputOptions) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(observer_device_context=_device_observer(findings, options))


def _device_observer(findings: SpineFindings, options: OutputOptions) -> hd.sr.ObserverContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids.device_observer_uid(
            findings.model, options.manufacturer, options.manufacturer_model_name, options.uid_prefix
        ),
        name=short_string(findings.model.name, _LO),
        manufacturer_name=options.manufacturer,
        model_name=options.manufacturer_model_name,
    )
    return hd.sr.ObserverContext(observer_type=codes.cid270.Device, observer_identifying_attributes=device)


def _contributing_equipment(
    findings: SpineFindings, options: OutputOptions, when: datetime.datetime
) -> list[hd.ContributingEquipment]:
    m = findings.model
    return [
        hd.ContributingEquipment(
            manufacturer=options.manufacturer,
            purpose_of_reference=SpineCodes.PROCESSING_EQUIPMENT,
            manufacturer_model_name=options.manufacturer_model_name,
            software_versions=[options.software_version, short_string(f"{m.name} {m.version}", _LO)],
            institution_name=options.institution_name,
            institutional_department_name=options.institution_department_name
            if options.institution_name is not None
            else None,
            contribution_datetime=when,
            contribution_description=(
                f"Processing algorithm: {m.name} {m.version} ({m.backend}, prompt {m.prompt_version}, "
                f"weights sha256 {m.weights_digest[:16]})" + (" - DEMO MODEL, NOT FOR CLINICAL USE" if m.demo else "")
            )[:1024],
        )
    ]


def _fix_times(ds: pydicom.Dataset, when: datetime.datetime) -> None:
    """Make the object's creation/contribution timestamps the build time (byte-identical rebuilds)."""
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S.%f")
    if "DateOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture = when.strftime("%Y%m%d")
        ds.TimeOfSecondaryCapture = when.strftime("%H%M%S.%f")
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S.%f")


def _group_by_level(
    levels: Sequence[LevelFinding], resolved: Sequence[Sequence[ResolvedEvidence]]
) -> list[tuple[str, list[LevelFinding], list[Sequence[ResolvedEvidence]]]]:
    by_level: dict[str, tuple[list[LevelFinding], list[Sequence[ResolvedEvidence]]]] = {}
    for finding, evs in zip(levels, resolved, strict=True):
        fs, es = by_level.setdefault(finding.level, ([], []))
        fs.append(finding)
        es.append(evs)
    ordered = sorted(by_level, key=level_sort_key)
    return [(lv, by_level[lv][0], by_level[lv][1]) for lv in ordered]


def _measurement_groups(
    study_uid: str,
    levels: Sequence[LevelFinding],
    resolved: Sequence[Sequence[ResolvedEvidence]],
    algorithm: hd.sr.AlgorithmIdentification,
    prefix: str | None,
) -> tuple[list[SpinePlanarROIGroup], list[SpineLevelEvaluation]]:
    """Cranio-caudal: a TID 1410 group per point of each localised finding, and an evaluation for
    every other finding (not localised, or absent)."""
    groups: list[SpinePlanarROIGroup] = []
    evaluations: list[SpineLevelEvaluation] = []
    for level, fs, es in _group_by_level(levels, resolved):
        seen: dict[str, int] = {}
        for finding, evs in zip(fs, es, strict=True):
            if not is_localised(finding, evs):
                evaluations.append(SpineLevelEvaluation(finding, evs))
                continue
            n = seen[finding.finding] = seen.get(finding.finding, 0) + 1
            name = f"{level} {finding_name(finding.finding)}" + (f" ({n})" if n > 1 else "")
            points = [ev for ev in evs if ev.point is not None or ev.point_3d is not None]
            for k, ev in enumerate(points):
                groups.append(
                    SpinePlanarROIGroup(
                        finding=finding,
                        evidence=ev,
                        tracking_uid=uids.tracking_uid(study_uid, f"{level}/{finding.finding.value}/{n}/{k}", prefix),
                        tracking_identifier=name if len(points) == 1 else f"{name} region {k + 1}",
                        algorithm=algorithm,
                        measurements=k == 0,
                    )
                )
    return groups, evaluations


def build_outputs(
    study: Study,
    findings: SpineFindings,
    options: OutputOptions = OutputOptions(),
    *,
    revision: int = 1,
    predecessors: Sequence[pydicom.Dataset] = (),
    created_at: datetime.datetime | None = None,
    comparison: Comparison | None = None,
) -> list[pydicom.Dataset]:
    """Build the SpineMed result objects for one study.

    Parameters
    ----------
    study
        The source study (instances are read from its file paths).
    findings
        The validated model answer with provenance; its study must be ``study``.
    options
        Site settings.
    revision
        1 for the first result; a corrected re-send uses the next number.
    predecessors
        For ``revision > 1``: the objects this revision replaces (SRs go into each new SR's
        Predecessor Documents Sequence, matched by SOP Class).
    created_at
        Timestamp written as content / instance creation date and time; ``None`` → now.  Give the
        job's first build time to make rebuilds byte-identical.
    comparison
        The comparison with the patient's prior study (:mod:`inference.comparison`), or why there is
        none; ``None`` when priors are not configured.  The TID 1500 SR codes each change and
        references the prior SR (Pertinent Other Evidence); the narrative's follow-up section states it.

    Returns
    -------
    list of pydicom.Dataset
        ``[Comprehensive 3D SR (TID 1500), Enhanced SR (narrative), key image (if options.key_image
        and a single-source input image exists)]``.

    Raises
    ------
    TypeError
        An argument has the wrong type (the message names it).
    ValueError
        An argument has a wrong value (the message names it): findings of another study, evidence
        referencing instances not in the study, revision/predecessors mismatch.
    sr_templates.errors.ReportBuildError
        The arguments were valid but building refused the content (highdicom's checks); a ``ValueError``.
    """
    _check_arguments(study, findings, options, revision, predecessors, created_at)
    if comparison is not None and not isinstance(comparison, Comparison):
        raise TypeError(f"comparison: expected Comparison or None, got {type(comparison).__name__}")
    try:
        return _build(study, findings, options, revision, predecessors, created_at, comparison)
    except (ValueError, TypeError) as exc:
        raise ReportBuildError(str(exc)) from exc


def _build(
    study: Study,
    findings: SpineFindings,
    options: OutputOptions,
    revision: int,
    predecessors: Sequence[pydicom.Dataset],
    created_at: datetime.datetime | None,
    comparison: Comparison | None = None,
) -> list[pydicom.Dataset]:
    when = created_at or datetime.datetime.now()
    prefix = options.uid_prefix
    index = SourceIndex(study, findings)
    levels = findings.levels
    resolved = [[index.resolve(e) for e in f.evidence] for f in levels]
    demo = findings.model.demo

    # (per-grade probabilities are left out when there are none: the UIDs of what was built before stay)
    dumped = findings.model_dump(mode="json", exclude=None if findings.grade_probabilities else {"grade_probabilities"})
    digest_parts: list[object] = [
        dumped,
        asdict(options),
        revision,
        sorted(str(p.SOPInstanceUID) for p in predecessors),
    ]
    if comparison is not None:  # (without priors the UIDs stay what they were)
        prior_uid = comparison.prior.sop_instance_uid if comparison.prior is not None else None
        digest_parts.append([comparison_lines(comparison), prior_uid])
    digest = uids.content_digest(*digest_parts)
    series_uid = uids.output_series_uid(study.study_instance_uid, prefix)
    key_series_uid = uids.output_series_uid(study.study_instance_uid, prefix, kind="key-image")
    first_instance = 2 * (revision - 1) + 1  # the two SRs of each revision, in the SR series
    description = _series_description(SERIES_DESCRIPTION, demo)
    common: dict[str, object] = {
        "series_description": description,
        "manufacturer_model_name": options.manufacturer_model_name,
        "software_versions": options.software_version,
        "content_date": when.date(),
        "content_time": when.time(),
    }

    # evidence: every referenced source instance (else the input images, else the first instance)
    referenced: list[str] = []
    for evs in resolved:
        for ev in evs:
            referenced.extend(u for u in ev.sop_instance_uids if u not in referenced)
    if not referenced:
        referenced = list(dict.fromkeys(u for im in findings.images for u in im.sop_instance_uids))
    if not referenced:
        referenced = [study.instances[0].sop_instance_uid]
    evidence = [index.header(u) for u in referenced]

    # key image
    key_image: SpineKeyImage | None = None
    if options.key_image:
        choice = choose_key_image(findings, resolved)
        if choice is not None:
            source = index.dataset(choice.sop_instance_uid)
            key_image = SpineKeyImage(
                source=source,
                frame_number=choice.frame_number,
                findings=list(zip(levels, resolved, strict=True)),
                series_instance_uid=key_series_uid,
                series_number=options.series_number + 1,
                sop_instance_uid=uids.sop_instance_uid(
                    "key-image", study.study_instance_uid, findings.model, revision, digest, prefix
                ),
                instance_number=revision,
                manufacturer=options.manufacturer,
                demo=demo,
                contributing_equipment=_contributing_equipment(findings, options, when),
                **{**common, "series_description": _series_description(KEY_IMAGE_SERIES_DESCRIPTION, demo)},
            )
            if options.institution_name is not None:
                key_image.InstitutionName = options.institution_name
                if options.institution_department_name is not None:
                    key_image.InstitutionalDepartmentName = options.institution_department_name
            _fix_times(key_image, when)
            if choice.sop_instance_uid not in referenced:
                evidence.append(index.header(choice.sop_instance_uid))

    # comparison with the prior study
    follow_up: list[str] = []
    compared: list[hd.sr.ContentItem] = []
    prior_evidence: list[pydicom.Dataset] = []
    if comparison is not None:
        follow_up = comparison_lines(comparison)
        compared = comparison_items(comparison, follow_up[1:] if comparison.prior is not None else [])
        if comparison.prior is not None:
            prior_evidence.append(_prior_reference(comparison.prior))

    # TID 1500
    algorithm = algorithm_identification(findings.model)
    groups, evaluations = _measurement_groups(study.study_instance_uid, levels, resolved, algorithm, prefix)
    modality = findings.images[0].modality if findings.images else (study.modalities or ("OT",))[0]
    region = spine_region([f.level for f in levels], [s.body_part_examined for s in study.series])
    procedure = procedure_code(modality, region)
    report = SpineMeasurementReport(
        observation_context=_observation_context(findings, options),
        procedure_reported=procedure,
        groups=groups,
        evaluations=evaluations,
        demo=demo,
        comparison=compared,
    )
    sr_kwargs: dict[str, object] = {
        "series_instance_uid": series_uid,
        "series_number": options.series_number,
        "manufacturer": options.manufacturer,
        "is_complete": True,
        "is_final": False,
        "is_verified": False,
        "institution_name": options.institution_name,
        "institutional_department_name": options.institution_department_name,
        "coding_schemes": coding_scheme_identification(),
        "requested_procedures": requested_procedures(evidence[0]),
        # the model writes free Unicode text (and the demo notice an em dash): declare UTF-8
        "specific_character_set": "ISO_IR 192",
        **common,
    }
    measurement_sr = hd.sr.Comprehensive3DSR(
        evidence=[*evidence, *prior_evidence],
        content=report,
        sop_instance_uid=uids.sop_instance_uid(
            "measurement-report", study.study_instance_uid, findings.model, revision, digest, prefix
        ),
        instance_number=first_instance,
        previous_versions=_predecessors_of(predecessors, COMPREHENSIVE_3D_SR) or None,
        contributing_equipment=_contributing_equipment(findings, options, when),
        **sr_kwargs,  # type: ignore[arg-type]
    )
    _fix_times(measurement_sr, when)

    # narrative
    level_summaries = [finding_summary(level, fs) for level, fs, _ in _group_by_level(levels, resolved)]
    narrative = SpineNarrativeReport(
        report=findings.answer.report,
        observation_context=_observation_context(findings, options),
        level_summaries=level_summaries,
        follow_up_lines=follow_up,
        key_image=key_image,
        demo=demo,
    )
    narrative_evidence = [*evidence, key_image] if key_image is not None else [*evidence]
    narrative_evidence += prior_evidence
    narrative_sr = hd.sr.EnhancedSR(
        evidence=narrative_evidence,
        content=narrative,
        sop_instance_uid=uids.sop_instance_uid(
            "narrative-report", study.study_instance_uid, findings.model, revision, digest, prefix
        ),
        instance_number=first_instance + 1,
        previous_versions=_predecessors_of(predecessors, ENHANCED_SR) or None,
        contributing_equipment=_contributing_equipment(findings, options, when),
        **sr_kwargs,  # type: ignore[arg-type]
    )
    _fix_times(narrative_sr, when)

    outputs: list[pydicom.Dataset] = [measurement_sr, narrative_sr]
    if key_image is not None:
        outputs.append(key_image)
        key_object = SpineKeyObjectSelection(
            key_image=key_image,
            sources=[index.header(str(item.ReferencedSOPInstanceUID)) for item in key_image.SourceImageSequence],
            observer_context=_device_observer(findings, options),
            description=("SpineMed AI key image" + (" (DEMO - NOT FOR DIAGNOSTIC USE)" if demo else "") + ": "
                         + "; ".join(level_summaries))[:1024],
            series_instance_uid=uids.output_series_uid(study.study_instance_uid, prefix, kind="key-object"),
            series_number=options.series_number + 2,
            sop_instance_uid=uids.sop_instance_uid(
                "key-object", study.study_instance_uid, findings.model, revision, digest, prefix
            ),
            instance_number=revision,
            manufacturer=options.manufacturer,
            institution_name=options.institution_name,
            institutional_department_name=options.institution_department_name,
            series_description=_series_description(KEY_OBJECT_SERIES_DESCRIPTION, demo),
            contributing_equipment=_contributing_equipment(findings, options, when),
            content_date=when.date(),
            content_time=when.time(),
        )
        _fix_times(key_object, when)
        outputs.append(key_object)
    if options.pdf:
        outputs.append(_pdf_report(study, findings, options, index, narrative_sr, measurement_sr, key_image,
                                   revision, digest, when))
    return outputs


def _pdf_report(
    study: Study,
    findings: SpineFindings,
    options: OutputOptions,
    index: SourceIndex,
    narrative_sr: pydicom.Dataset,
    measurement_sr: pydicom.Dataset,
    key_image: pydicom.Dataset | None,
    revision: int,
    digest: str,
    when: datetime.datetime,
) -> pydicom.Dataset:
    """The narrative SR's sections and the key image as an Encapsulated PDF, in its own series (n+3)."""
    demo = findings.model.demo
    source = index.header(study.instances[0].sop_instance_uid)
    m = findings.model
    identification = [
        ("Patient", _person(source.get("PatientName"))),
        ("Patient ID", str(source.get("PatientID", "")) or "-"),
        ("Birth date", _date(source.get("PatientBirthDate"))),
        ("Accession number", str(source.get("AccessionNumber", "")) or "-"),
        ("Study date", _date(source.get("StudyDate"))),
        ("Study", str(source.get("StudyDescription", "")) or "-"),
    ]
    title = "SpineMed AI spine report" + (" - DEMO, NOT FOR CLINICAL USE" if demo else "")
    footer = (f"UNVERIFIED draft by {m.name} {m.version}, {when:%Y-%m-%d %H:%M} - a radiologist verifies it")
    pdf = render_report_pdf(
        title=title,
        identification=identification,
        sections=narrative_sections(narrative_sr),
        key_image=key_image,
        demo=demo,
        footer=footer,
        created_at=when,
    )
    document = SpineEncapsulatedPDF(
        evidence=[source],
        pdf=pdf,
        referenced_srs=[narrative_sr, measurement_sr],
        series_instance_uid=uids.output_series_uid(study.study_instance_uid, options.uid_prefix, kind="pdf"),
        series_number=options.series_number + 3,
        sop_instance_uid=uids.sop_instance_uid(
            "pdf-report", study.study_instance_uid, findings.model, revision, digest, options.uid_prefix
        ),
        instance_number=revision,
        manufacturer=options.manufacturer,
        manufacturer_model_name=options.manufacturer_model_name,
        software_versions=options.software_version,
        document_title=short_string(title, _LO),
        content_datetime=when,
        series_description=_series_description(PDF_SERIES_DESCRIPTION, demo),
        institution_name=options.institution_name,
        institutional_department_name=options.institution_department_name,
    )
    document.ContributingEquipmentSequence = _contributing_equipment(findings, options, when)
    _fix_times(document, when)
    return document


def _prior_reference(prior: PriorReport) -> pydicom.Dataset:
    """The header of our SR of the prior study, as highdicom needs it for the evidence sequences."""
    ds = pydicom.Dataset()
    ds.StudyInstanceUID = prior.study_instance_uid
    ds.SeriesInstanceUID = prior.series_instance_uid
    ds.SOPClassUID = prior.sop_class_uid
    ds.SOPInstanceUID = prior.sop_instance_uid
    return ds


def _series_description(base: str, demo: bool) -> str:
    """A series description of ours, marked for the demo model."""
    return base + (DEMO_SERIES_SUFFIX if demo else "")


def _person(value: object) -> str:
    """``Family, Given Middle`` from a DICOM person name (``Family^Given^Middle``)."""
    name = PersonName(str(value or ""))
    given = " ".join(p for p in (name.given_name, name.middle_name) if p)
    return ", ".join(p for p in (name.family_name, given) if p) or "-"


def _date(value: object) -> str:
    text = str(value or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else (text or "-")


def _predecessors_of(predecessors: Sequence[pydicom.Dataset], sop_class_uid: str) -> list[pydicom.Dataset]:
    return [p for p in predecessors if str(p.SOPClassUID) == sop_class_uid]
