"""Prior studies (``dicom_node.network.priors``) against a real Orthanc as the site's PACS.

One Orthanc holds, for patient ``PRI-0001``: a whole-spine radiograph (2022), a lumbar MR (2023) with two
revisions of our TID 1500 SR, our key image and narrative, and a foreign vendor's TID 1500 SR, a
results-only study (our SR alone, 2023), and the current lumbar MR (2024); for ``PRI-0002`` one MR; for
``PRI-0003`` a current lumbar MR and priors of known and unknown regions.  Orthanc knows our AE
(``SPINEMED``) as a modality, which allows it C-FIND and C-GET; it knows no other AE.
"""

from __future__ import annotations

import datetime
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
import pytest
from conftest import free_port
from pydicom.uid import generate_uid
from test_orthanc_harness import OrthancServer, require_orthanc, start_orthanc
from test_sr_roundtrip import _compare
from test_sr_support import CREATED_AT, Case, lumbar_mr_case

from dicom_node.config import DestinationConfig
from dicom_node.devtools.phantoms import make_lumbar_mr, make_scoliosis_radiograph
from dicom_node.network.priors import PriorsError, PriorStudy, fetch_prior_reports, find_prior_studies
from inference.study import load_study
from sr_templates import build_outputs, read_measurement_report

pytestmark = pytest.mark.orthanc

OUR_AE = "SPINEMED"
PID = "PRI-0001"
CURRENT_DATE = datetime.date(2024, 5, 1)


@dataclass
class Pacs:
    orthanc: OrthancServer
    uids: dict[str, str]
    prior_case: Case
    our_srs: list[pydicom.Dataset]  # revision 2 (newer content), revision 1

    def peer(self, ae_title: str = "ORTHANC") -> DestinationConfig:
        return DestinationConfig(name="pacs", type="dicom", ae_title=ae_title, host="127.0.0.1",
                                 port=self.orthanc.dicom_port)


def _restamp(paths: tuple[Path, ...] | list[Path], **attrs: str) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


def _upload(orthanc: OrthancServer, paths: list[Path] | tuple[Path, ...]) -> None:
    for path in paths:
        orthanc.request("POST", "/instances", path.read_bytes())


def _upload_ds(orthanc: OrthancServer, ds: pydicom.Dataset, tmp: Path) -> None:
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    _upload(orthanc, [path])


def _mr(tmp: Path, name: str, *, seed: int, patient_id: str, date: str, **attrs: str) -> str:
    syn = make_lumbar_mr(tmp / name, seed=seed, slices=2, size=32, patient_id=patient_id)
    _restamp(syn.paths, StudyDate=date, **attrs)
    return syn.study_instance_uid


def _foreign_sr(ours: pydicom.Dataset) -> pydicom.Dataset:
    """Another vendor's TID 1500 SR in the same study: its own series, description and manufacturer."""
    ds = pydicom.dcmread(_bytes_io(ours))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "Vendor CAD measurements"
    ds.Manufacturer = "OtherVendor"
    ds.SeriesNumber = 77
    return ds


