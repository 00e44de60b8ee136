"""DICOM TLS (PS3.15 Annex B): SSL contexts for the listener and for exports.

* The listener: ``[tls] enabled = true`` makes ``node.port`` speak TLS only, with our certificate
  (``cert_file``/``key_file``); ``ca_file`` verifies client certificates, which ``require_client_cert``
  makes mandatory (mutual TLS), else optional.
* Exports: a destination with ``tls = true`` is reached over TLS, verified against ``tls_ca_file`` (or the
  system's CAs) and the name ``tls_server_name`` (default: its host), with our client certificate when
  ``tls_cert_file``/``tls_key_file`` are given.

TLS 1.2 is the minimum (BCP 195); OpenSSL's default cipher list applies.  A private key file readable by
every user is refused, like a configuration file holding secrets.
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from dicom_node.config import DestinationConfig
from dicom_node.errors import ConfigError
from dicom_node.ops_config import TLSConfig

__all__ = ["client_context", "client_tls_args", "server_context"]

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _check_key_file(path: Path, key: str) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc
    if mode & stat.S_IROTH:
        raise ConfigError(
            f"{key}: private key {path} is readable by every user (mode {mode:04o}): run `chmod o-rwx {path}`"
        )


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, what: str) -> None:
    _check_key_file(key, f"{what} key")
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: cannot load certificate {cert} / key {key}: {exc}") from exc


def _load_ca(ctx: ssl.SSLContext, ca: Path, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: cannot load CA bundle {ca}: {exc}") from exc


def server_context(cfg: TLSConfig) -> ssl.SSLContext:
    """The listener's context: our certificate, optional or required client certificates.

    Raises
    ------
    ConfigError
        A file is missing or unreadable, a key is world-readable, or the certificate does not match the key.
    """
    if cfg.cert_file is None or cfg.key_file is None:
        raise ConfigError("tls.cert_file, tls.key_file: required when tls.enabled")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    _load_chain(ctx, cfg.cert_file, cfg.key_file, "tls.cert_file")
    if cfg.ca_file is not None:
        _load_ca(ctx, cfg.ca_file, "tls.ca_file")
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(dest: DestinationConfig) -> ssl.SSLContext:
    """The context for associations to ``dest``: server verified, our certificate if configured.

    Raises
    ------
    ConfigError
        A file is missing or unreadable, or a key is world-readable.
    """
    what = f"destinations.{dest.name}"
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.tls_ca_file is not None:
        _load_ca(ctx, dest.tls_ca_file, f"{what}.tls_ca_file")
    if dest.tls_cert_file is not None:
        if dest.tls_key_file is None:
            raise ConfigError(f"{what}.tls_key_file: required with tls_cert_file")
        _load_chain(ctx, dest.tls_cert_file, dest.tls_key_file, f"{what}.tls_cert_file")
    return ctx


def client_tls_args(dest: DestinationConfig) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for :meth:`pynetdicom.ae.ApplicationEntity.associate`, or ``None`` for plain TCP."""
    if not dest.tls:
        return None
    return client_context(dest), dest.tls_server_name or dest.host or ""
