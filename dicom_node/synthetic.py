"""Synthetic spine phantoms written as realistic DICOM Part 10 files.

No real spine DICOM is available offline, so the demo and the test-suite use the
phantoms generated here.  Each generator renders a simple analytic anatomy model,
plants one known finding (the *truth*) and writes the images with headers that
look like real modality output to pydicom, SimpleITK/GDCM and ``dciodvfy``.

Generators
----------
``make_lumbar_mr``
    MR Image Storage: sagittal T2 TSE (series 2), sagittal T1 TSE (series 3) and,
    optionally, axial T2 at the five lumbar disc levels (series 4).  Planted
    finding: posterior disc herniation at L4-L5.
``make_spine_ct``
    CT Image Storage: axial slices covering roughly L1..S1.  Planted finding:
    wedge compression fracture of L1.
``make_scoliosis_radiograph``
    DX (For Presentation) or CR whole-spine radiograph with a thoracic curve of a
    known Cobb angle between T6 and T12.
``make_chest_radiograph``
    A PA chest DX - a non-spine study the node must skip.

Everything (pixels and UIDs) is deterministic in ``seed``.  UIDs are derived with
:func:`pydicom.uid.generate_uid` from the seed, kind, patient ID, the geometry
parameters and the caller's ``study_instance_uid`` (if given), under pydicom's
UID root (``1.2.826.0.1.3680043.8.498.``), but *not* from the
transfer syntax: the same phantom written with two lossless transfer syntaxes is
the same SOP instance, as DICOM intends.

Transfer syntaxes
-----------------
``transfer_syntax_uid`` accepts Explicit VR Little Endian (default), Implicit VR
Little Endian, Deflated Explicit VR Little Endian, RLE Lossless (pylibjpeg-rle,
else pydicom's own encoder), JPEG-LS Lossless (pyjpegls) and JPEG 2000 Lossless
(pylibjpeg-openjpeg), all encoded with ``Dataset.compress``.  JPEG Lossless SV1
(1.2.840.10008.1.2.4.70) is accepted only if pydicom has an encoder for it - it
has none today - otherwise (as for any other UID) a ``ValueError`` naming
``transfer_syntax_uid`` is raised before anything is written.  There is never a
silent fallback.

Coordinates
-----------
MR and CT use the DICOM patient coordinate system (LPS: +x towards the patient's
left, +y posterior, +z head).  The patient is head-first supine.  Projection
radiographs have no patient coordinate system; their ``vertebra_centres`` are
detector-plane millimetres measured from the centre of the top-left pixel:
``(x, y, 0.0)`` with ``x = column * spacing`` (towards the image right, i.e. the
patient's left on AP / the patient's posterior on the lateral view) and
``y = row * spacing`` (towards the patient's feet), so ``column = x / spacing``,
``row = y / spacing`` with ``spacing`` the (isotropic) ``ImagerPixelSpacing``.

Validation notes (``dciodvfy``, dicom3tools)
--------------------------------------------
Every kind/variant (MR sagittal and axial, CT, DX AP/LL in MONOCHROME1/2, CR,
chest DX; uncompressed and RLE / JPEG-LS / JPEG 2000 encoded) validates with no
*Error* and no *Warning* lines.  Things that dciodvfy would otherwise flag and
that are deliberately handled: ProcedureCodeSequence is omitted (an empty
type-3 sequence is an error), CT carries CTDIPhantomTypeCodeSequence next to
CTDIvol, DX has PositionerType (type 2) and a ViewCodeSequence matching
ViewPosition (CR must not have one: not in the CR IOD), MR Image Type value 3 is
the defined term OTHER.  The installed dciodvfy cannot parse *Deflated* Explicit
VR Little Endian at all (it fails on pydicom's own deflated test file too), so
deflated output is verified with pydicom and GDCM/SimpleITK instead.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.encoders.base import get_encoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

__all__ = [
    "SUPPORTED_TRANSFER_SYNTAXES",
    "SyntheticStudy",
    "make_chest_radiograph",
    "make_lumbar_mr",
    "make_scoliosis_radiograph",
    "make_spine_ct",
    "make_study",
]

FloatArray = NDArray[np.float64]
UInt8Array = NDArray[np.uint8]
UInt16Array = NDArray[np.uint16]

#: Transfer syntaxes written without compression.
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


# --------------------------------------------------------------------------------------
# 3-D lumbar spine model (MR and CT)
# --------------------------------------------------------------------------------------

# Tissue labels
_AIR, _FAT, _MUSCLE, _VISCERA, _CSF, _CORD, _CAUDA = 0, 1, 2, 3, 4, 5, 6
_ANNULUS, _NUCLEUS, _MARROW, _CORTEX, _POSTERIOR, _HERNIA, _VESSEL = 7, 8, 9, 10, 11, 12, 13
_DEGEN_NUCLEUS, _FRACTURE_MARROW = 14, 15
_N_LABELS = 16

#            air  fat   musc visc csf   cord cauda ann  nucl marrow cortex post hern vess degen fract
_T2 = np.array([0, 1300, 380, 650, 2300, 760, 620, 360, 1900, 780, 110, 640, 330, 70, 480, 700], float)
_T1 = np.array([0, 1750, 620, 820, 330, 820, 700, 560, 640, 1180, 140, 1050, 560, 70, 520, 1000], float)
_HU = np.array([-1000, -100, 55, 25, 10, 35, 30, 90, 75, 250, 800, 600, 85, 40, 80, 420], float)

_LUMBAR_LEVELS: Final = ("T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1", "S2", "S3")
# body height (mm), lateral semi-axis a, AP semi-axis b, tilt (rad; + = moving caudally goes posterior)
_LUMBAR_BODY: Final = {
    "T9": (20.0, 17.0, 13.0, -0.12),
    "T10": (21.0, 18.0, 13.5, -0.12),
    "T11": (22.0, 19.0, 14.0, -0.11),
    "T12": (23.0, 20.0, 14.5, -0.09),
    "L1": (24.0, 21.0, 15.0, -0.06),
    "L2": (25.0, 22.0, 15.5, 0.0),
    "L3": (26.0, 23.0, 16.0, 0.08),
    "L4": (26.0, 24.0, 16.5, 0.18),
    "L5": (25.0, 25.0, 17.0, 0.32),
    "S1": (24.0, 24.0, 16.0, 0.60),
    "S2": (20.0, 19.0, 12.0, 0.80),
    "S3": (16.0, 15.0, 9.0, 0.95),
}
_DISC_HEIGHT: Final = {
    "T9-T10": 5.0, "T10-T11": 5.5, "T11-T12": 6.0, "T12-L1": 7.0, "L1-L2": 9.0, "L2-L3": 10.0,
    "L3-L4": 11.0, "L4-L5": 11.0, "L5-S1": 10.0, "S1-S2": 3.0, "S2-S3": 2.5,
}
_FUSED: Final = frozenset({"S1-S2", "S2-S3"})
_CANAL_AX, _CANAL_AY = 11.0, 8.0


@dataclass(frozen=True)
class _Segment:
    name: str
    disc: bool
    cy: float
    cz: float
    phi: float
    half_h: float
    a: float
    b: float
    canal_u: float  # canal centre along the local posterior axis


@dataclass(frozen=True)
class _Local:
    """A segment and the flat indices / local coordinates of the points near it."""

    seg: _Segment
    idx: NDArray[np.intp]
    x: FloatArray
    u: FloatArray
    v: FloatArray


_CAUDA_ROOTS: Final = ((-4.5, 2.5), (4.5, 2.5), (-2.0, 4.5), (2.0, 4.5), (0.0, 5.5), (-6.5, 0.0), (6.5, 0.0))


@dataclass(frozen=True)
class _SpineModel:
    segments: tuple[_Segment, ...]
    herniation: str | None
    fracture: str | None
    gas: tuple[tuple[float, float, float, float], ...]

    def vertebra(self, name: str) -> _Segment:
        return next(s for s in self.segments if s.name == name)


def _build_lumbar_model(
    rng: np.random.Generator,
    *,
    herniation: str | None = None,
    fracture: str | None = None,
    l3_z: float = -5.0,
    body_y: float = 20.0,
) -> _SpineModel:
    """Walk down the lordotic curve and place bodies and discs (LPS mm)."""
    scale = float(rng.uniform(0.96, 1.04))
    lordosis = float(rng.uniform(0.85, 1.15))
    heights = {k: v[0] * scale for k, v in _LUMBAR_BODY.items()}
    discs = {k: v * scale for k, v in _DISC_HEIGHT.items()}
    if fracture is not None:
        heights[fracture] *= 0.72
    if herniation is not None:
        discs[herniation] *= 0.75
    phis = {k: v[3] * lordosis for k, v in _LUMBAR_BODY.items()}

    def step(phi: float, dist: float) -> tuple[float, float]:
        return math.sin(phi) * dist, -math.cos(phi) * dist

    raw: list[tuple[str, bool, float, float, float, float, float, float]] = []
    y, z = 0.0, 0.0
    for i, name in enumerate(_LUMBAR_LEVELS):
        _, a, b, _ = _LUMBAR_BODY[name]
        raw.append((name, False, y, z, phis[name], heights[name] / 2.0, a, b))
        if i + 1 == len(_LUMBAR_LEVELS):
            break
        nxt = _LUMBAR_LEVELS[i + 1]
        dname = f"{name}-{nxt}"
        dphi = 0.5 * (phis[name] + phis[nxt])
        dy, dz = step(phis[name], heights[name] / 2.0)
        y, z = y + dy, z + dz
        dy2, dz2 = step(dphi, discs[dname] / 2.0)
        _, a2, b2, _ = _LUMBAR_BODY[nxt]
        raw.append((dname, True, y + dy2, z + dz2, dphi, discs[dname] / 2.0, 0.5 * (a + a2), 0.5 * (b + b2)))
        dy3, dz3 = step(dphi, discs[dname])
        y, z = y + dy3, z + dz3
        dy4, dz4 = step(phis[nxt], heights[nxt] / 2.0)
        y, z = y + dy4, z + dz4
    l3 = next(r for r in raw if r[0] == "L3")
    oy, oz = body_y - l3[2], l3_z - l3[3]
    segments = tuple(
        _Segment(name, disc, cy + oy, cz + oz, phi, hh, a, b, b + 2.5 + _CANAL_AY)
        for name, disc, cy, cz, phi, hh, a, b in raw
    )
    gas = tuple(
        (
            float(rng.uniform(-90, 90)),
            float(rng.uniform(-100, -45)),
            float(rng.uniform(-140, 140)),
            float(rng.uniform(7, 18)),
        )
        for _ in range(10)
    )
    return _SpineModel(segments, herniation, fracture, gas)


def _spine_labels(model: _SpineModel, x: FloatArray, y: FloatArray, z: FloatArray) -> UInt8Array:
    """Tissue label at each LPS point (all arrays share one shape)."""
    segs = model.segments
    lab = np.full(x.shape, _AIR, dtype=np.uint8)
    # float32 keeps the many element-wise operations cheap; 0.01 mm precision is plenty.
    x, y, z = x.astype(np.float32), y.astype(np.float32), z.astype(np.float32)

    # Curves as functions of z (interpolated between segment centres).
    order = sorted(segs, key=lambda s: s.cz)
    zs = np.array([s.cz for s in order])
    canal_y = np.interp(z, zs, [s.cy + s.canal_u * math.cos(s.phi) for s in order])
    front_y = np.interp(z, zs, [s.cy - s.b * math.cos(s.phi) for s in order])
    half_width = np.interp(z, zs, [s.a for s in order])

    # Torso, subcutaneous fat, muscles, vessels, bowel gas.
    torso = (x / 145.0) ** 2 + (y / 115.0) ** 2
    lab[torso <= 1.0] = _FAT
    viscera = (x / 130.0) ** 2 + (y / 101.0) ** 2
    lab[viscera <= 1.0] = _VISCERA
    for gx, gy, gz, gr in model.gas:
        if float(z.min()) > gz + gr or float(z.max()) < gz - gr:
            continue
        lab[((x - gx) ** 2 + (y - gy) ** 2 + (z - gz) ** 2 <= gr * gr) & (viscera <= 0.8)] = _AIR
    for side in (-1.0, 1.0):
        erector = ((x - side * 30.0) / 21.0) ** 2 + ((y - canal_y - 30.0) / 24.0) ** 2 <= 1.0
        lab[erector & (torso <= 1.0)] = _MUSCLE
        l1z = model.vertebra("L1").cz
        psoas_r = np.clip((l1z - z) / 60.0, 0.0, 1.0)
        psoas = ((x - side * (half_width + 14.0)) / (5.0 + 10.0 * psoas_r)) ** 2 + (
            (y - front_y - 14.0) / (6.0 + 11.0 * psoas_r)
        ) ** 2 <= 1.0
        lab[psoas & (psoas_r > 0)] = _MUSCLE
    l4z = model.vertebra("L4").cz
    above = z > l4z
    aorta = (x - 14.0) ** 2 + (y - front_y + 13.0) ** 2 <= 100.0
    ivc = ((x + 22.0) / 12.0) ** 2 + ((y - front_y + 10.0) / 8.0) ** 2 <= 1.0
    lab[(aorta | ivc) & above] = _VESSEL
    for side in (-1.0, 1.0):
        iliac = (x - side * (10.0 + 0.35 * (l4z - z))) ** 2 + (y - front_y + 14.0) ** 2 <= 40.0
        lab[iliac & ~above & (torso <= 0.9)] = _VESSEL

    # Local coordinates per segment, only for the points near it (flat index sets).
    flat = lab.reshape(-1)
    fx, fy, fz = x.reshape(-1), y.reshape(-1), z.reshape(-1)
    zmin, zmax = float(fz.min()), float(fz.max())
    local: list[_Local] = []
    for s in segs:
        reach = s.half_h + (4.0 if s.disc else 32.0)
        u_lo, u_hi = -s.b - 4.0, s.b + 62.0
        # Bounding box (y, z) of the segment's local box (u in [u_lo, u_hi], |v| <= reach).
        cs, sn = math.cos(s.phi), math.sin(s.phi)
        corners_y = [s.cy + uu * cs - vv * sn for uu in (u_lo, u_hi) for vv in (-reach, reach)]
        corners_z = [s.cz + uu * sn + vv * cs for uu in (u_lo, u_hi) for vv in (-reach, reach)]
        z_lo, z_hi = min(corners_z), max(corners_z)
        if z_hi < zmin or z_lo > zmax:
            continue
        cand = np.flatnonzero((fz >= z_lo) & (fz <= z_hi))
        cand = cand[(fy[cand] >= min(corners_y)) & (fy[cand] <= max(corners_y)) & (np.abs(fx[cand]) <= 70.0)]
        dy, dz = fy[cand] - s.cy, fz[cand] - s.cz
        v = -sn * dy + cs * dz
        u = cs * dy + sn * dz
        keep = (np.abs(v) <= reach) & (u >= u_lo) & (u <= u_hi)
        if keep.any():
            local.append(_Local(s, cand[keep], fx[cand[keep]], u[keep], v[keep]))

    conus = model.vertebra("L1")
    # Pass 1: canal (CSF), cord and cauda equina.
    for loc in local:
        s, xx, u, v = loc.seg, loc.x, loc.u, loc.v
        extent = np.abs(v) <= s.half_h + 2.0
        cu = u - s.canal_u
        sacral = s.name.startswith("S")
        ax, ay = (_CANAL_AX * 0.7, _CANAL_AY * 0.6) if sacral else (_CANAL_AX, _CANAL_AY)
        flat[loc.idx[extent & ((xx / ax) ** 2 + (cu / ay) ** 2 <= 1.0)]] = _CSF
        above_conus = s.cz > conus.cz + conus.half_h
        if above_conus or s is conus:
            taper = np.ones_like(v) if above_conus else np.clip((v + 0.3 * s.half_h) / s.half_h, 0.0, 1.0)
            cord = (xx / (5.0 * taper + 1e-6)) ** 2 + ((cu + 0.5) / (4.0 * taper + 1e-6)) ** 2 <= 1.0
            flat[loc.idx[extent & cord]] = _CORD
        if not above_conus and not sacral:
            for ox, ou in _CAUDA_ROOTS:
                flat[loc.idx[extent & ((xx - ox) ** 2 + (cu - ou) ** 2 <= 1.3)]] = _CAUDA

    # Pass 2: discs.
    for loc in local:
        s, xx, u, v = loc.seg, loc.x, loc.u, loc.v
        if not s.disc:
            continue
        qx = (np.sqrt((xx / (s.a + 1.0)) ** 2 + (u / (s.b + 1.0)) ** 2) - 1.0) * (s.b + 1.0)
        qy = np.abs(v) - (s.half_h + 1.5)
        disc = _rounded_box_sdf(qx, qy, 1.5) <= 0.0
        if s.name in _FUSED:
            flat[loc.idx[disc]] = _CORTEX
            continue
        flat[loc.idx[disc]] = _ANNULUS
        nucleus = (xx / (0.6 * s.a)) ** 2 + ((u + 0.1 * s.b) / (0.55 * s.b)) ** 2 + (
            v / (0.75 * s.half_h)
        ) ** 2 <= 1.0
        flat[loc.idx[disc & nucleus]] = _DEGEN_NUCLEUS if s.name == model.herniation else _NUCLEUS

    # Pass 3: vertebral bodies and posterior elements.
    for loc in local:
        s, xx, u, v = loc.seg, loc.x, loc.u, loc.v
        if s.disc:
            continue
        half_h: FloatArray | float = s.half_h
        if s.name == model.fracture:
            half_h = s.half_h * (0.78 + 0.22 * np.clip((u + s.b) / (2.0 * s.b), 0.0, 1.0))
        xa, ub = xx / s.a, u / s.b
        r = np.sqrt(xa * xa + ub * ub)
        d = _rounded_box_sdf((r - 1.0) * s.b, np.abs(v) - half_h, 2.5)
        body = d <= 0.0
        flat[loc.idx[body]] = _CORTEX
        marrow = _FRACTURE_MARROW if s.name == model.fracture else _MARROW
        flat[loc.idx[body & (d <= -1.3)]] = marrow

        cu = u - s.canal_u
        hh = s.half_h
        ring = ((xx / (_CANAL_AX + 6.0)) ** 2 + (cu / (_CANAL_AY + 6.0)) ** 2 <= 1.0) & (
            (xx / _CANAL_AX) ** 2 + (cu / _CANAL_AY) ** 2 > 1.0
        )
        arch = ring & (u > s.b) & (v >= -0.55 * hh) & (v <= 0.9 * hh)
        spinous_u = cu - (_CANAL_AY + 3.0)
        spinous = (np.abs(xx) <= 3.5) & (spinous_u >= 0.0) & (spinous_u <= 30.0) & (
            np.abs(v + 0.35 * spinous_u + 0.1 * hh) <= 0.45 * hh
        )
        abs_x = np.abs(xx)
        facets = (abs_x >= _CANAL_AX + 2.0) & (abs_x <= _CANAL_AX + 10.0) & (cu >= -3.0) & (
            cu <= _CANAL_AY + 3.0
        ) & (v >= -hh - 9.0) & (v <= 0.5 * hh)
        posterior = arch | spinous | facets
        if s.name.startswith("L"):  # transverse processes
            posterior |= (abs_x >= _CANAL_AX + 4.0) & (abs_x <= _CANAL_AX + 34.0) & (
                np.abs(cu + 2.0) <= 4.0
            ) & (
                np.abs(v - 0.05 * hh) <= 0.3 * hh
            )
        elif s.name.startswith("S"):  # sacral ala
            posterior |= (abs_x >= s.a - 4.0) & (abs_x <= s.a + 38.0) & (np.abs(u) <= s.b) & (np.abs(v) <= hh)
        sel = loc.idx[posterior]
        flat[sel[flat[sel] != _CSF]] = _POSTERIOR

    # Pass 4: herniated disc material bulging posteriorly (and to the left) into the canal.
    for loc in local:
        s, xx, u, v = loc.seg, loc.x, loc.u, loc.v
        if s.name == model.herniation:
            blob = ((xx - 4.0) / 8.0) ** 2 + ((u - s.b - 3.0) / 5.5) ** 2 + ((v + 1.5) / 6.0) ** 2 <= 1.0
            flat[loc.idx[blob]] = _HERNIA
    return lab


def _render(
    model: _SpineModel,
    tables: Sequence[FloatArray],
    points: Callable[[float], tuple[FloatArray, FloatArray, FloatArray]],
    offsets: Sequence[float],
) -> list[FloatArray]:
    """Average tissue values over sub-slice ``offsets`` (partial-volume effect)."""
    acc = [np.zeros(()) for _ in tables]
    for off in offsets:
        px, py, pz = points(off)
        lab = _spine_labels(model, px, py, pz)
        acc = [a + t[lab] for a, t in zip(acc, tables, strict=True)]
    return [a / len(offsets) for a in acc]


# --------------------------------------------------------------------------------------
# MR
# --------------------------------------------------------------------------------------


def make_lumbar_mr(
    out_dir: Path,
    *,
    seed: int = 0,
    slices: int = 15,
    size: int = 256,
    with_axial: bool = False,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    patient_id: str = "SYN-MR-0001",
    study_instance_uid: str | None = None,
) -> SyntheticStudy:
    """Write a lumbar spine MR study (sagittal T2 + T1, optional axial T2).

    Series 2 is "SAG T2 TSE", series 3 "SAG T1 TSE" (same slice positions), and
    with ``with_axial`` series 4 "AX T2" with one slice through each disc level
    L1-L2 .. L5-S1.  Sagittal slices step from the patient's left to the
    patient's right (ImagePositionPatient x decreasing by SpacingBetweenSlices
    with InstanceNumber, i.e. along the slice normal row x column = -x).

    Parameters
    ----------
    out_dir : Path
        Output directory; files go to ``out_dir/<series number>/<instance>.dcm``.
    seed : int, optional
        Seed for anatomy variation, noise and UIDs.
    slices : int, optional
        Number of sagittal slices per series.
    size : int, optional
        Matrix size (rows = columns) for a 300 mm field of view.
    with_axial : bool, optional
        Also write the axial T2 series.
    transfer_syntax_uid : str, optional
        Transfer syntax of the written files.
    patient_id : str, optional
        PatientID.
    study_instance_uid : str or None, optional
        StudyInstanceUID to use instead of the seed-derived one.

    Returns
    -------
    SyntheticStudy
        Paths, UIDs, vertebral body centres (LPS mm) and the planted truth
        ``{"L4-L5": "disc_herniation"}``.

    Raises
    ------
    ValueError
        If a parameter is out of range or ``transfer_syntax_uid`` cannot be written.
    """
    if slices < 1 or size < 32:
        raise ValueError("slices must be >= 1 and size >= 32")
    tsuid = _check_transfer_syntax(transfer_syntax_uid)
    ctx = _make_context(
        "mr", seed, patient_id, study_instance_uid, "MRI LUMBAR SPINE", (slices, size, with_axial)
    )
    rng = np.random.default_rng([seed, 1])
    model = _build_lumbar_model(rng, herniation="L4-L5")
    for_uid = ctx.uid("for")

    fov = 300.0
    ps = fov / size
    thickness, spacing = 4.0, 4.4
    y0 = 10.0 - fov / 2.0 + ps / 2.0
    z0 = fov / 2.0 - ps / 2.0
    cols_y = y0 + ps * np.arange(size)
    rows_z = z0 - ps * np.arange(size)
    gy, gz = np.meshgrid(cols_y, rows_z)
    xs = [(slices - 1) / 2.0 * spacing - k * spacing for k in range(slices)]

    def sag_points(x0: float) -> Callable[[float], tuple[FloatArray, FloatArray, FloatArray]]:
        def pts(off: float) -> tuple[FloatArray, FloatArray, FloatArray]:
            return np.full_like(gy, x0 + off), gy, gz

        return pts

    t2_imgs: list[FloatArray] = []
    t1_imgs: list[FloatArray] = []
    for x0 in xs:
        t2, t1 = _render(model, (_T2, _T1), sag_points(x0), (-thickness / 3.0, 0.0, thickness / 3.0))
        t2_imgs.append(t2)
        t1_imgs.append(t1)

    paths: list[Path] = []
    series_uids: list[str] = []
    protocols = (
        (2, "SAG T2 TSE", t2_imgs, 3000.0, 100.0, 17, "tse2d1_17", 150.0),
        (3, "SAG T1 TSE", t1_imgs, 550.0, 11.0, 3, "tse2d1_3", 150.0),
    )
    for number, desc, imgs, tr, te, etl, seqname, flip in protocols:
        series = _SeriesInfo(
            number=number,
            description=desc,
            modality="MR",
            body_part="LSPINE",
            uid=ctx.uid("series", number),
            time=ctx.study_dt + _dt.timedelta(minutes=3 * number),
            protocol=desc,
        )
        series_uids.append(series.uid)
        noise = np.random.default_rng([seed, 10 + number])
        for k, (x0, img) in enumerate(zip(xs, imgs, strict=True)):
            sig = _box_blur(img, 1)
            n1 = noise.normal(0.0, 22.0, sig.shape)
            n2 = noise.normal(0.0, 22.0, sig.shape)
            pix = _to_uint12(np.sqrt((sig + n1) ** 2 + n2 * n2))
            ds = _base_dataset(ctx, series, MRImageStorage, k + 1, for_uid)
            _mr_header(ds, tr=tr, te=te, etl=etl, seqname=seqname, flip=flip, thickness=thickness)
            ds.SpacingBetweenSlices = _ds(spacing)
            ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z0)]
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            ds.SliceLocation = _ds(-x0)
            ds.InPlanePhaseEncodingDirection = "ROW"
            ds.AcquisitionMatrix = [0, size, size, 0]
            _set_pixel_module(ds, size, size)
            ds.PixelSpacing = [_ds(ps), _ds(ps)]
            center = 1100.0 if number == 2 else 900.0
            ds.WindowCenter = _ds(center)
            ds.WindowWidth = _ds(2 * center)
            paths.append(_write(ds, pix, out_dir / str(number) / f"{k + 1}.dcm", tsuid))

    if with_axial:
        number = 4
        series = _SeriesInfo(
            number=number,
            description="AX T2",
            modality="MR",
            body_part="LSPINE",
            uid=ctx.uid("series", number),
            time=ctx.study_dt + _dt.timedelta(minutes=3 * number),
            protocol="AX T2 TSE",
        )
        series_uids.append(series.uid)
        noise = np.random.default_rng([seed, 10 + number])
        afov = 200.0
        aps = afov / size
        disc_names = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
        for k, dname in enumerate(disc_names):
            disc = model.vertebra(dname)
            ax0 = -afov / 2.0 + aps / 2.0
            ay0 = disc.cy + 15.0 - afov / 2.0 + aps / 2.0
            gx, gyy = np.meshgrid(ax0 + aps * np.arange(size), ay0 + aps * np.arange(size))
            zc = disc.cz

            def ax_pts(
                off: float, gx: FloatArray = gx, gyy: FloatArray = gyy, zc: float = zc
            ) -> tuple[FloatArray, FloatArray, FloatArray]:
                return gx, gyy, np.full_like(gx, zc + off)

            (img,) = _render(model, (_T2,), ax_pts, (-thickness / 3.0, 0.0, thickness / 3.0))
            sig = _box_blur(img, 1)
            n1 = noise.normal(0.0, 22.0, sig.shape)
            n2 = noise.normal(0.0, 22.0, sig.shape)
            pix = _to_uint12(np.sqrt((sig + n1) ** 2 + n2 * n2))
            ds = _base_dataset(ctx, series, MRImageStorage, k + 1, for_uid)
            _mr_header(ds, tr=4000.0, te=96.0, etl=15, seqname="tse2d1_15", flip=150.0, thickness=thickness)
            ds.ImagePositionPatient = [_ds(ax0), _ds(ay0), _ds(zc)]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = _ds(zc)
            ds.InPlanePhaseEncodingDirection = "ROW"
            ds.AcquisitionMatrix = [0, size, size, 0]
            ds.ImageComments = f"Disc level {dname}"
            _set_pixel_module(ds, size, size)
            ds.PixelSpacing = [_ds(aps), _ds(aps)]
            ds.WindowCenter = "1100"
            ds.WindowWidth = "2200"
            paths.append(_write(ds, pix, out_dir / str(number) / f"{k + 1}.dcm", tsuid))

    centres = {
        s.name: (0.0, round(s.cy, 3), round(s.cz, 3))
        for s in model.segments
        if not s.disc and not s.name.startswith(("S2", "S3")) and abs(s.cz) <= fov / 2.0
    }
    return SyntheticStudy(
        kind="mr",
        study_instance_uid=ctx.study_uid,
        paths=tuple(paths),
        series_instance_uids=tuple(series_uids),
        vertebra_centres=centres,
        truth={"L4-L5": "disc_herniation"},
    )


def _mr_header(
    ds: Dataset, *, tr: float, te: float, etl: int, seqname: str, flip: float, thickness: float
) -> None:
    """MR Image module attributes for a 2D turbo spin echo acquisition."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = ["SK", "SP"]
    ds.ScanOptions = "PFP"
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = seqname
    ds.AngioFlag = "N"
    ds.SliceThickness = _ds(thickness)
    ds.RepetitionTime = _ds(tr)
    ds.EchoTime = _ds(te)
    ds.NumberOfAverages = "2"
    ds.ImagingFrequency = "63.676"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = "1.5"
    ds.EchoTrainLength = str(etl)
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = "190"
    ds.ReceiveCoilName = "SPINE"
    ds.TransmitCoilName = "BODY"
    ds.FlipAngle = _ds(flip)
    ds.PatientPosition = "HFS"


