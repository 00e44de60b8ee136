"""Read a SpineMed TID 1500 SR back into findings (round-trip checks, audits, revisions).

Parsing uses highdicom (:class:`highdicom.sr.MeasurementReport` and its TID 1410
:class:`~highdicom.sr.PlanarROIMeasurementsAndQualitativeEvaluations` groups) for the localised
findings, and walks the items of TID 1500's Qualitative Evaluations container (finding site, severity,
grade, localisation, measurements, image references) for the others, which highdicom does not parse.
The regions of one finding (one TID 1410 group per point) are read back as one finding.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from inference.findings import (
    FindingType,
    Laterality,
    Measurement,
    MeasurementType,
    Severity,
    level_sort_key,
)
from sr_templates.codes import (
    CHANGE_CODES,
    LATERALITY_CODES,
    MEYERDING_GRADE_CODES,
    SEVERITY_CODES,
    SpineCodes,
    finding_for_code,
    level_for_code,
    measurement_for_code,
)
from sr_templates.text import DEMO_TEXT

__all__ = ["ReadBack", "ReadChange", "ReadEvidence", "ReadFinding", "ReadGroup", "read_measurement_report"]


@dataclass(frozen=True)
class ReadEvidence:
    """An image reference (and coordinate, if any) under one finding."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None
    point: tuple[float, float] | None = None
    point_3d: tuple[float, float, float] | None = None
    frame_of_reference_uid: str | None = None


@dataclass(frozen=True)
class ReadFinding:
    """One finding as read back: ``localisation`` is ``"LOC-POINT"`` for a finding with a region (TID 1410),
    else the code value of its localisation status (``"LOC-NONE"``: image only; ``"LOC-NOIMAGE"``)."""

    level: str
    finding: FindingType
    severity: Severity
    grade: int | None
    laterality: Laterality | None
    localisation: str
    measurements: tuple[Measurement, ...]
    evidence: tuple[ReadEvidence, ...]
    notes: tuple[str, ...] = ()
    summary: str = ""


@dataclass(frozen=True)
class ReadGroup:
    """One TID 1410 planar ROI group: one region of one localised finding."""

    template: str
    level: str
    tracking_identifier: str
    tracking_uid: str
    finding_site: hd.sr.CodedConcept
    laterality: hd.sr.CodedConcept | None
    summary: str
    source_images: tuple[tuple[str, tuple[int, ...]], ...]
    algorithm_name: str
    algorithm_version: str
    algorithm_parameters: tuple[str, ...]
    findings: tuple[ReadFinding, ...]


@dataclass(frozen=True)
class ReadChange:
    """One change since the prior study (:class:`sr_templates.comparison.SpineLevelChange`), read back.

    ``measurements`` holds ``(type, value now, difference, value then)`` per compared measurement.
    """

    kind: str
    level: str
    finding: FindingType
    laterality: Laterality | None
    measurements: tuple[tuple[MeasurementType, float, float, float | None], ...]
    interval_days: int | None
    prior_study_instance_uid: str | None
    prior_study_date: str | None
    prior_sr_instance_uid: str | None
    comment: str


@dataclass(frozen=True)
class ReadBack:
    """A SpineMed measurement report, read back."""

    procedure_reported: tuple[hd.sr.CodedConcept, ...]
    device_observer_uid: str
    device_observer_name: str
    groups: tuple[ReadGroup, ...]
    demo: bool
    findings: tuple[ReadFinding, ...] = field(default=())
    #: the comparison with the prior study: its changes, or (empty) the comment saying why there is none
    changes: tuple[ReadChange, ...] = field(default=())
    comparison_comment: str | None = None


_SEVERITY: dict[tuple[str, str], Severity] = {(c.scheme_designator, c.value): k for k, c in SEVERITY_CODES.items()}
_GRADE: dict[tuple[str, str], int] = {(c.scheme_designator, c.value): k for k, c in MEYERDING_GRADE_CODES.items()}
_CHANGE: dict[tuple[str, str], str] = {(c.scheme_designator, c.value): k for k, c in CHANGE_CODES.items()}
_LATERALITY: dict[tuple[str, str], Laterality] = {
    (c.scheme_designator, c.value): k for k, c in LATERALITY_CODES.items()
}



