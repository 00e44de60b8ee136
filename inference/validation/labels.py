"""The truth of a site's validation cases, read from three formats into one typed model.

Formats (docs/validation.md):

``rsna``
    The RSNA 2024 Lumbar Spine Degenerative Classification CSVs: ``train.csv`` (wide: ``study_id`` and
    one ``<condition>_<level>`` column per cell, values ``Normal/Mild``, ``Moderate``, ``Severe`` or
    empty), ``train_label_coordinates.csv`` (``study_id, series_id, instance_number, condition, level,
    x, y``) and ``train_series_descriptions.csv`` (``study_id, series_id, series_description``).
``csv``
    Our per-level CSV: ``study, level, condition, grade`` and optional ``laterality, series, instance,
    x, y, cobb_angle_deg`` (a Cobb angle row has ``condition = cobb_angle``).
``sr``
    A radiologist's TID 1500 measurement report (one file, or a folder of them), read back with
    :func:`sr_templates.reader.read_measurement_report`.

Every condition is mapped to the model's finding types honestly: one without a counterpart (RSNA's
subarticular stenosis) is kept and reported as *not assessed by the model*, never dropped.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from inference.findings import FindingType, Laterality, LevelError, Severity, normalise_level

__all__ = [
    "OWN_COLUMNS",
    "RSNA_CONDITIONS",
    "CobbTruth",
    "Condition",
    "Grade",
    "LabelError",
    "StudyTruth",
    "TruthCell",
    "TruthPoint",
    "TruthSet",
    "condition_for",
    "conditions_for_finding",
    "load_labels",
    "load_own_csv",
    "load_rsna",
    "load_sr",
    "parse_grade",
    "study_keys",
]


class LabelError(ValueError):
    """A label file that cannot be read as the format it claims (the message names file and row)."""


class Grade(IntEnum):
    """The three grades RSNA 2024 labels use; the model's none and mild are both ``NORMAL_MILD``."""

    NORMAL_MILD = 0
    MODERATE = 1
    SEVERE = 2

    @property
    def label(self) -> str:
        return ("Normal/Mild", "Moderate", "Severe")[self.value]

    @property
    def positive(self) -> bool:
        """Moderate or worse: what a sensitivity / specificity counts as a positive."""
        return self >= Grade.MODERATE

    @classmethod
    def of(cls, severity: Severity) -> Grade:
        return {
            Severity.NONE: cls.NORMAL_MILD,
            Severity.MILD: cls.NORMAL_MILD,
            Severity.MODERATE: cls.MODERATE,
            Severity.SEVERE: cls.SEVERE,
        }[severity]


def parse_grade(text: str) -> Grade | None:
    """``"Normal/Mild"``, ``"normal_mild"``, ``"none"``, ``"mild"`` → NORMAL_MILD; ``"Moderate"``,
    ``"Severe"``; empty → ``None`` (not labelled).

    Raises
    ------
    ValueError
        Any other text.
    """
    t = re.sub(r"[\s/_-]+", "_", text.strip().lower())
    if not t:
        return None
    if t in {"normal_mild", "normal", "mild", "none", "absent", "0"}:
        return Grade.NORMAL_MILD
    if t in {"moderate", "1"}:
        return Grade.MODERATE
    if t in {"severe", "2"}:
        return Grade.SEVERE
    raise ValueError(f"grade: {text!r} is not Normal/Mild, Moderate or Severe")


@dataclass(frozen=True)
class Condition:
    """A labelled condition and the model finding it is compared with.

    ``finding`` is ``None`` where the model has no counterpart (``note`` says why): such a condition is
    reported as not assessed.  ``side`` is set for a sided condition (left/right foraminal stenosis);
    ``group`` is the RSNA metric group (``spinal``, ``foraminal``, ``subarticular``) or the name.
    """

    name: str
    finding: FindingType | None
    side: Laterality | None = None
    group: str = ""
    note: str = ""

    @property
    def assessed(self) -> bool:
        return self.finding is not None


_NOT_MODELLED = "the model has no subarticular (lateral recess) stenosis finding"

#: RSNA 2024 condition names (snake case) → the model's finding types.
RSNA_CONDITIONS: dict[str, Condition] = {
    "spinal_canal_stenosis": Condition("spinal_canal_stenosis", FindingType.SPINAL_CANAL_STENOSIS, None, "spinal"),
    "left_neural_foraminal_narrowing": Condition(
        "left_neural_foraminal_narrowing", FindingType.FORAMINAL_STENOSIS, Laterality.LEFT, "foraminal"
    ),
    "right_neural_foraminal_narrowing": Condition(
        "right_neural_foraminal_narrowing", FindingType.FORAMINAL_STENOSIS, Laterality.RIGHT, "foraminal"
    ),
    "left_subarticular_stenosis": Condition(
        "left_subarticular_stenosis", None, Laterality.LEFT, "subarticular", _NOT_MODELLED
    ),
    "right_subarticular_stenosis": Condition(
        "right_subarticular_stenosis", None, Laterality.RIGHT, "subarticular", _NOT_MODELLED
    ),
}


