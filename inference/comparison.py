"""Comparison with a prior study: what changed at each level since the patient's last SpineMed report.

The prior's findings are read back from our own TID 1500 SR of that study (never analysed again).  A
finding is matched across the two reports by finding type, level and laterality (a scoliosis curve by
its type alone: its level is the apex, which moves); each match, and each finding in only one of the
two, becomes a :class:`LevelChange`:

* ``new`` — present now, not present in the prior although the prior reported that level (assessed
  absent or normal, or the level lies within the span the prior reported);
* ``increased`` / ``decreased`` — present in both and the finding grew or shrank: a measurement moved by
  at least its :data:`CHANGE_THRESHOLDS` (in the direction that makes the finding larger: a larger
  Cobb angle or slip, a *smaller* canal diameter or disc height), else the severity or the Meyerding
  grade changed;
* ``unchanged`` — present in both, no measurement past its threshold, same severity and grade;
* ``not_seen`` — present in the prior, not present now at a level the current report covers.

A level outside what the other report covered is not compared (no claim of "new" for a region the
prior never showed).

:data:`CHANGE_THRESHOLDS` are the smallest differences treated as change, about the inter-observer
error of each measurement: 5 degrees for the Cobb angle (curve progression is a Cobb increase of 5
degrees or more, Scoliosis Research Society; inter-observer error 3-5 degrees), 10 percentage points of
slip or vertebral height loss, 2 mm of slip, canal diameter or disc height.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from inference.findings import FindingType, Laterality, Measurement, MeasurementType, Severity, level_sort_key

__all__ = [
    "CHANGE_THRESHOLDS",
    "ChangeKind",
    "ComparedFinding",
    "Comparison",
    "LevelChange",
    "MeasurementChange",
    "PriorReport",
    "compare_with_prior",
    "comparison_context",
    "comparison_lines",
]

#: Smallest absolute difference treated as a change, per measurement (its unit).
CHANGE_THRESHOLDS: dict[MeasurementType, float] = {
    MeasurementType.COBB_ANGLE: 5.0,
    MeasurementType.SLIP_PERCENTAGE: 10.0,
    MeasurementType.SLIP_DISTANCE: 2.0,
    MeasurementType.CANAL_AP_DIAMETER: 2.0,
    MeasurementType.DISC_HEIGHT: 2.0,
    MeasurementType.VERTEBRAL_HEIGHT_LOSS: 10.0,
}
#: Measurements whose *decrease* means the finding grew (a narrower canal, a lower disc).
_SMALLER_IS_WORSE: frozenset[MeasurementType] = frozenset(
    {MeasurementType.CANAL_AP_DIAMETER, MeasurementType.DISC_HEIGHT}
)
_SEVERITY_ORDER = {Severity.NONE: 0, Severity.MILD: 1, Severity.MODERATE: 2, Severity.SEVERE: 3}


class ChangeKind(StrEnum):
    NEW = "new"
    INCREASED = "increased"
    DECREASED = "decreased"
    UNCHANGED = "unchanged"
    NOT_SEEN = "not_seen"


class ComparedFinding(Protocol):
    """What is compared of a finding: :class:`inference.findings.LevelFinding` and
    :class:`sr_templates.reader.ReadFinding` both have it."""

    @property
    def level(self) -> str: ...
    @property
    def finding(self) -> FindingType: ...
    @property
    def severity(self) -> Severity: ...
    @property
    def grade(self) -> int | None: ...
    @property
    def laterality(self) -> Laterality | None: ...
    @property
    def measurements(self) -> Sequence[Measurement]: ...


@dataclass(frozen=True)
class PriorReport:
    """Our TID 1500 SR of an earlier study, read back.

    Attributes
    ----------
    study_instance_uid, study_date
        The prior study (its date ``None`` when the PACS gave none).
    sop_class_uid, sop_instance_uid, series_instance_uid
        The SR the findings were read from (referenced by the new report).
    findings
        Its findings (present, absent and normal levels).
    """

    study_instance_uid: str
    study_date: _dt.date | None
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    findings: tuple[ComparedFinding, ...]


@dataclass(frozen=True)
class MeasurementChange:
    """One measurement then and now: ``difference = current - prior`` in ``unit``."""

    type: MeasurementType
    unit: str
    prior: float
    current: float

    @property
    def difference(self) -> float:
        return round(self.current - self.prior, 6)

    @property
    def significant(self) -> bool:
        return abs(self.difference) >= CHANGE_THRESHOLDS[self.type] - 1e-9

    @property
    def grew(self) -> bool:
        """Whether the finding grew by this measurement (sign-aware: a narrower canal grew the stenosis)."""
        return (self.difference < 0) if self.type in _SMALLER_IS_WORSE else (self.difference > 0)


@dataclass(frozen=True)
class LevelChange:
    """What changed for one finding at one level since the prior study."""

    level: str
    finding: FindingType
    laterality: Laterality | None
    kind: ChangeKind
    current: ComparedFinding | None
    prior: ComparedFinding | None
    measurements: tuple[MeasurementChange, ...] = ()


@dataclass(frozen=True)
class Comparison:
    """The comparison of a study with its prior, or why there is none.

    Exactly one of ``prior`` (with ``changes``) and ``unavailable`` is set.
    """

    prior: PriorReport | None
    interval_days: int | None
    changes: tuple[LevelChange, ...] = ()
    unavailable: str | None = None

    def __post_init__(self) -> None:
        if (self.prior is None) == (self.unavailable is None):
            raise ValueError("prior, unavailable: exactly one must be given")

    @classmethod
    def without_prior(cls, reason: str) -> Comparison:
        """No comparison, and why (``"no prior study of this region found"``, a PACS error, ...)."""
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("reason: a comparison without a prior says why")
        return cls(prior=None, interval_days=None, unavailable=reason.strip())


def _present(f: ComparedFinding) -> bool:
    return f.finding is not FindingType.NO_ABNORMALITY and f.severity is not Severity.NONE


def _key(f: ComparedFinding) -> tuple[FindingType, str, Laterality | None]:
    if f.finding is FindingType.SCOLIOSIS:
        return (f.finding, "", None)
    return (f.finding, f.level, f.laterality)


def _span(findings: Sequence[ComparedFinding]) -> tuple[int, int] | None:
    keys = [level_sort_key(f.level) for f in findings]
    return (min(keys), max(keys)) if keys else None


def _covers(span: tuple[int, int] | None, level: str) -> bool:
    return span is not None and span[0] <= level_sort_key(level) <= span[1]


def _measurement_changes(prior: ComparedFinding, current: ComparedFinding) -> tuple[MeasurementChange, ...]:
    before = {m.type: m for m in prior.measurements}
    out = []
    for m in current.measurements:
        if m.type in before:
            out.append(MeasurementChange(m.type, m.unit, before[m.type].value, m.value))
    return tuple(out)


def _kind(prior: ComparedFinding, current: ComparedFinding, changes: Sequence[MeasurementChange]) -> ChangeKind:
    for change in changes:
        if change.significant:
            return ChangeKind.INCREASED if change.grew else ChangeKind.DECREASED
    if changes:  # measured both times, within the measurement error: the grading alone does not overrule it
        return ChangeKind.UNCHANGED
    if (prior.grade or 0) != (current.grade or 0):
        return ChangeKind.INCREASED if (current.grade or 0) > (prior.grade or 0) else ChangeKind.DECREASED
    a, b = _SEVERITY_ORDER[prior.severity], _SEVERITY_ORDER[current.severity]
    if a != b:
        return ChangeKind.INCREASED if b > a else ChangeKind.DECREASED
    return ChangeKind.UNCHANGED


def compare_with_prior(
    current: Sequence[ComparedFinding], prior: PriorReport, current_date: _dt.date | None
) -> Comparison:
    """Compare the current findings with a prior report's, level by level (cranio-caudal order).

    Raises
    ------
    TypeError
        ``prior`` is not a :class:`PriorReport`.
    """
    if not isinstance(prior, PriorReport):
        raise TypeError(f"prior: expected PriorReport, got {type(prior).__name__}")
    interval = None
    if current_date is not None and prior.study_date is not None:
        interval = (current_date - prior.study_date).days
    now = {_key(f): f for f in current if _present(f)}
    then = {_key(f): f for f in prior.findings if _present(f)}
    prior_span, current_span = _span(prior.findings), _span(current)
    changes: list[LevelChange] = []
    for key, f in now.items():
        before = then.get(key)
        if before is None:
            if _covers(prior_span, f.level):
                changes.append(LevelChange(f.level, f.finding, f.laterality, ChangeKind.NEW, f, None))
            continue
        measured = _measurement_changes(before, f)
        changes.append(LevelChange(f.level, f.finding, f.laterality, _kind(before, f, measured), f, before, measured))
    for key, before in then.items():
        if key not in now and _covers(current_span, before.level):
            changes.append(LevelChange(before.level, before.finding, before.laterality, ChangeKind.NOT_SEEN,
                                       None, before))
    changes.sort(key=lambda c: (level_sort_key(c.level), c.finding.value, c.laterality or ""))
    return Comparison(prior=prior, interval_days=interval, changes=tuple(changes))


_NAMES = {
    MeasurementType.COBB_ANGLE: "Cobb angle",
    MeasurementType.SLIP_PERCENTAGE: "slip",
    MeasurementType.SLIP_DISTANCE: "slip",
    MeasurementType.CANAL_AP_DIAMETER: "canal AP diameter",
    MeasurementType.DISC_HEIGHT: "disc height",
    MeasurementType.VERTEBRAL_HEIGHT_LOSS: "height loss",
}


def _value(v: float, unit: str) -> str:
    return f"{v:g}{'%' if unit == '%' else ' deg' if unit == 'deg' else ' ' + unit}"


def _signed(v: float, unit: str) -> str:
    return ("+" if v > 0 else "") + _value(v, unit)


def _finding_words(c: LevelChange) -> str:
    name = c.finding.value.replace("_", " ")
    where = c.level if c.finding is not FindingType.SCOLIOSIS or not c.level else f"apex {c.level}"
    side = f" ({c.laterality.value})" if c.laterality is not None else ""
    return f"{where}: {name}{side}"


def _change_line(c: LevelChange) -> str:
    head = _finding_words(c)
    if c.kind is ChangeKind.NEW:
        return f"{head}: new since the prior study"
    if c.kind is ChangeKind.NOT_SEEN:
        return f"{head}: reported in the prior study, not seen now"
    parts = [f"{_NAMES[m.type]} {_value(m.prior, m.unit)} then, {_value(m.current, m.unit)} now "
             f"({_signed(m.difference, m.unit)})" for m in c.measurements]
    if not c.measurements and c.prior is not None and c.current is not None:
        if c.prior.grade != c.current.grade:
            parts.append(f"grade {c.prior.grade or '-'} then, {c.current.grade or '-'} now")
        if c.prior.severity != c.current.severity:
            parts.append(f"{c.prior.severity.value} then, {c.current.severity.value} now")
    word = {ChangeKind.INCREASED: "increased", ChangeKind.DECREASED: "decreased",
            ChangeKind.UNCHANGED: "no significant change"}[c.kind]
    return f"{head}: {word}" + (f"; {'; '.join(parts)}" if parts else "")


def comparison_lines(comparison: Comparison) -> list[str]:
    """The comparison as short sentences for the narrative's follow-up section (no identifiers)."""
    if comparison.prior is None:
        return [f"Comparison with prior studies: not available ({comparison.unavailable})."]
    when = comparison.prior.study_date.isoformat() if comparison.prior.study_date else "date unknown"
    interval = f", {comparison.interval_days} days earlier" if comparison.interval_days is not None else ""
    lines = [f"Compared with the prior study of {when}{interval}."]
    if not comparison.changes:
        lines.append("No finding to compare at the levels both studies show.")
    lines += [_change_line(c) + "." for c in comparison.changes]
    return lines


def comparison_context(prior: PriorReport, current_date: _dt.date | None) -> str:
    """The prior's findings as one line of clinical context for the model's prompt."""
    when = prior.study_date.isoformat() if prior.study_date else "an earlier date"
    days = ""
    if current_date is not None and prior.study_date is not None:
        days = f" ({(current_date - prior.study_date).days} days before this study)"
    present = [f for f in prior.findings if _present(f)]
    if not present:
        return f"Prior study of {when}{days}: no abnormal finding reported."
    items = []
    for f in present:
        text = f"{f.level} {f.finding.value.replace('_', ' ')} {f.severity.value}"
        if f.grade is not None:
            text += f" grade {f.grade}"
        if f.laterality is not None:
            text += f" {f.laterality.value}"
        text += "".join(f" {_NAMES[m.type]} {_value(m.value, m.unit)}" for m in f.measurements)
        items.append(text)
    return f"Prior study of {when}{days}: " + "; ".join(items) + ". Compare and state changes."
