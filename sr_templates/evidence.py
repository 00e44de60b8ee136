"""Resolve model evidence (input image index + model-pixel point) to source DICOM references.

An :class:`~inference.findings.Evidence` names an input image by index and optionally a point in
that image's pixels.  :class:`SourceIndex` turns it into what an SR can reference: the source SOP
instance(s) and frame, and where the point lies on the source (a 2D SCOORD in source-image pixels
through ``pixel_to_source``, or a 3D SCOORD in the frame of reference through
``pixel_to_patient``).  Nothing is ever guessed: if the point cannot be mapped, the result says why
and carries no coordinate.

Pixel coordinate convention: model-image points and the affine's output are continuous image
coordinates with (0, 0) at the top-left corner of the top-left pixel, which is also the DICOM SCOORD
convention (PS3.3 C.18.6.1.2), so a mapped point is written as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from inference.findings import Evidence, InputImage, SpineFindings
from inference.study import Instance, Study

__all__ = [
    "ResolvedEvidence",
    "SourceIndex",
    "map_to_patient",
    "map_to_source",
    "patient_and_study",
    "requested_procedures",
]


@dataclass(frozen=True)
class ResolvedEvidence:
    """One evidence item resolved to source references.

    Attributes
    ----------
    image_index
        Index of the model input image.
    sop_class_uid
        SOP Class UID of the source instance(s).
    sop_instance_uids
        Source instance(s): one for an image cut from one frame, several for a reformat.
    frame_number
        Source frame (1-based) for multi-frame sources, else ``None``.
    point
        Source-image pixel coordinate (column, row) for a single-source image, else ``None``.
    point_3d
        Patient coordinate (x, y, z) in mm (LPS) for a reformat, else ``None``.
    frame_of_reference_uid
        Frame of reference of ``point_3d``.
    note
        Why a point given by the model is not localised, else ``None``.
    """

    image_index: int
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    frame_number: int | None
    point: tuple[float, float] | None = None
    point_3d: tuple[float, float, float] | None = None
    frame_of_reference_uid: str | None = None
    note: str | None = None

    @property
    def localised(self) -> bool:
        """True where the evidence carries a coordinate."""
        return self.point is not None or self.point_3d is not None


def map_to_source(image: InputImage, x: float, y: float) -> tuple[float, float]:
    """Map a model-image point to source pixels with ``image.pixel_to_source``.

    Raises
    ------
    ValueError
        ``image`` has no ``pixel_to_source``.
    """
    if image.pixel_to_source is None:
        raise ValueError(f"image: input image {image.index} has no pixel_to_source")
    a, b, c, d, e, f = image.pixel_to_source
    return (a * x + b * y + c, d * x + e * y + f)


def map_to_patient(image: InputImage, x: float, y: float) -> tuple[float, float, float]:
    """Map a model-image point to patient LPS mm with ``image.pixel_to_patient``.

    ``pixel_to_patient`` is either 3x3 row-major (applied to (x, y, 1)) or 3x4 row-major (applied to
    (x, y, 0, 1), the in-plane part of a volume affine).

    Raises
    ------
    ValueError
        ``image`` has no ``pixel_to_patient``, or it has neither 9 nor 12 values.
    """
    m = image.pixel_to_patient
    if m is None:
        raise ValueError(f"image: input image {image.index} has no pixel_to_patient")
    if len(m) == 9:
        mat = np.asarray(m, dtype=float).reshape(3, 3)
        vec = np.array([x, y, 1.0])
    elif len(m) == 12:
        mat = np.asarray(m, dtype=float).reshape(3, 4)
        vec = np.array([x, y, 0.0, 1.0])
    else:
        raise ValueError(f"image: pixel_to_patient of input image {image.index} has {len(m)} values, not 9 or 12")
    out = mat @ vec
    return (float(out[0]), float(out[1]), float(out[2]))


class SourceIndex:
    """The source instances of a study, by SOP Instance UID, with headers read on demand.

    Parameters
    ----------
    study
        The source study (file paths of its instances).
    findings
        The findings whose input images are resolved.

    Raises
    ------
    ValueError
        An input image references an instance that is not in ``study``, or belongs to another study.
    """

    def __init__(self, study: Study, findings: SpineFindings) -> None:
        self._study = study
        self._findings = findings
        self._instances: dict[str, Instance] = {i.sop_instance_uid: i for i in study.instances}
        self._paths: dict[str, Path] = {uid: i.path for uid, i in self._instances.items()}
        self._headers: dict[str, pydicom.Dataset] = {}
        for image in findings.images:
            for uid in image.sop_instance_uids:
                if uid not in self._paths:
                    raise ValueError(
                        f"findings: input image {image.index} references SOP instance {uid} that is not in the study"
                    )

    def header(self, sop_instance_uid: str) -> pydicom.Dataset:
        """Header (no pixel data) of one source instance (the one the study was loaded with)."""
        ds = self._headers.get(sop_instance_uid)
        if ds is None:
            ds = self._study.header(self._instances[sop_instance_uid])
            self._headers[sop_instance_uid] = ds
        return ds

    def dataset(self, sop_instance_uid: str) -> pydicom.Dataset:
        """Full dataset (with pixel data) of one source instance."""
        return pydicom.dcmread(self._paths[sop_instance_uid])

    def image(self, index: int) -> InputImage:
        """The input image with this index."""
        for image in self._findings.images:
            if image.index == index:
                return image
        return self._findings.images[index]

    def resolve(self, evidence: Evidence) -> ResolvedEvidence:
        """Resolve one evidence item (see :class:`ResolvedEvidence`)."""
        image = self.image(evidence.image)
        base = ResolvedEvidence(
            image_index=image.index,
            sop_class_uid=image.sop_class_uid,
            sop_instance_uids=tuple(image.sop_instance_uids),
            frame_number=image.frame_number if image.single_source else None,
        )
        if evidence.x is None or evidence.y is None:
            return base
        x, y = float(evidence.x), float(evidence.y)
        if not (0.0 <= x <= image.columns and 0.0 <= y <= image.rows):
            return _with(base, note=f"point ({x:g}, {y:g}) lies outside input image {image.index}")
        if image.single_source and image.pixel_to_source is not None:
            col, row = map_to_source(image, x, y)
            hdr = self.header(image.sop_instance_uids[0])
            columns, rows = int(hdr.get("Columns", 0)), int(hdr.get("Rows", 0))
            if not (0.0 <= col <= columns and 0.0 <= row <= rows):
                return _with(base, note=f"point maps to ({col:g}, {row:g}), outside the source image")
            return _with(base, point=(col, row))
        if image.pixel_to_patient is not None:
            for_uid = self.header(image.sop_instance_uids[0]).get("FrameOfReferenceUID")
            if not for_uid:
                return _with(base, note="the source has no frame of reference for a 3D coordinate")
            point_3d = map_to_patient(image, x, y)
            # the reformat is derived from every slice, but the point lies on one: reference that one
            nearest = self.nearest_instance(image.sop_instance_uids, point_3d)
            return _with(
                base,
                sop_instance_uids=(nearest,) if nearest else base.sop_instance_uids,
                point_3d=point_3d,
                frame_of_reference_uid=str(for_uid),
            )
        return _with(base, note=f"input image {image.index} has no pixel mapping to its source")

    def nearest_instance(self, sop_instance_uids: Sequence[str], point: tuple[float, float, float]) -> str | None:
        """The instance whose image plane passes closest to ``point`` (LPS mm), if within its slice.

        Uses the study's geometry (Image Position / Orientation, no file reads).  ``None`` when the
        instances lack geometry or the point lies farther than half the slice spacing (at least 1 mm)
        from every plane.
        """
        wanted = set(sop_instance_uids)
        planes: list[tuple[float, str]] = []
        for series in self._study.series:
            iop = series.image_orientation
            for inst in series.instances:
                if inst.sop_instance_uid not in wanted:
                    continue
                if iop is None or inst.image_position is None:
                    return None
                r, c = iop[:3], iop[3:]
                n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
                offset = sum((point[i] - inst.image_position[i]) * n[i] for i in range(3))
                planes.append((offset, inst.sop_instance_uid))
        if not planes:
            return None
        offsets = sorted(d for d, _ in planes)
        gaps = sorted(b - a for a, b in pairwise(offsets) if b - a > 1e-6)
        half = max(0.5 * gaps[len(gaps) // 2], 1.0) if gaps else 1.0
        distance, uid = min((abs(d), u) for d, u in planes)
        return uid if distance <= half else None


def _with(base: ResolvedEvidence, **changes: object) -> ResolvedEvidence:
    from dataclasses import replace

    return replace(base, **changes)  # type: ignore[arg-type]


def patient_and_study(source: pydicom.Dataset) -> dict[str, Any]:
    """The patient and study attributes of a new object in ``source``'s study, as highdicom's
    :class:`~highdicom.base.SOPClass` takes them (key image, PDF)."""
    return {
        "study_instance_uid": str(source.StudyInstanceUID),
        "patient_id": source.get("PatientID"),
        "patient_name": source.get("PatientName"),
        "patient_birth_date": source.get("PatientBirthDate"),
        "patient_sex": source.get("PatientSex") or None,
        "accession_number": source.get("AccessionNumber"),
        "study_id": source.get("StudyID"),
        "study_date": source.get("StudyDate"),
        "study_time": source.get("StudyTime"),
        "referring_physician_name": source.get("ReferringPhysicianName"),
    }


_ORDER_KEYWORDS = (
    "AccessionNumber",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
)


def requested_procedures(source: pydicom.Dataset) -> list[pydicom.Dataset] | None:
    """The orders ``source``'s study fulfils, as items of an SR's Referenced Request Sequence (0040,A370).

    One item per Request Attributes Sequence (0040,0275) item of ``source`` (the modality's copy of the
    worklist entry: accession number, requested procedure ID and description; placer and filler order
    numbers where the modality copied them, which images carry only as non-standard attributes but the
    Referenced Request Sequence holds by definition), else one from ``source``'s own accession number and
    order numbers; ``None`` when it names no order at all.  The RIS finds its order by these in our SRs and
    in the HL7 message built from them.
    """
    requests = list(source.get("RequestAttributesSequence", [])) or [source]
    items: list[pydicom.Dataset] = []
    for req in requests:
        values = {k: str(req.get(k, "") or source.get(k, "") or "") for k in _ORDER_KEYWORDS}
        if not any(values.values()):
            continue
        item = pydicom.Dataset()
        item.StudyInstanceUID = source.StudyInstanceUID
        item.ReferencedStudySequence = []
        for keyword, value in values.items():
            setattr(item, keyword, value)
        item.RequestedProcedureCodeSequence = list(req.get("RequestedProcedureCodeSequence", []))
        items.append(item)
    return items or None