# --------------------------------------------------------------------------------------
# CT
# --------------------------------------------------------------------------------------


def make_spine_ct(
    out_dir: Path,
    *,
    seed: int = 0,
    slices: int = 60,
    size: int = 128,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    patient_id: str = "SYN-CT-0001",
    study_instance_uid: str | None = None,
) -> SyntheticStudy:
    """Write an axial lumbar spine CT (roughly L1..S1) with an L1 compression fracture.

    The ``slices`` contiguous axial slices cover 200 mm (SliceThickness =
    spacing = 200 / ``slices`` mm, rounded to 0.001 mm), head-first supine,
    InstanceNumber 1 at the top (highest z).  Stored values are HU + 1024 as
    uint16 (BitsStored 12, RescaleIntercept -1024, RescaleSlope 1).

    Parameters
    ----------
    out_dir : Path
        Output directory; files go to ``out_dir/2/<instance>.dcm``.
    seed : int, optional
        Seed for anatomy variation, noise and UIDs.
    slices : int, optional
        Number of axial slices.
    size : int, optional
        Matrix size for a 250 mm (spine-targeted) reconstruction diameter.
    transfer_syntax_uid : str, optional
        Transfer syntax of the written files.
    patient_id : str, optional
        PatientID.
    study_instance_uid : str or None, optional
        StudyInstanceUID to use instead of the seed-derived one.

    Returns
    -------
    SyntheticStudy
        With truth ``{"L1": "vertebral_fracture"}``.

    Raises
    ------
    ValueError
        If a parameter is out of range or ``transfer_syntax_uid`` cannot be written.
    """
    if slices < 1 or size < 32:
        raise ValueError("slices must be >= 1 and size >= 32")
    tsuid = _check_transfer_syntax(transfer_syntax_uid)
    ctx = _make_context("ct", seed, patient_id, study_instance_uid, "CT LUMBAR SPINE", (slices, size))
    rng = np.random.default_rng([seed, 2])
    model = _build_lumbar_model(rng, fracture="L1")
    for_uid = ctx.uid("for")
    fov = 250.0
    ps = fov / size
    spacing = round(200.0 / slices, 3)
    l1 = model.vertebra("L1")
    z_top = round(l1.cz + l1.half_h + 12.0, 1)
    x0 = -fov / 2.0 + ps / 2.0
    y0 = -fov / 2.0 + ps / 2.0
    gx, gy = np.meshgrid(x0 + ps * np.arange(size), y0 + ps * np.arange(size))
    series = _SeriesInfo(
        number=2,
        description="AXIAL BONE 3.0",
        modality="CT",
        body_part="LSPINE",
        uid=ctx.uid("series", 2),
        time=ctx.study_dt + _dt.timedelta(minutes=4),
        protocol="L-SPINE ROUTINE",
    )
    noise = np.random.default_rng([seed, 20])
    paths: list[Path] = []
    for k in range(slices):
        zc = round(z_top - k * spacing, 3)

        def pts(off: float, zc: float = zc) -> tuple[FloatArray, FloatArray, FloatArray]:
            return gx, gy, np.full_like(gx, zc + off)

        (hu,) = _render(model, (_HU,), pts, (-spacing / 3.0, 0.0, spacing / 3.0))
        hu = _box_blur(hu, 1) + noise.normal(0.0, 12.0, hu.shape)
        pix = _to_uint12(hu + 1024.0)
        ds = _base_dataset(ctx, series, CTImageStorage, k + 1, for_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ScanOptions = "HELICAL MODE"
        ds.SliceThickness = _ds(spacing)
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds(fov)
        ds.DistanceSourceToDetector = "1040"
        ds.DistanceSourceToPatient = "570"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "1000"
        ds.XRayTubeCurrent = 250
        ds.Exposure = 250
        ds.FilterType = "BODY"
        ds.GeneratorPower = 30
        ds.FocalSpots = "1.2"
        ds.ConvolutionKernel = "B70s"
        ds.PatientPosition = "HFS"
        ds.RevolutionTime = 1.0
        ds.SingleCollimationWidth = 0.6
        ds.TotalCollimationWidth = 38.4
        ds.TableSpeed = 46.0
        ds.SpiralPitchFactor = 0.8
        ds.CTDIvol = 15.2
        ds.CTDIPhantomTypeCodeSequence = DicomSequence(
            [_code("113691", "DCM", "IEC Body Dosimetry Phantom")]
        )
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(zc)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = _ds(zc)
        _set_pixel_module(ds, size, size)
        ds.PixelSpacing = [_ds(ps), _ds(ps)]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = ["500", "40"]
        ds.WindowWidth = ["2000", "400"]
        ds.WindowCenterWidthExplanation = ["BONE", "SOFT TISSUE"]
        paths.append(_write(ds, pix, out_dir / "2" / f"{k + 1}.dcm", tsuid))

    z_bottom = z_top - (slices - 1) * spacing
    centres = {
        s.name: (0.0, round(s.cy, 3), round(s.cz, 3))
        for s in model.segments
        if not s.disc and not s.name.startswith(("S2", "S3")) and z_bottom <= s.cz <= z_top
    }
    return SyntheticStudy(
        kind="ct",
        study_instance_uid=ctx.study_uid,
        paths=tuple(paths),
        series_instance_uids=(series.uid,),
        vertebra_centres=centres,
        truth={"L1": "vertebral_fracture"},
    )


# --------------------------------------------------------------------------------------
# Projection radiographs
# --------------------------------------------------------------------------------------

_XR_LEVELS: Final = tuple([f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)] + ["S1"])


