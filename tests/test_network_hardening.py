"""The network edge against hostile and broken peers (issue 14), on a real ``spinemed-node serve``.

``max_associations = 8``, ``acse_timeout_s = 2``, ``max_pending_per_source = 8``.  Attackers connect from
other loopback addresses (127.0.0.2, 127.0.0.3) than the well-behaved peers (127.0.0.1: dcmtk ``echoscu``,
pynetdicom), as a scanner on another host would.  Each test prints what it measured (``-s`` shows it).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NodeProcess, free_port, node_config_text, require_tool, start_node
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.devtools.phantoms import make_lumbar_mr
from dicom_node.network.dimse import decode_command, encode_command
from dicom_node.network.upper_layer import p_data_pdu

pytestmark = pytest.mark.slow

ACSE_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("edge")
    data, port = tmp / "data", free_port()
    config = tmp / "node.toml"
    text = node_config_text(data, demo_model_dir, port, [], quiet=0.5, extra="[http]\nenabled = false\n")
    text = text.replace("min_free_disk_mb = 0\n", f"min_free_disk_mb = 0\nmax_associations = 8\nacse_timeout_s = "
                        f"{ACSE_TIMEOUT_S}\nnetwork_timeout_s = 5\nmax_pending_per_source = 8\n")
    config.write_text(text)
    n = start_node(config, data, port)
    yield n
    n.stop()


def _connect(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _closed(sock: socket.socket, wait: float = 0.0) -> bool:
    """Whether the node closed ``sock`` (a read returns end-of-file or a reset)."""
    sock.settimeout(wait if wait > 0 else 0.001)
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, BlockingIOError):
        return False


def _echoscu(port: int) -> tuple[int, float]:
    t0 = time.monotonic()
    res = subprocess.run([require_tool("echoscu"), "-aec", "SPINEMED", "-to", "10", "127.0.0.1", str(port)],
                         capture_output=True, text=True, timeout=30)
    return res.returncode, time.monotonic() - t0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _rq(contexts: list[str], calling: str = "RAWSCU") -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = "SPINEMED"
    items = []
    for i, uid in enumerate(contexts):
        ctx = build_context(uid, [ExplicitVRLittleEndian])
        ctx.context_id = 2 * i + 1
        items.append(ctx)
    prim.presentation_context_definition_list = items
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.826.0.1.3680043.9.1"
    prim.user_information = [ml, ic]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def _read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    pdu_type, length = struct.unpack(">BxI", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return pdu_type, body


def _associate_raw(port: int, contexts: list[str], source: str = "127.0.0.1") -> socket.socket:
    sock = _connect(port, source)
    sock.sendall(_rq(contexts))
    pdu_type, _ = _read_pdu(sock)
    assert pdu_type == 0x02, "A-ASSOCIATE-AC"
    return sock


def test_idle_connections_do_not_lock_a_modality_out(node: NodeProcess) -> None:
    idle = [_connect(node.port, "127.0.0.2") for _ in range(20)]
    time.sleep(0.3)
    open_now = sum(not _closed(s) for s in idle)
    code, took = _echoscu(node.port)
    t0 = time.monotonic()
    while any(not _closed(s) for s in idle) and time.monotonic() - t0 < ACSE_TIMEOUT_S + 3:
        time.sleep(0.1)
    gone_after = time.monotonic() - t0
    still = sum(not _closed(s) for s in idle)
    for s in idle:
        s.close()
    print(f"\n20 idle connections: {open_now} held (per-source cap 8), echoscu rc={code} in {took:.2f} s, "
          f"all closed {gone_after:.1f} s later (ARTIM {ACSE_TIMEOUT_S} s)")
    assert code == 0 and took < 5
    assert open_now == 8  # the per-source cap: the 12 others were closed at accept
    assert still == 0


def test_slowloris_request_is_cut_at_the_artim_deadline(node: NodeProcess) -> None:
    rq = _rq([MRImageStorage])
    drippers = [_connect(node.port, "127.0.0.3") for _ in range(6)]
    t0 = time.monotonic()
    sent = 0
    closed_at: dict[int, float] = {}
    while len(closed_at) < len(drippers) and time.monotonic() - t0 < ACSE_TIMEOUT_S + 5:
        for i, s in enumerate(drippers):
            if i in closed_at:
                continue
            try:
                s.send(rq[sent : sent + 1])
            except OSError:
                closed_at[i] = time.monotonic() - t0
                continue
            if _closed(s):
                closed_at[i] = time.monotonic() - t0
        sent += 1
        if sent == 2:
            code, took = _echoscu(node.port)
            assert code == 0 and took < 5, "a modality is served while the drippers hold their connections"
        time.sleep(0.3)
    for s in drippers:
        s.close()
    print(f"\n6 connections dripping one byte of an A-ASSOCIATE-RQ every 0.3 s: closed after "
          f"{sorted(round(v, 1) for v in closed_at.values())} s (ARTIM {ACSE_TIMEOUT_S} s)")
    assert len(closed_at) == len(drippers)
    assert max(closed_at.values()) < ACSE_TIMEOUT_S + 1.5


def test_endless_command_set_is_aborted_with_bounded_memory(node: NodeProcess) -> None:
    before = _rss_kb(node.proc.pid)
    sock = _associate_raw(node.port, [MRImageStorage])
    fragment = p_data_pdu(1, 0x01, b"\x00" * 16000)  # command fragment, never the last
    sent = 0
    try:
        while sent < 400 * 1024 * 1024:
            sock.sendall(fragment)
            sent += len(fragment)
    except OSError:
        pass
    try:
        pdu_type, body = _read_pdu(sock)
    except (ConnectionError, OSError):
        pdu_type, body = -1, b""
    sock.close()
    after = _rss_kb(node.proc.pid)
    print(f"\ncommand fragments without the last bit: {sent / 1e6:.1f} MB sent before the node cut the "
          f"association; A-ABORT {pdu_type == 0x07} reason {body[-1] if body else None}; RSS {before // 1024} -> "
          f"{after // 1024} MiB")
    assert sent < 8 * 1024 * 1024  # cut after 64 KiB (plus what the socket buffers held)
    assert pdu_type == 0x07 and body[-1] == 0x06  # A-ABORT, invalid PDU parameter value
    assert after - before < 32 * 1024
    assert _echoscu(node.port)[0] == 0


def test_a_abort_before_association_is_never_answered(node: NodeProcess) -> None:
    sock = _connect(node.port, "127.0.0.1")
    sock.sendall(bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
    sock.settimeout(5)
    got = sock.recv(100)
    sock.close()
    assert got == b""  # closed without a word: no A-ABORT in reply (PS3.8 AA-2)


def _command_response(sock: socket.socket) -> dict[str, int]:
    pdu_type, body = _read_pdu(sock)
    assert pdu_type == 0x04
    length, context_id, control = struct.unpack(">IBB", body[:6])
    assert control & 0x03 == 0x03
    cmd = decode_command(body[6 : 4 + length])
    # the status is not in Command: read it from the raw set
    raw = body[6 : 4 + length]
    at, status = 0, -1
    while at < len(raw):
        _group, element, n = struct.unpack_from("<HHI", raw, at)
        if element == 0x0900:
            status = struct.unpack_from("<H", raw, at + 8)[0]
        at += 8 + n
    return {"field": cmd.command_field, "status": status, "context": context_id}


def test_unknown_command_and_wrong_sop_class_get_their_status_and_the_association_goes_on(
    node: NodeProcess, tmp_path: Path
) -> None:
    sock = _associate_raw(node.port, [MRImageStorage, Verification])
    us = struct.Struct("<H")
    find = encode_command([(0x0002, MRImageStorage.encode() + b"\x00" * (len(MRImageStorage) % 2)),
                           (0x0100, us.pack(0x0020)), (0x0110, us.pack(7)), (0x0700, us.pack(0)),
                           (0x0800, us.pack(0x0101))])
    sock.sendall(p_data_pdu(1, 0x03, find))
    find_rsp = _command_response(sock)
    assert find_rsp == {"field": 0x8020, "status": 0x0211, "context": 1}
    # a C-STORE of a CT instance on the MR context: 0x0122 once its data set has arrived
    sop = generate_uid()
    uid = lambda v: v.encode() + b"\x00" * (len(v) % 2)  # noqa: E731
    store = encode_command([(0x0002, uid(CTImageStorage)), (0x0100, us.pack(0x0001)), (0x0110, us.pack(8)),
                            (0x0700, us.pack(0)), (0x0800, us.pack(0x0000)), (0x1000, uid(sop))])
    sock.sendall(p_data_pdu(1, 0x03, store))
    sock.sendall(p_data_pdu(1, 0x02, b"\x08\x00\x16\x00\x02\x00\x00\x00" * 8))
    store_rsp = _command_response(sock)
    assert store_rsp == {"field": 0x8001, "status": 0x0122, "context": 1}
    # still associated: a C-ECHO is answered, then a clean release
    echo = encode_command([(0x0002, uid(Verification)), (0x0100, us.pack(0x0030)), (0x0110, us.pack(9)),
                           (0x0800, us.pack(0x0101))])
    sock.sendall(p_data_pdu(3, 0x03, echo))
    assert _command_response(sock) == {"field": 0x8030, "status": 0x0000, "context": 3}
    sock.sendall(bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
    assert _read_pdu(sock)[0] == 0x06
    sock.close()
    print(f"\nC-FIND-RQ -> 0x{find_rsp['status']:04X}; C-STORE (CT on an MR context) -> 0x{store_rsp['status']:04X}; "
          "C-ECHO -> 0x0000; released")
    # and a normal store on a fresh association still works
    study = make_lumbar_mr(tmp_path / "mr", slices=2, size=32, seed=71)
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SPINEMED")
    assert assoc.is_established
    import pydicom

    statuses = [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in study.paths]
    assoc.release()
    assert set(statuses) == {0}
