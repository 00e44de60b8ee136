"""The script Orthanc's Python plugin loads (``"PythonScript"`` in Orthanc's configuration).

Thin by design: standard library and this package only — no torch, no model, no pydicom — so Orthanc's
process stays small and its single GIL is never held for long.  What it does:

* puts this package (and the node's virtualenv ``site-packages``, when configured) on ``sys.path``;
* reads the ``"SpineMed"`` section of Orthanc's configuration (:mod:`orthanc_plugin.settings`);
* registers one ``OnChange`` callback: ``STABLE_STUDY`` only wakes the bridge thread, ``ORTHANC_STARTED``
  starts it and ``ORTHANC_STOPPED`` stops it.  The callback logs and returns; it never raises into Orthanc.

Everything else happens on the bridge thread (:mod:`orthanc_plugin.bridge`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the stub orthanc_plugin/orthanc.pyi; the real module exists only inside Orthanc
    from orthanc_plugin import orthanc
else:
    import orthanc

_HERE = Path(__file__).resolve().parent


def _extend_path() -> None:
    """Make ``orthanc_plugin`` importable, plus the node's venv when configured.

    ``SPINEMED_SITE_PACKAGES`` (``os.pathsep``-separated) and ``SpineMed.SitePackages`` both work; the
    folder holding this package comes first so a checkout and an installed copy never mix.
    """
    extra: list[str] = [str(_HERE.parent)]
    extra += [p for p in os.environ.get("SPINEMED_SITE_PACKAGES", "").split(os.pathsep) if p]
    try:
        section = json.loads(orthanc.GetConfiguration()).get("SpineMed", {})
        configured = section.get("SitePackages", []) if isinstance(section, dict) else []
        extra += [p for p in configured if isinstance(p, str)]
    except ValueError as exc:
        orthanc.LogError(f"SpineMed: cannot read Orthanc's configuration: {exc}")
    for p in reversed(extra):
        if p not in sys.path:
            sys.path.insert(0, p)


_extend_path()

from orthanc_plugin.bridge import Bridge, RestError  # noqa: E402 - needs the path set up above
from orthanc_plugin.nodestore import NodeApi, NodeJobStore, NodeView  # noqa: E402
from orthanc_plugin.outbox import Outbox  # noqa: E402
from orthanc_plugin.settings import PluginSettings, SettingsError  # noqa: E402


class _OrthancRest:
    """Orthanc's REST API, in process (no HTTP, no credentials)."""

    @staticmethod
    def _error(uri: str, exc: Exception) -> RestError:
        # the plugin raises OrthancException(code, description); 17 = OrthancPluginErrorCode_UnknownResource
        code = exc.args[0] if exc.args else None
        return RestError(f"{uri}: {exc}", not_found=code == 17)

    def get(self, uri: str) -> Any:
        try:
            return json.loads(orthanc.RestApiGet(uri))
        except orthanc.OrthancException as exc:
            raise self._error(uri, exc) from exc

    def post(self, uri: str, body: Any) -> Any:
        try:
            reply = orthanc.RestApiPost(uri, json.dumps(body))
        except orthanc.OrthancException as exc:
            raise self._error(uri, exc) from exc
        return json.loads(reply) if reply else None

    def put(self, uri: str, body: str) -> None:
        try:
            orthanc.RestApiPut(uri, body)
        except orthanc.OrthancException as exc:
            raise self._error(uri, exc) from exc

    def delete(self, uri: str) -> None:
        try:
            orthanc.RestApiDelete(uri)
        except orthanc.OrthancException as exc:
            raise self._error(uri, exc) from exc


class _OrthancLog:
    def info(self, message: str) -> None:
        orthanc.LogInfo(message)

    def warning(self, message: str) -> None:
        orthanc.LogWarning(message)

    def error(self, message: str) -> None:
        orthanc.LogError(message)


def _make_bridge() -> Bridge | None:
    try:
        settings = PluginSettings.from_orthanc(json.loads(orthanc.GetConfiguration()))
    except (SettingsError, ValueError) as exc:
        orthanc.LogError(f"SpineMed plugin disabled: {exc}")
        return None
    node: NodeView
    if settings.node_url is not None:
        node = NodeApi(settings.node_url, settings.node_token)
    else:
        assert settings.job_store is not None  # the settings give one of the two
        node = NodeJobStore(settings.job_store)
    orthanc.LogWarning(
        f"SpineMed plugin: node modality {settings.node_modality!r}, status from {node!r}, "
        f"state {settings.state_file}"
    )
    return Bridge(_OrthancRest(), settings, Outbox(settings.state_file), node, _OrthancLog())


_BRIDGE = _make_bridge()


def on_change(change_type: int, level: int, resource_id: str) -> None:
    """Orthanc's change callback: wake, start or stop the bridge; never raise, never block."""
    try:
        if _BRIDGE is None:
            return
        if change_type == orthanc.ChangeType.STABLE_STUDY:
            _BRIDGE.notify()
        elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
            _BRIDGE.start()
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            _BRIDGE.stop()
    except Exception as exc:
        orthanc.LogError(f"SpineMed: change callback failed: {type(exc).__name__}: {exc}")


orthanc.RegisterOnChangeCallback(on_change)
