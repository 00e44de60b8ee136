"""Shared fixtures: free ports, real dcmtk peers, an in-process receiving node."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


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
        [exe, "--aetitle", ae_title, "--output-directory", str(out), "--accept-all", "--filename-extension",
         ".dcm", "--unique-filenames", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return StoreSCP(ae_title, port, out, proc)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = start_storescp(tmp_path)
    yield scp
    scp.proc.terminate()
    scp.proc.wait(timeout=10)


def storescu(port: int, paths: list[Path], *, called: str = "SPINEMED", calling: str = "STORESCU",
             extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = require_tool("storescu")
    cmd = [exe, "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
