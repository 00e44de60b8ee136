"""Loading a backend in this process (:func:`load_in_process`): what :func:`inference.backends.load_model` does
without ``[model] process``, and what a model process's child does.  Backends are imported lazily so that a
node using ``openai`` does not import torch."""

from __future__ import annotations

from pathlib import Path

from inference.errors import BackendUnavailableError
from inference.inputs import SpineModel
from inference.settings import ModelSettings

__all__ = ["load_in_process"]


def load_in_process(settings: ModelSettings, *, data_dir: Path) -> SpineModel:
    """The configured backend, loaded in this process whatever ``settings.process`` says.

    Parameters
    ----------
    settings
        The ``[model]`` table.
    data_dir
        The node's data directory (demo model location, caches).

    Raises
    ------
    BackendUnavailableError
        The model could not be loaded (or, for ``openai``, the settings are unusable).
    """
    data_dir = Path(data_dir)
    if settings.backend == "demo":
        from inference.backends.demo import DemoBackend

        return DemoBackend(settings, data_dir=data_dir)
    if settings.backend == "transformers":
        from inference.backends.transformers_backend import TransformersBackend

        return TransformersBackend(settings, cache_dir=data_dir / "cache")
    if settings.backend == "openai":
        from inference.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(settings, cache_dir=data_dir / "cache")
    raise BackendUnavailableError(f"model: unknown backend {settings.backend!r}")  # pragma: no cover
