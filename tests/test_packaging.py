"""What an installation copies to /etc (``systemd/``, docs/install.md), checked with the tools that will read
it: ``systemd-analyze verify`` on the units, ``systemd-sysusers`` on the user, ``logrotate`` on the audit
trail's rotation (a real rotation while lines are written), and the receive unit's command run with the
unit's environment and umask.  systemd itself is not PID 1 here, so the unit's sandbox is not exercised."""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO, free_port, require_tool, storescu, wait_port

from dicom_node.devtools.phantoms import make_lumbar_mr
from dicom_node.ops.audit import AuditTrail

UNITS = REPO / "systemd"
INSTALLED_EXE = "/opt/spinemed-node/.venv/bin/spinemed-node"


def _service(name: str) -> dict[str, list[str]]:
    """The ``[Service]`` section of a unit: every value of each key, in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _exe() -> str:
    exe = Path(sys.executable).parent / "spinemed-node"
    assert exe.is_file(), f"the console script is installed beside the interpreter: {exe}"
    return str(exe)


def test_units_pass_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    for unit in ("spinemed-node-receive.service", "spinemed-node-worker.service", "spinemed-node.target"):
        # the units name the installed path; verify checks that ExecStart is executable
        (tmp_path / unit).write_text((UNITS / unit).read_text().replace(INSTALLED_EXE, _exe()))
    run = subprocess.run([analyze, "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "" and run.stdout.strip() == "", "no unknown key, no bad value"


@pytest.mark.parametrize("unit", ["spinemed-node-receive.service", "spinemed-node-worker.service"])
def test_each_unit_runs_a_command_of_the_cli(unit: str) -> None:
    (cmd,) = _service(unit)["ExecStart"]
    argv = cmd.split()
    assert argv[0] == INSTALLED_EXE
    run = subprocess.run([_exe(), *argv[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--config" in run.stdout


def test_sysusers_creates_the_service_user_without_a_login(tmp_path: Path) -> None:
    sysusers = require_tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    run = subprocess.run([sysusers, f"--root={tmp_path}", str(UNITS / "spinemed-node.sysusers.conf")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    (entry,) = [line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
                if line.startswith("spinemed:")]
    assert entry[5] == "/var/lib/spinemed-node" and entry[6] == "/usr/sbin/nologin"
    assert int(entry[2]) < 1000, "a system user"
    for unit in ("spinemed-node-receive.service", "spinemed-node-worker.service"):
        svc = _service(unit)
        assert svc["User"] == ["spinemed"] and svc["Group"] == ["spinemed"]
        assert svc["StateDirectory"] == ["spinemed-node"], "home and state folder are one"


def test_logrotate_moves_the_audit_trail_away_while_it_is_written_and_no_line_is_lost(tmp_path: Path) -> None:
    logrotate = require_tool("logrotate")
    audit_dir = tmp_path / "audit"
    audit = AuditTrail(audit_dir / "audit.jsonl", flush_interval_s=0.01)
    shipped = (UNITS / "spinemed-node.logrotate").read_text()
    assert "/var/lib/spinemed-node/audit/audit.jsonl {" in shipped and "copytruncate\n" not in shipped.replace(
        "nocopytruncate\n", "")
    conf = tmp_path / "logrotate.conf"
    # this test runs as root: logrotate's `su` switches to the service user, which does not exist here
    conf.write_text(shipped.replace("/var/lib/spinemed-node/audit/audit.jsonl", str(audit.path))
                    .replace("su spinemed spinemed", "su root root"))
    stop = threading.Event()
    written: list[int] = []

    def write() -> None:
        n = 0
        while not stop.is_set():
            audit.record("test_line", durable=n % 10 == 0, n=n)
            written.append(n)
            n += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(3):  # forced rotations with their dates differing by the epoch seconds in the name
            while not audit.path.exists():
                threading.Event().wait(0.01)
            run = subprocess.run([logrotate, "--force", "--state", str(tmp_path / "state"), str(conf)],
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, run.stderr
            threading.Event().wait(1.05)  # dateformat has one-second resolution
    finally:
        stop.set()
        writer.join()
        audit.close()
    files = sorted(audit_dir.iterdir())
    rotated = [p for p in files if p.name != "audit.jsonl"]
    assert len(rotated) == 3, [p.name for p in files]
    assert any(p.suffix == ".gz" for p in rotated), "older rotations are compressed (delaycompress)"
    seen: list[int] = []
    for p in files:
        text = gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()
        seen += [int(m) for m in re.findall(r'"n":(\d+)', text)]
    assert sorted(seen) == written, "every line once, across the rotated files and the new one"
    assert audit.path.stat().st_mode & 0o777 == 0o640


def test_the_receive_unit_command_with_its_environment_and_umask_leaves_nothing_world_readable(
        tmp_path: Path) -> None:
    svc = _service("spinemed-node-receive.service")
    env = {k: v for line in svc["Environment"] for k, _, v in (line.partition("="),)}
    assert env["SPINEMED_CONFIG"] == "/etc/spinemed-node/node.toml"
    (umask,) = svc["UMask"]
    data, port = tmp_path / "var-lib-spinemed-node", free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\nmin_free_disk_mb = 0\n'
                      f'[http]\nenabled = false\n')
    env.update(SPINEMED_CONFIG=str(config), PATH=os.environ["PATH"],
               SPINEMED_NODE__RECEIVE_SLOTS="16")  # 16 MiB of slots instead of 512
    (cmd,) = svc["ExecStart"]
    argv = [_exe(), *cmd.split()[1:]]
    log = (tmp_path / "receive.log").open("wb")
    proc = subprocess.Popen(["sh", "-c", f'umask {umask} && exec "$@"', "sh", *argv], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_port(port, 60)
        study = make_lumbar_mr(tmp_path / "mr", slices=2, size=32)
        sent = storescu(port, list(study.paths))
        assert sent.returncode == 0, sent.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        (stop_s,) = svc["TimeoutStopSec"]
        rc = proc.wait(timeout=float(stop_s))
        log.close()
    assert rc == 0, (tmp_path / "receive.log").read_text()[-3000:]
    spooled = list((data / "spool").glob("*/*.dcm"))
    assert len(spooled) == len(study.paths)
    exposed = [str(p.relative_to(data)) for p in [data, *data.rglob("*")] if p.stat().st_mode & 0o007]
    assert exposed == [], "no file or folder of the state directory is open to other users"
