"""From a study on disk to the model's input images, keeping where every image came from.

:func:`prepare_inputs` is given the series the routing rules selected and produces, per modality:

* **MR** — the sagittal T2 series (plane from Image Orientation (Patient), weighting from the series
  description, else echo / repetition time): its mid-sagittal slice and two para-sagittal slices about
  16 mm either side (through the foramina), then, when an axial series was selected, one axial slice per
  disc block (contiguous group of slices), cranio-caudally, up to ``settings.max_images``.  Windowing uses
  the first usable VOI window of the instance, else the 0.5–99.5 percentiles of the image.
* **CT** — the axial stack (its longest evenly spaced run, ordered along the slice normal), resampled with
  SimpleITK onto isotropic mid-sagittal and mid-coronal planes through the spine (the median of the bone
  voxels), bone window (WL 500 / WW 2000).  Uncompressed slices are read straight from their files (stored
  values, each slice's Rescale Slope / Intercept applied where used, headers from ``load_study``); other
  transfer syntaxes go through SimpleITK's series reader (GDCM decodes JPEG, JPEG-LS, JPEG 2000, RLE).
  Only the voxels around each plane are converted to HU and resampled.  A reformat lists every
  contributing SOP instance and carries ``pixel_to_patient``.  A CT series that is not an axial stack is
  handled slice by slice like MR.
* **CR / DX** — Modality LUT and VOI LUT applied (pydicom), MONOCHROME1 (or an INVERSE Presentation LUT)
  inverted, the full field kept; AP/PA views first, then laterals.

Every image is resized so that its longest side is ``settings.image_size`` (rounded down to a multiple
of 28) and both sides are multiples of 28 — Qwen2.5-VL's 28×28 px per visual token — and described by an
:class:`~inference.findings.InputImage`: source series / SOP instance(s) / frame, and the affine from
model pixels to source pixels (single-slice images) or to patient LPS millimetres.

Nothing here logs or returns patient identifiers; image descriptions are generated, never copied from
DICOM text attributes.  Every failure to find a usable image raises
:class:`~inference.errors.UnusableStudyError` with the reason.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from inference.errors import UnusableStudyError
from inference.findings import ImagePlane, InputImage
from inference.inputs import ModelImage, ModelInput
from inference.settings import ModelSettings
from inference.study import Instance, Series, Study

__all__ = [
    "BONE_WINDOW",
    "PATCH",
    "SUPPORTED_MODALITIES",
    "classify_plane",
    "classify_weighting",
    "model_image_size",
    "prepare_inputs",
]

_log = logging.getLogger(__name__)

#: Qwen2.5-VL: 14 px patches merged 2×2, so 28×28 px per visual token.
PATCH: Final = 28
#: CT bone window (level, width) in HU.
BONE_WINDOW: Final = (500.0, 2000.0)
#: Modalities the model reads.
SUPPORTED_MODALITIES: Final = frozenset({"MR", "CT", "CR", "DX"})
_PARASAGITTAL_MM: Final = 16.0
_PERCENTILES: Final = (0.5, 99.5)
_MIN_VOLUME_SLICES: Final = 8
_AIR_HU: Final = -1024.0

FloatImage = npt.NDArray[np.float32]
_DECODE_ERRORS: Final = (
    AttributeError,
    ValueError,
    RuntimeError,
    NotImplementedError,
    OSError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    InvalidDicomError,
)


def _sitk() -> Any:
    """SimpleITK, imported lazily (its stubs are partial: treat it as untyped)."""
    return importlib.import_module("SimpleITK")


# ------------------------------------------------------------------------------------ classification
def classify_plane(orientation: Sequence[float] | None) -> ImagePlane | None:
    """Plane of an image from Image Orientation (Patient): the dominant axis of the slice normal.

    Returns ``None`` when the orientation is missing or degenerate.
    """
    if orientation is None or len(orientation) != 6:
        return None
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    if not np.all(np.isfinite(normal)) or np.linalg.norm(normal) < 1e-3:
        return None
    axis = int(np.argmax(np.abs(normal)))
    return (ImagePlane.SAGITTAL, ImagePlane.CORONAL, ImagePlane.AXIAL)[axis]


_T2 = re.compile(r"(?<![a-z0-9])(t2|stir|tirm|space|haste|ssfse|frfse|fiesta|myelo)", re.IGNORECASE)
_T1 = re.compile(r"(?<![a-z0-9])(t1|flair_t1|mprage|vibe|fl3d)", re.IGNORECASE)


def classify_weighting(description: str, echo_time: float | None, repetition_time: float | None) -> str:
    """``"T2"``, ``"T1"`` or ``""`` (unknown) from the series description, else from TE / TR (ms).

    The description wins (sites name their sequences); without a hint, TE ≥ 60 ms and TR ≥ 1500 ms is
    T2-weighted and TE ≤ 30 ms with TR ≤ 1000 ms is T1-weighted.
    """
    if _T2.search(description) and not _T1.search(description):
        return "T2"
    if _T1.search(description) and not _T2.search(description):
        return "T1"
    if echo_time is not None and repetition_time is not None:
        if echo_time >= 60 and repetition_time >= 1500:
            return "T2"
        if echo_time <= 30 and repetition_time <= 1000:
            return "T1"
    return ""


def model_image_size(rows: int, columns: int, image_size: int) -> tuple[int, int]:
    """Model image (rows, columns): longest side ``image_size`` (a multiple of 28), both multiples of 28.

    The aspect ratio is kept as closely as the 28-px grid allows; neither side is below 28.
    """
    longest = max(PATCH * 2, image_size - image_size % PATCH)
    scale = longest / max(rows, columns)
    out_rows = max(PATCH, round(rows * scale / PATCH) * PATCH)
    out_cols = max(PATCH, round(columns * scale / PATCH) * PATCH)
    return min(out_rows, longest), min(out_cols, longest)


# ------------------------------------------------------------------------------------ pixel reading
@dataclass(frozen=True)
class _Frame:
    """One decoded source frame, modality LUT applied, and its geometry."""

    pixels: FloatImage  # rows × columns (grey) or rows × columns × 3 (colour, 0–255)
    instance: Instance
    frame_number: int | None
    ds: Dataset
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    spacing: tuple[float, float] | None  # (row spacing, column spacing) mm


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _frame_geometry(
    ds: Dataset, frame_index: int
) -> tuple[tuple[float, float, float] | None, tuple[float, ...] | None, tuple[float, float] | None]:
    """Position, orientation and pixel spacing of a frame (per-frame groups of enhanced objects first)."""
    pos = _floats(ds.get("ImagePositionPatient"), 3)
    ori = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    for seq_name, index in (
        ("SharedFunctionalGroupsSequence", 0),
        ("PerFrameFunctionalGroupsSequence", frame_index),
    ):
        seq = ds.get(seq_name)
        if not seq or index >= len(seq):
            continue
        group = seq[index]
        if "PlanePositionSequence" in group and group.PlanePositionSequence:
            pos = _floats(group.PlanePositionSequence[0].get("ImagePositionPatient"), 3) or pos
        if "PlaneOrientationSequence" in group and group.PlaneOrientationSequence:
            ori = _floats(group.PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6) or ori
        if "PixelMeasuresSequence" in group and group.PixelMeasuresSequence:
            spacing = _floats(group.PixelMeasuresSequence[0].get("PixelSpacing"), 2) or spacing
    if spacing is not None and min(spacing) <= 0:
        spacing = None
    return pos, ori, spacing  # type: ignore[return-value]


def _read_pixels_pydicom(ds: Dataset, frame_index: int) -> npt.NDArray[Any]:
    from pydicom.pixels.processing import apply_color_lut, apply_modality_lut

    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = ds.pixel_array
    if n_frames > 1:
        arr = arr[frame_index]
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        return np.asarray(apply_color_lut(arr, ds), dtype=np.float32) * (255.0 / 65535.0)
    if arr.ndim == 3:  # colour: pydicom converts YBR to RGB by default
        bits = int(ds.get("BitsStored", 8) or 8)
        scale = np.float32(255.0 / (2**bits - 1))
        colour: npt.NDArray[np.float32] = np.asarray(arr, dtype=np.float32) * scale
        return colour
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)


def _read_pixels_sitk(path: Path, frame_index: int) -> npt.NDArray[Any]:
    sitk = _sitk()

    image = sitk.ReadImage(str(path))  # GDCM; applies the rescale slope / intercept
    arr = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        arr = arr[frame_index] if arr.ndim == 4 else arr
        return np.asarray(arr, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[frame_index]
    return np.asarray(arr, dtype=np.float32)


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def _read_frame(instance: Instance, frame_number: int | None) -> _Frame:
    """Decode one frame with pydicom (pylibjpeg / RLE handlers), falling back to SimpleITK (GDCM).

    Raises
    ------
    UnusableStudyError
        The file has no pixel data or neither decoder can read it.
    """
    index = (frame_number or 1) - 1
    try:
        ds = pydicom.dcmread(instance.path)
    except _DECODE_ERRORS as exc:
        raise UnusableStudyError(f"instance {instance.sop_instance_uid}: unreadable file ({exc})") from exc
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnusableStudyError(f"instance {instance.sop_instance_uid}: no pixel data")
    try:
        pixels = _read_pixels_pydicom(ds, index)
    except _DECODE_ERRORS as first:
        try:
            pixels = _read_pixels_sitk(instance.path, index)
        except _DECODE_ERRORS as second:
            raise UnusableStudyError(
                f"instance {instance.sop_instance_uid}: pixel data not decodable "
                f"(pydicom: {first}; SimpleITK: {_last_line(second)})"
            ) from second
        _log.info("instance %s decoded by SimpleITK (pydicom: %s)", instance.sop_instance_uid, first)
    if pixels.ndim not in (2, 3) or pixels.shape[0] < 2 or pixels.shape[1] < 2:
        raise UnusableStudyError(f"instance {instance.sop_instance_uid}: pixel array of shape {pixels.shape}")
    if not np.all(np.isfinite(pixels)):
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)
    if float(np.ptp(pixels)) == 0.0:
        raise UnusableStudyError(f"instance {instance.sop_instance_uid}: uniform pixel data (no image content)")
    pos, ori, spacing = _frame_geometry(ds, index)
    return _Frame(pixels.astype(np.float32, copy=False), instance, frame_number, ds, pos, ori, spacing)


# ------------------------------------------------------------------------------------ windowing
def _percentile_window(pixels: FloatImage) -> tuple[float, float]:
    lo, hi = (float(v) for v in np.percentile(pixels, _PERCENTILES))
    if hi <= lo:
        lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _voi_window(ds: Dataset, pixels: FloatImage) -> tuple[float, float] | None:
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


def _to_uint8(pixels: FloatImage, lo: float, hi: float, *, invert: bool = False) -> npt.NDArray[np.uint8]:
    scaled = (pixels - lo) * (255.0 / (hi - lo))
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    result: npt.NDArray[np.uint8] = np.subtract(255, out, dtype=np.uint8) if invert else out
    return result


def _resize(pixels: FloatImage, rows: int, columns: int) -> FloatImage:
    """Resize (anti-aliased, pixel-centre convention) a float image or an RGB float image."""
    from PIL import Image

    if pixels.shape[:2] == (rows, columns):
        return pixels
    if pixels.ndim == 2:
        img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
        return np.asarray(img.resize((columns, rows), Image.Resampling.BILINEAR, reducing_gap=None), np.float32)
    channels = [_resize(pixels[:, :, c], rows, columns) for c in range(pixels.shape[2])]
    return np.stack(channels, axis=2)


def _pixel_to_source(rows: int, columns: int, src_rows: int, src_cols: int) -> tuple[float, ...]:
    sx, sy = src_cols / columns, src_rows / rows
    return (sx, 0.0, 0.5 * sx - 0.5, 0.0, sy, 0.5 * sy - 0.5)


def _slice_to_patient(frame: _Frame, p2s: Sequence[float], thickness: float) -> tuple[float, ...] | None:
    """3×4 model-pixel → patient affine of an image cut from one frame (None without geometry)."""
    if frame.position is None or frame.orientation is None or frame.spacing is None:
        return None
    row_dir = np.asarray(frame.orientation[:3])
    col_dir = np.asarray(frame.orientation[3:])
    normal = np.cross(row_dir, col_dir)
    # source pixel (c, r) → IPP + c * Δcolumn * row_dir + r * Δrow * col_dir
    src = np.column_stack([row_dir * frame.spacing[1], col_dir * frame.spacing[0], np.asarray(frame.position)])
    affine2d = np.array([[p2s[0], p2s[1], p2s[2]], [p2s[3], p2s[4], p2s[5]], [0.0, 0.0, 1.0]])
    m = src @ affine2d  # 3×3: (column, row, 1) → LPS
    out = np.column_stack([m[:, 0], m[:, 1], normal * thickness, m[:, 2]])
    return tuple(float(v) for v in out.ravel())


# ------------------------------------------------------------------------------------ images
class _Builder:
    """Collects model images with consecutive indices."""

    def __init__(self, settings: ModelSettings, study: Study) -> None:
        self.settings = settings
        self.study = study
        self.images: list[ModelImage] = []

    @property
    def full(self) -> bool:
        return len(self.images) >= self.settings.max_images

    def add_slice(
        self,
        frame: _Frame,
        series: Series,
        plane: ImagePlane,
        description: str,
        *,
        window: tuple[float, float] | None = None,
        invert: bool = False,
    ) -> None:
        src_rows, src_cols = frame.pixels.shape[:2]
        rows, cols = model_image_size(src_rows, src_cols, self.settings.image_size)
        resized = _resize(frame.pixels, rows, cols)
        if resized.ndim == 3:
            pixels = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
        else:
            if window is None:
                window = _voi_window(frame.ds, frame.pixels) or _percentile_window(frame.pixels)
            pixels = _to_uint8(resized, *window, invert=invert)
        if int(pixels.max()) == int(pixels.min()):
            raise UnusableStudyError(
                f"instance {frame.instance.sop_instance_uid}: image is blank after windowing ({description})"
            )
        p2s = _pixel_to_source(rows, cols, src_rows, src_cols)
        thickness = float(frame.ds.get("SliceThickness", 0) or 0) if plane is not ImagePlane.PROJECTION else 0.0
        p2p = _slice_to_patient(frame, p2s, thickness) if plane is not ImagePlane.PROJECTION else None
        ref = InputImage(
            index=len(self.images),
            plane=plane,
            modality=series.modality,
            series_instance_uid=series.series_instance_uid,
            sop_class_uid=frame.instance.sop_class_uid,
            sop_instance_uids=(frame.instance.sop_instance_uid,),
            frame_number=frame.frame_number,
            rows=rows,
            columns=cols,
            description=description,
            pixel_to_source=p2s,  # type: ignore[arg-type]
            pixel_to_patient=p2p,
        )
        self.images.append(ModelImage(pixels=pixels, ref=ref))

    def add_reformat(
        self,
        pixels: npt.NDArray[np.uint8],
        series: Series,
        instances: Sequence[Instance],
        plane: ImagePlane,
        description: str,
        pixel_to_patient: tuple[float, ...],
    ) -> None:
        ref = InputImage(
            index=len(self.images),
            plane=plane,
            modality=series.modality,
            series_instance_uid=series.series_instance_uid,
            sop_class_uid=instances[0].sop_class_uid,
            sop_instance_uids=tuple(i.sop_instance_uid for i in instances),
            frame_number=None,
            rows=int(pixels.shape[0]),
            columns=int(pixels.shape[1]),
            description=description,
            pixel_to_source=None,
            pixel_to_patient=pixel_to_patient,
        )
        self.images.append(ModelImage(pixels=pixels, ref=ref))


def _frames_of(series: Series) -> list[tuple[Instance, int | None]]:
    """Every (instance, frame number) of a series; frame number None for single-frame instances."""
    out: list[tuple[Instance, int | None]] = []
    for inst in series.instances:
        if inst.number_of_frames > 1:
            out.extend((inst, f) for f in range(1, inst.number_of_frames + 1))
        else:
            out.append((inst, None))
    return out


def _header(study: Study, instance: Instance) -> Dataset:
    """The instance's header, as :func:`~inference.study.load_study` read it (else read now)."""
    try:
        return study.header(instance)
    except _DECODE_ERRORS as exc:
        raise UnusableStudyError(f"instance {instance.sop_instance_uid}: unreadable header ({exc})") from exc


