"""Receive slots (dicom_node.ingest.slots): an instance acknowledged after one flush, the slot becoming its spool
file, and every state a crash can leave recovered.  Real files on the test's file system; the crash is a
real process exit between the acknowledgement and the settling."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import dicom_node.ingest.slots as slots_module
from dicom_node.errors import SpoolError
from dicom_node.ingest.slots import CAPACITY, SLOT_BYTES, SlotSink, read_trailer, trailer
from dicom_node.ingest.spool import Spool, SpoolFile, Stored, study_key

STUDY = "1.2.826.0.1.3680043.8.498.1"


def _payload(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


def _receive(spool: Spool, data: bytes, chunk: int = 64 * 1024) -> SlotSink | SpoolFile:
    sink = spool.begin()
    for at in range(0, len(data), chunk):
        sink.write(memoryview(data)[at : at + chunk])
    return sink


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", slots=4)
    s.start()
    yield s
    s.close()


def _slots_dir(spool_root: Path) -> Path:
    return spool_root / ".slots" / socket.gethostname()


def _slot_names(spool: Spool) -> list[str]:
    return sorted(p.name for p in _slots_dir(spool.root).iterdir())


def test_instance_in_a_slot_becomes_its_spool_file_without_a_copy(spool: Spool) -> None:
    data = _payload(300_000)
    sink = _receive(spool, data)
    assert isinstance(sink, SlotSink)
    assert sink.slot is not None
    inode = os.fstat(sink.slot.fd).st_ino
    seen: list[tuple[Stored, bool]] = []
    target = spool.path_for(STUDY, "1.2.3.4")
    stored = spool.commit(sink, STUDY, "1.2.3.4", lambda s: seen.append((s, s.path.exists())))
    assert stored == Stored(target, True, len(data))
    assert spool.flush(10)
    assert seen == [(stored, True)], "handed on once, when its spool file is in place"
    assert target.read_bytes() == data
    assert target.stat().st_ino == inode, "the slot itself became the spool file"
    assert target.parent.name == study_key(STUDY)
    assert spool.pool is not None and spool.pool.stats.settled == 1
    deadline = time.monotonic() + 10
    while spool.pool.ready < 4:  # written again once the node is idle
        assert time.monotonic() < deadline, "the used slot is replaced"
        time.sleep(0.05)
    assert len(_slot_names(spool)) == 4 and all(n.startswith("slot-") for n in _slot_names(spool))


def test_a_slot_reads_back_with_pydicom_up_to_what_arrived(spool: Spool) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    data = Path(str(get_testdata_file("MR_small_bigendian.dcm"))).read_bytes()
    sink = _receive(spool, data[:-5000])
    assert isinstance(sink, SlotSink)
    with sink.open() as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        fp.seek(0)
        assert fp.read() == data[:-5000], "what arrived, and nothing beyond (the slot's zeros are not data)"
    assert ds.Modality == "MR"
    sink.discard()


def test_instance_larger_than_a_slot_spills_into_its_own_file(spool: Spool) -> None:
    data = _payload(CAPACITY + 200_000)
    sink = _receive(spool, data, chunk=100_000)
    assert isinstance(sink, SlotSink) and sink.spilled is not None
    with sink.open() as fp:
        assert fp.read(1000) == data[:1000]
    stored = spool.commit(sink, STUDY, "1.2.3.5")
    assert stored.fresh and stored.path.read_bytes() == data
    assert spool.pool is not None and spool.pool.stats.spilled == 1 and spool.pool.ready == 4


def test_an_empty_pool_means_the_direct_path(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool", slots=2)
    s.start()
    try:
        sinks = [s.begin() for _ in range(3)]
        assert [type(x) for x in sinks] == [SlotSink, SlotSink, SpoolFile]
        for i, sink in enumerate(sinks):
            sink.write(_payload(1000, seed=i))
            s.commit(sink, STUDY, f"1.2.3.{i}")
        assert s.flush(10)
        assert [s.path_for(STUDY, f"1.2.3.{i}").read_bytes() for i in range(3)] == [
            _payload(1000, seed=i) for i in range(3)]
    finally:
        s.close()


def test_a_resend_keeps_the_first_copy_even_while_it_is_in_its_slot(spool: Spool) -> None:
    first, second = _payload(5000, seed=1), _payload(7000, seed=2)
    spool.commit(_receive(spool, first), STUDY, "1.2.3.6")
    resent = spool.commit(_receive(spool, second), STUDY, "1.2.3.6")  # before the first is settled
    assert (resent.fresh, resent.size) == (False, len(first))
    assert spool.flush(10)
    assert spool.path_for(STUDY, "1.2.3.6").read_bytes() == first
    again = spool.commit(_receive(spool, second), STUDY, "1.2.3.6")  # and after
    assert (again.fresh, again.size) == (False, len(first))


def test_concurrent_sends_of_one_instance_store_exactly_one_copy(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool", slots=8)
    s.start()
    results: list[Stored] = []
    lock = threading.Lock()

    def send(seed: int) -> None:
        stored = s.commit(_receive(s, _payload(20_000, seed)), STUDY, "1.2.3.7")
        with lock:
            results.append(stored)

    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.flush(10)
        assert sorted(r.fresh for r in results) == [False] * 5 + [True]
        kept = s.path_for(STUDY, "1.2.3.7").read_bytes()
        assert kept in [_payload(20_000, i) for i in range(6)]
    finally:
        s.close()


def test_a_failed_flush_refuses_the_instance_and_removes_its_slot(spool: Spool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    sink = _receive(spool, _payload(4000))
    assert isinstance(sink, SlotSink) and sink.slot is not None
    slot_path = sink.slot.path
    monkeypatch.setattr(slots_module, "fdatasync", eio)
    with pytest.raises(SpoolError, match="Input/output error"):
        spool.commit(sink, STUDY, "1.2.3.8")
    monkeypatch.undo()
    assert not slot_path.exists(), "a slot whose flush failed is never reused"
    assert not spool.path_for(STUDY, "1.2.3.8").exists()
    stored = spool.commit(_receive(spool, _payload(4000)), STUDY, "1.2.3.8")  # the sender retries
    assert stored.fresh


def test_one_process_at_a_time_holds_a_hosts_slots(spool: Spool, tmp_path: Path) -> None:
    second = Spool(spool.root, slots=4)
    with pytest.raises(SpoolError, match="in use by another process"):
        second.start()
    spool.close()
    assert second.start() == 0, "free once the first is closed"
    second.close()


# ------------------------------------------------------------------------------------------ crash recovery
_CRASH = """
import os, sys
import dicom_node.ingest.slots as slots
from dicom_node.ingest.spool import Spool
slots.BATCH_WINDOW_S = slots._PAUSE_S = 600  # settling waits for a batch that never fills
spool = Spool(sys.argv[1], slots=4)
spool.start()
for i in range(3):
    sink = spool.begin()
    sink.write(bytes((j * 7 + i) % 256 for j in range(int(sys.argv[2]))))
    spool.commit(sink, sys.argv[3], f"1.2.3.{i}")
