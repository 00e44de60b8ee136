"""``spinemed-node demo``: the whole node on this machine, end to end, with the demo model.

1. builds the tiny random demo model (once; demo — not for clinical use),
2. starts a results destination (dcmtk ``storescp``) and the node (``spinemed-node serve``) on free ports,
3. writes a synthetic spine study and sends it over a real DICOM association (dcmtk ``storescu``),
4. follows the job through its states, and prints the SR that arrived at the destination (``dsrdump``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from dicom_node.jobs.model import JobState
from dicom_node.jobs.sqlite import SQLiteJobStore
from dicom_node.network.association import free_port, wait_port

__all__ = ["run_demo"]

_FINAL = {JobState.DONE, JobState.FAILED, JobState.SKIPPED}


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def demo_node_toml(data_dir: Path, model_dir: Path, port: int, destination: str, *, writer: str = "demo") -> str:
    """The node config of the local demo stacks (``demo``, ``viewer``): loopback, short quiet period, demo model.

    ``destination`` is the TOML of one ``[[destinations]]`` table.
    """
    return f"""# written by `spinemed-node {writer}`
[node]
ae_title = "SPINEMED"
host = "127.0.0.1"
port = {port}
data_dir = "{data_dir}"
min_free_disk_mb = 64

[completeness]
quiet_seconds = 2.0
force_seconds = 120.0
check_interval_s = 0.5

{destination.strip()}

[export]
backoff_initial_s = 1.0

[output]
pdf = true

[model]
backend = "demo"
path = "{model_dir}"

[worker]
poll_interval_s = 0.2
"""


def _send(port: int, paths: list[Path]) -> float:
    t0 = time.perf_counter()
    storescu = shutil.which("storescu")
    if storescu:
        res = subprocess.run(
            [storescu, "-aet", "DEMO-SCU", "-aec", "SPINEMED", "127.0.0.1", str(port), *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if res.returncode != 0:
            raise RuntimeError(f"storescu failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    else:
        from pynetdicom import AE, StoragePresentationContexts

        from dicom_node.network.association import nodelay_handlers

        ae = AE(ae_title="DEMO-SCU")
        ae.requested_contexts = StoragePresentationContexts[:120]
        assoc = ae.associate("127.0.0.1", port, ae_title="SPINEMED", evt_handlers=nodelay_handlers())
        if not assoc.is_established:
            raise RuntimeError("association with the node failed")
        for p in paths:
            status = assoc.send_c_store(p)
            if status is None or int(status.Status) != 0:
                raise RuntimeError(f"C-STORE failed for {p.name}")
        assoc.release()
    return time.perf_counter() - t0


def _show(path: Path) -> None:
    dsrdump = shutil.which("dsrdump")
    if dsrdump:
        out = subprocess.run([dsrdump, "+Pl", str(path)], capture_output=True, text=True, timeout=60)
        print(out.stdout)
    else:  # dcmtk missing: highdicom/pydicom's own rendering of the content tree
        print(pydicom.dcmread(path))


def run_demo(
    *,
    workdir: Path = Path(".demo"),
    kind: str = "mr",
    keep_running: bool = False,
    model_dir: Path | None = None,
    timeout_s: float = 600.0,
) -> int:
    """Run the demo; returns 0 when an SR arrived at the destination."""
    from dicom_node.devtools.phantoms import make_study
    from inference.demo_model import build_demo_model

    workdir = workdir.resolve()
    data_dir = workdir / "node"
    model_dir = (model_dir or workdir / "models" / "demo").resolve()
    for sub in ("node", "study", "results"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    (workdir / "results").mkdir(parents=True)

    _say("building the tiny random demo model (demo — not for clinical use) ...")
    t = time.perf_counter()
    build_demo_model(model_dir)
    _say(f"model ready at {model_dir} ({time.perf_counter() - t:.1f} s)")

    port, dest_port = free_port(), free_port()
    config = workdir / "node.toml"
    destination = (
        f'[[destinations]]\nname = "demo-results"\nae_title = "RESULTS"\nhost = "127.0.0.1"\nport = {dest_port}'
    )
    config.write_text(demo_node_toml(data_dir, model_dir, port, destination))

    procs: list[subprocess.Popen[bytes]] = []
    storescp = shutil.which("storescp")
    if storescp is None:
        _say("dcmtk storescp not found: install dcmtk (scripts/demo does) to receive the results")
        return 1
    procs.append(
        subprocess.Popen(
            [
                storescp,
                "--aetitle",
                "RESULTS",
                "--output-directory",
                str(workdir / "results"),
                "--accept-all",
                "--filename-extension",
                ".dcm",
                str(dest_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    log = (workdir / "node.log").open("wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    procs.append(node)
    try:
        wait_port(dest_port, 20, proc=procs[0])
        wait_port(port, 60, proc=node)
        _say(f"node listening: AE SPINEMED at 127.0.0.1:{port}; results go to storescp at :{dest_port}")
        _say(f"config: {config}; log: {workdir / 'node.log'}")

        study = make_study(kind, workdir / "study")
        paths = list(study.paths)
        secs = _send(port, paths)
        sent_at = time.time()
        _say(
            f"sent synthetic {kind.upper()} study: {len(paths)} instances in {secs:.2f} s "
            f"({len(paths) / secs:.0f} instances/s) with storescu"
        )

        store = SQLiteJobStore(data_dir / "jobs.sqlite3")
        last: JobState | None = None
        deadline = time.monotonic() + timeout_s
        job = None
        while time.monotonic() < deadline:
            try:
                job = store.by_study(study.study_instance_uid)
            except KeyError:
                job = None
            if job is not None and job.state is not last:
                _say(f"job {job.id}: {job.state.value}" + (f" — {job.reason}" if job.reason else ""))
                last = job.state
            if job is not None and job.state in _FINAL:
                break
            if node.poll() is not None:
                _say(f"the node exited with {node.returncode}; see {workdir / 'node.log'}")
                return 1
            time.sleep(0.2)
        store.close()
        if job is None or job.state is not JobState.DONE:
            _say("no result: the job did not finish (see the log above)")
            return 1
        done_at = job.timings.get("done", time.time())
        results = sorted((workdir / "results").rglob("*.dcm"))
        srs = [p for p in results if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]
        _say(f"{len(results)} result objects received by storescp in {workdir / 'results'}:")
        for p in results:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            _say(f"  {p.name}: {ds.Modality} {ds.SOPClassUID.name} — {ds.get('SeriesDescription', '')}")
        _say(
            f"seconds from last instance sent to result delivered: {done_at - sent_at:.1f} "
            f"(includes the {2.0:.0f} s quiet period)"
        )
        if not srs:
            _say("no SR among the results")
            return 1
        measurement = next(
            (
                p
                for p in srs
                if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
            ),
            srs[0],
        )
        _say(f"dsrdump {measurement}:")
        _show(measurement)
        _say("demo model — not for clinical use: the findings above are random, the DICOM plumbing is real.")
        if keep_running:
            _say(f"node still running (pid {node.pid}); stop it with: kill {node.pid}")
            procs.remove(node)
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        log.close()
