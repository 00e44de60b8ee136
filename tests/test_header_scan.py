"""The listener's header scanner agrees with pydicom wherever it answers, and answers for common data."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.filereader import read_preamble

from dicom_node.devtools.phantoms import make_lumbar_mr, make_scoliosis_radiograph, make_spine_ct
from dicom_node.ingest.header import HeaderFields, scan_header


def _dataset_bytes(path: Path) -> tuple[bytes, str] | None:
    """The encoded data set of a Part 10 file and its transfer syntax (None: not a Part 10 file)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        return None
    raw = path.read_bytes()
    with path.open("rb") as fp:
        read_preamble(fp, False)
        start = 132 + 12 + int(meta.get("FileMetaInformationGroupLength", 0))
    if raw[128:132] != b"DICM" or start > len(raw):
        return None
    return raw[start:], str(meta.TransferSyntaxUID)


def _pydicom_fields(path: Path) -> HeaderFields | None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    try:
        return HeaderFields.from_dataset(ds)
    except AttributeError:
        return None


def _pydicom_files() -> list[Path]:
    """pydicom's bundled test files (no download)."""
    return sorted((Path(pydicom.__file__).parent / "data" / "test_files").rglob("*.dcm"))


def test_agrees_with_pydicom_on_its_test_files() -> None:
    answered = 0
    for path in _pydicom_files():
        got = _dataset_bytes(path)
        if got is None:
            continue
        data, ts = got
        fields = scan_header(data, ts)
        if fields is None:
            continue
        answered += 1
        assert fields == _pydicom_fields(path), path.name
    assert answered >= 55, "the fast path answers for most ordinary files"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("phantoms")
    paths: list[Path] = []
    paths += make_lumbar_mr(root / "mr", slices=3, size=32, with_axial=True).paths
    paths += make_spine_ct(root / "ct", slices=4, size=32).paths
    paths += make_scoliosis_radiograph(root / "xr").paths
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.5"):  # implicit VR, RLE
        paths += make_spine_ct(root / f"ct-{ts}", slices=2, size=32, transfer_syntax_uid=ts).paths
    return paths


def test_answers_for_every_synthetic_phantom(phantoms: list[Path]) -> None:
    for path in phantoms:
        got = _dataset_bytes(path)
        assert got is not None
        fields = scan_header(*got)
        assert fields is not None, path
        assert fields == _pydicom_fields(path)


def test_undefined_length_sequences_before_the_uids_are_skipped(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = "1.2.3"
    inner = pydicom.Dataset()
    inner.CodeValue = "X"
    item.PurposeOfReferenceCodeSequence = [inner]
    ds.ReferencedImageSequence = [item, item]  # (0008,1140), before the study UID
    ds.ReferencedImageSequence.is_undefined_length = True
    for it in ds.ReferencedImageSequence:
        it.is_undefined_length_sequence_item = True
    ds.PurposeOfReferenceCodeSequence = []
    out = tmp_path / "seq.dcm"
    ds.save_as(out)
    data, ts = _dataset_bytes(out)  # type: ignore[misc]
    assert b"\xff\xff\xff\xff" in data[: data.find(b"\x20\x00\x0d\x00")]
    assert scan_header(data, ts) == _pydicom_fields(out)


def test_leaves_deflate_big_endian_and_non_ascii_to_pydicom(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    ds.SeriesDescription = "Rücken"
    ds.SpecificCharacterSet = "ISO_IR 192"
    out = tmp_path / "utf8.dcm"
    ds.save_as(out)
    data, ts = _dataset_bytes(out)  # type: ignore[misc]
    assert scan_header(data, ts) is None
    assert scan_header(b"\x08\x00\x16\x00", "1.2.840.10008.1.2.1.99") is None
    assert scan_header(b"\x00\x08\x00\x16", "1.2.840.10008.1.2.2") is None


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(min_value=0, max_value=4000), flip=st.integers(min_value=0, max_value=3999),
       byte=st.integers(min_value=0, max_value=255))
def test_truncated_or_corrupt_input_never_raises_nor_lies(cut: int, flip: int, byte: int) -> None:
    path = Path(pydicom.data.get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    data, ts = _dataset_bytes(path)  # type: ignore[misc]
    truncated = data[:cut]
    fields = scan_header(truncated, ts)
    assert fields is None or fields == _pydicom_fields(path)
    corrupt = bytearray(data[:4000])
    corrupt[flip] = byte
    scan_header(bytes(corrupt), ts)  # any answer, never an exception