def _bytes_io(ds: pydicom.Dataset) -> object:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return buf


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    require_orthanc()
    tmp = tmp_path_factory.mktemp("priors")
    orthanc = start_orthanc(tmp, {
        "DicomModalities": {"node": [OUR_AE, "127.0.0.1", free_port()]},
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
    })
    try:
        uids: dict[str, str] = {}
        # patient PRI-0001 ------------------------------------------------------------------------
        xr = make_scoliosis_radiograph(tmp / "xr", seed=1, patient_id=PID)
        _restamp(xr.paths, StudyDate="20220301")
        uids["xr_2022"] = xr.study_instance_uid

        case = lumbar_mr_case(tmp / "prior", study_instance_uid=generate_uid())
        _restamp(case.synthetic.paths, PatientID=PID, StudyDate="20230601")
        case = replace(case, study=load_study(case.synthetic.paths))
        uids["mr_2023"] = case.study.study_instance_uid
        rev1 = build_outputs(case.study, case.findings, created_at=CREATED_AT)
        rev2 = build_outputs(case.study, case.findings, revision=2, predecessors=rev1,
                             created_at=CREATED_AT + datetime.timedelta(days=3))
        assert str(rev1[0].SOPClassUID) == "1.2.840.10008.5.1.4.1.1.88.34"
        uids["current"] = _mr(tmp, "current", seed=3, patient_id=PID, date="20240501")
        uids["other_patient"] = _mr(tmp, "other", seed=4, patient_id="PRI-0002", date="20230101")

        _upload(orthanc, xr.paths)
        _upload(orthanc, case.synthetic.paths)
        _upload(orthanc, sorted(p for p in (tmp / "current").rglob("*.dcm")))
        _upload(orthanc, sorted(p for p in (tmp / "other").rglob("*.dcm")))
        out = tmp / "results"
        out.mkdir()
        for ds in [*rev1, *rev2, _foreign_sr(rev1[0])]:
            _upload_ds(orthanc, ds, out)
        # a results-only study of the patient (our SR without images): not a prior study
        lone = pydicom.dcmread(_bytes_io(rev1[0]))
        lone.StudyInstanceUID = uids["results_only"] = generate_uid()
        lone.SeriesInstanceUID = generate_uid()
        lone.SOPInstanceUID = generate_uid()
        lone.file_meta.MediaStorageSOPInstanceUID = lone.SOPInstanceUID
        lone.StudyDate = "20231001"
        _upload_ds(orthanc, lone, out)

        # patient PRI-0003: regions ------------------------------------------------------------------
        uids["r_current"] = _mr(tmp, "r-current", seed=10, patient_id="PRI-0003", date="20240501")
        uids["r_cervical"] = _mr(tmp, "r-cervical", seed=11, patient_id="PRI-0003", date="20230101",
                                 BodyPartExamined="CSPINE", StudyDescription="MRI SPINE")
        uids["r_unknown"] = _mr(tmp, "r-unknown", seed=12, patient_id="PRI-0003", date="20220101",
                                BodyPartExamined="", StudyDescription="MRI")
        uids["r_cervical_text"] = _mr(tmp, "r-cervical-text", seed=13, patient_id="PRI-0003",
                                      date="20200101", BodyPartExamined="",
                                      StudyDescription="MRI CERVICAL SPINE")
        xr3 = make_scoliosis_radiograph(tmp / "r-xr", seed=14, patient_id="PRI-0003")
        _restamp(xr3.paths, StudyDate="20210101")
        uids["r_whole"] = xr3.study_instance_uid
        for name in ("r-current", "r-cervical", "r-unknown", "r-cervical-text"):
            _upload(orthanc, sorted((tmp / name).rglob("*.dcm")))
        _upload(orthanc, xr3.paths)
        yield Pacs(orthanc, uids, case, [rev2[0], rev1[0]])
    finally:
        orthanc.stop(signal.SIGKILL)


