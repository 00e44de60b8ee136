"""The exception tree of the inference package."""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "InferenceError",
    "InferenceTimeoutError",
    "InvalidModelOutputError",
    "UnusableStudyError",
]


class InferenceError(RuntimeError):
    """Base class: the study could not be analysed.  The message is the job's failure reason."""


class UnusableStudyError(InferenceError):
    """The study holds no series the model can use (wrong plane, no pixels, undecodable)."""


class BackendUnavailableError(InferenceError):
    """The model could not be loaded or the server could not be reached."""


class InferenceTimeoutError(InferenceError):
    """The model did not answer in time."""


class InvalidModelOutputError(InferenceError):
    """The model's output did not parse or did not validate against the schema."""
