"""Run the node's worker with the zero-latency model until the queue is empty; print its peak RSS (MB).

``zero_worker.py CONFIG --forever`` works the queue until SIGTERM instead (the load benchmark).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zero_model import ZeroLatencyModel

from dicom_node.config import load_config
from dicom_node.jobs.model import JobState
from dicom_node.jobs.sqlite import SQLiteJobStore
from dicom_node.work.pipeline import Pipeline
from dicom_node.work.worker import Worker


def main() -> int:
    cfg = load_config(sys.argv[1])
    store = SQLiteJobStore(cfg.db_path)
    worker = Worker(cfg, store, Pipeline(cfg, model=ZeroLatencyModel()))
    if "--forever" in sys.argv:
        import signal

        signal.signal(signal.SIGTERM, lambda *_: worker.stop())
        worker.run_forever()
        return 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        worker.run_once()
        jobs = store.jobs()
        if jobs and all(j.state in (JobState.DONE, JobState.FAILED, JobState.SKIPPED) for j in jobs):
            break
        time.sleep(0.05)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(int(line.split()[1]) / 1024)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
