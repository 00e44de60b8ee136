"""Tests for the synthetic spine phantoms (dicom_node.devtools.phantoms)."""

from __future__ import annotations

import itertools
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
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
)

from dicom_node.devtools.phantoms import (
    SyntheticStudy,
    make_chest_radiograph,
    make_lumbar_mr,
    make_scoliosis_radiograph,
    make_spine_ct,
    make_study,
)

# Small geometry keeps the whole module fast on a 2-core CI runner.
MR_KW = {"slices": 5, "size": 64}
CT_KW = {"slices": 20, "size": 64}


def _read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


def _assert_part10(path: Path, sop_class: str, tsuid: str = ExplicitVRLittleEndian) -> pydicom.Dataset:
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", "missing Part 10 preamble/prefix"
    ds = _read(path)
    assert ds.file_meta.TransferSyntaxUID == tsuid
    assert ds.file_meta.MediaStorageSOPClassUID == sop_class
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == sop_class
    for keyword in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
        "AccessionNumber", "StudyID", "ReferringPhysicianName", "InstanceNumber", "ContentDate",
        "ContentTime", "SamplesPerPixel", "SeriesNumber",
    ):
        assert keyword in ds, keyword
    assert ds.Manufacturer == "SpineMed Phantom"
    assert ds.InstitutionName == "Synthetic Hospital"
    return ds