os._exit(0)  # the process dies with three instances acknowledged and none settled
"""


def _crashed_spool(tmp_path: Path, size: int = 200_000) -> Path:
    root = tmp_path / "spool"
    subprocess.run([sys.executable, "-c", _CRASH, str(root), str(size), STUDY], check=True, timeout=120)
    return root


def _trailer_of(path: Path) -> tuple[int, str] | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_trailer(fd)
    finally:
        os.close(fd)


def _expected(i: int, size: int = 200_000) -> bytes:
    return bytes((j * 7 + i) % 256 for j in range(size))


def test_acknowledged_slots_a_crash_left_are_settled_at_the_next_start(tmp_path: Path) -> None:
    root = _crashed_spool(tmp_path)
    pending = [p for p in _slots_dir(root).iterdir() if _trailer_of(p) is not None]
    assert len(pending) == 3, "the crash came before settling"
    s = Spool(root, slots=4)
    assert s.start() == 3
    try:
        for i in range(3):
            assert s.path_for(STUDY, f"1.2.3.{i}").read_bytes() == _expected(i)
        assert s.pool is not None and s.pool.ready == 4
    finally:
        s.close()
    again = Spool(root, slots=4)
    assert again.start() == 0, "nothing left to settle"
    again.close()


@pytest.mark.parametrize("state", ["linked", "linked and truncated", "torn"])
def test_every_half_settled_state_is_finished(tmp_path: Path, state: str) -> None:
    root = _crashed_spool(tmp_path)
    found: dict[Path, tuple[int, int, str]] = {}
    for p in sorted(_slots_dir(root).iterdir()):
        fd = os.open(p, os.O_RDWR)
        trailer = read_trailer(fd)
        if trailer is None:
            os.close(fd)
        else:
            found[p] = (fd, *trailer)
    assert len(found) == 3
    victim = min(found)
    fd, length, target = found[victim]
    spool_file = root / target
    if state.startswith("linked"):  # step 1 done (and 2): the spool name exists
        spool_file.parent.mkdir(parents=True, exist_ok=True)
        os.link(victim, spool_file)
        if state == "linked and truncated":
            os.ftruncate(fd, length)
    else:  # the flush never completed: the trailer is there, but not all the data
        os.pwrite(fd, b"\xff" * 16, 1000)
    s = Spool(root, slots=4)
    recovered = s.start()
    try:
        assert recovered == 2, "the other two; a linked slot was already in the spool, a torn one never acknowledged"
        index = int(target.rsplit(".", 2)[-2])
        if state == "torn":
            assert not spool_file.exists(), "never acknowledged: nothing is made of it"
        else:
            assert spool_file.read_bytes() == _expected(index)
            assert spool_file.stat().st_nlink == 1, "the slot's own name is gone"
        assert s.pool is not None and s.pool.ready == 4
        assert all(p.name.startswith("slot-") for p in _slots_dir(root).iterdir())
        assert all(os.stat(p).st_size == SLOT_BYTES for p in _slots_dir(root).iterdir())
    finally:
        s.close()
        for fd, *_ in found.values():
            os.close(fd)


def test_a_trailer_naming_a_path_outside_the_spool_layout_is_never_followed(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool", slots=2)
    s.start()
    s.close()
    slot = sorted(_slots_dir(s.root).iterdir())[0]
    data = _payload(1000)
    fd = os.open(slot, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.pwrite(fd, trailer(len(data), zlib.crc32(data), "../../escaped.dcm"), CAPACITY)
        assert read_trailer(fd) is None
    finally:
        os.close(fd)
    again = Spool(s.root, slots=2)
    assert again.start() == 0
    again.close()
    assert not (tmp_path / "escaped.dcm").exists() and not (tmp_path.parent / "escaped.dcm").exists()


# ------------------------------------------------------------------------------------------ a host gone for good
_CRASH_DICOM = """
import io, os, sys
import numpy as np
import dicom_node.ingest.slots
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from dicom_node.ingest.spool import Spool
dicom_node.ingest.slots.BATCH_WINDOW_S = dicom_node.ingest.slots._PAUSE_S = 600
spool = Spool(sys.argv[1], slots=4)
spool.start()
for i in range(3):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, f"1.2.3.{i}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = sys.argv[2], "1.2.3.99", "MR"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.full((8, 8), i, np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    sink = spool.begin()
    sink.write(buf.getvalue())
    spool.commit(sink, sys.argv[2], f"1.2.3.{i}")