def _key(item: pydicom.Dataset, attr: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    code = item[attr][0]
    return (str(code.CodingSchemeDesignator), str(code.CodeValue))


def _is(item: pydicom.Dataset, concept: object) -> bool:
    return _key(item) == (concept.scheme_designator, concept.value)  # type: ignore[attr-defined]


def _image_ref(item: pydicom.Dataset) -> tuple[str, str, int | None]:
    ref = item.ReferencedSOPSequence[0]
    frames = ref.get("ReferencedFrameNumber")
    frame = None
    if frames is not None:
        frame = int(frames[0]) if isinstance(frames, pydicom.multival.MultiValue) else int(frames)
    return str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID), frame


def _read_evaluation(item: pydicom.Dataset) -> ReadFinding:
    """A finding without a region, from TID 1500's Qualitative Evaluations container."""
    absent = item.ValueType == "CODE" and _key(item, "ConceptCodeSequence") == (
        SpineCodes.ABSENT.scheme_designator,
        SpineCodes.ABSENT.value,
    )
    concept = item.ConceptNameCodeSequence[0] if absent else item.ConceptCodeSequence[0]
    finding = finding_for_code(hd.sr.CodedConcept.from_dataset(concept))
    level = ""
    severity = Severity.NONE
    grade: int | None = None
    laterality: Laterality | None = None
    localisation = ""
    summary = ""
    measurements: list[Measurement] = []
    evidence: list[ReadEvidence] = []
    notes: list[str] = []
    for child in item.get("ContentSequence", []):
        vt = child.ValueType
        if vt == "CODE" and _is(child, SpineCodes.FINDING_SITE):
            site = hd.sr.FindingSite.from_dataset(child)
            level = level_for_code(site.value)
            laterality = _laterality(site)
        elif vt == "CODE" and _is(child, SpineCodes.SEVERITY):
            severity = _SEVERITY[_key(child, "ConceptCodeSequence")]
        elif vt == "CODE" and _is(child, SpineCodes.MEYERDING_GRADE):
            grade = _GRADE[_key(child, "ConceptCodeSequence")]
        elif vt == "CODE" and _is(child, SpineCodes.LOCALISATION):
            localisation = str(child.ConceptCodeSequence[0].CodeValue)
        elif vt == "NUM":
            measurements.append(_num(child))
        elif vt == "IMAGE":
            evidence.append(ReadEvidence(*_image_ref(child)))
        elif vt == "TEXT" and str(child.TextValue).startswith("Not localised: "):
            notes.append(str(child.TextValue))
        elif vt == "TEXT":
            summary = str(child.TextValue)
    if not level:
        raise ValueError("dataset: a qualitative evaluation without finding site")
    if absent:
        localisation = "LOC-NONE" if evidence else "LOC-NOIMAGE"
    elif severity is Severity.NONE and finding is not FindingType.NO_ABNORMALITY:
        raise ValueError(f"dataset: finding at {level} has no severity")
    return ReadFinding(
        level, finding, severity, grade, laterality, localisation, tuple(measurements), tuple(evidence),
        tuple(notes), summary,
    )


def _laterality(site: hd.sr.FindingSite) -> Laterality | None:
    if site.laterality is not None:
        return _LATERALITY[(site.laterality.scheme_designator, site.laterality.value)]
    if site.topographical_modifier is not None and site.topographical_modifier == SpineCodes.MIDLINE:
        return Laterality.CENTRAL
    return None


def _num(item: pydicom.Dataset) -> Measurement:
    """A NUM item of ours (in a TID 1410 group, or under a qualitative evaluation), with a Cobb angle's
    end vertebrae from its Superior / Inferior finding sites."""
    mtype = measurement_for_code(hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0]))
    value = float(item.MeasuredValueSequence[0].NumericValue)
    upper = lower = None
    for child in item.get("ContentSequence", []):
        if child.ValueType == "CODE" and _is(child, SpineCodes.FINDING_SITE):
            site = hd.sr.FindingSite.from_dataset(child)
            mod = site.topographical_modifier
            if mod is not None and mod == SpineCodes.SUPERIOR:
                upper = level_for_code(site.value)
            elif mod is not None and mod == SpineCodes.INFERIOR:
                lower = level_for_code(site.value)
    return Measurement(type=mtype, value=value, upper_end_vertebra=upper, lower_end_vertebra=lower)