def _pixel_at(ds: pydicom.Dataset, point: tuple[float, float, float]) -> float:
    """Stored value at an LPS point lying (approximately) in the plane of ``ds``."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    d = np.array(point) - ipp
    col = round(float(d @ row_dir) / float(ds.PixelSpacing[1]))
    row = round(float(d @ col_dir) / float(ds.PixelSpacing[0]))
    return float(ds.pixel_array[row, col])


# --------------------------------------------------------------------------------------
# MR
# --------------------------------------------------------------------------------------


def test_lumbar_mr_headers_geometry_and_content(tmp_path: Path) -> None:
    study = make_lumbar_mr(tmp_path, with_axial=True, **MR_KW)
    assert study.kind == "mr"
    assert study.truth == {"L4-L5": "disc_herniation"}
    assert len(study.paths) == 5 + 5 + 5
    assert len(study.series_instance_uids) == 3
    assert study.paths[0] == tmp_path / "2" / "1.dcm"
    for level in ("T12", "L1", "L2", "L3", "L4", "L5", "S1"):
        assert level in study.vertebra_centres

    by_series: dict[int, list[pydicom.Dataset]] = {}
    for path in study.paths:
        ds = _assert_part10(path, MRImageStorage)
        assert ds.Modality == "MR"
        assert ds.StudyInstanceUID == study.study_instance_uid
        assert ds.BodyPartExamined == "LSPINE"
        assert ds.StudyDescription == "MRI LUMBAR SPINE"
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.pixel_array.dtype == np.uint16
        assert int(ds.pixel_array.max()) <= 4095
        by_series.setdefault(int(ds.SeriesNumber), []).append(ds)
    assert sorted(by_series) == [2, 3, 4]
    assert by_series[2][0].SeriesDescription == "SAG T2 TSE"
    assert by_series[3][0].SeriesDescription == "SAG T1 TSE"
    assert by_series[4][0].SeriesDescription == "AX T2"
    assert float(by_series[3][0].EchoTime) < float(by_series[2][0].EchoTime)
    assert float(by_series[3][0].RepetitionTime) < float(by_series[2][0].RepetitionTime)
    assert len({ds.FrameOfReferenceUID for dss in by_series.values() for ds in dss}) == 1

    t2 = by_series[2]
    first = t2[0]
    assert first.ScanningSequence == "SE"
    assert first.MRAcquisitionType == "2D"
    assert 80 <= float(first.EchoTime) <= 120
    assert [float(v) for v in first.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    fov = float(first.PixelSpacing[0]) * first.Rows
    assert 280 <= fov <= 320
    # Slices step left -> right (x decreasing) by SpacingBetweenSlices, along the slice normal.
    assert [int(ds.InstanceNumber) for ds in t2] == [1, 2, 3, 4, 5]
    xs = [float(ds.ImagePositionPatient[0]) for ds in t2]
    spacing = float(first.SpacingBetweenSlices)
    assert np.allclose(np.diff(xs), -spacing)
    assert spacing >= float(first.SliceThickness)
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    positions = [np.array([float(v) for v in ds.ImagePositionPatient]) for ds in t2]
    assert all(float((b - a) @ normal) > 0 for a, b in itertools.pairwise(positions))

    # Content: the planted L4-L5 herniation gives a darker nucleus than L3-L4 on T2,
    # vertebral bodies are intermediate, CSF is bright.
    mid = t2[len(t2) // 2]
    assert float(mid.ImagePositionPatient[0]) == pytest.approx(0.0)
    c = study.vertebra_centres
    l3, l4, l5 = (np.array(c[k]) for k in ("L3", "L4", "L5"))
    disc_34 = _pixel_at(mid, tuple((l3 + l4) / 2))
    disc_45 = _pixel_at(mid, tuple((l4 + l5) / 2))
    body_l3 = _pixel_at(mid, tuple(l3))
    assert disc_34 > 1.3 * disc_45
    assert disc_34 > 1.3 * body_l3

    axial = by_series[4]
    assert [float(v) for v in axial[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    zs = [float(ds.ImagePositionPatient[2]) for ds in axial]
    assert zs == sorted(zs, reverse=True)
    assert float(c["L4"][2]) > zs[3] > float(c["L5"][2])


# --------------------------------------------------------------------------------------
# CT
# --------------------------------------------------------------------------------------


def test_spine_ct_reads_as_volume_with_simpleitk(tmp_path: Path) -> None:
    study = make_spine_ct(tmp_path, **CT_KW)
    assert study.truth == {"L1": "vertebral_fracture"}
    assert len(study.paths) == 20
    ds = _assert_part10(study.paths[0], CTImageStorage)
    assert ds.Modality == "CT"
    assert ds.BodyPartExamined == "LSPINE"
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
    assert "KVP" in ds and "ConvolutionKernel" in ds
    assert [float(v) for v in ds.WindowCenter] == [500.0, 40.0]
    assert [float(v) for v in ds.WindowWidth] == [2000.0, 400.0]
    assert float(ds.SliceThickness) == pytest.approx(10.0)

    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(tmp_path / "2"))
    assert len(files) == 20
    reader.SetFileNames(files)
    img = reader.Execute()
    ps = float(ds.ReconstructionDiameter) / 64
    assert float(ds.PixelSpacing[0]) == pytest.approx(ps)
    assert img.GetSize() == (64, 64, 20)
    assert np.allclose(img.GetSpacing(), (ps, ps, 10.0), atol=1e-3)
    assert np.allclose(img.GetDirection(), np.eye(3).ravel())
    hu = sitk.GetArrayFromImage(img)  # z, y, x in HU
    assert -1030 <= hu.min() < -900  # air
    assert hu.max() > 600  # cortical bone

    def hu_at(level: str) -> float:
        idx = img.TransformPhysicalPointToIndex(study.vertebra_centres[level])
        return float(hu[idx[2], idx[1], idx[0]])

    # Cancellous bone ~250 HU in a normal body; the fractured L1 is denser (impacted).
    assert 150 < hu_at("L3") < 400
    assert hu_at("L1") > hu_at("L3") + 60
    # The compressed L1 sits closer to its neighbours than normal levels do.
    c = {k: np.array(v) for k, v in study.vertebra_centres.items()}
    assert np.linalg.norm(c["L1"] - c["L2"]) < np.linalg.norm(c["L2"] - c["L3"]) - 2.0


# --------------------------------------------------------------------------------------
# Radiographs
# --------------------------------------------------------------------------------------


def test_scoliosis_dx_headers_and_spine_position(tmp_path: Path) -> None:
    study = make_scoliosis_radiograph(tmp_path, cobb_deg=30.0)
    assert study.truth == {"cobb_angle": "30.0", "cobb_upper": "T6", "cobb_lower": "T12"}
    levels = list(study.vertebra_centres)
    assert levels[0] == "T1" and levels[-1] == "S1" and len(levels) == 18
    ds = _assert_part10(study.paths[0], DigitalXRayImageStorageForPresentation)
    assert ds.Modality == "DX"
    assert ds.ViewPosition == "AP"
    assert ds.BodyPartExamined == "SPINE"
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert ds.PresentationLUTShape == "IDENTITY"
    assert "WindowCenter" in ds and "WindowWidth" in ds
    assert "ImagerPixelSpacing" in ds and "PixelSpacing" in ds
    assert (ds.Rows, ds.Columns, ds.BitsStored) == (1024, 512, 12)
    arr = ds.pixel_array.astype(float)
    spacing = float(ds.ImagerPixelSpacing[0])
    # Vertebral centres (detector mm) fall on bone: brighter than the image median.
    for x, y, z in study.vertebra_centres.values():
        assert z == 0.0
        assert arr[round(y / spacing), round(x / spacing)] > np.median(arr)
    # The thoracic curve: T9 (apex) is displaced sideways relative to T6 and T12, and the
    # spine axis turns by about the Cobb angle between the end vertebrae.
    c = study.vertebra_centres
    assert abs(c["T9"][0] - (c["T6"][0] + c["T12"][0]) / 2) > 5.0

    def axis_deg(upper: str, lower: str) -> float:
        return math.degrees(math.atan2(c[lower][0] - c[upper][0], c[lower][1] - c[upper][1]))

    assert abs(axis_deg("T5", "T7") - axis_deg("T11", "L1")) == pytest.approx(30.0, abs=3.0)


def test_cr_and_lateral_variants(tmp_path: Path) -> None:
    cr = make_scoliosis_radiograph(tmp_path / "cr", modality="CR")
    ds = _assert_part10(cr.paths[0], ComputedRadiographyImageStorage)
    assert ds.Modality == "CR"
    lat = make_scoliosis_radiograph(tmp_path / "lat", lateral=True)
    ds = _read(lat.paths[0])
    assert ds.ViewPosition == "LL"
    assert list(ds.PatientOrientation) == ["P", "F"]
    with pytest.raises(ValueError, match="modality"):
        make_scoliosis_radiograph(tmp_path / "bad", modality="MG")


def test_monochrome1_is_inverted_monochrome2(tmp_path: Path) -> None:
    m2 = _read(make_scoliosis_radiograph(tmp_path / "m2", seed=3).paths[0])
    m1 = _read(make_scoliosis_radiograph(tmp_path / "m1", seed=3, photometric="MONOCHROME1").paths[0])
    assert m1.PhotometricInterpretation == "MONOCHROME1"
    assert m1.PresentationLUTShape == "INVERSE"
    a1, a2 = m1.pixel_array.astype(int), m2.pixel_array.astype(int)
    assert np.array_equal(a1, 4095 - a2)
    assert np.corrcoef(a1.ravel(), a2.ravel())[0, 1] < -0.99
    assert float(m1.WindowCenter) == pytest.approx(4095 - float(m2.WindowCenter), abs=1.0)


def test_chest_radiograph_is_a_non_spine_study(tmp_path: Path) -> None:
    study = make_chest_radiograph(tmp_path)
    assert study.kind == "chest"
    assert study.vertebra_centres == {}
    ds = _assert_part10(study.paths[0], DigitalXRayImageStorageForPresentation)
    assert ds.BodyPartExamined == "CHEST"
    assert ds.StudyDescription == "CHEST PA"
    assert ds.SeriesDescription == "PA"
    assert ds.ViewPosition == "PA"


# --------------------------------------------------------------------------------------
# Transfer syntaxes
# --------------------------------------------------------------------------------------

LOSSLESS_SYNTAXES = [
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
]


@pytest.fixture(scope="module")
def reference_ct(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    return make_spine_ct(tmp_path_factory.mktemp("ref"), slices=3, size=64)


@pytest.mark.parametrize("tsuid", LOSSLESS_SYNTAXES, ids=lambda u: u.name)
def test_lossless_transfer_syntax_round_trip(
    tmp_path: Path, tsuid: str, reference_ct: SyntheticStudy
) -> None:
    study = make_spine_ct(tmp_path, slices=3, size=64, transfer_syntax_uid=tsuid)
    for path, ref_path in zip(study.paths, reference_ct.paths, strict=True):
        ds = _assert_part10(path, CTImageStorage, tsuid)
        ref = _read(ref_path)
        assert ds.SOPInstanceUID == ref.SOPInstanceUID  # same instance, different encoding
        assert np.array_equal(ds.pixel_array, ref.pixel_array)
    # GDCM (via SimpleITK) decodes it too.
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(study.paths[0])))
    ref_hu = _read(reference_ct.paths[0]).pixel_array.astype(int) - 1024
    assert np.array_equal(hu.reshape(ref_hu.shape), ref_hu)


@pytest.mark.parametrize("tsuid", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.name)
def test_compressed_mr_and_radiograph(tmp_path: Path, tsuid: str) -> None:
    mr = make_lumbar_mr(tmp_path / "mr", slices=1, size=64, transfer_syntax_uid=tsuid)
    mr_ref = make_lumbar_mr(tmp_path / "mr_ref", slices=1, size=64)
    for path, ref in zip(mr.paths, mr_ref.paths, strict=True):
        assert np.array_equal(_read(path).pixel_array, _read(ref).pixel_array)
    xr = make_scoliosis_radiograph(tmp_path / "xr", photometric="MONOCHROME1", transfer_syntax_uid=tsuid)
    xr_ref = make_scoliosis_radiograph(tmp_path / "xr_ref", photometric="MONOCHROME1")
    ds = _read(xr.paths[0])
    assert ds.file_meta.TransferSyntaxUID == tsuid
    assert ds.LossyImageCompression == "00"
    assert np.array_equal(ds.pixel_array, _read(xr_ref.paths[0]).pixel_array)


def test_unavailable_or_unknown_transfer_syntax_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="transfer_syntax_uid"):
        make_spine_ct(tmp_path, slices=2, size=64, transfer_syntax_uid="1.2.3.4")
    try:
        available = get_encoder(JPEGLosslessSV1).is_available
    except NotImplementedError:
        available = False
    if available:
        study = make_spine_ct(tmp_path, slices=2, size=64, transfer_syntax_uid=JPEGLosslessSV1)
        assert _read(study.paths[0]).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    else:
        with pytest.raises(ValueError, match="transfer_syntax_uid"):
            make_spine_ct(tmp_path, slices=2, size=64, transfer_syntax_uid=JPEGLosslessSV1)
    assert not any(tmp_path.rglob("*.dcm")), "nothing may be written before the check"


# --------------------------------------------------------------------------------------
# dciodvfy
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not on PATH")
@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("mr", {"with_axial": True, **MR_KW}),
        ("ct", {"slices": 2, "size": 64}),
        ("ct", {"slices": 2, "size": 64, "transfer_syntax_uid": JPEGLSLossless}),
        ("xr", {}),
        ("xr", {"photometric": "MONOCHROME1", "lateral": True}),
        ("xr", {"modality": "CR", "photometric": "MONOCHROME1"}),
        ("chest", {}),
    ],
)
def test_dciodvfy_reports_no_errors(tmp_path: Path, kind: str, kwargs: dict[str, object]) -> None:
    study = make_study(kind, tmp_path, **kwargs)
    # First file and, for MR, the first file of each series.
    paths = {p.parent: p for p in reversed(study.paths)}.values()
    for path in paths:
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        output = proc.stdout + proc.stderr
        errors = [line for line in output.splitlines() if "Error" in line]
        assert not errors, f"{path}:\n{output}"


# --------------------------------------------------------------------------------------
# Determinism and dispatch
# --------------------------------------------------------------------------------------


def _fingerprint(study: SyntheticStudy) -> list[tuple[str, str, str, bytes]]:
    out = []
    for path in study.paths:
        ds = _read(path)
        out.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.PixelData))
    return out


def test_same_seed_same_uids_and_pixels(tmp_path: Path) -> None:
    a = make_lumbar_mr(tmp_path / "a", seed=7, slices=2, size=64)
    b = make_lumbar_mr(tmp_path / "b", seed=7, slices=2, size=64)
    c = make_lumbar_mr(tmp_path / "c", seed=8, slices=2, size=64)
    assert a.study_instance_uid == b.study_instance_uid
    assert a.series_instance_uids == b.series_instance_uids
    assert _fingerprint(a) == _fingerprint(b)
    assert c.study_instance_uid != a.study_instance_uid
    fa, fc = _fingerprint(a), _fingerprint(c)
    assert all(x[2] != y[2] and x[3] != y[3] for x, y in zip(fa, fc, strict=True))
    uids = [uid for row in fa for uid in row[:3]]
    assert all(len(uid) <= 64 and re.fullmatch(r"[0-9]+(\.(0|[1-9][0-9]*))+", uid) for uid in uids)

    x1 = make_scoliosis_radiograph(tmp_path / "x1", seed=1)
    x2 = make_scoliosis_radiograph(tmp_path / "x2", seed=1)
    assert _fingerprint(x1) == _fingerprint(x2)


def test_explicit_study_instance_uid(tmp_path: Path) -> None:
    default = make_spine_ct(tmp_path / "d", slices=2, size=64)
    given = "1.2.826.0.1.3680043.8.498.123456789"
    study = make_spine_ct(tmp_path / "g", slices=2, size=64, study_instance_uid=given)
    assert study.study_instance_uid == given
    assert all(_read(p).StudyInstanceUID == given for p in study.paths)
    assert study.series_instance_uids[0] != default.series_instance_uids[0]
    assert _read(study.paths[0]).SOPInstanceUID != _read(default.paths[0]).SOPInstanceUID


def test_make_study_dispatch(tmp_path: Path) -> None:
    study = make_study("chest", tmp_path / "chest", seed=2)
    assert study.kind == "chest"
    assert make_study("ct", tmp_path / "ct", slices=2, size=64).kind == "ct"
    with pytest.raises(ValueError, match="kind"):
        make_study("pet", tmp_path / "pet")
