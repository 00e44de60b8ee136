"""Typed findings: the contract between the model, the SR builder and the job store.

Two layers share one set of types:

* :class:`ModelAnswer` is exactly what a model must produce.  Its JSON Schema
  (:func:`inference.schema.answer_schema`) constrains decoding, is sent as ``response_format``
  to OpenAI-compatible servers, and is cited in the prompt.
* :class:`SpineFindings` is a validated answer plus what the pipeline knows and the model does not:
  who produced it (:class:`ModelIdentity`) and where each input image came from
  (:class:`InputImage`), so evidence indices resolve to SOP instances.

Levels are normalised (``"L4/5"`` → ``"L4-L5"``) and ordered cranio-caudally.
"""

from __future__ import annotations

import re
from enum import StrEnum
from itertools import pairwise
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DISC_FINDINGS",
    "LEVELS",
    "MEASUREMENT_UNITS",
    "SEGMENTS",
    "TRANSITIONAL_LEVELS",
    "VERTEBRAE",
    "Evidence",
    "FindingType",
    "GradeProbabilities",
    "ImagePlane",
    "InputImage",
    "Laterality",
    "LevelError",
    "LevelFinding",
    "Measurement",
    "MeasurementType",
    "ModelAnswer",
    "ModelIdentity",
    "NarrativeReport",
    "Severity",
    "SpineFindings",
    "is_segment",
    "is_transitional",
    "level_sort_key",
    "normalise_level",
]

# --------------------------------------------------------------------------------------------- levels
_STANDARD_VERTEBRAE: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
    "S1",
)
#: Transitional vertebrae: accepted, but flagged by :func:`is_transitional`.
TRANSITIONAL_LEVELS: frozenset[str] = frozenset({"T13", "L6", "T12-T13", "T13-L1", "L5-L6", "L6-S1"})
#: Every vertebra in cranio-caudal order, transitional ones in their anatomical place.
VERTEBRAE: tuple[str, ...] = (
    *_STANDARD_VERTEBRAE[:19],  # C1..T12
    "T13",
    *_STANDARD_VERTEBRAE[19:24],  # L1..L5
    "L6",
    "S1",
)


#: Motion segments: each pair of consecutive vertebrae, plus T12-L1 and L5-S1 without transitional ones.
SEGMENTS: tuple[str, ...] = (
    *(f"{a}-{b}" for a, b in pairwise(VERTEBRAE)),
    "T12-L1",
    "L5-S1",
)

_ORDER: dict[str, int] = {v: 2 * i for i, v in enumerate(VERTEBRAE)}
_ORDER.update({s: _ORDER[s.split("-")[0]] + 1 for s in SEGMENTS})

#: Every accepted level (vertebrae and motion segments), in cranio-caudal order.
LEVELS: tuple[str, ...] = tuple(sorted(_ORDER, key=lambda k: (_ORDER[k], k)))


class LevelError(ValueError):
    """A level name that is not a vertebra or an adjacent motion segment."""


_LEVEL_TOKEN = re.compile(r"^\s*([CTLS])\s*(\d{1,2})\s*$", re.IGNORECASE)
_SEPARATORS = re.compile(r"\s*(?:-|–|—|/|\\|\s|to)\s*", re.IGNORECASE)


def _vertebra(token: str, region: str | None) -> str:
    token = token.strip()
    if token.isdigit() and region is not None:
        token = region + token
    m = _LEVEL_TOKEN.match(token)
    if not m:
        raise LevelError(f"level: {token!r} is not a vertebra")
    name = f"{m.group(1).upper()}{int(m.group(2))}"
    if name not in _ORDER:
        raise LevelError(f"level: {name!r} is not a vertebra")
    return name


def normalise_level(text: str) -> str:
    """Return the canonical name of a vertebra or motion segment.

    ``"l4"`` → ``"L4"``, ``"L4/5"``, ``"L4-5"``, ``"l4–l5"`` → ``"L4-L5"``, ``"L5/S1"`` → ``"L5-S1"``.

    Raises
    ------
    LevelError
        Not a vertebra, or two vertebrae that are not adjacent (``"L3-L5"``).
    """
    if not isinstance(text, str):
        raise TypeError(f"level: expected str, got {type(text).__name__}")
    cleaned = re.sub(r"(?i)\b(level|disc|disk|segment|vertebra)\b", " ", text).strip()
    parts = [p for p in _SEPARATORS.split(cleaned) if p]
    if len(parts) == 1:
        return _vertebra(parts[0], None)
    if len(parts) == 2:
        upper = _vertebra(parts[0], None)
        lower = _vertebra(parts[1], upper[0])
        segment = f"{upper}-{lower}"
        if segment not in SEGMENTS:
            raise LevelError(f"level: {text!r} names vertebrae that are not adjacent")
        return segment
    raise LevelError(f"level: {text!r} is not a vertebra or motion segment")


