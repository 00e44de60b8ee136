"""Batched constrained decoding (``[model] max_batch``): several studies in one ``generate``, each row with
its own grammar and deadline, on the real transformers code path with the tiny demo model."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import model_inputs, running_node, storescu, wait_until

from dicom_node.config import load_config
from dicom_node.devtools import phantoms as synthetic
from inference.backends import load_model
from inference.backends import transformers_backend as tb
from inference.backends.demo import DemoBackend
from inference.errors import InferenceError, InferenceTimeoutError
from inference.inputs import ModelImage, ModelInput
from inference.settings import ModelSettings


@pytest.fixture(scope="module")
def backend(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DemoBackend:
    model = load_model(ModelSettings(backend="demo", path=demo_model_dir, max_batch=4),
                       data_dir=tmp_path_factory.mktemp("data"))
    assert isinstance(model, DemoBackend)
    return model


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[ModelInput]:
    """Four studies whose prompts differ in length (so rows are padded): two radiographs, an MR, a CT."""
    base = tmp_path_factory.mktemp("phantoms")
    made = [
        synthetic.make_scoliosis_radiograph(base / "ap", seed=1),
        synthetic.make_scoliosis_radiograph(base / "lat", lateral=True, seed=2),
        synthetic.make_lumbar_mr(base / "mr", slices=12, size=192),
        synthetic.make_spine_ct(base / "ct", slices=40, size=192),
    ]
    return [model_inputs(s.paths) for s in made]


@pytest.fixture(scope="module")
def alone(backend: DemoBackend, studies: list[ModelInput]) -> list[str]:
    """Each study's answer decoded on its own (a batch of one)."""
    return [backend.generate_text(s) for s in studies]


