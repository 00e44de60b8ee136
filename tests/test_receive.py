"""The listener, over real associations on loopback: dcmtk storescu/echoscu and pynetdicom SCUs."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, require_tool, storescu, wait_port
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from dicom_node.config import load_config
from dicom_node.devtools.phantoms import make_lumbar_mr
from dicom_node.jobs.model import JobState
from dicom_node.node import ReceivingNode


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ReceivingNode]:
    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp_path / "data", "min_free_disk_mb": 0},
        completeness={"quiet_seconds": 0.5, "force_seconds": 60, "check_interval_s": 0.2},
    )
    n = ReceivingNode(cfg)
    n.start()
    yield n
    n.stop()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta group, as it travels on the wire."""
    ds = pydicom.dcmread(path)
    raw = path.read_bytes()
    return raw[128 + 4 + 12 + ds.file_meta.FileMetaInformationGroupLength :]


def test_storescu_study_is_spooled_as_received(node: ReceivingNode, tmp_path: Path) -> None:
    study = make_lumbar_mr(tmp_path / "mr", slices=5, size=64)
    res = storescu(node.receiver.port, list(study.paths))
    assert res.returncode == 0, res.stderr
    assert node.receiver.flush(), "acknowledged instances recorded"
    records = node.store.instances(study.study_instance_uid)
    assert len(records) == len(study.paths)
    for src in study.paths:
        sop = pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID
        rec = next(r for r in records if r.sop_instance_uid == sop)
        assert _dataset_bytes(Path(rec.path)) == _dataset_bytes(src), "stored exactly as received"
        assert pydicom.dcmread(rec.path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    job = node.store.by_study(study.study_instance_uid)
    assert job.instance_count == len(study.paths)
    node.monitor.check(now=job.last_received_at + 10)  # type: ignore[operator]
    assert node.store.by_study(study.study_instance_uid).state is JobState.COMPLETE


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "MR_small_implicit.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "SC_rgb_jpeg_gdcm.dcm",
        "JPGExtended.dcm",
        "image_dfl.dcm",
    ],
)
def test_compressed_and_odd_encodings_stored_as_received(node: ReceivingNode, name: str) -> None:
    src = Path(get_testdata_file(name))  # type: ignore[arg-type]
    ts = pydicom.dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID
    ae = AE(ae_title="PYSCU")
    ds = pydicom.dcmread(src)
    ae.add_requested_context(ds.SOPClassUID, [ts])
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title="SPINEMED")
    assert assoc.is_established
    status = assoc.send_c_store(src)  # sent from the file: the encoded bytes as they are
    assoc.release()
    assert status.Status == 0x0000
    assert node.receiver.flush(), "acknowledged instances recorded"
    rec = next(
        r for r in node.store.instances(ds.StudyInstanceUID) if r.sop_instance_uid == ds.SOPInstanceUID
    )
    assert rec.transfer_syntax_uid == ts
    if ts.is_deflated:  # pynetdicom re-deflates when it sends: compare the inflated content
        assert pydicom.dcmread(rec.path) == pydicom.dcmread(src)
    else:
        assert _dataset_bytes(Path(rec.path)) == _dataset_bytes(src)


def test_instance_without_study_uid_refused(node: ReceivingNode) -> None:
    # pydicom's JPEG-LS near-lossless test file has no Study Instance UID: it cannot join a study
    src = Path(get_testdata_file("JPEGLSNearLossless_16.dcm"))  # type: ignore[arg-type]
    ds = pydicom.dcmread(src)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title="SPINEMED")
    status = assoc.send_c_store(src)
    assoc.release()
    assert status.Status == 0xC000
    assert node.store.jobs() == []


