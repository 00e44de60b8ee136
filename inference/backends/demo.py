"""The ``demo`` backend: the tiny random Qwen2.5-VL, run through exactly the transformers code path.

It exists so that a node without weights (a laptop, CI, a site trial) exercises the whole pipeline —
processor, chat template, vision tower, constrained decoding, parsing, SR writing — with answers that
are random but always schema-valid.  Every identity it reports says **demo — not for clinical use**.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from inference.backends.transformers_backend import TransformersBackend
from inference.demo_model import DEMO_MODEL_NAME, DEMO_NOTICE, build_demo_model
from inference.schema import SchemaLimits
from inference.settings import ModelSettings

__all__ = ["DEMO_LIMITS", "DemoBackend", "demo_model_dir"]

#: Answer limits for the random model: its strings run to maxLength, a byte-level vocabulary spends about
#: one token per character, and greedy decoding would repeat digits forever in an unbounded JSON number;
#: with these every answer is a few hundred tokens (seconds on CPU) and always ends.
DEMO_LIMITS: Final = SchemaLimits(max_levels=3, max_text=40, max_measurements=1, max_evidence=1, integer_numbers=True)


def demo_model_dir(settings: ModelSettings, data_dir: Path) -> Path:
    """Where the demo model lives: ``settings.path``, else ``<data_dir>/models/demo``."""
    return Path(settings.path) if settings.path is not None else Path(data_dir) / "models" / "demo"


class DemoBackend(TransformersBackend):
    """The demo model (built on first use) behind the unchanged :class:`TransformersBackend`.

    Parameters
    ----------
    settings
        The ``[model]`` table; ``path`` is where the demo model is (or will be) built.
    data_dir
        The node's data directory (default model location and digest cache).
    limits
        Answer size limits (default :data:`DEMO_LIMITS`).
    """

    backend_name = "demo"

    def __init__(self, settings: ModelSettings, *, data_dir: Path, limits: SchemaLimits | None = None) -> None:
        path = build_demo_model(demo_model_dir(settings, data_dir))
        super().__init__(
            settings.model_copy(update={"path": path, "hub_id": None}),
            cache_dir=Path(data_dir) / "cache",
            limits=limits or DEMO_LIMITS,
            name=f"{DEMO_MODEL_NAME} ({DEMO_NOTICE})",
            demo=True,
            num_threads=1,  # hidden size 64: threads only add overhead (≈7x slower with 2 on 2 cores)
        )