def is_segment(level: str) -> bool:
    """True for a motion segment / disc level (``"L4-L5"``), false for a vertebra."""
    return "-" in level


def is_transitional(level: str) -> bool:
    """True where the level names transitional anatomy (``T13``, ``L6``)."""
    return level in TRANSITIONAL_LEVELS or any(p in {"T13", "L6"} for p in level.split("-"))


def level_sort_key(level: str) -> int:
    """Cranio-caudal rank of a canonical level name."""
    return _ORDER[level]


# --------------------------------------------------------------------------------------------- codes
class FindingType(StrEnum):
    """What was found at a level.  Codes for each live in :mod:`sr_templates.codes`."""

    DISC_HERNIATION = "disc_herniation"
    DISC_BULGE = "disc_bulge"
    DEGENERATIVE_DISC_DISEASE = "degenerative_disc_disease"
    SPINAL_CANAL_STENOSIS = "spinal_canal_stenosis"
    FORAMINAL_STENOSIS = "foraminal_stenosis"
    MODIC_CHANGE = "modic_change"
    SPONDYLOLISTHESIS = "spondylolisthesis"
    VERTEBRAL_FRACTURE = "vertebral_fracture"
    SCOLIOSIS = "scoliosis"
    NO_ABNORMALITY = "no_abnormality"


#: Findings that belong to a motion segment (disc level); all others to a vertebra.
DISC_FINDINGS: frozenset[FindingType] = frozenset(
    {
        FindingType.DISC_HERNIATION,
        FindingType.DISC_BULGE,
        FindingType.DEGENERATIVE_DISC_DISEASE,
        FindingType.SPINAL_CANAL_STENOSIS,
        FindingType.FORAMINAL_STENOSIS,
        FindingType.MODIC_CHANGE,
    }
)


class Severity(StrEnum):
    NONE = "none"
    MILD = "mild"
    MODERATE = "moderate"
    SEVERE = "severe"


class Laterality(StrEnum):
    LEFT = "left"
    RIGHT = "right"
    BILATERAL = "bilateral"
    CENTRAL = "central"


class MeasurementType(StrEnum):
    COBB_ANGLE = "cobb_angle"
    SLIP_PERCENTAGE = "slip_percentage"
    SLIP_DISTANCE = "slip_distance"
    CANAL_AP_DIAMETER = "canal_ap_diameter"
    DISC_HEIGHT = "disc_height"
    VERTEBRAL_HEIGHT_LOSS = "vertebral_height_loss"


#: UCUM unit of each measurement.
MEASUREMENT_UNITS: dict[MeasurementType, str] = {
    MeasurementType.COBB_ANGLE: "deg",
    MeasurementType.SLIP_PERCENTAGE: "%",
    MeasurementType.SLIP_DISTANCE: "mm",
    MeasurementType.CANAL_AP_DIAMETER: "mm",
    MeasurementType.DISC_HEIGHT: "mm",
    MeasurementType.VERTEBRAL_HEIGHT_LOSS: "%",
}

_MEASUREMENT_RANGES: dict[MeasurementType, tuple[float, float]] = {
    MeasurementType.COBB_ANGLE: (0.0, 180.0),
    MeasurementType.SLIP_PERCENTAGE: (0.0, 200.0),
    MeasurementType.SLIP_DISTANCE: (0.0, 100.0),
    MeasurementType.CANAL_AP_DIAMETER: (0.0, 40.0),
    MeasurementType.DISC_HEIGHT: (0.0, 30.0),
    MeasurementType.VERTEBRAL_HEIGHT_LOSS: (0.0, 100.0),
}

