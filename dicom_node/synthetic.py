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
parameters and the caller's ``study_instance_uid`` (if given), but *not* from the
transfer syntax: the same phantom written with two lossless transfer syntaxes is
the same SOP instance, as DICOM intends.

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
All generated objects validate without *Error* lines.  Remaining *Warning* lines
are benign and expected; see ``_DCIODVFY_NOTES`` below for the list.
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
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ComputedRadiographyImageStorage,
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

#: Notable ``dciodvfy`` warnings that remain (none of them is an error):
#:
#: * "Dicom dataset contains retired attributes"-style notes do not occur; what does
#:   occur is dciodvfy's generic "may not be present"/"unrecognized" remarks for
#:   optional vendor-like attributes we add for realism, and for DX/CR
#:   ``PixelSpacing`` (we set it equal to ``ImagerPixelSpacing``, i.e. no
#:   magnification correction, which dciodvfy flags as a warning only).
_DCIODVFY_NOTES: Final = "see module docstring"


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
    """Derive a deterministic UID (``2.25.`` form) from ``parts``."""
    return str(generate_uid(prefix=None, entropy_srcs=[_UID_SALT, *(str(p) for p in parts)]))


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
    from pydicom.pixels import get_encoder

    try:
        encoder = get_encoder(uid)
    except NotImplementedError as exc:
        raise ValueError(
            f"transfer_syntax_uid {uid!s} ({uid.name}): no pixel data encoder is available "
            "in this environment (pydicom has none for it)"
        ) from exc
    if not encoder.is_available:
        missing = "; ".join(
            f"{name}: {', '.join(deps)}" for name, deps in encoder.missing_dependencies.items()
        ) if hasattr(encoder, "missing_dependencies") else ""
        raise ValueError(
            f"transfer_syntax_uid {uid!s} ({uid.name}): no pixel data encoder plugin is "
            f"installed ({missing})"
        )
    return uid


def _encoding_plugin(uid: UID) -> str:
    """Pick the fastest available encoding plugin for ``uid`` ('' = pydicom's choice)."""
    if uid == RLELossless:
        from pydicom.pixels import get_encoder

        encoder = get_encoder(uid)
        if "pylibjpeg" in getattr(encoder, "_available", {}):
            return "pylibjpeg"
    return ""


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
    outside = np.hypot(np.maximum(ax, 0.0), np.maximum(ay, 0.0))
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
    ds.ProcedureCodeSequence = DicomSequence()
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
_HU = np.array([-1000, -100, 50, 30, 10, 35, 30, 90, 75, 250, 800, 600, 85, 40, 80, 420], float)

