"""Run a validation: find the labelled studies in a folder, analyse each, score, write the outputs.

The analyser is passed in (``spinemed-node validate`` passes the node's pipeline): a callable taking a
:class:`~inference.study.Study` and returning the model's :class:`~inference.findings.SpineFindings`, or
a string saying why the study was not analysed (skipped by the routing rules, unusable images, a model
error).  Studies are matched to the labels by the name of their top folder under ``CASES``, their
Study Instance UID or their Study ID.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from inference.findings import ModelIdentity, SpineFindings
from inference.geometry import frame_geometry
from inference.study import Study, load_study, read_header
from inference.validation.labels import StudyTruth, TruthPoint, TruthSet, study_keys
from inference.validation.metrics import CaseInput, compute_metrics
from inference.validation.report import write_outputs

__all__ = ["Analyser", "CaseStudy", "ValidationResult", "discover_studies", "truth_point_mm", "validate_cases"]

#: study → findings, or the reason it was not analysed
Analyser = Callable[[Study], "SpineFindings | str"]


@dataclass
class CaseStudy:
    """One DICOM study found under the cases folder: where its files are and the names it goes by."""

    study_instance_uid: str
    study_id: str
    folders: set[str] = field(default_factory=set)
    headers: dict[Path, pydicom.Dataset] = field(default_factory=dict)

    def names(self) -> set[str]:
        return {n for n in (*self.folders, self.study_instance_uid, self.study_id) if n}


def discover_studies(cases: Path) -> list[CaseStudy]:
    """Every DICOM study under ``cases`` (any tree), grouped by Study Instance UID.

    Raises
    ------
    ValueError
        ``cases`` is not a folder.
    """
    if not cases.is_dir():
        raise ValueError(f"cases: {cases} is not a folder")
    found: dict[str, CaseStudy] = {}
    for path in sorted(p for p in cases.rglob("*") if p.is_file()):
        try:
            ds = read_header(path)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError):
            continue
        if "StudyInstanceUID" not in ds or "SOPInstanceUID" not in ds:
            continue
        uid = str(ds.StudyInstanceUID)
        cs = found.setdefault(uid, CaseStudy(uid, str(ds.get("StudyID", "") or "")))
        rel = path.relative_to(cases)
        if len(rel.parts) > 1:
            cs.folders.add(rel.parts[0])
        cs.headers[path] = ds
    return list(found.values())


def _instance_header(study: CaseStudy, point: TruthPoint) -> pydicom.Dataset | None:
    for path, ds in study.headers.items():
        if point.sop_instance_uid is not None:
            if str(ds.SOPInstanceUID) == point.sop_instance_uid:
                return ds
            continue
        series_names = {str(ds.get("SeriesInstanceUID", "")), str(ds.get("SeriesNumber", "")), path.parent.name}
        if point.series not in series_names:
            continue
        number = ds.get("InstanceNumber")
        if (number is not None and str(number) != "" and int(number) == point.instance_number) or (
            path.stem == str(point.instance_number)
        ):
            return ds
    return None


def truth_point_mm(study: CaseStudy, point: TruthPoint) -> tuple[float, float, float] | None:
    """A labelled point in patient LPS mm through its instance's Image Position / Orientation (Patient) and
    Pixel Spacing (``None`` where the instance or its geometry is missing)."""
    if point.patient is not None:
        return point.patient
    ds = _instance_header(study, point)
    if ds is None:
        return None
    position, orientation, spacing = frame_geometry(ds, 0)
    if position is None or orientation is None or spacing is None:
        return None
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    # column x moves along the row direction by the column spacing (PixelSpacing[1]); row y along the column
    p = np.asarray(position) + point.x * spacing[1] * row_dir + point.y * spacing[0] * col_dir
    return (float(p[0]), float(p[1]), float(p[2]))


@dataclass
class ValidationResult:
    """What a run produced: the JSON written, and the case inputs it scored."""

    metrics: dict[str, Any]
    cases: list[CaseInput]
    out: Path


def _progress(items: Sequence[Any], enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        total = len(items)
        for i, item in enumerate(items, start=1):
            print(f"\rvalidate: study {i}/{total}", end="", file=sys.stderr, flush=True)
            yield item
        print(file=sys.stderr)
        return
    yield from tqdm(items, desc="validate", unit="study", file=sys.stderr)


def _match(truth: TruthSet, studies: Iterable[CaseStudy]) -> tuple[list[tuple[str, StudyTruth, CaseStudy]], int, int]:
    by_name: dict[str, CaseStudy] = {}
    studies = list(studies)
    for s in studies:
        for n in s.names():
            by_name.setdefault(n, s)
    matched: list[tuple[str, StudyTruth, CaseStudy]] = []
    used: set[str] = set()
    missing = 0
    for key in study_keys(truth.studies):
        st = truth.studies[key]
        cs = by_name.get(st.study_instance_uid or key)
        if cs is None or cs.study_instance_uid in used:
            missing += 1
            continue
        used.add(cs.study_instance_uid)
        matched.append((key, st, cs))
    return matched, missing, sum(1 for s in studies if s.study_instance_uid not in used)


def validate_cases(
    cases: Path,
    truth: TruthSet,
    analyse: Analyser,
    out: Path,
    *,
    resamples: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> ValidationResult:
    """Analyse every labelled study under ``cases`` with ``analyse``, score against ``truth`` and write
    ``report.html``, ``metrics.json`` and ``cases.csv`` to ``out``.

    Raises
    ------
    ValueError
        ``cases`` is not a folder, or none of its studies is labelled.
    """
    studies = discover_studies(cases)
    matched, labels_without_images, images_without_labels = _match(truth, studies)
    if not matched:
        raise ValueError(f"cases: none of the {len(studies)} studies under it matches a labelled study "
                         "(by folder name, Study Instance UID or Study ID)")
    inputs: list[CaseInput] = []
    not_analysed: list[dict[str, Any]] = []
    models: dict[str, ModelIdentity] = {}
    for number, (key, st, cs) in enumerate(_progress(matched, progress), start=1):
        study = load_study(list(cs.headers), study_instance_uid=cs.study_instance_uid, known_headers=cs.headers)
        result = analyse(study)
        label_id = "" if truth.format == "sr" else key
        if isinstance(result, str):
            not_analysed.append({"case": number, "reason": result})
            inputs.append(CaseInput(number, st, None, result, label_id=label_id))
            continue
        models.setdefault(result.model.model_dump_json(), result.model)
        points: dict[tuple[str, str], tuple[tuple[float, float, float], ...]] = {}
        for cell_key, cell in st.cells.items():
            resolved = [p for p in (truth_point_mm(cs, tp) for tp in cell.points) if p is not None]
            if resolved:
                points[cell_key] = tuple(resolved)
        inputs.append(CaseInput(number, st, result, None, points, label_id))
    metrics = compute_metrics(inputs, resamples=resamples, seed=seed)
    summary = {
        "labels": {"format": truth.format},
        "studies": {
            "labelled": len(truth.studies),
            "found": len(matched),
            "analysed": len(matched) - len(not_analysed),
            "not_analysed": not_analysed,
            "labels_without_images": labels_without_images,
            "images_without_labels": images_without_labels,
        },
    }
    doc = write_outputs(out, metrics, models=list(models.values()), summary=summary)
    return ValidationResult(doc, inputs, out)
