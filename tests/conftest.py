"""Shared fixtures: free ports, real dcmtk peers, an in-process receiving node."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pytest

from dicom_node.network.association import free_port, wait_port  # re-exported: the tests import them from here

__all__ = ["free_port", "wait_port"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every node a test starts writes its receive slots (1 MiB each) before it listens: 16 keep the slot path
# exercised without writing the production default's 512 MiB for each of them.
os.environ.setdefault("SPINEMED_NODE__RECEIVE_SLOTS", "16")


@contextlib.contextmanager
def running_node(cfg: Any, pipeline: Any) -> Iterator[Any]:
    """A receiving node (listener, indexer, ops) and a worker thread with ``pipeline`` (a real
    :class:`dicom_node.work.pipeline.Pipeline`, its model the demo one or a scripted one), stopped after."""
    from dicom_node.node import ReceivingNode
    from dicom_node.work.worker import Worker

    node = ReceivingNode(cfg)
    node.start()
    worker = Worker(cfg, node.store, pipeline=pipeline)
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    try:
        yield node
    finally:
        worker.stop()
        thread.join(timeout=30)
        node.stop()


def wait_until(pred: Any, timeout: float, what: str) -> Any:
    """Poll ``pred`` every 50 ms until it returns something truthy (returned), or raise TimeoutError(what)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(0.05)
    raise TimeoutError(what)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not on PATH: install dcmtk/dicom3tools (scripts/test does)")
    return path


@dataclass
class StoreSCP:
    """A dcmtk ``storescp`` destination writing every received object to ``dir``."""

    ae_title: str
    port: int
    dir: Path
    proc: subprocess.Popen[bytes]

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.rglob("*") if p.is_file())

    def wait_files(self, n: int, timeout: float = 60.0) -> list[Path]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = self.files()
            if len(files) >= n:
                return files
            time.sleep(0.1)
        raise TimeoutError(f"storescp got {len(self.files())} of {n} objects in {timeout}s")


def start_storescp(tmp: Path, ae_title: str = "RESULTS", port: int | None = None) -> StoreSCP:
    exe = require_tool("storescp")
    port = port or free_port()
    out = tmp / f"storescp-{port}"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            exe,
            "--aetitle",
            ae_title,
            "--output-directory",
            str(out),
            "--accept-all",
            "--filename-extension",
            ".dcm",
            "--unique-filenames",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return StoreSCP(ae_title, port, out, proc)


@pytest.fixture()
def counted_reads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every file ``pydicom.dcmread`` or :func:`inference.study.read_header` is asked to read during the test,
    in order (it still reads them)."""
    import inference.study

    reads: list[object] = []
    real = pydicom.dcmread
    real_header = inference.study.read_header

    def counting(*args: object, **kwargs: object) -> pydicom.Dataset:
        reads.append(args[0])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    def counting_header(path: Any) -> pydicom.Dataset:
        reads.append(path)
        return real_header(path)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    monkeypatch.setattr(inference.study, "read_header", counting_header)
    import dicom_node.work.worker

    monkeypatch.setattr(dicom_node.work.worker, "read_header", counting_header)  # imported by name there
    return reads


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = start_storescp(tmp_path)
    yield scp
    scp.proc.terminate()
    scp.proc.wait(timeout=10)


def storescu(
    port: int,
    paths: list[Path],
    *,
    called: str = "SPINEMED",
    calling: str = "STORESCU",
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    exe = require_tool("storescu")
    cmd = [exe, "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------- the node
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random demo model: the one scripts/setup built, else built once for this session."""
    env = os.environ.get("SPINEMED_DEMO_MODEL")
    if env and (Path(env) / "config.json").is_file():
        return Path(env)
    from inference.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")


