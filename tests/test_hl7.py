"""Results to the RIS: HL7 v2.5.1 ORU^R01 over MLLP to a real receiver (hl7apy's ``MLLPServer``).

The receiver parses what arrives with hl7apy and checks the ORU_R01 structure; the values are read back with
python-hl7 (another parser) and compared with what our SRs say, read by ``read_measurement_report``.
Answers AA, AE or AR as a test asks; the worker test sends a real study through a node whose only
destination is the receiver.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import pydicom
import pytest
from conftest import free_port, running_node, storescu, wait_until
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message
from test_sr_support import CREATED_AT, lumbar_mr_case, scoliosis_case

from dicom_node.config import DestinationConfig, load_config
from dicom_node.delivery.dispatch import check, deliver
from dicom_node.delivery.hl7 import build_oru, parse_ack, send_files_hl7
from dicom_node.devtools.phantoms import make_lumbar_mr
from dicom_node.jobs.model import JobState
from dicom_node.work.pipeline import Pipeline, output_kind
from inference.findings import FindingType, Severity
from sr_templates import build_outputs, read_measurement_report
from sr_templates.codes import FINDING_CODES, SEVERITY_CODES, SpineCodes, level_code
from sr_templates.evidence import requested_procedures


# ---------------------------------------------------------------------------------------------- receiver
class Receiver:
    """An MLLP listener on loopback answering each ORU^R01 with ``ack`` (AA, AE, AR) and ``text``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.messages: list[str] = []
        self.ack = "AA"
        self.text = ""
        self.control_id: str | None = None  # answer with this MSA-2 instead of the message's
        receiver = self

        class Handler(AbstractHandler):  # type: ignore[misc]
            def reply(self) -> str:
                raw = self.incoming_message
                parsed = parse_message(raw, validation_level=VALIDATION_LEVEL.TOLERANT)
                parsed.validate()  # the ORU_R01 2.5.1 structure, by the receiving side's own reading
                receiver.messages.append(raw)
                ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
                ack.msh.msh_3, ack.msh.msh_5 = "RIS", parsed.msh.msh_3.to_er7()
                ack.msh.msh_7 = time.strftime("%Y%m%d%H%M%S")
                ack.msh.msh_9, ack.msh.msh_10 = "ACK^R01^ACK", "A" + parsed.msh.msh_10.to_er7()[:19]
                ack.msh.msh_11, ack.msh.msh_12 = "P", "2.5.1"
                ack.msa.msa_1 = receiver.ack
                ack.msa.msa_2 = receiver.control_id or parsed.msh.msh_10.to_er7()
                if receiver.text:
                    ack.msa.msa_3 = receiver.text
                return str(ack.to_mllp())

        self.server = MLLPServer("127.0.0.1", self.port, {"ORU^R01^ORU_R01": (Handler,)}, timeout=10)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def dest(self, **kw: Any) -> DestinationConfig:
        return DestinationConfig(name="ris", type="hl7", host="127.0.0.1", port=self.port, **kw)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _report_files(tmp: Path, case: Any) -> tuple[list[Path], pydicom.Dataset, pydicom.Dataset]:
    outs = {output_kind(d): d for d in build_outputs(case.study, case.findings, created_at=CREATED_AT)}
    paths = []
    for kind in ("measurement_report", "narrative_report"):
        path = tmp / f"{kind}.dcm"
        pydicom.dcmwrite(path, outs[kind], enforce_file_format=True)
        paths.append(path)
    return paths, pydicom.dcmread(paths[0]), pydicom.dcmread(paths[1])


def _c(field: Any, n: int = 1, rep: int = 0) -> str:
    """Component ``n`` (from 1) of repetition ``rep`` of a python-hl7 field, as ER7 text."""
    return (str(field).split("~")[rep].split("^") + [""] * n)[n - 1]


def _obx(message: hl7.Message) -> list[dict[str, Any]]:
    rows = []
    for seg in message.segments("OBX"):
        rows.append({"type": str(seg[2]), "id": _c(seg[3]), "sub": str(seg[4]),
                     "value": seg[5], "units": str(seg[6]), "flag": str(seg[8]), "status": str(seg[11])})
    return rows


