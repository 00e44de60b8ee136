"""The result type and the DICOM plumbing every phantom shares: UIDs, transfer syntaxes, headers, writing."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

__all__ = ['SUPPORTED_TRANSFER_SYNTAXES', 'FloatArray', 'SyntheticStudy', 'UInt8Array', 'UInt16Array']

FloatArray = NDArray[np.float64]
UInt8Array = NDArray[np.uint8]
UInt16Array = NDArray[np.uint16]

_NATIVE_SYNTAXES: Final[frozenset[str]] = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
#: Lossless compressed transfer syntaxes that may be requested (an encoder must be installed).
_COMPRESSED_SYNTAXES: Final[frozenset[str]] = frozenset(
    {RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1}
)
#: Every transfer syntax the generators accept (subject to an encoder being available).
SUPPORTED_TRANSFER_SYNTAXES: Final[frozenset[str]] = _NATIVE_SYNTAXES | _COMPRESSED_SYNTAXES

_MANUFACTURER: Final = "SpineMed Phantom"
_INSTITUTION: Final = "Synthetic Hospital"
_UID_SALT: Final = "spinemed-node/synthetic/v1"



# --------------------------------------------------------------------------------------
# Public result type
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticStudy:
    """A synthetic study written to disk.

    Attributes
    ----------
    kind : str
        ``"mr"``, ``"ct"``, ``"xr"`` or ``"chest"``.
    study_instance_uid : str
        The StudyInstanceUID shared by all files.
    paths : tuple of Path
        Every file written, ordered by series number then instance number.
    series_instance_uids : tuple of str
        SeriesInstanceUIDs in series-number order.
    vertebra_centres : dict of str to tuple of float
        Vertebral level (``"T11"``, ``"L1"``, ..., ``"S1"``) to the centre of the
        vertebral body.  Patient LPS millimetres for MR/CT; detector-plane
        millimetres for radiographs (see the module docstring).  Empty for chest.
    truth : dict of str to str
        Ground truth planted in the phantom, e.g. ``{"L4-L5": "disc_herniation"}``.
    """

    kind: str
    study_instance_uid: str
    paths: tuple[Path, ...]
    series_instance_uids: tuple[str, ...]
    vertebra_centres: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    truth: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _ds(value: float) -> str:
    """Format a number as a valid DS string (at most 16 characters)."""
    return format_number_as_ds(float(value))


def _uid(*parts: object) -> str:
    """Derive a deterministic UID under pydicom's root from ``parts``.

    ``generate_uid(prefix=None, ...)`` ignores ``entropy_srcs`` (it returns a random
    UUID-derived ``2.25.`` UID), so a root prefix is required for determinism.
    """
    return str(generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=[_UID_SALT, *(str(p) for p in parts)]))


def _check_transfer_syntax(transfer_syntax_uid: str) -> UID:
    """Validate ``transfer_syntax_uid`` and make sure an encoder is available.

    Parameters
    ----------
    transfer_syntax_uid : str
        The requested transfer syntax UID.

    Returns
    -------
    pydicom.uid.UID
        The validated UID.

    Raises
    ------
    ValueError
        If the transfer syntax is not supported or no encoder is installed.
    """
    uid = UID(transfer_syntax_uid)
    if uid in _NATIVE_SYNTAXES:
        return uid
    if uid not in _COMPRESSED_SYNTAXES:
        supported = ", ".join(sorted(SUPPORTED_TRANSFER_SYNTAXES))
        raise ValueError(
            f"transfer_syntax_uid {uid!s} ({uid.name}) is not supported by the synthetic "
            f"generators; supported: {supported}"
        )
    try:
        encoder = get_encoder(uid)
    except NotImplementedError as exc:
        raise ValueError(
            f"transfer_syntax_uid {uid!s} ({uid.name}): no pixel data encoder is available "
            "in this environment (pydicom has none for it)"
        ) from exc
    if not encoder.is_available:
        missing = "; ".join(encoder.missing_dependencies)
        raise ValueError(
            f"transfer_syntax_uid {uid!s} ({uid.name}): no pixel data encoder plugin is "
            f"installed ({missing})"
        )
    return uid


def _encoding_plugin(uid: UID) -> str:
    """Pick the fastest available encoding plugin for ``uid`` ('' = pydicom's choice)."""
    if uid == RLELossless:
        # pylibjpeg-rle (compiled) is much faster than pydicom's pure-Python RLE encoder.
        encoder = get_encoder(uid)
        if "pylibjpeg" in getattr(encoder, "_available", {}):
            return "pylibjpeg"
    return ""


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    """A Code Sequence item."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


#: CID 4010 "DX View" codes for the ViewPosition values used here.
_VIEW_CODES: Final = {
    "AP": ("399348003", "SCT", "antero-posterior"),
    "PA": ("399300004", "SCT", "postero-anterior"),
    "LL": ("399173006", "SCT", "left lateral"),
}


def _box_blur(img: FloatArray, passes: int = 1) -> FloatArray:
    """Separable [1, 2, 1]/4 smoothing applied ``passes`` times (edge-replicated)."""
    out = img
    for _ in range(passes):
        p = np.pad(out, 1, mode="edge")
        out = (p[:-2, 1:-1] + 2.0 * p[1:-1, 1:-1] + p[2:, 1:-1]) / 4.0
        p = np.pad(out, 1, mode="edge")
        out = (p[1:-1, :-2] + 2.0 * p[1:-1, 1:-1] + p[1:-1, 2:]) / 4.0
    return out


def _rounded_box_sdf(qx: FloatArray, qy: FloatArray, radius: float) -> FloatArray:
    """Signed distance of a rounded box given per-axis signed distances to its faces.

    ``qx``/``qy`` are the signed distances (mm, negative inside) to the box faces
    along each axis; ``radius`` rounds the corners.
    """
    ax = qx + radius
    ay = qy + radius
    ox, oy = np.maximum(ax, 0.0), np.maximum(ay, 0.0)
    outside = np.sqrt(ox * ox + oy * oy)
    inside = np.minimum(np.maximum(ax, ay), 0.0)
    result: FloatArray = outside + inside - radius
    return result


# --------------------------------------------------------------------------------------
# Study / series context and header construction
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StudyContext:
    kind: str
    seed: int
    patient_id: str
    patient_name: str
    patient_sex: str
    birth_date: _dt.date
    study_uid: str
    study_dt: _dt.datetime
    accession: str
    study_id: str
    study_description: str
    uid_key: tuple[str, ...]

    def uid(self, *parts: object) -> str:
        return _uid(*self.uid_key, *parts)

    @property
    def age(self) -> str:
        years = self.study_dt.year - self.birth_date.year - (
            (self.study_dt.month, self.study_dt.day) < (self.birth_date.month, self.birth_date.day)
        )
        return f"{years:03d}Y"


def _make_context(
    kind: str,
    seed: int,
    patient_id: str,
    study_instance_uid: str | None,
    study_description: str,
    params: Sequence[object],
    patient_name: str = "SYNTHETIC^SPINE",
) -> _StudyContext:
    rng = np.random.default_rng([seed, 7919])
    key = (kind, str(seed), patient_id, study_instance_uid or "", *(str(p) for p in params))
    study_uid = study_instance_uid or _uid(*key, "study")
    base = _dt.datetime(2024, 1, 15, 8, 0, 0)
    study_dt = base + _dt.timedelta(days=int(seed) % 365, minutes=int(rng.integers(0, 9 * 60)))
    birth = _dt.date(1950, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 40 * 365)))
    sex = "F" if int(rng.integers(0, 2)) else "M"
    accession = f"SYN{kind.upper()}{abs(int(seed)) % 10_000_000:07d}"[:16]
    return _StudyContext(
        kind=kind,
        seed=seed,
        patient_id=patient_id,
        patient_name=patient_name,
        patient_sex=sex,
        birth_date=birth,
        study_uid=study_uid,
        study_dt=study_dt,
        accession=accession,
        study_id=f"{kind.upper()}{abs(int(seed)) % 100000}"[:16],
        study_description=study_description,
        uid_key=key,
    )


@dataclass(frozen=True)
class _SeriesInfo:
    number: int
    description: str
    modality: str
    body_part: str
    uid: str
    time: _dt.datetime
    protocol: str


def _base_dataset(
    ctx: _StudyContext,
    series: _SeriesInfo,
    sop_class: str,
    instance: int,
    frame_of_reference_uid: str | None,
) -> Dataset:
    """Patient, study, series, equipment, general image and SOP common modules."""
    ds = Dataset()
    content_dt = series.time + _dt.timedelta(seconds=instance)
    sop_uid = ctx.uid("sop", series.number, instance)

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceCreationDate = ctx.study_dt.strftime("%Y%m%d")
    ds.InstanceCreationTime = (series.time + _dt.timedelta(minutes=2)).strftime("%H%M%S")
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(sop_uid)
    ds.StudyDate = ctx.study_dt.strftime("%Y%m%d")
    ds.SeriesDate = series.time.strftime("%Y%m%d")
    ds.AcquisitionDate = content_dt.strftime("%Y%m%d")
    ds.ContentDate = content_dt.strftime("%Y%m%d")
    ds.StudyTime = ctx.study_dt.strftime("%H%M%S")
    ds.SeriesTime = series.time.strftime("%H%M%S")
    ds.AcquisitionTime = content_dt.strftime("%H%M%S")
    ds.ContentTime = content_dt.strftime("%H%M%S")
    ds.AccessionNumber = ctx.accession
    # what a modality copies from its worklist entry (General Series module, Request Attributes Sequence)
    request = Dataset()
    request.AccessionNumber = ctx.accession
    request.RequestedProcedureID = f"RP{ctx.accession[3:]}"[:16]
    request.RequestedProcedureDescription = ctx.study_description
    request.ScheduledProcedureStepID = f"SPS{ctx.accession[3:]}"[:16]
    ds.RequestAttributesSequence = [request]
    ds.Modality = series.modality
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = _INSTITUTION
    ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
    ds.StationName = f"PHANTOM{series.modality}01"
    ds.StudyDescription = ctx.study_description
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = f"Phantom {series.modality}"
    ds.PatientName = ctx.patient_name
    ds.PatientID = ctx.patient_id
    ds.PatientBirthDate = ctx.birth_date.strftime("%Y%m%d")
    ds.PatientSex = ctx.patient_sex
    ds.PatientAge = ctx.age
    ds.BodyPartExamined = series.body_part
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "spinemed-synthetic 1.0"
    ds.ProtocolName = series.protocol
    ds.StudyInstanceUID = UID(ctx.study_uid)
    ds.SeriesInstanceUID = UID(series.uid)
    ds.StudyID = ctx.study_id
    ds.SeriesNumber = series.number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    if frame_of_reference_uid is not None:
        ds.FrameOfReferenceUID = UID(frame_of_reference_uid)
        ds.PositionReferenceIndicator = ""
    return ds


def _set_pixel_module(ds: Dataset, rows: int, cols: int, photometric: str = "MONOCHROME2") -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0


def _write(ds: Dataset, pixels: UInt16Array, path: Path, tsuid: UID) -> Path:
    """Attach ``pixels`` to ``ds`` and write a Part 10 file with transfer syntax ``tsuid``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    arr = np.ascontiguousarray(pixels, dtype=np.uint16)
    ds.LossyImageCompression = "00"
    if tsuid in _NATIVE_SYNTAXES:
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OW"
        meta.TransferSyntaxUID = tsuid
    else:
        ds.compress(tsuid, arr, encoding_plugin=_encoding_plugin(tsuid), generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _to_uint12(img: FloatArray) -> UInt16Array:
    out: UInt16Array = np.clip(np.rint(img), 0, 4095).astype(np.uint16)
    return out


