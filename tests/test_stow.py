"""STOW-RS export (``dicom_node.delivery.stow``) against a real Orthanc with its DICOMweb plugin.

The Orthanc here requires HTTP basic auth and refuses, with a Lua filter, any instance whose Patient ID
is ``REFUSE-ME`` — so one request can come back with both a Referenced and a Failed SOP Sequence.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import free_port
from pydicom.uid import generate_uid
from test_orthanc_harness import OrthancServer, require_orthanc, start_orthanc

from dicom_node.config import DestinationConfig
from dicom_node.delivery.dispatch import deliver
from dicom_node.delivery.stow import parse_stow_response, send_files_stow
from dicom_node.devtools.phantoms import make_lumbar_mr

pytestmark = pytest.mark.orthanc

_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.PatientID ~= 'REFUSE-ME'
end
"""


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    require_orthanc("libOrthancDicomWeb.so")
    tmp = tmp_path_factory.mktemp("stow")
    lua = tmp / "filter.lua"
    lua.write_text(_LUA)
    server = start_orthanc(tmp, {
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "AuthenticationEnabled": True,
        "RegisteredUsers": {"spinemed": "s3cret-pw"},
        "LuaScripts": [str(lua)],
    }, auth=("spinemed", "s3cret-pw"))
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    study = make_lumbar_mr(tmp_path_factory.mktemp("mr"), slices=2, size=32)
    return list(study.paths)


def _dest(orthanc: OrthancServer, *, password_env: str | None = "STOW_TEST_PW", user: str = "spinemed",
          url: str | None = None) -> DestinationConfig:
    return DestinationConfig(name="orthanc", type="dicomweb", url=url or f"{orthanc.url}/dicom-web",
                             username=user, password_env=password_env)


def _copy_with(path: Path, out: Path, **changes: str) -> Path:
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_stow_stores_every_instance_and_a_resend_is_harmless(
    orthanc: OrthancServer, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STOW_TEST_PW", "s3cret-pw")
    results = send_files_stow(_dest(orthanc), files[:3], timeout_s=10)
    assert [r.path for r in results] == files[:3]
    assert all(r.delivered and r.status == 0 and r.error is None for r in results), results
    for r in results:
        assert orthanc.request("POST", "/tools/lookup", r.sop_instance_uid.encode())
    again = send_files_stow(_dest(orthanc), files[:3], timeout_s=10)  # deterministic UIDs: resend = no-op
    assert all(r.delivered for r in again), again


def test_deliver_dispatches_dicomweb(orthanc: OrthancServer, files: list[Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOW_TEST_PW", "s3cret-pw")
    results = deliver(_dest(orthanc), files[3:4], calling_ae="SPINEMED", timeout_s=10)
    assert len(results) == 1 and results[0].delivered


def test_a_request_orthanc_refuses_fails_every_instance_in_it(
    orthanc: OrthancServer, files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Orthanc's DICOMweb plugin (1.7) answers 400 for the whole request when one part is unusable
    monkeypatch.setenv("STOW_TEST_PW", "s3cret-pw")
    good = _copy_with(files[0], tmp_path / "good.dcm")
    bad = _copy_with(files[1], tmp_path / "bad.dcm")
    ds = pydicom.dcmread(bad)
    del ds.StudyInstanceUID
    ds.save_as(bad, enforce_file_format=True)
    results = send_files_stow(_dest(orthanc), [good, bad], timeout_s=10)
    assert [r.delivered for r in results] == [False, False]
    assert all("HTTP 400" in (r.error or "") for r in results), results
    assert results[1].sop_instance_uid == str(ds.SOPInstanceUID)


def test_orthanc_reports_an_instance_its_filter_discarded_as_stored(
    orthanc: OrthancServer, files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinned Orthanc behaviour (docs/orthanc.md): a Lua ``ReceivedInstanceFilter`` refusal is not a
    Failed SOP Sequence entry — STOW-RS says stored.  Keep such filters away from our result objects."""
    monkeypatch.setenv("STOW_TEST_PW", "s3cret-pw")
    bad = _copy_with(files[1], tmp_path / "filtered.dcm", PatientID="REFUSE-ME")
    results = send_files_stow(_dest(orthanc), [bad], timeout_s=10)
    assert results[0].delivered
    assert orthanc.request("POST", "/tools/lookup", results[0].sop_instance_uid.encode()) == []


def test_wrong_password_missing_env_unreachable_and_unreadable_never_raise(
    orthanc: OrthancServer, files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STOW_TEST_PW", "wrong")
    results = send_files_stow(_dest(orthanc), files[:2], timeout_s=10)
    assert [r.delivered for r in results] == [False, False]
    assert all("HTTP 401" in (r.error or "") for r in results), results
    assert "s3cret" not in repr(results) and "wrong" not in repr(results)

    monkeypatch.delenv("STOW_TEST_PW")
    results = send_files_stow(_dest(orthanc), files[:1], timeout_s=10)
    assert not results[0].delivered and "STOW_TEST_PW is not set" in (results[0].error or "")

    monkeypatch.setenv("STOW_TEST_PW", "s3cret-pw")
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    results = send_files_stow(_dest(orthanc, url=dead), files[:2], timeout_s=5)
    assert [r.delivered for r in results] == [False, False]
    assert all("cannot connect" in (r.error or "") for r in results), results
    assert results[0].sop_instance_uid == str(pydicom.dcmread(files[0]).SOPInstanceUID)

    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    results = send_files_stow(_dest(orthanc), [junk, files[0]], timeout_s=10)
    assert not results[0].delivered and "cannot read" in (results[0].error or "")
    assert results[1].delivered


def test_wrong_base_url_is_a_failed_result(orthanc: OrthancServer, files: list[Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOW_TEST_PW", "s3cret-pw")
    results = send_files_stow(_dest(orthanc, url=f"{orthanc.url}/no-such-root"), files[:1], timeout_s=10)
    assert not results[0].delivered and "HTTP 404" in (results[0].error or ""), results


def test_parse_stow_response_reads_both_sequences() -> None:
    body = {
        "00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2.3"]}},
            {"00081155": {"vr": "UI", "Value": ["1.2.4"]}, "00081196": {"vr": "US", "Value": [0xB000]}},
        ]},
        "00081198": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2.5"]}, "00081197": {"vr": "US", "Value": [0xC000]}},
        ]},
    }
    out = parse_stow_response(body)
    assert out["1.2.3"] == (True, 0, None)
    assert out["1.2.4"] == (True, 0xB000, None)
    assert out["1.2.5"][0] is False and out["1.2.5"][1] == 0xC000 and "0xC000" in (out["1.2.5"][2] or "")
    assert parse_stow_response({}) == {}
