"""Logging: one pipeline for every logger, identifiers redacted, a per-install key for their digest.

* **One pipeline.** structlog's loggers and the standard library's (pynetdicom, alembic, httpx, openai,
  transformers) go through the same processors and the same renderer: JSON lines when stderr is not a TTY
  (systemd, files), readable lines on a terminal.
* **Redaction.** Every string in a log event — the message, every field, the formatted traceback — passes
  :func:`redact`: a DICOM UID (five or more numeric components, except the standard's own ``1.2.840.10008.``
  UIDs: SOP classes, transfer syntaxes) becomes ``uid:<digest>``; a person name in DICOM form
  (``Family^Given``) becomes ``<name>``.  Code still logs identifiers only as :func:`phi_hash` digests;
  redaction catches what a library or an exception message carries.
* **A keyed digest.** :func:`phi_hash` is an HMAC-SHA-256 under a per-install secret:
  ``<data_dir>/secrets/phi-hash.key`` (32 random bytes, made at first start, mode 0600 in a 0700 folder;
  :func:`use_phi_key`).  Without the key a digest cannot be tested against a guessed UID or patient ID.
  Every process of one install (receiver, worker, CLI) reads the same file, so digests correlate across
  the logs, the audit trail and the jobs page.  Before a key is set (library use) a random per-process
  key is used.  Back the file up with the data folder: digests in old logs match only under it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import threading
import warnings
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import structlog

from dicom_node.errors import ConfigError

__all__ = ["KEY_FILE", "configure_logging", "get_logger", "phi_hash", "redact", "use_phi_key"]

#: The per-install key, relative to ``data_dir``.
KEY_FILE = Path("secrets") / "phi-hash.key"
_KEY_BYTES = 32

_key_lock = threading.Lock()
_key: bytes = secrets.token_bytes(_KEY_BYTES)
_key_path: Path | None = None


def phi_hash(value: str | None) -> str:
    """A short, stable digest of an identifier (HMAC-SHA-256 under the install's key, 12 hex digits)."""
    if not value:
        return "-"
    return hmac.new(_key, value.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:12]


def use_phi_key(data_dir: Path) -> Path:
    """Load the install's digest key from ``data_dir``, making it first if there is none; returns its path.

    Creation is atomic (a temporary file linked into place), so processes starting together agree.

    Raises
    ------
    ConfigError
        The key file is readable by others than its owner, or is not a key.
    OSError
        The folder cannot be created or the file read.
    """
    global _key, _key_path
    path = Path(data_dir) / KEY_FILE
    with _key_lock:
        if _key_path == path:
            return path
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_bytes(_KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # fails if another process made it first: theirs is used
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"{path}: the identifier digest key must be readable by its owner only "
                              f"(mode {mode:04o}; chmod 600)")
        key = path.read_bytes()
        if len(key) != _KEY_BYTES:
            raise ConfigError(f"{path}: not a digest key ({len(key)} bytes, expected {_KEY_BYTES})")
        _key, _key_path = key, path
        return path


# ---------------------------------------------------------------------------------------------- redaction
_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){4,}(?![\w.])")
_STANDARD_UID = "1.2.840.10008."
_PERSON_NAME = re.compile(r"(?<![\w^])[^\W\d_][\w'.-]*(?:\^[\w'.-]*)+")


def _uid(match: re.Match[str]) -> str:
    value = match.group(0)
    return value if value.startswith(_STANDARD_UID) else f"uid:{phi_hash(value)}"


def redact(text: str) -> str:
    """``text`` with DICOM UIDs replaced by their digest and ``Family^Given`` names by ``<name>``."""
    if "^" in text:
        text = _PERSON_NAME.sub("<name>", text)
    return _UID.sub(_uid, text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _redact_value(v) for k, v in value.items()}
    return value


_KEEP = frozenset({"timestamp", "level", "logger"})


def _redact_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if key not in _KEEP:
            event_dict[key] = _redact_value(value)
    return event_dict


# ---------------------------------------------------------------------------------------------- set-up
def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """Route structlog and the standard library's logging through one pipeline to stderr (JSON when not a
    TTY), with :func:`redact` applied to every event."""
    if json is None:
        json = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # pynetdicom logs dataset summaries (patient names) at DEBUG/INFO: keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom's validation warnings quote the offending value (a UID, a patient name): not in our logs.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    for chatty in ("httpx", "httpcore", "urllib3", "alembic.runtime.migration", "PIL", "filelock"):
        logging.getLogger(chatty).setLevel(max(numeric, logging.WARNING))
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    logging.captureWarnings(True)  # other libraries' warnings go through the same pipeline


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
