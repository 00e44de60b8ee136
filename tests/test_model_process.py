"""``[model] process = true``: the demo model in a real child process (spawn), answering over a pipe exactly as
it answers in-process; errors keep their type and message; a dead child fails its waiting callers and is
started again; ``close()`` ends it."""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import model_inputs, wait_until

from dicom_node.devtools import phantoms as synthetic
from dicom_node.errors import is_transient
from inference.backends import load_model
from inference.backends.process import ModelProcess
from inference.errors import BackendUnavailableError, InferenceError
from inference.findings import SpineFindings
from inference.inputs import ModelImage, ModelInput, SpineModel, Turn
from inference.settings import ModelSettings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _settings(model_dir: Path, **kw: object) -> ModelSettings:
    return ModelSettings(backend="demo", path=model_dir, max_batch=2, batch_wait_ms=300, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[ModelInput]:
    """Two phantom studies: a radiograph and a small MR."""
    base = tmp_path_factory.mktemp("phantoms")
    made = [synthetic.make_scoliosis_radiograph(base / "ap", seed=1),
            synthetic.make_lumbar_mr(base / "mr", slices=12, size=192)]
    return [model_inputs(s.paths) for s in made]


@pytest.fixture(scope="module")
def in_process(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SpineModel:
    return load_model(_settings(demo_model_dir), data_dir=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def expected(in_process: SpineModel, studies: list[ModelInput]) -> list[SpineFindings]:
    return [in_process.analyze(s) for s in studies]


@pytest.fixture(scope="module")
def proc(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelProcess]:
    model = load_model(_settings(demo_model_dir, process=True), data_dir=tmp_path_factory.mktemp("data"))
    assert isinstance(model, ModelProcess)
    try:
        yield model
    finally:
        model.close()


def test_inputs_and_findings_survive_pickling(studies: list[ModelInput], expected: list[SpineFindings]) -> None:
    s = studies[0]
    back = pickle.loads(pickle.dumps(s))
    assert (back.study_instance_uid, back.modality, back.task, back.clinical_context) == \
        (s.study_instance_uid, s.modality, s.task, s.clinical_context)
    assert [i.ref for i in back.images] == [i.ref for i in s.images]
    for a, b in zip(back.images, s.images, strict=True):
        assert a.pixels.dtype == np.uint8 and np.array_equal(a.pixels, b.pixels)
    assert pickle.loads(pickle.dumps(expected[0])) == expected[0]


def test_answers_through_the_process_equal_those_in_process(
    proc: ModelProcess, in_process: SpineModel, studies: list[ModelInput], expected: list[SpineFindings]
) -> None:
    assert proc.identity == in_process.identity
    assert proc.image_size == in_process.image_size
    assert proc.concurrent is True
    assert proc.pid is not None and proc.pid != os.getpid()
    assert [proc.analyze(s) for s in studies] == expected


def test_concurrent_calls_are_each_answered_with_their_own_findings(
    proc: ModelProcess, studies: list[ModelInput], expected: list[SpineFindings]
) -> None:
    """Two callers at once (max_batch 2: decoded together in the child): each gets its own study's answer."""
    results: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            results[i] = proc.analyze(studies[i])
        except Exception as exc:  # the test looks at each caller's outcome
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[0], results[1]] == expected


def test_a_consultation_streams_the_same_pieces_in_order(
    proc: ModelProcess, in_process: SpineModel, studies: list[ModelInput], expected: list[SpineFindings]
) -> None:
    history = [Turn("Is there a fracture?", "No.")]
    mine: list[str] = []
    theirs: list[str] = []
    caller = threading.get_ident()
    threads: set[int] = set()

    def on_text(piece: str) -> None:
        threads.add(threading.get_ident())
        theirs.append(piece)

    want = in_process.consult(studies[0], expected[0], history, "Which level is worst?", mine.append,
                              max_new_tokens=40)
    got = proc.consult(studies[0], expected[0], history, "Which level is worst?", on_text, max_new_tokens=40)
    assert got == want
    assert theirs == mine and len(theirs) > 1
    assert "".join(theirs) == got.text
    assert threads == {caller}, "pieces reach on_text in the caller's thread"


def test_an_error_in_the_child_arrives_with_its_type_and_message(
    proc: ModelProcess, in_process: SpineModel, studies: list[ModelInput], expected: list[SpineFindings]
) -> None:
    """An image the processor would resize (450 px is not a multiple of 28): the permanent error, as in-process."""
    dx = studies[0]
    ref = dx.images[0].ref.model_copy(update={"rows": 450, "columns": 450})
    odd = dataclasses.replace(dx, images=(ModelImage(np.zeros((450, 450), dtype=np.uint8), ref),))
    with pytest.raises(InferenceError) as here:
        in_process.analyze(odd)
    with pytest.raises(InferenceError) as there:
        proc.analyze(odd)
    assert type(there.value) is type(here.value)
    assert str(there.value) == str(here.value) and "resized image 0 from 450x450" in str(there.value)
    assert not is_transient(there.value)
    with pytest.raises(ValueError, match="max_new_tokens"):
        proc.consult(dx, expected[0], [], "q", lambda _: None, max_new_tokens=0)


def test_a_dead_child_fails_its_waiting_caller_and_the_next_call_starts_a_new_one(
    demo_model_dir: Path, tmp_path: Path, studies: list[ModelInput], expected: list[SpineFindings]
) -> None:
    model = ModelProcess(_settings(demo_model_dir), data_dir=tmp_path)
    try:
        first = model.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)  # the request is sent but never answered...
        outcome: list[object] = []

        def call() -> None:
            try:
                outcome.append(model.analyze(studies[0]))
            except Exception as exc:  # the test looks at the caller's outcome
                outcome.append(exc)

        t = threading.Thread(target=call)
        t.start()
        wait_until(lambda: bool(model._slots), 30, "the caller waits for its answer")
        os.kill(first, signal.SIGKILL)  # ...and the child dies
        t.join(timeout=30)
        assert not t.is_alive(), "the waiting caller was released"
        assert len(outcome) == 1 and isinstance(outcome[0], BackendUnavailableError), outcome
        assert "model process exited" in str(outcome[0]) and is_transient(outcome[0])
        assert model.analyze(studies[0]) == expected[0]  # a new child
        assert model.pid not in (None, first)
    finally:
        model.close()
    process = model._process
    assert process is not None and not process.is_alive() and process.exitcode is not None
    with pytest.raises(BackendUnavailableError, match="closed"):
        model.analyze(studies[0])


def test_a_model_the_child_cannot_load_raises_its_message(tmp_path: Path) -> None:
    settings = ModelSettings(backend="transformers", path=tmp_path / "nowhere", process=True)
    with pytest.raises(BackendUnavailableError, match=r"no config\.json"):
        load_model(settings, data_dir=tmp_path)


def test_the_openai_backend_ignores_process(tmp_path: Path) -> None:
    model = load_model(ModelSettings(backend="openai", process=True), data_dir=tmp_path)
    assert not isinstance(model, ModelProcess)


def test_a_worker_with_the_model_in_a_process_reports_studies_and_stops_it(tmp_path: Path,
                                                                          demo_model_dir: Path) -> None:
    """End to end: two studies sent to a node whose worker (two analysis threads) uses ``process = true``;
    both are reported, and stopping the worker ends the model's process."""
    from conftest import running_node, storescu

    from dicom_node.config import load_config
    from dicom_node.errors import JobNotFoundError
    from dicom_node.jobs.model import JobState
    from dicom_node.work.pipeline import Pipeline

    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp_path / "data", "min_free_disk_mb": 0},
        http={"enabled": False},
        completeness={"quiet_seconds": 0.3, "force_seconds": 60, "check_interval_s": 0.1},
        worker={"poll_interval_s": 0.05, "analysis_threads": 2, "export_threads": 0},
        model={"backend": "demo", "path": str(demo_model_dir), "max_batch": 2, "batch_wait_ms": 200,
               "process": True},
    )
    pipeline = Pipeline(cfg)
    studies = [synthetic.make_scoliosis_radiograph(tmp_path / f"s{i}", seed=80 + i, patient_id=f"PROC-{i}")
               for i in range(2)]

    def final(uid: str) -> object:
        try:
            job = node.store.by_study(uid)
        except JobNotFoundError:
            return None
        return job if job.state in (JobState.DONE, JobState.FAILED) else None

    with running_node(cfg, pipeline) as node:
        for st in studies:
            assert storescu(node.receiver.port, list(st.paths)).returncode == 0
        jobs = wait_until(lambda: [final(st.study_instance_uid) for st in studies]
                          if all(final(st.study_instance_uid) for st in studies) else None, 120, "both reported")
        model = pipeline.model
        assert isinstance(model, ModelProcess)
    assert all(j.state == JobState.DONE for j in jobs), [(j.state, j.reason) for j in jobs]
    process = model._process
    assert process is not None and not process.is_alive(), "the worker closed the model's process"