Level = Annotated[str, Field(description="vertebra (L5) or motion segment (L4-L5)", max_length=7)]
_TEXT = 600


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Measurement(_Strict):
    """A numeric measurement with its UCUM unit (implied by ``type``)."""

    type: MeasurementType
    value: float
    upper_end_vertebra: Level | None = Field(default=None, description="Cobb angle only")
    lower_end_vertebra: Level | None = Field(default=None, description="Cobb angle only")

    @property
    def unit(self) -> str:
        return MEASUREMENT_UNITS[self.type]

    @field_validator("upper_end_vertebra", "lower_end_vertebra", mode="before")
    @classmethod
    def _norm_vertebra(cls, v: Any) -> Any:
        if v is None:
            return None
        level = normalise_level(v)
        if is_segment(level):
            raise LevelError(f"end vertebra: {v!r} is a motion segment, not a vertebra")
        return level

    @model_validator(mode="after")
    def _check(self) -> Measurement:
        lo, hi = _MEASUREMENT_RANGES[self.type]
        if not lo <= self.value <= hi:
            raise ValueError(f"value: {self.value} {self.unit} is outside [{lo}, {hi}] for {self.type.value}")
        ends = (self.upper_end_vertebra, self.lower_end_vertebra)
        if self.type is MeasurementType.COBB_ANGLE:
            if None in ends:
                raise ValueError("upper_end_vertebra/lower_end_vertebra: a Cobb angle needs both end vertebrae")
            assert self.upper_end_vertebra is not None and self.lower_end_vertebra is not None
            if level_sort_key(self.upper_end_vertebra) >= level_sort_key(self.lower_end_vertebra):
                raise ValueError("upper_end_vertebra: must be cranial to lower_end_vertebra")
        elif ends != (None, None):
            raise ValueError(f"upper_end_vertebra: only a Cobb angle has end vertebrae, not {self.type.value}")
        return self


class Evidence(_Strict):
    """An input image that supports a finding, and optionally where on it (model-image pixels)."""

    image: int = Field(ge=0, lt=64, description="index of the input image, 0-based")
    x: float | None = Field(default=None, ge=0, description="column in the input image, pixels")
    y: float | None = Field(default=None, ge=0, description="row in the input image, pixels")

    @model_validator(mode="after")
    def _both_or_neither(self) -> Evidence:
        if (self.x is None) != (self.y is None):
            raise ValueError("x/y: give both coordinates or neither")
        return self


class LevelFinding(_Strict):
    """One finding at one vertebral level or motion segment."""

    level: Level
    finding: FindingType
    severity: Severity
    grade: int | None = Field(default=None, ge=1, le=5, description="Meyerding grade, spondylolisthesis only")
    laterality: Laterality | None = None
    measurements: list[Measurement] = Field(default_factory=list, max_length=4)
    evidence: list[Evidence] = Field(default_factory=list, max_length=4)

    @field_validator("level", mode="before")
    @classmethod
    def _norm_level(cls, v: Any) -> Any:
        return normalise_level(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> LevelFinding:
        if self.finding is FindingType.NO_ABNORMALITY:
            # a normal vertebra or a normal disc: nothing to grade
            if self.severity is not Severity.NONE:
                raise ValueError(f"severity: no_abnormality has severity none, got {self.severity.value}")
        elif self.finding in DISC_FINDINGS and not is_segment(self.level):
            raise ValueError(f"level: {self.finding.value} belongs to a motion segment, got {self.level}")
        elif self.finding not in DISC_FINDINGS and is_segment(self.level):
            raise ValueError(f"level: {self.finding.value} belongs to a vertebra, got {self.level}")
        if self.grade is not None and self.finding is not FindingType.SPONDYLOLISTHESIS:
            raise ValueError("grade: only spondylolisthesis has a Meyerding grade")
        return self

    @property
    def transitional(self) -> bool:
        return is_transitional(self.level)

    @property
    def absent(self) -> bool:
        """The condition was assessed at this level and is not there (severity ``none``).

        ``no_abnormality`` is a finding of its own (a normal level), not an absent condition.
        Outputs encode an absent condition as absent, never as a finding of severity "none".
        """
        return self.severity is Severity.NONE and self.finding is not FindingType.NO_ABNORMALITY


class NarrativeReport(_Strict):
    """The six sections SpineGPT writes (SpineMed-450k report format)."""

    findings: str = Field(max_length=_TEXT)
    diagnosis: str = Field(max_length=_TEXT)
    treatment_suggestions: str = Field(max_length=_TEXT)
    risk_and_prognosis: str = Field(max_length=_TEXT)
    follow_up: str = Field(max_length=_TEXT, description="follow-up / post-operative management")
    diagnostic_basis: str = Field(max_length=_TEXT)


class ModelAnswer(_Strict):
    """What the model must output: per-level findings and the narrative report."""

    levels: list[LevelFinding] = Field(
        min_length=1, max_length=32, description="at least one level: a normal study says no_abnormality"
    )
    report: NarrativeReport

    @model_validator(mode="after")
    def _order(self) -> ModelAnswer:
        # cranio-caudal, and a finding the model wrote twice word for word (the same level, finding,
        # grading, measurements and evidence) once: a repeat carries nothing, and a report listing it
        # three times reads as three findings
        ordered: list[LevelFinding] = []
        seen: set[str] = set()
        for f in sorted(self.levels, key=lambda f: level_sort_key(f.level)):
            key = f.model_dump_json()
            if key not in seen:
                seen.add(key)
                ordered.append(f)
        if ordered != self.levels:
            object.__setattr__(self, "levels", ordered)
        return self


class ModelIdentity(_Strict):
    """Who produced the answer: travels into the SR's algorithm identification (TID 4019)."""

    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64, description="model revision")
    weights_digest: str = Field(min_length=1, max_length=64, description="sha256 of the weight files")
    backend: str = Field(min_length=1, max_length=32)
    prompt_version: str = Field(min_length=1, max_length=32)
    demo: bool = Field(description="True for the tiny random demo model: not for clinical use")


