"""spinemed-node benchmarks: every figure is a ratio against a reference measured in the same run.

    .venv/bin/python benchmarks/bench.py [--quick] [--only ingest,overhead,memory,scaling,model]

* ingest   — instances/s from dcmtk ``storescu`` into ``spinemed-node receive`` vs into dcmtk ``storescp``
             (MR 100 × 256², CT 300 × 512²; 1 association and 4 in parallel)
* overhead — seconds from the last instance received to the SR acknowledged by the destination, with a
             zero-latency model (``benchmarks/zero_model.py``), the quiet timer excluded, per stage
* memory   — peak RSS of the receiver and of the worker while a 500-slice CT arrives and is processed
* scaling  — ingest and overhead vs study size (100 → 1000) and concurrent associations (1 → 16); PNG plot
* model    — seconds per study and tokens/s on CPU with the demo model

dcmtk disables Nagle only when the environment says ``TCP_NODELAY=1``; both dcmtk peers get it, so the
reference is the fast one. The node sets TCP_NODELAY itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from dicom_node.network.association import free_port, wait_port  # noqa: E402

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
RESULTS: dict[str, object] = {}
ALL = {"ingest", "overhead", "memory", "scaling", "model"}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------------------------- peers
@contextmanager
def storescp(tmp: Path) -> Iterator[int]:
    port = free_port()
    out = tmp / f"scp-{port}"
    out.mkdir(parents=True)
    proc = subprocess.Popen(["storescp", "--aetitle", "SPINEMED", "--output-directory", str(out), "--accept-all",
                             "--unique-filenames", str(port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(out, ignore_errors=True)


def node_toml(data_dir: Path, port: int, extra: str = "") -> str:
    return (f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data_dir}"\nmin_free_disk_mb = 0\n'
            f"max_associations = 64\n[completeness]\nquiet_seconds = 0.3\ncheck_interval_s = 0.05\n{extra}")


@contextmanager
def carried_slots(tmp: Path, data: Path) -> Iterator[None]:
    """Hand a fresh node the receive slots (``node.receive_slots``, 1 MiB each) of the node before it, as a
    node that keeps running keeps its own.  Otherwise each fresh data directory would first write its 512
    slots, which an installation does once.  The node still writes, before it listens, the slots the node
    before it used up."""
    cache, slots = tmp / "slot-pool", data / "spool" / ".slots"
    if cache.is_dir():
        slots.parent.mkdir(parents=True, exist_ok=True)
        cache.rename(slots)
    try:
        yield
    finally:  # the node has stopped: its slots are closed
        if slots.is_dir() and not cache.exists():
            slots.rename(cache)


@contextmanager
def node_receiver(tmp: Path, extra: str = "") -> Iterator[tuple[int, subprocess.Popen[bytes], Path]]:
    port = free_port()
    data = tmp / f"node-{port}"
    cfg = tmp / f"node-{port}.toml"
    cfg.write_text(node_toml(data, port, extra))
    with carried_slots(tmp, data):
        proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "--log-level", "WARNING", "receive",
                                 "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        try:
            wait_port(port, timeout=120)
            yield port, proc, data
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    shutil.rmtree(data, ignore_errors=True)


def send(port: int, paths: Sequence[Path], associations: int = 1) -> float:
    """storescu over ``associations`` parallel processes; returns instances/s."""
    chunks = [list(paths[i::associations]) for i in range(associations)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", "SPINEMED", "127.0.0.1", str(port), *map(str, c)],
                              env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in chunks]
    for p in procs:
        _, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-400:]}")
    return len(paths) / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------- studies
@dataclass
class Studies:
    mr100: list[Path]
    ct300: list[Path]


def make_studies(tmp: Path, quick: bool) -> Studies:
    from dicom_node.devtools.phantoms import make_lumbar_mr, make_spine_ct

    mr = make_lumbar_mr(tmp / "mr100", slices=50, size=256)  # T2 + T1: 100 instances
    ct = make_spine_ct(tmp / "ct300", slices=100 if quick else 300, size=512)
    return Studies(list(mr.paths), list(ct.paths))



# --------------------------------------------------------------------------------------------- 1. ingest
def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def warm_up_instance(tmp: Path, path: Path) -> Path:
    """A copy of ``path`` in a study of its own: sent first to each fresh node, so that the timed study
    meets a running node (as a PACS does), not one still importing modules and negotiating its first
    association."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = tmp / f"warm-{generate_uid()}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def paired(tmp: Path, paths: Sequence[Path], assocs: int, repeats: int) -> tuple[float, float, list[float],
                                                                                   list[float]]:
    """storescp and the node take turns (A B A B …) so both see the same machine; returns the medians
    (storescp, node) and every run.  Each node run is a fresh node (every instance new, fsynced), warmed
    with one instance of another study, as storescp is by the runs before."""
    refs, rates = [], []
    warm = warm_up_instance(tmp, paths[0])
    with storescp(tmp) as ref_port:
        for _ in range(repeats):
            refs.append(send(ref_port, paths, assocs))
            with node_receiver(tmp) as (port, _, _):
                send(port, [warm])
                rates.append(send(port, paths, assocs))
    return median(refs), median(rates), refs, rates


