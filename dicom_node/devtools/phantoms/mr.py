"""``make_lumbar_mr``: sagittal T2/T1 and optional axial T2 MR series with an L4-L5 disc herniation."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from dicom_node.devtools.phantoms.anatomy import _T1, _T2, _build_lumbar_model, _render
from dicom_node.devtools.phantoms.common import (
    FloatArray,
    SyntheticStudy,
    _base_dataset,
    _box_blur,
    _check_transfer_syntax,
    _ds,
    _make_context,
    _SeriesInfo,
    _set_pixel_module,
    _to_uint12,
    _write,
)

__all__ = ['make_lumbar_mr']

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


