"""The plugin's settings: the ``"SpineMed"`` section of Orthanc's own configuration.

``spinemed-node orthanc-config`` prints a complete section for the install; every key is optional
except one of ``JobStore`` (the node on this host, SQLite job store) and ``NodeUrl`` (the node's HTTP API:
another host, or a PostgreSQL job store).  Standard library only: this runs inside Orthanc's interpreter.

Example::

    "SpineMed" : {
      "NodeModality" : "spinemed",                       // key in "DicomModalities"
      "JobStore" : "/var/lib/spinemed-node/jobs.sqlite3", // the node's job store, opened read-only
      // or, instead of JobStore:
      // "NodeUrl" : "https://gpu-node:8080", "NodeToken" : "${SPINEMED_API_TOKEN}",
      "StateFile" : "/var/lib/orthanc/spinemed-plugin.sqlite3",
      "SitePackages" : ["/opt/spinemed-node/.venv/lib/python3.11/site-packages"],
      "PollSeconds" : 2,
      "MaxAttempts" : 10,
      "OwnSeriesNumber" : 9901,
      "Modalities" : ["MR", "CT", "CR", "DX"]
    }
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthanc_plugin.guard import OwnMarkers, StudyFilter

__all__ = ["INFO_METADATA", "SECTION", "STATUS_METADATA", "PluginSettings", "SettingsError"]

#: The configuration section the plugin reads.
SECTION = "SpineMed"
#: Study metadata (Orthanc < 1.12 has no labels): ``spinemed-queued``/``-done``/``-failed``/``-skipped``.
STATUS_METADATA = "SpineMedStatus"
#: Study metadata: JSON with revision, reason and the time of the last status change.
INFO_METADATA = "SpineMedInfo"


class SettingsError(ValueError):
    """The ``SpineMed`` section is unusable (the message names the key)."""


@dataclass(frozen=True)
class PluginSettings:
    """Validated plugin settings."""

    job_store: Path | None
    state_file: Path
    node_url: str | None = None
    node_token: str | None = None
    node_modality: str = "spinemed"
    poll_seconds: float = 2.0
    stable_age_s: float = 60.0
    max_attempts: int = 10
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 300.0
    markers: OwnMarkers = field(default_factory=OwnMarkers)
    study_filter: StudyFilter = field(default_factory=StudyFilter)
    site_packages: tuple[str, ...] = ()

    @classmethod
    def from_orthanc(cls, config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> PluginSettings:
        """Build settings from Orthanc's configuration (``orthanc.GetConfiguration()`` parsed).

        Parameters
        ----------
        config
            The whole Orthanc configuration.
        env
            Environment (default ``os.environ``): ``SPINEMED_JOB_STORE`` overrides ``JobStore``.
            (Orthanc itself replaces ``${VAR}`` in its configuration: the way to keep ``NodeToken`` out
            of the file.)

        Raises
        ------
        SettingsError
            A key has a wrong type or value, or the node's modality is not declared.
        """
        env = os.environ if env is None else env
        raw = config.get(SECTION, {})
        if not isinstance(raw, Mapping):
            raise SettingsError(f"{SECTION}: must be a JSON object")

        def num(key: str, default: float, low: float) -> float:
            value = raw.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
                raise SettingsError(f"{SECTION}.{key}: must be a number >= {low}")
            return float(value)

        def text_list(key: str, default: frozenset[str] | tuple[str, ...]) -> tuple[str, ...]:
            value = raw.get(key)
            if value is None:
                return tuple(default)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SettingsError(f"{SECTION}.{key}: must be a list of strings")
            return tuple(value)

        job_store = env.get("SPINEMED_JOB_STORE") or raw.get("JobStore")
        node_url, node_token = raw.get("NodeUrl"), raw.get("NodeToken")
        if node_url is not None:
            if job_store:
                raise SettingsError(f"{SECTION}.NodeUrl: give either JobStore or NodeUrl, not both")
            if not isinstance(node_url, str) or not node_url.startswith(("http://", "https://")):
                raise SettingsError(f"{SECTION}.NodeUrl: must be the node's http(s) URL")
            if node_token is not None and (not isinstance(node_token, str) or node_token.startswith("${")):
                # Orthanc left "${VAR}" as it was: the variable is not set in Orthanc's environment
                raise SettingsError(f"{SECTION}.NodeToken: must be a string (is its environment variable set?)")
        elif not isinstance(job_store, str) or not job_store:
            raise SettingsError(f"{SECTION}.JobStore: the node's jobs.sqlite3 path (or NodeUrl) is required")
        elif node_token is not None:
            raise SettingsError(f"{SECTION}.NodeToken: only with NodeUrl")
        modality = raw.get("NodeModality", "spinemed")
        modalities = config.get("DicomModalities", {})
        if not isinstance(modality, str) or not isinstance(modalities, Mapping) or modality not in modalities:
            raise SettingsError(f"{SECTION}.NodeModality: {modality!r} is not a key of DicomModalities")
        state = raw.get("StateFile")
        if state is None:
            base = config.get("IndexDirectory") or config.get("StorageDirectory") or "OrthancStorage"
            state = str(Path(str(base)) / "spinemed-plugin.sqlite3")
        if not isinstance(state, str):
            raise SettingsError(f"{SECTION}.StateFile: must be a path")
        series_number = raw.get("OwnSeriesNumber", 9901)
        if series_number is not None and (
            isinstance(series_number, bool) or not isinstance(series_number, int)
        ):
            raise SettingsError(f"{SECTION}.OwnSeriesNumber: must be an integer or null")
        default_filter = StudyFilter()
        pattern = raw.get("DescriptionPattern", default_filter.description_pattern)
        if not isinstance(pattern, str):
            raise SettingsError(f"{SECTION}.DescriptionPattern: must be a regex string")
        try:
            study_filter = StudyFilter(
                modalities=frozenset(m.upper() for m in text_list("Modalities", default_filter.modalities)),
                body_parts=frozenset(b.upper() for b in text_list("BodyParts", default_filter.body_parts)),
                description_pattern=pattern,
            )
        except Exception as exc:
            raise SettingsError(f"{SECTION}.DescriptionPattern: {exc}") from exc
        stable = config.get("StableAge", 60)
        return cls(
            job_store=Path(job_store) if isinstance(job_store, str) and job_store else None,
            node_url=node_url,
            node_token=node_token or None,
            state_file=Path(state),
            node_modality=modality,
            poll_seconds=num("PollSeconds", 2.0, 0.1),
            stable_age_s=float(stable) if isinstance(stable, int | float) else 60.0,
            max_attempts=int(num("MaxAttempts", 10, 1)),
            backoff_initial_s=num("BackoffInitialSeconds", 5.0, 0.0),
            backoff_max_s=num("BackoffMaxSeconds", 300.0, 0.0),
            markers=OwnMarkers(series_number=series_number),
            study_filter=study_filter,
            site_packages=text_list("SitePackages", ()),
        )
