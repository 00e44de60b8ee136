"""The real transformers code path on the tiny demo model: end to end, constrained decoding, failures."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jsonschema
import pytest

from dicom_node.devtools import phantoms as synthetic
from inference.backends import load_model
from inference.backends import transformers_backend as tb
from inference.backends.demo import DemoBackend
from inference.backends.qwen_vl import policy_for
from inference.demo_model import DEMO_MARKER_FILE, DEMO_NOTICE, build_demo_model, demo_model_is_complete
from inference.errors import BackendUnavailableError, InferenceTimeoutError, InvalidModelOutputError
from inference.findings import LEVELS, SpineFindings, level_sort_key
from inference.inputs import ModelInput
from inference.preprocess import prepare_inputs
from inference.prompts import PROMPT_VERSION
from inference.schema import parse_answer
from inference.settings import ModelSettings
from inference.study import load_study

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.getbasetemp() / "spinemed-demo-model")


@pytest.fixture(scope="module")
def backend(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DemoBackend:
    model = load_model(ModelSettings(backend="demo", path=demo_dir), data_dir=tmp_path_factory.mktemp("data"))
    assert isinstance(model, DemoBackend)
    return model


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelInput]:
    base = tmp_path_factory.mktemp("phantoms")
    made = {
        "MR": synthetic.make_lumbar_mr(base / "mr", with_axial=True),
        "CT": synthetic.make_spine_ct(base / "ct"),
        "DX": synthetic.make_scoliosis_radiograph(base / "xr", photometric="MONOCHROME1"),
    }
    out = {}
    for name, s in made.items():
        study = load_study(list(s.paths))
        out[name] = prepare_inputs(study, [x.series_instance_uid for x in study.series], ModelSettings(),
                                   policy_for(ModelSettings()))
        if name == "DX":  # a small request for the many-samples test
            out["small"] = prepare_inputs(
                study, [x.series_instance_uid for x in study.series], ModelSettings(image_size=224),
                policy_for(ModelSettings(image_size=224)),
            )
    return out


def _check(findings: SpineFindings, inputs: ModelInput) -> None:
    assert findings.model.demo and DEMO_NOTICE in findings.model.name
    assert findings.model.backend == "demo" and findings.model.prompt_version == PROMPT_VERSION
    assert len(findings.model.weights_digest) == 64
    assert findings.study_instance_uid == inputs.study_instance_uid
    assert findings.images == [i.ref for i in inputs.images]
    levels = [f.level for f in findings.levels]
    assert levels and all(level in LEVELS for level in levels)
    assert levels == sorted(levels, key=level_sort_key)
    for f in findings.levels:
        for e in f.evidence:
            assert e.image < len(inputs.images)


@pytest.mark.parametrize("modality", ["MR", "CT", "DX"])
def test_end_to_end_demo(backend: DemoBackend, studies: dict[str, ModelInput], modality: str) -> None:
    inputs = studies[modality]
    started = time.perf_counter()
    findings = backend.analyze(inputs)
    elapsed = time.perf_counter() - started
    _check(findings, inputs)
    print(f"{modality}: {len(inputs.images)} images, {elapsed:.2f} s per study (demo model, CPU)")


def test_sampled_outputs_all_validate(backend: DemoBackend, studies: dict[str, ModelInput]) -> None:
    inputs = studies["small"]
    validator = jsonschema.Draft202012Validator(backend.schema(inputs))
    original = backend.settings
    backend.settings = original.model_copy(update={"temperature": 1.0})
    try:
        texts = [backend.generate_text(inputs, seed=seed) for seed in range(10)]
    finally:
        backend.settings = original
    for text in texts:
        validator.validate(json.loads(text))
        parse_answer(text)
    assert len(set(texts)) > 1  # sampling really sampled


def test_timeout_and_token_budget_fail_explicitly(
    backend: DemoBackend, studies: dict[str, ModelInput]
) -> None:
    original = backend.settings
    try:
        backend.settings = original.model_copy(update={"timeout_s": 0.05})
        with pytest.raises(InferenceTimeoutError, match="no answer within"):
            backend.analyze(studies["small"])
        backend.settings = original.model_copy(update={"max_new_tokens": 16})
        with pytest.raises(InvalidModelOutputError, match="incomplete"):
            backend.analyze(studies["small"])
    finally:
        backend.settings = original


def test_a_processor_that_would_resize_the_images_is_refused(
    backend: DemoBackend, studies: dict[str, ModelInput], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend's size policy follows its processor's limits; a processor configured with other limits
    (here a max_pixels far below the images' size) would rescale them and misplace every coordinate: the
    backend refuses with a permanent error naming the mismatch instead of answering."""
    from dicom_node.errors import is_transient
    from inference.errors import InferenceError

    inputs = studies["DX"]  # prepared with the default image_size, as the backend's settings
    rows, cols = inputs.images[0].ref.rows, inputs.images[0].ref.columns
    assert backend.image_size.fit(rows, cols) == (rows, cols)  # what preprocessing used is what it keeps
    ip = backend.processor.image_processor
    small = 28 * 28 * 4
    monkeypatch.setattr(ip, "max_pixels", small, raising=False)
    monkeypatch.setattr(ip, "size", {**dict(ip.size), "longest_edge": small}, raising=False)
    with pytest.raises(InferenceError, match=r"model processor resized image 0 from \d+x\d+ to") as err:
        backend.analyze(inputs)
    assert not is_transient(err.value)


