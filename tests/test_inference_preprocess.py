"""Preprocessing: series choice, geometry, windowing, sizes and explicit failure."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest

from dicom_node.devtools import phantoms as synthetic
from inference.backends.qwen_vl import policy_for
from inference.errors import UnusableStudyError
from inference.findings import ImagePlane
from inference.geometry import classify_plane
from inference.inputs import ImageSizePolicy, ModelInput
from inference.preprocess import classify_weighting, prepare_inputs
from inference.settings import ModelSettings
from inference.study import Study, StudyError, load_study

SETTINGS = ModelSettings()
PYDICOM_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"


def _all(study: Study, settings: ModelSettings = SETTINGS) -> ModelInput:
    return prepare_inputs(study, [s.series_instance_uid for s in study.series], settings, policy_for(settings))


def _check_sizes(inputs: ModelInput, settings: ModelSettings = SETTINGS) -> None:
    assert 1 <= len(inputs.images) <= settings.max_images
    for img in inputs.images:
        rows, cols = img.pixels.shape[:2]
        assert rows % 28 == 0 and cols % 28 == 0  # Qwen2.5-VL: 28 px per visual token
        assert max(rows, cols) == settings.image_size - settings.image_size % 28
        assert img.pixels.dtype == np.uint8
        assert img.pixels.max() > img.pixels.min()  # not blank


@pytest.fixture(scope="module")
def mr(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SyntheticStudy:
    return synthetic.make_lumbar_mr(tmp_path_factory.mktemp("mr"), with_axial=True)


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SyntheticStudy:
    return synthetic.make_spine_ct(tmp_path_factory.mktemp("ct"))


def test_mr_picks_sagittal_t2_and_axials(mr: synthetic.SyntheticStudy) -> None:
    study = load_study(list(mr.paths))
    inputs = _all(study)
    _check_sizes(inputs)
    by_uid = {s.series_instance_uid: s for s in study.series}
    sag = [i for i in inputs.images if i.ref.plane is ImagePlane.SAGITTAL]
    ax = [i for i in inputs.images if i.ref.plane is ImagePlane.AXIAL]
    assert len(sag) == 3 and len(ax) == SETTINGS.max_images - 3
    for img in sag:
        series = by_uid[img.ref.series_instance_uid]
        assert "T2" in series.series_description and "T1" not in series.series_description
        assert "T2" in img.ref.description
    assert "mid-sagittal" in sag[0].ref.description
    # each image's source reference is the SOP instance it came from
    for img in inputs.images:
        (uid,) = img.ref.sop_instance_uids
        inst = next(i for i in by_uid[img.ref.series_instance_uid].instances if i.sop_instance_uid == uid)
        ds = pydicom.dcmread(inst.path)
        assert ds.SOPInstanceUID == uid and ds.SOPClassUID == img.ref.sop_class_uid
        assert img.ref.pixel_to_source is not None and img.ref.pixel_to_patient is not None
        # the model image's corner pixels map onto the source frame
        a = np.array(img.ref.pixel_to_source).reshape(2, 3)
        far = a @ np.array([img.ref.columns - 0.5, img.ref.rows - 0.5, 1.0])
        assert np.allclose(far, [ds.Columns - 0.5, ds.Rows - 0.5])
    # the mid-sagittal slice passes through the midline, where the phantom's vertebrae are
    m = np.array(sag[0].ref.pixel_to_patient).reshape(3, 4)
    l3 = np.array(mr.vertebra_centres["L3"])
    col_row = np.linalg.lstsq(m[:, :2], l3 - m[:, 3], rcond=None)[0]
    assert np.linalg.norm(m[:, :2] @ col_row + m[:, 3] - l3) < 5.0  # within 5 mm of the plane
    assert 0 <= col_row[0] < sag[0].ref.columns and 0 <= col_row[1] < sag[0].ref.rows


def test_mr_without_t2_description_uses_echo_times() -> None:
    assert classify_weighting("SAG TSE", 100.0, 3000.0) == "T2"
    assert classify_weighting("SAG TSE", 11.0, 550.0) == "T1"
    assert classify_weighting("sag stir", None, None) == "T2"
    assert classify_weighting("SAG T1 FLAIR", 9.0, 2000.0) == "T1"
    assert classify_weighting("", None, None) == ""
    assert classify_plane((0, 1, 0, 0, 0, -1)) is ImagePlane.SAGITTAL
    assert classify_plane((1, 0, 0, 0, 0, -1)) is ImagePlane.CORONAL
    assert classify_plane((1, 0, 0, 0, 1, 0)) is ImagePlane.AXIAL
    assert classify_plane(None) is None


def test_ct_reformats_geometry(ct: synthetic.SyntheticStudy) -> None:
    study = load_study(list(ct.paths))
    inputs = _all(study)
    _check_sizes(inputs)
    assert [i.ref.plane for i in inputs.images] == [ImagePlane.SAGITTAL, ImagePlane.CORONAL]
    n = len(study.series[0].instances)
    for img in inputs.images:
        ref = img.ref
        assert len(ref.sop_instance_uids) == n and ref.pixel_to_source is None and ref.frame_number is None
        m = np.array(ref.pixel_to_patient).reshape(3, 4)
        col, row, normal = m[:, 0], m[:, 1], m[:, 2]
        # isotropic pixels, orthogonal axes, rows run head → feet (-z in LPS)
        assert np.isclose(np.linalg.norm(col), np.linalg.norm(row))
        assert abs(np.dot(col, row)) < 1e-9 and row[2] < 0
        if ref.plane is ImagePlane.SAGITTAL:
            assert abs(col[1]) > 0.99 * np.linalg.norm(col) and abs(normal[0]) > 0
        else:
            assert abs(col[0]) > 0.99 * np.linalg.norm(col) and abs(normal[1]) > 0
        # every phantom vertebra projects inside the image; the sagittal plane contains them all, the
        # coronal plane passes through the lumbar bodies (the sacrum lies posterior: lordosis)
        for name, centre in ct.vertebra_centres.items():
            p = np.array(centre)
            c, r = np.linalg.lstsq(m[:, :2], p - m[:, 3], rcond=None)[0]
            distance = np.linalg.norm(m[:, :2] @ (c, r) + m[:, 3] - p)
            assert distance < (5.0 if ref.plane is ImagePlane.SAGITTAL else 15.0 if name != "S1" else 30.0), (
                name
            )
            assert 0 <= c < ref.columns and 0 <= r < ref.rows, name
            if distance < 5.0:  # bone window: a vertebral body in the plane is brighter than soft tissue
                assert img.pixels[int(r), int(c)] > 75, (name, ref.plane)


def test_radiograph_monochrome1_inverted_and_views(tmp_path: Path) -> None:
    uid = pydicom.uid.generate_uid()
    m1 = synthetic.make_scoliosis_radiograph(
        tmp_path / "ap1", photometric="MONOCHROME1", study_instance_uid=uid
    )
    m2 = synthetic.make_scoliosis_radiograph(tmp_path / "ap2", photometric="MONOCHROME2")
    lat = synthetic.make_scoliosis_radiograph(tmp_path / "lat", lateral=True, study_instance_uid=uid)
    both = _all(load_study([*m1.paths, *lat.paths]))
    _check_sizes(both)
    assert [i.ref.description.split(" view")[0] for i in both.images] == ["AP", "lateral"]
    assert all(i.ref.plane is ImagePlane.PROJECTION and i.ref.pixel_to_patient is None for i in both.images)
    img1 = _all(load_study(list(m1.paths))).images[0].pixels.astype(float)
    img2 = _all(load_study(list(m2.paths))).images[0].pixels.astype(float)
    # both display bone bright: the MONOCHROME1 image, once inverted, correlates positively with MONOCHROME2
    assert np.corrcoef(img1.ravel(), img2.ravel())[0, 1] > 0.8
    # a vertebra (detector mm → source px → model px) is brighter than the image mean
    ref = both.images[0].ref
    spacing = float(pydicom.dcmread(m1.paths[0]).ImagerPixelSpacing[0])
    x, y, _ = m1.vertebra_centres["L1"]
    a = np.array(ref.pixel_to_source).reshape(2, 3)
    col, row = np.linalg.solve(a[:, :2], np.array([x / spacing, y / spacing]) - a[:, 2])
    assert both.images[0].pixels[int(row), int(col)] > both.images[0].pixels.mean()


def test_sizes_within_budget() -> None:
    for rows, cols in [(512, 512), (1024, 512), (64, 64), (3000, 1000), (100, 2000)]:
        for size in (224, 448, 450, 1344):
            r, c = ImageSizePolicy(multiple=28, longest=size).fit(rows, cols)
            assert r % 28 == 0 and c % 28 == 0 and max(r, c) == size - size % 28 and min(r, c) >= 28
    small = ModelSettings(image_size=224, max_images=2)
    inputs = _all(load_study([PYDICOM_FILES / "MR_small.dcm"]), small)
    _check_sizes(inputs, small)


def test_chest_only_and_pixelless_studies_are_unusable(tmp_path: Path) -> None:
    chest = synthetic.make_chest_radiograph(tmp_path / "chest")
    study = load_study(list(chest.paths))
    # the chest DX is a radiograph, but routing never selects it: nothing selected → unusable
    with pytest.raises(UnusableStudyError, match="no series"):
        prepare_inputs(study, [], SETTINGS, policy_for(SETTINGS))
    with pytest.raises(UnusableStudyError, match="not in study"):
        prepare_inputs(study, ["1.2.3.4"], SETTINGS, policy_for(SETTINGS))
    with pytest.raises(UnusableStudyError, match="supported modality"):
        _all(load_study([PYDICOM_FILES / "test-SR.dcm"]))
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(UnusableStudyError, match="no pixel data"):
        _all(load_study([tmp_path / "nopixels.dcm"]))


@pytest.mark.parametrize("name", sorted(p.name for p in PYDICOM_FILES.glob("*.dcm")))
def test_pydicom_test_files_never_crash(name: str, tmp_path: Path) -> None:
    """Each file, as-is and relabelled as MR / CT / DX: inputs or UnusableStudyError, nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(PYDICOM_FILES / name)
        except Exception:  # a file pydicom itself cannot parse is load_study's business
            ds = None
        paths = [PYDICOM_FILES / name]
        if ds is not None and "PixelData" in ds and "SOPInstanceUID" in ds and "StudyInstanceUID" in ds:
            for modality in ("MR", "CT", "DX"):
                ds.Modality = modality
                out = tmp_path / f"{modality}.dcm"
                try:
                    ds.save_as(out, enforce_file_format=False)
                except (TypeError, ValueError):
                    continue
                paths.append(out)
        for path in paths:
            try:
                study = load_study([path])
            except StudyError:
                continue
            try:
                inputs = _all(study)
            except UnusableStudyError as exc:
                assert str(exc)
            else:
                _check_sizes(inputs)


def test_size_policy_is_what_qwen_processor_keeps() -> None:
    """Every size the policy picks is left unchanged by transformers' own Qwen2-VL ``smart_resize`` — tiny
    images enlarged to min_pixels (pydicom's 28×56 overlay example at image_size 56 was once resized by the
    processor, misplacing its coordinates), large ones brought under max_pixels."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for min_pixels, max_pixels in ((3136, 12845056), (3136, 112 * 112), (56 * 112, 1003520)):
        for longest in (56, 224, 448, 1344):
            policy = ImageSizePolicy(multiple=28, longest=longest, min_pixels=min_pixels, max_pixels=max_pixels)
            for rows, cols in ((64, 128), (512, 512), (3000, 1000), (100, 2000), (28, 56), (2048, 2048)):
                r, c = policy.fit(rows, cols)
                assert r % 28 == 0 and c % 28 == 0 and min_pixels <= r * c <= max_pixels, (policy, rows, cols)
                assert smart_resize(r, c, factor=28, min_pixels=min_pixels, max_pixels=max_pixels) == (r, c)