def _find(pacs: Pacs, **kw: object) -> list[PriorStudy]:
    args: dict[str, object] = {
        "patient_id": PID, "issuer_of_patient_id": None, "current_study_uid": pacs.uids["current"],
        "current_date": CURRENT_DATE, "region": None, "max_count": 10, "max_age_days": 3650,
        "calling_ae": OUR_AE, "timeout_s": 10.0,
    }
    args.update(kw)
    return find_prior_studies(pacs.peer(), **args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- find
def test_finds_the_two_priors_newest_first(pacs: Pacs) -> None:
    priors = _find(pacs)
    assert [p.study_instance_uid for p in priors] == [pacs.uids["mr_2023"], pacs.uids["xr_2022"]]
    mr, xr = priors
    assert mr.study_date == datetime.date(2023, 6, 1) and xr.study_date == datetime.date(2022, 3, 1)
    assert "MR" in mr.modalities and "SR" in mr.modalities, "the prior with our results keeps its SRs"
    assert mr.description == "MRI LUMBAR SPINE" and mr.body_parts == ("LSPINE",)
    assert xr.modalities == ("DX",) and xr.body_parts == ("SPINE",)


def test_max_count_and_max_age(pacs: Pacs) -> None:
    assert [p.study_instance_uid for p in _find(pacs, max_count=1)] == [pacs.uids["mr_2023"]]
    assert [p.study_instance_uid for p in _find(pacs, max_age_days=500)] == [pacs.uids["mr_2023"]]
    assert _find(pacs, max_age_days=30) == []
    assert _find(pacs, max_count=0) == []


def test_a_later_study_is_not_a_prior_and_no_date_means_no_range(pacs: Pacs) -> None:
    # read against the 2023 MR: the 2024 study is later, the 2022 radiograph is its prior
    earlier = _find(pacs, current_study_uid=pacs.uids["mr_2023"], current_date=datetime.date(2023, 6, 1))
    assert [p.study_instance_uid for p in earlier] == [pacs.uids["xr_2022"]]
    undated = _find(pacs, current_study_uid=pacs.uids["mr_2023"], current_date=None, max_age_days=1)
    assert [p.study_instance_uid for p in undated] == [pacs.uids["current"], pacs.uids["xr_2022"]]


def test_other_patient_and_issuer(pacs: Pacs) -> None:
    other = _find(pacs, patient_id="PRI-0002", current_study_uid="1.2.3")
    assert [p.study_instance_uid for p in other] == [pacs.uids["other_patient"]]
    assert _find(pacs, patient_id="PRI-9999") == []
    # the phantoms carry no Issuer of Patient ID: an issuer given is a matching key, so nothing matches
    assert _find(pacs, issuer_of_patient_id="HOSP-A") == []


def test_region_filter(pacs: Pacs) -> None:
    u = pacs.uids
    base = {"patient_id": "PRI-0003", "current_study_uid": u["r_current"]}
    every = [u["r_cervical"], u["r_unknown"], u["r_whole"], u["r_cervical_text"]]
    assert [p.study_instance_uid for p in _find(pacs, **base)] == every
    lumbar = _find(pacs, region="lumbar", **base)
    assert [p.study_instance_uid for p in lumbar] == [u["r_unknown"], u["r_whole"]]
    assert lumbar[0].body_parts == () and lumbar[1].body_parts == ("SPINE",)
    cervical = _find(pacs, region="cervical", **base)
    assert [p.study_instance_uid for p in cervical] == every
    assert cervical[0].body_parts == ("CSPINE",)
    assert [p.study_instance_uid for p in _find(pacs, region="whole", **base)] == every
    # max_count counts the studies kept, not the ones the region dropped
    assert [p.study_instance_uid for p in _find(pacs, region="lumbar", max_count=1, **base)] == [u["r_unknown"]]
    with pytest.raises(ValueError, match="region"):
        _find(pacs, region="sacral", **base)


# ---------------------------------------------------------------------------------------------- fetch
def test_fetch_gets_our_srs_newest_first_and_ignores_a_foreign_one(pacs: Pacs, tmp_path: Path) -> None:
    dest = tmp_path / "priors" / "mr"
    paths = fetch_prior_reports(pacs.peer(), pacs.uids["mr_2023"], dest, calling_ae=OUR_AE, timeout_s=10)
    want = [str(ds.SOPInstanceUID) for ds in pacs.our_srs]
    assert [p.name for p in paths] == [f"{u}.dcm" for u in want], "revision 2 (newer content) first"
    assert sorted(dest.iterdir()) == sorted(paths), "nothing else written: no foreign SR, no temp file"
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.SeriesDescription.startswith("SpineMed AI results")
        _compare(pacs.prior_case, read_measurement_report(ds), ds)
    again = fetch_prior_reports(pacs.peer(), pacs.uids["mr_2023"], dest, calling_ae=OUR_AE, timeout_s=10)
    assert again == paths, "a second fetch overwrites in place"


def test_a_study_without_our_sr_gives_nothing(pacs: Pacs, tmp_path: Path) -> None:
    assert fetch_prior_reports(pacs.peer(), pacs.uids["xr_2022"], tmp_path / "xr", calling_ae=OUR_AE) == []
    assert list((tmp_path / "xr").iterdir()) == []
    assert fetch_prior_reports(pacs.peer(), "1.2.3.4.5", tmp_path / "none", calling_ae=OUR_AE) == []


# ---------------------------------------------------------------------------------------------- failures
def _no_phi(message: str, pacs: Pacs) -> None:
    assert "PRI-0" not in message
    assert not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", message), message
    for value in pacs.uids.values():
        assert value not in message


def test_wrong_called_ae_is_rejected(pacs: Pacs, tmp_path: Path) -> None:
    strict = start_orthanc(tmp_path, {"DicomCheckCalledAet": True,
                                      "DicomModalities": {"node": [OUR_AE, "127.0.0.1", free_port()]}},
                           name="strict")
    try:
        peer = DestinationConfig(name="pacs", type="dicom", ae_title="NOT-ORTHANC", host="127.0.0.1",
                                 port=strict.dicom_port)
        with pytest.raises(PriorsError, match="association rejected by pacs") as find_err:
            find_prior_studies(peer, patient_id=PID, issuer_of_patient_id=None,
                               current_study_uid=pacs.uids["current"], current_date=CURRENT_DATE,
                               region="lumbar", max_count=2, max_age_days=3650, calling_ae=OUR_AE, timeout_s=10)
        with pytest.raises(PriorsError, match="association rejected by pacs") as get_err:
            fetch_prior_reports(peer, pacs.uids["mr_2023"], tmp_path / "x", calling_ae=OUR_AE, timeout_s=10)
    finally:
        strict.stop(signal.SIGKILL)
    for err in (find_err, get_err):
        _no_phi(str(err.value), pacs)
        assert err.value.transient


def test_unknown_calling_ae_is_refused(pacs: Pacs, tmp_path: Path) -> None:
    """Orthanc accepts the association but aborts it at the first C-FIND of an AE it does not know."""
    with pytest.raises(PriorsError, match="C-FIND refused: the peer aborted") as find_err:
        find_prior_studies(pacs.peer(), patient_id=PID, issuer_of_patient_id=None,
                           current_study_uid=pacs.uids["current"], current_date=CURRENT_DATE, region=None,
                           max_count=2, max_age_days=3650, calling_ae="STRANGER", timeout_s=10)
    with pytest.raises(PriorsError, match="C-FIND refused: the peer aborted") as get_err:
        fetch_prior_reports(pacs.peer(), pacs.uids["mr_2023"], tmp_path / "x", calling_ae="STRANGER",
                            timeout_s=10)
    for err in (find_err, get_err):
        _no_phi(str(err.value), pacs)
    assert not list((tmp_path / "x").glob("*.dcm"))


def test_closed_port_is_unreachable_within_the_timeout(pacs: Pacs, tmp_path: Path) -> None:
    import time

    peer = DestinationConfig(name="pacs", type="dicom", ae_title="ORTHANC", host="127.0.0.1", port=free_port())
    start = time.monotonic()
    with pytest.raises(PriorsError, match="unreachable") as err:
        find_prior_studies(peer, patient_id=PID, issuer_of_patient_id=None, current_study_uid="1.2.3",
                           current_date=CURRENT_DATE, region=None, max_count=2, max_age_days=10,
                           calling_ae=OUR_AE, timeout_s=3)
    assert time.monotonic() - start < 3 + 3
    _no_phi(str(err.value), pacs)
    with pytest.raises(PriorsError, match="unreachable"):
        fetch_prior_reports(peer, "1.2.3", tmp_path / "y", calling_ae=OUR_AE, timeout_s=3)


def test_a_non_dicom_destination_is_refused(pacs: Pacs, tmp_path: Path) -> None:
    web = DestinationConfig(name="web", type="dicomweb", url="http://127.0.0.1:1/dicom-web")
    with pytest.raises(PriorsError, match="must be a dicom destination"):
        fetch_prior_reports(web, "1.2.3", tmp_path, calling_ae=OUR_AE)


def test_a_failed_sub_operation_fails_the_fetch_with_the_reason(pacs: Pacs, tmp_path: Path) -> None:
    """Our Storage SCP cannot write one report (a folder is in its place): the C-GET reports a failed
    sub-operation and the error names both the status and our reason."""
    dest = tmp_path / "blocked"
    blocker = dest / f"{pacs.our_srs[0].SOPInstanceUID}.dcm"
    blocker.mkdir(parents=True)
    (blocker / "keep").write_text("x")
    with pytest.raises(PriorsError, match=r"C-GET .*0x[0-9A-F]{4}.*cannot write a report") as err:
        fetch_prior_reports(pacs.peer(), pacs.uids["mr_2023"], dest, calling_ae=OUR_AE, timeout_s=10)
    _no_phi(str(err.value), pacs)
    assert not list(dest.glob(".priors-*")), "no temporary file left behind"
