"""A study on disk: the header subset the pipeline needs, and where each instance's file is.

``Study`` is the contract between the node (which receives and spools instances) and the
inference / SR stages (which read pixel data and copy patient/study identity).  It is built
from files only, so the same type serves the C-STORE path, the Orthanc path and
``spinemed-node analyze PATH...``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial

__all__ = [
    "Instance",
    "PixelExtent",
    "Series",
    "Study",
    "StudyError",
    "load_study",
    "pixel_extent",
    "read_header",
]


class StudyError(ValueError):
    """The files given do not form one usable study."""


@dataclass(frozen=True)
class Instance:
    """One stored SOP instance."""

    sop_class_uid: str
    sop_instance_uid: str
    path: Path
    instance_number: int | None = None
    number_of_frames: int = 1
    image_position: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class Series:
    """One series with its instances (ordered by Instance Number, then path)."""

    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    image_orientation: tuple[float, float, float, float, float, float] | None
    instances: tuple[Instance, ...]
    manufacturer: str = ""
    view_position: str = ""
    protocol_name: str = ""


@dataclass(frozen=True)
class Study:
    """One study: identity header subset and its series.

    ``headers`` keeps the header (no pixel data) :func:`load_study` read for each instance, by SOP
    Instance UID, so the later stages (preprocessing, the SR builder) need not read them again; it is
    not part of the study's value (equality, repr).  Treat the datasets as read-only.
    """

    study_instance_uid: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    accession_number: str
    study_id: str
    study_date: str
    study_time: str
    study_description: str
    referring_physician_name: str
    series: tuple[Series, ...] = field(default_factory=tuple)
    headers: Mapping[str, pydicom.Dataset] = field(default_factory=dict, compare=False, repr=False)

    def header(self, instance: Instance) -> pydicom.Dataset:
        """The header (no pixel data) of one of the study's instances: the one :func:`load_study` read,
        else read from its file now.

        Raises
        ------
        OSError, pydicom.errors.InvalidDicomError
            The file cannot be read.
        """
        ds = self.headers.get(instance.sop_instance_uid)
        if ds is None:
            ds = read_header(instance.path)
        return ds

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(sorted({s.modality for s in self.series}))

    @property
    def instances(self) -> tuple[Instance, ...]:
        return tuple(i for s in self.series for i in s.instances)

    def series_by_uid(self, uid: str) -> Series:
        for s in self.series:
            if s.series_instance_uid == uid:
                return s
        raise KeyError(uid)

    def instance_paths(self) -> list[Path]:
        return [i.path for i in self.instances]


def _str(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        floats = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return floats if len(floats) == n else None


def _expand(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted(q for q in path.rglob("*") if q.is_file()))
        else:
            out.append(path)
    return out


#: What :func:`load_study` reads of every instance's header.
_INSTANCE_KEYWORDS = (
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "NumberOfFrames",
    "ImagePositionPatient",
)


@dataclass(frozen=True)
class PixelExtent:
    """Where a file's top-level Pixel Data element starts and the length it declares (``None``: undefined,
    i.e. encapsulated), with the file's size: enough to tell a truncated instance without reading pixels."""

    offset: int
    declared_length: int | None
    file_size: int

    @property
    def encapsulated(self) -> bool:
        return self.declared_length is None


_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float / Double Float / Pixel Data
_UNDEFINED_LENGTH = 0xFFFFFFFF
_EXTENT_ATTR = "_spinemed_pixel_extent"


def pixel_extent(ds: pydicom.Dataset) -> PixelExtent | None:
    """The :class:`PixelExtent` :func:`read_header` noted for ``ds``; ``None`` when the file has no pixel
    data (or the header was read another way)."""
    extent = ds.__dict__.get(_EXTENT_ATTR)
    return extent if isinstance(extent, PixelExtent) else None


def read_header(path: str | os.PathLike[str]) -> pydicom.Dataset:
    """One file's header (no pixel data), with the elements :func:`load_study` reads already decoded, for
    ``load_study(..., known_headers=...)``, and where its pixel data lies (:func:`pixel_extent`).

    Raises
    ------
    OSError, pydicom.errors.InvalidDicomError, ValueError, TypeError, EOFError
        The file cannot be read as DICOM.
    """
    seen: list[int] = []

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            seen.append(length)
            return True
        return False

    with open(path, "rb") as fp:
        ds: pydicom.Dataset = read_partial(fp, stop_when=at_pixels)
        if seen:  # the reader rewound to the element's start
            ds.__dict__[_EXTENT_ATTR] = PixelExtent(
                offset=fp.tell(),
                declared_length=None if seen[0] == _UNDEFINED_LENGTH else seen[0],
                file_size=os.fstat(fp.fileno()).st_size,
            )
    for keyword in _INSTANCE_KEYWORDS:
        with contextlib.suppress(ValueError, TypeError, OverflowError):  # malformed: load_study decides
            ds.get(keyword)
    return ds


