"""How long one consultation turn takes with the demo model (CPU), and what the model receives.

    .venv/bin/python benchmarks/consult_turn.py [--turns 5] [--max-new-tokens 512]

A phantom lumbar MR (5 slices, as the tests use) is prepared and analysed once; then ``--turns`` questions
are asked as one conversation (each turn carries the ones before).  Printed per turn: prompt tokens (the
images, the findings JSON, the prior turns and the question), answer tokens and seconds; then the median.
The worker adds re-preparing the images (first turn of a study only: kept for the next turns) and the row
writes.  Times are the model's; the web side's stream adds at most one poll interval (0.1 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.devtools.phantoms import make_lumbar_mr  # noqa: E402
from inference.backends.demo import DemoBackend  # noqa: E402
from inference.inputs import Turn  # noqa: E402
from inference.preprocess import prepare_inputs  # noqa: E402
from inference.settings import ModelSettings  # noqa: E402
from inference.study import load_study  # noqa: E402

QUESTIONS = ("Is the L5 nerve root compressed?", "And the L4-L5 disc?", "Is there a fracture?",
             "How severe is the canal stenosis?", "What follow-up would you suggest?")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--model", type=Path, default=REPO / ".models" / "demo")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="spinemed-consult-") as tmp_s:
        tmp = Path(tmp_s)
        study = make_lumbar_mr(tmp / "mr", slices=5, size=96, seed=5)
        settings = ModelSettings(backend="demo", path=args.model)
        model = DemoBackend(settings, data_dir=tmp)
        loaded = load_study(list(study.paths))
        t0 = time.perf_counter()
        inputs = prepare_inputs(loaded, [s.series_instance_uid for s in loaded.series], settings, model.image_size)
        prep = time.perf_counter() - t0
        findings = model.analyze(inputs)
        print(f"{len(inputs.images)} images, preparation {prep:.3f} s")
        history: list[Turn] = []
        seconds: list[float] = []
        for i in range(args.turns):
            question = QUESTIONS[i % len(QUESTIONS)]
            t0 = time.perf_counter()
            answer = model.consult(inputs, findings, history, question, lambda _t: None,
                                   max_new_tokens=args.max_new_tokens)
            seconds.append(time.perf_counter() - t0)
            history.append(Turn(question, answer.text))
            print(f"turn {i + 1}: prompt {answer.prompt_tokens} tokens, answer {answer.completion_tokens} tokens, "
                  f"{seconds[-1]:.3f} s")
        print(f"median {statistics.median(seconds):.3f} s per turn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
