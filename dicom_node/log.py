"""Structured logging without PHI.

Log lines carry job ids and *hashed* identifiers (:func:`phi_hash`), never patient names, IDs or
UIDs in clear.  Configure once per process with :func:`configure_logging`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger", "phi_hash"]

_SALT = os.environ.get("SPINEMED_LOG_SALT", "spinemed-node").encode()


def phi_hash(value: str | None) -> str:
    """A short, stable, salted digest for correlating identifiers in logs."""
    if not value:
        return "-"
    return hashlib.sha256(_SALT + value.encode("utf-8", "replace")).hexdigest()[:12]


def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """Route stdlib logging (pynetdicom) and structlog to stderr, JSON when not a TTY."""
    if json is None:
        json = not sys.stderr.isatty()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    # pynetdicom logs dataset summaries (patient names) at DEBUG/INFO: keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom's validation warnings quote the offending value (a UID, a patient name): not in our logs.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
