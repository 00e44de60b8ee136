"""``spinemed-node orthanc-config``: the Orthanc configuration that connects an Orthanc to this node.

The snippet (JSON, to merge into Orthanc's configuration, e.g. ``/etc/orthanc/spinemed.json``) holds:

* ``Plugins``: the Python plugin and the DICOMweb plugin;
* ``PythonScript``: ``orthanc_plugin/plugin.py`` of this install (the top-level key the Orthanc Python
  plugin reads — checked with the Debian package 4.0; there is no ``"Python": {"Path"}`` form there);
* ``DicomModalities``: the node as a modality (the plugin C-STOREs stable studies to it);
* ``UserMetadata``: the two study metadata the plugin writes (Orthanc < 1.12 has no labels);
* ``DicomWeb``: enabled, so the node can STOW-RS its results back;
* ``SpineMed``: the plugin's own section — the node's job store, the plugin's state file, the venv's
  ``site-packages``, the series number of our results (the loop guard).

It also proposes the ``[[destinations]]`` entry that sends the node's results back to this Orthanc.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig

__all__ = ["DEFAULT_PLUGIN_DIR", "METADATA_IDS", "node_destination_toml", "orthanc_config"]

DEFAULT_PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
#: User metadata the plugin writes (index values in Orthanc's 1024-65535 user range).
METADATA_IDS = {"SpineMedStatus": 4201, "SpineMedInfo": 4202}
_PLUGIN_SCRIPT = Path(__file__).resolve().parents[2] / "orthanc_plugin" / "plugin.py"


def orthanc_config(
    config: NodeConfig,
    *,
    node_host: str | None = None,
    modality_name: str = "spinemed",
    plugin_dir: Path = DEFAULT_PLUGIN_DIR,
    state_file: Path | None = None,
    poll_seconds: float = 2.0,
    node_url: str | None = None,
) -> dict[str, Any]:
    """Orthanc configuration keys for this node.

    Parameters
    ----------
    config
        The node's configuration (AE title, port, data directory, output series number).
    node_host
        Address Orthanc uses to reach the node's listener (default: ``node.host``, or ``127.0.0.1`` when
        the node listens on all interfaces).
    modality_name
        The node's key in Orthanc's ``DicomModalities``.
    plugin_dir
        Where the Orthanc plugins (``libOrthancPython.so``, ``libOrthancDicomWeb.so``) are installed.
    state_file
        The plugin's state (default: next to Orthanc's index, chosen by the plugin).
    poll_seconds
        How often the plugin looks at the change log and the node's jobs.
    node_url
        The node's HTTP root as Orthanc reaches it: the plugin then reads the node's status over its
        ``/api/v1`` (with ``NodeToken`` = ``${<[http] api_token_env>}``, which Orthanc takes from its own
        environment) instead of the job store file.  Default: the job store file, or for a PostgreSQL job
        store (no file to read) ``http://<node host>:<http.port>``.

    Returns
    -------
    dict
        JSON-serialisable keys to merge into Orthanc's configuration.
    """
    host = node_host or ("127.0.0.1" if config.node.host in ("0.0.0.0", "::", "") else config.node.host)
    if node_url is None and config.store.url:
        node_url = f"http://{host}:{config.http.port}"
    section: dict[str, Any] = {"NodeModality": modality_name}
    if node_url is not None:
        section["NodeUrl"] = node_url
        if config.http.api_token_env:
            section["NodeToken"] = "${" + config.http.api_token_env + "}"
    else:
        section["JobStore"] = str(config.db_path.resolve())
    section.update({
        "SitePackages": [sysconfig.get_paths()["purelib"]],
        "PollSeconds": poll_seconds,
        "OwnSeriesNumber": config.output.series_number,
    })
    if state_file is not None:
        section["StateFile"] = str(state_file)
    return {
        "Plugins": [str(plugin_dir / "libOrthancPython.so"), str(plugin_dir / "libOrthancDicomWeb.so")],
        "PythonScript": str(_PLUGIN_SCRIPT),
        "PythonVerbose": False,
        "DicomModalities": {
            modality_name: {"AET": config.node.ae_title, "Host": host, "Port": config.node.port or 11112},
        },
        "UserMetadata": dict(METADATA_IDS),
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "SpineMed": section,
    }


def node_destination_toml(
    *, name: str = "orthanc", url: str | None = None, ae_title: str = "ORTHANC", host: str = "127.0.0.1",
    port: int = 4242, username: str | None = None,
) -> str:
    """The ``[[destinations]]`` entry that returns results to Orthanc (STOW-RS when ``url`` is given)."""
    if url is not None:
        lines = [f'name = "{name}"', 'type = "dicomweb"', f'url = "{url}"']
        if username:
            lines += [f'username = "{username}"', 'password_env = "SPINEMED_ORTHANC_PASSWORD"']
    else:
        lines = [f'name = "{name}"', 'type = "dicom"', f'ae_title = "{ae_title}"', f'host = "{host}"',
                 f"port = {port}"]
    return "[[destinations]]\n" + "\n".join(lines) + "\n"