def model_inputs(paths: Any) -> Any:
    """A phantom study (its files) read and prepared for the model as the pipeline does, default settings."""
    from inference.backends.qwen_vl import policy_for
    from inference.preprocess import prepare_inputs
    from inference.settings import ModelSettings
    from inference.study import load_study

    study = load_study(list(paths))
    return prepare_inputs(study, [x.series_instance_uid for x in study.series], ModelSettings(),
                          policy_for(ModelSettings()))


def node_config_text(
    data_dir: Path,
    model_dir: Path,
    port: int,
    destinations: list[tuple[str, str, int]],
    *,
    quiet: float = 1.0,
    extra: str = "",
) -> str:
    dests = "".join(
        f'\n[[destinations]]\nname = "{n}"\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {p}\n'
        for n, ae, p in destinations
    )
    return f"""
[node]
host = "127.0.0.1"
port = {port}
data_dir = "{data_dir}"
min_free_disk_mb = 0

[completeness]
quiet_seconds = {quiet}
force_seconds = 300
check_interval_s = 0.2

[export]
backoff_initial_s = 0.5
backoff_max_s = 2.0
max_attempts = 6

[model]
backend = "demo"
path = "{model_dir}"

[worker]
poll_interval_s = 0.1
{dests}
{extra}
"""


@dataclass
class NodeProcess:
    """``spinemed-node serve`` as a real subprocess."""

    config: Path
    data_dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int | None = None) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
            self.proc.wait(timeout=60)

    def store(self):  # type: ignore[no-untyped-def]
        from dicom_node.jobs.sqlite import SQLiteJobStore

        return SQLiteJobStore(self.data_dir / "jobs.sqlite3")

    def wait_state(self, study_uid: str, states: set[str], timeout: float = 180.0):  # type: ignore[no-untyped-def]
        return self.wait_job(study_uid, lambda job: job.state.value in states, f"job in {states}", timeout)

    def wait_job(self, study_uid: str, ok: Any, what: str, timeout: float = 180.0):  # type: ignore[no-untyped-def]
        """The study's job once ``ok(job)`` holds; fails with the node's log after ``timeout`` seconds."""
        store = self.store()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    job = store.by_study(study_uid)
                    if ok(job):
                        return job
                except KeyError:
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError(f"node exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.1)
            raise TimeoutError(f"{what}: not after {timeout}s:\n{self.log.read_text()[-3000:]}")
        finally:
            store.close()


def start_node(config: Path, data_dir: Path, port: int) -> NodeProcess:
    import sys

    log = config.with_suffix(".log")
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    wait_port(port, 60)
    return NodeProcess(config, data_dir, port, proc, log)


# ---------------------------------------------------------------------------------------------- PostgreSQL
def _pg_bindir() -> Path:
    for cand in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (cand / "initdb").is_file() and (cand / "pg_ctl").is_file():
            return cand
    exe = shutil.which("initdb")
    if exe is not None and shutil.which("pg_ctl"):
        return Path(exe).resolve().parent
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql "
                "(scripts/setup installs it); the PostgreSQL job store tests need a real server")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port>; yields its admin URL."""
    bindir = _pg_bindir()
    base = Path(tempfile.mkdtemp(prefix="spinemed-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root but there is no 'postgres' user (the Debian postgresql package makes it)")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        base.chmod(0o700)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", free_port()
    run = subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                          "-E", "UTF8", "--no-sync"], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.fail(f"initdb failed: {run.stderr[-1000:]}")
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    run = subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
                          "-o", opts, "start"], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.fail(f"pg_ctl start failed: {run.stderr[-1000:]} {(base / 'log').read_text()[-1000:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield f"{pg_server}/{name}"
    with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """An empty job store of each kind (PostgreSQL: a fresh database on the test server)."""
    from dicom_node.jobs.postgres import PostgresJobStore
    from dicom_node.jobs.sqlite import SQLiteJobStore

    store = (SQLiteJobStore(tmp_path / "jobs.sqlite3") if request.param == "sqlite"
             else PostgresJobStore(request.getfixturevalue("pg_url")))
    yield store
    store.close()
