"""Shared inputs for the sr_templates tests: phantom studies and hand-made SpineFindings.

(Named ``test_sr_*`` to stay inside the files this component owns; it holds no tests.)
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from dicom_node.devtools.phantoms import SyntheticStudy, make_lumbar_mr, make_scoliosis_radiograph, make_spine_ct
from inference.findings import (
    Evidence,
    ImagePlane,
    InputImage,
    LevelFinding,
    ModelAnswer,
    ModelIdentity,
    NarrativeReport,
    SpineFindings,
)
from inference.study import Study, load_study

#: Fixed build time: with it, builds are byte-identical.
CREATED_AT = datetime.datetime(2025, 1, 2, 3, 4, 5, 600000)

MODEL = ModelIdentity(
    name="SpineGPT",
    version="test-rev-1",
    weights_digest="0" * 63 + "1",
    backend="demo",
    prompt_version="p1",
    demo=False,
)

REPORT = NarrativeReport(
    findings="L4-L5 left paracentral disc herniation. Grade I L5 spondylolisthesis. L1 fracture.",
    diagnosis="Lumbar disc herniation L4-L5; L5 spondylolisthesis.",
    treatment_suggestions="Conservative management; physiotherapy.",
    risk_and_prognosis="Good prognosis with conservative care.",
    follow_up="Clinical review in 6 weeks.",
    diagnostic_basis="Sagittal T2 and T1 images.",
)


@dataclass(frozen=True)
class Case:
    """A phantom study, its Study and the findings built against it."""

    synthetic: SyntheticStudy
    study: Study
    findings: SpineFindings


def to_source_pixel(ds: pydicom.Dataset, lps: tuple[float, float, float]) -> tuple[float, float]:
    """Patient LPS mm → (column, row) in SCOORD convention (pixel centres at +0.5)."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = [float(v) for v in ds.ImageOrientationPatient]
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
    dr, dc = (float(v) for v in ds.PixelSpacing)  # row spacing, column spacing
    d = np.array(lps) - ipp
    return (float(d @ row_dir) / dc + 0.5, float(d @ col_dir) / dr + 0.5)


