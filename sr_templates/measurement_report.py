"""TID 1500 Measurement Report for SpineMed findings: TID 1410 planar ROIs and TID 1501 groups.

A finding the model localised at a point becomes a TID 1410 Planar ROI group whose region is that
point on the source image (SCOORD, or SCOORD3D in the frame of reference for a reformat) — the
structure highdicom builds and viewers such as OHIF draw.  The findings of a level that have no
point (an image reference only, or none), and conditions assessed as absent, stay in one TID 1501
group per level.  Content tree (abridged) of :class:`SpineMeasurementReport`::

    CONTAINER (126000, DCM, "Imaging Measurement Report")                       TID 1500
      HAS OBS CONTEXT  device observer (UID, name, manufacturer, model)          TID 1001/1004
      HAS CONCEPT MOD  (121058, DCM, "Procedure reported") = e.g. MR lumbar spine (LOINC)
      CONTAINS CONTAINER (126010, DCM, "Imaging Measurements")
        CONTAINS CONTAINER (125007, DCM, "Measurement Group")                      TID 1410
          HAS OBS CONTEXT  Tracking Identifier "L4-L5 disc herniation", Tracking UID
          HAS CONCEPT MOD  Finding = disc herniation;  Finding Site = L4/L5 disc [+ Laterality]
          HAS CONCEPT MOD  Algorithm Name / Version / Parameters                    TID 4019
          CONTAINS SCOORD  (111030, DCM, "Image Region") POINT -> SELECTED FROM IMAGE  | SCOORD3D
          CONTAINS NUM     measurements of the finding (UCUM units)                 TID 300
          CONTAINS CODE    Severity = moderate; Meyerding grade (private)
          CONTAINS TEXT    (121106, DCM, "Comment") = "L4-L5: disc herniation, moderate, left"
        CONTAINS CONTAINER (125007, DCM, "Measurement Group")                      TID 1501
          HAS OBS CONTEXT  Tracking Identifier "L1", Tracking UID
          HAS CONCEPT MOD  Finding Site = L1 vertebra;  Algorithm identification
          CONTAINS IMAGE   Source of every evidence image
          CONTAINS NUM     measurements
          CONTAINS CODE    (121071, DCM, "Finding") = finding not localised at a point
            HAS PROPERTIES  Severity, Meyerding grade, Localisation status
            INFERRED FROM   IMAGE
          CONTAINS CODE    (finding concept) = (272519000, SCT, "Absent")   an assessed, absent condition
          CONTAINS TEXT    (121106, DCM, "Comment") = "L1: no vertebral fracture"
      CONTAINS CONTAINER (C0034375, UMLS, "Qualitative Evaluations")   only for the demo model
        CONTAINS TEXT (121106, DCM, "Comment") = "DEMO MODEL OUTPUT - NOT FOR DIAGNOSTIC USE ..."
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.findings import (
    LevelFinding,
    Measurement,
    MeasurementType,
    ModelIdentity,
    is_transitional,
    level_sort_key,
)
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
from sr_templates.evidence import ResolvedEvidence
from sr_templates.text import DEMO_TEXT, finding_summary, text_value

__all__ = [
    "SpineLevelEvaluation",
    "SpineMeasurementReport",
    "SpinePlanarROIGroup",
    "algorithm_identification",
    "is_localised",
]

_REL = hd.sr.RelationshipTypeValues


def algorithm_identification(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification for ``model``: name, version and parameters.

    Parameters are ``prompt_version=...``, ``weights_sha256=...``, ``backend=...``.
    """
    if not isinstance(model, ModelIdentity):
        raise TypeError(f"model: expected ModelIdentity, got {type(model).__name__}")
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[
            f"prompt_version={model.prompt_version}",
            f"weights_sha256={model.weights_digest}",
            f"backend={model.backend}",
        ],
    )