_LUMBAR_LEVELS: Final = ("T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1", "S2", "S3")
# body height (mm), lateral semi-axis a, AP semi-axis b, tilt (rad; + = moving caudally goes posterior)
_LUMBAR_BODY: Final = {
    "T9": (20.0, 17.0, 13.0, -0.34),
    "T10": (21.0, 18.0, 13.5, -0.30),
    "T11": (22.0, 19.0, 14.0, -0.25),
    "T12": (23.0, 20.0, 14.5, -0.20),
    "L1": (24.0, 21.0, 15.0, -0.14),
    "L2": (25.0, 22.0, 15.5, -0.06),
    "L3": (26.0, 23.0, 16.0, 0.02),
    "L4": (26.0, 24.0, 16.5, 0.12),
    "L5": (25.0, 25.0, 17.0, 0.26),
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

    # Curves as functions of z (interpolated between segment centres).
    order = sorted(segs, key=lambda s: s.cz)
    zs = np.array([s.cz for s in order])
    canal_y = np.interp(z, zs, [s.cy + s.canal_u * math.cos(s.phi) for s in order])
    front_y = np.interp(z, zs, [s.cy - s.b * math.cos(s.phi) for s in order])
    half_width = np.interp(z, zs, [s.a for s in order])

    # Torso, subcutaneous fat, muscles, vessels, bowel gas.
    torso = (x / 150.0) ** 2 + (y / 115.0) ** 2
    lab[torso <= 1.0] = _FAT
    lab[(x / 135.0) ** 2 + (y / 101.0) ** 2 <= 1.0] = _VISCERA
    for gx, gy, gz, gr in model.gas:
        lab[((x - gx) ** 2 + (y - gy) ** 2 + (z - gz) ** 2 <= gr * gr) & (torso <= 0.8)] = _AIR
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

    # Pre-compute local coordinates per segment (only for points near it).
    zmin, zmax = float(z.min()), float(z.max())
    local: list[tuple[_Segment, NDArray[np.bool_], FloatArray, FloatArray, FloatArray]] = []
    for s in segs:
        reach = s.half_h + 45.0
        if s.cz + reach < zmin or s.cz - reach > zmax:
            continue
        dy, dz = y - s.cy, z - s.cz
        v = -math.sin(s.phi) * dy + math.cos(s.phi) * dz
        near = np.abs(v) <= reach
        if not near.any():
            continue
        u = math.cos(s.phi) * dy + math.sin(s.phi) * dz
        local.append((s, near, x, u, v))

    conus = model.vertebra("L1")
    # Pass 1: canal (CSF), cord and cauda equina.
    for s, near, xx, u, v in local:
        extent = near & (np.abs(v) <= s.half_h + 2.0)
        cu = u - s.canal_u
        sacral = s.name.startswith("S")
        ax, ay = (_CANAL_AX * 0.7, _CANAL_AY * 0.6) if sacral else (_CANAL_AX, _CANAL_AY)
        lab[extent & ((xx / ax) ** 2 + (cu / ay) ** 2 <= 1.0)] = _CSF
        above_conus = s.cz > conus.cz + conus.half_h
        if above_conus or s is conus:
            taper = np.ones_like(v) if above_conus else np.clip((v + 0.3 * s.half_h) / s.half_h, 0.0, 1.0)
            cord = (xx / (5.0 * taper + 1e-6)) ** 2 + ((cu + 0.5) / (4.0 * taper + 1e-6)) ** 2 <= 1.0
            lab[extent & cord] = _CORD
        if not above_conus and not sacral:
            for ox, ou in ((-4.5, 2.5), (4.5, 2.5), (-2.0, 4.5), (2.0, 4.5), (0.0, 5.5), (-6.5, 0.0), (6.5, 0.0)):
                lab[extent & ((xx - ox) ** 2 + (cu - ou) ** 2 <= 1.3)] = _CAUDA

    # Pass 2: discs.
    for s, near, xx, u, v in local:
        if not s.disc:
            continue
        qx = (np.sqrt((xx / (s.a + 1.0)) ** 2 + (u / (s.b + 1.0)) ** 2) - 1.0) * (s.b + 1.0)
        qy = np.abs(v) - (s.half_h + 1.5)
        disc = near & (_rounded_box_sdf(qx, qy, 1.5) <= 0.0)
        if s.name in _FUSED:
            lab[disc] = _CORTEX
            continue
        lab[disc] = _ANNULUS
        nucleus = (xx / (0.6 * s.a)) ** 2 + ((u + 0.1 * s.b) / (0.55 * s.b)) ** 2 + (
            v / (0.75 * s.half_h)
        ) ** 2 <= 1.0
        lab[disc & nucleus] = _DEGEN_NUCLEUS if s.name == model.herniation else _NUCLEUS

    # Pass 3: vertebral bodies and posterior elements.
    for s, near, xx, u, v in local:
        if s.disc:
            continue
        half_h: FloatArray | float = s.half_h
        if s.name == model.fracture:
            half_h = s.half_h * (0.78 + 0.22 * np.clip((u + s.b) / (2.0 * s.b), 0.0, 1.0))
        r = (np.abs(xx / s.a) ** 2.5 + np.abs(u / s.b) ** 2.5) ** 0.4
        d = _rounded_box_sdf((r - 1.0) * s.b, np.abs(v) - half_h, 2.5)
        body = near & (d <= 0.0)
        lab[body] = _CORTEX
        marrow = _FRACTURE_MARROW if s.name == model.fracture else _MARROW
        lab[body & (d <= -1.3)] = marrow

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
        ax = np.abs(xx)
        facets = (ax >= _CANAL_AX + 2.0) & (ax <= _CANAL_AX + 10.0) & (cu >= -3.0) & (
            cu <= _CANAL_AY + 3.0
        ) & (v >= -hh - 4.0) & (v <= 0.5 * hh)
        transverse = np.zeros_like(body)
        if s.name.startswith("L"):
            transverse = (ax >= _CANAL_AX + 4.0) & (ax <= _CANAL_AX + 34.0) & (np.abs(cu + 2.0) <= 4.0) & (
                np.abs(v - 0.05 * hh) <= 0.3 * hh
            )
        if s.name.startswith("S"):
            # Sacral ala instead of transverse processes.
            transverse = (ax >= s.a - 4.0) & (ax <= s.a + 38.0) & (np.abs(u) <= s.b) & (np.abs(v) <= hh)
        posterior = near & (arch | spinous | facets | transverse)
        lab[posterior & (lab != _CSF)] = _POSTERIOR

    # Pass 4: herniated disc material bulging posteriorly into the canal.
    if model.herniation is not None:
        for s, near, xx, u, v in local:
            if s.name != model.herniation:
                continue
            blob = ((xx - 4.0) / 8.0) ** 2 + ((u - s.b - 3.0) / 5.5) ** 2 + ((v + 1.5) / 6.0) ** 2 <= 1.0
            lab[near & blob] = _HERNIA
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
            pix = _to_uint12(np.hypot(sig + n1, n2))
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
            pix = _to_uint12(np.hypot(sig + noise.normal(0, 22.0, sig.shape), noise.normal(0, 22.0, sig.shape)))
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
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
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