# ---------------------------------------------------------------------------------------------- content
def test_the_oru_carries_each_level_finding_as_the_sr_says(tmp_path: Path, receiver: Receiver) -> None:
    paths, sr, narrative = _report_files(tmp_path, lumbar_mr_case(tmp_path / "case"))
    results = send_files_hl7(receiver.dest(hl7_receiving_application="RIS"), paths, timeout_s=10)
    assert [(r.delivered, r.error) for r in results] == [(True, None), (True, None)]
    assert [r.sop_instance_uid for r in results] == [sr.SOPInstanceUID, narrative.SOPInstanceUID]
    assert len(receiver.messages) == 1
    msg = hl7.parse(receiver.messages[0])

    msh, pid, obr = msg.segment("MSH"), msg.segment("PID"), msg.segment("OBR")
    assert str(msh[9]) == "ORU^R01^ORU_R01" and str(msh[12]) == "2.5.1" and str(msh[5]) == "RIS"
    assert _c(pid[3]) == sr.PatientID
    assert _c(pid[5]) == sr.PatientName.family_name
    report = read_measurement_report(sr)
    assert _c(obr[4]) == report.procedure_reported[0].value
    assert str(obr[18]) == sr.AccessionNumber
    assert str(obr[25]) == "P", "our SR is UNVERIFIED: the result is preliminary"

    rows = _obx(msg)
    assert all(r["status"] == "P" for r in rows)
    ref = next(r for r in rows if r["type"] == "RP")
    assert _c(ref["value"]) == sr.SOPInstanceUID and ref["id"] == "18748-4"
    study = next(r for r in rows if r["type"] == "HD")
    assert _c(study["value"], 2) == sr.StudyInstanceUID and study["id"] == "110180"

    # one group (OBX-4) per finding, its first OBX the finding itself, as the SR codes it
    assert report.findings, "the case has findings"
    for n, finding in enumerate(report.findings, start=1):
        group = [r for r in rows if r["sub"] == str(n)]
        head = group[0]
        assert head["id"] == FINDING_CODES[finding.finding].value
        absent = finding.severity is Severity.NONE and finding.finding is not FindingType.NO_ABNORMALITY
        expected_value = SpineCodes.ABSENT.value if absent else SEVERITY_CODES[finding.severity].value
        assert _c(head["value"]) == expected_value
        assert head["flag"] == ("N" if absent else "A")
        site = next(r for r in group if r["id"] == "363698007")
        assert _c(site["value"]) == level_code(finding.level).value
        numbers = {r["id"]: float(str(r["value"])) for r in group if r["type"] == "NM"}
        assert sorted(numbers.values()) == sorted(m.value for m in finding.measurements)
    assert len({r["sub"] for r in rows if r["sub"]}) == len(report.findings)

    # the narrative: one TX per section, with its text
    texts = [r for r in rows if r["type"] == "TX"]
    sections = [item for item in narrative.ContentSequence if item.ValueType == "CONTAINER"
                and any(c.ValueType == "TEXT" for c in item.get("ContentSequence", []))]  # not the key images
    assert [t["id"] for t in texts] == [s.ConceptNameCodeSequence[0].CodeValue for s in sections]
    first = [str(c.TextValue) for c in sections[0].ContentSequence if c.ValueType == "TEXT"]
    reps = str(texts[0]["value"]).split("~")
    assert [msg.unescape(r) for r in reps] == first


def test_the_order_comes_from_the_images_worklist_copy_through_the_sr(tmp_path: Path) -> None:
    """Accession number and requested procedure ID (the modality's copy of its worklist entry) reach the SR's
    Referenced Request Sequence and OBR-18/19; placer and filler order numbers, where a modality copied them,
    reach ORC-2/3 and OBR-2/3."""
    case = lumbar_mr_case(tmp_path / "case")
    _, sr, narrative = _report_files(tmp_path, case)
    source = pydicom.dcmread(case.study.instances[0].path, stop_before_pixels=True)
    request = source.RequestAttributesSequence[0]
    item = sr.ReferencedRequestSequence[0]
    assert (item.AccessionNumber, item.RequestedProcedureID) == (request.AccessionNumber,
                                                                 request.RequestedProcedureID)
    assert item.StudyInstanceUID == sr.StudyInstanceUID

    source.RequestAttributesSequence[0].PlacerOrderNumberImagingServiceRequest = "PLC-1"
    source.RequestAttributesSequence[0].FillerOrderNumberImagingServiceRequest = "FIL-9"
    (copied,) = requested_procedures(source) or []
    assert (copied.PlacerOrderNumberImagingServiceRequest, copied.FillerOrderNumberImagingServiceRequest) == (
        "PLC-1", "FIL-9")
    sr.ReferencedRequestSequence = [copied]
    msg = hl7.parse(build_oru(sr, narrative))
    orc, obr = msg.segment("ORC"), msg.segment("OBR")
    assert (_c(orc[2]), _c(orc[3]), _c(obr[2]), _c(obr[3])) == ("PLC-1", "FIL-9", "PLC-1", "FIL-9")
    assert (_c(obr[18]), _c(obr[19])) == (request.AccessionNumber, request.RequestedProcedureID)