def load_study(
    paths: Sequence[str | os.PathLike[str]],
    *,
    study_instance_uid: str | None = None,
    known_headers: Mapping[Path, pydicom.Dataset] | None = None,
) -> Study:
    """Read the headers of ``paths`` (files or folders) and group them into one :class:`Study`.

    Parameters
    ----------
    paths
        DICOM files, or folders searched recursively.  Files that are not DICOM are ignored.
    study_instance_uid
        Keep only instances of this study.  Without it, all files must belong to one study.
    known_headers
        Headers already read (``dcmread(path, stop_before_pixels=True)``) by file path: used instead of
        reading those files again (the worker reads them while a study is still arriving).

    Raises
    ------
    StudyError
        No DICOM instance found, or instances of several studies without ``study_instance_uid``.
    """
    headers: list[tuple[Path, pydicom.Dataset]] = []
    known = known_headers or {}
    for path in _expand(paths):
        ds: pydicom.Dataset | None = known.get(path)
        if ds is None:
            try:
                ds = read_header(path)
            except (InvalidDicomError, OSError, EOFError, ValueError, TypeError):
                continue
        if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
            continue
        if study_instance_uid is not None and ds.StudyInstanceUID != study_instance_uid:
            continue
        headers.append((path, ds))
    if not headers:
        raise StudyError("paths: no DICOM instance found")
    study_uids = {str(ds.StudyInstanceUID) for _, ds in headers}
    if len(study_uids) > 1:
        raise StudyError(f"paths: instances of {len(study_uids)} studies; give study_instance_uid")

    by_series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path, ds in headers:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))

    series: list[Series] = []
    kept: dict[str, pydicom.Dataset] = {}
    for uid, items in by_series.items():
        seen: set[str] = set()
        instances: list[Instance] = []
        for path, ds in items:
            sop_uid = str(ds.SOPInstanceUID)
            if sop_uid in seen:  # the same instance received twice: keep the first copy
                continue
            seen.add(sop_uid)
            kept.setdefault(sop_uid, ds)
            pos = _floats(ds, "ImagePositionPatient", 3)
            instances.append(
                Instance(
                    sop_class_uid=str(ds.get("SOPClassUID", "")),
                    sop_instance_uid=sop_uid,
                    path=path,
                    instance_number=_int(ds, "InstanceNumber"),
                    number_of_frames=_int(ds, "NumberOfFrames") or 1,
                    image_position=pos,  # type: ignore[arg-type]
                )
            )
        instances.sort(key=lambda i: (i.instance_number is None, i.instance_number or 0, str(i.path)))
        first = items[0][1]
        series.append(
            Series(
                series_instance_uid=uid,
                modality=_str(first, "Modality"),
                series_number=_int(first, "SeriesNumber"),
                series_description=_str(first, "SeriesDescription"),
                body_part_examined=_str(first, "BodyPartExamined"),
                image_orientation=_floats(first, "ImageOrientationPatient", 6),  # type: ignore[arg-type]
                instances=tuple(instances),
                manufacturer=_str(first, "Manufacturer"),
                view_position=_str(first, "ViewPosition"),
                protocol_name=_str(first, "ProtocolName"),
            )
        )
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid))
    ds0 = headers[0][1]
    return Study(
        study_instance_uid=str(ds0.StudyInstanceUID),
        patient_id=_str(ds0, "PatientID"),
        patient_name=_str(ds0, "PatientName"),
        patient_birth_date=_str(ds0, "PatientBirthDate"),
        patient_sex=_str(ds0, "PatientSex"),
        accession_number=_str(ds0, "AccessionNumber"),
        study_id=_str(ds0, "StudyID"),
        study_date=_str(ds0, "StudyDate"),
        study_time=_str(ds0, "StudyTime"),
        study_description=_str(ds0, "StudyDescription"),
        referring_physician_name=_str(ds0, "ReferringPhysicianName"),
        series=tuple(series),
        headers=kept,
    )
