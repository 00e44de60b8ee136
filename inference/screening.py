"""Screening: which instances of a study can be shown to the model at all.

A sender may deliver an instance whose Pixel Data is shorter than its header says (a transfer cut off, a
modality's bug), or that has no Pixel Data, or no image geometry.  The model must never see garbage and
one bad instance must not fail a whole study: :func:`screen_study` drops such instances, each with a
reason, before any pixels are read, and the study goes on with the rest.

The check costs no pixel reading: :func:`inference.study.read_header` notes where Pixel Data starts and
the length its element declares (:class:`PixelExtent`), and the file's size says how much of it is there.
Compressed (encapsulated) pixel data is checked for presence only; a frame that does not decode is
reported by the stage that decodes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from inference.study import Instance, PixelExtent, Study, pixel_extent

__all__ = ["Exclusion", "Screened", "expected_pixel_bytes", "screen_study"]

#: Encapsulated Pixel Data: at least a Basic Offset Table item and one fragment item header.
_MIN_ENCAPSULATED = 16


@dataclass(frozen=True)
class Exclusion:
    """One instance left out of the analysis, and why (no patient data in ``reason``)."""

    sop_instance_uid: str
    series_instance_uid: str
    reason: str


@dataclass(frozen=True)
class Screened:
    """The study with only its usable instances (series left empty are dropped), and what was excluded."""

    study: Study
    excluded: tuple[Exclusion, ...]


def expected_pixel_bytes(ds: pydicom.Dataset) -> int | None:
    """Bytes of native (uncompressed) Pixel Data the header describes; ``None`` without image geometry."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if min(rows, cols, bits, samples, frames) < 1:
        return None
    if bits == 1:
        return (rows * cols * samples * frames + 7) // 8
    return rows * cols * samples * frames * ((bits + 7) // 8)


def _problem(ds: pydicom.Dataset, extent: PixelExtent | None) -> str | None:
    if extent is None:
        return "no pixel data"
    expected = expected_pixel_bytes(ds)
    if expected is None:
        return "no image geometry (Rows, Columns, Bits Allocated)"
    if extent.encapsulated:
        if extent.file_size - extent.offset < _MIN_ENCAPSULATED:
            return "compressed pixel data has no frames"
        return None
    declared = extent.declared_length or 0
    if declared < expected:
        return f"pixel data truncated: {declared} of {expected} bytes declared"
    ts = str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or "")
    if ts == DeflatedExplicitVRLittleEndian:
        return None  # offsets are in the inflated stream: pydicom checks when it reads
    element_header = 8 if ts == ImplicitVRLittleEndian else 12
    present = extent.file_size - extent.offset - element_header
    if present < expected:
        return f"pixel data truncated: {max(present, 0)} of {expected} bytes in the file"
    return None


def screen_study(study: Study) -> Screened:
    """Drop the instances whose pixel data cannot be what their header says.

    Instances of non-image SOP classes (no Rows in the header: SR, presentation states) are kept as they
    are; the series selection decides about them.
    """
    excluded: list[Exclusion] = []
    series = []
    for s in study.series:
        keep: list[Instance] = []
        for inst in s.instances:
            ds = study.header(inst)
            if "Rows" not in ds and "PixelData" not in ds and pixel_extent(ds) is None:
                keep.append(inst)  # not an image
                continue
            why = _problem(ds, pixel_extent(ds))
            if why is None:
                keep.append(inst)
            else:
                excluded.append(Exclusion(inst.sop_instance_uid, s.series_instance_uid, why))
        if keep:
            series.append(s if len(keep) == len(s.instances) else replace(s, instances=tuple(keep)))
    if not excluded:
        return Screened(study, ())
    return Screened(replace(study, series=tuple(series)), tuple(excluded))
