"""Batched constrained decoding on CPU: studies per hour of the demo model at ``[model] max_batch`` 1/2/4/8.

    .venv/bin/python benchmarks/batching.py [--studies 16] [--sizes 1,2,4,8] [--repeats 3] [--mix mixed,DX,MR]

The real transformers + llguidance code path (:class:`inference.backends.demo.DemoBackend`, the tiny random
Qwen2.5-VL), driven as the worker drives it: ``b`` analysis threads take studies from one queue and call
``analyze``; with ``max_batch = b`` the studies that wait while the model is busy are decoded together,
each row with its own grammar.  The studies are synthetic phantoms prepared once (MR 3 key images, CT 2
reformats, DX 1 projection: prompts of ≈900 to ≈2600 tokens); ``--mix`` runs the same sizes on a mixed
workload (the load benchmark's 5:2:3 MR:CT:DX) and on single kinds, since a batch runs as long as its
longest row and every row is padded to its longest prompt.  Sizes take turns within each repeat; ratios
are against batch 1 of the same repeat, in this process.  Nothing here is a test assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dicom_node.devtools import phantoms as synthetic  # noqa: E402
from inference.backends.demo import DemoBackend  # noqa: E402
from inference.inputs import ModelInput  # noqa: E402
from inference.preprocess import prepare_inputs  # noqa: E402
from inference.settings import ModelSettings  # noqa: E402
from inference.study import load_study  # noqa: E402


def make_inputs(tmp: Path, backend: DemoBackend) -> dict[str, list[ModelInput]]:
    """A few phantoms of each kind, prepared for the model as the pipeline does (different seeds: different
    images, so different answers and answer lengths)."""
    out: dict[str, list[ModelInput]] = {"MR": [], "CT": [], "DX": []}
    made: list[tuple[str, Any]] = []
    for k in range(3):
        made.append(("MR", synthetic.make_lumbar_mr(tmp / f"mr{k}", slices=20, size=256, seed=k)))
        made.append(("CT", synthetic.make_spine_ct(tmp / f"ct{k}", slices=60, size=256, seed=k)))
        made.append(("DX", synthetic.make_scoliosis_radiograph(tmp / f"dx{k}", lateral=k % 2 == 1, seed=k)))
    for kind, s in made:
        study = load_study(list(s.paths))
        out[kind].append(prepare_inputs(study, [x.series_instance_uid for x in study.series], backend.settings,
                                        backend.image_size))
    return out


def workload(inputs: dict[str, list[ModelInput]], mix: str, n: int, seed: int) -> list[ModelInput]:
    r = random.Random(seed)
    kinds = r.choices(["MR", "CT", "DX"], weights=[5, 2, 3], k=n) if mix == "mixed" else [mix] * n
    return [r.choice(inputs[k]) for k in kinds]


def run(backend: DemoBackend, studies: list[ModelInput], size: int) -> dict[str, Any]:
    """``size`` analysis threads through one backend with ``max_batch = size``; studies per hour."""
    backend.max_batch = size
    todo: queue.SimpleQueue[ModelInput] = queue.SimpleQueue()
    for s in studies:
        todo.put(s)
    rows: list[int] = []
    real = backend.model.generate

    def counting(*args: Any, **kwargs: Any) -> Any:
        rows.append(int(kwargs["input_ids"].shape[0]))
        return real(*args, **kwargs)

    backend.model.generate = counting
    errors: list[BaseException] = []

    def analysis_thread() -> None:
        while True:
            try:
                inputs = todo.get_nowait()
            except queue.Empty:
                return
            try:
                backend.analyze(inputs)
            except BaseException as exc:  # reported below: a benchmark that hides failures measures nothing
                errors.append(exc)

    threads = [threading.Thread(target=analysis_thread) for _ in range(size)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    backend.model.generate = real
    if errors:
        raise RuntimeError(f"batch {size}: {len(errors)} analyses failed: {errors[0]!r}")
    return {"batch": size, "seconds": round(seconds, 2), "studies_per_hour": round(len(studies) * 3600 / seconds),
            "mean_rows_per_generate": round(statistics.mean(rows), 2), "generates": len(rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=16)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mix", default="mixed,DX,MR", help="workloads: mixed (5:2:3 MR:CT:DX), MR, CT or DX")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "batching.json")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    model_dir = Path(os.environ.get("SPINEMED_DEMO_MODEL", REPO / ".models" / "demo"))
    with tempfile.TemporaryDirectory(prefix="spinemed-batching-") as tmp:
        backend = DemoBackend(ModelSettings(backend="demo", path=model_dir, max_batch=max(sizes)), data_dir=Path(tmp))
        inputs = make_inputs(Path(tmp), backend)
        images = {k: sorted({len(i.images) for i in v}) for k, v in inputs.items()}
        print(f"machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}; torch threads "
              f"{backend.num_threads}; images per study {images}", flush=True)
        backend.analyze(inputs["DX"][0])  # warm-up: first-call costs are not batching
        report: dict[str, Any] = {"studies": args.studies, "sizes": sizes, "repeats": args.repeats, "mixes": {}}
        for mix in args.mix.split(","):
            studies = workload(inputs, mix, args.studies, seed=7)
            runs: dict[int, list[dict[str, Any]]] = {b: [] for b in sizes}
            for rep in range(args.repeats):
                order = sizes if rep % 2 == 0 else list(reversed(sizes))
                for b in order:
                    runs[b].append(run(backend, studies, b))
            table = []
            for b in sizes:
                rates = [r["studies_per_hour"] for r in runs[b]]
                ratios = [r["studies_per_hour"] / one["studies_per_hour"]
                          for r, one in zip(runs[b], runs[sizes[0]], strict=True)]
                table.append({"batch": b, "studies_per_hour_median": statistics.median(rates),
                              "studies_per_hour_range": [min(rates), max(rates)],
                              "ratio_to_first_median": round(statistics.median(ratios), 2),
                              "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
                              "mean_rows_per_generate": runs[b][-1]["mean_rows_per_generate"]})
            report["mixes"][mix] = table
            print(f"\n{mix}: {args.studies} studies, {args.repeats} repeats", flush=True)
            print("| batch | studies / h (median, range) | ratio to batch 1 (median, range) | rows per generate |")
            print("| ---: | ---: | ---: | ---: |")
            for row in table:
                lo, hi = row["studies_per_hour_range"]
                rlo, rhi = row["ratio_range"]
                print(f"| {row['batch']} | {row['studies_per_hour_median']:.0f} ({lo}–{hi}) | "
                      f"**{row['ratio_to_first_median']:.2f}** ({rlo:.2f}–{rhi:.2f}) | "
                      f"{row['mean_rows_per_generate']} |", flush=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nresults in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
