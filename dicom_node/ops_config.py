"""Configuration tables for operations: ``[tls]``, ``[http]``, ``[audit]``, ``[retention]``, ``[store]``.

They live here (and are mounted on :class:`dicom_node.config.NodeConfig`) so the core configuration module
stays small.  This module also holds the rule that a configuration file holding secrets must not be
readable by every user (:func:`check_secret_file_mode`).
"""

from __future__ import annotations

import ipaddress
import re
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dicom_node.errors import ConfigError

__all__ = [
    "AuditConfig",
    "HttpConfig",
    "RetentionConfig",
    "StoreConfig",
    "TLSConfig",
    "check_networks",
    "check_secret_file_mode",
    "secret_keys",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Section):
    """``[tls]``: DICOM TLS on the listener (PS3.15 Annex B, BCP 195 ciphers from OpenSSL's defaults)."""

    enabled: bool = Field(default=False, description="the listener speaks TLS only")
    cert_file: Path | None = Field(default=None, description="our certificate chain (PEM)")
    key_file: Path | None = Field(default=None, description="its private key (PEM, not world-readable)")
    ca_file: Path | None = Field(default=None, description="CA bundle that signs client certificates")
    require_client_cert: bool = Field(default=False, description="refuse peers without a valid certificate")
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @model_validator(mode="after")
    def _complete(self) -> TLSConfig:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("cert_file, key_file: required when tls.enabled")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("ca_file: required when require_client_cert")
        return self


class HttpConfig(_Section):
    """``[http]``: health, metrics and the read-only jobs page, served by the receiving process."""

    enabled: bool = True
    host: str = Field(default="127.0.0.1", description="listen address; the page has no login of its own")
    port: int = Field(default=8080, ge=0, le=65535, description="0 = any free port")
    ready_cache_s: float = Field(default=5.0, ge=0, description="how long a readiness result is reused")
    heartbeat_max_age_s: float = Field(default=30.0, gt=0, description="worker heartbeat older = not ready")
    require_worker: bool = Field(default=True, description="readiness needs a live worker with its model")
    echo_destinations: bool = Field(default=True, description="readiness C-ECHOes every dicom destination")
    reports: bool = Field(default=True, description="serve rendered reports (they show patient demographics)")
    api_token_env: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable with the token that the reports and /api/v1 (the Orthanc plugin's "
                    "study status) require; unset: they answer loopback clients only")


class AuditConfig(_Section):
    """``[audit]``: the append-only audit trail (JSON lines)."""

    enabled: bool = True
    path: Path | None = Field(default=None, description="default: <data_dir>/audit/audit.jsonl")
    flush_interval_s: float = Field(default=0.2, gt=0, le=10, description="batch window of non-durable events")


class RetentionConfig(_Section):
    """``[retention]``: when the spool and result files of finished studies are deleted."""

    enabled: bool = True
    keep_spool_hours: float = Field(default=24.0, ge=0, description="after done/skipped; 0 = at once")
    keep_outputs_hours: float = Field(default=720.0, ge=0, description="result objects after done; 0 = at once")
    check_interval_s: float = Field(default=300.0, gt=0)


_PG_URL = re.compile(r"^postgres(ql)?://")


class StoreConfig(_Section):
    """``[store]``: the job store; SQLite in ``data_dir`` unless a PostgreSQL URL is given."""

    url: str | None = Field(default=None, description="postgresql://user@host:5432/db; unset = SQLite")
    password_env: str | None = Field(default=None, description="env var holding the database password")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not _PG_URL.match(v):
            raise ValueError("must be a postgresql:// URL (leave unset for SQLite in node.data_dir)")
        return v


def check_networks(v: list[str]) -> list[str]:
    """Validate CIDRs (``10.0.0.0/8``, ``192.168.1.20``, ``::1/128``); returns them normalised."""
    out = []
    for item in v:
        try:
            out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not an address or CIDR network: {exc}") from exc
    return out


_URL_PASSWORD = re.compile(r"^[a-z]+://[^/@:]*:[^/@]+@")


def secret_keys(raw: dict[str, Any]) -> list[str]:
    """The keys of a parsed TOML document that hold secrets or point at a private key."""
    found: list[str] = []
    tls = raw.get("tls")
    if isinstance(tls, dict) and tls.get("key_file"):
        found.append("tls.key_file")
    for i, dest in enumerate(raw.get("destinations") or []):
        if isinstance(dest, dict):
            if dest.get("tls_key_file"):
                found.append(f"destinations.{i}.tls_key_file")
            if dest.get("password"):
                found.append(f"destinations.{i}.password")
    store = raw.get("store")
    if isinstance(store, dict) and isinstance(store.get("url"), str) and _URL_PASSWORD.match(store["url"]):
        found.append("store.url (password in the URL)")
    return found


def check_secret_file_mode(path: Path, raw: dict[str, Any]) -> None:
    """Refuse a configuration file that holds secrets and is readable by every user.

    Raises
    ------
    ConfigError
        Naming the file, its mode and the keys that make it sensitive.
    """
    keys = secret_keys(raw)
    if not keys:
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & stat.S_IROTH:
        raise ConfigError(
            f"config file {path} holds secrets ({', '.join(keys)}) but is readable by every user "
            f"(mode {mode:04o}): run `chmod o-rwx {path}` (e.g. 0640, group spinemed)"
        )
