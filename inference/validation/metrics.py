"""Validation metrics with 95 % bootstrap intervals (studies resampled; numpy only).

Every metric here is a function of sums over studies (counts, confusion matrices, weighted losses), so
the bootstrap draws one matrix of study multiplicities (``resamples`` × studies, a fixed seed) and
evaluates each metric on the resampled sums: deterministic, and fast.  The interval is the percentile
interval of the resampled values; a metric that is undefined on the data (no positives for a
sensitivity) is ``None`` with its reason, never NaN.

Formulas are in docs/validation.md.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.findings import FindingType, GradeProbabilities, Laterality, LevelFinding, SpineFindings
from inference.validation.labels import CobbTruth, Condition, Grade, StudyTruth, TruthCell

__all__ = [
    "CaseInput",
    "CellRow",
    "Estimate",
    "Metrics",
    "Resampler",
    "cobb_pairs",
    "compute_metrics",
    "log_loss_terms",
    "quadratic_kappa",
    "score_case",
]

Point = tuple[float, float, float]
FloatArray = npt.NDArray[np.float64]
_EPS = 1e-15
WEIGHTS = {Grade.NORMAL_MILD: 1.0, Grade.MODERATE: 2.0, Grade.SEVERE: 4.0}
RSNA_GROUPS = ("spinal", "foraminal", "subarticular")


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95 % bootstrap interval; ``value`` ``None`` with ``reason`` where undefined."""

    value: float | None
    low: float | None = None
    high: float | None = None
    n: int = 0
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": _r(self.value), "ci95": None, "n": self.n}
        if self.low is not None and self.high is not None:
            out["ci95"] = [_r(self.low), _r(self.high)]
        if self.reason:
            out["reason"] = self.reason
        return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 6)


class Resampler:
    """Study-level bootstrap: ``counts[b, i]`` is how often study ``i`` is drawn in resample ``b``.

    Parameters
    ----------
    n_studies
        Number of studies.
    resamples
        Number of bootstrap resamples (1000 by default in :func:`compute_metrics`).
    seed
        Seed of numpy's default generator: the same seed gives the same intervals.
    """

    def __init__(self, n_studies: int, resamples: int, seed: int) -> None:
        if n_studies < 0:
            raise ValueError(f"n_studies: must be >= 0, got {n_studies}")
        if resamples < 1:
            raise ValueError(f"resamples: must be >= 1, got {resamples}")
        self.n = n_studies
        self.resamples = resamples
        self.seed = seed
        rng = np.random.default_rng(seed)
        if n_studies:
            self.counts = rng.multinomial(n_studies, np.full(n_studies, 1.0 / n_studies), size=resamples).astype(float)
        else:
            self.counts = np.zeros((resamples, 0))

    def estimate(
        self,
        per_study: FloatArray,
        statistic: Callable[[FloatArray], FloatArray],
        *,
        n: int,
        reason: str,
    ) -> Estimate:
        """``statistic`` of the column sums of ``per_study`` (studies × k), with its bootstrap interval.

        ``statistic`` maps sums (m × k) to m values, NaN where undefined; ``reason`` says why when the
        point estimate is undefined.
        """
        per_study = np.asarray(per_study, dtype=float)
        per_study = per_study.reshape(self.n, -1) if self.n else per_study.reshape(0, max(per_study.shape[-1], 1))
        point = float(statistic(per_study.sum(axis=0, keepdims=True))[0])
        if not math.isfinite(point):
            return Estimate(None, n=n, reason=reason)
        boot = statistic(self.counts @ per_study)
        boot = boot[np.isfinite(boot)]
        if boot.size == 0:
            return Estimate(point, n=n, reason="no bootstrap resample defines it")
        low, high = np.percentile(boot, [2.5, 97.5])
        return Estimate(point, float(low), float(high), n=n)

    def ratio(self, num: Sequence[float] | FloatArray, den: Sequence[float] | FloatArray, *, reason: str) -> Estimate:
        """sum(num) / sum(den) over studies."""
        x = np.column_stack([np.asarray(num, float), np.asarray(den, float)]) if self.n else np.zeros((0, 2))
        return self.estimate(x, _ratio, n=round(float(np.sum(den))) if self.n else 0, reason=reason)


