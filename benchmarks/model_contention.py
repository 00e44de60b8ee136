"""How much a Python-busy thread of the worker slows the demo model's decoding, in-process vs ``[model] process``.

Decodes three phantom studies one after the other, first with nothing else running, then while another thread
of this process reads and preprocesses a phantom CT in a loop (as a second ``[worker] analysis_threads``
thread does), for the in-process backend and for :class:`inference.backends.process.ModelProcess`.

Usage::

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/model_contention.py --model .models/demo [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from dicom_node.devtools import phantoms as synthetic
from inference.backends import load_model
from inference.backends.qwen_vl import policy_for
from inference.inputs import ModelInput, SpineModel
from inference.preprocess import prepare_inputs
from inference.settings import ModelSettings
from inference.study import load_study


def _prepare(paths: list[Path]) -> ModelInput:
    study = load_study(paths)
    return prepare_inputs(study, [s.series_instance_uid for s in study.series], ModelSettings(),
                          policy_for(ModelSettings()))


def _decode(model: SpineModel, studies: list[ModelInput], repeats: int, ct: list[Path] | None) -> list[float]:
    stop = threading.Event()
    rounds = [0]

    def busy() -> None:
        assert ct is not None
        while not stop.is_set():
            _prepare(ct)
            rounds[0] += 1

    thread = threading.Thread(target=busy, daemon=True) if ct is not None else None
    if thread is not None:
        thread.start()
        time.sleep(1.0)  # the busy thread is under way
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for s in studies:
                model.analyze(s)
            times.append(time.perf_counter() - t0)
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    if ct is not None:
        print(f"    (busy thread: {rounds[0]} CT preparations)")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, required=True, help="demo model directory")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="contention-"))
    made = [synthetic.make_scoliosis_radiograph(base / "ap", seed=1),
            synthetic.make_scoliosis_radiograph(base / "lat", lateral=True, seed=2),
            synthetic.make_lumbar_mr(base / "mr", slices=12, size=192)]
    studies = [_prepare(list(s.paths)) for s in made]
    ct = list(synthetic.make_spine_ct(base / "ct", slices=40, size=192).paths)
    for process in (False, True):
        settings = ModelSettings(backend="demo", path=args.model, process=process)
        model = load_model(settings, data_dir=base / "data")
        try:
            model.analyze(studies[0])  # warm
            for label, busy in (("alone", None), ("with a busy thread", ct)):
                times = _decode(model, studies, args.repeats, busy)
                print(f"process={process!s:5} {label:20} 3 studies: median {statistics.median(times):.2f} s "
                      f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)
        finally:
            close = getattr(model, "close", None)
            if callable(close):
                close()


if __name__ == "__main__":
    main()
