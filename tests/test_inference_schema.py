"""Level normalisation and the answer schema: property-based tests (hypothesis + jsonschema)."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.errors import InvalidModelOutputError
from inference.findings import (
    DISC_FINDINGS,
    LEVELS,
    SEGMENTS,
    VERTEBRAE,
    FindingType,
    Laterality,
    LevelError,
    MeasurementType,
    ModelAnswer,
    Severity,
    is_segment,
    level_sort_key,
    normalise_level,
)
from inference.schema import SchemaLimits, answer_schema, parse_answer

SCHEMA = answer_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
SIZES = [(448, 448), (224, 448), (448, 364)]
SIZED_VALIDATOR = jsonschema.Draft202012Validator(answer_schema(image_sizes=SIZES))


# ------------------------------------------------------------------------------ level normalisation
@given(st.sampled_from(LEVELS))
def test_canonical_levels_round_trip(level: str) -> None:
    assert normalise_level(level) == level
    assert normalise_level(level.lower()) == level


def _spellings(upper: str, lower: str) -> list[str]:
    short = lower[1:] if lower[0] == upper[0] else lower
    return [
        f"{upper}/{short}",
        f"{upper}-{short}",
        f"{upper.lower()}–{lower.lower()}",
        f"{upper} / {lower}",
        f"{upper}-{lower}",
        f"{upper}/{lower}",
        f"{upper} to {lower}",
        f"disc {upper}-{lower}",
    ]


@given(st.sampled_from(SEGMENTS), st.data())
def test_spelled_segments_normalise(segment: str, data: st.DataObject) -> None:
    upper, lower = segment.split("-")
    spelling = data.draw(st.sampled_from(_spellings(upper, lower)))
    assert normalise_level(spelling) == segment


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("L4/5", "L4-L5"),
        ("L4-5", "L4-L5"),
        ("l4–l5", "L4-L5"),
        ("L4 / L5", "L4-L5"),
        ("L5/S1", "L5-S1"),
        ("T12/L1", "T12-L1"),
        ("c2-3", "C2-C3"),
    ],
)
def test_examples_normalise(text: str, expected: str) -> None:
    assert normalise_level(text) == expected


@given(st.sampled_from(VERTEBRAE), st.sampled_from(VERTEBRAE))
def test_non_adjacent_vertebrae_raise(a: str, b: str) -> None:
    if f"{a}-{b}" in SEGMENTS:
        assert normalise_level(f"{a}/{b}") == f"{a}-{b}"
    else:
        with pytest.raises(LevelError):
            normalise_level(f"{a}-{b}")


@given(
    st.one_of(
        st.sampled_from(["C0", "C8", "T14", "L7", "S2", "X1", "L", "", "L4-L5-S1", "L44"]),
        st.from_regex(r"\A[CTLS](0|1[3-9]|[2-9]\d)\Z"),
    )
)
def test_impossible_levels_raise(text: str) -> None:
    if text in {"T13"}:
        return
    with pytest.raises(LevelError):
        normalise_level(text)


@given(st.lists(st.sampled_from(LEVELS), min_size=2, max_size=10, unique=True))
def test_order_is_cranio_caudal(levels: list[str]) -> None:
    ordered = sorted(levels, key=level_sort_key)
    regions = "CTLS"
    for a, b in itertools.pairwise(ordered):
        ra, rb = regions.index(a[0]), regions.index(b[0])
        assert ra <= rb
        if ra == rb and not is_segment(a) and not is_segment(b):
            assert int(re.sub(r"\D", "", a)) < int(re.sub(r"\D", "", b))
    # a disc sits between its two vertebrae
    for seg in SEGMENTS:
        up, low = seg.split("-")
        assert level_sort_key(up) < level_sort_key(seg) < level_sort_key(low)


# ------------------------------------------------------------------------------ schema ⇒ contract
def _loose_text() -> st.SearchStrategy[Any]:
    return st.one_of(st.text(max_size=8), st.text(min_size=590, max_size=610), st.just(""), st.integers())


def _loose_measurement() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "type": st.one_of(st.sampled_from([m.value for m in MeasurementType]), st.just("bogus")),
            "value": st.one_of(st.floats(-10, 250, allow_nan=False), st.integers(-5, 300)),
            "upper_end_vertebra": st.one_of(st.none(), st.sampled_from(LEVELS)),
            "lower_end_vertebra": st.one_of(st.none(), st.sampled_from(LEVELS)),
        }
    )


def _loose_finding() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "level": st.one_of(st.sampled_from(LEVELS), st.sampled_from(["L4/5", "L3-L5", "X1"])),
            "finding": st.sampled_from([f.value for f in FindingType]),
            "severity": st.sampled_from([s.value for s in Severity]),
            "grade": st.one_of(st.none(), st.integers(0, 6)),
            "laterality": st.one_of(st.none(), st.sampled_from([lat.value for lat in Laterality])),
            "measurements": st.lists(_loose_measurement(), max_size=2),
            "evidence": st.lists(
                st.fixed_dictionaries(
                    {
                        "image": st.integers(-1, 4),
                        "x": st.one_of(st.none(), st.floats(-1, 500)),
                        "y": st.one_of(st.none(), st.floats(-1, 500)),
                    }
                ),
                max_size=2,
            ),
        }
    )


def _loose_answer() -> st.SearchStrategy[dict[str, Any]]:
    keys = [
        "findings",
        "diagnosis",
        "treatment_suggestions",
        "risk_and_prognosis",
        "follow_up",
        "diagnostic_basis",
    ]
    return st.fixed_dictionaries(
        {
            "levels": st.lists(_loose_finding(), max_size=3),
            "report": st.fixed_dictionaries({k: _loose_text() for k in keys}),
        }
    )


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_loose_answer())
def test_schema_admits_only_valid_answers(candidate: dict[str, Any]) -> None:
    """Anything the schema admits, the contract accepts (the schema may be stricter, never looser)."""
    for validator in (VALIDATOR, SIZED_VALIDATOR):
        if validator.is_valid(candidate):
            answer = parse_answer(json.dumps(candidate))
            assert isinstance(answer, ModelAnswer)


def _valid_measurement(finding: FindingType) -> st.SearchStrategy[dict[str, Any]]:
    def cobb(data: tuple[int, int, float]) -> dict[str, Any]:
        i, j, v = data
        a, b = sorted((i, j))
        return {
            "type": "cobb_angle",
            "value": v,
            "upper_end_vertebra": VERTEBRAE[a],
            "lower_end_vertebra": VERTEBRAE[b],
        }

    cobb_st = (
        st.tuples(st.integers(0, len(VERTEBRAE) - 1), st.integers(0, len(VERTEBRAE) - 1), st.floats(0, 180))
        .filter(lambda t: t[0] != t[1])
        .map(cobb)
    )
    other = st.sampled_from([m for m in MeasurementType if m is not MeasurementType.COBB_ANGLE]).flatmap(
        lambda m: st.fixed_dictionaries(
            {
                "type": st.just(m.value),
                "value": st.floats(0, 30),
                "upper_end_vertebra": st.none(),
                "lower_end_vertebra": st.none(),
            }
        )
    )
    return st.one_of(cobb_st, other)


@st.composite
def _valid_answer(draw: st.DrawFn) -> dict[str, Any]:
    levels = []
    for _ in range(draw(st.integers(1, 4))):
        finding = draw(st.sampled_from(list(FindingType)))
        normal = finding is FindingType.NO_ABNORMALITY  # any level, severity none
        level = draw(st.sampled_from(LEVELS if normal else SEGMENTS if finding in DISC_FINDINGS else VERTEBRAE))
        grade = draw(st.one_of(st.none(), st.integers(1, 5))) if finding is FindingType.SPONDYLOLISTHESIS else None
        image = draw(st.integers(0, len(SIZES) - 1))
        cols, rows = SIZES[image]
        point = draw(st.one_of(st.none(), st.tuples(st.floats(0, cols), st.floats(0, rows))))
        levels.append(
            {
                "level": level,
                "finding": finding.value,
                "severity": "none" if normal else draw(st.sampled_from([s.value for s in Severity])),
                "grade": grade,
                "laterality": draw(st.one_of(st.none(), st.sampled_from([lat.value for lat in Laterality]))),
                "measurements": draw(st.lists(_valid_measurement(finding), max_size=2)),
                "evidence": [{"image": image, "x": point[0] if point else None, "y": point[1] if point else None}],
            }
        )
    text = st.text(min_size=1, max_size=600)
    report = {
        k: draw(text)
        for k in (
            "findings",
            "diagnosis",
            "treatment_suggestions",
            "risk_and_prognosis",
            "follow_up",
            "diagnostic_basis",
        )
    }
    return {"levels": levels, "report": report}


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_valid_answer())
def test_model_answer_json_validates_against_schema(candidate: dict[str, Any]) -> None:
    """A ModelAnswer (dumped as JSON) validates against the schema; and round-trips through parse_answer."""
    answer = ModelAnswer.model_validate(candidate)
    dumped = json.loads(answer.model_dump_json())
    SIZED_VALIDATOR.validate(dumped)
    VALIDATOR.validate(dumped)
    assert parse_answer(json.dumps(dumped)) == answer


def test_schema_shape() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    text = json.dumps(SCHEMA)
    assert '"additionalProperties": true' not in text

    # every object lists all its properties as required (strict structured output)
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node["additionalProperties"] is False
                assert set(node["required"]) == set(node["properties"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(SCHEMA)
    assert SCHEMA["properties"]["levels"]["maxItems"] == 32
    small = answer_schema(limits=SchemaLimits(max_levels=2, max_text=10))
    assert small["properties"]["levels"]["maxItems"] == 2
    assert small["$defs"]["NarrativeReport"]["properties"]["diagnosis"]["maxLength"] == 10
    with pytest.raises(ValueError, match="contract"):
        SchemaLimits(max_text=601)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"levels": [], "report": {}}', "does not validate"),
        (
            '{"levels": [{"level": "L4", "finding": "disc_herniation", "severity": "mild"}], "report": '
            '{"findings": "a", "diagnosis": "b", "treatment_suggestions": "c", "risk_and_prognosis": "d", '
            '"follow_up": "e", "diagnostic_basis": "f"}}',
            "motion segment",
        ),
        ('{"levels": NaN}', "not JSON"),
    ],
)
def test_parse_answer_errors(text: str, match: str) -> None:
    with pytest.raises(InvalidModelOutputError, match=match):
        parse_answer(text)


def test_parse_answer_accepts_fenced_and_normalises() -> None:
    body = {
        "levels": [
            {"level": "L5/S1", "finding": "disc_bulge", "severity": "mild"},
            {"level": "L4/5", "finding": "disc_herniation", "severity": "moderate", "laterality": "left"},
        ],
        "report": {
            k: "x"
            for k in (
                "findings",
                "diagnosis",
                "treatment_suggestions",
                "risk_and_prognosis",
                "follow_up",
                "diagnostic_basis",
            )
        },
    }
    answer = parse_answer("```json\n" + json.dumps(body) + "\n```")
    assert [f.level for f in answer.levels] == ["L4-L5", "L5-S1"]


def test_a_finding_repeated_word_for_word_is_kept_once() -> None:
    """The random demo model once wrote "S1: vertebral fracture, left" three times over."""
    report = {k: "x" for k in ("findings", "diagnosis", "treatment_suggestions", "risk_and_prognosis",
                               "follow_up", "diagnostic_basis")}
    fracture = {"level": "S1", "finding": "vertebral_fracture", "severity": "mild", "laterality": "left"}
    other_side = {**fracture, "laterality": "right"}
    disc = {"level": "L4/5", "finding": "disc_herniation", "severity": "moderate"}
    answer = parse_answer(json.dumps({"levels": [fracture, disc, fracture, other_side, fracture],
                                      "report": report}))
    assert [(f.level, f.finding.value, f.laterality) for f in answer.levels] == [
        ("L4-L5", "disc_herniation", None), ("S1", "vertebral_fracture", "left"),
        ("S1", "vertebral_fracture", "right")], "repeats merged; a finding differing in anything kept"


def test_no_abnormality_has_no_severity_and_any_level() -> None:
    """A normal level is graded 'none' (the random demo once wrote 'no abnormality, moderate')."""
    schema = answer_schema()
    base = {
        "grade": None,
        "laterality": None,
        "measurements": [],
        "evidence": [],
    }
    report = {
        k: "x"
        for k in (
            "findings",
            "diagnosis",
            "treatment_suggestions",
            "risk_and_prognosis",
            "follow_up",
            "diagnostic_basis",
        )
    }
    for level in ("L4-L5", "S1"):
        ok = {"levels": [{"level": level, "finding": "no_abnormality", "severity": "none", **base}], "report": report}
        jsonschema.validate(ok, schema)
        ModelAnswer.model_validate(ok)
    bad = {"levels": [{"level": "S1", "finding": "no_abnormality", "severity": "moderate", **base}], "report": report}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(ValueError, match="severity"):
        ModelAnswer.model_validate(bad)