def _ratio(s: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s[:, 1] > 0, s[:, 0] / np.where(s[:, 1] > 0, s[:, 1], 1.0), np.nan)


def quadratic_kappa(confusion: FloatArray) -> FloatArray:
    """Quadratic-weighted Cohen's kappa of confusion matrices (m × k × k, rows truth, columns prediction);
    NaN where the expected disagreement is zero (a single class in both)."""
    c = np.asarray(confusion, float)
    if c.ndim == 2:
        c = c[None]
    k = c.shape[-1]
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    w = (i - j) ** 2 / (k - 1) ** 2
    total = c.sum(axis=(1, 2))
    rows, cols = c.sum(axis=2), c.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = rows[:, :, None] * cols[:, None, :] / np.where(total > 0, total, 1.0)[:, None, None]
        observed_w = (w * c).sum(axis=(1, 2))
        expected_w = (w * expected).sum(axis=(1, 2))
        out = np.where(expected_w > 0, 1.0 - observed_w / np.where(expected_w > 0, expected_w, 1.0), np.nan)
    return np.asarray(out, float)


# ------------------------------------------------------------------------------------------ per case
@dataclass(frozen=True)
class CaseInput:
    """One labelled study and what the model said (``findings`` ``None``: not analysed, ``reason`` why).

    ``truth_points_mm`` holds the labeller's points of each cell in patient LPS mm, where the image
    geometry resolves them (the runner does that, from the study's headers).
    """

    case: int
    truth: StudyTruth
    findings: SpineFindings | None
    reason: str | None = None
    truth_points_mm: dict[tuple[str, str], tuple[Point, ...]] = field(default_factory=dict)
    label_id: str = ""


@dataclass(frozen=True)
class CellRow:
    """One study × condition × level: the row of ``cases.csv``.  ``predicted`` ``None``: not assessed."""

    case: int
    label_id: str
    condition: Condition
    level: str
    truth: Grade
    predicted: Grade | None
    probabilities: tuple[float, float, float] | None = None
    distance_mm: float | None = None

    @property
    def correct(self) -> bool | None:
        return None if self.predicted is None else self.predicted == self.truth


def _side_matches(cond: Condition, laterality: Laterality | None) -> bool:
    if cond.side is None:
        return True
    # a foraminal finding without a side, or bilateral, stands for both sides
    return laterality in (cond.side, Laterality.BILATERAL, None)


def _matching(findings: SpineFindings, cond: Condition, level: str | None) -> list[LevelFinding]:
    return [
        f
        for f in findings.levels
        if f.finding is cond.finding and (level is None or f.level == level) and _side_matches(cond, f.laterality)
    ]


def _probabilities(findings: SpineFindings, cond: Condition, level: str) -> tuple[float, float, float] | None:
    hits: list[GradeProbabilities] = [
        g
        for g in findings.grade_probabilities
        if g.finding is cond.finding and g.level == level and (cond.side is None or g.laterality in (cond.side, None))
    ]
    if not hits:
        return None
    g = hits[0]
    total = g.normal_mild + g.moderate + g.severe
    return (g.normal_mild / total, g.moderate / total, g.severe / total)


def _apply(matrix: Sequence[float], x: float, y: float) -> Point:
    m = np.asarray(matrix, float)
    v = m.reshape(3, 4) @ np.array([x, y, 0.0, 1.0]) if m.size == 12 else m.reshape(3, 3) @ np.array([x, y, 1.0])
    return (float(v[0]), float(v[1]), float(v[2]))


def model_points(findings: SpineFindings, finding: LevelFinding) -> list[Point]:
    """A finding's evidence points in patient LPS mm (those on images with a known geometry)."""
    out: list[Point] = []
    for e in finding.evidence:
        if e.x is None or e.y is None:
            continue
        image = findings.images[e.image]
        if image.pixel_to_patient is not None:
            out.append(_apply(image.pixel_to_patient, e.x, e.y))
    return out


