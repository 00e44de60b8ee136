"""Model backends: each implements :class:`inference.inputs.SpineModel`.

* ``transformers`` — a Qwen2.5-VL-class checkpoint in this process (GPU or CPU), llguidance-constrained;
* ``demo`` — the tiny random model of the same architecture, built locally, same code path;
* ``openai`` — any OpenAI-compatible chat-completions server (vLLM, ``transformers serve``).

With ``[model] process = true`` the ``transformers`` and ``demo`` backends run in a child process of their own
(:class:`inference.backends.process.ModelProcess`), out of reach of the worker's other threads' GIL.

Backends are imported lazily so that a node using ``openai`` does not import torch.
"""

from __future__ import annotations

from pathlib import Path

from inference.backends.loading import load_in_process
from inference.inputs import SpineModel
from inference.settings import ModelSettings

__all__ = ["load_in_process", "load_model"]


def load_model(settings: ModelSettings, *, data_dir: Path) -> SpineModel:
    """Load the configured model once; call :meth:`SpineModel.analyze` per study afterwards.

    Parameters
    ----------
    settings
        The ``[model]`` table.
    data_dir
        The node's data directory: the demo model is built under ``<data_dir>/models/demo`` unless
        ``settings.path`` says otherwise, and caches live under ``<data_dir>/cache``.

    Returns
    -------
    SpineModel
        A loaded backend (a :class:`~inference.backends.process.ModelProcess` with ``settings.process``:
        call its ``close()`` at shutdown).

    Raises
    ------
    BackendUnavailableError
        The model could not be loaded (or, for ``openai``, the settings are unusable).
    """
    data_dir = Path(data_dir)
    if settings.process and settings.backend != "openai":
        from inference.backends.process import ModelProcess

        return ModelProcess(settings, data_dir=data_dir)
    return load_in_process(settings, data_dir=data_dir)
