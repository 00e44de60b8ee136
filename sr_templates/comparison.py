"""The comparison with a prior study, in the TID 1500 measurement report.

One :class:`SpineLevelChange` per compared finding, in TID 1500's Qualitative Evaluations container
(row 12) beside the level evaluations: measurement groups without spatial coordinates stop stock OHIF
(see :class:`sr_templates.measurement_report.SpineLevelEvaluation`).  Content tree::

    CODE (CHANGE, 99SPINEMED, "Change since prior study") = (15454001, SCT, "Increase in size")   CID 6002
      HAS PROPERTIES CODE (121071, DCM, "Finding") = <finding>
      HAS PROPERTIES CODE (363698007, SCT, "Finding Site") = <level>  [+ laterality]
      HAS PROPERTIES NUM <measurement> = <value now>                        e.g. Cobb angle 32 deg
        HAS PROPERTIES NUM (CHANGE-VALUE, 99SPINEMED, "Difference from prior study") = +8 deg
      HAS PROPERTIES NUM (385673002, SCT, "Interval") = <days> d
      HAS PROPERTIES CODE (121069, DCM, "Previous Finding") = <finding>     (absent for a new finding)
        HAS PROPERTIES NUM <measurement> = <value then>
        HAS PROPERTIES CODE Severity / Meyerding grade of the prior
        HAS PROPERTIES DATE (111060, DCM, "Study Date") = <prior study date>
        HAS PROPERTIES UIDREF (110180, DCM, "Study Instance UID") = <prior study>
        HAS PROPERTIES COMPOSITE (121112, DCM, "Source of Measurement") = <our SR of the prior>
      HAS PROPERTIES TEXT (121106, DCM, "Comment") = "T8: scoliosis: increased; Cobb angle 24 deg then, ..."

The prior SR is also listed in the report's Pertinent Other Evidence Sequence (another study).  When no
prior could be compared, a ``TEXT (121106, DCM, "Comment")`` says why (:func:`no_comparison_comment`).

DICOM has no template for a change between two reports (longitudinal TID 1500 work links reports by
Tracking UID and leaves the arithmetic to the reader); the change category takes the standard CID 6002
values, its concept name and the difference are private concepts, documented in docs/codes.md.
"""

from __future__ import annotations

import highdicom as hd

from inference.comparison import ChangeKind, ComparedFinding, Comparison, LevelChange
from inference.findings import Measurement
from sr_templates.codes import (
    CHANGE_CODES,
    FINDING_CODES,
    LATERALITY_CODES,
    MEASUREMENT_CODES,
    MEYERDING_GRADE_CODES,
    SEVERITY_CODES,
    SpineCodes,
    level_code,
    unit_code,
)
from sr_templates.text import text_value

__all__ = ["SpineLevelChange", "comparison_items", "no_comparison_comment"]

_REL = hd.sr.RelationshipTypeValues


def _site(change: LevelChange) -> hd.sr.FindingSite:
    laterality = None
    modifier = None
    if change.laterality is not None:
        if change.laterality.value == "central":
            modifier = SpineCodes.MIDLINE
        else:
            laterality = LATERALITY_CODES[change.laterality]
    return hd.sr.FindingSite(anatomic_location=level_code(change.level), laterality=laterality,
                             topographical_modifier=modifier)


def _num(name: object, value: float, unit: object) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=float(value), unit=unit,  # type: ignore[arg-type]
                                relationship_type=_REL.HAS_PROPERTIES)


def _grading(f: ComparedFinding) -> list[hd.sr.CodeContentItem]:
    items = []
    severity = SEVERITY_CODES.get(f.severity)
    if severity is not None:
        items.append(hd.sr.CodeContentItem(name=SpineCodes.SEVERITY, value=severity,
                                           relationship_type=_REL.HAS_PROPERTIES))
    if f.grade is not None:
        items.append(hd.sr.CodeContentItem(name=SpineCodes.MEYERDING_GRADE, value=MEYERDING_GRADE_CODES[f.grade],
                                           relationship_type=_REL.HAS_PROPERTIES))
    return items