def read_measurement_report(dataset: pydicom.Dataset) -> ReadBack:
    """Parse a Comprehensive 3D SR written by :func:`sr_templates.build_outputs`.

    Measurements are re-attached to the finding at the level they normally belong to
    (:data:`sr_templates.codes.MEASUREMENT_FINDING`), else to the level's first finding.

    Raises
    ------
    TypeError
        ``dataset`` is not a pydicom Dataset.
    ValueError
        ``dataset`` is not a SpineMed TID 1500 SR.
    """
    if not isinstance(dataset, pydicom.Dataset):
        raise TypeError(f"dataset: expected a pydicom Dataset, got {type(dataset).__name__}")
    sr = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    observers = report.get_observer_contexts(observer_type=codes.cid270.Device)
    device_uid = device_name = ""
    if observers:
        attrs = observers[0].observer_identifying_attributes
        if isinstance(attrs, hd.sr.DeviceObserverIdentifyingAttributes):
            device_uid = str(attrs.uid)
            device_name = str(attrs.name or "")
    procedures: list[hd.sr.CodedConcept] = []
    demo = False
    evaluations: list[pydicom.Dataset] = []
    changes: list[ReadChange] = []
    comparison_comment: str | None = None
    for item in sr.content[0].ContentSequence:
        if item.ValueType == "CODE" and _key(item) == ("DCM", "121058"):
            procedures.append(hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0]))
        if item.ValueType == "CONTAINER" and _is(item, SpineCodes.QUALITATIVE_EVALUATIONS):
            demo = demo or any(getattr(c, "TextValue", "") == DEMO_TEXT for c in item.ContentSequence)
            for c in item.ContentSequence:
                if c.ValueType == "CODE" and _is(c, SpineCodes.CHANGE_SINCE_PRIOR):
                    changes.append(_read_change(c))
                elif c.ValueType == "CODE":
                    evaluations.append(c)
                elif c.ValueType == "TEXT" and str(c.TextValue).startswith("Comparison with prior studies"):
                    comparison_comment = str(c.TextValue)

    groups: list[ReadGroup] = []
    merged: dict[tuple[str, str], int] = {}
    for roi_group in report.get_planar_roi_measurement_groups():
        read = _read_roi_group(roi_group)
        key = (read.level, read.tracking_identifier.split(" region ")[0])
        if key not in merged:
            merged[key] = len(groups)
            groups.append(read)
            continue
        first = groups[merged[key]]
        (f0,), (f1,) = first.findings, read.findings
        combined = replace(f0, measurements=f0.measurements + f1.measurements, evidence=f0.evidence + f1.evidence)
        sources = first.source_images + read.source_images
        groups[merged[key]] = replace(first, findings=(combined,), source_images=sources)
    evaluated = [_read_evaluation(item) for item in evaluations]
    groups.sort(key=lambda g: level_sort_key(g.level))
    all_findings = sorted([*(f for g in groups for f in g.findings), *evaluated], key=lambda f: level_sort_key(f.level))
    return ReadBack(tuple(procedures), device_uid, device_name, tuple(groups), demo, tuple(all_findings),
                    tuple(changes), comparison_comment)