def test_out_of_gpu_memory_is_transient(
    backend: DemoBackend, studies: dict[str, ModelInput], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's OutOfMemoryError in generation (another job on the GPU) is a transient BackendUnavailableError:
    the worker defers the study instead of failing it."""
    import torch

    from dicom_node.errors import is_transient

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(backend.model, "generate", out_of_memory)
    with pytest.raises(BackendUnavailableError, match="out of CPU memory") as err:
        backend.analyze(studies["small"])
    assert is_transient(err.value)


def test_demo_build_is_idempotent_and_reloads(demo_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    marker = demo_dir / DEMO_MARKER_FILE
    before = marker.stat().st_mtime_ns
    assert build_demo_model(demo_dir) == demo_dir and marker.stat().st_mtime_ns == before
    assert "not for clinical use" in marker.read_text(encoding="utf-8")
    processor = AutoProcessor.from_pretrained(demo_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(demo_dir, local_files_only=True)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert "not for clinical use" in model.config.spinemed_demo
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    # a stale / partial build is replaced
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert not demo_model_is_complete(tmp_path / "m")
    build_demo_model(tmp_path / "m")
    assert demo_model_is_complete(tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left behind


def test_weights_digest_is_cached(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tb.weights_digest(demo_dir, cache_dir=tmp_path)

    def boom(path: Path) -> str:
        raise AssertionError("rehashed despite the cache")

    monkeypatch.setattr(tb, "_file_sha256", boom)
    assert tb.weights_digest(demo_dir, cache_dir=tmp_path) == first


def test_transformers_backend_errors(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match=r"no config\.json"):
        load_model(ModelSettings(backend="transformers", path=tmp_path), data_dir=tmp_path)
    with pytest.raises(BackendUnavailableError, match=r"set \[model\]\.path"):
        load_model(ModelSettings(backend="transformers"), data_dir=tmp_path)
    with pytest.raises(BackendUnavailableError, match="local Hugging Face cache"):
        load_model(
            ModelSettings(backend="transformers", hub_id="Qwen/Qwen2.5-VL-7B-Instruct"), data_dir=tmp_path
        )


def test_static_cache_decoding_path(demo_dir: Path, studies: dict[str, ModelInput], tmp_path: Path) -> None:
    """The static-cache path (auto-on for CUDA) runs and gives the same greedy answer as the dynamic cache."""
    inputs = studies["small"]
    answers = []
    for mode in ("off", "on"):
        model = load_model(ModelSettings(backend="demo", path=demo_dir, static_cache=mode), data_dir=tmp_path)
        assert isinstance(model, DemoBackend)
        assert model.static_cache is (mode == "on")
        findings = model.analyze(inputs)
        _check(findings, inputs)
        answers.append(findings.answer)
    assert answers[0] == answers[1]
    auto = load_model(ModelSettings(backend="demo", path=demo_dir, device="cpu"), data_dir=tmp_path)
    assert isinstance(auto, DemoBackend) and auto.static_cache is False, "auto is off on CPU"
