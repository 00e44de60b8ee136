"""From a study on disk to the model's input images: the per-modality choice of views.

:func:`prepare_inputs` is given the series the routing rules selected and produces, per modality:

* **MR** — the sagittal T2 series (plane from Image Orientation (Patient), weighting from the series
  description, else echo / repetition time): its mid-sagittal slice and two para-sagittal slices about
  16 mm either side (through the foramina), then, when an axial series was selected, one axial slice per
  disc block (contiguous group of slices), cranio-caudally, up to ``settings.max_images``.
* **CT** — the axial stack (its longest evenly spaced run, ordered along the slice normal), resampled onto
  isotropic mid-sagittal and mid-coronal planes through the spine (the median of the bone voxels), bone
  window.  A reformat lists every contributing SOP instance and carries ``pixel_to_patient``.  A CT series
  that is not an axial stack is handled slice by slice like MR.
* **CR / DX** — Modality LUT and VOI LUT applied, MONOCHROME1 (or an INVERSE Presentation LUT) inverted,
  the full field kept; AP/PA views first, then laterals.

The concerns it composes live beside it: :mod:`inference.pixels` (decoding frames, reading a CT stack),
:mod:`inference.geometry` (planes, slice order, transforms, resampling, reformats) and
:mod:`inference.intensity` (windows).  Every image is sized by the model backend's
:class:`~inference.inputs.ImageSizePolicy` (for Qwen2.5-VL: multiples of 28 within its pixel limits) and
described by an :class:`~inference.findings.InputImage`: source series / SOP instance(s) / frame, and the
affine from model pixels to source pixels (single-slice images) or to patient LPS millimetres.

Nothing here logs or returns patient identifiers; image descriptions are generated, never copied from
DICOM text attributes.  Every failure to find a usable image raises
:class:`~inference.errors.UnusableStudyError` with the reason.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from inference.errors import UnusableStudyError
from inference.findings import ImagePlane, InputImage
from inference.geometry import (
    classify_plane,
    floats,
    frame_geometry,
    longest_uniform_run,
    pixel_to_source,
    reformats,
    resize,
    slice_normal,
    slice_to_patient,
    sorted_positions,
    spine_centre,
)
from inference.inputs import ImageSizePolicy, ModelImage, ModelInput
from inference.intensity import BONE_WINDOW, percentile_window, to_uint8, voi_window
from inference.pixels import DECODE_ERRORS, Frame, first_readable, header_of, read_frame, read_stack
from inference.settings import ModelSettings
from inference.study import Instance, Series, Study

__all__ = ["SUPPORTED_MODALITIES", "classify_weighting", "prepare_inputs"]

_log = logging.getLogger(__name__)




#: Modalities the model reads.
SUPPORTED_MODALITIES: Final = frozenset({"MR", "CT", "CR", "DX"})


_PARASAGITTAL_MM: Final = 16.0


_MIN_VOLUME_SLICES: Final = 8


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



# ------------------------------------------------------------------------------------ images
class _Builder:
    """Collects model images with consecutive indices."""

    def __init__(self, settings: ModelSettings, study: Study, size: ImageSizePolicy) -> None:
        self.settings = settings
        self.size = size
        self.study = study
        self.images: list[ModelImage] = []

    @property
    def full(self) -> bool:
        return len(self.images) >= self.settings.max_images

    def add_slice(
        self,
        frame: Frame,
        series: Series,
        plane: ImagePlane,
        description: str,
        *,
        window: tuple[float, float] | None = None,
        invert: bool = False,
    ) -> None:
        src_rows, src_cols = frame.pixels.shape[:2]
        rows, cols = self.size.fit(src_rows, src_cols)
        resized = resize(frame.pixels, rows, cols)
        if resized.ndim == 3:
            pixels = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
        else:
            if window is None:
                window = voi_window(frame.ds, frame.pixels) or percentile_window(frame.pixels)
            pixels = to_uint8(resized, *window, invert=invert)
        if int(pixels.max()) == int(pixels.min()):
            raise UnusableStudyError(
                f"instance {frame.instance.sop_instance_uid}: image is blank after windowing ({description})"
            )
        p2s = pixel_to_source(rows, cols, src_rows, src_cols)
        thickness = float(frame.ds.get("SliceThickness", 0) or 0) if plane is not ImagePlane.PROJECTION else 0.0
        p2p = (slice_to_patient(frame.position, frame.orientation, frame.spacing, p2s, thickness)
               if plane is not ImagePlane.PROJECTION else None)
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


# ------------------------------------------------------------------------------------ MR (and slice-wise CT)
@dataclass(frozen=True)
class _SeriesInfo:
    series: Series
    plane: ImagePlane | None
    weighting: str


def _series_info(study: Study, series: Series) -> _SeriesInfo:
    ds = header_of(study, series.instances[0])
    plane = classify_plane(series.image_orientation)
    if plane is None:
        _pos, ori, _sp = frame_geometry(ds, 0)
        plane = classify_plane(ori)
    te = floats([ds.get("EchoTime")], 1) if ds.get("EchoTime") not in (None, "") else None
    tr = floats([ds.get("RepetitionTime")], 1) if ds.get("RepetitionTime") not in (None, "") else None
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
    positions = sorted_positions(series)
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
    normal = slice_normal(series)
    reasons: list[str] = []
    for k in chosen:
        pos, inst, frame_number = frames[k]
        try:
            frame = read_frame(inst, frame_number)
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
    positions = sorted_positions(series)
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
    normal = slice_normal(info.series)
    if normal is not None and normal[2] < 0:
        blocks = blocks[::-1]
    if len(blocks) > budget:
        idx = np.linspace(0, len(blocks) - 1, budget).round().astype(int)
        blocks = [blocks[i] for i in dict.fromkeys(idx.tolist())]
    weighting = f" {info.weighting}" if info.weighting else ""
    for b, block in enumerate(blocks):
        _pos, inst = block[len(block) // 2]
        try:
            frame = read_frame(inst, None)
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
    run = longest_uniform_run(sorted_positions(main.series))
    if len(run) < _MIN_VOLUME_SLICES:
        raise UnusableStudyError(
            f"CT series {main.series.series_number}: no run of >= {_MIN_VOLUME_SLICES} evenly spaced slices"
        )
    if len(run) < len(main.series.instances):
        _log.warning("CT: using %d of %d slices (uneven spacing or duplicates)", len(run), len(main.series.instances))
    stack = read_stack(builder.study, run)
    centre = spine_centre(stack)
    instances = [inst for _, inst in run]
    planes = [(ImagePlane.SAGITTAL, "mid-sagittal"), (ImagePlane.CORONAL, "mid-coronal")]
    planes = planes[: max(0, builder.settings.max_images - len(builder.images))]
    images = reformats(stack, centre, [plane for plane, _ in planes], builder.size)
    for (plane, what), (pixels, affine) in zip(planes, images, strict=True):
        builder.add_reformat(
            pixels, main.series, instances, plane, f"{what} reformat of the axial CT, bone window", affine
        )


def _stack_ct_slices(builder: _Builder, info: _SeriesInfo, window: tuple[float, float]) -> None:
    positions = sorted_positions(info.series)
    candidates = [(inst, None) for _, inst in positions] or _frames_of(info.series)
    mid = len(candidates) // 2
    ordered = [candidates[mid], *candidates[:mid][::-1], *candidates[mid + 1 :]]
    frame, reasons = first_readable(ordered[:3])
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
            view = _view(header_of(builder.study, inst), s)
            items.append(({"AP": 0, "PA": 0, "lateral": 1}.get(view, 2), view, s, inst, number))
    items.sort(key=lambda t: t[0])
    reasons: list[str] = []
    for _rank, view, s, inst, frame_number in items:
        if builder.full:
            break
        try:
            frame = read_frame(inst, frame_number)
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
            except DECODE_ERRORS as exc:
                _log.info("VOI LUT not applicable (%s); percentile window", exc)
            else:
                # pydicom maps the VOI output onto the stored-value range; a VOI that leaves fewer than a
                # handful of grey levels (wrong window for these pixels) is not usable.
                if len(np.unique(voi[:: max(1, voi.shape[0] // 64), :: max(1, voi.shape[1] // 64)])) > 8:
                    pixels = voi
                    window = (float(voi.min()), float(voi.max()))
        if window is None:
            window = percentile_window(pixels) if pixels.ndim == 2 else (0.0, 255.0)
        frame = Frame(pixels, frame.instance, frame.frame_number, ds, None, None, frame.spacing)
        label = f"{view} view" if view else "radiograph"
        builder.add_slice(frame, s, ImagePlane.PROJECTION, f"{label}, full field", window=window, invert=invert)
    if not builder.images and reasons:
        raise UnusableStudyError(f"radiograph: {reasons[0]}")


# ------------------------------------------------------------------------------------ entry point
def prepare_inputs(
    study: Study, series_uids: Sequence[str], settings: ModelSettings, size: ImageSizePolicy
) -> ModelInput:
    """Build the model's input images for one study.

    Parameters
    ----------
    study
        The study (headers and file paths).
    series_uids
        The series the routing rules selected, in any order.
    settings
        ``max_images`` and ``task`` are used.
    size
        The image sizes the model takes unchanged (its backend's :attr:`~inference.inputs.SpineModel.image_size`).

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
    builder = _Builder(settings, study, size)
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
