"""Reading pixels: one frame decoded (pydicom, SimpleITK/GDCM as the fallback), a CT stack read straight
from uncompressed files or through SimpleITK's series reader.

Every failure names the instance and raises :class:`~inference.errors.UnusableStudyError`; nothing here
chooses which images the model sees (:mod:`inference.preprocess` does).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from inference.errors import UnusableStudyError
from inference.geometry import Stack, frame_geometry, simpleitk, slice_step
from inference.intensity import FloatImage
from inference.study import Instance, Study

__all__ = [
    "DECODE_ERRORS",
    "Frame",
    "first_readable",
    "header_of",
    "read_frame",
    "read_stack",
    "read_stack_fast",
    "read_volume",
    "stack_from_image",
]

_log = logging.getLogger(__name__)


DECODE_ERRORS: Final = (
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


# ------------------------------------------------------------------------------------ pixel reading
@dataclass(frozen=True)
class Frame:
    """One decoded source frame, modality LUT applied, and its geometry."""

    pixels: FloatImage  # rows × columns (grey) or rows × columns × 3 (colour, 0–255)
    instance: Instance
    frame_number: int | None
    ds: Dataset
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    spacing: tuple[float, float] | None  # (row spacing, column spacing) mm


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
    sitk = simpleitk()

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


def read_frame(instance: Instance, frame_number: int | None) -> Frame:
    """Decode one frame with pydicom (pylibjpeg / RLE handlers), falling back to SimpleITK (GDCM).

    Raises
    ------
    UnusableStudyError
        The file has no pixel data or neither decoder can read it.
    """
    index = (frame_number or 1) - 1
    try:
        ds = pydicom.dcmread(instance.path)
    except DECODE_ERRORS as exc:
        raise UnusableStudyError(f"instance {instance.sop_instance_uid}: unreadable file ({exc})") from exc
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnusableStudyError(f"instance {instance.sop_instance_uid}: no pixel data")
    try:
        pixels = _read_pixels_pydicom(ds, index)
    except DECODE_ERRORS as first:
        try:
            pixels = _read_pixels_sitk(instance.path, index)
        except DECODE_ERRORS as second:
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
    pos, ori, spacing = frame_geometry(ds, index)
    return Frame(pixels.astype(np.float32, copy=False), instance, frame_number, ds, pos, ori, spacing)


def header_of(study: Study, instance: Instance) -> Dataset:
    """The instance's header, as :func:`~inference.study.load_study` read it (else read now)."""
    try:
        return study.header(instance)
    except DECODE_ERRORS as exc:
        raise UnusableStudyError(f"instance {instance.sop_instance_uid}: unreadable header ({exc})") from exc


def first_readable(candidates: Sequence[tuple[Instance, int | None]]) -> tuple[Frame | None, list[str]]:
    reasons: list[str] = []
    for inst, frame in candidates:
        try:
            return read_frame(inst, frame), reasons
        except UnusableStudyError as exc:
            reasons.append(str(exc))
    return None, reasons


def read_volume(run: Sequence[tuple[float, Instance]]) -> Any:
    """The CT stack as a SimpleITK image in HU (GDCM series reader; pydicom stack as fallback)."""
    sitk = simpleitk()

    paths = [str(inst.path) for _, inst in run]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(paths)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        _log.info("SimpleITK series read failed (%s); stacking with pydicom", str(exc).strip().splitlines()[-1:])
    frames = [read_frame(inst, None) for _, inst in run]
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


def stack_from_image(vol: Any) -> Stack:
    """A SimpleITK volume (HU) as a :class:`Stack`."""
    sitk = simpleitk()

    values = sitk.GetArrayFromImage(vol)
    n = values.shape[0]

    def read_rows(k: int, j0: int, j1: int) -> npt.NDArray[Any]:
        rows: npt.NDArray[Any] = values[k, j0 : j1 + 1]
        return rows

    return Stack(
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


def read_stack_fast(study: Study, run: Sequence[tuple[float, Instance]]) -> Stack | None:
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
    step = slice_step(run)
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
    return Stack(
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


def read_stack(study: Study, run: Sequence[tuple[float, Instance]]) -> Stack:
    """The CT stack: straight from uncompressed files when possible, else SimpleITK's series reader.

    Either way the third axis is the step between the slices' positions: SimpleITK's series reader takes
    the slice normal for it (with the step's length), which misplaces every slice of a gantry-tilted stack.
    """
    stack = read_stack_fast(study, run)
    if stack is not None:
        return stack
    stack = stack_from_image(read_volume(run))
    step = slice_step(run)
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