def _read_change(item: pydicom.Dataset) -> ReadChange:
    kind = _CHANGE[_key(item, "ConceptCodeSequence")]
    finding: FindingType | None = None
    level = ""
    laterality: Laterality | None = None
    now: dict[MeasurementType, tuple[float, float]] = {}
    then: dict[MeasurementType, float] = {}
    interval: int | None = None
    study_uid = study_date = sr_uid = None
    comment = ""
    for child in item.get("ContentSequence", []):
        vt = child.ValueType
        if vt == "CODE" and _is(child, SpineCodes.FINDING):
            finding = finding_for_code(hd.sr.CodedConcept.from_dataset(child.ConceptCodeSequence[0]))
        elif vt == "CODE" and _is(child, SpineCodes.FINDING_SITE):
            site = hd.sr.FindingSite.from_dataset(child)
            level, laterality = level_for_code(site.value), _laterality(site)
        elif vt == "NUM" and _is(child, SpineCodes.INTERVAL):
            interval = int(float(child.MeasuredValueSequence[0].NumericValue))
        elif vt == "NUM":
            mtype = measurement_for_code(hd.sr.CodedConcept.from_dataset(child.ConceptNameCodeSequence[0]))
            diff = next(float(d.MeasuredValueSequence[0].NumericValue) for d in child.ContentSequence
                        if _is(d, SpineCodes.DIFFERENCE_FROM_PRIOR))
            now[mtype] = (float(child.MeasuredValueSequence[0].NumericValue), diff)
        elif vt == "CODE" and _is(child, SpineCodes.PREVIOUS_FINDING):
            for d in child.get("ContentSequence", []):
                if d.ValueType == "NUM":
                    mtype = measurement_for_code(hd.sr.CodedConcept.from_dataset(d.ConceptNameCodeSequence[0]))
                    then[mtype] = float(d.MeasuredValueSequence[0].NumericValue)
                elif d.ValueType == "UIDREF":
                    study_uid = str(d.UID)
                elif d.ValueType == "DATE":
                    study_date = str(d.Date)
                elif d.ValueType == "COMPOSITE":
                    sr_uid = str(d.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif vt == "TEXT":
            comment = str(child.TextValue)
    if finding is None or not level:
        raise ValueError("dataset: a change since the prior study without finding or finding site")
    measured = tuple((t, v, d, then.get(t)) for t, (v, d) in now.items())
    return ReadChange(kind, level, finding, laterality, measured, interval, study_uid, study_date, sr_uid, comment)


def _group_text(group: hd.sr.templates.Template) -> tuple[str, str, str, tuple[str, ...]]:
    """(comment, algorithm name, version, parameters) of a measurement group."""
    summary = alg_name = alg_version = ""
    params: list[str] = []
    for item in group[0].ContentSequence:
        if item.ValueType == "TEXT" and _is(item, SpineCodes.COMMENT):
            summary = str(item.TextValue)
        elif item.ValueType == "TEXT" and _key(item) == ("DCM", "111001"):
            alg_name = str(item.TextValue)
        elif item.ValueType == "TEXT" and _key(item) == ("DCM", "111003"):
            alg_version = str(item.TextValue)
        elif item.ValueType == "TEXT" and _key(item) == ("DCM", "111002"):
            params.append(str(item.TextValue))
    return summary, alg_name, alg_version, tuple(params)


def _read_roi_group(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> ReadGroup:
    """A TID 1410 group: one region (point) of one localised finding."""
    site = group.finding_sites[0]
    level = level_for_code(site.value)
    if group.finding_type is None:
        raise ValueError(f"dataset: the planar ROI group at {level} has no finding")
    finding = finding_for_code(group.finding_type)
    severity = Severity.NONE
    grade: int | None = None
    for qe in group.get_qualitative_evaluations():
        name, value = qe.name, qe.value
        if not isinstance(value, hd.sr.CodedConcept):
            continue
        if name == SpineCodes.SEVERITY:
            severity = _SEVERITY[(value.scheme_designator, value.value)]
        elif name == SpineCodes.MEYERDING_GRADE:
            grade = _GRADE[(value.scheme_designator, value.value)]
    laterality = _laterality(site)
    roi = group.roi
    data = [float(v) for v in roi.GraphicData] if roi is not None else []
    sources: tuple[tuple[str, tuple[int, ...]], ...] = ()
    if isinstance(roi, hd.sr.ImageRegion):
        cls, uid, frame = _image_ref(roi.ContentSequence[0])
        evidence = ReadEvidence(cls, uid, frame, point=(data[0], data[1]))
        sources = ((uid, (frame,) if frame is not None else ()),)
    elif isinstance(roi, hd.sr.ImageRegion3D):
        evidence = ReadEvidence(
            "", "", None, point_3d=(data[0], data[1], data[2]),
            frame_of_reference_uid=str(roi.ReferencedFrameOfReferenceUID),
        )
    else:
        raise ValueError(f"dataset: the planar ROI group at {level} has no image region")
    summary, alg_name, alg_version, params = _group_text(group)
    read = ReadFinding(
        level, finding, severity, grade, laterality, "LOC-POINT",
        tuple(_num(m[0]) for m in group.get_measurements()), (evidence,), (), summary,
    )
    return ReadGroup(
        template="1410",
        level=level,
        tracking_identifier=str(group.tracking_identifier),
        tracking_uid=str(group.tracking_uid),
        finding_site=site.value,
        laterality=site.laterality,
        summary=summary,
        source_images=sources,
        algorithm_name=alg_name,
        algorithm_version=alg_version,
        algorithm_parameters=params,
        findings=(read,),
    )
