"""Screening before the model: instances whose pixel data cannot be what their header says are left out,
with a reason, without reading pixels; every well-formed encoding (pydicom's own test files) passes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.devtools.phantoms import make_lumbar_mr
from inference.screening import expected_pixel_bytes, screen_study
from inference.study import load_study, pixel_extent, read_header


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                  "JPEG2000.dcm", "MR_small_RLE.dcm", "image_dfl.dcm",
                                  "SC_rgb_small_odd.dcm", "SC_rgb_rle_2frame.dcm", "ExplVR_BigEnd.dcm",
                                  "liver_1frame.dcm", "rtdose_1frame.dcm"])
def test_well_formed_encodings_pass(name: str, tmp_path: Path) -> None:
    src = get_testdata_file(name)
    assert src is not None
    path = tmp_path / name
    shutil.copy(src, path)
    study = load_study([path])
    screened = screen_study(study)
    assert screened.excluded == () and screened.study is study
    ds = read_header(path)
    extent = pixel_extent(ds)
    assert extent is not None
    if not extent.encapsulated and name != "image_dfl.dcm":
        assert extent.declared_length == expected_pixel_bytes(ds) or extent.declared_length == expected_pixel_bytes(
            ds) + 1  # odd lengths are padded to even


def test_truncated_file_declared_short_missing_pixels_and_non_images(tmp_path: Path) -> None:
    st = make_lumbar_mr(tmp_path / "mr", slices=5, size=64, seed=3)
    paths = sorted(st.paths)
    cut, short, nopix = paths[0], paths[1], paths[2]
    raw = cut.read_bytes()
    cut.write_bytes(raw[: len(raw) - 1000])  # the file ends inside Pixel Data (its header says the full length)
    ds = pydicom.dcmread(short)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(short)
    ds = pydicom.dcmread(nopix)
    del ds.PixelData
    ds.save_as(nopix)
    sr = get_testdata_file("test-SR.dcm")  # not an image: kept, the series selection decides
    assert sr is not None
    sr_ds = pydicom.dcmread(sr)
    sr_ds.StudyInstanceUID = st.study_instance_uid
    sr_ds.save_as(tmp_path / "sr.dcm")

    study = load_study([*paths, tmp_path / "sr.dcm"])
    screened = screen_study(study)
    reasons = {e.sop_instance_uid: e.reason for e in screened.excluded}
    uid = {p: str(pydicom.dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID) for p in (cut, short, nopix)}
    expected = 64 * 64 * 2
    assert reasons == {
        uid[cut]: f"pixel data truncated: {expected - 1000} of {expected} bytes in the file",
        uid[short]: f"pixel data truncated: 100 of {expected} bytes declared",
        uid[nopix]: "no pixel data",
    }
    kept = {i.sop_instance_uid for i in screened.study.instances}
    assert not kept & set(reasons) and len(kept) == len(study.instances) - 3
    assert str(sr_ds.SOPInstanceUID) in kept


def test_pydicoms_truncated_file_is_left_out(tmp_path: Path) -> None:
    src = get_testdata_file("MR_truncated.dcm")
    assert src is not None
    shutil.copy(src, tmp_path / "t.dcm")
    screened = screen_study(load_study([tmp_path / "t.dcm"]))
    assert [e.reason.split(":")[0] for e in screened.excluded] == ["pixel data truncated"]
    assert screened.study.instances == ()
