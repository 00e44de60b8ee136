"""Qwen2.5-VL's image-size contract, owned by the backends that serve it.

Its vision encoder cuts an image into 14 px patches and merges them 2 x 2, so it sees 28 x 28 px per
visual token; its processor (``smart_resize``) rescales any image whose sides are not multiples of 28, or
whose pixel count is outside ``[min_pixels, max_pixels]``.  Preprocessing sizes every image with the
backend's :class:`~inference.inputs.ImageSizePolicy` and records where each model pixel came from; a
processor that resized it again would misplace every coordinate of the answer.  So the ``transformers``
backend reads the limits from its processor and :func:`check_unchanged` verifies, image by image, that the
processor kept the size it was given.  A remote server's processor cannot be seen: the ``openai`` backend
assumes Qwen2.5-VL's published defaults (configure the server with them, or larger limits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from inference.errors import InferenceError
from inference.inputs import ImageSizePolicy
from inference.settings import ModelSettings

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "MERGE_SIZE",
    "PATCH_SIZE",
    "check_unchanged",
    "policy_for",
    "processor_policy",
]

#: The vision encoder's patch side, and how many patches are merged per side into one visual token.
PATCH_SIZE: Final = 14
MERGE_SIZE: Final = 2
#: Qwen2.5-VL's ``preprocessor_config.json`` defaults (Qwen/Qwen2.5-VL-7B-Instruct).
DEFAULT_MIN_PIXELS: Final = 56 * 56
DEFAULT_MAX_PIXELS: Final = 28 * 28 * 16384


def policy_for(
    settings: ModelSettings,
    *,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageSizePolicy:
    """The sizes a Qwen2.5-VL processor with these limits keeps, longest side ``settings.image_size``."""
    return ImageSizePolicy(multiple=patch_size * merge_size, longest=settings.image_size, min_pixels=min_pixels,
                           max_pixels=max_pixels)


def processor_policy(processor: Any, settings: ModelSettings) -> ImageSizePolicy:
    """:func:`policy_for` with the patch size, merge size and pixel limits a loaded processor uses."""
    ip = processor.image_processor
    size = getattr(ip, "size", None)

    def limit(attr: str, key: str, default: int) -> int:
        value = getattr(ip, attr, None)
        if value is None and size is not None:
            value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return int(value) if value else default

    return policy_for(
        settings,
        patch_size=int(getattr(ip, "patch_size", None) or PATCH_SIZE),
        merge_size=int(getattr(ip, "merge_size", None) or MERGE_SIZE),
        min_pixels=limit("min_pixels", "shortest_edge", DEFAULT_MIN_PIXELS),
        max_pixels=limit("max_pixels", "longest_edge", DEFAULT_MAX_PIXELS),
    )


def check_unchanged(sizes: Sequence[tuple[int, int]], grid_thw: Sequence[Sequence[int]], patch_size: int) -> None:
    """Raise unless the processor kept every image at the size it was given.

    Parameters
    ----------
    sizes
        ``(rows, columns)`` of each image handed to the processor.
    grid_thw
        The processor's ``image_grid_thw``: per image, (temporal, rows, columns) in patches.
    patch_size
        The processor's patch side in px.

    Raises
    ------
    InferenceError
        A count or size differs (permanent: the same configuration resizes the same way again).
    """
    if len(grid_thw) != len(sizes):
        raise InferenceError(f"model processor returned {len(grid_thw)} image grids for {len(sizes)} images")
    for i, ((rows, cols), grid) in enumerate(zip(sizes, grid_thw, strict=True)):
        seen = (int(grid[1]) * patch_size, int(grid[2]) * patch_size)
        if seen != (rows, cols):
            raise InferenceError(
                f"model processor resized image {i} from {rows}x{cols} to {seen[0]}x{seen[1]} px: its pixel "
                "limits (min_pixels / max_pixels) or patch size differ from the size policy, so every "
                "coordinate would be misplaced; align the processor configuration with [model] image_size"
            )