def _finding_site(level: str, findings: Sequence[LevelFinding]) -> hd.sr.FindingSite:
    lateralities = {f.laterality for f in findings if f.laterality is not None}
    laterality: Code | None = None
    modifier: Code | None = None
    if len(lateralities) == 1 and all(f.laterality is not None for f in findings):
        (only,) = lateralities
        if only.value == "central":
            modifier = SpineCodes.MIDLINE
        else:
            laterality = LATERALITY_CODES[only]
    return hd.sr.FindingSite(
        anatomic_location=level_code(level), laterality=laterality, topographical_modifier=modifier
    )


def _end_vertebrae(m: Measurement) -> list[hd.sr.FindingSite] | None:
    """The end vertebrae of a Cobb angle as finding sites (Superior = upper, Inferior = lower), else None."""
    if m.type is not MeasurementType.COBB_ANGLE:
        return None
    assert m.upper_end_vertebra is not None and m.lower_end_vertebra is not None
    return [
        hd.sr.FindingSite(level_code(m.upper_end_vertebra), topographical_modifier=SpineCodes.SUPERIOR),
        hd.sr.FindingSite(level_code(m.lower_end_vertebra), topographical_modifier=SpineCodes.INFERIOR),
    ]


def _measurement(m: Measurement) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=MEASUREMENT_CODES[m.type],
        value=float(m.value),
        unit=unit_code(m.unit),
        finding_sites=_end_vertebrae(m),
    )


def _evidence_items(resolved: Sequence[ResolvedEvidence]) -> list[hd.sr.ContentItem]:
    """INFERRED FROM the evidence images (a point is never written here: points are regions), and
    why a point the model gave could not be placed."""
    items: list[hd.sr.ContentItem] = []
    for ev in resolved:
        frames = [ev.frame_number] if ev.frame_number is not None else None
        for uid in ev.sop_instance_uids:
            items.append(
                hd.sr.ImageContentItem(
                    name=SpineCodes.SOURCE_IMAGE,
                    referenced_sop_class_uid=ev.sop_class_uid,
                    referenced_sop_instance_uid=uid,
                    referenced_frame_numbers=frames,
                    relationship_type=_REL.INFERRED_FROM,
                )
            )
        if ev.note is not None:
            items.append(
                hd.sr.TextContentItem(
                    name=SpineCodes.COMMENT,
                    value=text_value(f"Not localised: {ev.note}"),
                    relationship_type=_REL.HAS_PROPERTIES,
                )
            )
    return items


def is_localised(finding: LevelFinding, resolved: Sequence[ResolvedEvidence]) -> bool:
    """True where ``finding`` is present and the model gave a point that maps onto a source image."""
    return not finding.absent and any(ev.point is not None or ev.point_3d is not None for ev in resolved)


def _grading(finding: LevelFinding) -> list[tuple[Code, Code]]:
    """(concept, value) of the severity (when graded) and Meyerding grade of a present finding."""
    pairs: list[tuple[Code, Code]] = []
    severity = SEVERITY_CODES.get(finding.severity)
    if severity is not None:
        pairs.append((SpineCodes.SEVERITY, severity))
    if finding.grade is not None:
        pairs.append((SpineCodes.MEYERDING_GRADE, MEYERDING_GRADE_CODES[finding.grade]))
    return pairs


def _num(m: Measurement) -> hd.sr.NumContentItem:
    """A measurement of a finding outside a measurement group (HAS PROPERTIES of the finding)."""
    item = hd.sr.NumContentItem(
        name=MEASUREMENT_CODES[m.type],
        value=float(m.value),
        unit=unit_code(m.unit),
        relationship_type=_REL.HAS_PROPERTIES,
    )
    sites = _end_vertebrae(m)
    if sites is not None:
        item.ContentSequence = hd.sr.ContentSequence(sites)
    return item


