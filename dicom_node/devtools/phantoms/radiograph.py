"""``make_scoliosis_radiograph`` and ``make_chest_radiograph``: DX/CR projections (Cobb angle; non-spine)."""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from dicom_node.devtools.phantoms.common import (
    _VIEW_CODES,
    FloatArray,
    SyntheticStudy,
    UInt16Array,
    _base_dataset,
    _box_blur,
    _check_transfer_syntax,
    _code,
    _ds,
    _make_context,
    _rounded_box_sdf,
    _SeriesInfo,
    _set_pixel_module,
    _to_uint12,
    _write,
)

__all__ = ['make_chest_radiograph', 'make_scoliosis_radiograph']

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