def _normal(series: Series) -> npt.NDArray[np.float64] | None:
    if series.image_orientation is None:
        return None
    n = np.cross(np.asarray(series.image_orientation[:3]), np.asarray(series.image_orientation[3:]))
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 1e-3 else None


def _sorted_positions(series: Series) -> list[tuple[float, Instance]]:
    """Instances with a position, sorted along the slice normal (instance order when unknown)."""
    normal = _normal(series)
    with_pos = [i for i in series.instances if i.image_position is not None and i.number_of_frames == 1]
    if normal is None or len(with_pos) != len(series.instances):
        return [(float(k), inst) for k, inst in enumerate(series.instances)]
    return sorted(((float(np.dot(normal, i.image_position)), i) for i in with_pos), key=lambda t: t[0])  # type: ignore[arg-type]


def _first_readable(candidates: Sequence[tuple[Instance, int | None]]) -> tuple[_Frame | None, list[str]]:
    reasons: list[str] = []
    for inst, frame in candidates:
        try:
            return _read_frame(inst, frame), reasons
        except UnusableStudyError as exc:
            reasons.append(str(exc))
    return None, reasons


# ------------------------------------------------------------------------------------ MR (and slice-wise CT)
@dataclass(frozen=True)
class _SeriesInfo:
    series: Series
    plane: ImagePlane | None
    weighting: str