@pytest.fixture()
def batch_sizes(backend: DemoBackend, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of rows of every ``generate`` the backend runs."""
    sizes: list[int] = []
    real = backend.model.generate

    def counting(*args: Any, **kwargs: Any) -> Any:
        sizes.append(int(kwargs["input_ids"].shape[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.model, "generate", counting)
    return sizes


@dataclasses.dataclass
class Held:
    """Callers queued while the model is held busy, then let go together (so they form one batch)."""

    backend: tb.TransformersBackend
    threads: list[threading.Thread] = dataclasses.field(default_factory=list)
    results: dict[int, object] = dataclasses.field(default_factory=dict)

    def hold(self) -> None:
        with self.backend._queue_changed:
            self.backend._decoding = True  # as if another batch were being decoded: callers queue up

    def call(self, key: int, fn: Any) -> None:
        def run() -> None:
            try:
                self.results[key] = fn()
            except Exception as exc:  # the test looks at each caller's outcome
                self.results[key] = exc

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)


@pytest.fixture()
def held(backend: DemoBackend) -> Iterator[Held]:
    h = Held(backend)
    try:
        yield h
    finally:
        with backend._queue_changed:
            backend._decoding = False
            backend._queue_changed.notify_all()
        for t in h.threads:
            t.join(timeout=120)


def _release(h: Held, n: int) -> None:
    wait_until(lambda: len(h.backend._queue) == n, 30, f"{n} callers queued")
    with h.backend._queue_changed:
        h.backend._decoding = False
        h.backend._queue_changed.notify_all()
    for t in h.threads:
        t.join(timeout=120)


def test_a_batch_gives_each_study_the_answer_it_gets_alone(
    backend: DemoBackend, studies: list[ModelInput], alone: list[str], batch_sizes: list[int], held: Held
) -> None:
    """Four studies of different prompt lengths (left-padded) decoded in one generate, each constrained by
    its own grammar: greedy answers identical, token for token, to those decoded one at a time."""
    held.hold()
    for i, s in enumerate(studies):
        held.call(i, lambda s=s: backend.generate_text(s))
    _release(held, 4)
    assert batch_sizes == [4], "one generate for the four studies"
    assert [held.results[i] for i in range(4)] == alone


def test_more_callers_than_max_batch_are_decoded_in_turn(
    backend: DemoBackend, studies: list[ModelInput], alone: list[str], batch_sizes: list[int], held: Held
) -> None:
    """Six waiting studies with max_batch 4: a batch of four (the oldest), then one of two."""
    order = [0, 1, 2, 3, 0, 1]
    held.hold()
    for k, i in enumerate(order):
        held.call(k, lambda i=i: backend.generate_text(studies[i]))
        wait_until(lambda k=k: len(backend._queue) == k + 1, 30, "queued in order")
    _release(held, 6)
    assert batch_sizes == [4, 2]
    assert [held.results[k] for k in range(6)] == [alone[i] for i in order]


def test_analyze_in_a_batch_keeps_each_studys_findings_and_grade_probabilities(
    backend: DemoBackend, studies: list[ModelInput], batch_sizes: list[int], held: Held
) -> None:
    single = [backend.analyze(s) for s in studies[:2]]
    batch_sizes.clear()
    held.hold()
    for i, s in enumerate(studies[:2]):
        held.call(i, lambda s=s: backend.analyze(s))
    _release(held, 2)
    assert batch_sizes == [2]
    for i in range(2):
        got = held.results[i]
        assert not isinstance(got, Exception), got
        assert got.model_dump() == single[i].model_dump()  # type: ignore[attr-defined]
        assert got.study_instance_uid == studies[i].study_instance_uid  # type: ignore[attr-defined]


def test_the_free_model_waits_briefly_for_a_fuller_batch(
    backend: DemoBackend, studies: list[ModelInput], alone: list[str], batch_sizes: list[int],
    monkeypatch: pytest.MonkeyPatch, held: Held
) -> None:
    """A study that finds the model free waits up to batch_wait_ms for company: one arriving 0.2 s later
    is decoded in the same generate; with no wait, each goes alone."""
    for wait_ms, expected in ((5000.0, [2]), (0.0, [1, 1])):
        batch_sizes.clear()
        monkeypatch.setattr(backend, "settings", backend.settings.model_copy(update={"batch_wait_ms": wait_ms}))
        held.call(0, lambda: backend.generate_text(studies[0]))
        if wait_ms:
            wait_until(lambda: len(backend._queue) == 1 and backend._decoding, 30, "the first study gathering")
        else:
            wait_until(lambda: 0 in held.results, 60, "the first study answered")
        time.sleep(0.2)
        held.call(1, lambda: backend.generate_text(studies[1]))
        for t in held.threads:
            t.join(timeout=120)
        held.threads.clear()
        assert batch_sizes == expected, wait_ms
        assert [held.results.pop(0), held.results.pop(1)] == alone[:2]


def test_a_row_past_its_deadline_fails_alone(backend: DemoBackend, studies: list[ModelInput],
                                            alone: list[str]) -> None:
    """Each row keeps its own deadline: one that had already passed is refused before decoding, one
    that passes while decoding is stopped and reported as a timeout; the other rows are answered as
    they would be alone."""
    now = time.monotonic()
    requests = [tb._Request(studies[0], 0, now + 300), tb._Request(studies[1], 0, now - 1),
                tb._Request(studies[2], 0, now + 0.05), tb._Request(studies[3], 0, now + 300)]
    outcomes = backend._decode_batch(requests)
    assert isinstance(outcomes[1], InferenceTimeoutError) and "before decoding" in str(outcomes[1])
    assert isinstance(outcomes[2], InferenceTimeoutError) and "tokens generated" in str(outcomes[2])
    assert [o.text for o in (outcomes[0], outcomes[3])] == [alone[0], alone[3]]  # type: ignore[union-attr]


def test_a_row_the_processor_would_resize_fails_alone(backend: DemoBackend, studies: list[ModelInput],
                                                      alone: list[str]) -> None:
    """An image whose size the processor would change (450 px is not a multiple of 28) fails its own row
    with the permanent 'resized' error; the other row is answered."""
    dx = studies[0]
    image = dx.images[0]
    pixels = np.zeros((450, 450), dtype=np.uint8)
    ref = image.ref.model_copy(update={"rows": 450, "columns": 450})
    odd = dataclasses.replace(dx, images=(ModelImage(pixels, ref),))
    outcomes = backend._decode_batch([tb._Request(odd, 0, time.monotonic() + 300),
                                      tb._Request(studies[1], 0, time.monotonic() + 300)])
    assert isinstance(outcomes[0], InferenceError) and "resized image 0 from 450x450" in str(outcomes[0])
    assert outcomes[1].text == alone[1]  # type: ignore[union-attr]


def test_a_generate_failure_is_every_rows_failure(backend: DemoBackend, studies: list[ModelInput],
                                                  monkeypatch: pytest.MonkeyPatch, held: Held) -> None:
    """Out of GPU memory in a batch: every caller gets the transient error (its study waits and is tried
    again), none is left waiting."""
    from dicom_node.errors import is_transient

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(backend.model, "generate", out_of_memory)
    held.hold()
    for i, s in enumerate(studies[:3]):
        held.call(i, lambda s=s: backend.generate_text(s))
    _release(held, 3)
    for i in range(3):
        got = held.results[i]
        assert isinstance(got, InferenceError) and is_transient(got), got


def test_the_grammar_of_each_row_is_its_own(backend: DemoBackend) -> None:
    """The logits processor, row by row: a token its grammar does not allow fails that row (only an end
    token is left for it, so generate ends it), the other row goes on; a row that wrote its end token is
    left alone, whatever padding follows."""
    import llguidance

    tok = backend.processor.tokenizer
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], ' \
             '"additionalProperties": false}'
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    stop = backend._stop_id
    guide = tb.LLGuidanceLogitsProcessor(backend._ll_tokenizer, [grammar, grammar, grammar], prompt_length=2,
                                         end_tokens={stop, backend._pad_id}, stop_token=stop)
    vocab = int(backend.model.config.text_config.vocab_size)
    ids = [tok.encode(t, add_special_tokens=False) for t in ('{"a":', "7}", "x")]
    prompt = [5, 6]

    def step(rows: list[list[int]]) -> torch.Tensor:
        ids: Any = torch.tensor(rows)
        zeros: Any = torch.zeros((len(rows), vocab))
        return guide(ids, zeros)

    first = step([prompt, prompt, prompt])
    assert all(bool(torch.isfinite(first[r]).any()) for r in range(3))
    rows = [prompt + ids[0], prompt + ids[0], prompt + ids[0]]
    rows = [r + t for r, t in zip(rows, (ids[1], ids[2], ids[1]), strict=True)]
    width = max(map(len, rows))
    rows = [r + [backend._pad_id] * (width - len(r)) for r in rows]
    scores = step(rows)
    assert guide.errors[0] is None and guide.accepting(0)
    assert guide.errors[1] is not None and "constrained decoding failed" in guide.errors[1]
    assert torch.isfinite(scores[1]).nonzero().flatten().tolist() == [stop], "a failed row may only end"
    rows = [[*r, stop] for r in rows]
    step(rows)
    assert guide.accepting(0) and guide.accepting(2), "the end token and its padding do not break a finished row"


def test_max_batch_needs_as_many_analysis_threads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model.max_batch: 4 .* worker.analysis_threads = 2"):
        load_config(node={"data_dir": tmp_path}, model={"max_batch": 4}, worker={"analysis_threads": 2})
    cfg = load_config(node={"data_dir": tmp_path}, model={"max_batch": 4}, worker={"analysis_threads": 4})
    assert cfg.model.max_batch == 4


def test_the_backend_takes_concurrent_calls_only_when_it_batches(backend: DemoBackend) -> None:
    """The pipeline lets several analysis threads call a batching backend at once; with max_batch 1 it
    keeps the model to one study at a time (its lock), as before."""
    from types import SimpleNamespace

    assert backend.concurrent
    concurrent = tb.TransformersBackend.concurrent.fget  # type: ignore[attr-defined]
    assert concurrent(SimpleNamespace(max_batch=1)) is False


def test_a_node_with_analysis_threads_batches_the_studies_waiting_for_the_model(
    tmp_path: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end through the worker: three radiographs sent together; while the model decodes the first
    (held until the other two wait for it), the other two analysis threads queue theirs, and they are
    decoded as one batch of two.  Every study gets its reports."""
    from dicom_node.jobs.model import JobState
    from dicom_node.work.pipeline import Pipeline

    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp_path / "data", "min_free_disk_mb": 0},
        http={"enabled": False},
        completeness={"quiet_seconds": 0.3, "force_seconds": 60, "check_interval_s": 0.1},
        worker={"poll_interval_s": 0.05, "analysis_threads": 3, "export_threads": 0},
        model={"backend": "demo", "path": str(demo_model_dir), "max_batch": 2, "batch_wait_ms": 0},
    )
    pipeline = Pipeline(cfg)
    model = pipeline.model
    assert isinstance(model, tb.TransformersBackend)
    sizes: list[int] = []
    real = model.model.generate

    def first_waits(*args: Any, **kwargs: Any) -> Any:
        sizes.append(int(kwargs["input_ids"].shape[0]))
        if len(sizes) == 1:
            wait_until(lambda: len(model._queue) == 2, 60, "the other two studies waiting for the model")
        return real(*args, **kwargs)

    monkeypatch.setattr(model.model, "generate", first_waits)
    studies = [synthetic.make_scoliosis_radiograph(tmp_path / f"s{i}", seed=70 + i, patient_id=f"BAT-{i}")
               for i in range(3)]
    with running_node(cfg, pipeline) as node:
        for st in studies:
            assert storescu(node.receiver.port, list(st.paths)).returncode == 0
        jobs = wait_until(lambda: [j for j in (_final(node, st.study_instance_uid) for st in studies) if j]
                          if all(_final(node, st.study_instance_uid) for st in studies) else None,
                          180, "the three studies reported")
    assert sorted(sizes) == [1, 2], sizes
    assert all(j.state == JobState.DONE for j in jobs), [(j.state, j.reason) for j in jobs]


def _final(node: Any, study_uid: str) -> Any:
    from dicom_node.errors import JobNotFoundError
    from dicom_node.jobs.model import JobState

    try:
        job = node.store.by_study(study_uid)
    except JobNotFoundError:
        return None
    return job if job.state in (JobState.DONE, JobState.FAILED) else None