def _distance(a: Point, b: Point) -> float:
    return float(np.linalg.norm(np.subtract(a, b)))


@dataclass
class CaseScore:
    """Everything one study contributes."""

    rows: list[CellRow]
    level_checks: list[bool]
    cobb: list[tuple[float, float]]
    outside: int


def cobb_pairs(truth: Sequence[CobbTruth], findings: SpineFindings) -> list[tuple[float, float]]:
    """(labelled, model) Cobb angle pairs of one study: both lists in cranio-caudal order of their upper
    end vertebra (else as listed) and paired in order; a labelled angle the model did not give is paired
    with 0° (as AASCE scores a missing angle)."""
    from inference.findings import MeasurementType, level_sort_key

    def key(upper: str | None) -> int:
        return level_sort_key(upper) if upper else 0

    model = [
        (m.value, m.upper_end_vertebra)
        for f in findings.levels
        for m in f.measurements
        if m.type is MeasurementType.COBB_ANGLE
    ]
    model_sorted = [v for v, _ in sorted(model, key=lambda t: key(t[1]))]
    truth_sorted = [t.angle_deg for t in sorted(truth, key=lambda t: key(t.upper))]
    return [(t, model_sorted[i] if i < len(model_sorted) else 0.0) for i, t in enumerate(truth_sorted)]


def score_case(case: CaseInput) -> CaseScore:
    """Compare one study's truth with the model's findings (``case.findings`` must be set)."""
    findings = case.findings
    if findings is None:
        raise ValueError("case: not analysed, nothing to score")
    rows: list[CellRow] = []
    for (name, level), cell in sorted(case.truth.cells.items()):
        rows.append(_row(case, findings, cell, name, level))
    # level identification: each localised model finding against the nearest labelled point of its condition
    checks: list[bool] = []
    by_condition: dict[str, list[tuple[str, Point]]] = {}
    for (name, level), pts in case.truth_points_mm.items():
        by_condition.setdefault(name, []).extend((level, p) for p in pts)
    conditions = {cell.condition.name: cell.condition for cell in case.truth.cells.values()}
    for name, labelled in by_condition.items():
        cond = conditions[name]
        if not cond.assessed:
            continue
        for f in _matching(findings, cond, None):
            for p in model_points(findings, f)[:1]:
                nearest = min(labelled, key=lambda lp: _distance(lp[1], p))
                checks.append(nearest[0] == f.level)
    assessed = {(c.finding, c.side) for c in conditions.values() if c.assessed}
    labelled_cells = {(c.condition.finding, c.level) for c in case.truth.cells.values()}
    outside = sum(
        1
        for f in findings.levels
        if not f.absent
        and f.finding is not FindingType.NO_ABNORMALITY
        and any(fi is f.finding for fi, _ in assessed)
        and (f.finding, f.level) not in labelled_cells
    )
    cobb = cobb_pairs(case.truth.cobb, findings) if case.truth.cobb else []
    return CaseScore(rows, checks, cobb, outside)


def _row(case: CaseInput, findings: SpineFindings, cell: TruthCell, name: str, level: str) -> CellRow:
    cond = cell.condition
    if not cond.assessed:
        return CellRow(case.case, case.label_id, cond, level, cell.grade, None)
    hits = _matching(findings, cond, level)
    predicted = max((Grade.of(f.severity) for f in hits), default=Grade.NORMAL_MILD)
    distance: float | None = None
    truth_pts = case.truth_points_mm.get((name, level), ())
    if truth_pts:
        dists = [_distance(p, t) for f in hits for p in model_points(findings, f) for t in truth_pts]
        distance = min(dists) if dists else None
    return CellRow(
        case.case, case.label_id, cond, level, cell.grade, predicted, _probabilities(findings, cond, level), distance
    )