def _series_info(study: Study, series: Series) -> _SeriesInfo:
    ds = _header(study, series.instances[0])
    plane = classify_plane(series.image_orientation)
    if plane is None:
        _pos, ori, _sp = _frame_geometry(ds, 0)
        plane = classify_plane(ori)
    te = _floats([ds.get("EchoTime")], 1) if ds.get("EchoTime") not in (None, "") else None
    tr = _floats([ds.get("RepetitionTime")], 1) if ds.get("RepetitionTime") not in (None, "") else None
    text = f"{series.series_description} {series.protocol_name}"
    weighting = (
        classify_weighting(text, te[0] if te else None, tr[0] if tr else None) if series.modality == "MR" else ""
    )
    return _SeriesInfo(series, plane, weighting)


def _pick_sagittal(infos: Sequence[_SeriesInfo]) -> _SeriesInfo:
    """Sagittal T2 first, then sagittal unknown weighting, sagittal T1, then any other plane."""

    def rank(info: _SeriesInfo) -> tuple[int, int, int]:
        plane_rank = 0 if info.plane is ImagePlane.SAGITTAL else 1
        weight_rank = {"T2": 0, "": 1, "T1": 2}[info.weighting]
        return (plane_rank, weight_rank, -len(info.series.instances))

    return min(infos, key=rank)


