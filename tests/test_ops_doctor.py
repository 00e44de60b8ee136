"""``spinemed-node doctor``: an installation check that says what is wrong, one line per check."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from conftest import REPO, free_port

from dicom_node.config import load_config
from dicom_node.ops.doctor import run_doctor


def test_doctor_reports_each_check(tmp_path: Path, demo_model_dir: Path) -> None:
    (tmp_path / "data").mkdir(mode=0o750)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        cfg = load_config(
            node={"data_dir": tmp_path / "data", "host": "127.0.0.1", "port": free_port(), "min_free_disk_mb": 1},
            http={"host": "127.0.0.1", "port": busy.getsockname()[1]},  # taken by something that is not the node
            model={"backend": "demo", "path": str(demo_model_dir)},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
        )
        results = {r.name: r for r in run_doctor(cfg, None)}
    finally:
        busy.close()
    assert results["config"].status == "OK"
    assert results["data_dir"].status == "OK" and "writable" in results["data_dir"].detail
    assert results["disk"].status == "OK" and results["store"].status == "OK"
    assert results["dicom_port"].status == "OK" and "bindable" in results["dicom_port"].detail
    assert results["http_port"].status == "FAIL" and "cannot be bound" in results["http_port"].detail
    assert results["destination:pacs"].status == "FAIL"
    assert results["gpu"].status in {"OK", "WARN"}
    model = results["model"]
    assert model.status == "OK" and "sha256" in model.detail and "demo" in model.detail, model.detail
    (tmp_path / "data").chmod(0o777)
    assert {r.name: r for r in run_doctor(cfg, None, skip_echo=True)}["data_dir"].status == "WARN"


def test_doctor_cli_exit_code(tmp_path: Path, demo_model_dir: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\nport = 0\nmin_free_disk_mb = 1\n[http]\nport = 0\n'
                   f'[model]\nbackend = "demo"\npath = "{demo_model_dir}"\n')
    res = subprocess.run([sys.executable, "-m", "dicom_node", "doctor", "--config", str(cfg)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK    model:" in res.stdout and "0 failed" in res.stdout