def test_echo_with_dcmtk(node: ReceivingNode) -> None:
    exe = require_tool("echoscu")
    res = subprocess.run(
        [exe, "-aec", "SPINEMED", "127.0.0.1", str(node.receiver.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr


def test_many_concurrent_associations(node: ReceivingNode, tmp_path: Path) -> None:
    study = make_lumbar_mr(tmp_path / "mr", slices=8, size=64)
    datasets = [pydicom.dcmread(p) for p in study.paths]
    errors: list[str] = []

    def send(k: int) -> None:
        try:
            _send(k)
        except Exception as exc:
            errors.append(f"{k}: {exc!r}")

    def _send(k: int) -> None:
        ae = AE(ae_title=f"SCU{k}")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title="SPINEMED")
        if not assoc.is_established:
            errors.append(f"{k}: not established")
            return
        for ds in datasets:
            copy = pydicom.Dataset(ds)
            copy.file_meta = ds.file_meta
            copy.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), str(k)])
            st = assoc.send_c_store(copy)
            if st.Status != 0:
                errors.append(f"{k}: 0x{st.Status:04X}")
        assoc.release()

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert node.receiver.flush(), "acknowledged instances recorded"
    assert len(node.store.instances(study.study_instance_uid)) == 8 * len(datasets)
    assert node.receiver.stats.stored == 8 * len(datasets)


def test_tcp_nodelay_on_both_ends(node: ReceivingNode, tmp_path: Path) -> None:
    from dicom_node.network.association import nodelay_handlers

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        "127.0.0.1", node.receiver.port, ae_title="SPINEMED", evt_handlers=nodelay_handlers()
    )
    assert assoc.is_established
    # the listener's side of this association, while it is open
    server = [s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in node.receiver.listener.active_sockets()]
    client = assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # type: ignore[union-attr]
    assoc.release()
    assert server == [1] and client == 1


def test_broken_data_refused_and_nothing_lost(node: ReceivingNode, tmp_path: Path) -> None:
    good = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    ds = pydicom.dcmread(good)
    # a Part 10 file whose dataset is corrupt after the SOP Instance UID: Patient's Name (0010,0010)
    # claims a length far past the end of the data
    raw = bytearray(good.read_bytes())
    tag = b"\x10\x00\x10\x00"
    at = raw.index(tag, 128 + 4 + 12 + ds.file_meta.FileMetaInformationGroupLength)
    vr_explicit = raw[at + 4 : at + 6] == b"PN"
    if vr_explicit:
        raw[at + 6 : at + 8] = b"\xf0\xff"
    else:
        raw[at + 4 : at + 8] = b"\xf0\xff\xff\x0f"
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(bytes(raw))
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title="SPINEMED")
    assert assoc.is_established
    first = assoc.send_c_store(good)
    assert first.Status == 0
    bad = assoc.send_c_store(broken)
    mismatch = pydicom.dcmread(good)
    ok_after = assoc.send_c_store(pydicom.dcmread(good))  # a resend of the good one: still fine
    assoc.release()
    assert bad is not None and bad.Status != 0 and (bad.Status >> 12) in (0xA, 0xC)
    assert ok_after.Status == 0
    assert node.receiver.flush(), "acknowledged instances recorded"
    recs = node.store.instances(mismatch.StudyInstanceUID)
    assert [r.sop_instance_uid for r in recs] == [mismatch.SOPInstanceUID]
    assert Path(recs[0].path).read_bytes()[128:132] == b"DICM"
    assert node.receiver.stats.refused == 1 and node.receiver.stats.duplicates == 1
    assert not list((node.config.spool_dir / ".incoming").iterdir()), "no partial file left behind"


def test_calling_ae_allow_list(tmp_path: Path) -> None:
    cfg = load_config(
        node={
            "port": 0,
            "host": "127.0.0.1",
            "data_dir": tmp_path,
            "min_free_disk_mb": 0,
            "allowed_calling_aes": ["PACS"],
        }
    )
    n = ReceivingNode(cfg)
    n.start()
    try:
        for calling, ok in (("PACS", True), ("INTRUDER", False)):
            ae = AE(ae_title=calling)
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", n.receiver.port, ae_title="SPINEMED")
            assert assoc.is_established is ok
            if ok:
                assoc.release()
            else:
                assert assoc.is_rejected
    finally:
        n.stop()


def test_low_disk_refuses_with_out_of_resources(tmp_path: Path) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp_path, "min_free_disk_mb": free_mb + 10}
    )
    n = ReceivingNode(cfg)
    n.start()
    try:
        res = storescu(n.receiver.port, [Path(get_testdata_file("CT_small.dcm"))])  # type: ignore[arg-type]
        assert res.returncode != 0, "storescu sees the refusal"
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", n.receiver.port, ae_title="SPINEMED")
        # below the threshold new associations are rejected (transient, "local limit exceeded"); instances on
        # associations opened before get 0xA700 (tests/test_ops_faults.py, on a real full tmpfs)
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        assert n.store.jobs() == []
    finally:
        n.stop()


