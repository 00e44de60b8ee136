"""Intensity: windows and the mapping of modality values to the model's 8-bit grey levels.

* :func:`voi_window` — the instance's first VOI window (Window Center / Width), when it does not saturate
  nearly everything;
* :func:`percentile_window` — else the 0.5–99.5 percentiles of the image;
* :data:`BONE_WINDOW` — CT reformats use the bone window (WL 500 / WW 2000 HU);
* :func:`to_uint8` — a window applied (optionally inverted, for MONOCHROME1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

__all__ = ["AIR_HU", "BONE_WINDOW", "FloatImage", "percentile_window", "to_uint8", "voi_window"]


#: CT bone window (level, width) in HU.
BONE_WINDOW: Final = (500.0, 2000.0)


AIR_HU: Final = -1024.0


_PERCENTILES: Final = (0.5, 99.5)


FloatImage = npt.NDArray[np.float32]


# ------------------------------------------------------------------------------------ windowing
def percentile_window(pixels: FloatImage) -> tuple[float, float]:
    lo, hi = (float(v) for v in np.percentile(pixels, _PERCENTILES))
    if hi <= lo:
        lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def voi_window(ds: Dataset, pixels: FloatImage) -> tuple[float, float] | None:
    """The first VOI window (linear, after the modality LUT) if it is usable for these pixels."""
    centres, widths = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centres is None or widths is None:
        return None
    try:
        centre = float(centres[0] if isinstance(centres, Sequence) and not isinstance(centres, str) else centres)
        width = float(widths[0] if isinstance(widths, Sequence) and not isinstance(widths, str) else widths)
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(centre) and math.isfinite(width)) or width < 1:
        return None
    lo, hi = centre - width / 2, centre + width / 2
    inside = float(np.mean((pixels > lo) & (pixels < hi)))
    return (lo, hi) if inside >= 0.05 else None  # a window that saturates nearly everything is no use


def to_uint8(pixels: FloatImage, lo: float, hi: float, *, invert: bool = False) -> npt.NDArray[np.uint8]:
    scaled = (pixels - lo) * (255.0 / (hi - lo))
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    result: npt.NDArray[np.uint8] = np.subtract(255, out, dtype=np.uint8) if invert else out
    return result