def bench_ingest(tmp: Path, studies: Studies, repeats: int) -> None:
    rows = []
    for name, paths in (("MR 100 × 256²", studies.mr100), (f"CT {len(studies.ct300)} × 512²", studies.ct300)):
        for assocs in (1, 4):
            ref, node, refs, rates = paired(tmp, paths, assocs, repeats)
            rows.append({"study": name, "associations": assocs, "storescp_per_s": round(ref, 1),
                         "node_per_s": round(node, 1), "ratio": round(node / ref, 2),
                         "storescp_runs": [round(r) for r in refs], "node_runs": [round(r) for r in rates]})
            print(f"ingest  {name:<16} assoc={assocs}  storescp {ref:7.1f}/s  node {node:7.1f}/s  "
                  f"ratio {node / ref:.2f}   (runs: storescp {[round(r) for r in refs]}, "
                  f"node {[round(r) for r in rates]})", flush=True)
    RESULTS["ingest"] = rows


# --------------------------------------------------------------------------------------------- 2. overhead
def run_overhead(tmp: Path, paths: Sequence[Path], associations: int = 1) -> dict[str, float]:
    """In-process receiving node + worker with the zero-latency model, storescp as destination."""
    from zero_model import ZeroLatencyModel

    from dicom_node.config import load_config
    from dicom_node.jobs.sqlite import SQLiteJobStore
    from dicom_node.node import ReceivingNode
    from dicom_node.work.pipeline import Pipeline
    from dicom_node.work.worker import Worker
    from inference.study import load_study

    study_uid = str(load_study(paths[:1]).study_instance_uid)
    with storescp(tmp) as dest_port:
        data = tmp / f"overhead-{dest_port}"
        cfg = load_config(
            node={"host": "127.0.0.1", "port": 0, "data_dir": data, "min_free_disk_mb": 0},
            completeness={"quiet_seconds": 0.3, "check_interval_s": 0.02},
            destinations=[{"name": "pacs", "ae_title": "SPINEMED", "host": "127.0.0.1", "port": dest_port}],
            worker={"poll_interval_s": 0.02},
            output={"key_image": True},
        )
        slots = carried_slots(tmp, data)
        slots.__enter__()
        node = ReceivingNode(cfg)
        port = node.start()
        store = SQLiteJobStore(cfg.db_path)
        worker = Worker(cfg, store, Pipeline(cfg, model=ZeroLatencyModel()))
        seconds: dict[str, float] = {}
        orig_run = worker.pipeline.run

        def timed_run(*a, **k):  # type: ignore[no-untyped-def]
            out = orig_run(*a, **k)
            seconds.update(out.seconds)
            return out

        worker.pipeline.run = timed_run  # type: ignore[method-assign]
        th = threading.Thread(target=worker.run_forever, daemon=True)
        th.start()
        try:
            send(port, paths, associations)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    job = store.by_study(study_uid)
                    if job.state.value in ("done", "failed", "skipped"):
                        break
                except KeyError:
                    pass
                time.sleep(0.02)
            if job.state.value != "done":
                raise RuntimeError(f"overhead run ended {job.state.value}: {job.reason}")
            t = job.timings
            last = job.last_received_at or 0.0
            quiet = cfg.completeness.quiet_seconds
            out = {
                "total_s": t["done"] - last - quiet,
                "complete_wait_s": (job.completed_at or 0) - last - quiet,
                "claim_s": t["inferring"] - (job.completed_at or 0),
                **{f"{k}_s": v for k, v in seconds.items()},
                "export_s": t["done"] - t["exporting"],
            }
        finally:
            worker.stop()
            th.join(timeout=30)
            node.stop()
            store.close()
            slots.__exit__(None, None, None)
            shutil.rmtree(data, ignore_errors=True)
    return out


