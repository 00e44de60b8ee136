"""``make_study``: one generator by its kind's name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from dicom_node.devtools.phantoms.common import SyntheticStudy
from dicom_node.devtools.phantoms.ct import make_spine_ct
from dicom_node.devtools.phantoms.mr import make_lumbar_mr
from dicom_node.devtools.phantoms.radiograph import make_chest_radiograph, make_scoliosis_radiograph

__all__ = ['make_study']

_GENERATORS: Final[dict[str, Callable[..., SyntheticStudy]]] = {
    "mr": make_lumbar_mr,
    "ct": make_spine_ct,
    "xr": make_scoliosis_radiograph,
    "chest": make_chest_radiograph,
}


def make_study(kind: str, out_dir: Path, **kwargs: Any) -> SyntheticStudy:
    """Dispatch to the generator for ``kind``.

    Parameters
    ----------
    kind : str
        ``"mr"``, ``"ct"``, ``"xr"`` or ``"chest"``.
    out_dir : Path
        Output directory.
    **kwargs : Any
        Keyword arguments for the generator.

    Returns
    -------
    SyntheticStudy
        The written study.

    Raises
    ------
    ValueError
        For an unknown ``kind``.
    """
    try:
        generator = _GENERATORS[kind]
    except KeyError:
        raise ValueError(
            f"unknown synthetic study kind {kind!r}; expected one of {sorted(_GENERATORS)}"
        ) from None
    return generator(Path(out_dir), **kwargs)
