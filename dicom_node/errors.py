"""The exception tree of the node.

Every error says whether trying again later can help: :attr:`NodeError.transient`.  The worker and the
export read that mark (:func:`is_transient`) — a transient failure (a destination or model server down, a
busy database, a full disk) is retried with the persisted backoff; a permanent one (bad input, a refusal
that will not change) fails the job with its reason at once.  Messages never carry patient identifiers
or UIDs: they end up in logs and in a job's reason.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfigError",
    "ConsultationError",
    "ConsultationLimitError",
    "ExportError",
    "InvalidInstanceError",
    "JobNotFoundError",
    "NodeError",
    "PeerClosed",
    "ProtocolError",
    "SpoolError",
    "StoreError",
    "is_transient",
]


class NodeError(Exception):
    """Base class of the node's own errors."""

    #: whether the same operation may succeed later without anyone changing anything
    transient: ClassVar[bool] = False


class ConfigError(NodeError, ValueError):
    """The configuration file or an override is invalid; the message names the key."""


class StoreError(NodeError):
    """The job store could not record or read a state change (unreachable, busy, broken connection)."""

    transient = True


class JobNotFoundError(StoreError, KeyError):
    """No job for that study or id."""

    transient = False


class ConsultationError(NodeError, ValueError):
    """A consultation question is refused: the study is not analysed, a limit is reached, no such
    consultation.  The message is shown to the person who asked (no identifiers in it)."""


class ConsultationLimitError(ConsultationError):
    """A consultation question is refused by the study's turn limit or token budget."""


class SpoolError(NodeError, OSError):
    """A received instance could not be written durably (disk full, I/O error): the sender retries."""

    transient = True


class InvalidInstanceError(NodeError, ValueError):
    """A received instance can never be stored as sent (an invalid UID, an undecodable data set)."""


class ExportError(NodeError):
    """A destination refused or could not be reached."""

    transient = True


class ProtocolError(NodeError):
    """A peer broke the DICOM Upper Layer protocol; the association is aborted with ``reason``
    (an A-ABORT provider reason, PS3.8 9.3.8)."""

    def __init__(self, message: str, reason: int = 0x00) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosed(NodeError):
    """A peer closed the TCP connection."""

    transient = True


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is marked transient (any package's tree: ``transient`` class attribute); unmarked
    exceptions — bugs, unexpected library errors — count as permanent."""
    return bool(getattr(exc, "transient", False))
