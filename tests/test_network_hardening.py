"""The network edge under hostile or broken peers (issue 14): a real ``spinemed-node serve`` on loopback with
``max_associations = 8`` and short timeouts, attacked over raw sockets while dcmtk ``echoscu`` (the
well-behaved peer) still has to get through.

Attackers connect from other loopback addresses (127.0.0.2 …: every 127/8 address reaches ``lo`` on
Linux) so the per-source caps can be told apart from the global one; the well-behaved peer is 127.0.0.1.

* idle connections (no A-ASSOCIATE-RQ) do not count against ``max_associations``; per source and in all
  they are capped, connections beyond are closed at once, the rest when the ARTIM timer expires;
* the ARTIM timer is a deadline from accept: an A-ASSOCIATE-RQ dripped a byte at a time is cut off;
  inside an association one PDU must arrive within ``network_timeout_s`` of its first byte;
* a command set is capped (64 KiB): a flood of command fragments without the last bit is aborted
  (A-ABORT, invalid PDU parameter value) and the node's memory does not grow; data set fragments go to
  disk, not memory;
* an A-ABORT before association is never answered; the address gate refuses at accept, before any read;
* an unknown DIMSE operation gets its response with 0x0211, a C-STORE whose SOP class is not its
  context's gets 0x0122, and the association carries on;
* the accept loop works with a listening descriptor above 1024 (selectors, not ``select()``).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NodeProcess, free_port, node_config_text, require_tool, start_node
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.config import load_config
from dicom_node.network.dimse import encode_command
from dicom_node.network.listener import ListenerSettings
from dicom_node.network.upper_layer import p_data_pdu
from dicom_node.node import ReceivingNode

ACSE_S = 2.0
NETWORK_S = 2.0
_HDR = struct.Struct(">BxI")
_US = struct.Struct("<H")
#: contexts of the raw associations: 1 CT, 3 MR, 5 Verification
_CONTEXTS = ((1, CTImageStorage), (3, MRImageStorage), (5, Verification))


# ---------------------------------------------------------------------------------------------- the node
@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[NodeProcess]:
    base = tmp_path_factory.mktemp("hardening")
    port = free_port()
    cfg = base / "node.toml"
    text = node_config_text(base / "data", demo_model_dir, port, [], quiet=280, extra="[http]\nenabled = false\n")
    limits = f"max_associations = 8\nacse_timeout_s = {ACSE_S}\nnetwork_timeout_s = {NETWORK_S}\n"
    cfg.write_text(text.replace("[node]\n", "[node]\n" + limits, 1))
    n = start_node(cfg, base / "data", port)
    try:
        yield n
    finally:
        n.stop()
    log = n.log.read_text()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _echoscu(port: int) -> subprocess.CompletedProcess[str]:
    exe = require_tool("echoscu")
    return subprocess.run([exe, "-aet", "ECHOSCU", "-aec", "SPINEMED", "-to", "5", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


# ---------------------------------------------------------------------------------------------- raw peers
def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _wait_closed(sock: socket.socket, limit: float) -> tuple[bytes, bool]:
    """Read until the node closes the connection or ``limit`` seconds pass: ``(bytes received, closed)``."""
    data = b""
    deadline = time.monotonic() + limit
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except OSError:  # reset: closed too
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _associate_rq(calling: str = "RAW") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID("1.2.840.10008.3.1.1.1")
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "SPINEMED"
    contexts = []
    for cid, abstract in _CONTEXTS:
        cx = build_context(abstract, [ExplicitVRLittleEndian])
        cx.context_id = cid
        contexts.append(cx)
    primitive.presentation_context_definition_list = contexts
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    primitive.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    pdu_type, length = _HDR.unpack(exactly(6))
    return pdu_type, exactly(length)


def _raw_association(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = _connect(port, source)
    sock.sendall(_associate_rq())
    pdu_type, _ = _read_pdu(sock)
    assert pdu_type == 0x02, "A-ASSOCIATE-AC"
    return sock


def _request(field: int, message_id: int, sop_class: str = "", sop_instance: str = "",
             dataset: bool = False) -> bytes:
    def uid(v: str) -> bytes:
        raw = v.encode()
        return raw + b"\x00" if len(raw) % 2 else raw

    elements: list[tuple[int, bytes]] = []
    if sop_class:
        elements.append((0x0002, uid(sop_class)))
    elements += [(0x0100, _US.pack(field)), (0x0110, _US.pack(message_id)),
                 (0x0800, _US.pack(0x0001 if dataset else 0x0101))]
    if sop_instance:
        elements.append((0x1000, uid(sop_instance)))
    return encode_command(elements)


def _response(sock: socket.socket) -> dict[int, bytes]:
    """The next DIMSE response's command set (one PDV, last fragment) as ``{element: value}``."""
    pdu_type, body = _read_pdu(sock)
    assert pdu_type == 0x04, f"P-DATA-TF expected, got PDU type 0x{pdu_type:02X}: {body!r}"
    assert body[5] == 0x03, "one command PDV, last fragment"
    data, at, out = body[6:], 0, {}
    while at < len(data):
        _, element, length = struct.unpack_from("<HHI", data, at)
        out[element] = data[at + 8 : at + 8 + length]
        at += 8 + length
    return out