class _Canvas:
    """Additive 'projected thickness' canvas in detector millimetres."""

    def __init__(self, rows: int, cols: int, spacing: float) -> None:
        self.rows, self.cols, self.spacing = rows, cols, spacing
        self.img = np.zeros((rows, cols))

    def window(
        self, cx: float, cy: float, radius: float
    ) -> tuple[tuple[slice, slice], FloatArray, FloatArray] | None:
        s = self.spacing
        r0 = max(int((cy - radius) / s), 0)
        r1 = min(int((cy + radius) / s) + 2, self.rows)
        c0 = max(int((cx - radius) / s), 0)
        c1 = min(int((cx + radius) / s) + 2, self.cols)
        if r0 >= r1 or c0 >= c1:
            return None
        gx, gy = np.meshgrid(np.arange(c0, c1) * s, np.arange(r0, r1) * s)
        return (slice(r0, r1), slice(c0, c1)), gx, gy

    def rotated_box(
        self, cx: float, cy: float, w: float, h: float, theta: float, value: float,
        radius: float = 3.0, rim: float = 0.0,
    ) -> None:
        """Rounded rectangle (half sizes ``w``, ``h``) rotated by ``theta`` (rad)."""
        win = self.window(cx, cy, math.hypot(w, h) + 2.0)
        if win is None:
            return
        sl, gx, gy = win
        dx, dy = gx - cx, gy - cy
        along = math.sin(theta) * dx + math.cos(theta) * dy  # along the spine axis
        across = math.cos(theta) * dx - math.sin(theta) * dy
        d = _rounded_box_sdf(np.abs(across) - w, np.abs(along) - h, min(radius, w, h))
        val = np.where(d <= 0.0, value, 0.0)
        if rim:
            val = val + np.where((d <= 0.0) & (d > -1.6), rim, 0.0)
        self.img[sl] += val

    def ellipse(
        self, cx: float, cy: float, rx: float, ry: float, value: float,
        theta: float = 0.0, profile: bool = False,
    ) -> None:
        win = self.window(cx, cy, max(rx, ry) + 2.0)
        if win is None:
            return
        sl, gx, gy = win
        dx, dy = gx - cx, gy - cy
        a = math.cos(theta) * dx - math.sin(theta) * dy
        b = math.sin(theta) * dx + math.cos(theta) * dy
        q = (a / rx) ** 2 + (b / ry) ** 2
        if profile:  # projected thickness of an ellipsoid
            self.img[sl] += value * np.sqrt(np.clip(1.0 - q, 0.0, None))
        else:
            self.img[sl] += np.where(q <= 1.0, value, 0.0)

    def segment(self, x0: float, y0: float, x1: float, y1: float, half_width: float, value: float) -> None:
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        win = self.window(cx, cy, math.hypot(x1 - x0, y1 - y0) / 2.0 + half_width + 2.0)
        if win is None:
            return
        sl, gx, gy = win
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((gx - x0) * vx + (gy - y0) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
        dist = np.hypot(gx - x0 - t * vx, gy - y0 - t * vy)
        self.img[sl] += value * np.sqrt(np.clip(1.0 - (dist / half_width) ** 2, 0.0, None))


def _trunk(canvas: _Canvas, cx: float, half_widths: Sequence[tuple[float, float]], value: float) -> None:
    """Soft-tissue trunk whose half width varies with the row (ellipsoidal thickness)."""
    ys = np.arange(canvas.rows) * canvas.spacing
    hw = np.interp(ys, [p[0] for p in half_widths], [p[1] for p in half_widths])
    xs = np.arange(canvas.cols) * canvas.spacing
    q = ((xs[None, :] - cx) / hw[:, None]) ** 2
    canvas.img += value * np.sqrt(np.clip(1.0 - q, 0.0, None))


def _spine_path(
    thetas: Callable[[float], float], s_centres: Sequence[float], x0: float, y0: float
) -> list[tuple[float, float, float]]:
    """Integrate the centre line; returns (x, y, theta) at each arc position."""
    step = 0.25
    s_end = max(s_centres)
    n = int(s_end / step) + 2
    s = np.arange(n) * step
    th = np.array([thetas(float(v)) for v in s])
    xs = x0 + np.concatenate([[0.0], np.cumsum(np.sin(th[:-1]) * step)])
    ys = y0 + np.concatenate([[0.0], np.cumsum(np.cos(th[:-1]) * step)])
    return [
        (float(np.interp(c, s, xs)), float(np.interp(c, s, ys)), thetas(c)) for c in s_centres
    ]


def _finish_radiograph(
    canvas: _Canvas, rng: np.random.Generator, photometric: str, lo: float = 180.0, gain: float = 1.0
) -> UInt16Array:
    """Blur, map thickness to a log-exposure-like MONOCHROME2 scale, add noise."""
    img = _box_blur(canvas.img, 2)
    sig = lo + 3400.0 * (1.0 - np.exp(-gain * img))
    sig = sig + rng.normal(0.0, 14.0, sig.shape)
    pix = _to_uint12(sig)
    if photometric == "MONOCHROME1":
        inverted: UInt16Array = (4095 - pix).astype(np.uint16)
        return inverted
    return pix


def _radiograph_header(
    ds: Dataset,
    *,
    modality: str,
    photometric: str,
    view: str,
    orientation: Sequence[str],
    spacing: float,
    rows: int,
    cols: int,
    pix: UInt16Array,
    kvp: float,
    region: tuple[str, str, str],
) -> None:
    """DX/CR image, detector, positioning and VOI LUT attributes."""
    _set_pixel_module(ds, rows, cols, photometric)
    ds.PatientOrientation = list(orientation)
    ds.ViewPosition = view
    ds.ImagerPixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.KVP = _ds(kvp)
    ds.DistanceSourceToDetector = "1800"
    ds.ExposureTime = "40"
    ds.XRayTubeCurrent = 320
    ds.Exposure = 13
    lo, hi = np.percentile(pix, [1.0, 99.0])  # symmetric: MONOCHROME1 mirrors MONOCHROME2
    ds.WindowCenter = _ds(round(float(lo + hi) / 2.0))
    ds.WindowWidth = _ds(round(max(float(hi - lo), 2.0)))
    ds.AnatomicRegionSequence = DicomSequence([_code(*region)])
    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
        ds.BurnedInAnnotation = "NO"
        ds.ImageLaterality = "U"
        ds.ViewCodeSequence = DicomSequence([_code(*_VIEW_CODES[view])])
        ds.PositionerType = "COLUMN"
        ds.DetectorType = "SCINTILLATOR"
        ds.DetectorConfiguration = "AREA"
        ds.AcquisitionContextSequence = DicomSequence()
        ds.PatientPosition = ""
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.PlateType = "STANDARD"
        ds.PhosphorType = "BaFBr"


def make_scoliosis_radiograph(
    out_dir: Path,
    *,
    seed: int = 0,
    cobb_deg: float = 25.0,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    lateral: bool = False,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    patient_id: str = "SYN-XR-0001",
    study_instance_uid: str | None = None,
) -> SyntheticStudy:
    """Write a whole-spine (T1..S1) radiograph with a thoracic scoliosis.

    The AP view (ViewPosition "AP", PatientOrientation L\\F) shows a right
    thoracic curve whose end vertebrae are T6 and T12: their vertebral bodies
    are tilted by +cobb/2 and -cobb/2, so the Cobb angle between the superior
    endplate of T6 and the inferior endplate of T12 is exactly ``cobb_deg``.
    With ``lateral=True`` a left lateral view (ViewPosition "LL",
    PatientOrientation P\\F) shows the sagittal profile (kyphosis/lordosis)
    instead; the truth still describes the patient's coronal curve.

    The image is 1024 x 512 pixels of 0.8 mm.  ``vertebra_centres`` are
    detector-plane millimetres ``(column * 0.8, row * 0.8, 0.0)`` (see the
    module docstring).

    Parameters
    ----------
    out_dir : Path
        Output directory; the file goes to ``out_dir/1/1.dcm``.
    seed : int, optional
        Seed for anatomy variation, noise and UIDs.
    cobb_deg : float, optional
        Planted Cobb angle (degrees) between T6 and T12.
    modality : str, optional
        ``"DX"`` (Digital X-Ray For Presentation) or ``"CR"``.
    photometric : str, optional
        ``"MONOCHROME2"`` or ``"MONOCHROME1"`` (stored values inverted).
    lateral : bool, optional
        Lateral instead of AP view.
    transfer_syntax_uid : str, optional
        Transfer syntax of the written file.
    patient_id : str, optional
        PatientID.
    study_instance_uid : str or None, optional
        StudyInstanceUID to use instead of the seed-derived one.

    Returns
    -------
    SyntheticStudy
        With truth ``{"cobb_angle": str(cobb_deg), "cobb_upper": "T6", "cobb_lower": "T12"}``.

    Raises
    ------
    ValueError
        For an unknown ``modality``/``photometric`` or unusable ``transfer_syntax_uid``.
    """
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality must be 'DX' or 'CR', not {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be 'MONOCHROME1' or 'MONOCHROME2', not {photometric!r}")
    if not 0.0 <= cobb_deg <= 90.0:
        raise ValueError("cobb_deg must be within [0, 90]")
    tsuid = _check_transfer_syntax(transfer_syntax_uid)
    ctx = _make_context(
        "xr", seed, patient_id, study_instance_uid, "XR SPINE SCOLIOSIS",
        (cobb_deg, modality, photometric, lateral),
    )
    rng = np.random.default_rng([seed, 3])
    rows, cols, spacing = 1024, 512, 0.8
    canvas = _Canvas(rows, cols, spacing)
    scale = float(rng.uniform(0.97, 1.03))

    n = len(_XR_LEVELS)
    heights = [scale * h for h in np.concatenate([np.linspace(14, 22, 12), np.linspace(24, 28, 5), [30.0]])]
    widths = [scale * w for w in np.concatenate([np.linspace(26, 40, 12), np.linspace(42, 52, 5), [50.0]])]
    depths = [scale * d for d in np.concatenate([np.linspace(16, 28, 12), np.linspace(30, 35, 5), [34.0]])]
    discs = [scale * d for d in np.concatenate([np.linspace(4, 6, 11), [7.0], np.linspace(8, 10, 5)])]
    s_centres: list[float] = []
    s = 0.0
    for i in range(n):
        s_centres.append(s)
        if i + 1 < n:
            s += heights[i] / 2.0 + discs[i] + heights[i + 1] / 2.0
    c1, c6, c12, cs1 = s_centres[0], s_centres[5], s_centres[11], s_centres[-1]
    half = math.radians(cobb_deg) / 2.0

    def coronal(s_: float) -> float:
        if s_ <= c6:
            return -half * math.sin(math.pi / 2.0 * (s_ - c1) / (c6 - c1))
        if s_ <= c12:
            return -half * math.cos(math.pi * (s_ - c6) / (c12 - c6))
        return half * math.sin(math.pi / 2.0 * (cs1 - s_) / (cs1 - c12))

    def sagittal(s_: float) -> float:
        kyph, lord = math.radians(20.0), math.radians(27.0)
        if s_ <= c12:
            return kyph * math.cos(math.pi * (s_ - c1) / (c12 - c1))
        return -kyph + (lord + kyph) * (s_ - c12) / (cs1 - c12)

    top = 150.0
    width_mm = cols * spacing
    if lateral:
        path = _spine_path(sagittal, s_centres, 0.0, top)
        shift = 0.62 * width_mm - path[-1][0]
    else:
        path = _spine_path(coronal, s_centres, 0.0, top)
        shift = width_mm / 2.0 - path[-1][0]
    path = [(x + shift, y, th) for x, y, th in path]
    trunk_cx = path[-1][0] if not lateral else 0.62 * width_mm - 40.0

    # Soft tissue, lungs, shoulders/ribs/pelvis.
    if lateral:
        _trunk(canvas, trunk_cx, [(0, 45), (110, 55), (160, 110), (420, 125), (650, 140), (819, 140)], 1.1)
        canvas.ellipse(trunk_cx - 25.0, 300.0, 85.0, 170.0, -0.55, profile=True)
    else:
        _trunk(canvas, trunk_cx, [(0, 50), (100, 60), (150, 175), (420, 150), (620, 170), (819, 175)], 0.9)
        for side in (-1.0, 1.0):
            canvas.ellipse(trunk_cx + side * 75.0, 300.0, 62.0, 165.0, -0.6, profile=True)
            canvas.ellipse(trunk_cx + side * 95.0, path[-1][1] + 20.0, 72.0, 50.0, 0.25, profile=True)
            canvas.ellipse(trunk_cx + side * 92.0, path[-1][1] + 125.0, 26.0, 26.0, 0.9, profile=True)
            canvas.segment(trunk_cx + side * 20.0, 150.0, trunk_cx + side * 150.0, 128.0, 6.0, 0.5)

    centres: dict[str, tuple[float, float, float]] = {}
    for i, (name, (x, y, th)) in enumerate(zip(_XR_LEVELS, path, strict=True)):
        h = heights[i] / 2.0
        centres[name] = (round(x, 3), round(y, 3), 0.0)
        if lateral:
            d = depths[i] / 2.0
            canvas.rotated_box(x, y, d, h, th, 0.55, radius=3.0, rim=0.45)
            # pedicle + lamina + spinous process pointing posteriorly and caudally
            px = x + math.cos(th) * (d + 4.0)
            py = y - math.sin(th) * (d + 4.0)
            length = 38.0 if name.startswith("T") else 32.0
            droop = 0.8 if name.startswith("T") else 0.3
            ex = px + math.cos(th + droop) * length
            ey = py - math.sin(th + droop) * length + math.sin(droop) * length * 2.0
            canvas.segment(px, py, ex, ey, 4.0, 0.35)
        else:
            w = widths[i] / 2.0
            canvas.rotated_box(x, y, w, h, th, 0.5, radius=3.0, rim=0.45)
            for side in (-1.0, 1.0):  # pedicles
                px = x + math.cos(th) * side * 0.55 * w - math.sin(th) * 0.25 * h
                py = y - math.sin(th) * side * 0.55 * w - math.cos(th) * 0.25 * h
                canvas.ellipse(px, py, 0.18 * w, 0.3 * h, 0.35, theta=th, profile=True)
                if name.startswith("L"):  # transverse processes
                    tx = x + math.cos(th) * side * (w + 14.0)
                    ty = y - math.sin(th) * side * (w + 14.0)
                    canvas.segment(x, y, tx, ty, 4.5, 0.3)
                elif name.startswith("T") and i < 12:  # ribs
                    rx = x + math.cos(th) * side * (w + 120.0 - 3.0 * i) + 0.0
                    ry = y + 55.0
                    canvas.segment(x + side * w, y, rx, ry, 5.0, 0.3)
            canvas.ellipse(x - math.sin(th) * 0.35 * h, y - math.cos(th) * 0.35 * h + 0.5 * h,
                           0.12 * w, 0.45 * h, 0.25, theta=th, profile=True)
    if not lateral:
        # fused sacrum below S1
        x, y, th = path[-1]
        canvas.ellipse(x, y + 45.0, 48.0, 50.0, 0.45, profile=True)

    pix = _finish_radiograph(canvas, np.random.default_rng([seed, 30]), photometric, gain=0.9)
    series = _SeriesInfo(
        number=1,
        description="SPINE LAT" if lateral else "SPINE AP",
        modality=modality,
        body_part="SPINE",
        uid=ctx.uid("series", 1),
        time=ctx.study_dt + _dt.timedelta(minutes=1),
        protocol="WHOLE SPINE SCOLIOSIS",
    )
    sop_class = (
        DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    )
    ds = _base_dataset(ctx, series, sop_class, 1, None)
    _radiograph_header(
        ds, modality=modality, photometric=photometric, view="LL" if lateral else "AP",
        orientation=("P", "F") if lateral else ("L", "F"), spacing=spacing, rows=rows, cols=cols,
        pix=pix, kvp=85.0, region=("421060004", "SCT", "Spine"),
    )
    path_out = _write(ds, pix, out_dir / "1" / "1.dcm", tsuid)
    return SyntheticStudy(
        kind="xr",
        study_instance_uid=ctx.study_uid,
        paths=(path_out,),
        series_instance_uids=(series.uid,),
        vertebra_centres=centres,
        truth={"cobb_angle": str(cobb_deg), "cobb_upper": "T6", "cobb_lower": "T12"},
    )


def make_chest_radiograph(
    out_dir: Path, *, seed: int = 0, patient_id: str = "SYN-CHEST-0001"
) -> SyntheticStudy:
    """Write a PA chest DX - a non-spine study that spine routing must skip.

    Parameters
    ----------
    out_dir : Path
        Output directory; the file goes to ``out_dir/1/1.dcm``.
    seed : int, optional
        Seed for noise and UIDs.
    patient_id : str, optional
        PatientID.

    Returns
    -------
    SyntheticStudy
        With empty ``vertebra_centres`` and ``truth``.
    """
    ctx = _make_context(
        "chest", seed, patient_id, None, "CHEST PA", (), patient_name="SYNTHETIC^CHEST"
    )
    rows = cols = 512
    spacing = 0.84
    canvas = _Canvas(rows, cols, spacing)
    cx = cols * spacing / 2.0
    _trunk(canvas, cx, [(0, 55), (40, 70), (90, 190), (300, 185), (430, 180)], 0.9)
    for side in (-1.0, 1.0):
        canvas.ellipse(cx + side * 85.0, 215.0, 70.0, 150.0, -0.7, profile=True)
        canvas.segment(cx + side * 15.0, 75.0, cx + side * 165.0, 55.0, 6.0, 0.5)  # clavicles
        for k in range(10):
            y = 80.0 + 22.0 * k
            canvas.segment(cx + side * 12.0, y, cx + side * (150.0 - 2.0 * k), y + 45.0, 5.0, 0.25)
    canvas.ellipse(cx + 25.0, 270.0, 75.0, 65.0, 0.6, profile=True)  # heart (patient's left)
    canvas.ellipse(cx, 150.0, 22.0, 120.0, 0.4, profile=True)  # mediastinum
    for k in range(12):
        canvas.rotated_box(cx, 60.0 + 26.0 * k, 14.0 + k, 9.0 + 0.5 * k, 0.0, 0.25, rim=0.2)
    for side in (-1.0, 1.0):  # diaphragm / abdomen
        canvas.ellipse(cx + side * 85.0, 400.0, 95.0, 50.0, 0.5, profile=True)
    pix = _finish_radiograph(canvas, np.random.default_rng([seed, 40]), "MONOCHROME2", gain=0.9)
    series = _SeriesInfo(
        number=1,
        description="PA",
        modality="DX",
        body_part="CHEST",
        uid=ctx.uid("series", 1),
        time=ctx.study_dt + _dt.timedelta(minutes=1),
        protocol="CHEST PA",
    )
    ds = _base_dataset(ctx, series, DigitalXRayImageStorageForPresentation, 1, None)
    _radiograph_header(
        ds, modality="DX", photometric="MONOCHROME2", view="PA", orientation=("L", "F"),
        spacing=spacing, rows=rows, cols=cols, pix=pix, kvp=120.0, region=("51185008", "SCT", "Chest"),
    )
    path_out = _write(ds, pix, out_dir / "1" / "1.dcm", UID(ExplicitVRLittleEndian))
    return SyntheticStudy(
        kind="chest",
        study_instance_uid=ctx.study_uid,
        paths=(path_out,),
        series_instance_uids=(series.uid,),
        vertebra_centres={},
        truth={},
    )


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