def test_the_cobb_angle_goes_as_a_number_in_degrees(tmp_path: Path) -> None:
    _, sr, narrative = _report_files(tmp_path, scoliosis_case(tmp_path / "case"))
    msg = hl7.parse(build_oru(sr, narrative))
    cobb = next(r for r in _obx(msg) if r["id"] == "285285000")
    assert cobb["type"] == "NM" and str(cobb["units"]).startswith("deg^")
    angle = next(m.value for f in read_measurement_report(sr).findings for m in f.measurements)
    assert float(str(cobb["value"])) == angle


def test_delimiters_in_names_and_text_are_escaped_not_structure(tmp_path: Path) -> None:
    _, sr, narrative = _report_files(tmp_path, lumbar_mr_case(tmp_path / "case"))
    sr.PatientName = "O|Brien~Smith^Ann&Mary"
    section = next(item for item in narrative.ContentSequence if item.ValueType == "CONTAINER")
    text = next(c for c in section.ContentSequence if c.ValueType == "TEXT")
    text.TextValue = "L4|L5 ^ herniation & canal \\ narrowing ~ see\nnext line"
    raw = build_oru(sr, narrative, control_id="CTRL1")
    msg = hl7.parse(raw)
    assert len(msg.segments("PID")) == 1 and str(msg.segment("MSH")[10]) == "CTRL1"
    assert msg.unescape(_c(msg.segment("PID")[5])) == "O|Brien~Smith"
    assert msg.unescape(_c(msg.segment("PID")[5], 2)) == "Ann&Mary"
    tx = next(r for r in _obx(msg) if r["type"] == "TX")
    first = str(tx["value"]).split("~")[0]
    assert first.count("\\.br\\") == 1
    assert msg.unescape(first.replace("\\.br\\", "\n")) == str(text.TextValue)


def test_build_refuses_what_is_not_our_report(tmp_path: Path) -> None:
    paths, sr, narrative = _report_files(tmp_path, lumbar_mr_case(tmp_path / "case"))
    with pytest.raises(TypeError, match="measurement_sr"):
        build_oru("not a dataset", narrative)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="measurement_sr: not a SpineMed measurement report"):
        build_oru(narrative, None)
    with pytest.raises(ValueError, match="control_id"):
        build_oru(sr, narrative, control_id="x" * 21)
    # a key image among the paths and no TID 1500: permanent, with the reason
    results = send_files_hl7(DestinationConfig(name="ris", type="hl7", host="127.0.0.1", port=free_port()),
                             [paths[1]], timeout_s=2)
    assert results[0].permanent and not results[0].delivered
    assert "no measurement report" in (results[0].error or "")


# ---------------------------------------------------------------------------------------------- answers
@pytest.mark.parametrize("code", ["AE", "AR"])
def test_an_error_or_reject_is_transient_with_the_receivers_reason(tmp_path: Path, receiver: Receiver,
                                                                   code: str) -> None:
    paths, sr, _ = _report_files(tmp_path, lumbar_mr_case(tmp_path / "case"))
    receiver.ack, receiver.text = code, "Order not found"
    results = deliver(receiver.dest(), paths, calling_ae="SPINEMED", timeout_s=10)
    assert all(not r.delivered and not r.permanent for r in results)
    assert results[0].error == f"HL7 {code}: Order not found"
    assert sr.PatientID not in (results[0].error or "") and str(sr.PatientName) not in (results[0].error or "")


def test_an_ack_for_another_message_is_not_taken(tmp_path: Path, receiver: Receiver) -> None:
    paths, _, _ = _report_files(tmp_path, lumbar_mr_case(tmp_path / "case"))
    receiver.control_id = "SOMETHINGELSE"
    results = send_files_hl7(receiver.dest(), paths, timeout_s=10)
    assert not results[0].delivered and not results[0].permanent
    assert "answers another message" in (results[0].error or "")


def test_closed_port_and_silent_receiver_are_transient(tmp_path: Path) -> None:
    paths, _, _ = _report_files(tmp_path, lumbar_mr_case(tmp_path / "case"))
    closed = DestinationConfig(name="ris", type="hl7", host="127.0.0.1", port=free_port())
    r = send_files_hl7(closed, paths, timeout_s=5)[0]
    assert not r.delivered and not r.permanent and "HL7: ConnectionRefusedError" in (r.error or "")

    with socket.socket() as silent:  # accepts, reads, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        r = send_files_hl7(DestinationConfig(name="ris", type="hl7", host="127.0.0.1", port=port), paths,
                           timeout_s=1)[0]
        assert time.monotonic() - t0 < 10
    assert not r.delivered and not r.permanent and r.error == "HL7: no acknowledgement within 1 s"


