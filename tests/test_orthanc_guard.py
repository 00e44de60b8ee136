"""Unit level: the plugin's loop guard, its pre-filter, its settings and its durable outbox."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from orthanc_plugin.guard import OwnMarkers, StudyFilter, is_candidate_series, is_own_series, split_series
from orthanc_plugin.outbox import Outbox
from orthanc_plugin.settings import PluginSettings, SettingsError

SERIES_KEYS = ("Manufacturer", "Modality", "SeriesDescription", "SeriesNumber")
OURS = {"Manufacturer": "SpineMed", "Modality": "SR", "SeriesDescription": "SpineMed AI results",
        "SeriesNumber": "9901"}


@pytest.mark.parametrize(
    ("tags", "own"),
    [
        (OURS, True),
        ({**OURS, "SeriesDescription": "SpineMed AI results (DEMO - NOT FOR DIAGNOSTIC USE)"}, True),
        ({**OURS, "Modality": "OT", "SeriesDescription": "", "SeriesNumber": "9901"}, True),  # key image
        ({**OURS, "Modality": "KO", "SeriesDescription": "", "SeriesNumber": "9903"}, True),  # key object
        ({**OURS, "Modality": "DOC", "SeriesDescription": "", "SeriesNumber": "9904"}, True),  # PDF
        ({**OURS, "Modality": "OT", "SeriesDescription": "", "SeriesNumber": "9905"}, False),
        ({**OURS, "Manufacturer": "  spinemed "}, True),
        # the synthetic phantoms and other vendors are never ours, whatever their series
        ({**OURS, "Manufacturer": "SpineMed Phantom"}, False),
        ({**OURS, "Manufacturer": "ACME"}, False),
        ({"Manufacturer": "SpineMed", "Modality": "MR", "SeriesDescription": "SAG T2", "SeriesNumber": "2"},
         False),
        ({"Modality": "SR", "SeriesNumber": "9901", "SeriesDescription": "SpineMed AI results"}, False),
        ({}, False),
    ],
)
def test_own_series(tags: dict[str, str], own: bool) -> None:
    assert is_own_series(tags, OwnMarkers()) is own


def test_own_series_number_is_configurable() -> None:
    tags = {"Manufacturer": "SpineMed", "Modality": "OT", "SeriesNumber": "77"}
    assert not is_own_series(tags, OwnMarkers())
    assert is_own_series(tags, OwnMarkers(series_number=77))
    assert not is_own_series({**tags, "SeriesNumber": "x"}, OwnMarkers(series_number=None))


@pytest.mark.parametrize("demo", [False, True])
def test_our_real_output_objects_are_recognised(tmp_path: Path, demo: bool) -> None:
    """Every object sr_templates writes (SRs and key image), seen through its series-level tags, is ours;
    every source instance of the same study is not."""
    from test_sr_support import lumbar_mr_case

    from sr_templates import build_outputs

    case = lumbar_mr_case(tmp_path, demo=demo)
    outputs = build_outputs(case.study, case.findings)
    assert {str(ds.Modality) for ds in outputs} >= {"SR"}
    for ds in outputs:
        tags = {k: str(ds.get(k, "")) for k in SERIES_KEYS}
        assert is_own_series(tags, OwnMarkers()), tags
    for path in case.synthetic.paths:
        src = pydicom.dcmread(path, stop_before_pixels=True)
        tags = {k: str(src.get(k, "")) for k in SERIES_KEYS}
        assert not is_own_series(tags, OwnMarkers()), tags


@pytest.mark.parametrize(
    ("tags", "study", "candidate"),
    [
        ({"Modality": "MR", "BodyPartExamined": "LSPINE"}, {}, True),
        ({"Modality": "MR", "SeriesDescription": "SAG T2 LWS"}, {}, True),
        ({"Modality": "MR", "SeriesDescription": "SAG T2"}, {"StudyDescription": "MRI LUMBAR SPINE"}, True),
        ({"Modality": "CT", "BodyPartExamined": "HEAD", "SeriesDescription": "AX BRAIN"}, {}, False),
        ({"Modality": "SR", "BodyPartExamined": "LSPINE"}, {}, False),
        ({"Modality": "DX", "ProtocolName": "Scoliosis full spine"}, {}, True),
    ],
)
def test_candidate_series(tags: dict[str, str], study: dict[str, str], candidate: bool) -> None:
    assert is_candidate_series(tags, StudyFilter(), study) is candidate


def test_split_series_keeps_ours_out_of_the_sources() -> None:
    series = [
        {"ID": "a", "MainDicomTags": {"Modality": "MR", "BodyPartExamined": "LSPINE",
                                      "Manufacturer": "SpineMed Phantom"}},
        {"ID": "b", "MainDicomTags": OURS},
        {"ID": "c", "MainDicomTags": {"Modality": "PR"}},
        {"MainDicomTags": OURS},  # malformed entries are ignored
    ]
    own, source, candidate = split_series(series, OwnMarkers(), StudyFilter())
    assert own == {"b"} and source == {"a", "c"} and candidate
    own, source, candidate = split_series(series[1:], OwnMarkers(), StudyFilter())
    assert own == {"b"} and source == {"c"} and not candidate


def test_synthetic_study_is_a_candidate_and_not_ours(tmp_path: Path) -> None:
    from dicom_node.devtools.phantoms import make_lumbar_mr

    study = make_lumbar_mr(tmp_path, slices=2, size=32)
    ds = pydicom.dcmread(study.paths[0], stop_before_pixels=True)
    tags = {k: str(ds.get(k, "")) for k in ("Manufacturer", "Modality", "SeriesDescription", "SeriesNumber",
                                            "BodyPartExamined", "ProtocolName")}
    assert not is_own_series(tags, OwnMarkers())
    assert is_candidate_series(tags, StudyFilter())


# ---------------------------------------------------------------------------------------------- settings
def _orthanc_cfg(**section: object) -> dict[str, object]:
    return {"DicomModalities": {"spinemed": ["SPINEMED", "127.0.0.1", 11112]}, "StableAge": 3,
            "IndexDirectory": "/var/lib/orthanc/db", "SpineMed": {"JobStore": "/x/jobs.sqlite3", **section}}


def test_settings_defaults_and_overrides() -> None:
    s = PluginSettings.from_orthanc(_orthanc_cfg(), env={})
    assert s.job_store == Path("/x/jobs.sqlite3")
    assert s.state_file == Path("/var/lib/orthanc/db/spinemed-plugin.sqlite3")
    assert s.stable_age_s == 3 and s.node_modality == "spinemed"
    s = PluginSettings.from_orthanc(_orthanc_cfg(OwnSeriesNumber=42, Modalities=["mr"], PollSeconds=0.5),
                                    env={"SPINEMED_JOB_STORE": "/y/jobs.sqlite3"})
    assert s.job_store == Path("/y/jobs.sqlite3")
    assert s.markers.series_number == 42 and s.study_filter.modalities == frozenset({"MR"})
    assert s.poll_seconds == 0.5


def test_settings_with_the_nodes_url_instead_of_its_job_store() -> None:
    s = PluginSettings.from_orthanc(_orthanc_cfg(JobStore=None, NodeUrl="https://gpu-node:8080",
                                                 NodeToken="t" * 40), env={})
    assert s.job_store is None and s.node_url == "https://gpu-node:8080" and s.node_token == "t" * 40
    s = PluginSettings.from_orthanc(_orthanc_cfg(JobStore=None, NodeUrl="http://127.0.0.1:8080"), env={})
    assert s.node_token is None, "a node on this host answers loopback clients without a token"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"JobStore": None}, "SpineMed.JobStore"),
        ({"NodeModality": "nope"}, "SpineMed.NodeModality"),
        ({"PollSeconds": "fast"}, "SpineMed.PollSeconds"),
        ({"Modalities": "MR"}, "SpineMed.Modalities"),
        ({"DescriptionPattern": "("}, "SpineMed.DescriptionPattern"),
        ({"OwnSeriesNumber": "9901"}, "SpineMed.OwnSeriesNumber"),
        ({"NodeUrl": "http://node:8080"}, "either JobStore or NodeUrl"),
        ({"JobStore": None, "NodeUrl": "node:8080"}, "SpineMed.NodeUrl"),
        ({"JobStore": None, "NodeUrl": "http://node:8080", "NodeToken": "${SPINEMED_API_TOKEN}"},
         "SpineMed.NodeToken"),
        ({"NodeToken": "a-token-without-a-url"}, "SpineMed.NodeToken"),
    ],
)
def test_settings_errors_name_the_key(section: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace(".", r"\.")):
        PluginSettings.from_orthanc(_orthanc_cfg(**section), env={})


# ---------------------------------------------------------------------------------------------- outbox
def test_outbox_pending_sending_dirty_and_cursor(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "state.sqlite3")
    assert box.cursor() is None
    box.set_cursor(7)
    box.mark_pending("s1", at=100.0)
    assert [r.orthanc_id for r in box.due(99.0)] == []
    assert [r.orthanc_id for r in box.due(100.0)] == ["s1"]
    box.mark_pending("s1", at=50.0)  # an earlier due time wins for a pending study
    assert box.get("s1").next_at == 50.0  # type: ignore[union-attr]
    box.update("s1", state="sending", job_id="j1")
    box.mark_pending("s1")  # in flight: only flagged, the Orthanc job is kept
    row = box.get("s1")
    assert row is not None and row.state == "sending" and row.job_id == "j1" and row.dirty
    box.update("s1", state="done", status="spinemed-done", revision=1)
    box.mark_pending("s1", at=5.0)
    row = box.get("s1")
    assert row is not None and row.state == "pending" and row.status == "spinemed-done" and row.revision == 1
    with pytest.raises(ValueError, match="unknown column"):
        box.update("s1", nope=1)
    box.close()
    again = Outbox(tmp_path / "state.sqlite3")  # durable across a restart
    assert again.cursor() == 7 and again.get("s1") is not None
    again.delete("s1")
    assert again.rows() == []
    again.close()
