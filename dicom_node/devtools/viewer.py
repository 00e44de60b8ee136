"""``spinemed-node viewer``: our per-level results in OHIF, on the images they describe.

One command starts, on this machine:

* **Orthanc** (temporary storage, or ``--storage``) with its DICOMweb plugin and our Python plugin
  (stable studies go to the node; results come back over STOW-RS);
* **the node** (``spinemed-node serve``, the tiny demo model) with a ``dicomweb`` destination back into
  that Orthanc;
* **nginx** on one port: OHIF v3 (the prebuilt ``dist/`` of ``@ohif/app``) plus ``/dicom-web`` and
  ``/wado`` proxied to Orthanc, so the browser sees one origin (Orthanc 1.10 sends no CORS headers).

``--demo`` also loads a synthetic lumbar MR into Orthanc and waits for its SR, so the first page opened
already shows our annotations.  OHIF comes from the npm registry only: the pinned tarball
(``viewer/package.json``: version and sha512) is fetched once with ``npm pack`` into a cache folder.
Ctrl-C (or SIGTERM) stops everything.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.devtools.demo import demo_node_toml
from dicom_node.errors import NodeError
from dicom_node.network.association import free_port

if TYPE_CHECKING:
    from dicom_node.devtools.phantoms import SyntheticStudy

__all__ = [
    "VIEWER_DIR",
    "OhifPin",
    "ViewerError",
    "ViewerStack",
    "ensure_ohif",
    "ohif_cache_dir",
    "ohif_pin",
    "render_nginx_conf",
    "run_viewer",
]

VIEWER_DIR = Path(__file__).resolve().parents[2] / "viewer"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")


class ViewerError(NodeError):
    """Something the viewer needs is missing or did not start; the message says what to do."""


# ---------------------------------------------------------------------------------------------- OHIF
@dataclass(frozen=True)
class OhifPin:
    """The OHIF build we serve: npm package, exact version and the tarball's sha512 (SRI form)."""

    package: str
    version: str
    integrity: str

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"


