"""Routing rules: which series of a study feed the model.

A series is selected when it matches any ``[[routing.rules]]`` entry: its modality is listed, its
Body Part Examined is listed *or* a description pattern matches its series/study description or
protocol name, no exclude pattern matches, and its plane is allowed.  A study with no selected
series is skipped, and the reason for every series is recorded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from dicom_node.config import RoutingRule
from inference.study import Series, Study

__all__ = ["Selection", "SeriesDecision", "plane_of", "select_series"]

_PROJECTION_MODALITIES = frozenset({"CR", "DX", "RF", "XA", "MG", "PX"})
#: our own outputs and other non-image objects never feed the model
_NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "DOC", "REG", "SEG", "RTSTRUCT", "AU", "ECG"})


def plane_of(series: Series) -> str:
    """``sagittal`` / ``coronal`` / ``axial`` from Image Orientation (Patient), ``projection`` for
    radiographs, ``oblique`` when no axis dominates, ``unknown`` without orientation."""
    if series.modality in _PROJECTION_MODALITIES:
        return "projection"
    iop = series.image_orientation
    if iop is None:
        return "unknown"
    r, c = iop[:3], iop[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    a = [abs(v) for v in n]
    axis = max(range(3), key=lambda i: a[i])
    if a[axis] < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


@dataclass(frozen=True)
class SeriesDecision:
    series_instance_uid: str
    selected: bool
    rule: str | None
    reason: str


@dataclass(frozen=True)
class Selection:
    decisions: tuple[SeriesDecision, ...]

    @property
    def series_uids(self) -> list[str]:
        return [d.series_instance_uid for d in self.decisions if d.selected]

    @property
    def skip_reason(self) -> str:
        """Why nothing was selected, one clause per series (no identifiers)."""
        return "no series matched the routing rules: " + "; ".join(
            f"series {i + 1}: {d.reason}" for i, d in enumerate(self.decisions)
        )


def _match_rule(rule: RoutingRule, study: Study, series: Series) -> str | None:
    """``None`` when ``series`` matches ``rule``, else why not."""
    if series.modality.upper() not in rule.modalities:
        return f"modality {series.modality or '?'} not in {rule.name!r}"
    texts = [series.series_description, study.study_description, series.protocol_name]
    body_ok = series.body_part_examined.strip().upper() in rule.body_parts if rule.body_parts else False
    desc_ok = any(re.search(p, t) for p in rule.description_patterns for t in texts if t)
    if (rule.body_parts or rule.description_patterns) and not (body_ok or desc_ok):
        return f"body part {series.body_part_examined or '?'} / description not spine for {rule.name!r}"
    for p in rule.exclude_description_patterns:
        if any(re.search(p, t) for t in texts if t):
            return f"description excluded by {rule.name!r}"
    plane = plane_of(series)
    if "any" not in rule.orientations and plane not in rule.orientations:
        return f"plane {plane} not in {rule.name!r}"
    return None


def select_series(study: Study, rules: Sequence[RoutingRule]) -> Selection:
    """Decide, for every series of ``study``, whether it feeds the model."""
    decisions: list[SeriesDecision] = []
    for series in study.series:
        if series.modality.upper() in _NON_IMAGE_MODALITIES:
            decisions.append(
                SeriesDecision(
                    series.series_instance_uid, False, None, f"{series.modality} is not an image series"
                )
            )
            continue
        reasons: list[str] = []
        chosen: str | None = None
        for rule in rules:
            why = _match_rule(rule, study, series)
            if why is None:
                chosen = rule.name
                break
            reasons.append(why)
        if chosen is not None:
            decisions.append(SeriesDecision(series.series_instance_uid, True, chosen, f"matched {chosen!r}"))
        else:
            decisions.append(
                SeriesDecision(
                    series.series_instance_uid, False, None, "; ".join(reasons) or "no routing rules"
                )
            )
    return Selection(tuple(decisions))
