"""CT reformats read only what they need: the stack straight from uncompressed files, and only the voxels
around each plane resampled.  Each case is checked against an independent reference: the whole volume
read by SimpleITK's series reader (GDCM; its third axis set from the slice positions, as a gantry-tilted
stack needs), the spine centre found the original way (median of every bone
voxel's column), and each plane resampled from the whole volume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import RLELossless

from dicom_node.devtools import phantoms as synthetic
from inference import geometry
from inference import pixels as pixel_io
from inference.backends.qwen_vl import policy_for
from inference.findings import ImagePlane
from inference.inputs import ModelInput
from inference.preprocess import BONE_WINDOW, prepare_inputs
from inference.settings import ModelSettings
from inference.study import Study, load_study

SETTINGS = ModelSettings()
SLICES, SIZE = 40, 128


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return list(synthetic.make_spine_ct(tmp_path_factory.mktemp("ct"), slices=SLICES, size=SIZE).paths)


Edit = Callable[[pydicom.Dataset, npt.NDArray[np.int64], int], npt.NDArray[np.int64]]


def _rewrite(paths: list[Path], out: Path, edit: Edit, syntax: str | None = None) -> list[Path]:
    """A copy of the phantom with each slice's header and HU (as int64) changed by ``edit``."""
    written = []
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.int64) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        stored = edit(ds, hu, k)
        ds.PixelData = stored.astype(ds.pixel_array.dtype.newbyteorder("<")).tobytes()
        if syntax is not None:
            ds.compress(syntax)
        target = out / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def _rotate(angle_z: float, angle_x: float) -> Edit:
    """The whole phantom turned about the patient's z then x axis (images unchanged, geometry rotated)."""
    cz, sz, cx, sx = np.cos(angle_z), np.sin(angle_z), np.cos(angle_x), np.sin(angle_x)
    rot = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])

    def edit(ds: pydicom.Dataset, hu: npt.NDArray[np.int64], k: int) -> npt.NDArray[np.int64]:
        iop = np.asarray(ds.ImageOrientationPatient, float)
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*(rot @ iop[:3]), *(rot @ iop[3:]))]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in rot @ np.asarray(ds.ImagePositionPatient, float)]
        return hu + 1024

    return edit


def _flip_rows(ds: pydicom.Dataset, hu: npt.NDArray[np.int64], k: int) -> npt.NDArray[np.int64]:
    """Rows stored bottom-up (column direction -y): the slice normal is -z, so the stack runs feet → head."""
    ipp = np.asarray(ds.ImagePositionPatient, float)
    ipp[1] += (ds.Rows - 1) * float(ds.PixelSpacing[0])
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
    ds.InstanceNumber = SLICES - k  # numbering no longer follows the position either
    return hu[::-1] + 1024


def _tilted(ds: pydicom.Dataset, hu: npt.NDArray[np.int64], k: int) -> npt.NDArray[np.int64]:
    """Gantry tilt: each slice shifted along y in proportion to its z (the stack is sheared)."""
    ipp = np.asarray(ds.ImagePositionPatient, float)
    ipp[1] += np.tan(np.radians(15)) * (ipp[2] - 100.0)
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    return hu + 1024


def _rescaled(ds: pydicom.Dataset, hu: npt.NDArray[np.int64], k: int) -> npt.NDArray[np.int64]:
    """Per-slice Rescale Slope / Intercept (every other slice stores 2 × (HU + 1000)), 16 bits stored."""
    ds.BitsStored, ds.HighBit = 16, 15
    if k % 2:
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1000"
        return 2 * (hu + 1000)
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1200"
    return hu + 1200


def _signed(ds: pydicom.Dataset, hu: npt.NDArray[np.int64], k: int) -> npt.NDArray[np.int64]:
    """Signed stored values that are HU (intercept 0)."""
    ds.PixelRepresentation, ds.RescaleIntercept = 1, "0"
    return hu