def ohif_pin(package_json: Path | None = None) -> OhifPin:
    """Read the pin from ``viewer/package.json`` (``"ohif": {package, version, integrity}``)."""
    path = package_json or VIEWER_DIR / "package.json"
    try:
        data = json.loads(path.read_text())
        section = data["ohif"]
        return OhifPin(str(section["package"]), str(section["version"]), str(section["integrity"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ViewerError(f"{path}: cannot read the OHIF pin (\"ohif\": package, version, integrity): {exc}") from exc


def ohif_cache_dir() -> Path:
    """Where OHIF builds are cached: ``$SPINEMED_OHIF_CACHE``, else ``$XDG_CACHE_HOME/spinemed-node/ohif``."""
    env = os.environ.get("SPINEMED_OHIF_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spinemed-node" / "ohif"


def _sri_sha512(path: Path) -> str:
    h = hashlib.sha512()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def ensure_ohif(cache: Path | None = None, *, pin: OhifPin | None = None, npm: str | None = None,
                timeout_s: float = 600.0) -> Path:
    """Return the ``dist/`` folder of the pinned OHIF build, fetching it on first use.

    The tarball comes from the npm registry through the ordinary client (``npm pack``, which honours the
    site's ``.npmrc``: registry mirror, proxy); its sha512 must equal the pin.  Only ``package/dist/`` is
    unpacked, into ``<cache>/<package>-<version>/dist``, atomically (a temporary sibling renamed).

    Raises
    ------
    ViewerError
        npm is missing, the registry cannot be reached, or the tarball does not match the pin.
    """
    pin = pin or ohif_pin()
    cache = (cache or ohif_cache_dir()).expanduser().resolve()
    final = cache / f"{pin.package.replace('/', '+')}-{pin.version}"
    dist = final / "dist"
    if (dist / "index.html").is_file() and (final / "INTEGRITY").is_file() \
            and (final / "INTEGRITY").read_text().strip() == pin.integrity:
        return dist
    npm = npm or shutil.which("npm")
    if npm is None:
        raise ViewerError(
            f"OHIF ({pin.spec}) is not in {cache} and npm is not installed: install Node.js and npm "
            "(apt-get install npm) so that it can be fetched from the npm registry"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as tmp_s:
        tmp = Path(tmp_s)
        try:
            res = subprocess.run(
                [npm, "pack", pin.spec, "--json", "--pack-destination", str(tmp)],
                capture_output=True, text=True, timeout=timeout_s, cwd=tmp,
                env={**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false",
                     "npm_config_audit": "false"},
            )
        except subprocess.TimeoutExpired as exc:
            raise ViewerError(f"`npm pack {pin.spec}` did not finish in {timeout_s:.0f} s "
                              "(npm registry unreachable?)") from exc
        tarballs = sorted(tmp.glob("*.tgz"))
        if res.returncode != 0 or not tarballs:
            tail = (res.stderr or res.stdout).strip()[-1500:]
            raise ViewerError(f"`npm pack {pin.spec}` failed (exit {res.returncode}); OHIF cannot be installed "
                              f"from the npm registry:\n{tail}")
        got = _sri_sha512(tarballs[0])
        if got != pin.integrity:
            raise ViewerError(f"{tarballs[0].name}: sha512 {got} does not match the pin {pin.integrity} "
                              "in viewer/package.json")
        staging = tmp / "unpacked"
        staging.mkdir()
        with tarfile.open(tarballs[0], "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            if not any(m.name == "package/dist/index.html" for m in members):
                raise ViewerError(f"{pin.spec} has no prebuilt dist/index.html: pin a version that ships dist/")
            tar.extractall(staging, members=members, filter="data")
        (staging / "package" / "INTEGRITY").write_text(pin.integrity + "\n")
        if final.exists():
            shutil.rmtree(final)
        (staging / "package").rename(final)
    return dist


# ---------------------------------------------------------------------------------------------- helpers
def default_model_dir() -> Path:
    """The demo model: ``$SPINEMED_DEMO_MODEL``, else ``.models/demo`` of this checkout (what scripts/setup builds)."""
    env = os.environ.get("SPINEMED_DEMO_MODEL")
    return Path(env) if env else VIEWER_DIR.parent / ".models" / "demo"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(what: str, check: Any, timeout: float, procs: list[tuple[str, subprocess.Popen[bytes], Path]]) -> Any:
    """Poll ``check()`` until truthy; fail early (with the log tail) if a process died."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        for name, proc, log in procs:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2500:] if log.exists() else ""
                raise ViewerError(f"{name} exited with {proc.returncode} while waiting for {what}; "
                                  f"log {log}:\n{tail}")
        if time.monotonic() > deadline:
            raise ViewerError(f"{what}: not reached in {timeout:.0f} s")
        time.sleep(0.2)


def render_nginx_conf(*, listen: str, ohif: Path, app_config: Path, orthanc_port: int, run: Path,
                      template: Path | None = None) -> str:
    """Fill ``viewer/nginx.conf.template``."""
    text = (template or VIEWER_DIR / "nginx.conf.template").read_text()
    user = ""
    if os.geteuid() == 0:
        # workers would drop to `nobody`, which cannot read a cache under /root
        user = f"user {pwd.getpwuid(0).pw_name};"
    values = {"USER": user, "RUN": str(run), "LISTEN": listen, "OHIF": str(ohif),
              "APP_CONFIG": str(app_config), "ORTHANC_PORT": str(orthanc_port)}
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


# ---------------------------------------------------------------------------------------------- the stack
@dataclass
class ViewerStack:
    """Orthanc + node + nginx/OHIF on one port; ``start()`` then ``stop()`` (also a context manager)."""

    workdir: Path
    port: int = 0
    host: str = "127.0.0.1"
    storage: Path | None = None
    model_dir: Path | None = None
    ohif_dist: Path | None = None
    stable_age: int = 2
    dicom_port: int = 0
    log: Any = None  # callable(str) for progress lines
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)
    orthanc_http: int = 0

    # ------------------------------------------------------------------ urls
    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{shown}:{self.port}/"

    def study_url(self, study_uid: str) -> str:
        return f"{self.url}viewer?StudyInstanceUIDs={urllib.parse.quote(study_uid)}"

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> ViewerStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for exe, pkg in ((ORTHANC, "orthanc"), (NGINX, "nginx")):
            if not Path(exe).is_file():
                raise ViewerError(f"{exe} not found: apt-get install {pkg}")
        for lib, pkg in (("libOrthancPython.so", "orthanc-python"), ("libOrthancDicomWeb.so", "orthanc-dicomweb")):
            if not (PLUGIN_DIR / lib).is_file():
                raise ViewerError(f"{PLUGIN_DIR / lib} missing: apt-get install {pkg}")
        self.workdir = self.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        run = self.workdir / "run"
        for sub in ("nginx-tmp/body", "nginx-tmp/proxy", "nginx-tmp/fastcgi", "nginx-tmp/uwsgi", "nginx-tmp/scgi"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start(run)
        except BaseException:
            self.stop()
            raise

    def _start(self, run: Path) -> None:
        from dicom_node.config import load_config
        from dicom_node.ops.orthanc_config import orthanc_config
        from inference.demo_model import build_demo_model

        dist = self.ohif_dist or ensure_ohif()
        self._say(f"OHIF: {dist}")
        model_dir = (self.model_dir or default_model_dir()).resolve()
        self._say("demo model (tiny, random: demo — not for clinical use) ...")
        build_demo_model(model_dir)

        self.orthanc_http = free_port()
        self.dicom_port = self.dicom_port or free_port()
        node_port = free_port()
        self.port = self.port or free_port()

        # the node first: it creates the job store that the plugin reads
        data_dir = self.workdir / "node"
        node_toml = self.workdir / "node.toml"
        destination = (
            '[[destinations]]\nname = "orthanc"\ntype = "dicomweb"\n'
            f'url = "http://127.0.0.1:{self.orthanc_http}/dicom-web"'
        )
        node_toml.write_text(demo_node_toml(data_dir, model_dir, node_port, destination, writer="viewer"))
        log = self.workdir / "node.log"
        with log.open("ab") as fh:
            node = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(node_toml)],
                                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(("spinemed-node serve", node, log))
        _wait("the node's listener", lambda: _port_open(node_port), 120, self.procs)

        # Orthanc with DICOMweb and our plugin
        storage = (self.storage or self.workdir / "orthanc-storage").resolve()
        storage.mkdir(parents=True, exist_ok=True)
        state_file = storage / "spinemed-plugin.sqlite3"
        first_start = not state_file.exists()
        cfg: dict[str, Any] = {
            "Name": "spinemed-viewer",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.orthanc_http,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StableAge": self.stable_age,
            "SaveJobs": True,
            "DicomScuTimeout": 30,
        }
        cfg.update(orthanc_config(load_config(node_toml), state_file=state_file, poll_seconds=1.0))
        cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                           "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
        orthanc_json = self.workdir / "orthanc.json"
        orthanc_json.write_text(json.dumps(cfg, indent=2))
        log = self.workdir / "orthanc.log"
        with log.open("ab") as fh:
            orthanc = subprocess.Popen([ORTHANC, "--verbose", str(orthanc_json)], stdout=fh,
                                       stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
        self.procs.append(("Orthanc", orthanc, log))
        _wait("Orthanc's REST API", lambda: self._orthanc_ok(), 60, self.procs)
        marker = "following Orthanc's change log" if first_start else "SpineMed plugin: node modality"
        _wait("the SpineMed plugin", lambda: marker in log.read_text(errors="replace"), 60, self.procs)

        # nginx: OHIF + DICOMweb on one origin
        app_config = run / "app-config.js"
        shutil.copyfile(VIEWER_DIR / "app-config.js", app_config)
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        conf = run / "nginx.conf"
        conf.write_text(render_nginx_conf(listen=listen, ohif=dist, app_config=app_config,
                                          orthanc_port=self.orthanc_http, run=run))
        log = run / "nginx-error.log"
        test = subprocess.run([NGINX, "-t", "-q", "-p", str(run), "-e", str(log), "-c", str(conf)],
                              capture_output=True, text=True)
        if test.returncode != 0:
            raise ViewerError(f"nginx refused its configuration {conf}:\n{test.stderr.strip()}")
        nginx = subprocess.Popen([NGINX, "-p", str(run), "-e", str(log), "-c", str(conf)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(("nginx", nginx, log))
        _wait("nginx", lambda: self._http_ok(f"{self.url}app-config.js"), 30, self.procs)

    def stop(self) -> None:
        """Stop nginx, Orthanc and the node (in that order); SIGKILL what does not stop in 30 s."""
        for _name, proc, _log in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc, _log in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()

    def alive(self) -> str | None:
        """The name of a process that exited, if any."""
        for name, proc, _log in self.procs:
            if proc.poll() is not None:
                return name
        return None

    # ------------------------------------------------------------------ Orthanc REST
    def orthanc(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.orthanc_http}{path}", data=body, method=method)
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return data.decode(errors="replace")

    def _orthanc_ok(self) -> bool:
        try:
            return bool(self.orthanc("GET", "/system"))
        except (OSError, urllib.error.URLError):
            return False

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return int(resp.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def upload(self, paths: list[Path]) -> str:
        """POST DICOM files to Orthanc; returns the Orthanc ID of their (one) study."""
        study_ids = set()
        for p in paths:
            reply = self.orthanc("POST", "/instances", p.read_bytes())
            study_ids.add(str(reply["ParentStudy"]))
        if len(study_ids) != 1:
            raise ViewerError(f"expected one study, got {len(study_ids)}")
        return study_ids.pop()

    def status(self, study_id: str) -> str | None:
        try:
            value = self.orthanc("GET", f"/studies/{study_id}/metadata/SpineMedStatus")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return None if value is None else str(value)

    def wait_result(self, study_id: str, timeout: float = 300.0) -> str:
        """Wait until the plugin marks the study done (or failed / skipped); returns the status."""
        final = {"spinemed-done", "spinemed-failed", "spinemed-skipped"}
        last: list[str | None] = [None]

        def check() -> str | None:
            st = self.status(study_id)
            if st != last[0]:
                self._say(f"study status: {st or '(not yet sent)'}")
                last[0] = st
            return st if st in final else None

        return str(_wait("the SpineMed result in Orthanc", check, timeout, self.procs))

    def load_demo(self, *, slices: int = 15, size: int = 256, timeout: float = 300.0) -> tuple[SyntheticStudy, str]:
        """Write a synthetic lumbar MR, load it into Orthanc, wait for its SR; returns (study, status)."""
        from dicom_node.devtools.phantoms import make_lumbar_mr

        study = make_lumbar_mr(self.workdir / "demo-study", slices=slices, size=size)
        paths = list(study.paths)
        self._say(f"loading a synthetic lumbar MR ({len(paths)} instances) into Orthanc ...")
        study_id = self.upload(paths)
        status = self.wait_result(study_id, timeout)
        return study, status


# ---------------------------------------------------------------------------------------------- command
def run_viewer(*, port: int = 8800, host: str = "127.0.0.1", demo: bool = False, storage: Path | None = None,
               workdir: Path | None = None, model_dir: Path | None = None) -> int:
    """``spinemed-node viewer``: start everything, print the URL, run until Ctrl-C / SIGTERM."""

    def say(msg: str) -> None:
        print(f"[viewer] {msg}", flush=True)

    temp = None
    if workdir is None:
        temp = tempfile.TemporaryDirectory(prefix="spinemed-viewer-")
        workdir = Path(temp.name)
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    # also when started with SIGINT ignored (a background job of a script): Ctrl-C / SIGTERM stop all
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    stack = ViewerStack(workdir=workdir, port=port, host=host, storage=storage, model_dir=model_dir, log=say)
    try:
        try:
            stack.start()
            say(f"Orthanc: DICOM port {stack.dicom_port} (AE ORTHANC), REST on 127.0.0.1:{stack.orthanc_http}; "
                f"logs in {stack.workdir}")
            say(f"OHIF: {stack.url}")
            if demo:
                study, status = stack.load_demo()
                say(f"demo study {status}: {stack.study_url(study.study_instance_uid)}")
                say("open our SR: double-click the \"SpineMed AI results\" SR thumbnail on the left "
                    "(demo model — not for clinical use: the findings are random)")
            say("Ctrl-C stops Orthanc, the node and nginx")
            while True:
                dead = stack.alive()
                if dead is not None:
                    say(f"{dead} exited; stopping")
                    return 1
                time.sleep(1.0)
        except KeyboardInterrupt:
            return 0
        except ViewerError as exc:
            say(str(exc))
            return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("stopping ...")
        stack.stop()
        if temp is not None:
            temp.cleanup()