def _stack_images(builder: _Builder, info: _SeriesInfo, budget: int) -> None:
    """Mid slice and para-sagittal slices (about 16 mm either side) of a stack."""
    series = info.series
    plane = info.plane or ImagePlane.AXIAL
    positions = _sorted_positions(series)
    frames: list[tuple[float, Instance, int | None]]
    if len(positions) == 1 and series.instances[0].number_of_frames > 1:
        frames = [(float(f or 0), i, f) for i, f in _frames_of(series)]
    else:
        frames = [(p, i, None) for p, i in positions]
    n = len(frames)
    mid = n // 2
    spacing = (frames[-1][0] - frames[0][0]) / (n - 1) if n > 1 else 0.0
    step = max(1, round(_PARASAGITTAL_MM / abs(spacing))) if spacing else max(1, n // 4)
    picks = [mid, mid - step, mid + step]
    chosen: list[int] = []
    for k in picks:
        k = min(max(k, 0), n - 1)
        if k not in chosen:
            chosen.append(k)
    chosen = chosen[:budget]
    weighting = f" {info.weighting}" if info.weighting else ""
    normal = _normal(series)
    reasons: list[str] = []
    for k in chosen:
        pos, inst, frame_number = frames[k]
        try:
            frame = _read_frame(inst, frame_number)
        except UnusableStudyError as exc:
            reasons.append(str(exc))
            continue
        if k == mid:
            where = "mid-sagittal slice" if plane is ImagePlane.SAGITTAL else f"middle {plane.value} slice"
        else:
            offset = pos - frames[mid][0]
            if plane is ImagePlane.SAGITTAL and normal is not None and spacing:
                # LPS: +x is the patient's left
                side = "left" if offset * normal[0] > 0 else "right"
                where = f"{side} para-sagittal slice ({abs(offset):.0f} mm from the mid slice)"
            else:
                where = f"{plane.value} slice {k + 1} of {n}"
        builder.add_slice(frame, series, plane, f"{plane.value}{weighting}, {where}".strip())
    if not builder.images and reasons:
        raise UnusableStudyError(f"series {series.series_instance_uid}: {reasons[0]}")


def _axial_blocks(series: Series) -> list[list[tuple[float, Instance]]]:
    """Group axial slices into blocks (one per disc level on a typical spine protocol)."""
    positions = _sorted_positions(series)
    if len(positions) <= 1:
        return [positions] if positions else []
    gaps = np.diff([p for p, _ in positions])
    typical = float(np.median(gaps)) if len(gaps) else 0.0
    blocks: list[list[tuple[float, Instance]]] = [[positions[0]]]
    for gap, item in zip(gaps, positions[1:], strict=True):
        if typical > 0 and gap > 1.8 * typical:
            blocks.append([item])
        else:
            blocks[-1].append(item)
    if len(blocks) == 1:  # one contiguous stack: treat each slice as its own block (sampled evenly below)
        blocks = [[item] for item in positions]
    return blocks


def _axial_images(builder: _Builder, info: _SeriesInfo, budget: int) -> None:
    blocks = _axial_blocks(info.series)
    if not blocks or budget <= 0:
        return
    blocks = blocks[::-1]  # cranio-caudal: highest patient z first (LPS +z is head)
    normal = _normal(info.series)
    if normal is not None and normal[2] < 0:
        blocks = blocks[::-1]
    if len(blocks) > budget:
        idx = np.linspace(0, len(blocks) - 1, budget).round().astype(int)
        blocks = [blocks[i] for i in dict.fromkeys(idx.tolist())]
    weighting = f" {info.weighting}" if info.weighting else ""
    for b, block in enumerate(blocks):
        _pos, inst = block[len(block) // 2]
        try:
            frame = _read_frame(inst, None)
        except UnusableStudyError as exc:
            _log.warning("axial slice skipped: %s", exc)
            continue
        builder.add_slice(
            frame,
            info.series,
            ImagePlane.AXIAL,
            f"axial{weighting}, block {b + 1} of {len(blocks)} (cranio-caudal)",
        )


def _mr_inputs(builder: _Builder, series: Sequence[Series]) -> None:
    infos = [_series_info(builder.study, s) for s in series]
    main = _pick_sagittal(infos)
    _log.info(
        "MR: series %s chosen (plane %s, weighting %s)",
        main.series.series_number,
        main.plane.value if main.plane else "unknown",
        main.weighting or "unknown",
    )
    _stack_images(builder, main, min(3, builder.settings.max_images))
    if main.plane is ImagePlane.SAGITTAL:
        axials = [i for i in infos if i.plane is ImagePlane.AXIAL and i is not main]
        if axials:
            best = min(axials, key=lambda i: ({"T2": 0, "": 1, "T1": 2}[i.weighting], -len(i.series.instances)))
            _axial_images(builder, best, builder.settings.max_images - len(builder.images))


# ------------------------------------------------------------------------------------ CT
def _longest_uniform_run(positions: Sequence[tuple[float, Instance]]) -> list[tuple[float, Instance]]:
    """The longest run of slices with a uniform spacing (within 10 %) and no duplicates."""
    if len(positions) < 3:
        return list(positions)
    gaps = np.diff([p for p, _ in positions])
    typical = float(np.median(gaps))
    if typical <= 1e-3:
        return []
    best: tuple[int, int] = (0, 1)
    start = 0
    for k, gap in enumerate(gaps):
        if abs(gap - typical) > 0.1 * typical:
            start = k + 1
        if (k + 2 - start) > (best[1] - best[0]):
            best = (start, k + 2)
    return list(positions[best[0] : best[1]])


def _read_volume(run: Sequence[tuple[float, Instance]]) -> Any:
    """The CT stack as a SimpleITK image in HU (GDCM series reader; pydicom stack as fallback)."""
    sitk = _sitk()

    paths = [str(inst.path) for _, inst in run]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(paths)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        _log.info("SimpleITK series read failed (%s); stacking with pydicom", str(exc).strip().splitlines()[-1:])
    frames = [_read_frame(inst, None) for _, inst in run]
    first = frames[0]
    if first.position is None or first.orientation is None or first.spacing is None or first.pixels.ndim != 2:
        raise UnusableStudyError("CT: slices lack the geometry to build a volume")
    vol = sitk.GetImageFromArray(np.stack([f.pixels for f in frames]).astype(np.float32))
    row_dir, col_dir = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    dz = (run[-1][0] - run[0][0]) / (len(run) - 1)
    normal = np.cross(row_dir, col_dir)
    vol.SetOrigin(first.position)
    vol.SetSpacing((first.spacing[1], first.spacing[0], abs(dz)))
    vol.SetDirection(tuple(np.column_stack([row_dir, col_dir, normal * np.sign(dz)]).ravel()))
    return vol


#: Rows ``j0..j1`` (inclusive) of slice ``k`` of a stack: (j1 - j0 + 1) × columns values.
RowReader = Callable[[int, int, int], npt.NDArray[Any]]


@dataclass(frozen=True)
class _Stack:
    """A CT stack of slices (slices × rows × columns) with, per slice, the rescale to HU.

    ``read_rows`` gives a slice's values: stored values read from uncompressed files when asked for (the
    stack is never held whole), or already HU from a volume SimpleITK read (slope 1, intercept 0).
    Voxel index (i, j, k) = (column, row, slice) lies at ``origin + direction @ (spacing * (i, j, k))``
    in patient LPS mm, SimpleITK's convention.
    """

    shape: tuple[int, int, int]  # (slices, rows, columns)
    read_rows: RowReader
    slope: npt.NDArray[np.float64]
    intercept: npt.NDArray[np.float64]
    origin: npt.NDArray[np.float64]
    spacing: npt.NDArray[np.float64]
    direction: npt.NDArray[np.float64]

    @property
    def size(self) -> tuple[int, int, int]:
        """(columns, rows, slices): SimpleITK's (i, j, k) order."""
        nz, ny, nx = self.shape
        return nx, ny, nz

    def to_point(self, index: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Continuous index (i, j, k) (or an array of them, one per row) → patient LPS mm."""
        idx = np.asarray(index, dtype=np.float64)
        out: npt.NDArray[np.float64] = (idx * self.spacing) @ self.direction.T + self.origin
        return out

    def to_index(self, point: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Patient LPS mm (or an array of points, one per row) → continuous index (i, j, k)."""
        m = self.direction * self.spacing  # columns scaled by the spacing
        out = np.linalg.solve(m, (np.asarray(point, dtype=np.float64) - self.origin).T).T
        return np.asarray(out, dtype=np.float64)

    def above(self, k: int, hu: float, columns: slice) -> npt.NDArray[np.bool_]:
        """Mask of slice ``k`` (restricted to ``columns``) where the value in HU exceeds ``hu``."""
        v = self.read_rows(k, 0, self.shape[1] - 1)[:, columns]
        m, b = float(self.slope[k]), float(self.intercept[k])
        if m == 0.0:
            return np.full(v.shape, b > hu)
        t = (hu - b) / m
        if v.dtype.kind in "iu":  # compare stored integers against the threshold's integer bound
            info = np.iinfo(v.dtype)
            bound = math.floor(t) if m > 0 else math.ceil(t)
            if bound < info.min or bound > info.max:
                return np.full(v.shape, (bound < info.min) == (m > 0))
            limit = v.dtype.type(bound)
            mask: npt.NDArray[np.bool_] = v > limit if m > 0 else v < limit
            return mask
        mask = v > t if m > 0 else v < t
        return mask

    def blocks(self, boxes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[npt.NDArray[np.float32]]:
        """The blocks of voxels lo..hi (inclusive (i, j, k) indices) in HU, float32, index order (k, j, i);
        each slice is read once for all of them."""
        if not boxes:
            return []
        k0, k1 = min(lo[2] for lo, _ in boxes), max(hi[2] for _, hi in boxes)
        j0, j1 = min(lo[1] for lo, _ in boxes), max(hi[1] for _, hi in boxes)
        parts: list[list[npt.NDArray[Any]]] = [[] for _ in boxes]
        for k in range(k0, k1 + 1):
            rows = self.read_rows(k, j0, j1)
            for part, (lo, hi) in zip(parts, boxes, strict=True):
                if lo[2] <= k <= hi[2]:
                    # a copy: a view would keep every slice read alive
                    part.append(rows[lo[1] - j0 : hi[1] - j0 + 1, lo[0] : hi[0] + 1].copy())
        out = []
        for part, (lo, hi) in zip(parts, boxes, strict=True):
            block = np.stack(part).astype(np.float64)
            block *= self.slope[lo[2] : hi[2] + 1, None, None]
            block += self.intercept[lo[2] : hi[2] + 1, None, None]
            out.append(block.astype(np.float32))
        return out


def _stack_from_image(vol: Any) -> _Stack:
    """A SimpleITK volume (HU) as a :class:`_Stack`."""
    sitk = _sitk()

    values = sitk.GetArrayFromImage(vol)
    n = values.shape[0]

    def read_rows(k: int, j0: int, j1: int) -> npt.NDArray[Any]:
        rows: npt.NDArray[Any] = values[k, j0 : j1 + 1]
        return rows

    return _Stack(
        shape=(int(values.shape[0]), int(values.shape[1]), int(values.shape[2])),
        read_rows=read_rows,
        slope=np.ones(n),
        intercept=np.zeros(n),
        origin=np.asarray(vol.GetOrigin(), dtype=np.float64),
        spacing=np.asarray(vol.GetSpacing(), dtype=np.float64),
        direction=np.asarray(vol.GetDirection(), dtype=np.float64).reshape(3, 3),
    )


#: Uncompressed little-endian transfer syntaxes whose pixel data the CT stack reads straight from the file
#: (value: implicit VR).
_NATIVE_SYNTAXES: Final = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}
_PIXEL_DATA_TAG: Final = b"\xe0\x7f\x10\x00"
#: The header elements every slice of a directly read stack must agree on (keyword, tag).
_STACK_FORMAT: Final = (
    ("Rows", 0x00280010),
    ("Columns", 0x00280011),
    ("BitsAllocated", 0x00280100),
    ("BitsStored", 0x00280101),
    ("HighBit", 0x00280102),
    ("PixelRepresentation", 0x00280103),
    ("SamplesPerPixel", 0x00280002),
    ("PhotometricInterpretation", 0x00280004),
    ("PixelSpacing", 0x00280030),
    ("ImageOrientationPatient", 0x00200037),
)
_FORBIDDEN_IN_STACK: Final = (0x00283000, 0x7FE00008, 0x7FE00009)  # Modality LUT, float pixel data


def _raw_key(ds: Dataset, tag: int) -> object:
    """A cheap identity for an element's value: its raw bytes when not yet decoded, else its value."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if getattr(elem, "is_raw", False):
        return elem.value
    return ("decoded", str(elem.value))


def _decoded(ds: Dataset, keyword: str) -> Any:
    value = ds.get(keyword)
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return tuple(float(v) for v in value)
    return value


def _read_stack_fast(study: Study, run: Sequence[tuple[float, Instance]]) -> _Stack | None:
    """The stack's stored values read straight from uncompressed files, with the headers ``load_study``
    already read; ``None`` when the slices are not all uncompressed single-frame 16-bit monochrome images
    of one format and geometry (the caller then uses SimpleITK).
    """
    instances = [inst for _, inst in run]
    headers = [study.headers.get(inst.sop_instance_uid) for inst in instances]
    if any(h is None for h in headers) or len(instances) < 2 or any(i.number_of_frames != 1 for i in instances):
        return None
    hdrs: list[Dataset] = headers  # type: ignore[assignment]
    formats: dict[tuple[object, ...], Dataset] = {}
    rescales: dict[tuple[object, object], tuple[float, float]] = {}
    slope = np.empty(len(hdrs))
    intercept = np.empty(len(hdrs))
    syntaxes: set[object] = set()
    try:
        for k, ds in enumerate(hdrs):
            meta = getattr(ds, "file_meta", None)
            syntax = _raw_key(meta, 0x00020010) if meta is not None else None
            syntaxes.add(syntax)
            if any(ds.get_item(tag) is not None for tag in _FORBIDDEN_IN_STACK):
                return None
            formats.setdefault((syntax, *(_raw_key(ds, tag) for _, tag in _STACK_FORMAT)), ds)
            key = (_raw_key(ds, 0x00281053), _raw_key(ds, 0x00281052))
            if key not in rescales:
                m, b = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
                rescales[key] = (1.0 if m in (None, "") else float(m), 0.0 if b in (None, "") else float(b))
            slope[k], intercept[k] = rescales[key]
        decoded = {
            tuple([str(ds.file_meta.get("TransferSyntaxUID", ""))] + [_decoded(ds, kw) for kw, _ in _STACK_FORMAT])
            for ds in formats.values()
        }
    except (TypeError, ValueError, AttributeError, KeyError):
        return None
    if len(decoded) != 1 or not (np.all(np.isfinite(slope)) and np.all(np.isfinite(intercept))):
        return None
    syntax_uid, rows, cols, allocated, stored, high_bit, representation, samples, photometric, ps, iop = next(
        iter(decoded)
    )
    if (
        syntax_uid not in _NATIVE_SYNTAXES
        or allocated != 16
        or not isinstance(stored, int)
        or not 1 <= stored <= 16
        or high_bit != stored - 1
        or representation not in (0, 1)
        or samples != 1
        or photometric != "MONOCHROME2"
        or not isinstance(rows, int)
        or not isinstance(cols, int)
        or rows < 2
        or cols < 2
        or not isinstance(ps, tuple)
        or len(ps) != 2
        or min(ps) <= 0
        or not isinstance(iop, tuple)
        or len(iop) != 6
    ):
        return None
    step = _slice_step(run)
    first = instances[0].image_position
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    if step is None or first is None:
        return None
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3:
        return None
    dz = float(np.linalg.norm(step))
    direction = np.column_stack([row_dir, col_dir, step / dz])
    if abs(float(np.linalg.det(direction))) < 1e-3:
        return None
    n_bytes = rows * cols * 2
    implicit = _NATIVE_SYNTAXES[str(syntax_uid)]
    offsets: list[int] = []
    for inst in instances:
        offset = _native_pixel_offset(inst.path, n_bytes, implicit)
        if offset is None:
            _log.info(
                "CT: pixel data of instance %s not at the end of its file; SimpleITK reads the stack",
                inst.sop_instance_uid,
            )
            return None
        offsets.append(offset)
    slices = _NativeSlices(
        paths=tuple(inst.path for inst in instances),
        offsets=tuple(offsets),
        columns=cols,
        dtype=np.dtype("<u2" if representation == 0 else "<i2"),
        bits_stored=stored,
    )
    return _Stack(
        shape=(len(instances), rows, cols),
        read_rows=slices.read_rows,
        slope=slope,
        intercept=intercept,
        origin=np.asarray(first, dtype=np.float64),
        spacing=np.array([ps[1], ps[0], dz]),
        direction=direction,
    )


def _native_pixel_offset(path: Path, n_bytes: int, implicit: bool) -> int | None:
    """File offset of the pixel values when a Pixel Data element of ``n_bytes`` ends the file, else None."""
    head = 8 if implicit else 12
    length = n_bytes.to_bytes(4, "little")
    expected = (
        [_PIXEL_DATA_TAG + length]
        if implicit
        else [_PIXEL_DATA_TAG + vr + b"\x00\x00" + length for vr in (b"OW", b"OB")]
    )
    try:
        with open(path, "rb") as f:
            start = os.fstat(f.fileno()).st_size - n_bytes - head
            if start < 132:
                return None
            f.seek(start)
            return start + head if f.read(head) in expected else None
    except OSError:
        return None


@dataclass(frozen=True)
class _NativeSlices:
    """Reads rows of uncompressed 16-bit slices from their files (the page cache holds what was received)."""

    paths: tuple[Path, ...]
    offsets: tuple[int, ...]
    columns: int
    dtype: np.dtype[Any]
    bits_stored: int

    def read_rows(self, k: int, j0: int, j1: int) -> npt.NDArray[Any]:
        out = np.empty((j1 - j0 + 1, self.columns), dtype=self.dtype)
        try:
            fd = os.open(self.paths[k], os.O_RDONLY)
            try:
                got = os.preadv(fd, [memoryview(out).cast("B")], self.offsets[k] + j0 * self.columns * 2)  # type: ignore[arg-type]
            finally:
                os.close(fd)
            complete = got == out.nbytes
        except OSError as exc:
            raise UnusableStudyError(f"CT slice {self.paths[k].name}: unreadable ({exc})") from exc
        if not complete:
            raise UnusableStudyError(f"CT slice {self.paths[k].name}: pixel data cut short")
        if self.bits_stored < 16:  # only the stored bits are the value (PS3.5 8.1.1)
            shift = 16 - self.bits_stored
            if self.dtype.kind == "u":
                np.bitwise_and(out, np.uint16((1 << self.bits_stored) - 1), out=out)
            else:
                np.left_shift(out, np.int16(shift), out=out)
                np.right_shift(out, np.int16(shift), out=out)
        return out


def _slice_step(run: Sequence[tuple[float, Instance]]) -> npt.NDArray[np.float64] | None:
    """Patient-space step from one slice to the next (first to last position over the run), or None.

    Along the slice normal for an ordinary stack; oblique to it with gantry tilt (a sheared stack).
    """
    first, last = run[0][1].image_position, run[-1][1].image_position
    if first is None or last is None or len(run) < 2:
        return None
    step = (np.asarray(last, dtype=np.float64) - np.asarray(first, dtype=np.float64)) / (len(run) - 1)
    norm = float(np.linalg.norm(step))
    return step if math.isfinite(norm) and norm > 1e-6 else None


def _read_stack(study: Study, run: Sequence[tuple[float, Instance]]) -> _Stack:
    """The CT stack: straight from uncompressed files when possible, else SimpleITK's series reader.

    Either way the third axis is the step between the slices' positions: SimpleITK's series reader takes
    the slice normal for it (with the step's length), which misplaces every slice of a gantry-tilted stack.
    """
    stack = _read_stack_fast(study, run)
    if stack is not None:
        return stack
    stack = _stack_from_image(_read_volume(run))
    step = _slice_step(run)
    if step is None or len(run) != stack.shape[0]:
        return stack
    dz = float(np.linalg.norm(step))
    direction = stack.direction.copy()
    direction[:, 2] = step / dz
    if abs(float(np.linalg.det(direction))) < 1e-3:
        return stack
    origin = np.asarray(run[0][1].image_position, dtype=np.float64)
    spacing = np.array([stack.spacing[0], stack.spacing[1], dz])
    return replace(stack, origin=origin, spacing=spacing, direction=direction)


def _spine_centre(stack: _Stack) -> npt.NDArray[np.float64]:
    """Patient (LPS) point on the spine: sagittal plane through the bone's median column, coronal plane
    through the vertebral bodies (the peak of the bone-voxel profile along the AP axis near that column).
    Falls back to the volume centre when there is hardly any bone.
    """
    nx, ny, nz = stack.size
    centre = [(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2]
    x0 = nx // 4 if nx >= 8 else 0
    bone = np.zeros((ny, nx), dtype=np.int32)  # bone voxels over all slices, per (row, column): one pass
    for k in range(nz):
        bone += stack.above(k, 150.0, slice(None))
    counts = bone[:, x0 : nx - x0].sum(axis=0, dtype=np.int64)  # per column of the central half
    total = int(counts.sum())
    if total >= 50:
        cumulative = np.cumsum(counts)

        def nth(r: int) -> int:  # the r-th (0-based) column index of the sorted bone voxels
            return int(np.searchsorted(cumulative, r, side="right"))

        median = nth(total // 2) if total % 2 else (nth(total // 2 - 1) + nth(total // 2)) / 2
        centre[0] = float(median) + x0
        sx = float(stack.spacing[0])
        half = max(1, round(8.0 / sx))  # a 16 mm strip around the mid-sagittal column
        i0, i1 = max(0, round(centre[0]) - half), min(nx, round(centre[0]) + half + 1)
        profile = bone[:, i0:i1].sum(axis=1).astype(float)
        width = max(1, round(10.0 / float(stack.spacing[1])))
        smooth = np.convolve(profile, np.ones(width) / width, mode="same")
        if smooth.max() > 0:
            peak = int(np.argmax(smooth))
            lo, hi = peak, peak
            while lo > 0 and smooth[lo - 1] >= 0.5 * smooth[peak]:
                lo -= 1
            while hi < ny - 1 and smooth[hi + 1] >= 0.5 * smooth[peak]:
                hi += 1
            centre[1] = (lo + hi) / 2
    return stack.to_point(centre)


def _plane_grid(
    stack: _Stack, centre: npt.NDArray[np.float64], plane: ImagePlane, image_size: int
) -> tuple[Any, npt.NDArray[np.float64], tuple[int, ...], tuple[int, ...]]:
    """The isotropic plane through ``centre`` as a SimpleITK reference image (columns A→P for sagittal,
    R→L for coronal; rows H→F), its 3×4 model-pixel → patient affine, and the inclusive (i, j, k) index box
    of the voxels its samples interpolate from (its corners' indices, one voxel of margin).
    """
    sitk = _sitk()

    size = np.asarray(stack.size, dtype=float)
    corners = stack.to_point(
        [[c * (s - 1) for c, s in zip(corner, size, strict=True)] for corner in np.ndindex(2, 2, 2)]
    )
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    col_dir = np.array([0.0, 1.0, 0.0]) if plane is ImagePlane.SAGITTAL else np.array([1.0, 0.0, 0.0])
    row_dir = np.array([0.0, 0.0, -1.0])
    normal = np.cross(col_dir, row_dir)
    axis = 1 if plane is ImagePlane.SAGITTAL else 0
    width_mm, height_mm = hi[axis] - lo[axis], hi[2] - lo[2]
    rows, cols = model_image_size(max(1, round(height_mm)), max(1, round(width_mm)), image_size)
    spacing = max(width_mm / cols, height_mm / rows)  # isotropic: the whole volume fits
    origin = centre.copy()
    origin[axis] = (lo[axis] + hi[axis]) / 2 - spacing * (cols - 1) / 2
    origin[2] = (lo[2] + hi[2]) / 2 + spacing * (rows - 1) / 2
    ref = sitk.Image(int(cols), int(rows), 1, sitk.sitkFloat32)
    ref.SetSpacing((spacing, spacing, spacing))
    ref.SetOrigin(tuple(float(v) for v in origin))
    ref.SetDirection(tuple(np.column_stack([col_dir, row_dir, normal]).ravel()))
    affine = np.column_stack([col_dir * spacing, row_dir * spacing, normal * spacing, origin])
    plane_corners = [
        origin + col_dir * spacing * c + row_dir * spacing * r for c in (0, cols - 1) for r in (0, rows - 1)
    ]
    idx = stack.to_index(plane_corners)
    top = np.asarray(stack.size) - 1
    first = tuple(int(v) for v in np.clip(np.floor(idx.min(axis=0)).astype(int) - 1, 0, top))
    last = tuple(int(v) for v in np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1, 0, top))
    return ref, affine, first, last


def _reformats(
    stack: _Stack, centre: npt.NDArray[np.float64], planes: Sequence[ImagePlane], image_size: int
) -> list[tuple[npt.NDArray[np.uint8], tuple[float, ...]]]:
    """Resample isotropic planes through ``centre`` (see :func:`_plane_grid`), bone window.

    Only the voxels around each plane are converted to HU (one read of each slice for all planes) and
    handed to SimpleITK: linear interpolation reads nothing else, so each plane is the one resampled
    from the whole volume.
    """
    sitk = _sitk()

    grids = [_plane_grid(stack, centre, plane, image_size) for plane in planes]
    blocks = stack.blocks([(first, last) for _ref, _affine, first, last in grids])
    out: list[tuple[npt.NDArray[np.uint8], tuple[float, ...]]] = []
    for (ref, affine, first, _last), block_hu in zip(grids, blocks, strict=True):
        block = sitk.GetImageFromArray(block_hu)
        block.SetOrigin(tuple(float(v) for v in stack.to_point(first)))
        block.SetSpacing(tuple(float(v) for v in stack.spacing))
        block.SetDirection(tuple(float(v) for v in stack.direction.ravel()))
        plane_img = sitk.Resample(block, ref, sitk.Transform(), sitk.sitkLinear, _AIR_HU, sitk.sitkFloat32)
        hu = sitk.GetArrayFromImage(plane_img)[0]
        level, width = BONE_WINDOW
        out.append((_to_uint8(hu, level - width / 2, level + width / 2), tuple(float(v) for v in affine.ravel())))
    return out


def _reformat(
    stack: _Stack, centre: npt.NDArray[np.float64], plane: ImagePlane, image_size: int
) -> tuple[npt.NDArray[np.uint8], tuple[float, ...]]:
    """One plane of :func:`_reformats`."""
    return _reformats(stack, centre, [plane], image_size)[0]


def _ct_inputs(builder: _Builder, series: Sequence[Series]) -> None:
    infos = [_series_info(builder.study, s) for s in series]
    axial = [i for i in infos if i.plane is ImagePlane.AXIAL and len(i.series.instances) >= _MIN_VOLUME_SLICES]
    if not axial:
        main = _pick_sagittal(infos)
        level, width = BONE_WINDOW
        _log.info("CT: no axial stack of >= %d slices; using single slices", _MIN_VOLUME_SLICES)
        _stack_ct_slices(builder, main, (level - width / 2, level + width / 2))
        return
    main = max(axial, key=lambda i: len(i.series.instances))
    run = _longest_uniform_run(_sorted_positions(main.series))
    if len(run) < _MIN_VOLUME_SLICES:
        raise UnusableStudyError(
            f"CT series {main.series.series_number}: no run of >= {_MIN_VOLUME_SLICES} evenly spaced slices"
        )
    if len(run) < len(main.series.instances):
        _log.warning("CT: using %d of %d slices (uneven spacing or duplicates)", len(run), len(main.series.instances))
    stack = _read_stack(builder.study, run)
    centre = _spine_centre(stack)
    instances = [inst for _, inst in run]
    planes = [(ImagePlane.SAGITTAL, "mid-sagittal"), (ImagePlane.CORONAL, "mid-coronal")]
    planes = planes[: max(0, builder.settings.max_images - len(builder.images))]
    images = _reformats(stack, centre, [plane for plane, _ in planes], builder.settings.image_size)
    for (plane, what), (pixels, affine) in zip(planes, images, strict=True):
        builder.add_reformat(
            pixels, main.series, instances, plane, f"{what} reformat of the axial CT, bone window", affine
        )


def _stack_ct_slices(builder: _Builder, info: _SeriesInfo, window: tuple[float, float]) -> None:
    positions = _sorted_positions(info.series)
    candidates = [(inst, None) for _, inst in positions] or _frames_of(info.series)
    mid = len(candidates) // 2
    ordered = [candidates[mid], *candidates[:mid][::-1], *candidates[mid + 1 :]]
    frame, reasons = _first_readable(ordered[:3])
    if frame is None:
        raise UnusableStudyError(f"CT series {info.series.series_number}: {reasons[0] if reasons else 'no image'}")
    plane = info.plane or ImagePlane.AXIAL
    builder.add_slice(frame, info.series, plane, f"{plane.value} CT slice, bone window", window=window)


# ------------------------------------------------------------------------------------ radiographs
_LATERAL_VIEWS: Final = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})
_FRONTAL_VIEWS: Final = frozenset({"AP", "PA", "APPA"})


def _view(ds: Dataset, series: Series) -> str:
    view = str(ds.get("ViewPosition", "") or series.view_position).upper().replace(" ", "")
    if view in _FRONTAL_VIEWS:
        return "AP" if view != "PA" else "PA"
    if view in _LATERAL_VIEWS:
        return "lateral"
    orientation = [str(v).upper() for v in (ds.get("PatientOrientation") or [])]
    if orientation and orientation[0][:1] in ("A", "P"):
        return "lateral"
    if orientation and orientation[0][:1] in ("L", "R"):
        return "AP"
    return ""


def _xr_inputs(builder: _Builder, series: Sequence[Series]) -> None:
    from pydicom.pixels.processing import apply_voi_lut

    items: list[tuple[int, str, Series, Instance, int | None]] = []
    for s in series:
        for inst, number in _frames_of(s):
            if number not in (None, 1):
                continue  # one frame per radiograph instance
            view = _view(_header(builder.study, inst), s)
            items.append(({"AP": 0, "PA": 0, "lateral": 1}.get(view, 2), view, s, inst, number))
    items.sort(key=lambda t: t[0])
    reasons: list[str] = []
    for _rank, view, s, inst, frame_number in items:
        if builder.full:
            break
        try:
            frame = _read_frame(inst, frame_number)
        except UnusableStudyError as exc:
            reasons.append(str(exc))
            continue
        ds = frame.ds
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        invert = photometric == "MONOCHROME1" or (
            photometric == "MONOCHROME2" and str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
        )
        window: tuple[float, float] | None = None
        pixels = frame.pixels
        if pixels.ndim == 2 and ("VOILUTSequence" in ds or "WindowCenter" in ds):
            try:
                voi = np.asarray(apply_voi_lut(pixels, ds, prefer_lut=True), dtype=np.float32)
            except _DECODE_ERRORS as exc:
                _log.info("VOI LUT not applicable (%s); percentile window", exc)
            else:
                # pydicom maps the VOI output onto the stored-value range; a VOI that leaves fewer than a
                # handful of grey levels (wrong window for these pixels) is not usable.
                if len(np.unique(voi[:: max(1, voi.shape[0] // 64), :: max(1, voi.shape[1] // 64)])) > 8:
                    pixels = voi
                    window = (float(voi.min()), float(voi.max()))
        if window is None:
            window = _percentile_window(pixels) if pixels.ndim == 2 else (0.0, 255.0)
        frame = _Frame(pixels, frame.instance, frame.frame_number, ds, None, None, frame.spacing)
        label = f"{view} view" if view else "radiograph"
        builder.add_slice(frame, s, ImagePlane.PROJECTION, f"{label}, full field", window=window, invert=invert)
    if not builder.images and reasons:
        raise UnusableStudyError(f"radiograph: {reasons[0]}")


# ------------------------------------------------------------------------------------ entry point
def prepare_inputs(study: Study, series_uids: Sequence[str], settings: ModelSettings) -> ModelInput:
    """Build the model's input images for one study.

    Parameters
    ----------
    study
        The study (headers and file paths).
    series_uids
        The series the routing rules selected, in any order.
    settings
        ``image_size`` (longest side, px), ``max_images`` and ``task`` are used.

    Returns
    -------
    ModelInput
        At most ``settings.max_images`` images of one modality group (MR, CT, or CR/DX), each with its
        source reference.

    Raises
    ------
    UnusableStudyError
        No series selected, a selected series is not in the study, the modality is not supported, or no
        image could be read; the message says which.
    """
    if not series_uids:
        raise UnusableStudyError("no series selected for the model")
    selected: list[Series] = []
    for uid in dict.fromkeys(series_uids):
        try:
            selected.append(study.series_by_uid(uid))
        except KeyError:
            raise UnusableStudyError(f"series {uid} is not in study {study.study_instance_uid}") from None
    selected = [s for s in selected if s.instances]
    by_modality: dict[str, list[Series]] = {}
    for s in selected:
        key = "XR" if s.modality in ("CR", "DX") else s.modality
        by_modality.setdefault(key, []).append(s)
    group = next((m for m in ("MR", "CT", "XR") if m in by_modality), None)
    if group is None:
        found = sorted({s.modality or "?" for s in selected}) or ["none"]
        raise UnusableStudyError(
            f"no series of a supported modality ({', '.join(sorted(SUPPORTED_MODALITIES))}); got {', '.join(found)}"
        )
    ignored = [m for m in by_modality if m != group]
    if ignored:
        _log.info("modality %s used; selected series of %s ignored", group, ", ".join(ignored))
    builder = _Builder(settings, study)
    series = by_modality[group]
    try:
        if group == "MR":
            _mr_inputs(builder, series)
        elif group == "CT":
            _ct_inputs(builder, series)
        else:
            _xr_inputs(builder, series)
    except UnusableStudyError:
        raise
    except (ValueError, RuntimeError, OSError, IndexError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise UnusableStudyError(f"{group}: images could not be prepared: {type(exc).__name__}: {exc}") from exc
    if not builder.images:
        raise UnusableStudyError(f"{group}: no usable image in the selected series")
    modality = series[0].modality if group != "XR" else builder.images[0].ref.modality
    return ModelInput(
        study_instance_uid=study.study_instance_uid,
        modality=modality,
        task=settings.task,
        images=tuple(builder.images),
    )
