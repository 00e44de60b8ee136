"""Geometry: planes, slice order, pixel ↔ source ↔ patient transforms, resampling and CT reformats.

Pure functions of headers and arrays (SimpleITK for the resampling of a CT stack onto isotropic
mid-sagittal and mid-coronal planes through the spine).  A model image's size comes from the model
backend's :class:`~inference.inputs.ImageSizePolicy`, never from here.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from inference.findings import ImagePlane
from inference.inputs import ImageSizePolicy
from inference.intensity import AIR_HU, BONE_WINDOW, FloatImage, to_uint8
from inference.study import Instance, Series

__all__ = [
    "RowReader",
    "Stack",
    "classify_plane",
    "floats",
    "frame_geometry",
    "longest_uniform_run",
    "pixel_to_source",
    "plane_grid",
    "reformat",
    "reformats",
    "resize",
    "simpleitk",
    "slice_normal",
    "slice_step",
    "slice_to_patient",
    "sorted_positions",
    "spine_centre",
]


def simpleitk() -> Any:
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


def floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def frame_geometry(
    ds: Dataset, frame_index: int
) -> tuple[tuple[float, float, float] | None, tuple[float, ...] | None, tuple[float, float] | None]:
    """Position, orientation and pixel spacing of a frame (per-frame groups of enhanced objects first)."""
    pos = floats(ds.get("ImagePositionPatient"), 3)
    ori = floats(ds.get("ImageOrientationPatient"), 6)
    spacing = floats(ds.get("PixelSpacing"), 2)
    for seq_name, index in (
        ("SharedFunctionalGroupsSequence", 0),
        ("PerFrameFunctionalGroupsSequence", frame_index),
    ):
        seq = ds.get(seq_name)
        if not seq or index >= len(seq):
            continue
        group = seq[index]
        if "PlanePositionSequence" in group and group.PlanePositionSequence:
            pos = floats(group.PlanePositionSequence[0].get("ImagePositionPatient"), 3) or pos
        if "PlaneOrientationSequence" in group and group.PlaneOrientationSequence:
            ori = floats(group.PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6) or ori
        if "PixelMeasuresSequence" in group and group.PixelMeasuresSequence:
            spacing = floats(group.PixelMeasuresSequence[0].get("PixelSpacing"), 2) or spacing
    if spacing is not None and min(spacing) <= 0:
        spacing = None
    return pos, ori, spacing  # type: ignore[return-value]


def resize(pixels: FloatImage, rows: int, columns: int) -> FloatImage:
    """Resize (anti-aliased, pixel-centre convention) a float image or an RGB float image."""
    from PIL import Image

    if pixels.shape[:2] == (rows, columns):
        return pixels
    if pixels.ndim == 2:
        img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
        return np.asarray(img.resize((columns, rows), Image.Resampling.BILINEAR, reducing_gap=None), np.float32)
    channels = [resize(pixels[:, :, c], rows, columns) for c in range(pixels.shape[2])]
    return np.stack(channels, axis=2)


def pixel_to_source(rows: int, columns: int, src_rows: int, src_cols: int) -> tuple[float, ...]:
    sx, sy = src_cols / columns, src_rows / rows
    return (sx, 0.0, 0.5 * sx - 0.5, 0.0, sy, 0.5 * sy - 0.5)


def slice_to_patient(
    position: Sequence[float] | None,
    orientation: Sequence[float] | None,
    spacing: Sequence[float] | None,
    p2s: Sequence[float],
    thickness: float,
) -> tuple[float, ...] | None:
    """3×4 model-pixel → patient affine of an image cut from one frame with this Image Position, Image
    Orientation and Pixel Spacing (``None`` without them); ``p2s`` is the model-pixel → source-pixel affine."""
    if position is None or orientation is None or spacing is None:
        return None
    row_dir = np.asarray(orientation[:3])
    col_dir = np.asarray(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    # source pixel (c, r) → IPP + c * Δcolumn * row_dir + r * Δrow * col_dir
    src = np.column_stack([row_dir * spacing[1], col_dir * spacing[0], np.asarray(position)])
    affine2d = np.array([[p2s[0], p2s[1], p2s[2]], [p2s[3], p2s[4], p2s[5]], [0.0, 0.0, 1.0]])
    m = src @ affine2d  # 3×3: (column, row, 1) → LPS
    out = np.column_stack([m[:, 0], m[:, 1], normal * thickness, m[:, 2]])
    return tuple(float(v) for v in out.ravel())


def slice_normal(series: Series) -> npt.NDArray[np.float64] | None:
    if series.image_orientation is None:
        return None
    n = np.cross(np.asarray(series.image_orientation[:3]), np.asarray(series.image_orientation[3:]))
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 1e-3 else None


def sorted_positions(series: Series) -> list[tuple[float, Instance]]:
    """Instances with a position, sorted along the slice normal (instance order when unknown)."""
    normal = slice_normal(series)
    with_pos = [i for i in series.instances if i.image_position is not None and i.number_of_frames == 1]
    if normal is None or len(with_pos) != len(series.instances):
        return [(float(k), inst) for k, inst in enumerate(series.instances)]
    return sorted(((float(np.dot(normal, i.image_position)), i) for i in with_pos), key=lambda t: t[0])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ CT
def longest_uniform_run(positions: Sequence[tuple[float, Instance]]) -> list[tuple[float, Instance]]:
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


def slice_step(run: Sequence[tuple[float, Instance]]) -> npt.NDArray[np.float64] | None:
    """Patient-space step from one slice to the next (first to last position over the run), or None.

    Along the slice normal for an ordinary stack; oblique to it with gantry tilt (a sheared stack).
    """
    first, last = run[0][1].image_position, run[-1][1].image_position
    if first is None or last is None or len(run) < 2:
        return None
    step = (np.asarray(last, dtype=np.float64) - np.asarray(first, dtype=np.float64)) / (len(run) - 1)
    norm = float(np.linalg.norm(step))
    return step if math.isfinite(norm) and norm > 1e-6 else None


#: Rows ``j0..j1`` (inclusive) of slice ``k`` of a stack: (j1 - j0 + 1) × columns values.
RowReader = Callable[[int, int, int], npt.NDArray[Any]]


@dataclass(frozen=True)
class Stack:
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


def spine_centre(stack: Stack) -> npt.NDArray[np.float64]:
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


def plane_grid(
    stack: Stack, centre: npt.NDArray[np.float64], plane: ImagePlane, policy: ImageSizePolicy
) -> tuple[Any, npt.NDArray[np.float64], tuple[int, ...], tuple[int, ...]]:
    """The isotropic plane through ``centre`` as a SimpleITK reference image (columns A→P for sagittal,
    R→L for coronal; rows H→F), its 3×4 model-pixel → patient affine, and the inclusive (i, j, k) index box
    of the voxels its samples interpolate from (its corners' indices, one voxel of margin).
    """
    sitk = simpleitk()

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
    rows, cols = policy.fit(max(1, round(height_mm)), max(1, round(width_mm)))
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


def reformats(
    stack: Stack, centre: npt.NDArray[np.float64], planes: Sequence[ImagePlane], policy: ImageSizePolicy
) -> list[tuple[npt.NDArray[np.uint8], tuple[float, ...]]]:
    """Resample isotropic planes through ``centre`` (see :func:`plane_grid`), bone window.

    Only the voxels around each plane are converted to HU (one read of each slice for all planes) and
    handed to SimpleITK: linear interpolation reads nothing else, so each plane is the one resampled
    from the whole volume.
    """
    sitk = simpleitk()

    grids = [plane_grid(stack, centre, plane, policy) for plane in planes]
    blocks = stack.blocks([(first, last) for _ref, _affine, first, last in grids])
    out: list[tuple[npt.NDArray[np.uint8], tuple[float, ...]]] = []
    for (ref, affine, first, _last), block_hu in zip(grids, blocks, strict=True):
        block = sitk.GetImageFromArray(block_hu)
        block.SetOrigin(tuple(float(v) for v in stack.to_point(first)))
        block.SetSpacing(tuple(float(v) for v in stack.spacing))
        block.SetDirection(tuple(float(v) for v in stack.direction.ravel()))
        plane_img = sitk.Resample(block, ref, sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
        hu = sitk.GetArrayFromImage(plane_img)[0]
        level, width = BONE_WINDOW
        out.append((to_uint8(hu, level - width / 2, level + width / 2), tuple(float(v) for v in affine.ravel())))
    return out


def reformat(
    stack: Stack, centre: npt.NDArray[np.float64], plane: ImagePlane, policy: ImageSizePolicy
) -> tuple[npt.NDArray[np.uint8], tuple[float, ...]]:
    """One plane of :func:`reformats`."""
    return reformats(stack, centre, [plane], policy)[0]
