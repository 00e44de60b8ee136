"""``spinemed-node doctor``: check an installation before (and while) it runs.

Each check says OK, WARN or FAIL with one line of detail; the command exits 1 when any check failed.
Checks: configuration (already validated on load, including the secret-file mode rule), data folder
(exists, writable, not world-accessible), free space against ``node.min_free_disk_mb``, the job store,
the DICOM and HTTP ports (bindable, or answering because the node already runs), TLS material,
destinations by C-ECHO, the GPU (``torch.cuda``), the model files (``config.json``, weight files and
their SHA-256 digest) or the OpenAI-compatible server, and dcmtk's ``dsr2html`` for the report page.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dicom_node.config import NodeConfig

__all__ = ["CheckResult", "print_report", "run_doctor"]

Status = Literal["OK", "WARN", "FAIL"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str


def _config(config: NodeConfig, path: Path | None) -> CheckResult:
    where = str(path) if path else "embedded defaults + environment"
    return CheckResult("config", "OK", f"valid: {where}")


def _data_dir(config: NodeConfig) -> CheckResult:
    d = config.node.data_dir
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".doctor-"):
            pass
    except OSError as exc:
        return CheckResult("data_dir", "FAIL", f"{d} not writable by uid {os.getuid()}: {exc.strerror or exc}")
    mode = stat.S_IMODE(d.stat().st_mode)
    if mode & stat.S_IRWXO:
        return CheckResult("data_dir", "WARN", f"{d} is accessible by every user (mode {mode:04o}); "
                                               "it holds patient data: chmod 0750")
    return CheckResult("data_dir", "OK", f"{d} writable, mode {mode:04o}")


def _disk(config: NodeConfig) -> CheckResult:
    d = config.node.data_dir
    free_mb = shutil.disk_usage(d).free // (1024 * 1024)
    need = config.node.min_free_disk_mb
    if free_mb < need:
        return CheckResult("disk", "FAIL", f"{free_mb} MiB free under {d}, below node.min_free_disk_mb = {need}")
    if free_mb < 2 * need:
        return CheckResult("disk", "WARN", f"{free_mb} MiB free under {d}, close to node.min_free_disk_mb = {need}")
    return CheckResult("disk", "OK", f"{free_mb} MiB free under {d} (threshold {need} MiB)")


def _store(config: NodeConfig) -> CheckResult:
    from dicom_node.jobs.stores import open_store

    try:
        store = open_store(config)
        try:
            n = sum(store.counts().values())
        finally:
            store.close()
    except Exception as exc:  # any driver error is a failed check, reported with its type
        return CheckResult("store", "FAIL", f"{type(exc).__name__}: {exc}")
    kind = "PostgreSQL" if config.store.url else f"SQLite {config.db_path}"
    return CheckResult("store", "OK", f"{kind}: {n} jobs")


def _port(name: str, host: str, port: int, probe: Callable[[], tuple[bool, str]]) -> CheckResult:
    if port == 0:
        return CheckResult(name, "OK", f"{host}: any free port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            ok, msg = probe()
            if ok:
                return CheckResult(name, "OK", f"{host}:{port} in use by the running node ({msg})")
            return CheckResult(name, "FAIL", f"{host}:{port} cannot be bound ({exc.strerror or exc}) and the "
                                             f"node does not answer there ({msg})")
    return CheckResult(name, "OK", f"{host}:{port} bindable")


def _dicom_port(config: NodeConfig) -> CheckResult:
    from dicom_node.config import DestinationConfig
    from dicom_node.delivery.cstore import echo

    n = config.node
    target = "127.0.0.1" if n.host in ("0.0.0.0", "::") else n.host

    def probe() -> tuple[bool, str]:
        me = DestinationConfig(name="self", ae_title=n.ae_title, host=target, port=n.port)
        if config.tls.enabled:
            return False, "TLS listener: C-ECHO it with a client certificate"
        return echo(me, calling_ae=n.ae_title, timeout_s=3.0)

    return _port("dicom_port", n.host, n.port, probe)


def _http_port(config: NodeConfig) -> CheckResult:
    h = config.http
    if not h.enabled:
        return CheckResult("http_port", "OK", "[http] disabled")

    def probe() -> tuple[bool, str]:
        import httpx

        host = "127.0.0.1" if h.host in ("0.0.0.0", "::") else h.host
        try:
            r = httpx.get(f"http://{host}:{h.port}/health/live", timeout=3.0)
        except httpx.HTTPError as exc:
            return False, f"/health/live: {exc}"
        return r.status_code == 200, f"/health/live {r.status_code}"

    return _port("http_port", h.host, h.port, probe)


def _tls(config: NodeConfig) -> list[CheckResult]:
    from dicom_node.errors import ConfigError
    from dicom_node.network.tls import client_context, server_context

    out = []
    if config.tls.enabled:
        try:
            server_context(config.tls)
            out.append(CheckResult("tls", "OK", f"listener certificate {config.tls.cert_file} loads"))
        except ConfigError as exc:
            out.append(CheckResult("tls", "FAIL", str(exc)))
    for d in config.destinations:
        if d.tls:
            try:
                client_context(d)
                out.append(CheckResult(f"tls:{d.name}", "OK", "client TLS material loads"))
            except ConfigError as exc:
                out.append(CheckResult(f"tls:{d.name}", "FAIL", str(exc)))
    return out


def _destinations(config: NodeConfig) -> list[CheckResult]:
    from dicom_node.delivery.dispatch import check

    out = []
    calling = config.export.calling_ae_title or config.node.ae_title
    for d in config.destinations:
        ok, msg = check(d, calling_ae=calling, timeout_s=5.0)
        where = {"dicomweb": f"dicomweb {d.url}", "fhir": f"fhir {d.url}", "hl7": f"hl7 MLLP {d.host}:{d.port}"}.get(
            d.type, f"{d.ae_title}@{d.host}:{d.port}{' (TLS)' if d.tls else ''}")
        out.append(CheckResult(f"destination:{d.name}", "OK" if ok else "FAIL", f"{where}: {msg}"))
    if not config.destinations:
        out.append(CheckResult("destinations", "WARN", "none configured: results stay in data_dir/outputs"))
    return out


def _gpu(config: NodeConfig) -> CheckResult:
    m = config.model
    if m.backend == "openai":
        return CheckResult("gpu", "OK", "backend openai: the model server has the GPUs")
    try:
        import torch
    except ImportError as exc:
        return CheckResult("gpu", "FAIL", f"torch not importable: {exc}")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        free, total = torch.cuda.mem_get_info(0)
        return CheckResult("gpu", "OK", f"CUDA {torch.version.cuda}: {', '.join(names)}; "
                                        f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free on GPU 0")
    if m.device.startswith("cuda"):
        return CheckResult("gpu", "FAIL", f"[model] device = {m.device!r} but torch sees no CUDA GPU "
                                          "(driver loaded? nvidia-smi works? CUDA build of torch?)")
    if m.backend == "demo" or m.device == "cpu":
        return CheckResult("gpu", "OK", f"no CUDA GPU; backend {m.backend} on CPU is configured")
    return CheckResult("gpu", "WARN", "no CUDA GPU: a 7B model on CPU takes minutes per study")


def _model(config: NodeConfig) -> CheckResult:
    m = config.model
    if m.backend == "openai":
        import httpx

        url = m.openai.base_url.rstrip("/") + "/models"
        key = os.environ.get(m.openai.api_key_env or "")
        try:
            r = httpx.get(url, timeout=5.0, headers={"Authorization": f"Bearer {key}"} if key else {})
        except httpx.HTTPError as exc:
            return CheckResult("model", "FAIL", f"{url}: {exc}")
        if r.status_code != 200:
            return CheckResult("model", "FAIL", f"{url}: HTTP {r.status_code}")
        served = [x.get("id") for x in r.json().get("data", []) if isinstance(x, dict)]
        if m.openai.model not in served:
            return CheckResult("model", "FAIL", f"{url} serves {served}, not {m.openai.model!r}")
        return CheckResult("model", "OK", f"{url} serves {m.openai.model!r}")
    if m.hub_id and m.path is None:
        return CheckResult("model", "WARN", f"hub id {m.hub_id}: resolved from the local HF cache at start")
    d = config.model_dir
    if not (d / "config.json").is_file():
        if m.backend == "demo":
            return CheckResult("model", "WARN", f"demo model not built yet in {d}: built on first start")
        return CheckResult("model", "FAIL", f"{d}/config.json missing: weights not installed there")
    from inference.backends.transformers_backend import WEIGHT_SUFFIXES, weights_digest

    weights = [p for p in d.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        return CheckResult("model", "FAIL", f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {d}")
    unreadable = [p.name for p in weights if not os.access(p, os.R_OK)]
    if unreadable:
        return CheckResult("model", "FAIL", f"weight files not readable by uid {os.getuid()}: {unreadable}")
    size = sum(p.stat().st_size for p in weights)
    digest = weights_digest(d, cache_dir=config.node.data_dir / "cache")
    demo = " (demo — not for clinical use)" if m.backend == "demo" else ""
    return CheckResult("model", "OK", f"{d}: config.json, {len(weights)} weight files, {size / 2**30:.2f} GiB, "
                                      f"sha256 {digest[:16]}…{demo}")


def _dsr2html() -> CheckResult:
    exe = shutil.which("dsr2html")
    if exe is None:
        return CheckResult("dsr2html", "WARN", "dcmtk's dsr2html not found: the jobs page cannot render reports")
    return CheckResult("dsr2html", "OK", exe)


def run_doctor(config: NodeConfig, config_path: Path | None, *, skip_echo: bool = False) -> list[CheckResult]:
    """Run every check; none raises (each failure is a ``FAIL`` result)."""
    results = [_config(config, config_path), _data_dir(config), _disk(config), _store(config),
               _dicom_port(config), _http_port(config), *_tls(config)]
    if not skip_echo:
        results += _destinations(config)
    results += [_gpu(config), _model(config), _dsr2html()]
    return results


def print_report(results: list[CheckResult]) -> int:
    """Print one line per check; returns the exit code (1 when any check failed)."""
    for r in results:
        print(f"{r.status:<4}  {r.name}: {r.detail}", file=sys.stdout)
    failed = [r for r in results if r.status == "FAIL"]
    print(f"\n{len(results)} checks: {len(failed)} failed, {sum(r.status == 'WARN' for r in results)} warnings")
    return 1 if failed else 0
