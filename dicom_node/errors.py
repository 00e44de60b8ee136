"""The exception tree of the node."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ExportError",
    "JobNotFoundError",
    "NodeError",
    "PeerClosed",
    "ProtocolError",
    "SpoolError",
    "StoreError",
]


class NodeError(Exception):
    """Base class of the node's own errors."""


class ConfigError(NodeError, ValueError):
    """The configuration file or an override is invalid; the message names the key."""


class StoreError(NodeError):
    """The job store could not record or read a state change."""


class JobNotFoundError(StoreError, KeyError):
    """No job for that study or id."""


class SpoolError(NodeError, OSError):
    """A received instance could not be written durably."""


class ExportError(NodeError):
    """A destination refused or could not be reached."""


class ProtocolError(NodeError):
    """A peer broke the DICOM Upper Layer protocol; the association is aborted with ``reason``
    (an A-ABORT provider reason, PS3.8 9.3.8)."""

    def __init__(self, message: str, reason: int = 0x00) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosed(NodeError):
    """A peer closed the TCP connection."""
