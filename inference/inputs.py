"""What a model backend is given, and the one Protocol every backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from inference.findings import InputImage, ModelIdentity, SpineFindings

__all__ = ["ModelImage", "ModelInput", "SpineModel", "Task"]


class Task(StrEnum):
    """The level-aware tasks of SpineBench the prompts cover."""

    LEVEL_IDENTIFICATION = "level_identification"
    PATHOLOGY_ASSESSMENT = "pathology_assessment"
    STRUCTURED_REPORT = "structured_report"


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


@runtime_checkable
class SpineModel(Protocol):
    """A loaded model.  Load once per worker, then call :meth:`analyze` per study."""

    @property
    def identity(self) -> ModelIdentity: ...

    def analyze(self, inputs: ModelInput) -> SpineFindings:
        """Run the model on one study's images and return validated findings.

        Raises
        ------
        inference.errors.InferenceError
            The model failed, timed out or produced output that does not validate.
        """
        ...