def _reference(study: Study) -> list[tuple[npt.NDArray[np.uint8], float]]:
    """Per reformat: the plane resampled from the whole SimpleITK volume, and the reference spine centre
    coordinate across the plane (x for sagittal, y for coronal), found from every bone voxel."""
    series = study.series[0]
    normal = np.cross(series.image_orientation[:3], series.image_orientation[3:])  # type: ignore[index]
    ordered = sorted(series.instances, key=lambda i: float(np.dot(normal, i.image_position)))  # type: ignore[arg-type]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(i.path) for i in ordered])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    vol = reader.Execute()
    # the series reader puts the slices along the normal; the stack runs from the first position to the last
    first, last = np.asarray(ordered[0].image_position), np.asarray(ordered[-1].image_position)
    step = (last - first) / (len(ordered) - 1)
    direction = np.asarray(vol.GetDirection()).reshape(3, 3)
    direction[:, 2] = step / np.linalg.norm(step)
    vol.SetDirection(tuple(direction.ravel()))
    vol.SetSpacing((*vol.GetSpacing()[:2], float(np.linalg.norm(step))))
    arr = sitk.GetArrayViewFromImage(vol)
    nz, ny, nx = arr.shape
    x0 = nx // 4
    bone = arr[:, :, x0 : nx - x0] > 150
    ci = float(np.median(np.nonzero(bone)[2])) + x0
    half = max(1, round(8.0 / vol.GetSpacing()[0]))
    profile = (arr[:, :, max(0, round(ci) - half) : round(ci) + half + 1] > 150).sum(axis=(0, 2)).astype(float)
    width = max(1, round(10.0 / vol.GetSpacing()[1]))
    smooth = np.convolve(profile, np.ones(width) / width, mode="same")
    peak = int(np.argmax(smooth))
    lo, hi = peak, peak
    while lo > 0 and smooth[lo - 1] >= 0.5 * smooth[peak]:
        lo -= 1
    while hi < ny - 1 and smooth[hi + 1] >= 0.5 * smooth[peak]:
        hi += 1
    centre = vol.TransformContinuousIndexToPhysicalPoint((ci, (lo + hi) / 2, (nz - 1) / 2))
    inputs = _all(study)
    out = []
    for img in inputs.images:
        m = np.array(img.ref.pixel_to_patient).reshape(3, 4)
        spacing = float(np.linalg.norm(m[:, 0]))
        ref = sitk.Image(img.ref.columns, img.ref.rows, 1, sitk.sitkFloat32)
        ref.SetSpacing((spacing,) * 3)
        ref.SetOrigin(tuple(m[:, 3]))
        ref.SetDirection(tuple((m[:, :3] / spacing).ravel()))
        hu = sitk.GetArrayFromImage(sitk.Resample(vol, ref, sitk.Transform(), sitk.sitkLinear, -1024.0))[0]
        level, win = BONE_WINDOW
        pixels = np.clip(np.rint((hu - (level - win / 2)) * (255.0 / win)), 0, 255).astype(np.uint8)
        out.append((pixels, centre[0] if img.ref.plane is ImagePlane.SAGITTAL else centre[1]))
    return out


def _all(study: Study) -> ModelInput:
    return prepare_inputs(study, [s.series_instance_uid for s in study.series], SETTINGS, policy_for(SETTINGS))


def _check_against_reference(study: Study) -> ModelInput:
    inputs = _all(study)
    assert [i.ref.plane for i in inputs.images] == [ImagePlane.SAGITTAL, ImagePlane.CORONAL]
    for img, (ref_pixels, ref_centre) in zip(inputs.images, _reference(study), strict=True):
        m = np.array(img.ref.pixel_to_patient).reshape(3, 4)
        across = m[0, 3] if img.ref.plane is ImagePlane.SAGITTAL else m[1, 3]
        assert across == pytest.approx(ref_centre, abs=1e-6), img.ref.plane
        diff = np.abs(img.pixels.astype(int) - ref_pixels.astype(int))
        assert diff.max() <= 1, (img.ref.plane, int(diff.max()))
        assert img.pixels.std() > 10  # an image, not a blank plane
        # provenance: every slice of the stack, in order along the slice normal
        assert set(img.ref.sop_instance_uids) == {i.sop_instance_uid for i in study.series[0].instances}
    return inputs


def _fast_stack_used(study: Study) -> bool:
    series = study.series[0]
    run = geometry.longest_uniform_run(geometry.sorted_positions(series))
    return pixel_io.read_stack_fast(study, run) is not None


