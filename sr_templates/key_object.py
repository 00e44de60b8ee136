"""IHE Key Image Note: a Key Object Selection document for the labelled key image.

The KO (TID 2010, built by :class:`highdicom.ko.KeyObjectSelectionDocument`) is titled "Of Interest"
(113000, DCM, CID 7010), names the algorithm as device observer, describes the selection in one line
per level shown, and references the key image and the source image it was rendered from, so a PACS or
viewer that lists key images (IHE KIN) shows both.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from sr_templates.text import text_value

__all__ = ["KEY_OBJECT_TITLE", "SpineKeyObjectSelection"]

#: Document title (CID 7010 "Key Object Selection Document Title").
KEY_OBJECT_TITLE = codes.DCM.OfInterest  # 113000


class SpineKeyObjectSelection(hd.ko.KeyObjectSelectionDocument):
    """Key Object Selection document referencing the SpineMed key image and its source image(s).

    Parameters
    ----------
    key_image
        The labelled key image (Secondary Capture) this note selects.
    sources
        The source images the key image was rendered from (same study).
    observer_context
        Device observer context of the algorithm (as in the SRs).
    description
        What the selection shows, e.g. ``"SpineMed AI key image: L4-L5 disc herniation, ..."``.
    series_instance_uid, series_number, sop_instance_uid, instance_number
        Identity of the document (its own series: one modality per series).
    manufacturer
        Manufacturer of the node.
    **kwargs
        Passed to :class:`highdicom.ko.KeyObjectSelectionDocument` (series description, content date
        and time, institution, contributing equipment).

    Raises
    ------
    TypeError
        An argument has the wrong type.
    ValueError
        ``sources`` is empty or belongs to another study than ``key_image``.
    """

    def __init__(
        self,
        key_image: pydicom.Dataset,
        sources: Sequence[pydicom.Dataset],
        observer_context: hd.sr.ObserverContext,
        description: str,
        series_instance_uid: str,
        series_number: int,
        sop_instance_uid: str,
        instance_number: int,
        manufacturer: str,
        **kwargs: object,
    ) -> None:
        if not isinstance(key_image, pydicom.Dataset):
            raise TypeError(f"key_image: expected a pydicom Dataset, got {type(key_image).__name__}")
        if isinstance(sources, pydicom.Dataset) or not isinstance(sources, Sequence):
            raise TypeError("sources: expected a sequence of pydicom Datasets")
        if not sources:
            raise ValueError("sources: the key image was rendered from at least one source image")
        for i, src in enumerate(sources):
            if not isinstance(src, pydicom.Dataset):
                raise TypeError(f"sources: item {i} is a {type(src).__name__}, not a pydicom Dataset")
            if src.StudyInstanceUID != key_image.StudyInstanceUID:
                raise ValueError(f"sources: item {i} belongs to another study than the key image")
        if not isinstance(observer_context, hd.sr.ObserverContext):
            raise TypeError(f"observer_context: expected ObserverContext, got {type(observer_context).__name__}")
        if not isinstance(description, str) or not description.strip():
            raise TypeError("description: expected a non-empty str")
        referenced = [key_image, *sources]
        content = hd.ko.KeyObjectSelection(
            document_title=KEY_OBJECT_TITLE,
            referenced_objects=referenced,
            observer_device_context=observer_context,
            description=text_value(description),
        )
        super().__init__(
            evidence=referenced,
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            **kwargs,  # type: ignore[arg-type]
        )