def bench_overhead(tmp: Path, studies: Studies) -> None:
    rows = []
    for name, paths in (("MR 100", studies.mr100), (f"CT {len(studies.ct300)}", studies.ct300)):
        r = run_overhead(tmp, paths)
        rows.append({"study": name, **{k: round(v, 3) for k, v in r.items()}})
        stages = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in r.items() if k != "total_s")
        print(f"overhead {name:<8} last instance → SR acknowledged: {r['total_s']:.2f} s  ({stages})", flush=True)
    RESULTS["overhead"] = rows


# --------------------------------------------------------------------------------------------- 3. memory
def bench_memory(tmp: Path, quick: bool) -> None:
    from dicom_node.devtools.phantoms import make_spine_ct

    n = 150 if quick else 500
    ct = list(make_spine_ct(tmp / f"ct{n}", slices=n, size=512).paths)
    small = ct[: max(20, n // 10)]
    rows = []
    for label, paths in ((f"CT {len(small)}", small), (f"CT {n}", ct)):
        with storescp(tmp) as dest_port, node_receiver(tmp) as (port, proc, data):
            base = peak_rss_mb(proc.pid)
            send(port, paths)
            recv_peak = peak_rss_mb(proc.pid)
            wcfg = tmp / "worker.toml"
            wcfg.write_text(node_toml(data, port, f'[[destinations]]\nname = "pacs"\nae_title = "SPINEMED"\n'
                                                  f'host = "127.0.0.1"\nport = {dest_port}\n'))
            w = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "zero_worker.py"), str(wcfg)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
            out, _ = w.communicate(timeout=900)
            worker_peak = float(out.decode().strip().splitlines()[-1])
        rows.append({"study": label, "receiver_idle_mb": round(base, 1), "receiver_peak_mb": round(recv_peak, 1),
                     "worker_peak_mb": round(worker_peak, 1)})
        print(f"memory  {label:<8} receiver peak {recv_peak:6.1f} MB (idle {base:.1f})  worker peak "
              f"{worker_peak:6.1f} MB", flush=True)
    RESULTS["memory"] = rows


# --------------------------------------------------------------------------------------------- 4. scaling
def bench_scaling(tmp: Path, quick: bool) -> None:
    from dicom_node.devtools.phantoms import make_spine_ct

    sizes = [100, 300] if quick else [100, 300, 1000]
    assocs = [1, 4] if quick else [1, 4, 16]
    by_size = []
    for n in sizes:
        paths = list(make_spine_ct(tmp / f"scale{n}", slices=n, size=256).paths)
        ref, node, _, _ = paired(tmp, paths, 1, 3)
        ov = run_overhead(tmp, paths)["total_s"]
        by_size.append({"instances": n, "storescp_per_s": round(ref, 1), "node_per_s": round(node, 1),
                        "ratio": round(node / ref, 2), "overhead_s": round(ov, 3)})
        print(f"scaling size={n:<5} storescp {ref:7.1f}/s node {node:7.1f}/s ratio {node / ref:.2f} "
              f"overhead {ov:.2f} s", flush=True)
    paths = list(make_spine_ct(tmp / "scale-assoc", slices=320, size=256).paths)
    by_assoc = []
    for a in assocs:
        ref, node, _, _ = paired(tmp, paths, a, 3)
        by_assoc.append({"associations": a, "storescp_per_s": round(ref, 1), "node_per_s": round(node, 1),
                         "ratio": round(node / ref, 2)})
        print(f"scaling assoc={a:<3} storescp {ref:7.1f}/s node {node:7.1f}/s ratio {node / ref:.2f}", flush=True)
    RESULTS["scaling"] = {"by_size": by_size, "by_associations": by_assoc}
    plot(by_size, by_assoc, REPO / "benchmarks" / "scaling.png")


def plot(by_size: list[dict[str, float]], by_assoc: list[dict[str, float]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("scaling plot skipped: matplotlib not installed (pip install '.[bench]')")
        return
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    xs = [r["instances"] for r in by_size]
    ax[0].plot(xs, [r["storescp_per_s"] for r in by_size], "o-", label="dcmtk storescp")
    ax[0].plot(xs, [r["node_per_s"] for r in by_size], "s-", label="spinemed-node")
    ax[0].set(xscale="log", xlabel="instances per study (CT 256²)", ylabel="instances/s", title="Ingest vs size")
    ax[0].legend()
    ax[1].plot(xs, [r["overhead_s"] for r in by_size], "s-", color="C1")
    ax[1].set(xscale="log", xlabel="instances per study", ylabel="s", title="Last instance → SR acked")
    xa = [r["associations"] for r in by_assoc]
    ax[2].plot(xa, [r["storescp_per_s"] for r in by_assoc], "o-", label="dcmtk storescp")
    ax[2].plot(xa, [r["node_per_s"] for r in by_assoc], "s-", label="spinemed-node")
    ax[2].set(xscale="log", xlabel="concurrent associations", ylabel="instances/s", title="Ingest vs associations")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"scaling plot: {out}")


# --------------------------------------------------------------------------------------------- 5. model
def bench_model(tmp: Path) -> None:
    from dicom_node.devtools.phantoms import make_lumbar_mr, make_scoliosis_radiograph, make_spine_ct
    from inference.backends import load_model
    from inference.demo_model import build_demo_model
    from inference.preprocess import prepare_inputs
    from inference.settings import ModelSettings
    from inference.study import load_study

    model_dir = Path(os.environ.get("SPINEMED_DEMO_MODEL", tmp / "demo-model"))
    build_demo_model(model_dir)
    settings = ModelSettings(backend="demo", path=model_dir)
    t = time.perf_counter()
    model = load_model(settings, data_dir=tmp)
    load_s = time.perf_counter() - t
    rows = []
    for name, make in (("MR", make_lumbar_mr), ("CT", make_spine_ct), ("XR", make_scoliosis_radiograph)):
        st = make(tmp / f"model-{name}")
        study = load_study(list(st.paths))
        inputs = prepare_inputs(study, [s.series_instance_uid for s in study.series], settings, model.image_size)
        t = time.perf_counter()
        findings = model.analyze(inputs)
        secs = time.perf_counter() - t
        tokens = getattr(model, "last_generated_tokens", None)
        rows.append({"study": name, "images": len(inputs.images), "seconds": round(secs, 2),
                     "levels": len(findings.levels), "generated_tokens": tokens,
                     "tokens_per_s": round(tokens / secs, 1) if tokens else None})
        tps = f", {tokens / secs:.0f} tokens/s" if tokens else ""
        print(f"model   demo on CPU {name}: {secs:.2f} s/study ({len(inputs.images)} images{tps})", flush=True)
    RESULTS["model"] = {"load_s": round(load_s, 2), "studies": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller studies (a smoke run)")
    ap.add_argument("--only", default=",".join(sorted(ALL)))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dicom_node.log import configure_logging

    configure_logging("WARNING", json=False)
    which = set(args.only.split(","))
    if which - ALL:
        ap.error(f"--only: unknown {sorted(which - ALL)}; choose from {sorted(ALL)}")
    tmp = Path(tempfile.mkdtemp(prefix="spinemed-bench-"))
    t0 = time.perf_counter()
    try:
        print(f"machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
        studies = make_studies(tmp, args.quick) if which & {"ingest", "overhead"} else None
        if "ingest" in which and studies:
            bench_ingest(tmp, studies, args.repeats)
        if "overhead" in which and studies:
            bench_overhead(tmp, studies)
        if "memory" in which:
            bench_memory(tmp, args.quick)
        if "scaling" in which:
            bench_scaling(tmp, args.quick)
        if "model" in which:
            bench_model(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS["wall_s"] = round(time.perf_counter() - t0, 1)
    # a partial run (--only) updates its own sections and keeps the others
    merged = json.loads(args.json.read_text()) if args.json.exists() and which != ALL else {}
    merged.update(RESULTS)
    args.json.write_text(json.dumps(merged, indent=2))
    print(f"total {RESULTS['wall_s']} s; results in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
