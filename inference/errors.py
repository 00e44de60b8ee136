"""The exception tree of the inference package.

Every error says whether trying again later can help (:attr:`InferenceError.transient`, read by
:func:`dicom_node.errors.is_transient`): a model server that is down, restarting, overloaded or out of GPU
memory, or an answer that came too late, is *transient* — the worker defers the study with the persisted
backoff and tries again; a study the model cannot use or an answer that never validates is *permanent* —
the job fails at once with the message as its reason.  Messages never carry patient identifiers or UIDs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = [
    "BackendUnavailableError",
    "InferenceError",
    "InferenceTimeoutError",
    "InvalidModelOutputError",
    "UnusableStudyError",
]


class InferenceError(RuntimeError):
    """Base class: the study could not be analysed.  The message is the job's failure reason."""

    #: whether the same study may be analysed later without anyone changing anything
    transient: ClassVar[bool] = False


class UnusableStudyError(InferenceError):
    """The study holds no series the model can use (wrong plane, no pixels, undecodable).

    ``excluded`` lists the instances screening left out (:class:`inference.screening.Exclusion`), when
    that is why.
    """

    def __init__(self, message: str, *, excluded: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.excluded = tuple(excluded)


class BackendUnavailableError(InferenceError):
    """The model could not be loaded, the server could not be reached or answered 5xx/429, or the GPU ran
    out of memory: the study is not at fault, it waits for the model."""

    transient = True


class InferenceTimeoutError(InferenceError):
    """The model did not answer in time (a busy or restarting server): tried again later."""

    transient = True


class InvalidModelOutputError(InferenceError):
    """The model's output did not parse or did not validate against the schema, after the retries the
    backend allows."""
