"""The listener's protocol layers: DIMSE and Part 10 encodings against pynetdicom/pydicom byte for byte,
negotiation and protocol errors on real loopback associations, and the indexer's crash recovery."""

from __future__ import annotations

import os
import socket
import struct
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.config import load_config
from dicom_node.devtools.phantoms import make_lumbar_mr
from dicom_node.errors import ProtocolError, StoreError
from dicom_node.ingest.indexer import reconcile
from dicom_node.ingest.spool import Spool, part10_header
from dicom_node.network.dimse import Command, decode_command, echo_response, store_response
from dicom_node.network.upper_layer import MAX_PDU_LENGTH, p_data_pdu
from dicom_node.node import ReceivingNode

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def _pynetdicom_pdus(message: C_STORE_RSP | C_ECHO_RSP, context_id: int, max_pdu: int) -> bytes:
    out = b""
    for primitive in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out += pdu.encode()
    return out


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000, 0xB000])
@pytest.mark.parametrize("max_pdu", [0, 16382, 40])
def test_store_response_is_pynetdicoms_byte_for_byte(status: int, max_pdu: int) -> None:
    request = Command(0x0001, 517, SOP_CLASS, "1.2.826.0.1.3680043.8.498.123", True)
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = request.message_id
    primitive.AffectedSOPClassUID = UID(request.sop_class_uid)
    primitive.AffectedSOPInstanceUID = UID(request.sop_instance_uid)
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    assert store_response(request, status, 7, max_pdu) == _pynetdicom_pdus(message, 7, max_pdu)


def test_echo_response_is_pynetdicoms_byte_for_byte() -> None:
    request = Command(0x0030, 3, "1.2.840.10008.1.1", "", False)
    primitive = C_ECHO()
    primitive.MessageIDBeingRespondedTo = 3
    primitive.AffectedSOPClassUID = UID("1.2.840.10008.1.1")
    primitive.Status = 0
    message = C_ECHO_RSP()
    message.primitive_to_message(primitive)
    assert echo_response(request, 0, 1, 16382) == _pynetdicom_pdus(message, 1, 16382)


