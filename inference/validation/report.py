"""Write a validation's outputs: ``metrics.json``, ``cases.csv`` and a self-contained ``report.html``.

No patient identifiers leave: studies are named by case number and the label file's own study id
(RSNA ``study_id``, our CSV's ``study``; empty for SR labels, whose only id is a UID).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from inference.findings import ModelIdentity
from inference.validation.metrics import Metrics
from inference.validation.plots import calibration_svg, confusion_svg, data_uri, histogram_svg, interval_svg

__all__ = ["DEMO_NOTICE", "write_outputs"]

DEMO_NOTICE = "demo — not for clinical use"
_GRADES = ("Normal/Mild", "Moderate", "Severe")


def _fmt(est: dict[str, Any] | None, digits: int = 3) -> str:
    if not est or est.get("value") is None:
        reason = (est or {}).get("reason", "")
        return f'<span class="na" title="{escape(reason)}">n/a</span>' + (
            f' <small>({escape(reason)})</small>' if reason else "")
    text = f"{est['value']:.{digits}f}"
    if est.get("ci95"):
        lo, hi = est["ci95"]
        text += f" <small>[{lo:.{digits}f}, {hi:.{digits}f}]</small>"
    return text


def _median(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _img(svg: str, alt: str) -> str:
    return f'<img class="plot" alt="{escape(alt)}" src="{data_uri(svg)}">'


def write_cases_csv(path: Path, metrics: Metrics) -> None:
    """One row per study × condition × level: truth, prediction, correct (no patient identifiers)."""
    with path.open("w", newline="", encoding="utf-8") as fp:
        w = csv.writer(fp)
        w.writerow(["case", "label_study_id", "condition", "level", "truth", "prediction", "correct",
                    "truth_positive", "prediction_positive", "p_normal_mild", "p_moderate", "p_severe",
                    "distance_mm"])
        for r in sorted(metrics.rows, key=lambda r: (r.case, r.condition.name, r.level)):
            pred = "not assessed by the model" if not r.condition.assessed else (
                r.predicted.label if r.predicted is not None else "not analysed")
            probs = [f"{p:.4f}" for p in r.probabilities] if r.probabilities else ["", "", ""]
            w.writerow([
                r.case, r.label_id, r.condition.name, r.level, r.truth.label, pred,
                "" if r.correct is None else str(r.correct).lower(),
                str(r.truth.positive).lower(),
                "" if r.predicted is None else str(r.predicted.positive).lower(),
                *probs,
                "" if r.distance_mm is None else f"{r.distance_mm:.2f}",
            ])


def write_outputs(
    out: Path,
    metrics: Metrics,
    *,
    models: Sequence[ModelIdentity],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Write ``metrics.json``, ``cases.csv`` and ``report.html`` to ``out``; returns the JSON written.

    ``summary`` holds the run's counts (studies labelled, found, analysed, not analysed with reasons).
    """
    out.mkdir(parents=True, exist_ok=True)
    demo = any(m.demo for m in models)
    doc: dict[str, Any] = {
        "notice": DEMO_NOTICE if demo else None,
        "demo": demo,
        "models": [m.model_dump(mode="json") for m in models],
        **summary,
        **metrics.data,
    }
    (out / "metrics.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_cases_csv(out / "cases.csv", metrics)
    (out / "report.html").write_text(_html(doc, metrics), encoding="utf-8")
    return doc


def _html(doc: dict[str, Any], metrics: Metrics) -> str:
    parts: list[str] = []
    if doc["demo"]:
        parts.append(f'<div id="demo-notice" class="demo">{escape(DEMO_NOTICE.upper())}: the tiny random demo '
                     "model — these numbers show the validation tool working, at chance level, and say "
                     "nothing about any clinical model.</div>")
    parts.append("<h1>Site validation</h1>")
    model_lines = "".join(
        f"<li>{escape(m['name'])} — version {escape(m['version'])}, backend {escape(m['backend'])}, "
        f"prompt {escape(m['prompt_version'])}, weights sha256 {escape(m['weights_digest'][:16])}…</li>"
        for m in doc["models"]) or "<li>(no study analysed)</li>"
    st = doc["studies"]
    parts.append(f"<h2>Model</h2><ul>{model_lines}</ul>")
    parts.append(
        "<h2>Cases</h2><ul>"
        f"<li>labels: {escape(doc['labels']['format'])} format, {st['labelled']} labelled studies</li>"
        f"<li>found in the images: {st['found']}; analysed: {st['analysed']}</li>"
        f"<li>not analysed: {len(st['not_analysed'])}"
        + "".join(f"<br><small>case {x['case']}: {escape(x['reason'])}</small>" for x in st["not_analysed"])
        + "</li>"
        f"<li>labelled studies without images: {st['labels_without_images']}; studies without labels: "
        f"{st['images_without_labels']}</li>"
        f"<li>positive = {escape(doc['positive'])}; 95% intervals: study bootstrap, "
        f"{doc['bootstrap']['resamples']} resamples, seed {doc['bootstrap']['seed']}</li></ul>")

    parts.append("<h2>Per condition</h2>")
    for name, c in doc["conditions"].items():
        parts.append(f'<h3 class="condition">{escape(name)}</h3>')
        if not c["assessed"]:
            parts.append(f'<p class="na">{escape(c["note"])} ({c["cells"]} labelled cells)</p>')
            continue
        rows = "".join(
            f"<tr><td>{escape(level)}</td><td>{v['cells']}</td><td>{_fmt(v['sensitivity'])}</td>"
            f"<td>{_fmt(v['specificity'])}</td><td>{_fmt(v['ppv'])}</td><td>{_fmt(v['npv'])}</td></tr>"
            for level, v in c["levels"].items())
        a = c["all_levels"]
        rows += (f"<tr class='all'><td>all levels</td><td>{c['cells']}</td><td>{_fmt(a['sensitivity'])}</td>"
                 f"<td>{_fmt(a['specificity'])}</td><td>{_fmt(a['ppv'])}</td><td>{_fmt(a['npv'])}</td></tr>")
        parts.append("<table><tr><th>level</th><th>cells</th><th>sensitivity</th><th>specificity</th>"
                     f"<th>PPV</th><th>NPV</th></tr>{rows}</table>")
        parts.append(f"<p>severity agreement (quadratic-weighted κ): {_fmt(c['quadratic_weighted_kappa'])}</p>")
        series = []
        for label, key, colour in (("sensitivity", "sensitivity", "#c33"), ("specificity", "specificity", "#36c")):
            pts = [(lvl, v[key]["value"], *(v[key]["ci95"] or (None, None))) for lvl, v in c["levels"].items()]
            series.append((label, colour, pts))
        parts.append('<div class="plots">'
                     + _img(confusion_svg(f"{name}: grades", c["confusion"], _GRADES), f"{name} confusion matrix")
                     + _img(interval_svg(f"{name}: per level (95% CI)", series), f"{name} sensitivity/specificity")
                     + "</div>")

    sa = doc["severity_agreement"]
    parts.append("<h2>Across conditions</h2><table>"
                 f"<tr><td>severity agreement, all assessed conditions (quadratic-weighted κ)</td>"
                 f"<td>{_fmt(sa['quadratic_weighted_kappa'])}</td></tr>"
                 f"<tr><td>level identification accuracy</td><td>{_fmt(doc['level_identification_accuracy'])}</td></tr>"
                 f"<tr><td>localisation distance, mean (mm)</td><td>{_fmt(doc['localisation_mm']['mean'], 2)}"
                 f" (median {_median(doc['localisation_mm']['median'])},"
                 f" n={doc['localisation_mm']['n']})</td></tr>"
                 f"<tr><td>Cobb angle MAE (°), {doc['cobb']['angles']} angles</td>"
                 f"<td>{_fmt(doc['cobb']['mae_deg'], 2)}</td></tr>"
                 f"<tr><td>Cobb angle SMAPE (%), {doc['cobb']['studies']} studies</td>"
                 f"<td>{_fmt(doc['cobb']['smape_percent'], 2)}</td></tr>"
                 f"<tr><td>model findings outside the labelled cells (not scored)</td>"
                 f"<td>{doc['model_findings_outside_labelled_cells']}</td></tr></table>")
    ll = doc["log_loss"]
    if ll["available"]:
        groups = "".join(f"<tr><td>{escape(g)}</td><td>{_fmt(v)}</td></tr>" for g, v in ll["per_group"].items())
        parts.append("<h2>RSNA 2024 sample-weighted log loss</h2><table>"
                     f"{groups}<tr><td>any_severe_spinal</td><td>{_fmt(ll['any_severe_spinal'])}</td></tr>"
                     f"<tr class='all'><td>score</td><td>{_fmt(ll['score'])}"
                     f"{('<br><small>' + escape(ll['score']['note']) + '</small>') if ll['score'].get('note') else ''}"
                     "</td></tr></table>")
    else:
        parts.append(f'<h2>RSNA 2024 sample-weighted log loss</h2><p class="na">{escape(ll["reason"])}</p>')
    plots = []
    if metrics.calibration:
        plots.append(_img(calibration_svg("calibration", metrics.calibration), "calibration"))
    if metrics.distances:
        plots.append(_img(histogram_svg("localisation error", metrics.distances), "localisation error histogram"))
    if plots:
        parts.append('<div class="plots">' + "".join(plots) + "</div>")
    parts.append("<p><small>Per-case rows: cases.csv; every number: metrics.json. Formulas and limits: "
                 "docs/validation.md.</small></p>")
    title = "Site validation" + (f" — {DEMO_NOTICE}" if doc["demo"] else "")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        "<style>body{font-family:sans-serif;margin:24px;max-width:1100px;color:#222}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "tr.all{font-weight:bold}.na{color:#777}.demo{background:#b00;color:#fff;font-weight:bold;padding:10px;"
        "font-size:18px}.plots{display:flex;flex-wrap:wrap;gap:12px}img.plot{border:1px solid #eee}</style>"
        "</head><body>" + "".join(parts) + "</body></html>\n"
    )
