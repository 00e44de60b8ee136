"""``make_spine_ct``: an axial CT volume covering roughly L1..S1 with a wedge compression fracture of L1."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
)

from dicom_node.devtools.phantoms.anatomy import _HU, _build_lumbar_model, _render
from dicom_node.devtools.phantoms.common import (
    FloatArray,
    SyntheticStudy,
    _base_dataset,
    _box_blur,
    _check_transfer_syntax,
    _code,
    _ds,
    _make_context,
    _SeriesInfo,
    _set_pixel_module,
    _to_uint12,
    _write,
)

__all__ = ['make_spine_ct']

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


