"""Real Orthanc processes for the Orthanc tests (free ports, temporary storage and configuration).

Also imported by ``test_orthanc_plugin.py`` and ``test_stow.py``; its own tests check that the generated
configuration loads the plugin into a real Orthanc.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_port

from dicom_node.config import load_config
from dicom_node.ops.orthanc_config import orthanc_config

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")

pytestmark = pytest.mark.orthanc


def require_orthanc(*plugins: str) -> None:
    if not Path(ORTHANC).is_file():
        pytest.fail("Orthanc not installed: apt-get install orthanc orthanc-python orthanc-dicomweb")
    for name in plugins:
        if not (PLUGIN_DIR / name).is_file():
            pytest.fail(f"{PLUGIN_DIR / name} missing: apt-get install orthanc-python orthanc-dicomweb")


@dataclass
class OrthancServer:
    """One Orthanc process; ``restart`` keeps its storage and configuration."""

    config_path: Path
    http_port: int
    dicom_port: int
    log_path: Path
    auth: tuple[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 20.0) -> None:
        with self.log_path.open("ab") as fh:
            self.proc = subprocess.Popen([ORTHANC, "--verbose", str(self.config_path)], stdout=fh,
                                         stderr=subprocess.STDOUT, cwd=self.config_path.parent)
        deadline = time.monotonic() + timeout
        wait_port(self.http_port, timeout)
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                wait_port(self.dicom_port, 5)
                return
            except (OSError, urllib.error.URLError):
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"Orthanc did not start:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: bytes | None = None, *, raw: bool = False) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if self.auth is not None:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = resp.read()
        if raw:
            return data.decode(errors="replace")
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return data.decode(errors="replace")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def metadata(self, study_id: str, name: str) -> str | None:
        try:
            value = self.request("GET", f"/studies/{study_id}/metadata/{name}", raw=True)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return None if value is None else str(value)

    def study_id(self, study_uid: str) -> str | None:
        found = self.request("POST", "/tools/lookup", study_uid.encode())
        for hit in found or []:
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def instances(self, study_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/studies/{study_id}/instances"))


def base_config(tmp: Path, *, http_port: int, dicom_port: int, stable_age: int = 1) -> dict[str, Any]:
    storage = tmp / "orthanc-db"
    storage.mkdir(parents=True, exist_ok=True)
    return {
        "Name": "spinemed-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StableAge": stable_age,
        "SaveJobs": True,
        "DicomScuTimeout": 10,
        "Plugins": [],
    }


def start_orthanc(tmp: Path, extra: dict[str, Any], *, name: str = "orthanc", stable_age: int = 1,
                  auth: tuple[str, str] | None = None) -> OrthancServer:
    """Write ``<tmp>/<name>.json`` (base settings + ``extra``) and start Orthanc on free ports."""
    http_port = int(extra.get("HttpPort") or free_port())
    dicom_port = int(extra.get("DicomPort") or free_port())
    cfg = base_config(tmp / name, http_port=http_port, dicom_port=dicom_port, stable_age=stable_age)
    cfg.update(extra)
    path = tmp / name / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=2))
    server = OrthancServer(path, http_port, dicom_port, tmp / name / f"{name}.log", auth=auth)
    try:
        server.start()
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server


# ---------------------------------------------------------------------------------------------- tests
def test_generated_config_loads_the_plugin(tmp_path: Path) -> None:
    require_orthanc("libOrthancPython.so", "libOrthancDicomWeb.so")
    data = tmp_path / "node"
    cfg = load_config(node={"data_dir": data, "port": 11999})
    snippet = orthanc_config(cfg, state_file=tmp_path / "state.sqlite3")
    assert Path(snippet["PythonScript"]).is_file()
    assert snippet["DicomModalities"]["spinemed"] == {"AET": "SPINEMED", "Host": "127.0.0.1", "Port": 11999}
    # a job store must exist for the plugin to read; the node creates it (here: an empty one)
    from dicom_node.jobs.sqlite import SQLiteJobStore

    SQLiteJobStore(cfg.db_path).close()
    server = start_orthanc(tmp_path, snippet)
    try:
        plugins = server.get("/plugins")
        assert "python" in plugins and "dicom-web" in plugins
        deadline = time.monotonic() + 10
        while "following Orthanc's change log" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = server.log()
        assert "SpineMed plugin: node modality 'spinemed'" in log
        assert "following Orthanc's change log from sequence 0" in log
        assert (tmp_path / "state.sqlite3").is_file()
    finally:
        server.stop()


def test_bad_section_disables_the_plugin_and_orthanc_still_runs(tmp_path: Path) -> None:
    require_orthanc("libOrthancPython.so")
    cfg = load_config(node={"data_dir": tmp_path / "node"})
    snippet = orthanc_config(cfg, plugin_dir=PLUGIN_DIR)
    snippet["Plugins"] = [str(PLUGIN_DIR / "libOrthancPython.so")]
    snippet["SpineMed"]["NodeModality"] = "not-declared"
    server = start_orthanc(tmp_path, snippet)
    try:
        assert server.get("/system")["Version"]
        assert "SpineMed plugin disabled: SpineMed.NodeModality: 'not-declared' is not a key" in server.log()
    finally:
        server.stop(signal.SIGKILL)


def test_snippet_has_no_secrets_and_points_at_this_venv(tmp_path: Path) -> None:
    import sysconfig

    cfg = load_config(node={"data_dir": tmp_path, "host": "10.1.2.3", "port": 104},
                      output={"series_number": 77})
    snippet = orthanc_config(cfg)
    assert snippet["DicomModalities"]["spinemed"]["Host"] == "10.1.2.3"
    assert snippet["SpineMed"]["OwnSeriesNumber"] == 77
    assert snippet["SpineMed"]["SitePackages"] == [sysconfig.get_paths()["purelib"]]
    assert snippet["SpineMed"]["JobStore"] == str((tmp_path / "jobs.sqlite3").resolve())
    assert "password" not in json.dumps(snippet).lower()
    assert os.path.basename(snippet["PythonScript"]) == "plugin.py"


def test_snippet_for_a_node_on_another_host_names_its_url_and_the_tokens_variable(tmp_path: Path) -> None:
    cfg = load_config(node={"data_dir": tmp_path}, http={"api_token_env": "SPINEMED_API_TOKEN"})
    section = orthanc_config(cfg, node_url="https://gpu-node:8443")["SpineMed"]
    assert section["NodeUrl"] == "https://gpu-node:8443" and "JobStore" not in section
    assert section["NodeToken"] == "${SPINEMED_API_TOKEN}", "Orthanc fills it from its environment"
    plain = orthanc_config(load_config(node={"data_dir": tmp_path}), node_url="http://127.0.0.1:8080")["SpineMed"]
    assert "NodeToken" not in plain, "no token configured: a loopback node answers without one"
