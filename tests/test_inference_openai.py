"""The ``openai`` backend against a real ``transformers serve`` (tiny demo model) and a swapped transport."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from dicom_node.errors import is_transient
from dicom_node.network.association import free_port
from inference.backends import load_model
from inference.backends.openai_backend import ANSWER_ATTEMPTS, OpenAIBackend
from inference.demo_model import build_demo_model
from inference.errors import BackendUnavailableError, InferenceError, InvalidModelOutputError
from inference.findings import ImagePlane, InputImage
from inference.inputs import ModelImage, ModelInput, Task
from inference.settings import ModelSettings, OpenAISettings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VALID = {
    "levels": [
        {
            "level": "L4-L5",
            "finding": "disc_herniation",
            "severity": "moderate",
            "grade": None,
            "laterality": "left",
            "measurements": [],
            "evidence": [{"image": 1, "x": 10.0, "y": 20.0}],
        }
    ],
    "report": {
        k: "text"
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


def _inputs() -> ModelInput:
    rng = np.random.default_rng(0)
    images = []
    for i, (rows, cols) in enumerate([(224, 224), (224, 112)]):
        ref = InputImage(
            index=i,
            plane=ImagePlane.SAGITTAL,
            modality="MR",
            series_instance_uid="1.2.3",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            sop_instance_uids=(f"1.2.3.{i}",),
            rows=rows,
            columns=cols,
            description="sagittal T2",
        )
        images.append(ModelImage(rng.integers(0, 255, (rows, cols), dtype=np.uint8), ref))
    return ModelInput("1.2.3.4", "MR", Task.STRUCTURED_REPORT, tuple(images))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    model_dir = build_demo_model(tmp_path_factory.getbasetemp() / "spinemed-demo-model")
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(exe),
                "serve",
                str(model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--device",
                "cpu",
            ],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.25)
        yield f"{url}/v1", model_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_real_transformers_serve(server: tuple[str, Path], tmp_path: Path) -> None:
    """Images reach the model; the random answer is refused explicitly after one retry."""
    base_url, model_dir = server
    bodies: list[dict[str, Any]] = []

    def record(request: httpx.Request) -> None:
        bodies.append(json.loads(request.content))

    settings = ModelSettings(
        backend="openai",
        path=model_dir,
        max_new_tokens=48,
        openai=OpenAISettings(base_url=base_url, model=str(model_dir), timeout_s=120, max_retries=0),
    )
    backend = OpenAIBackend(
        settings, http_client=httpx.Client(event_hooks={"request": [record]}), cache_dir=tmp_path
    )
    assert (
        backend.identity.demo
        and backend.identity.backend == "openai"
        and len(backend.identity.weights_digest) == 64
    )
    inputs = _inputs()
    with pytest.raises(InvalidModelOutputError, match=f"no valid answer in {ANSWER_ATTEMPTS} attempts"):
        backend.analyze(inputs)
    assert len(bodies) == ANSWER_ATTEMPTS
    body = bodies[0]
    assert (
        body["response_format"]["type"] == "json_schema" and body["response_format"]["json_schema"]["strict"]
    )
    urls = [
        p["image_url"]["url"]
        for m in body["messages"]
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image_url"
    ]
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    # the server expanded both images into visual tokens: (224/28)^2 + (224/28)*(112/28) = 64 + 32
    raw = backend._client.chat.completions.create(
        model=str(model_dir), messages=backend.messages(inputs), max_tokens=4
    )
    assert raw.usage is not None and raw.usage.prompt_tokens > 96


def _mock_backend(responses: list[str | int], tmp_path: Path) -> tuple[OpenAIBackend, list[int]]:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        item = responses[min(len(calls), len(responses) - 1)]
        calls.append(1)
        if isinstance(item, int):
            return httpx.Response(item, json={"error": {"message": "boom"}})
        return httpx.Response(
            200,
            json={
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": item}}
                ],
            },
        )

    settings = ModelSettings(
        backend="openai", openai=OpenAISettings(base_url="http://test/v1", max_retries=0)
    )
    return OpenAIBackend(settings, http_client=httpx.Client(transport=httpx.MockTransport(handler))), calls


def test_swapped_transport_success_retry_and_errors(tmp_path: Path) -> None:
    backend, calls = _mock_backend(["not json", "```json\n" + json.dumps(VALID) + "\n```"], tmp_path)
    findings = backend.analyze(_inputs())
    assert len(calls) == 2 and findings.levels[0].level == "L4-L5" and not findings.model.demo
    bad_evidence = json.loads(json.dumps(VALID))
    bad_evidence["levels"][0]["evidence"] = [{"image": 5}]
    backend, calls = _mock_backend([json.dumps(bad_evidence)], tmp_path)
    with pytest.raises(InvalidModelOutputError, match="image 5") as invalid:
        backend.analyze(_inputs())
    assert not is_transient(invalid.value)
    backend, calls = _mock_backend([503], tmp_path)
    with pytest.raises(BackendUnavailableError, match="HTTP 503") as unavailable:
        backend.analyze(_inputs())
    assert is_transient(unavailable.value)  # the worker defers the study and tries again
    backend, calls = _mock_backend([429], tmp_path)
    with pytest.raises(BackendUnavailableError, match="HTTP 429"):
        backend.analyze(_inputs())
    backend, calls = _mock_backend([400], tmp_path)
    with pytest.raises(InferenceError, match="HTTP 400") as rejected:
        backend.analyze(_inputs())
    assert not is_transient(rejected.value)  # this request's own fault: the job fails with the reason
    unreachable = load_model(
        ModelSettings(
            backend="openai",
            openai=OpenAISettings(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0, timeout_s=5),
        ),
        data_dir=tmp_path,
    )
    with pytest.raises(BackendUnavailableError, match="unreachable"):
        unreachable.analyze(_inputs())
