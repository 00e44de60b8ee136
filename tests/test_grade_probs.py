"""Per-grade probabilities: the demo model's constrained decoder (real) and an OpenAI-compatible server's
logprobs (a real HTTP server on loopback)."""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dicom_node.devtools import phantoms as synthetic
from inference.backends import load_model
from inference.backends.demo import DemoBackend
from inference.backends.openai_backend import OpenAIBackend
from inference.backends.qwen_vl import policy_for
from inference.demo_model import build_demo_model
from inference.findings import FindingType, Laterality, Severity, SpineFindings
from inference.grade_probs import from_logprobs
from inference.preprocess import prepare_inputs
from inference.settings import ModelSettings, OpenAISettings
from inference.study import load_study
from tests.test_inference_openai import VALID, _inputs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_GRADE = {Severity.NONE: "normal_mild", Severity.MILD: "normal_mild", Severity.MODERATE: "moderate",
          Severity.SEVERE: "severe"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoBackend:
    model_dir = build_demo_model(tmp_path_factory.getbasetemp() / "spinemed-demo-model")
    model = load_model(ModelSettings(backend="demo", path=model_dir, temperature=0.0),
                       data_dir=tmp_path_factory.mktemp("data"))
    assert isinstance(model, DemoBackend)
    return model


def _check_probabilities(findings: SpineFindings, *, every: bool) -> int:
    graded = [f for f in findings.levels if f.finding is not FindingType.NO_ABNORMALITY]

    def key(f: Any) -> tuple[Any, ...]:
        return (f.level, f.finding, f.laterality if f.finding is FindingType.FORAMINAL_STENOSIS else None)

    by_key = {(g.level, g.finding, g.laterality): g for g in findings.grade_probabilities}
    assert len(by_key) == len(findings.grade_probabilities)  # one per (level, finding, side)
    if every:  # every graded finding has its probabilities
        assert {key(f) for f in graded} == set(by_key)
    assert set(by_key) <= {key(f) for f in graded}
    for f in graded:
        g = by_key.get(key(f))
        if g is None:
            continue
        p = {"normal_mild": g.normal_mild, "moderate": g.moderate, "severe": g.severe}
        assert math.isclose(sum(p.values()), 1.0, abs_tol=1e-6)
        written = _GRADE[f.severity]
        assert p[written] > 0
        # greedy: the value written is the most probable of the four; normal_mild sums two of them
        others = [k for k in p if k != written and (written == "normal_mild" or k != "normal_mild")]
        assert all(p[written] >= p[k] for k in others), (f.severity, p)
    return len(by_key)


def test_demo_model_probabilities(demo: DemoBackend, tmp_path: Path) -> None:
    # greedy decoding of the (fixed) random demo model: on the radiograph it writes each value with the
    # value's own first token; on the MR it writes "moderate" as "m" + "oderate" ("m" starts "mild"), which
    # gets no probabilities rather than wrong ones
    made = [
        (synthetic.make_scoliosis_radiograph(tmp_path / "xr"), True),
        (synthetic.make_lumbar_mr(tmp_path / "mr"), False),
    ]
    graded = 0
    for s, every in made:
        study = load_study(list(s.paths))
        settings = ModelSettings(image_size=224)
        inputs = prepare_inputs(study, [x.series_instance_uid for x in study.series], settings, policy_for(settings))
        findings = demo.analyze(inputs)
        graded += _check_probabilities(findings, every=every)
        # the findings JSON carries them
        assert len(json.loads(findings.model_dump_json())["grade_probabilities"]) == len(findings.grade_probabilities)
    assert graded >= 1


# ------------------------------------------------------------------------------------------ openai
def _tokens(answer: str, decisions: dict[int, tuple[str, list[tuple[str, float]]]]) -> list[dict[str, Any]]:
    """Split ``answer`` into tokens: after the n-th ``"severity":"`` the token given in ``decisions``."""
    out: list[dict[str, Any]] = []
    key = '"severity":"'
    rest, n = answer, 0
    while key in rest:
        head, rest = rest.split(key, 1)
        out += [{"token": c, "logprob": -0.01, "top_logprobs": []} for c in (head[:5], head[5:]) if c]
        out.append({"token": key, "logprob": -0.01, "top_logprobs": []})
        token, top = decisions[n]
        assert rest.startswith(token)
        out.append({"token": token, "logprob": top[0][1],
                    "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]})
        rest = rest[len(token):]
        n += 1
    out.append({"token": rest, "logprob": -0.01, "top_logprobs": []})
    return out


class _Server:
    def __init__(self) -> None:
        self.responses: list[dict[str, Any]] = []
        self.bodies: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.bodies.append(json.loads(body))
                data = json.dumps(server.responses[min(len(server.bodies), len(server.responses)) - 1]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    thread = threading.Thread(target=s.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()
        thread.join()


def _completion(content: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]}


def _answer() -> str:
    answer = json.loads(json.dumps(VALID))
    second = dict(answer["levels"][0], level="L5-S1", severity="mild", laterality=None, evidence=[])
    third = dict(answer["levels"][0], level="L3-L4", finding="foraminal_stenosis", severity="mild", laterality="right",
                 evidence=[])
    answer["levels"] += [second, third]
    return json.dumps(answer, separators=(",", ":"))


def test_openai_logprobs(server: _Server, tmp_path: Path) -> None:
    text = _answer()
    decisions = {
        # L4-L5 moderate: the best token of each value counts, "m" (mild or moderate) does not
        0: ("moder", [("moder", -0.5), ("m", -0.7), ("mild", -1.5), ("mi", -1.7), ("se", -2.0), ("none", -3.0)]),
        # L5-S1 mild, but begun with "m": the value is not decided by one token, no probabilities
        1: ("m", [("m", -0.2), ("none", -2.0)]),
        # L3-L4 mild; severe not among the top logprobs: 0
        2: ("mil", [("mil", -0.1), ("none", -2.3), ("moderate", -4.0)]),
    }
    server.responses = [_completion(text, _tokens(text, decisions))]
    backend = OpenAIBackend(ModelSettings(backend="openai",
                                          openai=OpenAISettings(base_url=server.url, max_retries=0)),
                            cache_dir=tmp_path)
    findings = backend.analyze(_inputs())
    assert server.bodies[0]["logprobs"] is True and server.bodies[0]["top_logprobs"] == 5
    got = {g.level: g for g in findings.grade_probabilities}
    assert set(got) == {"L4-L5", "L3-L4"}
    e = {v: math.exp(x) for v, x in {"moderate": -0.5, "mild": -1.5, "severe": -2.0, "none": -3.0}.items()}
    total = sum(e.values())
    g = got["L4-L5"]
    # a disc herniation's side is descriptive, not a condition of its own: no side (foraminal stenosis has one)
    assert g.laterality is None and g.finding is FindingType.DISC_HERNIATION
    assert math.isclose(g.moderate, e["moderate"] / total) and math.isclose(g.severe, e["severe"] / total)
    assert math.isclose(g.normal_mild, (e["mild"] + e["none"]) / total)
    e3 = {"mild": math.exp(-0.1), "none": math.exp(-2.3), "moderate": math.exp(-4.0)}
    g3 = got["L3-L4"]
    assert g3.finding is FindingType.FORAMINAL_STENOSIS and g3.laterality is Laterality.RIGHT  # the sided one
    assert math.isclose(g3.normal_mild, (e3["mild"] + e3["none"]) / sum(e3.values()))
    assert g3.severe == 0.0

    # a server that returns no logprobs: the findings, no probabilities
    server.responses = [_completion(text, None)]
    assert backend.analyze(_inputs()).grade_probabilities == ()


def test_logprobs_that_do_not_spell_the_answer_give_none() -> None:
    text = _answer()
    tokens = _tokens(text, {0: ("moder", [("moder", -0.5)]), 1: ("mild", [("mild", -0.1)]),
                            2: ("mild", [("mild", -0.1)])})
    assert len(from_logprobs(text, tokens)) == 3
    assert from_logprobs(text, tokens[:-1]) == ()  # tokens missing
    wrong = [dict(t) for t in tokens]
    for t in wrong:
        if t["token"] == "moder":
            t["token"] = "se"  # the decision token is not the value the answer has
    assert from_logprobs(text, wrong) == ()  # no longer spells the answer
    assert from_logprobs(text, []) == ()