class SpineLevelEvaluation(hd.sr.CodeContentItem):
    """A finding at a level that has no region: a qualitative evaluation of the TID 1500 report.

    ``(121071, DCM, "Finding") = <finding>`` for a present finding the model did not localise at a
    point (it cited an image, or none), or ``<finding> = (272519000, SCT, "Absent")`` for a condition
    assessed and absent.  Children: the Finding Site (the level, with laterality), severity and
    Meyerding grade, the localisation status, the finding's measurements, the images it was read
    from (INFERRED FROM) and a one-line comment.

    TID 1501 groups would carry these in "Imaging Measurements"; stock OHIF (3.13.2, 3.14.0-beta.6)
    fails on any measurement group without spatial coordinates ("Cannot read properties of undefined
    (reading 'ReferencedSOPSequence')" in ``_checkIfCanAddMeasurementsToDisplaySet``, the whole viewer
    route replaced by "Something went wrong"), so they go to TID 1500's "Qualitative Evaluations"
    container, which viewers that draw regions leave alone.

    Parameters
    ----------
    finding
        The :class:`~inference.findings.LevelFinding`.
    evidence
        Its resolved evidence (image references; points the resolver could not map carry a note).

    Raises
    ------
    TypeError
        An argument has the wrong type.
    ValueError
        The finding is present and localised at a point (it belongs in a :class:`SpinePlanarROIGroup`).
    """

    def __init__(self, finding: LevelFinding, evidence: Sequence[ResolvedEvidence]) -> None:
        if not isinstance(finding, LevelFinding):
            raise TypeError(f"finding: expected LevelFinding, got {type(finding).__name__}")
        if isinstance(evidence, ResolvedEvidence) or not isinstance(evidence, Sequence):
            raise TypeError("evidence: expected a sequence of ResolvedEvidence")
        if any(not isinstance(ev, ResolvedEvidence) for ev in evidence):
            raise TypeError("evidence: expected ResolvedEvidence items")
        if is_localised(finding, evidence):
            raise ValueError("evidence: a finding localised at a point is a planar ROI group, not an evaluation")
        if finding.absent:
            super().__init__(
                name=FINDING_CODES[finding.finding], value=SpineCodes.ABSENT, relationship_type=_REL.CONTAINS
            )
        else:
            super().__init__(
                name=SpineCodes.FINDING, value=FINDING_CODES[finding.finding], relationship_type=_REL.CONTAINS
            )
        children: list[hd.sr.ContentItem] = [_finding_site(finding.level, [finding])]
        children += [
            hd.sr.CodeContentItem(name=name, value=value, relationship_type=_REL.HAS_PROPERTIES)
            for name, value in _grading(finding)
        ]
        if not finding.absent:
            status = SpineCodes.NOT_LOCALISED if evidence else SpineCodes.NO_IMAGE_EVIDENCE
            children.append(
                hd.sr.CodeContentItem(
                    name=SpineCodes.LOCALISATION, value=status, relationship_type=_REL.HAS_PROPERTIES
                )
            )
        children += [_num(m) for m in finding.measurements]
        children += _evidence_items(evidence)
        children.append(
            hd.sr.TextContentItem(
                name=SpineCodes.COMMENT, value=_summary(finding), relationship_type=_REL.HAS_PROPERTIES
            )
        )
        self.ContentSequence = hd.sr.ContentSequence(children)
        self.level = finding.level


def _summary(finding: LevelFinding) -> str:
    """The one-line comment of a finding: ``"L4-L5: disc herniation, moderate, left, 9.5 mm"``."""
    summary = finding_summary(finding.level, [finding])
    if is_transitional(finding.level):
        summary += " (transitional anatomy)"
    return text_value(summary)