def _status(rsp: dict[int, bytes]) -> tuple[int, int, int]:
    """``(command field, message id responded to, status)``."""
    return _US.unpack(rsp[0x0100])[0], _US.unpack(rsp[0x0120])[0], _US.unpack(rsp[0x0900])[0]


def _echo_ok(sock: socket.socket, message_id: int) -> None:
    sock.sendall(p_data_pdu(5, 0x03, _request(0x0030, message_id, Verification)))
    assert _status(_response(sock)) == (0x8030, message_id, 0x0000)


def _release(sock: socket.socket) -> None:
    sock.sendall(bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
    assert _read_pdu(sock)[0] == 0x06, "A-RELEASE-RP"
    sock.close()


# ---------------------------------------------------------------------------------------------- 1. idle connections
class _Watch:
    """Watches silent connections in a thread: when the node closed each (seconds from the start), and
    whether it sent anything first."""

    def __init__(self, socks: list[socket.socket], limit: float) -> None:
        import selectors

        self.t0 = time.monotonic()
        self.closed_at: list[float | None] = [None] * len(socks)
        self.answered: list[bytes] = [b""] * len(socks)
        self._sel = selectors.DefaultSelector()
        for i, s in enumerate(socks):
            s.setblocking(False)
            self._sel.register(s, selectors.EVENT_READ, i)
        self._limit = limit
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._sel.get_map() and time.monotonic() - self.t0 < self._limit:
            for key, _ in self._sel.select(0.05):
                i = key.data
                try:
                    chunk = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    self.answered[i] += chunk
                    continue
                self.closed_at[i] = time.monotonic() - self.t0
                self._sel.unregister(key.fileobj)
        self._sel.close()

    def join(self) -> None:
        self._thread.join(self._limit + 5)


def test_idle_connections_neither_lock_out_a_sender_nor_stay(node: NodeProcess) -> None:
    """20 silent connections from 20 addresses and 20 from one: echoscu still associates (max_associations
    counts associations, not connections); the one address keeps 16 (``max_pending_per_source``), the others
    are closed at once; every silent one is closed when its ARTIM timer expires, without an A-ABORT."""
    spread = [_connect(node.port, f"127.0.0.{2 + i}") for i in range(20)]
    crowd = [_connect(node.port, "127.0.0.30") for _ in range(20)]
    watch = _Watch(spread + crowd, ACSE_S + 3)
    try:
        res = _echoscu(node.port)
        assert res.returncode == 0, f"echoscu refused with 40 idle connections open: {res.stdout}{res.stderr}"
        watch.join()
        assert all(t is not None for t in watch.closed_at), f"idle connections open after acse_timeout_s + 3 s: " \
            f"{watch.closed_at}"
        assert watch.answered == [b""] * 40, "ARTIM expiry closes without an A-ABORT (PS3.8 AA-2)"
        times = [t or 0.0 for t in watch.closed_at]
        at_once = [t for t in times if t < ACSE_S / 2]
        assert len(at_once) == 4 and all(t >= ACSE_S / 2 for t in times[:20]), \
            f"only the 4 over max_pending_per_source are closed at once: {times}"
        print(f"\nidle: 40 connections, 36 held, 4 closed after <= {max(at_once):.2f} s, "
              f"the held ones after {min(t for t in times if t >= ACSE_S / 2):.2f}-{max(times):.2f} s "
              f"(acse_timeout_s = {ACSE_S}); echoscu status 0")
    finally:
        for s in spread + crowd:
            s.close()


def test_pending_connections_are_capped_in_all(node: NodeProcess) -> None:
    """4 addresses x 16 silent connections fill ``max_pending_connections`` (64): a 65th is closed at once;
    once their ARTIM timers expired a sender gets through again."""
    held = [_connect(node.port, f"127.0.1.{1 + i // 16}") for i in range(64)]
    time.sleep(0.3)  # all accepted and pending
    extra = _connect(node.port, "127.0.1.9")
    watch = _Watch([*held, extra], ACSE_S + 3)
    try:
        watch.join()
        times = [t if t is not None else float("inf") for t in watch.closed_at]
        assert times[64] < ACSE_S / 2, f"over max_pending_connections: closed at once ({times[64]:.2f} s)"
        assert all(ACSE_S / 2 < t < ACSE_S + 3 for t in times[:64]), times
        assert watch.answered == [b""] * 65
        print(f"\npending cap: 64 held (closed after {max(times[:64]):.2f} s), the 65th closed after "
              f"{times[64]:.2f} s")
        res = _echoscu(node.port)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        for s in [*held, extra]:
            s.close()


# ---------------------------------------------------------------------------------------------- 2. slowloris
def test_dripped_association_request_is_cut_off_at_the_artim_deadline(node: NodeProcess) -> None:
    rq = _associate_rq()
    sock = _connect(node.port, "127.0.2.1")
    t0 = time.monotonic()
    closed_after = None
    try:
        for k in range(len(rq)):  # one byte every 0.4 s: each wait is far below acse_timeout_s
            try:
                sock.sendall(rq[k : k + 1])
            except OSError:
                closed_after = time.monotonic() - t0
                break
            data, closed = _wait_closed(sock, 0.4)
            if closed:
                assert data == b"", "ARTIM expiry: closed without an A-ABORT"
                closed_after = time.monotonic() - t0
                break
            if time.monotonic() - t0 > ACSE_S + 3:
                break
    finally:
        sock.close()
    assert closed_after is not None, f"a dripped A-ASSOCIATE-RQ held the connection for {ACSE_S + 3} s"
    assert closed_after < ACSE_S + 3
    print(f"\nslowloris A-ASSOCIATE-RQ: closed after {closed_after:.2f} s (acse_timeout_s = {ACSE_S})")
    assert _echoscu(node.port).returncode == 0


def test_dripped_pdu_inside_an_association_is_aborted(node: NodeProcess) -> None:
    sock = _raw_association(node.port, "127.0.2.2")
    pdu = p_data_pdu(5, 0x03, _request(0x0030, 1, Verification))
    t0 = time.monotonic()
    answer, aborted_after = b"", None
    try:
        for k in range(len(pdu)):
            try:
                sock.sendall(pdu[k : k + 1])
            except OSError:
                aborted_after = time.monotonic() - t0
                break
            data, closed = _wait_closed(sock, 0.4)
            answer += data
            if closed:
                aborted_after = time.monotonic() - t0
                break
            if time.monotonic() - t0 > NETWORK_S + 3:
                break
    finally:
        sock.close()
    assert aborted_after is not None, f"a PDU dripped a byte at a time held the association {NETWORK_S + 3} s"
    assert answer[:1] == b"\x07", "A-ABORT"
    print(f"\nslowloris P-DATA: aborted after {aborted_after:.2f} s (network_timeout_s = {NETWORK_S})")


# ---------------------------------------------------------------------------------------------- 3. memory
def test_endless_command_set_is_aborted_and_memory_stays_flat(node: NodeProcess) -> None:
    rss0 = _rss_kb(node.proc.pid)
    sock = _raw_association(node.port, "127.0.3.1")
    fragment = b"\x00" * (1024 * 1024 - 12)
    pdu = p_data_pdu(1, 0x01, fragment)  # command, not the last fragment
    sent, peak = 0, rss0
    with contextlib.suppress(OSError):
        for k in range(300):  # 300 MiB of one command set
            sock.sendall(pdu)
            sent += len(pdu)
            if k % 10 == 0:
                peak = max(peak, _rss_kb(node.proc.pid))
    peak = max(peak, _rss_kb(node.proc.pid))
    answer, closed = _wait_closed(sock, NETWORK_S + 3)
    sock.close()
    print(f"\ncommand flood: {sent / 2**20:.0f} MiB accepted by TCP before the node cut it off, "
          f"RSS {rss0 / 1024:.0f} -> peak {peak / 1024:.0f} MiB, answer {answer[:10].hex()}")
    assert closed
    assert answer in (b"", bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06))), "A-ABORT, invalid PDU parameter value"
    assert peak - rss0 < 40 * 1024, "a command set is not accumulated without bound"
    assert sent < 64 * 2**20, "the node stopped reading long before 300 MiB"
    # the abort itself, when the peer stops after a little more than the cap
    sock = _raw_association(node.port, "127.0.3.1")
    sock.sendall(p_data_pdu(1, 0x01, b"\x00" * 40000) * 2)
    assert _wait_closed(sock, 5) == (bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06)), True)
    sock.close()
    assert _echoscu(node.port).returncode == 0