def test_parse_ack_reads_msa_and_err() -> None:
    ack = parse_ack("MSH|^~\\&|RIS||SPINEMED||20260101||ACK^R01^ACK|9|P|2.5.1\rMSA|AE|abc\r"
                    "ERR||||E|||Unknown procedure")
    assert (ack.code, ack.control_id, ack.text, ack.accepted) == ("AE", "abc", "Unknown procedure", False)
    with pytest.raises(ValueError, match="not an HL7 acknowledgement"):
        parse_ack("MSH|^~\\&|RIS\rPID|1")


# ---------------------------------------------------------------------------------------------- the node
@pytest.mark.slow
def test_the_node_sends_each_report_once_retries_an_error_and_fails_with_its_reason(
        tmp_path: Path, receiver: Receiver, demo_model_dir: Path) -> None:
    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp_path / "data", "min_free_disk_mb": 0},
        http={"enabled": False},
        # a quiet period storescu's pauses do not reach: one study, one revision
        completeness={"quiet_seconds": 1.5, "force_seconds": 60, "check_interval_s": 0.1},
        destinations=[{"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": receiver.port,
                       "hl7_receiving_application": "RIS"}],
        export={"max_attempts": 2, "backoff_initial_s": 0.2, "backoff_max_s": 0.4, "timeout_s": 5},
        model={"backend": "demo", "path": str(demo_model_dir)},
        worker={"poll_interval_s": 0.05},
    )
    receiver.ack, receiver.text = "AE", "Unknown order"
    with running_node(cfg, Pipeline(cfg)) as node:
        st = make_lumbar_mr(tmp_path / "mr", slices=5, size=96, seed=31)
        assert storescu(node.receiver.port, list(st.paths)).returncode == 0
        job = wait_until(lambda: (j := node.store.by_study(st.study_instance_uid)).state is JobState.FAILED and j,
                    180, "failed after the AE answers")
        assert job.reason == "delivery failed after 2 attempts: ris: HL7 AE: Unknown order"
        assert job.revision == 1
        deliveries = node.store.deliveries(st.study_instance_uid, job.revision)
        kinds = {o.sop_instance_uid: o.kind for o in node.store.outputs(st.study_instance_uid)}
        assert sorted(kinds[d.output_uid] for d in deliveries) == ["measurement_report", "narrative_report"]
        assert len(kinds) > 2, "the key image and its KO are written, not sent to the RIS"
        assert len(receiver.messages) == 2, "one message per attempt, not one per object"

        receiver.ack, receiver.text = "AA", ""
        node.store.retry(job.id)
        wait_until(lambda: node.store.by_study(st.study_instance_uid).state is JobState.DONE, 60, "delivered")
    assert len(receiver.messages) == 3
    ids = {str(hl7.parse(m).segment("MSH")[10]) for m in receiver.messages}
    assert len(ids) == 3, "a new control id per attempt"
    patient_id = pydicom.dcmread(st.paths[0], stop_before_pixels=True).PatientID
    assert {_c(hl7.parse(m).segment("PID")[3]) for m in receiver.messages} == {patient_id}


def test_render_message_prints_what_a_destination_would_be_sent(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from conftest import REPO

    paths, _, _ = _report_files(tmp_path, lumbar_mr_case(tmp_path / "case"))
    folder = paths[0].parent
    out = subprocess.run([sys.executable, "-m", "dicom_node", "render-message", "hl7", str(folder)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("MSH|^~\\&|SPINEMED|") and any(ln.startswith("OBX|") for ln in lines)
    out = subprocess.run([sys.executable, "-m", "dicom_node", "render-message", "fhir", *map(str, paths)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    bundle = json.loads(out.stdout)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    out = subprocess.run([sys.executable, "-m", "dicom_node", "render-message", "hl7", str(paths[1])],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "no measurement report" in out.stderr


def test_check_connects_to_the_mllp_port_and_sends_nothing(receiver: Receiver) -> None:
    """``spinemed-node echo`` / ``doctor`` for an HL7 destination."""
    ok, msg = check(receiver.dest(), calling_ae="SPINEMED", timeout_s=5)
    assert ok and "accepts connections" in msg and receiver.messages == []
    closed = DestinationConfig(name="ris", type="hl7", host="127.0.0.1", port=free_port())
    ok, msg = check(closed, calling_ae="SPINEMED", timeout_s=5)
    assert not ok and "ConnectionRefusedError" in msg