class SpineLevelChange(hd.sr.CodeContentItem):
    """What changed for one finding at one level since the prior study (see the module's content tree).

    Parameters
    ----------
    change
        One :class:`~inference.comparison.LevelChange` of a comparison.
    comparison
        The comparison it belongs to (prior study, interval, prior SR).
    comment
        The one-line description (as in the narrative's follow-up section).

    Raises
    ------
    TypeError
        An argument has the wrong type.
    ValueError
        ``comparison`` has no prior, or ``change`` is not one of its changes.
    """

    def __init__(self, change: LevelChange, comparison: Comparison, comment: str) -> None:
        if not isinstance(change, LevelChange):
            raise TypeError(f"change: expected LevelChange, got {type(change).__name__}")
        if not isinstance(comparison, Comparison):
            raise TypeError(f"comparison: expected Comparison, got {type(comparison).__name__}")
        if not isinstance(comment, str) or not comment:
            raise TypeError("comment: expected a non-empty str")
        prior = comparison.prior
        if prior is None:
            raise ValueError("comparison: has no prior study (use no_comparison_comment)")
        if change not in comparison.changes:
            raise ValueError("change: not one of the comparison's changes")
        super().__init__(name=SpineCodes.CHANGE_SINCE_PRIOR, value=CHANGE_CODES[change.kind.value],
                         relationship_type=_REL.CONTAINS)
        finding_code = FINDING_CODES[change.finding]
        children: list[hd.sr.ContentItem] = [
            hd.sr.CodeContentItem(name=SpineCodes.FINDING, value=finding_code, relationship_type=_REL.HAS_PROPERTIES),
            _site(change),
        ]
        for m in change.measurements:
            now = _num(MEASUREMENT_CODES[m.type], m.current, unit_code(m.unit))
            now.ContentSequence = hd.sr.ContentSequence(
                [_num(SpineCodes.DIFFERENCE_FROM_PRIOR, m.difference, unit_code(m.unit))]
            )
            children.append(now)
        if comparison.interval_days is not None:
            children.append(_num(SpineCodes.INTERVAL, comparison.interval_days, SpineCodes.DAYS))
        before = change.prior
        if before is not None or change.kind is ChangeKind.NEW:
            previous = hd.sr.CodeContentItem(
                name=SpineCodes.PREVIOUS_FINDING,
                value=finding_code if before is not None else SpineCodes.ABSENT,
                relationship_type=_REL.HAS_PROPERTIES,
            )
            details: list[hd.sr.ContentItem] = []
            if before is not None:
                measured = {m.type for m in change.measurements}
                details += [_num(MEASUREMENT_CODES[m.type], m.value, unit_code(m.unit))
                            for m in _measurements(before) if m.type in measured]
                details += _grading(before)
            if prior.study_date is not None:
                details.append(hd.sr.DateContentItem(name=SpineCodes.STUDY_DATE, value=prior.study_date,
                                                     relationship_type=_REL.HAS_PROPERTIES))
            details.append(hd.sr.UIDRefContentItem(name=SpineCodes.STUDY_INSTANCE_UID,
                                                   value=prior.study_instance_uid,
                                                   relationship_type=_REL.HAS_PROPERTIES))
            details.append(hd.sr.CompositeContentItem(name=SpineCodes.SOURCE_OF_MEASUREMENT,
                                                      referenced_sop_class_uid=prior.sop_class_uid,
                                                      referenced_sop_instance_uid=prior.sop_instance_uid,
                                                      relationship_type=_REL.HAS_PROPERTIES))
            previous.ContentSequence = hd.sr.ContentSequence(details)
            children.append(previous)
        children.append(hd.sr.TextContentItem(name=SpineCodes.COMMENT, value=text_value(comment),
                                              relationship_type=_REL.HAS_PROPERTIES))
        self.ContentSequence = hd.sr.ContentSequence(children)
        self.level = change.level


def _measurements(f: ComparedFinding) -> list[Measurement]:
    return list(f.measurements)


def comparison_items(comparison: Comparison, lines: list[str]) -> list[hd.sr.ContentItem]:
    """The items for TID 1500's Qualitative Evaluations container: one :class:`SpineLevelChange` per
    change (``lines`` the per-change sentences of :func:`inference.comparison.comparison_lines`, without
    its first line), or the comment saying why there is no comparison."""
    if comparison.prior is None:
        return [no_comparison_comment(comparison)]
    if len(lines) != len(comparison.changes):
        raise ValueError("lines: one line per change expected")
    return [SpineLevelChange(c, comparison, line) for c, line in zip(comparison.changes, lines, strict=True)]


def no_comparison_comment(comparison: Comparison) -> hd.sr.TextContentItem:
    """``Comparison with prior studies: not available (<reason>).`` as a Comment."""
    if comparison.unavailable is None:
        raise ValueError("comparison: has a prior")
    return hd.sr.TextContentItem(
        name=SpineCodes.COMMENT,
        value=text_value(f"Comparison with prior studies: not available ({comparison.unavailable})."),
        relationship_type=_REL.CONTAINS,
    )