def _store_rq(message_id: int, sop_class: str, sop_instance: str, originator: str = "") -> bytes:
    """A C-STORE-RQ command set as pynetdicom encodes it."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = UID(sop_class)
    primitive.AffectedSOPInstanceUID = UID(sop_instance)
    primitive.Priority = 2
    if originator:
        primitive.MoveOriginatorApplicationEntityTitle = originator
        primitive.MoveOriginatorMessageID = 9
    primitive.DataSet = BytesIO(b"")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    raw = encode(message.command_set, True, True)
    assert raw is not None
    return raw


@pytest.mark.parametrize("originator", ["", "MOVESCU"])
def test_store_request_command_decoded_as_pynetdicom_encodes_it(originator: str) -> None:
    raw = _store_rq(65535, SOP_CLASS, "1.2.3.4567", originator)
    assert decode_command(raw) == Command(0x0001, 65535, SOP_CLASS, "1.2.3.4567", True, originator)


@pytest.mark.parametrize(
    "raw", [b"", b"\x00\x00\x00\x01", b"\x00\x00\x00\x01\xff\xff\xff\xff", b"\x08\x00\x18\x00" * 3]
)
def test_malformed_command_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_command(raw)


@pytest.mark.parametrize("source_ae", ["", "CT1", "STORESCU"])
@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.50"])
def test_part10_header_is_pydicoms_byte_for_byte(source_ae: str, ts: str) -> None:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.45")
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = UID("2.25.1234")
    meta.ImplementationVersionName = "SPINEMED_NODE_1"
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    ours = part10_header(SOP_CLASS, "1.2.3.45", ts, "2.25.1234", "SPINEMED_NODE_1", source_ae)
    assert ours == b"\x00" * 128 + b"DICM" + buf.getvalue()


@pytest.mark.parametrize("bad", ["1.2.abc", "", "1." * 40])
def test_part10_header_rejects_invalid_uids(bad: str) -> None:
    with pytest.raises(ValueError, match="sop_instance_uid"):
        part10_header(SOP_CLASS, bad, ImplicitVRLittleEndian, "2.25.1", "X")


# ------------------------------------------------------------------------------------------ live listener
@pytest.fixture
def live(tmp_path: Path, request: pytest.FixtureRequest) -> ReceivingNode:
    """A listening node; ``indirect`` parametrisation sets its ``receive_slots`` (0: none)."""
    cfg = load_config(node={"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "node", "min_free_disk_mb": 0,
                            "max_associations": 2, "network_timeout_s": 1.0, "acse_timeout_s": 1.0,
                            "receive_slots": getattr(request, "param", 64)},
                      completeness={"quiet_seconds": 60})
    n = ReceivingNode(cfg)
    n.receiver.start()
    yield n
    n.receiver.stop()
    n.store.close()


def test_negotiation_roles_rejected_contexts_and_limits(live: ReceivingNode) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context("1.2.3.4.5.6.7", [ExplicitVRLittleEndian])  # not a storage class we know
    ae.add_requested_context(MRImageStorage, ["1.2.3.999"])  # a transfer syntax we do not accept
    ae.add_requested_context(Verification)
    role = build_role(CTImageStorage, scu_role=True, scp_role=False)
    assoc = ae.associate("127.0.0.1", live.receiver.port, ae_title="SPINEMED", ext_neg=[role])
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
    assert accepted == {CTImageStorage, Verification}
    assert rejected == {"1.2.3.4.5.6.7": 0x03, MRImageStorage: 0x04}  # abstract / transfer syntax not supported
    assert assoc.acceptor.maximum_length == MAX_PDU_LENGTH
    assert str(assoc.acceptor.implementation_class_uid).startswith("2.25.")
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert assoc.is_released


def test_max_associations_rejects_transient_local_limit(live: ReceivingNode) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    first = [ae.associate("127.0.0.1", live.receiver.port, ae_title="SPINEMED") for _ in range(2)]
    assert all(a.is_established for a in first)
    extra = ae.associate("127.0.0.1", live.receiver.port, ae_title="SPINEMED")
    assert extra.is_rejected
    rsp = extra.acceptor.primitive
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x02, 0x03, 0x02)
    for a in first:
        a.release()
    assert live.receiver.gate.stats.snapshot() == {"max_associations": 1}


def test_large_instance_in_many_pdus_is_stored_byte_exact(live: ReceivingNode, tmp_path: Path) -> None:
    """A 2.5 MiB CT slice crosses our 1 MiB maximum PDU: several P-DATA PDUs and fragments."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 1152
    ds.PixelData = np.arange(1152 * 1152, dtype=np.uint16).tobytes()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    src = tmp_path / "big.dcm"
    ds.save_as(src, enforce_file_format=True)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", live.receiver.port, ae_title="SPINEMED")
    assert assoc.send_c_store(src).Status == 0
    assoc.release()
    assert live.receiver.flush()
    (rec,) = live.store.instances(ds.StudyInstanceUID)
    stored = pydicom.dcmread(rec.path)
    assert stored.PixelData == ds.PixelData and stored.file_meta.SourceApplicationEntityTitle == "PYSCU"


