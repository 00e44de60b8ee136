"""What a model backend is given, and the one Protocol every backend implements."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from inference.findings import InputImage, ModelIdentity, SpineFindings

__all__ = ["ConsultAnswer", "ImageSizePolicy", "ModelImage", "ModelInput", "SpineModel", "Task", "Turn"]


class Task(StrEnum):
    """The level-aware tasks of SpineBench the prompts cover."""

    LEVEL_IDENTIFICATION = "level_identification"
    PATHOLOGY_ASSESSMENT = "pathology_assessment"
    STRUCTURED_REPORT = "structured_report"


@dataclass(frozen=True)
class ImageSizePolicy:
    """The image sizes a model takes unchanged, as its backend declares them (:attr:`SpineModel.image_size`).

    Preprocessing resizes every image with :meth:`fit` and records the pixel → source transform of that
    size; a model whose processor resized it again would see every coordinate misplaced, so a backend
    that can check (``transformers``) does.

    Parameters
    ----------
    multiple
        Both sides are multiples of it (Qwen2.5-VL: 14 px patches merged 2×2 = 28).
    longest
        The longest side aimed at (rounded down to a multiple).
    min_pixels, max_pixels
        The pixel count the model's processor keeps (outside it, the processor rescales).
    """

    multiple: int
    longest: int
    min_pixels: int = 0
    max_pixels: int = 2**31

    def __post_init__(self) -> None:
        if self.multiple < 1:
            raise ValueError(f"multiple: must be 1 or more, got {self.multiple}")
        if self.longest < 2 * self.multiple:
            raise ValueError(f"longest: {self.longest} is under two multiples of {self.multiple}")
        if not 0 <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"min_pixels, max_pixels: need 0 <= {self.min_pixels} <= {self.max_pixels}")
        if self.max_pixels < self.multiple**2:
            raise ValueError(f"max_pixels: {self.max_pixels} is under one {self.multiple}x{self.multiple} patch")

    def fit(self, rows: int, columns: int) -> tuple[int, int]:
        """The model image size (rows, columns) for a source of ``rows`` x ``columns``: longest side
        :attr:`longest`, aspect ratio kept as closely as the grid allows, then brought within the pixel
        limits as Qwen2.5-VL's ``smart_resize`` would (so its processor leaves it unchanged)."""
        m = self.multiple
        longest = max(2 * m, self.longest - self.longest % m)
        scale = longest / max(rows, columns)
        out_rows = min(longest, max(m, round(rows * scale / m) * m))
        out_cols = min(longest, max(m, round(columns * scale / m) * m))
        if out_rows * out_cols > self.max_pixels:
            beta = math.sqrt(out_rows * out_cols / self.max_pixels)
            out_rows = max(m, math.floor(out_rows / beta / m) * m)
            out_cols = max(m, math.floor(out_cols / beta / m) * m)
            while out_rows * out_cols > self.max_pixels:  # one side held at its minimum: trim the other
                if out_rows >= out_cols:
                    out_rows -= m
                else:
                    out_cols -= m
        elif out_rows * out_cols < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (out_rows * out_cols))
            out_rows = math.ceil(out_rows * beta / m) * m
            out_cols = math.ceil(out_cols * beta / m) * m
        return out_rows, out_cols


@dataclass(frozen=True)
class ModelImage:
    """One image for the model: 8-bit pixels (rows × columns, or rows × columns × 3) and its source."""

    pixels: npt.NDArray[np.uint8]
    ref: InputImage

    def __post_init__(self) -> None:
        if not isinstance(self.pixels, np.ndarray) or self.pixels.dtype != np.uint8:
            raise TypeError("pixels: expected a numpy uint8 array")
        if self.pixels.ndim not in (2, 3) or self.pixels.shape[:2] != (self.ref.rows, self.ref.columns):
            raise ValueError(
                f"pixels: shape {self.pixels.shape} does not match ref rows×columns {self.ref.rows}×{self.ref.columns}"
            )


@dataclass(frozen=True)
class ModelInput:
    """All images of one study for one request, with the task to perform."""

    study_instance_uid: str
    modality: str
    task: Task
    images: tuple[ModelImage, ...]
    clinical_context: str = ""

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("images: a model input needs at least one image")
        for i, img in enumerate(self.images):
            if img.ref.index != i:
                raise ValueError(f"images: image {i} has ref.index {img.ref.index}")


@dataclass(frozen=True)
class Turn:
    """One answered question of a consultation: what was asked and what the model answered."""

    question: str
    answer: str


@dataclass(frozen=True)
class ConsultAnswer:
    """The model's answer to one consultation question.

    Attributes
    ----------
    text
        The answer as generated (the same text :meth:`SpineModel.consult` streamed to ``on_text``).
    prompt_tokens, completion_tokens
        Tokens the request carried (images, findings, prior turns, question) and tokens generated.
    truncated
        The answer stopped at its token limit, not at its natural end.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    truncated: bool = False


@runtime_checkable
class SpineModel(Protocol):
    """A loaded model.  Load once per worker, then call :meth:`analyze` per study."""

    @property
    def identity(self) -> ModelIdentity: ...

    @property
    def image_size(self) -> ImageSizePolicy:
        """The image sizes this model takes unchanged: preprocessing sizes every image with it."""
        ...

    def analyze(self, inputs: ModelInput) -> SpineFindings:
        """Run the model on one study's images and return validated findings.

        Raises
        ------
        inference.errors.InferenceError
            The model failed, timed out or produced output that does not validate.
        """
        ...

    def consult(
        self,
        inputs: ModelInput,
        findings: SpineFindings,
        history: Sequence[Turn],
        question: str,
        on_text: Callable[[str], None],
        *,
        max_new_tokens: int,
    ) -> ConsultAnswer:
        """Answer a follow-up question about one analysed study, as a multi-turn conversation.

        The conversation is :func:`inference.prompts.build_consult_messages`: the study's images, its
        findings as JSON, the prior ``history`` and ``question``.  Generation is free text (not
        schema-constrained); each new piece of text is passed to ``on_text`` as it is generated.

        Raises
        ------
        inference.errors.InferenceError
            The model failed or timed out (:class:`~inference.errors.InferenceTimeoutError`).
        """
        ...
