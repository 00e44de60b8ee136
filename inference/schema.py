"""The one JSON Schema of a model answer, and the parser that enforces it.

:func:`answer_schema` starts from :meth:`ModelAnswer.model_json_schema` (pydantic) and tightens it until
JSON Schema alone says everything the pydantic validators check, so that **every string the schema admits
also validates as** :class:`~inference.findings.ModelAnswer`:

* levels are enums of canonical names; a level finding is an ``anyOf`` of three object shapes — disc
  findings (:data:`~inference.findings.DISC_FINDINGS`) on motion segments, spondylolisthesis (the only
  finding with a Meyerding ``grade``) on vertebrae, and the other vertebral findings on vertebrae;
* a measurement is an ``anyOf`` of one shape per measurement type with its value range; a Cobb angle is
  an ``anyOf`` over its upper end vertebra, each branch listing only the vertebrae caudal to it;
* evidence coordinates are both present or both ``null``; given the request's image sizes, an evidence
  entry is an ``anyOf`` with one shape per image, so its index and point always lie within the inputs;
* every object has ``additionalProperties: false`` and lists all its properties as ``required``
  (optional ones are nullable), which OpenAI-style ``strict`` structured output requires;
* text has ``minLength``/``maxLength`` and arrays have small ``maxItems``.

The same schema constrains local decoding (llguidance), goes to OpenAI-compatible servers as
``response_format``, and is summarised in the prompt.  :func:`parse_answer` validates any model output
with the pydantic types (the contract) and raises :class:`~inference.errors.InvalidModelOutputError`.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError

from inference.errors import InvalidModelOutputError
from inference.findings import (
    _MEASUREMENT_RANGES,
    DISC_FINDINGS,
    LEVELS,
    SEGMENTS,
    VERTEBRAE,
    Evidence,
    FindingType,
    LevelFinding,
    Measurement,
    MeasurementType,
    ModelAnswer,
    NarrativeReport,
    Severity,
)

__all__ = [
    "SCHEMA_ID",
    "SchemaLimits",
    "answer_schema",
    "parse_answer",
]

#: Identifier of the schema; bump the suffix whenever the shape of an answer changes.
SCHEMA_ID: Final = "urn:spinemed:model-answer:v1"

_MAX_COORDINATE: Final = 8192.0  # model-image pixels; far above any image size the node produces


@dataclass(frozen=True)
class SchemaLimits:
    """Size limits of an answer: the contract's maxima by default, smaller for the demo model.

    Each limit may only be *at most* the contract's (:class:`~inference.findings.ModelAnswer`) limit:
    a smaller limit makes the schema stricter, never looser.

    Parameters
    ----------
    max_levels
        Most level findings in an answer.
    max_text
        Most characters in one report section.
    max_measurements
        Most measurements per level finding.
    max_evidence
        Most evidence references per level finding.
    integer_numbers
        Admit only integers for measurement values and evidence points.  JSON numbers have no length
        limit, and a random model decoding greedily can emit digits until the token budget runs out;
        integers bounded by ``maximum`` cannot.  For the demo model only (real values need decimals).
    """

    max_levels: int = 32
    max_text: int = 600
    max_measurements: int = 4
    max_evidence: int = 4
    integer_numbers: bool = False

    def __post_init__(self) -> None:
        contract = SchemaLimits.contract()
        for name in ("max_levels", "max_text", "max_measurements", "max_evidence"):
            value, ceiling = getattr(self, name), getattr(contract, name)
            if not 0 <= value <= ceiling:
                raise ValueError(f"{name}: {value} is outside [0, {ceiling}] (the contract's limit)")
        if self.max_text < 1:
            raise ValueError("max_text: a report section needs at least one character")

    @staticmethod
    def contract() -> SchemaLimits:
        """The limits the pydantic contract itself enforces (read from the models' fields)."""
        limits = object.__new__(SchemaLimits)
        for name, value in (
            ("max_levels", _max_length(ModelAnswer, "levels")),
            ("max_text", _max_length(NarrativeReport, "findings")),
            ("max_measurements", _max_length(LevelFinding, "measurements")),
            ("max_evidence", _max_length(LevelFinding, "evidence")),
        ):
            object.__setattr__(limits, name, value)
        return limits


def _max_length(model: type[Any], field: str) -> int:
    for meta in model.model_fields[field].metadata:
        value = getattr(meta, "max_length", None)
        if value is not None:
            return int(value)
    raise RuntimeError(f"{model.__name__}.{field}: no max_length in the contract")  # pragma: no cover


def _object(properties: dict[str, Any], *, title: str | None = None, description: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object"}
    if title:
        out["title"] = title
    if description:
        out["description"] = description
    out["properties"] = properties
    out["required"] = list(properties)
    out["additionalProperties"] = False
    return out


def _check_fields(model: type[Any], properties: dict[str, Any]) -> None:
    """Fail loudly if the contract gained or lost a field the tightened schema does not know."""
    if list(properties) != list(model.model_fields):
        raise RuntimeError(
            f"schema: {model.__name__} fields {list(model.model_fields)} != tightened {list(properties)}"
        )


def _strip(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop pydantic's ``title``/``default`` keys from a property schema (noise for a decoder)."""
    return {k: v for k, v in schema.items() if k not in ("title", "default")}


def _measurement_shapes(base: dict[str, Any], number: str) -> list[dict[str, Any]]:
    props = base["properties"]
    value_desc = "value in the UCUM unit of the type"
    shapes: list[dict[str, Any]] = []
    for mtype in MeasurementType:
        lo, hi = _MEASUREMENT_RANGES[mtype]
        value = {"type": number, "minimum": lo, "maximum": hi, "description": value_desc}
        if mtype is MeasurementType.COBB_ANGLE:
            for i, upper in enumerate(VERTEBRAE[:-1]):
                shape = {
                    "type": {"const": mtype.value},
                    "value": value,
                    "upper_end_vertebra": {"const": upper},
                    "lower_end_vertebra": {"enum": list(VERTEBRAE[i + 1 :])},
                }
                _check_fields(Measurement, shape)
                shapes.append(_object(shape))
        else:
            shape = {
                "type": {"const": mtype.value},
                "value": value,
                "upper_end_vertebra": {"type": "null"},
                "lower_end_vertebra": {"type": "null"},
            }
            _check_fields(Measurement, shape)
            shapes.append(_object(shape))
    assert set(props) == {"type", "value", "upper_end_vertebra", "lower_end_vertebra"}
    return shapes


def _evidence_schema(
    base: dict[str, Any], image_sizes: Sequence[tuple[int, int]] | None, number: str
) -> dict[str, Any]:
    image = _strip(base["properties"]["image"])
    image.pop("exclusiveMaximum", None)
    x_desc, y_desc = "column in the input image, pixels", "row in the input image, pixels"
    no_point = {"x": {"type": "null"}, "y": {"type": "null"}}
    shapes: list[dict[str, Any]] = []
    if image_sizes is None:
        image["maximum"] = 63
        coord = {"type": number, "minimum": 0, "maximum": _MAX_COORDINATE}
        point = {"x": {**coord, "description": x_desc}, "y": {**coord, "description": y_desc}}
        shapes = [_object({"image": image, **point}), _object({"image": image, **no_point})]
        _check_fields(Evidence, {"image": image, **point})
    else:
        # One shape per image, so that a point always lies inside the image it cites.
        for i, (columns, rows) in enumerate(image_sizes):
            point = {
                "x": {"type": number, "minimum": 0, "maximum": columns, "description": x_desc},
                "y": {"type": number, "minimum": 0, "maximum": rows, "description": y_desc},
            }
            _check_fields(Evidence, {"image": {"const": i}, **point})
            shapes.append(_object({"image": {"const": i}, **point}))
        indices = {
            "type": "integer",
            "minimum": 0,
            "maximum": len(image_sizes) - 1,
            "description": image.get("description", ""),
        }
        shapes.append(_object({"image": indices, **no_point}))
    return {"description": base.get("description", ""), "anyOf": shapes}


def answer_schema(
    *, image_sizes: Sequence[tuple[int, int]] | None = None, limits: SchemaLimits | None = None
) -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of a model answer.

    Parameters
    ----------
    image_sizes
        ``(columns, rows)`` of each input image of the request, in index order: bounds evidence image
        indices and points so that every admitted answer resolves to the request's images.  ``None``
        allows the contract's indices 0–63 and any non-negative point.
    limits
        Size limits (default: the contract's).  The demo backend passes smaller ones to keep a random
        model's answers short.

    Returns
    -------
    dict
        A self-contained schema (``$defs`` inlined by reference) that admits only answers that
        :class:`~inference.findings.ModelAnswer` accepts.
    """
    if image_sizes is not None:
        image_sizes = [(int(c), int(r)) for c, r in image_sizes]
        if not 1 <= len(image_sizes) <= 64 or any(c < 1 or r < 1 for c, r in image_sizes):
            raise ValueError(f"image_sizes: need 1 to 64 positive (columns, rows), got {image_sizes!r}")
    lim = limits or SchemaLimits()
    number = "integer" if lim.integer_numbers else "number"
    base = ModelAnswer.model_json_schema()
    defs = base["$defs"]

    enums = {name: _strip(defs[name]) for name in ("FindingType", "Severity", "Laterality")}
    severity = {"$ref": "#/$defs/Severity"}
    laterality = {"anyOf": [{"$ref": "#/$defs/Laterality"}, {"type": "null"}]}
    measurements = {
        "type": "array",
        "items": {"$ref": "#/$defs/Measurement"},
        "maxItems": lim.max_measurements,
    }
    evidence = {"type": "array", "items": {"$ref": "#/$defs/Evidence"}, "maxItems": lim.max_evidence}
    lf = defs["LevelFinding"]["properties"]
    grade = _strip(lf["grade"]["anyOf"][0])

    disc = sorted(DISC_FINDINGS, key=list(FindingType).index)
    vertebral = [
        f
        for f in FindingType
        if f not in DISC_FINDINGS and f not in (FindingType.SPONDYLOLISTHESIS, FindingType.NO_ABNORMALITY)
    ]
    shapes = {
        "SegmentFinding": (
            "A disc-level finding: on a motion segment (L4-L5).",
            {"enum": list(SEGMENTS), "description": "motion segment, upper-lower (L4-L5, L5-S1)"},
            {"enum": [f.value for f in disc]},
            {"type": "null"},
            severity,
        ),
        "Spondylolisthesis": (
            "Spondylolisthesis of a vertebra over the one below, with its Meyerding grade.",
            {"enum": list(VERTEBRAE), "description": "the slipped vertebra (L4, L5)"},
            {"const": FindingType.SPONDYLOLISTHESIS.value},
            {"anyOf": [grade, {"type": "null"}], "description": "Meyerding grade 1-5"},
            severity,
        ),
        "VertebralFinding": (
            "A finding at a vertebra (fracture, scoliosis apex).",
            {"enum": list(VERTEBRAE), "description": "vertebra (C1..S1)"},
            {"enum": [f.value for f in vertebral]},
            {"type": "null"},
            severity,
        ),
        "NoAbnormality": (
            "A vertebra or disc level reviewed and found normal.",
            {"enum": list(LEVELS), "description": "vertebra (L5) or motion segment (L4-L5)"},
            {"const": FindingType.NO_ABNORMALITY.value},
            {"type": "null"},
            {"const": Severity.NONE.value},
        ),
    }
    out_defs: dict[str, Any] = dict(enums)
    for name, (desc, level, finding, grade_schema, severity_schema) in shapes.items():
        props = {
            "level": level,
            "finding": finding,
            "severity": severity_schema,
            "grade": grade_schema,
            "laterality": laterality,
            "measurements": measurements,
            "evidence": evidence,
        }
        _check_fields(LevelFinding, props)
        out_defs[name] = _object(props, description=desc)
    out_defs["Measurement"] = {
        "description": defs["Measurement"].get("description", ""),
        "anyOf": _measurement_shapes(defs["Measurement"], number),
    }
    out_defs["Evidence"] = _evidence_schema(defs["Evidence"], image_sizes, number)

    report_props: dict[str, Any] = {}
    for name, prop in defs["NarrativeReport"]["properties"].items():
        text = _strip(prop)
        text["minLength"] = 1
        text["maxLength"] = min(int(text.get("maxLength", lim.max_text)), lim.max_text)
        report_props[name] = text
    _check_fields(NarrativeReport, report_props)
    out_defs["NarrativeReport"] = _object(report_props, description=defs["NarrativeReport"].get("description", ""))

    levels: dict[str, Any] = {
        "type": "array",
        "items": {"anyOf": [{"$ref": f"#/$defs/{name}"} for name in shapes]},
        "maxItems": lim.max_levels,
        "description": base["properties"]["levels"].get("description", "one entry per finding per level"),
    }
    min_levels = int(base["properties"]["levels"].get("minItems", 0))
    if min_levels > lim.max_levels:
        raise ValueError(f"limits: max_levels {lim.max_levels} is below the contract's minimum {min_levels}")
    if min_levels:
        levels["minItems"] = min_levels
    top = {
        "levels": levels,
        "report": {"$ref": "#/$defs/NarrativeReport"},
    }
    _check_fields(ModelAnswer, top)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **_object(top, title="ModelAnswer", description=base.get("description", "")),
        "$defs": out_defs,
    }
    return copy.deepcopy(schema)


_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL | re.IGNORECASE)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_answer(text: str) -> ModelAnswer:
    """Parse and validate a model's output.

    Accepts exactly one JSON object, optionally wrapped in a Markdown code fence (unconstrained chat
    servers add one).  Validation is the pydantic contract, so level spellings such as ``"L4/5"`` are
    normalised; output produced under :func:`answer_schema` always passes.

    Parameters
    ----------
    text
        The model's decoded output.

    Returns
    -------
    ModelAnswer
        The validated answer, levels ordered cranio-caudally.

    Raises
    ------
    InvalidModelOutputError
        Not JSON, or JSON that does not validate; the message says where and why.
    """
    if not isinstance(text, str):
        raise InvalidModelOutputError(f"model output: expected text, got {type(text).__name__}")
    m = _FENCE.match(text)
    body = m.group(1) if m else text
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        snippet = body.strip()[:80].replace("\n", " ")
        raise InvalidModelOutputError(f"model output is not JSON ({exc}); starts with {snippet!r}") from exc
    if not isinstance(obj, dict):
        raise InvalidModelOutputError(f"model output: expected a JSON object, got {type(obj).__name__}")
    try:
        return ModelAnswer.model_validate(obj)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()[:5])
        more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise InvalidModelOutputError(f"model output does not validate: {errors}{more}") from exc