def test_huge_data_set_goes_to_disk_not_memory(node: NodeProcess) -> None:
    rss0 = _rss_kb(node.proc.pid)
    sock = _raw_association(node.port, "127.0.3.2")
    sock.sendall(p_data_pdu(1, 0x03, _request(0x0001, 7, CTImageStorage, "1.2.3.4.5", dataset=True)))
    # our maximum PDU is 1 MiB: fragments of a data set that never ends
    pdu = p_data_pdu(1, 0x00, b"\x00" * (1024 * 1024 - 12))
    peak = rss0
    for k in range(160):
        sock.sendall(pdu)
        if k % 20 == 0:
            peak = max(peak, _rss_kb(node.proc.pid))
    peak = max(peak, _rss_kb(node.proc.pid))
    sock.sendall(bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0)))  # A-ABORT from us: the partial instance is dropped
    assert _wait_closed(sock, 5) == (b"", True), "an A-ABORT is never answered"
    sock.close()
    print(f"\n160 MiB data set: RSS {rss0 / 1024:.0f} -> peak {peak / 1024:.0f} MiB")
    assert peak - rss0 < 40 * 1024, "data set fragments are written out, not held"


# ---------------------------------------------------------------------------------------------- 4. protocol
def test_abort_before_association_is_not_answered(node: NodeProcess) -> None:
    sock = _connect(node.port, "127.0.4.1")
    sock.sendall(bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
    assert _wait_closed(sock, ACSE_S + 3) == (b"", True), "A-ABORT answered (PS3.8: AA-2, close only)"
    sock.close()


def test_unknown_operation_and_wrong_sop_class_are_answered_and_the_association_continues(
        node: NodeProcess) -> None:
    sock = _raw_association(node.port, "127.0.4.2")
    try:
        # C-FIND-RQ with an identifier: not ours -> C-FIND-RSP 0x0211 after its data set
        sock.sendall(p_data_pdu(1, 0x03, _request(0x0020, 11, "1.2.840.10008.5.1.4.1.2.2.1", dataset=True)))
        sock.sendall(p_data_pdu(1, 0x02, b"\x08\x00\x52\x00\x06\x00STUDY "))
        statuses = [_status(_response(sock))]
        # N-GET-RQ without a data set, an operation no DIMSE table has (0x0ABC) -> their responses, 0x0211
        sock.sendall(p_data_pdu(5, 0x03, _request(0x0110, 12)))
        statuses.append(_status(_response(sock)))
        sock.sendall(p_data_pdu(5, 0x03, _request(0x0ABC, 13)))
        statuses.append(_status(_response(sock)))
        # C-STORE-RQ for MR on the CT context -> 0x0122 after its data set, nothing stored
        sock.sendall(p_data_pdu(1, 0x03, _request(0x0001, 14, MRImageStorage, "1.2.3.4.14", dataset=True)))
        sock.sendall(p_data_pdu(1, 0x02, b"\x08\x00\x16\x00\x00\x00"))
        statuses.append(_status(_response(sock)))
        # C-ECHO-RQ naming CT storage on the Verification context -> 0x0122
        sock.sendall(p_data_pdu(5, 0x03, _request(0x0030, 15, CTImageStorage)))
        statuses.append(_status(_response(sock)))
        print(f"\nstatuses: {[(hex(f), m, hex(s)) for f, m, s in statuses]}")
        assert statuses == [(0x8020, 11, 0x0211), (0x8110, 12, 0x0211), (0x8ABC, 13, 0x0211),
                            (0x8001, 14, 0x0122), (0x8030, 15, 0x0122)]
        _echo_ok(sock, 16)  # the association carried on
        _release(sock)
    finally:
        sock.close()


def test_address_gate_refuses_at_accept_before_any_read(tmp_path: Path) -> None:
    cfg = load_config(node={"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "node", "min_free_disk_mb": 0,
                            "acse_timeout_s": 5.0, "allowed_source_networks": ["127.0.0.1/32"]})
    n = ReceivingNode(cfg)
    n.receiver.start()
    try:
        assoc_threads = len([t for t in threading.enumerate() if t.name.startswith("dicom-assoc")])
        sock = _connect(n.receiver.port, "127.0.5.1")
        data, closed = _wait_closed(sock, 1.5)  # we send nothing at all
        sock.close()
        assert data == bytes((0x03, 0, 0, 0, 0, 4, 0, 0x01, 0x01, 0x01)), "A-ASSOCIATE-RJ, permanent, at once"
        assert closed
        assert len([t for t in threading.enumerate() if t.name.startswith("dicom-assoc")]) == assoc_threads
        assert n.receiver.gate.stats.snapshot() == {"source_address": 1}
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", n.receiver.port, ae_title="SPINEMED")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        n.receiver.stop()
        n.store.close()


def test_accept_loop_works_past_descriptor_1024(tmp_path: Path) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 2048")
    if soft != resource.RLIM_INFINITY and soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    filler = [socket.socketpair() for _ in range(520)]  # 1040 descriptors below the listener's
    cfg = load_config(node={"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "node", "min_free_disk_mb": 0,
                            "receive_slots": 0})
    n = ReceivingNode(cfg)
    try:
        n.receiver.start()
        listening = n.receiver.listener._sock
        assert listening is not None and listening.fileno() > 1024
        # echoscu: a process of its own (pynetdicom here would select() on a descriptor above 1024 too)
        res = _echoscu(n.receiver.port)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        n.receiver.stop()
        n.store.close()
        for a, b in filler:
            a.close()
            b.close()


def test_listener_settings_carry_the_pending_caps() -> None:
    """The defaults of the listener and of ``[node]`` agree (the receiver passes the configured values)."""
    cfg = load_config(node={"max_pending_connections": 10, "max_pending_per_source": 3})
    assert (cfg.node.max_pending_connections, cfg.node.max_pending_per_source) == (10, 3)
    defaults = load_config().node
    fields = ListenerSettings.__dataclass_fields__
    assert fields["max_pending"].default == defaults.max_pending_connections == 64
    assert fields["max_pending_per_source"].default == defaults.max_pending_per_source == 16


def _self_signed(d: Path) -> tuple[Path, Path]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = d / "server.pem", d / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_dripped_tls_handshake_is_cut_off_at_the_artim_deadline(tmp_path: Path) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    cfg = load_config(node={"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "node", "min_free_disk_mb": 0,
                            "acse_timeout_s": ACSE_S, "receive_slots": 0},
                      tls={"enabled": True, "cert_file": cert, "key_file": key})
    n = ReceivingNode(cfg)
    n.receiver.start()
    try:
        client = ssl.create_default_context()
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        sock = _connect(n.receiver.port, "127.0.6.1")
        t0 = time.monotonic()
        closed_after = None
        for k in range(len(hello)):  # a ClientHello, one byte every 0.4 s
            try:
                sock.sendall(hello[k : k + 1])
            except OSError:
                closed_after = time.monotonic() - t0
                break
            if _wait_closed(sock, 0.4)[1]:
                closed_after = time.monotonic() - t0
                break
            if time.monotonic() - t0 > ACSE_S + 3:
                break
        sock.close()
        assert closed_after is not None and closed_after < ACSE_S + 3, "a dripped TLS handshake held the connection"
        print(f"\nslowloris TLS handshake: closed after {closed_after:.2f} s (acse_timeout_s = {ACSE_S})")
        # ssl closes the socket itself when the handshake fails, just before the connection's thread frees its
        # slot: give that thread a moment
        deadline = time.monotonic() + 2
        while n.receiver.listener.counts() != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert n.receiver.listener.counts() == (0, 0)
    finally:
        n.receiver.stop()
        n.store.close()