class SpinePlanarROIGroup(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
    """TID 1410 Planar ROI Measurements and Qualitative Evaluations for one localised finding.

    The region is the point the model gave, on the source image it maps to (an Image Region SCOORD
    POINT with its source image), or in the source frame of reference for a reformatted input
    (SCOORD3D).  The finding is the group's Finding (TID 1410 row 4), its level the Finding Site with
    laterality; severity and Meyerding grade are qualitative evaluations; the finding's measurements
    are TID 300 items.

    Parameters
    ----------
    finding
        A present :class:`~inference.findings.LevelFinding`.
    evidence
        One resolved evidence item that carries a point (``point`` or ``point_3d``).
    tracking_uid
        Tracking Unique Identifier of the region.
    tracking_identifier
        Human-readable tracking identifier, e.g. ``"L4-L5 disc herniation"``.
    algorithm
        TID 4019 identification of the algorithm that produced the finding.
    measurements
        Whether to write the finding's measurements in this group (the first region of a finding
        carries them; further regions of the same finding do not repeat them).

    Raises
    ------
    TypeError
        An argument has the wrong type.
    ValueError
        The finding is absent, or ``evidence`` has no point.
    """

    def __init__(
        self,
        finding: LevelFinding,
        evidence: ResolvedEvidence,
        tracking_uid: str,
        tracking_identifier: str,
        algorithm: hd.sr.AlgorithmIdentification,
        *,
        measurements: bool = True,
    ) -> None:
        if not isinstance(finding, LevelFinding):
            raise TypeError(f"finding: expected LevelFinding, got {type(finding).__name__}")
        if finding.absent:
            raise ValueError("finding: an absent condition has no region of interest")
        if not isinstance(evidence, ResolvedEvidence):
            raise TypeError(f"evidence: expected ResolvedEvidence, got {type(evidence).__name__}")
        if evidence.point is None and evidence.point_3d is None:
            raise ValueError("evidence: a planar ROI needs a point on the source image or in its frame of reference")
        if not isinstance(tracking_uid, str) or not tracking_uid:
            raise TypeError("tracking_uid: expected a non-empty str")
        if not isinstance(tracking_identifier, str) or not tracking_identifier:
            raise TypeError("tracking_identifier: expected a non-empty str")
        if not isinstance(algorithm, hd.sr.AlgorithmIdentification):
            raise TypeError(f"algorithm: expected AlgorithmIdentification, got {type(algorithm).__name__}")
        region: hd.sr.ImageRegion | hd.sr.ImageRegion3D
        if evidence.point is not None:
            frames = [evidence.frame_number] if evidence.frame_number is not None else None
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POINT,
                graphic_data=np.array([evidence.point], dtype=float),
                source_image=hd.sr.SourceImageForRegion(
                    referenced_sop_class_uid=evidence.sop_class_uid,
                    referenced_sop_instance_uid=evidence.sop_instance_uids[0],
                    referenced_frame_numbers=frames,
                ),
            )
        else:
            assert evidence.point_3d is not None and evidence.frame_of_reference_uid is not None
            region = hd.sr.ImageRegion3D(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.array([evidence.point_3d], dtype=float),
                frame_of_reference_uid=evidence.frame_of_reference_uid,
            )
        evaluations = [hd.sr.QualitativeEvaluation(name=name, value=value) for name, value in _grading(finding)]
        super().__init__(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tracking_identifier),
            referenced_region=region,
            finding_type=FINDING_CODES[finding.finding],
            algorithm_id=algorithm,
            finding_sites=[_finding_site(finding.level, [finding])],
            measurements=[_measurement(m) for m in finding.measurements] if measurements else None,
            qualitative_evaluations=evaluations or None,
        )
        self.level = finding.level
        self[0].ContentSequence.append(
            hd.sr.TextContentItem(name=SpineCodes.COMMENT, value=_summary(finding), relationship_type=_REL.CONTAINS)
        )