# ------------------------------------------------------------------------------------------ log loss
def log_loss_terms(
    rows: Sequence[CellRow],
) -> tuple[dict[str, tuple[float, float]], tuple[float, float] | None]:
    """One study's contribution to the RSNA 2024 sample-weighted log loss.

    Returns ``{group: (Σ w·(−log p_true), Σ w)}`` over the rows with probabilities (weights 1/2/4 for
    Normal/Mild, Moderate, Severe), and the study's ``any_severe_spinal`` term ``(w·loss, w)``: label =
    any severe spinal canal stenosis, prediction = the largest severe probability over its spinal levels,
    weight = the largest weight of its spinal rows; ``None`` without spinal rows with probabilities.
    """
    groups: dict[str, tuple[float, float]] = {}
    spinal: list[CellRow] = []
    for r in rows:
        if r.probabilities is None:
            continue
        w = WEIGHTS[r.truth]
        p = min(max(r.probabilities[int(r.truth)], _EPS), 1.0 - _EPS)
        num, den = groups.get(r.condition.group, (0.0, 0.0))
        groups[r.condition.group] = (num - w * math.log(p), den + w)
        if r.condition.group == "spinal":
            spinal.append(r)
    any_severe: tuple[float, float] | None = None
    if spinal:
        y = any(r.truth is Grade.SEVERE for r in spinal)
        w = max(WEIGHTS[r.truth] for r in spinal)
        p = min(max(max(r.probabilities[2] for r in spinal if r.probabilities), _EPS), 1.0 - _EPS)
        loss = -math.log(p) if y else -math.log(1.0 - p)
        any_severe = (w * loss, w)
    return groups, any_severe


# ------------------------------------------------------------------------------------------ aggregate
@dataclass
class Metrics:
    """All metrics of one validation run (see :meth:`to_json`), and the per-case rows."""

    rows: list[CellRow]
    data: dict[str, Any]
    distances: list[float]
    calibration: list[dict[str, float]] | None


def _binary(resampler: Resampler, counts: FloatArray) -> dict[str, Estimate]:
    """counts: studies × 4 (tp, fn, tn, fp)."""
    tp, fn, tn, fp = (counts[:, i] for i in range(4))
    return {
        "sensitivity": resampler.ratio(tp, tp + fn, reason="no positive (moderate or severe) case in the labels"),
        "specificity": resampler.ratio(tn, tn + fp, reason="no negative (normal/mild) case in the labels"),
        "ppv": resampler.ratio(tp, tp + fp, reason="the model called no case positive"),
        "npv": resampler.ratio(tn, tn + fn, reason="the model called no case negative"),
    }


def _counts(rows: Sequence[CellRow]) -> npt.NDArray[np.float64]:
    out = np.zeros(4)
    for r in rows:
        if r.predicted is None:
            continue
        t, p = r.truth.positive, r.predicted.positive
        out[0 if t and p else 1 if t else 3 if p else 2] += 1
    return out


def _confusion(rows: Sequence[CellRow]) -> npt.NDArray[np.float64]:
    c = np.zeros((3, 3))
    for r in rows:
        if r.predicted is not None:
            c[int(r.truth), int(r.predicted)] += 1
    return c


def _kappa(resampler: Resampler, per_study: Sequence[npt.NDArray[np.float64]], n: int) -> Estimate:
    x = np.stack([c.ravel() for c in per_study]) if per_study else np.zeros((0, 9))
    return resampler.estimate(
        x,
        lambda s: quadratic_kappa(s.reshape(-1, 3, 3)),
        n=n,
        reason="undefined: the labels and the predictions use one grade only (no expected disagreement)",
    )