def _snake(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.strip().lower()).strip("_")


def conditions_for_finding(finding: FindingType, laterality: Laterality | None) -> list[Condition]:
    """The labelled conditions a finding of this type and side stands for (foraminal stenosis: left and/or
    right; spinal canal stenosis: RSNA's name; every other type: its own name, side ignored)."""
    if finding is FindingType.SPINAL_CANAL_STENOSIS:
        return [RSNA_CONDITIONS["spinal_canal_stenosis"]]
    if finding is FindingType.FORAMINAL_STENOSIS:
        if laterality in (Laterality.LEFT, Laterality.RIGHT):
            return [RSNA_CONDITIONS[f"{laterality.value}_neural_foraminal_narrowing"]]
        return [RSNA_CONDITIONS["left_neural_foraminal_narrowing"], RSNA_CONDITIONS["right_neural_foraminal_narrowing"]]
    return [Condition(finding.value, finding, None, finding.value)]


def condition_for(name: str, laterality: str | None = None) -> list[Condition]:
    """The condition(s) a label names: an RSNA condition (any spelling: ``"Spinal Canal Stenosis"``), a
    finding type of the model (``disc_herniation``; ``foraminal_stenosis`` with ``laterality`` left/right,
    else both sides), or anything else (kept, not assessed)."""
    key = _snake(name)
    if key in RSNA_CONDITIONS:
        return [RSNA_CONDITIONS[key]]
    if key in {f.value for f in FindingType}:
        side: Laterality | None = None
        if laterality and laterality.strip():
            try:
                side = Laterality(laterality.strip().lower())
            except ValueError as exc:
                raise ValueError(f"laterality: {laterality!r} is not left, right, bilateral or central") from exc
        return conditions_for_finding(FindingType(key), side)
    return [Condition(key, None, None, key, "no finding type of the model corresponds to it")]


@dataclass(frozen=True)
class TruthPoint:
    """Where a labeller pointed: source-image pixel coordinates (column ``x``, row ``y``, pixel-centre
    index convention: (0, 0) is the centre of the top-left pixel, as Image Position (Patient) is) on one
    instance, named by series (UID, Series Number or folder name) and Instance Number, or by SOP Instance
    UID; or directly in patient LPS millimetres (``patient``)."""

    x: float = 0.0
    y: float = 0.0
    series: str | None = None
    instance_number: int | None = None
    sop_instance_uid: str | None = None
    series_description: str = ""
    patient: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class TruthCell:
    """The labelled grade of one condition at one level, with the labeller's points (if any)."""

    condition: Condition
    level: str
    grade: Grade
    points: tuple[TruthPoint, ...] = ()


@dataclass(frozen=True)
class CobbTruth:
    """One labelled Cobb angle (degrees), with its end vertebrae where known."""

    angle_deg: float
    upper: str | None = None
    lower: str | None = None


@dataclass
class StudyTruth:
    """The truth of one study: ``key`` is the label file's own study id (RSNA ``study_id``, our CSV's
    ``study``), matched to a DICOM study by folder name, Study Instance UID or Study ID."""

    key: str
    cells: dict[tuple[str, str], TruthCell] = field(default_factory=dict)
    cobb: list[CobbTruth] = field(default_factory=list)
    #: a truth read from an SR knows its study's UID; never written to outputs
    study_instance_uid: str | None = None


@dataclass
class TruthSet:
    """Every labelled study, by key, and the format it came from."""

    format: str
    studies: dict[str, StudyTruth] = field(default_factory=dict)

    def study(self, key: str) -> StudyTruth:
        if key not in self.studies:
            self.studies[key] = StudyTruth(key)
        return self.studies[key]

    @property
    def conditions(self) -> dict[str, Condition]:
        out: dict[str, Condition] = {}
        for s in self.studies.values():
            for cell in s.cells.values():
                out.setdefault(cell.condition.name, cell.condition)
        return dict(sorted(out.items()))


def _level(text: str, where: str) -> str:
    try:
        return normalise_level(text.replace("_", "-"))
    except LevelError as exc:
        raise LabelError(f"{where}: {exc}") from exc


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fp:
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fp)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f"{path.name}: cannot be read as CSV: {exc}") from exc


