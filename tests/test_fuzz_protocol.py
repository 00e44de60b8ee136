"""A protocol-level fuzzer against a real ``spinemed-node serve``: mutations of real association transcripts.

Two transcripts are recorded through a TCP proxy at the start — dcmtk ``storescu`` and pynetdicom sending
phantom instances (A-ASSOCIATE-RQ, C-STORE command and data set fragments, A-RELEASE-RQ) — and their
instances are acknowledged.  Then thousands of mutated copies are replayed, each on its own connection:
bit flips, interesting bytes, PDU and PDV length fields set to 0 / off by one / huge, PDU types changed,
PDUs dropped, duplicated, swapped or inserted, truncation, and the association request dripped in small
pieces.  Meanwhile a well-behaved sender stores fresh instances.  Afterwards:

* the node still runs, answers C-ECHO, and logged no internal error (every failure was a handled one);
* its memory stayed bounded;
* every instance of the well-behaved sender was acknowledged;
* every acknowledged instance — recorded before the fuzzing, or by the sender during it — is stored
  byte-identical to what was sent (a fuzzed duplicate never replaces it).

The run is bounded in cases and in time (``SPINEMED_FUZZ_CASES``, default 20000, about a minute; 150 s at most).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from conftest import node_config_text, require_tool, start_node, storescu
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.devtools.phantoms import make_lumbar_mr, make_spine_ct
from dicom_node.network.association import free_port

pytestmark = pytest.mark.slow

CASES = int(os.environ.get("SPINEMED_FUZZ_CASES", "20000"))
TIME_BUDGET_S = 150.0
_HDR = struct.Struct(">BxI")


# ---------------------------------------------------------------------------------------------- recording
class _Proxy:
    """A one-connection-at-a-time TCP proxy that records what the client sends."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.transcripts: list[bytes] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            sent = bytearray()

            def pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
                try:
                    while chunk := src.recv(65536):
                        if record is not None:
                            record += chunk
                        dst.sendall(chunk)
                except OSError:
                    pass
                finally:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)

            back = threading.Thread(target=pump, args=(upstream, client, None), daemon=True)
            back.start()
            pump(client, upstream, sent)
            back.join(10)
            client.close()
            upstream.close()
            self.transcripts.append(bytes(sent))

    def close(self) -> None:
        self.sock.close()


def _pdus(data: bytes) -> list[bytes]:
    out, at = [], 0
    while at + 6 <= len(data):
        _, length = _HDR.unpack_from(data, at)
        out.append(data[at : at + 6 + length])
        at += 6 + length
    assert at == len(data), "a recorded transcript is whole PDUs"
    return out


# ---------------------------------------------------------------------------------------------- mutations
def _pick(r: random.Random, pdus: list[bytes], min_len: int = 1) -> int | None:
    """A random PDU at least ``min_len`` long (None if there is none)."""
    candidates = [i for i, p in enumerate(pdus) if len(p) >= min_len]
    return r.choice(candidates) if candidates else None


def _flip_bits(r: random.Random, pdus: list[bytes]) -> list[bytes]:
    i = _pick(r, pdus)
    if i is None:
        return pdus
    b = bytearray(pdus[i])
    for _ in range(r.randint(1, 8)):
        pos = r.randrange(len(b))
        b[pos] ^= 1 << r.randrange(8)
    return [*pdus[:i], bytes(b), *pdus[i + 1 :]]


def _interesting_byte(r: random.Random, pdus: list[bytes]) -> list[bytes]:
    i = _pick(r, pdus)
    if i is None:
        return pdus
    b = bytearray(pdus[i])
    # the first 200 bytes hold the headers, the command set and the item lengths: aim there more often
    pos = r.randrange(min(len(b), 200)) if r.random() < 0.7 else r.randrange(len(b))
    b[pos] = r.choice((0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF))
    return [*pdus[:i], bytes(b), *pdus[i + 1 :]]


def _pdu_length(r: random.Random, pdus: list[bytes]) -> list[bytes]:
    i = _pick(r, pdus, 6)
    if i is None:
        return pdus
    b = bytearray(pdus[i])
    length = struct.unpack_from(">I", b, 2)[0]
    new = r.choice((0, 1, 4, length - 1, length + 1, length * 2, 0x7FFFFFFF, 0xFFFFFFFF, r.randrange(1 << 32)))
    struct.pack_into(">I", b, 2, max(0, min(new, 0xFFFFFFFF)))
    return [*pdus[:i], bytes(b), *pdus[i + 1 :]]