def test_wrong_called_ae_rejected(node: ReceivingNode) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title="NOTUS")
    assert assoc.is_rejected


def test_our_scu_names_the_peers_rejection_and_a_closed_port(node: ReceivingNode) -> None:
    """Export and echo say why an association failed: the A-ASSOCIATE-RJ's reason, read from the PDU
    (pynetdicom may call a rejection followed at once by the peer's close 'aborted'), or no connection."""
    from dicom_node.config import DestinationConfig
    from dicom_node.delivery.cstore import echo

    wrong = DestinationConfig(name="pacs", type="dicom", ae_title="NOTUS", host="127.0.0.1", port=node.receiver.port)
    for _ in range(5):
        ok, why = echo(wrong, calling_ae="EXPORT", timeout_s=5)
        assert not ok
        assert why == ("association rejected by pacs (Rejected Permanent, source: Service User, "
                       "reason: Called AE title not recognised)")
    closed = DestinationConfig(name="pacs", type="dicom", ae_title="X", host="127.0.0.1", port=free_port())
    ok, why = echo(closed, calling_ae="EXPORT", timeout_s=2)
    assert (ok, why) == (False, "pacs unreachable (connection refused or not answered within 2 s)")


def test_port_zero_binds_free_port() -> None:
    assert free_port() > 0


def test_reactor_checkpoint_closes_pynetdicoms_pause_gap() -> None:
    """The interleavings of pynetdicom's reactor pause (see ReactorCheckpoint), step by step."""
    from dicom_node.network.association import ReactorCheckpoint

    class Assoc:
        _is_paused = False

    assoc = Assoc()
    cp = ReactorCheckpoint(assoc)
    # the gap: the reactor said "paused" and its wait() returned (still set); a sender now clears
    assoc._is_paused = True
    assert cp.wait() is True
    cp.clear()
    assert assoc._is_paused is False, "the sender must wait: the reactor is running, not in wait()"
    # the reactor's next turn blocks in wait() and only then counts as paused
    returned = threading.Event()

    def reactor_turn() -> None:
        assoc._is_paused = True
        cp.wait()
        returned.set()

    t = threading.Thread(target=reactor_turn, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not (assoc._is_paused and cp._waiting) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert assoc._is_paused and not returned.is_set()
    cp.clear()  # another clear while it waits leaves it paused
    assert assoc._is_paused is True
    cp.set()  # the sender got its response: the reactor runs again
    t.join(timeout=5)
    assert returned.is_set()


def test_many_exports_to_storescp_never_lose_a_response(tmp_path: Path) -> None:
    """100 four-object exports to dcmtk's storescp under CPU load (four busy processes: the race needs a
    crowded scheduler): every response reaches the sender.  Before ReactorCheckpoint pynetdicom's reactor
    took one for itself in about 1 of 20 exports under such load (15 of 300)."""
    from dicom_node.config import DestinationConfig
    from dicom_node.delivery.cstore import send_files

    exe = require_tool("storescp")
    port = free_port()
    out = tmp_path / "in"
    out.mkdir()
    scp = subprocess.Popen([exe, "--aetitle", "PACS", "--output-directory", str(out), "--accept-all",
                            "--unique-filenames", str(port)], env={**os.environ, "TCP_NODELAY": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    try:
        wait_port(port)
        study = make_lumbar_mr(tmp_path / "mr", slices=2, size=32)
        paths = list(study.paths)[:4]
        dest = DestinationConfig(name="pacs", type="dicom", ae_title="PACS", host="127.0.0.1", port=port)
        lost = []
        for i in range(100):
            results = send_files(dest, paths, calling_ae="NODE", timeout_s=5)
            lost += [(i, r.error) for r in results if not r.delivered]
        assert lost == []
    finally:
        for b in busy:
            b.kill()
        scp.terminate()
        scp.wait(timeout=10)