def test_phantom_matches_full_volume(phantom: list[Path]) -> None:
    study = load_study(phantom)
    assert _fast_stack_used(study)
    inputs = _check_against_reference(study)
    # the SimpleITK path (forced) gives the same images
    run = geometry.longest_uniform_run(geometry.sorted_positions(study.series[0]))
    fast = pixel_io.read_stack_fast(study, run)
    slow = pixel_io.stack_from_image(pixel_io.read_volume(run))
    assert fast is not None
    assert np.allclose(fast.to_point([3, 5, 7]), slow.to_point([3, 5, 7]), atol=1e-4)
    assert np.allclose(geometry.spine_centre(fast), geometry.spine_centre(slow), atol=1e-6)
    for plane, img in zip((ImagePlane.SAGITTAL, ImagePlane.CORONAL), inputs.images, strict=True):
        pixels, affine = geometry.reformat(slow, geometry.spine_centre(slow), plane, policy_for(SETTINGS))
        assert np.array_equal(pixels, img.pixels) and np.allclose(affine, img.ref.pixel_to_patient)


@pytest.mark.parametrize(
    "edit",
    [_rotate(np.radians(20), np.radians(12)), _flip_rows, _tilted, _rescaled, _signed],
    ids=["oblique", "reversed-normal", "gantry-tilt", "rescale-per-slice", "signed"],
)
def test_variants_match_full_volume(phantom: list[Path], tmp_path: Path, edit: Edit) -> None:
    study = load_study(_rewrite(phantom, tmp_path, edit))
    assert _fast_stack_used(study)
    _check_against_reference(study)


def test_unused_high_bits_are_ignored(phantom: list[Path], tmp_path: Path) -> None:
    def garbage(ds: pydicom.Dataset, hu: npt.NDArray[np.int64], k: int) -> npt.NDArray[np.int64]:
        return (hu + 1024) | 0xA000  # BitsStored 12: bits 12-15 are not part of the value

    clean, dirty = load_study(phantom), load_study(_rewrite(phantom, tmp_path, garbage))
    assert _fast_stack_used(dirty)
    for a, b in zip(_all(clean).images, _all(dirty).images, strict=True):
        assert np.array_equal(a.pixels, b.pixels)


def test_compressed_or_padded_stacks_use_simpleitk(phantom: list[Path], tmp_path: Path) -> None:
    expected = _all(load_study(phantom))
    rle = synthetic.make_spine_ct(tmp_path / "rle", slices=SLICES, size=SIZE, transfer_syntax_uid=RLELossless)

    def padded(ds: pydicom.Dataset, hu: npt.NDArray[np.int64], k: int) -> npt.NDArray[np.int64]:
        ds.DataSetTrailingPadding = b"\0" * 8  # pixel data no longer ends the file
        return hu + 1024

    for paths in (list(rle.paths), _rewrite(phantom, tmp_path / "padded", padded)):
        study = load_study(paths)
        assert not _fast_stack_used(study)
        for a, b in zip(expected.images, _all(study).images, strict=True):
            assert np.array_equal(a.pixels, b.pixels) and a.ref.pixel_to_patient == b.ref.pixel_to_patient


def test_non_uniform_run_uses_the_longest_even_part(phantom: list[Path]) -> None:
    study = load_study([*phantom[:10], *phantom[12:]])  # a gap after slice 10: the 28 below it remain
    assert _fast_stack_used(study)
    inputs = _all(study)
    kept = {p.name for p in phantom[12:]}
    for img in inputs.images:
        names = {i.path.name for i in study.series[0].instances if i.sop_instance_uid in img.ref.sop_instance_uids}
        assert names == kept


def test_headers_are_read_once(phantom: list[Path], counted_reads: list[object]) -> None:
    study = load_study(phantom)
    counted_reads.clear()
    _all(study)
    assert counted_reads == []  # no file's header read again, no pixel data decoded by pydicom
    assert study.header(study.series[0].instances[0]) is study.headers[study.series[0].instances[0].sop_instance_uid]


def test_tilted_stack_read_by_simpleitk_is_sheared_too(phantom: list[Path], tmp_path: Path) -> None:
    direct = load_study(_rewrite(phantom, tmp_path / "raw", _tilted))
    compressed = load_study(_rewrite(phantom, tmp_path / "rle", _tilted, RLELossless))
    assert _fast_stack_used(direct) and not _fast_stack_used(compressed)
    for a, b in zip(_all(direct).images, _all(compressed).images, strict=True):
        assert np.allclose(a.ref.pixel_to_patient, b.ref.pixel_to_patient, atol=1e-6)  # type: ignore[arg-type]
        assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 1