def _middle(study: Study, series_index: int = 0) -> tuple[pydicom.Dataset, str]:
    series = study.series[series_index]
    inst = series.instances[len(series.instances) // 2]
    return pydicom.dcmread(inst.path, stop_before_pixels=True), series.series_instance_uid


def _input(index: int, ds: pydicom.Dataset, series_uid: str, plane: ImagePlane, scale: float) -> InputImage:
    """A model image = the source slice resampled by ``scale`` (model px = source px * scale)."""
    return InputImage(
        index=index,
        plane=plane,
        modality=str(ds.Modality),
        series_instance_uid=series_uid,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uids=(str(ds.SOPInstanceUID),),
        rows=round(int(ds.Rows) * scale),
        columns=round(int(ds.Columns) * scale),
        pixel_to_source=(1 / scale, 0.0, 0.0, 0.0, 1 / scale, 0.0),
    )


#: Fixed study UID for the snapshot case (the phantom's other UIDs are normalised in the snapshot).
SNAPSHOT_STUDY_UID = "1.2.826.0.1.3680043.8.498.1234567890.1"


def lumbar_mr_case(tmp: Path, *, demo: bool = False, study_instance_uid: str | None = None) -> Case:
    """Lumbar MR phantom: L1 fracture (image only, not localised), L4-L5 left herniation (point on
    the sagittal T2, image 0), L5 grade I spondylolisthesis with 18 % slip (point on image 0, and
    image 1 = sagittal T1 without a point)."""
    syn = make_lumbar_mr(tmp / "mr", slices=5, size=128, study_instance_uid=study_instance_uid)
    study = load_study(syn.paths)
    t2, t2_uid = _middle(study, 0)
    t1, t1_uid = _middle(study, 1)
    scale = 2.0  # the model saw a 256x256 upsampling of the 128x128 slice
    images = [
        _input(0, t2, t2_uid, ImagePlane.SAGITTAL, scale),
        _input(1, t1, t1_uid, ImagePlane.SAGITTAL, scale),
    ]
    c = syn.vertebra_centres
    disc = tuple((np.array(c["L4"]) + np.array(c["L5"])) / 2)
    col, row = to_source_pixel(t2, disc)  # type: ignore[arg-type]
    l5c, l5r = to_source_pixel(t2, c["L5"])
    levels = [
        LevelFinding(
            level="L1",
            finding="vertebral_fracture",
            severity="mild",
            measurements=[{"type": "vertebral_height_loss", "value": 20.0}],
            evidence=[Evidence(image=1)],
        ),
        LevelFinding(
            level="L4-L5",
            finding="disc_herniation",
            severity="moderate",
            laterality="left",
            measurements=[{"type": "canal_ap_diameter", "value": 9.5}],
            evidence=[Evidence(image=0, x=round(col * scale, 2), y=round(row * scale, 2))],
        ),
        LevelFinding(
            level="L5",
            finding="spondylolisthesis",
            severity="mild",
            grade=1,
            measurements=[{"type": "slip_percentage", "value": 18.0}],
            evidence=[Evidence(image=0, x=round(l5c * scale, 2), y=round(l5r * scale, 2)), Evidence(image=1)],
        ),
    ]
    findings = SpineFindings(
        study_instance_uid=study.study_instance_uid,
        model=MODEL.model_copy(update={"demo": demo}),
        task="structured_report",
        images=images,
        answer=ModelAnswer(levels=levels, report=REPORT),
    )
    return Case(syn, study, findings)


def scoliosis_case(tmp: Path) -> Case:
    """Whole-spine radiograph: Cobb angle T6-T12 25 deg at apex T9, localised at the apex."""
    syn = make_scoliosis_radiograph(tmp / "xr", cobb_deg=25.0)
    study = load_study(syn.paths)
    ds = pydicom.dcmread(study.series[0].instances[0].path, stop_before_pixels=True)
    image = _input(0, ds, study.series[0].series_instance_uid, ImagePlane.PROJECTION, 0.5)
    levels = [
        LevelFinding(
            level="T9",
            finding="scoliosis",
            severity="moderate",
            measurements=[
                {"type": "cobb_angle", "value": 25.0, "upper_end_vertebra": "T6", "lower_end_vertebra": "T12"}
            ],
            evidence=[Evidence(image=0, x=image.columns / 2, y=image.rows * 0.4)],
        ),
        LevelFinding(level="T13", finding="no_abnormality", severity="none", evidence=[Evidence(image=0)]),
    ]
    findings = SpineFindings(
        study_instance_uid=study.study_instance_uid,
        model=MODEL,
        task="structured_report",
        images=[image],
        answer=ModelAnswer(levels=levels, report=REPORT),
    )
    return Case(syn, study, findings)


def ct_reformat_case(tmp: Path) -> Case:
    """Axial CT reformatted to a sagittal model image: evidence as a 3D point in the frame of reference."""
    syn = make_spine_ct(tmp / "ct", slices=20, size=64)
    study = load_study(syn.paths)
    series = study.series[0]
    first = pydicom.dcmread(series.instances[0].path, stop_before_pixels=True)
    uids = tuple(i.sop_instance_uid for i in series.instances)
    # model column → patient y (A-P), model row → patient z (head-feet), x fixed at 0: 3x3 (c, r, 1)
    image = InputImage(
        index=0,
        plane=ImagePlane.SAGITTAL,
        modality="CT",
        series_instance_uid=series.series_instance_uid,
        sop_class_uid=str(first.SOPClassUID),
        sop_instance_uids=uids,
        rows=200,
        columns=200,
        pixel_to_patient=(0.0, 0.0, 0.0, 1.0, 0.0, -100.0, 0.0, -1.0, 100.0),
    )
    levels = [
        LevelFinding(
            level="L1",
            finding="vertebral_fracture",
            severity="moderate",
            evidence=[Evidence(image=0, x=120.0, y=60.0)],
        ),
    ]
    findings = SpineFindings(
        study_instance_uid=study.study_instance_uid,
        model=MODEL,
        task="structured_report",
        images=[image],
        answer=ModelAnswer(levels=levels, report=REPORT),
    )
    return Case(syn, study, findings)
