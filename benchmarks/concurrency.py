"""Studies per hour with ``[worker] analysis_threads`` 1/2/4/8 and the openai backend, against a model
server that batches: every request takes ``--latency`` seconds however many run at once (what vLLM's
continuous batching approaches until the GPU is full).

    .venv/bin/python benchmarks/concurrency.py [--studies 16] [--latency 1.0] [--threads 1,2,4,8]

The node is real and in one process (listener, job store, worker threads, the openai backend's HTTP
requests); the studies are 1-instance radiographs sent with dcmtk ``storescu`` before the worker starts;
the server is a small OpenAI-compatible HTTP server answering one valid finding.  It measures the node's
own concurrency, not a GPU: each thread count's studies per hour, and its ratio to one thread, in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

ANSWER = {
    "levels": [{"level": "T9", "finding": "scoliosis", "severity": "moderate",
                "measurements": [{"type": "cobb_angle", "value": 20.0, "upper_end_vertebra": "T6",
                                  "lower_end_vertebra": "T12"}], "evidence": [{"image": 0}]}],
    "report": {k: "benchmark" for k in ("findings", "diagnosis", "treatment_suggestions", "risk_and_prognosis",
                                        "follow_up", "diagnostic_basis")},
}


def serve(latency_s: float) -> tuple[ThreadingHTTPServer, dict[str, int]]:
    stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                stats["requests"] += 1
                stats["in_flight"] += 1
                stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
            time.sleep(latency_s)
            with lock:
                stats["in_flight"] -= 1
            body = json.dumps({
                "id": "bench", "object": "chat.completion", "created": 0, "model": "spinegpt",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": json.dumps(ANSWER)}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, stats


def run(threads: int, studies: list[Any], url: str, tmp: Path) -> float:
    from conftest import running_node, storescu

    from dicom_node.config import load_config
    from dicom_node.jobs.model import JobState
    from dicom_node.work.pipeline import Pipeline

    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp / f"data-{threads}", "min_free_disk_mb": 0},
        http={"enabled": False},
        completeness={"quiet_seconds": 0.2, "force_seconds": 60, "check_interval_s": 0.05},
        worker={"poll_interval_s": 0.05, "analysis_threads": threads},
        model={"backend": "openai", "image_size": 224, "openai": {"base_url": url, "max_retries": 0}},
    )
    pipeline = Pipeline(cfg)
    _ = pipeline.model
    want = {s.study_instance_uid for s in studies}
    with running_node(cfg, pipeline) as node:
        for s in studies:
            storescu(node.receiver.port, list(s.paths))
        t0 = time.monotonic()
        while True:
            jobs = {j.study_instance_uid: j for j in node.store.jobs()}
            if want <= jobs.keys() and all(jobs[u].state in (JobState.DONE, JobState.FAILED) for u in want):
                break
            if time.monotonic() - t0 > 600:
                raise RuntimeError("not finished in 10 minutes")
            time.sleep(0.05)
        states = [jobs[u].state.value for u in want]
        first = min(j.timings.get("complete", j.created_at) for j in jobs.values())
        last = max(j.timings.get("done", j.updated_at) for j in jobs.values())
    if set(states) != {"done"}:
        raise RuntimeError(f"not all done: {states}")
    return len(studies) * 3600 / (last - first)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=16)
    ap.add_argument("--latency", type=float, default=1.0, help="seconds per request, however many at once")
    ap.add_argument("--threads", default="1,2,4,8")
    args = ap.parse_args()
    os.environ.setdefault("SPINEMED_OPENAI_API_KEY", "bench")
    from dicom_node.devtools.phantoms import make_scoliosis_radiograph

    tmp = Path(tempfile.mkdtemp(prefix="spinemed-conc-"))
    server, stats = serve(args.latency)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    print(f"machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}; server latency {args.latency} s")
    results: dict[int, float] = {}
    for n in (int(x) for x in args.threads.split(",")):
        studies = [make_scoliosis_radiograph(tmp / f"t{n}-s{i}", seed=i, patient_id=f"C{n}-{i}")
                   for i in range(args.studies)]
        stats["max_in_flight"] = 0
        results[n] = run(n, studies, url, tmp)
        print(f"analysis_threads {n}: {results[n]:8.0f} studies/h, {stats['max_in_flight']} requests at once at "
              f"most, ratio to 1 thread {results[n] / results[min(results)]:.2f}", flush=True)
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