class SpineMeasurementReport(hd.sr.MeasurementReport):
    """TID 1500 Imaging Measurement Report: the per-level SpineMed results.

    Parameters
    ----------
    observation_context
        Observer context (the algorithm as device observer).
    procedure_reported
        The imaging procedure the findings are about.
    groups
        One :class:`SpinePlanarROIGroup` per region of each localised finding, cranio-caudal.
    evaluations
        One :class:`SpineLevelEvaluation` per finding without a region, cranio-caudal.
    demo
        True when the findings come from the demo model: adds a "not for diagnostic use" statement.
    comparison
        The comparison with the prior study (:func:`sr_templates.comparison.comparison_items`): one
        change item per compared finding, or the comment saying why there is none.

    Raises
    ------
    TypeError
        An argument has the wrong type.
    ValueError
        Groups or evaluations out of cranio-caudal order, two groups with one tracking UID, or
        nothing to report.
    """

    def __init__(
        self,
        observation_context: hd.sr.ObservationContext,
        procedure_reported: Code,
        groups: Sequence[SpinePlanarROIGroup],
        evaluations: Sequence[SpineLevelEvaluation] = (),
        *,
        demo: bool = False,
        comparison: Sequence[hd.sr.ContentItem] = (),
    ) -> None:
        if not isinstance(observation_context, hd.sr.ObservationContext):
            raise TypeError(
                f"observation_context: expected ObservationContext, got {type(observation_context).__name__}"
            )
        if not isinstance(procedure_reported, Code | hd.sr.CodedConcept):
            raise TypeError(f"procedure_reported: expected a Code, got {type(procedure_reported).__name__}")
        if not isinstance(groups, Sequence) or any(not isinstance(g, SpinePlanarROIGroup) for g in groups):
            raise TypeError("groups: expected a sequence of SpinePlanarROIGroup")
        if not isinstance(evaluations, Sequence) or any(not isinstance(e, SpineLevelEvaluation) for e in evaluations):
            raise TypeError("evaluations: expected a sequence of SpineLevelEvaluation")
        if not isinstance(demo, bool):
            raise TypeError(f"demo: expected bool, got {type(demo).__name__}")
        if not isinstance(comparison, Sequence) or any(not isinstance(c, hd.sr.ContentItem) for c in comparison):
            raise TypeError("comparison: expected a sequence of content items")
        if not groups and not evaluations:
            raise ValueError("groups: a report needs at least one group or evaluation")
        for name, seq in (("groups", groups), ("evaluations", evaluations)):
            order = [x.level for x in seq]
            if order != sorted(order, key=level_sort_key):
                raise ValueError(f"{name}: must be in cranio-caudal order")
        uids = [_tracking_uid(g) for g in groups]
        if len(set(uids)) != len(uids):
            raise ValueError("groups: two groups share a tracking UID")
        # highdicom builds TID 1500 only with Imaging Measurements (row 8); TID 1500 needs one of rows 8,
        # 10, 12. A report whose findings are all without a region is rows 1-6 and 12: build it with a
        # placeholder group and take the Imaging Measurements container out again.
        placeholder = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid="2.25.0", identifier="placeholder")
        )
        super().__init__(
            observation_context=observation_context,
            procedure_reported=procedure_reported,
            imaging_measurements=list(groups) or [placeholder],
        )
        if not groups:
            content = self[0].ContentSequence
            assert content[-1].ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value
            del content[-1]
        if evaluations or demo or comparison:
            container = hd.sr.ContainerContentItem(
                name=SpineCodes.QUALITATIVE_EVALUATIONS, relationship_type=_REL.CONTAINS
            )
            items: list[hd.sr.ContentItem] = [*evaluations, *comparison]
            if demo:
                items.append(
                    hd.sr.TextContentItem(name=SpineCodes.COMMENT, value=DEMO_TEXT, relationship_type=_REL.CONTAINS)
                )
            container.ContentSequence = hd.sr.ContentSequence(items)
            self[0].ContentSequence.append(container)


def _tracking_uid(group: hd.sr.templates.Template) -> str:
    for item in group[0].ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "112040":
            return str(item.UID)
    raise ValueError("groups: a group without tracking unique identifier")