def _pdv_length(r: random.Random, pdus: list[bytes]) -> list[bytes]:
    data_pdus = [i for i, p in enumerate(pdus) if len(p) >= 12 and p[0] == 0x04]
    if not data_pdus:
        return _pdu_length(r, pdus)
    i = r.choice(data_pdus)
    b = bytearray(pdus[i])
    length = struct.unpack_from(">I", b, 6)[0]
    struct.pack_into(">I", b, 6, r.choice((0, 1, 2, length - 1, length + 1, 0xFFFFFFFF)) & 0xFFFFFFFF)
    return [*pdus[:i], bytes(b), *pdus[i + 1 :]]


def _pdu_type(r: random.Random, pdus: list[bytes]) -> list[bytes]:
    i = _pick(r, pdus)
    if i is None:
        return pdus
    b = bytearray(pdus[i])
    b[0] = r.choice((0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x55, 0xFF))
    return [*pdus[:i], bytes(b), *pdus[i + 1 :]]


def _control_header(r: random.Random, pdus: list[bytes]) -> list[bytes]:
    """The PDV message control header: command/data and last-fragment bits."""
    data_pdus = [i for i, p in enumerate(pdus) if len(p) >= 12 and p[0] == 0x04]
    if not data_pdus:
        return _flip_bits(r, pdus)
    i = r.choice(data_pdus)
    b = bytearray(pdus[i])
    b[11] = r.choice((0x00, 0x01, 0x02, 0x03, 0xFF))
    b[10] = r.choice((b[10], 0, 255, r.randrange(256)))  # presentation context id
    return [*pdus[:i], bytes(b), *pdus[i + 1 :]]


def _structure(r: random.Random, pdus: list[bytes]) -> list[bytes]:
    out = list(pdus) or [b""]
    op = r.randrange(4)
    i, j = r.randrange(len(out)), r.randrange(len(out))
    if op == 0:
        del out[i]
    elif op == 1:
        out.insert(i, out[j])
    elif op == 2:
        out[i], out[j] = out[j], out[i]
    else:
        body = r.randbytes(r.choice((0, 1, 4, 10, 100, 1000)))
        out.insert(i, _HDR.pack(r.randrange(256), len(body)) + body)
    return out


def _truncate(r: random.Random, pdus: list[bytes]) -> list[bytes]:
    whole = b"".join(pdus)
    return [whole[: r.randrange(len(whole))]] if whole else pdus


MUTATIONS: tuple[Callable[[random.Random, list[bytes]], list[bytes]], ...] = (
    _flip_bits, _interesting_byte, _pdu_length, _pdv_length, _pdu_type, _control_header, _structure, _truncate)


def _replay(port: int, pdus: list[bytes], r: random.Random) -> None:
    """Send one mutated transcript on a new connection, then half-close and drain what comes back."""
    data = b"".join(pdus)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if r.random() < 0.03:  # drip the association request in small pieces
                head, data = data[:300], data[300:]
                for k in range(0, len(head), 7):
                    s.sendall(head[k : k + 7])
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except OSError:
            pass  # the node closed or reset the connection: that is an answer too