def compute_metrics(cases: Sequence[CaseInput], *, resamples: int = 1000, seed: int = 0) -> Metrics:
    """Score every analysed case and aggregate, with bootstrap intervals over the analysed studies.

    Raises
    ------
    ValueError
        ``resamples`` below 1.
    """
    analysed = [c for c in cases if c.findings is not None]
    scores = [score_case(c) for c in analysed]
    n = len(analysed)
    rs = Resampler(n, resamples, seed)
    rows = [r for s in scores for r in s.rows]
    # also list the cells of studies the model did not analyse (prediction empty) in cases.csv
    for c in cases:
        if c.findings is None:
            rows.extend(
                CellRow(c.case, c.label_id, cell.condition, cell.level, cell.grade, None)
                for cell in c.truth.cells.values()
            )

    conditions: dict[str, Condition] = {}
    for s in scores:
        for r in s.rows:
            conditions.setdefault(r.condition.name, r.condition)
    per_condition: dict[str, Any] = {}
    all_conf: list[npt.NDArray[np.float64]] = []
    for name, cond in sorted(conditions.items()):
        if not cond.assessed:
            n_cells = sum(1 for s in scores for r in s.rows if r.condition.name == name)
            per_condition[name] = {"assessed": False, "note": f"not assessed by the model: {cond.note}",
                                   "cells": n_cells}
            continue
        levels = sorted({r.level for s in scores for r in s.rows if r.condition.name == name},
                        key=_level_key)
        by_level: dict[str, Any] = {}
        for level in levels:
            counts = np.stack([_counts([r for r in s.rows if r.condition.name == name and r.level == level])
                               for s in scores])
            by_level[level] = {"cells": int(counts.sum()), **{k: v.to_json() for k, v in _binary(rs, counts).items()}}
        counts = np.stack([_counts([r for r in s.rows if r.condition.name == name]) for s in scores])
        conf = [_confusion([r for r in s.rows if r.condition.name == name]) for s in scores]
        all_conf.append(np.sum(conf, axis=0))
        per_condition[name] = {
            "assessed": True,
            "finding": cond.finding.value if cond.finding else None,
            "side": cond.side.value if cond.side else None,
            "cells": int(counts.sum()),
            "all_levels": {k: v.to_json() for k, v in _binary(rs, counts).items()},
            "levels": by_level,
            "quadratic_weighted_kappa": _kappa(rs, conf, int(counts.sum())).to_json(),
            "confusion": np.sum(conf, axis=0).astype(int).tolist(),
        }
    overall_conf = [_confusion(s.rows) for s in scores]
    n_scored = int(sum(c.sum() for c in overall_conf))
    kappa = _kappa(rs, overall_conf, n_scored)

    # level identification and localisation
    level_num = [float(sum(s.level_checks)) for s in scores]
    level_den = [float(len(s.level_checks)) for s in scores]
    level_id = rs.ratio(level_num, level_den, reason="no localised model finding of a condition with labelled points")
    dist = [[r.distance_mm for r in s.rows if r.distance_mm is not None] for s in scores]
    distances = [d for ds in dist for d in ds]
    loc_mean = rs.ratio([sum(d) for d in dist], [len(d) for d in dist],
                        reason="no cell with both a labelled point and a localised model finding")

    # Cobb angles
    cobb_abs = [sum(abs(a - b) for a, b in s.cobb) for s in scores]
    cobb_n = [float(len(s.cobb)) for s in scores]
    smape = [
        100.0 * sum(abs(a - b) for a, b in s.cobb) / sum(a + b for a, b in s.cobb)
        if s.cobb and sum(a + b for a, b in s.cobb) > 0 else 0.0
        for s in scores
    ]
    has_cobb = [1.0 if s.cobb and sum(a + b for a, b in s.cobb) > 0 else 0.0 for s in scores]
    cobb = {
        "angles": int(sum(cobb_n)),
        "studies": int(sum(has_cobb)),
        "mae_deg": rs.ratio(cobb_abs, cobb_n, reason="no labelled Cobb angle").to_json(),
        "smape_percent": rs.ratio(smape, has_cobb, reason="no labelled Cobb angle").to_json(),
    }

    log_loss, calibration = _log_loss(rs, scores)
    data: dict[str, Any] = {
        "positive": "a grade of moderate or severe (Normal/Mild is negative)",
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": "study", "interval": "95% percentile"},
        "conditions": per_condition,
        "severity_agreement": {"quadratic_weighted_kappa": kappa.to_json(), "confusion": (
            np.sum(overall_conf, axis=0).astype(int).tolist() if overall_conf else [[0] * 3] * 3)},
        "level_identification_accuracy": level_id.to_json(),
        "localisation_mm": {
            "mean": loc_mean.to_json(),
            "median": _r(float(np.median(distances))) if distances else None,
            "n": len(distances),
        },
        "cobb": cobb,
        "log_loss": log_loss,
        "calibration": calibration,
        "model_findings_outside_labelled_cells": int(sum(s.outside for s in scores)),
    }
    return Metrics(rows, data, distances, calibration)