def _require(rows: list[dict[str, str]], path: Path, columns: Iterable[str]) -> None:
    have = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in have]
    if rows and missing:
        raise LabelError(f"{path.name}: missing column(s) {', '.join(missing)}")


def _float(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise LabelError(f"{where}: {text!r} is not a number") from exc


# ------------------------------------------------------------------------------------------------ RSNA
_RSNA_COLUMN = re.compile(r"^(?P<condition>.+?)_(?P<upper>[lts]\d+)_(?P<lower>[lts]\d+)$")


def load_rsna(train_csv: Path, coordinates_csv: Path | None = None, descriptions_csv: Path | None = None) -> TruthSet:
    """Read the RSNA 2024 CSVs (coordinates and series descriptions optional, looked for beside
    ``train.csv`` as ``train_label_coordinates.csv`` / ``train_series_descriptions.csv``).

    Raises
    ------
    LabelError
        A file that is not in the RSNA format (unknown column, grade or level).
    """
    coordinates_csv = coordinates_csv or _beside(train_csv, "train_label_coordinates.csv")
    descriptions_csv = descriptions_csv or _beside(train_csv, "train_series_descriptions.csv")
    truth = TruthSet("rsna")
    rows = _read_csv(train_csv)
    _require(rows, train_csv, ["study_id"])
    for i, row in enumerate(rows, start=2):
        key = row["study_id"]
        if not key:
            raise LabelError(f"{train_csv.name} line {i}: empty study_id")
        study = truth.study(key)
        for column, value in row.items():
            if column == "study_id":
                continue
            m = _RSNA_COLUMN.match(column.lower())
            if m is None:
                raise LabelError(f"{train_csv.name}: column {column!r} is not <condition>_<level>")
            try:
                grade = parse_grade(value)
            except ValueError as exc:
                raise LabelError(f"{train_csv.name} line {i}, {column}: {exc}") from exc
            if grade is None:
                continue
            level = _level(f"{m['upper']}-{m['lower']}", f"{train_csv.name}: column {column}")
            for cond in condition_for(m["condition"]):
                study.cells[(cond.name, level)] = TruthCell(cond, level, grade)
    descriptions: dict[tuple[str, str], str] = {}
    if descriptions_csv is not None:
        drows = _read_csv(descriptions_csv)
        _require(drows, descriptions_csv, ["study_id", "series_id", "series_description"])
        descriptions = {(r["study_id"], r["series_id"]): r["series_description"] for r in drows}
    if coordinates_csv is not None:
        crows = _read_csv(coordinates_csv)
        _require(crows, coordinates_csv, ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"])
        for i, row in enumerate(crows, start=2):
            where = f"{coordinates_csv.name} line {i}"
            level = _level(row["level"], where)
            point = TruthPoint(
                x=_float(row["x"], where),
                y=_float(row["y"], where),
                series=row["series_id"],
                instance_number=int(_float(row["instance_number"], where)),
                series_description=descriptions.get((row["study_id"], row["series_id"]), ""),
            )
            labelled = truth.studies.get(row["study_id"])
            for cond in condition_for(row["condition"]):
                cell = labelled.cells.get((cond.name, level)) if labelled else None
                if labelled is not None and cell is not None:
                    labelled.cells[(cond.name, level)] = TruthCell(cond, level, cell.grade, (*cell.points, point))
    return truth


def _beside(path: Path, name: str) -> Path | None:
    candidate = path.with_name(name)
    return candidate if candidate.is_file() else None


# ------------------------------------------------------------------------------------------ our own CSV
OWN_COLUMNS = ("study", "level", "condition", "grade")


def _cobb_ends(text: str, where: str) -> tuple[str | None, str | None]:
    parts = [p for p in re.split(r"\s*(?:-|/|–| to )\s*", text.strip()) if p]
    if not parts:
        return None, None
    if len(parts) != 2:
        raise LabelError(f"{where}: a Cobb angle's level is two end vertebrae (T6-T12), got {text!r}")
    ends = [_level(p, where) for p in parts]
    return ends[0], ends[1]


def load_own_csv(path: Path) -> TruthSet:
    """Read our per-level CSV (docs/validation.md).

    Raises
    ------
    LabelError
        A missing column, an unknown level or grade, a Cobb row without its angle.
    """
    truth = TruthSet("csv")
    rows = _read_csv(path)
    _require(rows, path, OWN_COLUMNS)
    for i, row in enumerate(rows, start=2):
        where = f"{path.name} line {i}"
        key = row["study"]
        if not key:
            raise LabelError(f"{where}: empty study")
        study = truth.study(key)
        if _snake(row["condition"]) == "cobb_angle":
            angle = row.get("cobb_angle_deg", "")
            if not angle:
                raise LabelError(f"{where}: a cobb_angle row needs cobb_angle_deg")
            upper, lower = _cobb_ends(row["level"], where)
            study.cobb.append(CobbTruth(_float(angle, where), upper, lower))
            continue
        try:
            grade = parse_grade(row["grade"])
            conditions = condition_for(row["condition"], row.get("laterality"))
        except ValueError as exc:
            raise LabelError(f"{where}: {exc}") from exc
        if grade is None:
            raise LabelError(f"{where}: empty grade")
        level = _level(row["level"], where)
        points: tuple[TruthPoint, ...] = ()
        if row.get("x") and row.get("y"):
            series, instance = row.get("series", ""), row.get("instance", "")
            if not series or not instance:
                raise LabelError(f"{where}: a point needs series and instance")
            inst_no, sop = (int(instance), None) if instance.isdigit() else (None, instance)
            points = (TruthPoint(_float(row["x"], where), _float(row["y"], where), series, inst_no, sop),)
        for cond in conditions:
            prev = study.cells.get((cond.name, level))
            study.cells[(cond.name, level)] = TruthCell(cond, level, grade, (*(prev.points if prev else ()), *points))
    return truth


# ------------------------------------------------------------------------------------------------ SR
def load_sr(path: Path) -> TruthSet:
    """Read radiologists' TID 1500 SRs (a file or a folder searched recursively) as truth.

    Every finding an SR names labels its (condition, level) with its severity (an absent finding:
    Normal/Mild); conditions it does not name are not scored.  Points are taken from the SR's 3D SCOORD
    (patient mm) or 2D SCOORD (source pixels); Cobb angles from its measurements.

    Raises
    ------
    LabelError
        No readable SpineMed TID 1500 SR under ``path``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from sr_templates.reader import read_measurement_report

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    truth = TruthSet("sr")
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except (InvalidDicomError, OSError, EOFError):
            continue
        if str(ds.get("Modality", "")) != "SR":
            continue
        try:
            read = read_measurement_report(ds)
        except (ValueError, AttributeError, KeyError, IndexError) as exc:
            raise LabelError(f"{f.name}: not a TID 1500 measurement report the node can read: {exc}") from exc
        uid = str(ds.StudyInstanceUID)
        study = truth.study(uid)
        study.study_instance_uid = uid
        for rf in read.findings:
            for m in rf.measurements:
                if m.type.value == "cobb_angle":
                    study.cobb.append(CobbTruth(m.value, m.upper_end_vertebra, m.lower_end_vertebra))
            if rf.finding is FindingType.NO_ABNORMALITY:
                continue
            points = tuple(
                TruthPoint(
                    x=(e.point[0] if e.point else 0.0),
                    y=(e.point[1] if e.point else 0.0),
                    sop_instance_uid=e.sop_instance_uid,
                    patient=e.point_3d,
                )
                for e in rf.evidence
                if e.point is not None or e.point_3d is not None
            )
            for cond in conditions_for_finding(rf.finding, rf.laterality):
                study.cells[(cond.name, rf.level)] = TruthCell(cond, rf.level, Grade.of(rf.severity), points)
    if not truth.studies:
        raise LabelError(f"{path.name}: no SpineMed TID 1500 SR found")
    return truth


# ----------------------------------------------------------------------------------------------- entry
def load_labels(path: Path, fmt: str = "auto") -> TruthSet:
    """Read labels in ``fmt`` (``rsna``, ``csv``, ``sr``; ``auto``: a folder with ``train.csv`` or a
    ``train.csv`` → rsna, another ``.csv`` → csv, anything else → sr).

    Raises
    ------
    LabelError
        The file cannot be read in that format.
    ValueError
        ``fmt`` is none of these.
    """
    if fmt not in {"auto", "rsna", "csv", "sr"}:
        raise ValueError(f"fmt: {fmt!r} is not auto, rsna, csv or sr")
    if not path.exists():
        raise LabelError(f"{path}: no such file or folder")
    if fmt == "auto":
        if (path.is_dir() and (path / "train.csv").is_file()) or path.name == "train.csv":
            fmt = "rsna"
        elif path.suffix.lower() == ".csv":
            fmt = "csv"
        else:
            fmt = "sr"
    if fmt == "rsna":
        return load_rsna(path / "train.csv" if path.is_dir() else path)
    if fmt == "csv":
        return load_own_csv(path)
    return load_sr(path)


def study_keys(mapping: Mapping[str, StudyTruth]) -> list[str]:
    """The study keys in a stable order (numeric ids numerically)."""
    return sorted(mapping, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