# ---------------------------------------------------------------------------------------------- helpers
def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file as encoded, after its File Meta Information."""
    raw = path.read_bytes()
    meta_end = 132 + 12 + struct.unpack_from("<I", raw, 140)[0]
    return raw[meta_end:]


@dataclass
class _Sender:
    """A well-behaved pynetdicom SCU storing fresh copies of a phantom instance while the fuzzer runs."""

    port: int
    template: Path
    out: Path
    sent: dict[str, Path] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        ae = AE(ae_title="GOODSCU")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        k = 0
        while not self.stop.is_set() and k < 200:
            k += 1
            ds = pydicom.dcmread(self.template)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = self.out / f"good-{k}.dcm"
            ds.save_as(path, enforce_file_format=True)
            assoc = ae.associate("127.0.0.1", self.port, ae_title="SPINEMED")
            if not assoc.is_established:
                self.failures.append("association not established")
                continue
            status = assoc.send_c_store(path)
            code = int(status.Status) if status is not None and "Status" in status else None
            assoc.release()
            if code != 0:
                self.failures.append(f"C-STORE status {code}")
            else:
                self.sent[str(ds.SOPInstanceUID)] = path
            self.stop.wait(0.2)


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[tuple[object, Path]]:
    base = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    cfg = base / "node.toml"
    extra = "[http]\nenabled = false\n"
    text = node_config_text(base / "data", demo_model_dir, port, [], quiet=280, extra=extra)
    cfg.write_text(text.replace("[node]\n", "[node]\nmax_associations = 32\nnetwork_timeout_s = 5\n", 1))
    node = start_node(cfg, base / "data", port)
    try:
        yield node, base
    finally:
        node.stop()


def test_fuzzed_transcripts_never_crash_or_corrupt(fuzz_node: tuple[object, Path]) -> None:
    node, base = fuzz_node
    port = node.port  # type: ignore[attr-defined]
    proc: subprocess.Popen[bytes] = node.proc  # type: ignore[attr-defined]
    require_tool("storescu")
    mr = make_lumbar_mr(base / "mr", slices=3, size=64, seed=5)
    ct = make_spine_ct(base / "ct", slices=2, size=64, seed=6)

    # record: dcmtk storescu (MR) and pynetdicom (CT + C-ECHO), through the proxy
    proxy = _Proxy(port)
    try:
        res = storescu(proxy.port, list(mr.paths)[:2], extra=["-xs"])
        assert res.returncode == 0, res.stderr
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", proxy.port, ae_title="SPINEMED")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        for p in ct.paths:
            assert assoc.send_c_store(p).Status == 0
        assoc.release()
        deadline = time.monotonic() + 10
        while len(proxy.transcripts) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proxy.close()
    transcripts = [_pdus(t) for t in proxy.transcripts]
    assert len(transcripts) == 2 and all(len(t) >= 4 for t in transcripts)
    acknowledged: dict[str, Path] = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): Path(p)
                                     for p in [*list(mr.paths)[:2], *ct.paths]}

    time.sleep(1.0)
    rss_before = _rss_kb(proc.pid)
    sender = _Sender(port, Path(list(mr.paths)[2]), base)
    st = threading.Thread(target=sender.run, daemon=True)
    st.start()
    r = random.Random(20261203)
    started = time.monotonic()
    n = 0
    counts: dict[str, int] = {}
    try:
        while (n < CASES or len(sender.sent) < 5) and time.monotonic() - started < TIME_BUDGET_S:
            transcript = r.choice(transcripts)
            mutated = transcript
            for _ in range(r.choice((1, 1, 1, 2, 3))):
                m = r.choice(MUTATIONS)
                counts[m.__name__] = counts.get(m.__name__, 0) + 1
                mutated = m(r, mutated) or [b""]
            _replay(port, mutated, r)
            n += 1
            assert proc.poll() is None, f"the node exited after case {n}"
    finally:
        sender.stop.set()
        st.join(60)
    elapsed = time.monotonic() - started
    print(f"fuzz: {n} cases in {elapsed:.1f} s, mutations {counts}, good instances {len(sender.sent)}")
    assert n >= min(CASES, 1000), f"only {n} cases ran in {TIME_BUDGET_S} s"

    # the node lives and answers, logged no internal error, and its memory stayed bounded
    time.sleep(1.0)
    assert proc.poll() is None
    res = subprocess.run([require_tool("echoscu"), "-aec", "SPINEMED", "127.0.0.1", str(port)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    log_text = node.log.read_text()  # type: ignore[attr-defined]
    assert "internal error" not in log_text, [ln for ln in log_text.splitlines() if "internal error" in ln][:3]
    grown_mb = (_rss_kb(proc.pid) - rss_before) / 1024
    print(f"fuzz: receiver RSS {rss_before / 1024:.1f} MB before, grew {grown_mb:.1f} MB")
    assert grown_mb < 64, f"the receiver grew by {grown_mb:.0f} MB"

    # the well-behaved sender was served throughout, and every acknowledged instance is byte-identical
    assert sender.failures == [] and len(sender.sent) >= 5
    acknowledged.update(sender.sent)
    store = node.store()  # type: ignore[attr-defined]
    try:
        stored: dict[str, Path] = {}
        for uid in {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                    for p in acknowledged.values()}:
            stored.update({rec.sop_instance_uid: Path(rec.path) for rec in store.instances(uid)})
    finally:
        store.close()
    for sop, original in acknowledged.items():
        assert sop in stored, "an acknowledged instance is missing from the job store"
        assert _dataset_bytes(stored[sop]) == _dataset_bytes(original), "an acknowledged instance changed"