class ImagePlane(StrEnum):
    SAGITTAL = "sagittal"
    CORONAL = "coronal"
    AXIAL = "axial"
    PROJECTION = "projection"


class InputImage(_Strict):
    """Where one model input image came from.

    ``pixel_to_source`` maps model-image pixel (column, row, 1) to source-frame pixel (column, row) for
    an image cut from one source frame (a 2×3 row-major affine); ``None`` for reformats, which instead
    list every contributing instance.  ``pixel_to_patient`` (12 values: a 3×4 row-major matrix) maps
    (column, row, 0, 1) to patient LPS millimetres, where the geometry is known.
    """

    index: int = Field(ge=0)
    plane: ImagePlane
    modality: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...] = Field(min_length=1)
    frame_number: int | None = Field(default=None, ge=1)
    rows: int = Field(gt=0)
    columns: int = Field(gt=0)
    description: str = ""
    pixel_to_source: tuple[float, float, float, float, float, float] | None = None
    pixel_to_patient: tuple[float, ...] | None = Field(default=None, description="3x4 row-major, LPS mm")

    @property
    def single_source(self) -> bool:
        return len(self.sop_instance_uids) == 1


class GradeProbabilities(_Strict):
    """A model's probabilities of the three grades (normal/mild, moderate, severe) of one condition at one
    level, where a backend can give them (site validation's log loss and calibration read them).

    Not part of :class:`ModelAnswer`: the model does not write them, its backend measures them (today no
    backend does; reading them from the constrained decoder's token probabilities is a later step).
    ``laterality`` is the side for a sided condition (foraminal stenosis), else ``None``.
    """

    level: Level
    finding: FindingType
    laterality: Laterality | None = None
    normal_mild: float = Field(ge=0.0, le=1.0)
    moderate: float = Field(ge=0.0, le=1.0)
    severe: float = Field(ge=0.0, le=1.0)

    @field_validator("level", mode="before")
    @classmethod
    def _norm_level(cls, v: Any) -> Any:
        return normalise_level(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _sums_to_one(self) -> GradeProbabilities:
        total = self.normal_mild + self.moderate + self.severe
        if abs(total - 1.0) > 1e-3:
            raise ValueError(f"normal_mild/moderate/severe: probabilities sum to {total:.4f}, not 1")
        return self


class SpineFindings(_Strict):
    """A validated model answer with its provenance: the input of :mod:`sr_templates`."""

    study_instance_uid: str
    model: ModelIdentity
    task: str
    images: list[InputImage]
    answer: ModelAnswer
    #: per-grade probabilities, where the backend gives them (empty: it gives none)
    grade_probabilities: tuple[GradeProbabilities, ...] = ()

    @model_validator(mode="after")
    def _evidence_resolves(self) -> SpineFindings:
        n = len(self.images)
        for f in self.answer.levels:
            for e in f.evidence:
                if e.image >= n:
                    raise ValueError(f"answer.levels[{f.level}].evidence: image {e.image} of {n} inputs")
        return self

    @property
    def levels(self) -> list[LevelFinding]:
        return self.answer.levels