def _raw_associate(port: int) -> socket.socket:
    """An association opened by hand with pynetdicom's PDU encoder, for sending bad PDUs after it."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID("1.2.840.10008.3.1.1.1")
    primitive.calling_ae_title = "RAW"
    primitive.called_ae_title = "SPINEMED"
    cx = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16382
    primitive.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(pdu.encode())
    head = sock.recv(6)
    assert head[0] == 0x02, "A-ASSOCIATE-AC"
    length = struct.unpack(">I", head[2:6])[0]
    while length:
        length -= len(sock.recv(length))
    return sock


def _expect_abort(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 10:
        chunk = sock.recv(10 - len(data))
        if not chunk:
            break
        data += chunk
    sock.close()
    return data


@pytest.mark.parametrize(
    ("pdu", "reason"),
    [
        (b"\x09\x00\x00\x00\x00\x00", 0x01),  # unknown PDU type
        (b"\x04\x00\xff\xff\xff\xff", 0x06),  # P-DATA longer than our maximum
        (b"\x04\x00\x00\x00\x00\x08\x00\x00\x00\x04\x05\x03\x00\x00", 0x06),  # PDV on context 5 (not accepted)
        (b"\x04\x00\x00\x00\x00\x08\x00\x00\x00\x04\x01\x00\x00\x00", 0x02),  # data set without a command
        (b"\x01\x00\x00\x00\x00\x00", 0x02),  # a second A-ASSOCIATE-RQ
    ],
)
def test_protocol_errors_are_aborted_and_the_listener_lives_on(live: ReceivingNode, pdu: bytes, reason: int) -> None:
    sock = _raw_associate(live.receiver.port)
    sock.sendall(pdu)
    assert _expect_abort(sock) == bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, reason))
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", live.receiver.port, ae_title="SPINEMED")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


def test_silent_peer_is_aborted_after_the_network_timeout(live: ReceivingNode) -> None:
    sock = _raw_associate(live.receiver.port)
    t0 = time.monotonic()
    assert _expect_abort(sock)[:1] == b"\x07"
    assert 0.8 < time.monotonic() - t0 < 5


@pytest.mark.parametrize("live", [64, 0], indirect=True, ids=["slots", "direct"])
def test_abort_in_the_middle_of_a_data_set_leaves_nothing(live: ReceivingNode) -> None:
    pool = live.receiver.spool.pool
    sock = _raw_associate(live.receiver.port)
    command = _store_rq(1, CTImageStorage, "1.2.3.4")
    sock.sendall(p_data_pdu(1, 0x03, command))
    fragment = b"\x08\x00\x16\x00UI\x1a\x001.2.840.10008.5.1.4.1.1.2\x00"
    sock.sendall(p_data_pdu(1, 0x00, fragment))
    incoming = str(live.config.spool_dir / ".incoming")

    def open_incoming() -> list[str]:  # our own descriptors on files in .incoming (named or O_TMPFILE)
        out = []
        for fd in Path("/proc/self/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(incoming):
                out.append(target)
        return out

    def writing() -> bool:
        return pool.writing > 0 if pool is not None else bool(open_incoming())

    deadline = time.monotonic() + 5
    while not writing():
        assert time.monotonic() < deadline, "the partial data set is being written"
        time.sleep(0.02)
    sock.sendall(bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0)))  # A-ABORT from the peer
    sock.close()
    deadline = time.monotonic() + 5
    while writing() or open_incoming() or list(Path(incoming).iterdir()):
        assert time.monotonic() < deadline, "partial file closed and removed, or its slot given back"
        time.sleep(0.05)
    assert live.receiver.flush()
    assert live.store.jobs() == []
    assert [p for p in live.config.spool_dir.iterdir() if not p.name.startswith(".")] == []
    if pool is not None:
        assert (pool.stats.received, pool.ready) == (0, 64), "the slot is ready for the next instance"


def test_reconcile_records_acknowledged_instances_a_crash_left_unrecorded(tmp_path: Path) -> None:
    study = make_lumbar_mr(tmp_path / "mr", slices=3, size=32)
    cfg = load_config(node={"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "node", "min_free_disk_mb": 0})
    n = ReceivingNode(cfg)
    spool = Spool(cfg.spool_dir)
    for path in study.paths:  # spooled and acknowledged, but the process died before the indexer ran
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        spool.write(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), path.read_bytes())
    assert n.store.jobs() == []
    assert reconcile(spool.root, n.store, n.receiver.audit) == len(study.paths)
    assert len(n.store.instances(study.study_instance_uid)) == len(study.paths)
    assert reconcile(spool.root, n.store, n.receiver.audit) == 0, "idempotent"
    n.receiver.audit.flush()
    lines = [ln for ln in Path(n.receiver.audit.path).read_text().splitlines() if '"recovered"' in ln]
    assert len(lines) == len(study.paths)
    n.store.close()


class _FlakyStore:
    """The real SQLite store, whose first ``failures`` batch writes fail (a locked or full database)."""

    def __init__(self, store: Any, failures: int) -> None:
        self._store = store
        self.failures = failures

    def record_instances(self, recs: Any, *, source: str = "dicom") -> list[bool]:
        if self.failures:
            self.failures -= 1
            raise StoreError("database is locked")
        return self._store.record_instances(recs, source=source)  # type: ignore[no-any-return]


def test_indexer_retries_a_failing_store_and_drops_nothing(tmp_path: Path) -> None:
    study = make_lumbar_mr(tmp_path / "mr", slices=4, size=32)
    cfg = load_config(node={"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "node", "min_free_disk_mb": 0},
                      completeness={"quiet_seconds": 60})
    n = ReceivingNode(cfg)
    flaky = _FlakyStore(n.store, failures=2)
    n.receiver.indexer.store = flaky  # type: ignore[assignment]
    n.receiver.start()
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", n.receiver.port, ae_title="SPINEMED")
        assert all(assoc.send_c_store(p).Status == 0 for p in study.paths)
        assoc.release()
        assert n.receiver.flush(timeout=20)
        assert flaky.failures == 0 and n.receiver.indexer.failures == 2
        assert len(n.store.instances(study.study_instance_uid)) == len(study.paths)
    finally:
        n.receiver.stop()
        n.store.close()