os._exit(0)
"""

_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


def test_recover_slots_settles_and_records_what_a_host_gone_for_good_left_in_a_shared_spool(tmp_path: Path) -> None:
    from dicom_node.jobs.sqlite import SQLiteJobStore

    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\nmin_free_disk_mb = 0\n')
    spool_root = data / "spool"
    subprocess.run([sys.executable, "-c", _CRASH_DICOM, str(spool_root), STUDY], check=True, timeout=120)
    # the receiver that crashed ran on host "ward-b", which never comes back
    slots = spool_root / ".slots"
    (slots / socket.gethostname()).rename(slots / "ward-b")
    (slots / f"{socket.gethostname()}.lock").rename(slots / "ward-b.lock")
    cli = [sys.executable, "-m", "dicom_node", "recover-slots", "--config", str(config)]

    unknown = subprocess.run([*cli, "ward-c"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 1 and "no receive slots of host 'ward-c'" in unknown.stderr
    assert "hosts with slots: ward-b" in unknown.stderr
    assert subprocess.run([*cli, "../etc"], capture_output=True, text=True, timeout=120).returncode == 2

    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(slots / "ward-b.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        busy = subprocess.run([*cli, "ward-b"], capture_output=True, text=True, timeout=120)
        assert busy.returncode == 1 and "in use by another process" in busy.stderr, "never while it runs"
    finally:
        holder.kill()
        holder.wait()
    assert len(list((slots / "ward-b").iterdir())) == 4, "nothing touched while the lock was held"

    done = subprocess.run([*cli, "ward-b", "--retire"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ward-b: 3 acknowledged instances settled from its receive slots, 3 recorded in the job store, " \
           "1 slots removed" in done.stdout
    assert not (slots / "ward-b").exists() and not (slots / "ward-b.lock").exists()
    store = SQLiteJobStore(data / "jobs.sqlite3")
    try:
        recs = sorted(store.instances(STUDY), key=lambda r: r.sop_instance_uid)
        assert [r.sop_instance_uid for r in recs] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
        assert all(Path(r.path).parent == spool_root / study_key(STUDY) for r in recs)
        assert store.by_study(STUDY).instance_count == 3
    finally:
        store.close()
    import pydicom

    for i, r in enumerate(recs):
        assert int(pydicom.dcmread(r.path).pixel_array[0, 0]) == i, "byte-exact from the slot"