def _level_key(level: str) -> int:
    from inference.findings import level_sort_key

    return level_sort_key(level)


def _log_loss(rs: Resampler, scores: Sequence[CaseScore]) -> tuple[dict[str, Any], list[dict[str, float]] | None]:
    assessed = [r for s in scores for r in s.rows if r.predicted is not None]
    with_p = [r for r in assessed if r.probabilities is not None]
    if not with_p:
        return {"available": False,
                "reason": "not available (backend gives no per-grade probabilities)"}, None
    groups = sorted({r.condition.group for r in assessed})
    terms = [log_loss_terms(s.rows) for s in scores]
    per_group: dict[str, Any] = {}
    usable: list[str] = []
    for g in groups:
        missing = sum(1 for r in assessed if r.condition.group == g and r.probabilities is None)
        if missing:
            per_group[g] = Estimate(None, reason=f"probabilities missing for {missing} labelled cells").to_json()
            continue
        num = [t[0].get(g, (0.0, 0.0))[0] for t in terms]
        den = [t[0].get(g, (0.0, 0.0))[1] for t in terms]
        per_group[g] = rs.ratio(num, den, reason="no weighted cell").to_json()
        usable.append(g)
    spinal_ok = "spinal" in usable
    any_num = [t[1][0] if spinal_ok and t[1] else 0.0 for t in terms]
    any_den = [t[1][1] if spinal_ok and t[1] else 0.0 for t in terms]
    any_severe = rs.ratio(any_num, any_den, reason="no spinal canal stenosis cells with probabilities")
    rsna = [g for g in RSNA_GROUPS if g in usable]
    # the score: mean of the RSNA groups' losses and any_severe_spinal, each a ratio of study sums
    cols: list[FloatArray] = []
    for g in rsna:
        cols.append(np.array([t[0].get(g, (0.0, 0.0))[0] for t in terms]))
        cols.append(np.array([t[0].get(g, (0.0, 0.0))[1] for t in terms]))
    if any_severe.value is not None:
        cols.extend([np.array(any_num), np.array(any_den)])
    score: dict[str, Any]
    if cols:
        x = np.column_stack(cols)

        def mean_of_ratios(s: FloatArray) -> FloatArray:
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.asarray(np.mean(s[:, 0::2] / s[:, 1::2], axis=1), float)

        score = rs.estimate(x, mean_of_ratios, n=len(with_p), reason="no group").to_json()
        score["groups"] = [*rsna, *(["any_severe_spinal"] if any_severe.value is not None else [])]
        not_in = [g for g in RSNA_GROUPS if g not in rsna]
        if not_in:
            score["note"] = ("without " + ", ".join(not_in) + " (not assessed or no probabilities): not comparable "
                             "with the RSNA 2024 leaderboard score")
    else:
        score = Estimate(None, reason="no RSNA condition group with probabilities").to_json()
    # calibration of P(moderate or worse)
    bins = np.linspace(0.0, 1.0, 6)
    calibration: list[dict[str, float]] = []
    p_pos = np.array([r.probabilities[1] + r.probabilities[2] for r in with_p if r.probabilities])
    y_pos = np.array([1.0 if r.truth.positive else 0.0 for r in with_p])
    for lo, hi in itertools.pairwise(bins):
        sel = (p_pos >= lo) & ((p_pos < hi) if hi < 1.0 else (p_pos <= hi))
        if sel.any():
            calibration.append({"bin_low": float(lo), "bin_high": float(hi), "mean_predicted": float(p_pos[sel].mean()),
                                "observed": float(y_pos[sel].mean()), "n": int(sel.sum())})
    return {
        "available": True,
        "weights": {"normal_mild": 1, "moderate": 2, "severe": 4},
        "per_group": per_group,
        "any_severe_spinal": any_severe.to_json(),
        "score": score,
    }, calibration
