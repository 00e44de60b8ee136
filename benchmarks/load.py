"""A department's day: mixed spine studies from concurrent senders through ``spinemed-node``, end to end.

    .venv/bin/python benchmarks/load.py [--studies 24] [--senders 6] [--repeats 3] [--quick]
                                        [--models zero,demo:1:1,demo:1:2,demo:1:4:4]

N studies of mixed kinds and realistic sizes — MR 60–200 instances (256²), CT 300–600 (512²), DX 1–4 — are
sent by K concurrent dcmtk ``storescu`` senders (each study one association, arrivals in bursts) to a real
node with a real destination (dcmtk ``storescp``).  Runs on the same studies, in one process, taking turns:

* ``ingest`` — ``spinemed-node receive`` alone: studies per hour the node can take in (the reference);
* ``zero``   — ``spinemed-node receive`` + a worker with the zero-latency model (``zero_model.py``): the
  node's own throughput and latency (``zero/2``: two worker processes on one queue);
* ``demo``   — ``spinemed-node serve`` with the tiny demo model (the real transformers + llguidance path);
  ``demo:E:A:B`` sets ``[worker] export_threads = E``, ``analysis_threads = A`` and ``[model] max_batch = B``
  (``demo:E:A:B:p`` and ``[model] process = true``: the model in its own process).

For each: studies per hour (first instance sent → last SR acknowledged), p50/p95/p99 of last instance
received → SR acknowledged with the quiet period excluded (the quiet period is reported on its own), the share
of time in each stage (waiting for a worker, analysis, writing, export), the queue depth over time
(``load.png``, first repeat), and for the demo runs the model's busy time and its *stall*: time it computed
nothing while a study was ready for it.  Ratios per repeat, then their median and range: zero ÷ ingest
studies per hour (goal ≥ 0.8); batch B ÷ batch 1 studies per hour (goal at B = 4: ≥ 2); the node's own time
per study ÷ the model's — per study (analysis + writing + export − model, which counts a wait for the model
held by another study as the node's) and as the model sees it (stall ÷ busy) (goal ≤ 5 %).  Nothing here is
a test assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from dicom_node.network.association import free_port, wait_port  # noqa: E402

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
FINAL = {"done", "failed", "skipped"}
QUIET_S = 2.0  # [completeness] quiet_seconds of the node under test


# --------------------------------------------------------------------------------------------- studies
@dataclass
class Study:
    kind: str
    uid: str
    paths: list[Path]


def _templates(tmp: Path, quick: bool) -> dict[str, list[Path]]:
    from dicom_node.devtools.phantoms import make_lumbar_mr, make_scoliosis_radiograph, make_spine_ct

    t0 = time.perf_counter()
    mr = make_lumbar_mr(tmp / "tpl-mr", slices=50 if quick else 100, size=256)  # T2 + T1 series
    ct = make_spine_ct(tmp / "tpl-ct", slices=150 if quick else 600, size=512)
    xr = [make_scoliosis_radiograph(tmp / f"tpl-xr{i}", lateral=i % 2 == 1, seed=i) for i in range(4)]
    print(f"templates written in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"MR": list(mr.paths), "CT": sorted(ct.paths), "DX": [p for s in xr for p in s.paths]}


def _clone(paths: list[Path], out: Path, seed: int) -> tuple[str, list[Path]]:
    """Copies of ``paths`` as a new study: new Study, Series and SOP Instance UIDs, the rest unchanged."""
    out.mkdir(parents=True)
    study = generate_uid(entropy_srcs=[f"load-study-{seed}"])
    series: dict[str, str] = {}
    written = []
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID),
                                                 generate_uid(entropy_srcs=[study, str(ds.SeriesInstanceUID)]))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[study, str(i)])
        target = out / f"{i:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return study, written


def make_workload(tmp: Path, n: int, quick: bool, seed: int) -> list[Study]:
    tpl = _templates(tmp, quick)
    r = random.Random(seed)
    studies = []
    t0 = time.perf_counter()
    for k in range(n):
        kind = r.choices(["MR", "CT", "DX"], weights=[5, 2, 3])[0]
        if kind == "MR":
            count = r.randint(30, 100) if quick else r.randint(60, 200)
            half = count // 2  # the same number of T2 and T1 slices, contiguous from the left
            t2 = [p for p in tpl["MR"] if "/2/" in str(p)][:half]
            t1 = [p for p in tpl["MR"] if "/3/" in str(p)][: count - half]
            chosen = t2 + t1
        elif kind == "CT":
            count = r.randint(100, 150) if quick else r.randint(300, 600)
            start = r.randint(0, len(tpl["CT"]) - count)
            chosen = tpl["CT"][start : start + count]
        else:
            chosen = tpl["DX"][: r.randint(1, 4)]
        uid, paths = _clone(chosen, tmp / f"study-{k:03d}", seed * 1000 + k)
        studies.append(Study(kind, uid, paths))
    sizes = {kd: [len(s.paths) for s in studies if s.kind == kd] for kd in ("MR", "CT", "DX")}
    print(f"{n} studies written in {time.perf_counter() - t0:.0f} s: " +
          ", ".join(f"{kd} {len(v)} ({min(v)}–{max(v)} instances)" for kd, v in sizes.items() if v), flush=True)
    return studies


# --------------------------------------------------------------------------------------------- sending
@dataclass
class SendLog:
    first_sent: float = float("inf")
    last_sent: float = 0.0
    per_study: dict[str, tuple[float, float]] = field(default_factory=dict)


def send_all(port: int, studies: list[Study], senders: int, seed: int) -> SendLog:
    """K senders, each a queue of studies sent one association each, with bursty gaps between studies."""
    r = random.Random(seed)
    queues: list[list[Study]] = [[] for _ in range(senders)]
    for i, s in enumerate(studies):
        queues[i % senders].append(s)
    gaps = {s.uid: (0.0 if r.random() < 0.5 else r.expovariate(1 / 3.0)) for s in studies}  # half back to back
    log = SendLog()
    lock = threading.Lock()
    errors: list[str] = []

    def run(queue: list[Study]) -> None:
        for s in queue:
            time.sleep(gaps[s.uid])
            t0 = time.time()
            p = subprocess.run(["storescu", "-aec", "SPINEMED", "127.0.0.1", str(port), *map(str, s.paths)],
                               env=DCMTK_ENV, capture_output=True, timeout=900)
            t1 = time.time()
            if p.returncode != 0:
                errors.append(p.stderr.decode()[-300:])
            with lock:
                log.first_sent = min(log.first_sent, t0)
                log.last_sent = max(log.last_sent, t1)
                log.per_study[s.uid] = (t0, t1)

    threads = [threading.Thread(target=run, args=(q,)) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"storescu failed: {errors[0]}")
    return log


# --------------------------------------------------------------------------------------------- the node
def _toml(data: Path, port: int, dest_port: int | None, model: str, export_threads: int | None = None,
          analysis_threads: int | None = None, max_batch: int | None = None, model_process: bool = False) -> str:
    dest = (f'[[destinations]]\nname = "pacs"\nae_title = "SPINEMED"\nhost = "127.0.0.1"\nport = {dest_port}\n'
            if dest_port else "")
    model_t = (f'[model]\nbackend = "demo"\npath = "{os.environ.get("SPINEMED_DEMO_MODEL", REPO / ".models/demo")}"\n'
               + (f"max_batch = {max_batch}\n" if max_batch is not None else "")
               + ("process = true\n" if model_process else "")
               if model == "demo" else "")
    return (f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\nmin_free_disk_mb = 0\n'
            f"max_associations = 64\n[http]\nenabled = false\n"
            f"[completeness]\nquiet_seconds = {QUIET_S}\ncheck_interval_s = 0.1\nforce_seconds = 600\n"
            f"[worker]\npoll_interval_s = 0.1\n"
            + (f"export_threads = {export_threads}\n" if export_threads is not None else "")
            + (f"analysis_threads = {analysis_threads}\n" if analysis_threads is not None else "")
            + f"{model_t}{dest}")


def _sample_queue(db: Path, stop: threading.Event, samples: list[tuple[float, dict[str, int]]]) -> None:
    from dicom_node.jobs.sqlite import SQLiteJobStore

    while not db.exists() and not stop.is_set():
        time.sleep(0.1)
    store = SQLiteJobStore(db)
    try:
        while not stop.is_set():
            samples.append((time.time(), store.counts()))
            stop.wait(0.5)
    finally:
        store.close()


def run_one(tmp: Path, label: str, studies: list[Study], senders: int, seed: int,
            dest_delay_ms: float = 0.0) -> dict[str, object]:
    """One end-to-end run; ``label`` is ``ingest``, ``zero`` or ``demo``, with ``:E`` for ``[worker]
    export_threads = E``, ``:E:A`` for ``analysis_threads = A`` too and ``:E:A:B`` for ``[model] max_batch =
    B`` (else the defaults)."""
    from dicom_node.jobs.sqlite import SQLiteJobStore

    head, *threads = label.split(":")
    mode, _, workers_s = head.partition("/")  # 'zero/2': two worker processes (leases share the queue)
    workers = int(workers_s) if workers_s else 1
    export_threads = int(threads[0]) if threads and threads[0] else None
    analysis_threads = int(threads[1]) if len(threads) > 1 else None
    max_batch = int(threads[2]) if len(threads) > 2 and threads[2] else None
    model_process = len(threads) > 3 and threads[3] == "p"  # the model in its own process
    name = label.replace(":", "-x").replace("/", "-w")  # (a folder name; a label run twice gets a second one)
    while (tmp / f"node-{name}").exists():
        name += "-again"
    data = tmp / f"node-{name}"
    port = free_port()
    dest_dir = tmp / f"dest-{name}"
    dest_dir.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    logf = (tmp / f"node-{name}.log").open("wb")
    dest_port = None
    if mode != "ingest":
        dest_port = free_port()
        if dest_delay_ms > 0:  # a PACS that takes this long per object (across a network, busy)
            procs.append(subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "slow_scp.py"), str(dest_port),
                                           str(dest_delay_ms)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        else:
            procs.append(subprocess.Popen(["storescp", "--aetitle", "SPINEMED", "--output-directory", str(dest_dir),
                                           "--accept-all", "--unique-filenames", str(dest_port)], env=DCMTK_ENV,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(dest_port)
    cfg = tmp / f"node-{name}.toml"
    cfg.write_text(_toml(data, port, dest_port, "demo" if mode == "demo" else "zero", export_threads,
                         analysis_threads, max_batch, model_process))
    command = "serve" if mode == "demo" else "receive"
    procs.append(subprocess.Popen([sys.executable, "-m", "dicom_node", command, "--config", str(cfg)],
                                  stdout=logf, stderr=subprocess.STDOUT, cwd=REPO))
    wait_port(port, 120)
    for _ in range(workers if mode == "zero" else workers - 1 if mode == "demo" else 0):
        worker = ([str(REPO / "benchmarks" / "zero_worker.py"), str(cfg), "--forever"] if mode == "zero"
                  else ["-m", "dicom_node", "worker", "--config", str(cfg)])  # beside serve's own worker
        procs.append(subprocess.Popen([sys.executable, *worker], stdout=logf, stderr=subprocess.STDOUT, cwd=REPO))
    if mode != "ingest":  # a department's node is running before its day starts: the model is loaded
        from dicom_node.work.heartbeat import heartbeat_path, read_heartbeat

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                hb = read_heartbeat(heartbeat_path(data))
            except ValueError:
                hb = None
            if hb is not None and hb.state == "ready":
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{mode}: the worker did not get ready")
    samples: list[tuple[float, dict[str, int]]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_queue, args=(data / "jobs.sqlite3", stop, samples), daemon=True)
    sampler.start()
    try:
        sent = send_all(port, studies, senders, seed)
        store = SQLiteJobStore(data / "jobs.sqlite3")
        deadline = time.monotonic() + 3600
        want = {s.uid for s in studies}
        while time.monotonic() < deadline:
            jobs = {j.study_instance_uid: j for j in store.jobs()}
            received = sum(j.instance_count for j in jobs.values())
            if mode == "ingest":
                if received >= sum(len(s.paths) for s in studies):
                    break
            elif want <= jobs.keys() and all(jobs[u].state.value in FINAL for u in want):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{mode}: not finished within an hour")
        end = time.time()
        jobs = {j.study_instance_uid: j for j in store.jobs()}
        rows = []
        last_ack = 0.0
        for s in studies:
            j = jobs[s.uid]
            row: dict[str, object] = {"job": j.id, "kind": s.kind, "instances": len(s.paths), "state": j.state.value}
            if mode != "ingest":
                delivered = [d.delivered_at for d in store.deliveries(s.uid) if d.delivered_at]
                t = j.timings
                last = j.last_received_at or 0.0
                acked = max(delivered) if delivered else end
                last_ack = max(last_ack, acked)
                row.update(completed_at=j.completed_at or last, reporting_at=t.get("reporting"),
                           latency_s=acked - last, quiet_s=(j.completed_at or last) - last,
                           wait_s=t.get("inferring", 0) - (j.completed_at or 0),
                           analysis_s=t.get("reporting", 0) - t.get("inferring", 0),
                           write_s=t.get("exporting", 0) - t.get("reporting", 0),
                           export_s=acked - t.get("exporting", acked))
            rows.append(row)
        store.close()
    finally:
        stop.set()
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        logf.close()
    # the last study's quiet period is the completeness policy, not work: it is reported on its own
    # (the last SR acknowledged, not when this loop, polling every 0.2 s, saw it)
    span = (last_ack - QUIET_S if mode != "ingest" else sent.last_sent) - sent.first_sent
    result: dict[str, object] = {"mode": label, "studies": len(studies), "span_s": round(span, 1),
                                 "studies_per_hour": round(len(studies) * 3600 / span, 1), "rows": rows,
                                 "queue": [(round(t - sent.first_sent, 2), c) for t, c in samples]}
    if mode != "ingest":
        lat = sorted(float(r["latency_s"]) - float(r["quiet_s"]) for r in rows)  # type: ignore[arg-type]
        q = statistics.quantiles(lat, n=100, method="inclusive")
        result.update(p50_s=round(statistics.median(lat), 2), p95_s=round(q[94], 2), p99_s=round(q[98], 2),
                      quiet_s=round(statistics.median(float(r["quiet_s"]) for r in rows), 2))  # type: ignore[arg-type]
        stages = {k: sum(float(r[k]) for r in rows) for k in ("wait_s", "analysis_s", "write_s", "export_s")}  # type: ignore[arg-type]
        total = sum(stages.values()) or 1.0
        result["stage_share"] = {k[:-2]: round(v / total, 3) for k, v in stages.items()}
        seconds = _stage_seconds(tmp / f"node-{name}.log")
        predict = {job: s["predict"] for job, s in seconds.items()}
        own = [float(r["analysis_s"]) + float(r["write_s"]) + float(r["export_s"])  # type: ignore[arg-type]
               - predict.get(int(r["job"]), 0.0) for r in rows]  # type: ignore[call-overload]
        result["model_s"] = round(statistics.median(predict.values()), 3) if predict else None
        result["node_own_s"] = round(statistics.median(own), 3)
        if mode == "demo" and seconds:
            result.update(model_stall(rows, seconds))
    for r in rows:
        r.pop("completed_at", None)
        r.pop("reporting_at", None)
    return result


def model_stall(rows: list[dict[str, object]], seconds: dict[int, dict[str, float]]) -> dict[str, float]:
    """How long the model waited for the node while a study was ready for it.

    Each study's model call is placed in time from its job's ``reporting`` transition less the report
    stage (``seconds``, from the worker's log); a study is *ready* from its completion until its model call
    starts.  The model *stalls* when it computes nothing while some study is ready: time the node's own
    work (reading, preprocessing, a lock, a claim) keeps it waiting — the node's own time per study as the
    model sees it under load.  Rows of one batch share their call.  1 ms grid.
    """
    import numpy as np

    calls, ready = [], []
    for r in rows:
        job, done = int(r["job"]), r.get("reporting_at")  # type: ignore[call-overload]
        if job not in seconds or done is None:
            continue
        end = float(done) - seconds[job].get("report", 0.0)  # type: ignore[arg-type]
        start = end - seconds[job]["predict"]
        calls.append((start, end))
        ready.append((float(r["completed_at"]), start))  # type: ignore[arg-type]
    if not calls:
        return {}
    t0 = min(a for a, _ in ready + calls)
    n = int((max(b for _, b in calls) - t0) * 1000) + 2
    busy, waiting = np.zeros(n, bool), np.zeros(n, bool)
    for grid, spans in ((busy, calls), (waiting, ready)):
        for a, b in spans:
            grid[int((a - t0) * 1000): max(int((b - t0) * 1000), int((a - t0) * 1000))] = True
    busy_s = busy.sum() / 1000
    stall_s = (waiting & ~busy).sum() / 1000
    return {"model_busy_s": round(float(busy_s), 2), "model_stall_s": round(float(stall_s), 2),
            "model_stall_per_study_s": round(float(stall_s) / len(calls), 3),
            "model_busy_per_study_s": round(float(busy_s) / len(calls), 3)}


def ratios_of(by: dict[str, dict[str, object]]) -> dict[str, float]:
    """The goals' ratios between the runs of one repeat (same studies, same process, minutes apart)."""
    def rate(label: str) -> float:
        return float(by[label]["studies_per_hour"])  # type: ignore[arg-type]

    ratios: dict[str, float] = {}
    for label in by:  # the node's own work (zero-latency model; '/2': two worker processes) vs ingest alone
        if label.split(":")[0].split("/")[0] == "zero":
            ratios[f"{label}_vs_ingest_studies_per_hour"] = round(rate(label) / rate("ingest"), 2)
    for label, res in by.items():  # the node's own time per study ÷ the model's, every demo run
        if label.startswith("demo") and res.get("model_s"):
            ratios[f"node_own_time_vs_model_time_{label}"] = round(
                float(res["node_own_s"]) / float(res["model_s"]), 3)  # type: ignore[arg-type]
        if label.startswith("demo") and res.get("model_busy_s"):  # the same, as the model sees it under load
            ratios[f"model_stall_vs_model_busy_{label}"] = round(
                float(res["model_stall_s"]) / float(res["model_busy_s"]), 3)  # type: ignore[arg-type]
    for kind in ("zero", "demo"):  # the next study read beside the model vs one study at a time
        if f"{kind}:1:2" in by and f"{kind}:1:1" in by:
            ratios[f"{kind}_two_analysis_threads_vs_one_studies_per_hour"] = round(
                rate(f"{kind}:1:2") / rate(f"{kind}:1:1"), 2)
    for label in by:  # batched decoding: [model] max_batch B (B analysis threads) vs one study at a time
        parts = label.split(":")
        if parts[0] == "demo" and len(parts) >= 4 and parts[3] and "demo:1:1" in by:
            ratios[f"{label}_vs_demo:1:1_studies_per_hour"] = round(rate(label) / rate("demo:1:1"), 2)
    for kind in ("zero", "demo"):  # export threads vs results sent before the next analysis
        if kind in by and f"{kind}:0" in by:
            ratios[f"{kind}_export_threads_vs_inline_studies_per_hour"] = round(rate(kind) / rate(f"{kind}:0"), 2)
    return ratios


def _stage_seconds(log: Path) -> dict[int, dict[str, float]]:
    """The pipeline's stage seconds per job (``predict``: the model's own time), from the worker's
    "results written" log lines."""
    out: dict[int, dict[str, float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        if '"results written"' not in line:
            continue
        try:
            rec = json.loads(line[line.index("{"):])
        except ValueError:
            continue
        secs = rec.get("seconds") or {}
        if "predict" in secs and "job" in rec:
            out[int(rec["job"])] = {k: float(v) for k, v in secs.items()}
    return out


def plot(results: list[dict[str, object]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.4), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        queue = res["queue"]
        assert isinstance(queue, list)
        ts = [t for t, _ in queue]
        for states, label in ((("receiving",), "receiving"), (("complete",), "waiting (complete)"),
                              (("inferring", "reporting", "exporting"), "in work")):
            ax.plot(ts, [sum(c.get(s, 0) for s in states) for _, c in queue], label=label)
        ax.set_title(f"{res['mode']}: {res['studies_per_hour']} studies/h")
        ax.set_xlabel("s since the first instance")
        ax.set_ylabel("studies")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=24)
    ap.add_argument("--senders", type=int, default=6)
    ap.add_argument("--models", default="zero,demo:1:1,demo:1:2,demo:1:4:4",
                    help="end-to-end runs besides ingest: zero,demo; 'zero:0' = [worker] export_threads = 0, "
                         "'demo:1:2' = export_threads 1 and analysis_threads 2, 'demo:1:4:4' = and [model] "
                         "max_batch 4")
    ap.add_argument("--quick", action="store_true", help="smaller studies (a smoke run)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3, help="run every mode this many times, taking turns")
    ap.add_argument("--dest-delay-ms", type=float, default=0.0,
                    help="destination: a pynetdicom SCP taking this long per C-STORE instead of storescp")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (studies, node data, logs)")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "load.json")
    ap.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "load.png")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="spinemed-load-"))
    try:
        print(f"machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
        studies = make_workload(tmp, args.studies, args.quick, args.seed)
        modes = ["ingest", *[m for m in args.models.split(",") if m]]
        results: list[dict[str, object]] = []
        per_repeat: list[dict[str, float]] = []
        for rep in range(args.repeats):
            # the runs take turns, in reverse order every other repeat (so no mode is always first or last)
            order = modes if rep % 2 == 0 else [modes[0], *reversed(modes[1:])]
            run = {}
            for mode in order:
                res = run_one(tmp, mode, studies, args.senders, args.seed + rep, args.dest_delay_ms)
                res["repeat"] = rep
                results.append(res)
                run[mode] = res
                line = (f"[{rep + 1}/{args.repeats}] {mode:<8} {res['studies_per_hour']:>8} studies/h over "
                        f"{res['span_s']} s")
                if mode != "ingest":
                    line += (f"; last instance → SR acknowledged, quiet excluded: p50 {res['p50_s']} s, p95 "
                             f"{res['p95_s']} s, p99 {res['p99_s']} s (quiet {res['quiet_s']} s); stages "
                             f"{res['stage_share']}; per study: model {res['model_s']} s, node's own "
                             f"{res['node_own_s']} s"
                             + (f"; model busy {res['model_busy_s']} s, stalled {res['model_stall_s']} s while a study "
                                "was ready" if "model_busy_s" in res else ""))
                print(line, flush=True)
            per_repeat.append(ratios_of(run))
            print(f"[{rep + 1}/{args.repeats}] ratios: {per_repeat[-1]}", flush=True)
        ratios = {k: {"median": round(statistics.median(r[k] for r in per_repeat), 3),
                      "range": [min(r[k] for r in per_repeat), max(r[k] for r in per_repeat)],
                      "runs": [r[k] for r in per_repeat]}
                  for k in per_repeat[0]}
        print("ratios over the repeats (median, range):", flush=True)
        for k, v in ratios.items():
            print(f"  {k}: {v['median']} ({v['range'][0]}–{v['range'][1]})", flush=True)
        args.json.write_text(json.dumps({"studies": args.studies, "senders": args.senders, "quick": args.quick,
                                         "repeats": args.repeats,
                                         "results": [{k: v for k, v in r.items() if k != "queue"} for r in results],
                                         "ratios": ratios}, indent=1))
        plot([r for r in results if r["repeat"] == 0], args.plot)
        print(f"results in {args.json}, plot in {args.plot}")
    finally:
        if args.keep:
            print(f"work folder kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
