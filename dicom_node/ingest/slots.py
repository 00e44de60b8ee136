"""Receive slots: an instance made durable with one data flush before its Success.

Making a new spool file durable costs the file system two metadata commits — the new inode with its
blocks, then its directory entry — each with a cache flush.  On a 512² CT slice that was most of the
time between the last fragment and the Success (``benchmarks/README.md``).  A *slot* is a file in
``<spool>/.slots/<host name>/`` whose blocks were written (with zeros) and synced ahead of time, while
the node was idle.  An instance is received into a slot; then a *trailer* at the end of the slot — its length,
checksum and spool path — is written, and one ``fdatasync`` makes both durable.  Overwriting blocks
that are already allocated and written needs no metadata commit, only the data and one cache flush.

The slot then *becomes* the spool file; no byte is copied.  A background thread *settles* acknowledged
slots in batches, one metadata commit for many instances:

1. link each slot to its spool path, fsync the directories;
2. truncate each to its instance's length (dropping the zeros and the trailer), fsync;
3. remove the slot's name from ``.slots/``; hand the instance on (to the indexer).

Every crash state is recoverable by :meth:`SlotPool.recover`, run before the listener starts: a slot
with a valid trailer and checksum was acknowledged and is settled again (steps 1-3 are idempotent);
a slot that also has a spool name (two links) is finished; any other slot was never acknowledged and
is ready for reuse.  Because a slot is truncated only after its spool name is durable, and loses its
own name only after the truncation is durable, an acknowledged instance always has either a valid
trailer or a finished spool file.

Instances larger than a slot move (*spill*) into a spool file of their own, and so does everything
while the pool is empty: both take the direct path of :class:`dicom_node.ingest.spool.Spool`.

Trailer format (little endian, the last 512 bytes of a slot)::

    b"SPMDSLT1", length u64, crc32 of the instance u32, spool path relative to the spool root
    (u16 length + ASCII), zero padding, crc32 of the trailer's first 508 bytes at 508
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicom_node.errors import SpoolError
from dicom_node.ingest.batching import BatchThread
from dicom_node.ingest.fileio import copy_range, fdatasync, fsync_dir, link, start_writeback
from dicom_node.log import get_logger

__all__ = ["Claims", "SlotPool", "SlotSink", "SlotStats", "SpilledFile"]

log = get_logger(__name__)

#: Size of one slot; an instance up to ``SLOT_BYTES - TRAILER`` fits.
SLOT_BYTES = 1 << 20
TRAILER = 512
CAPACITY = SLOT_BYTES - TRAILER
MAGIC = b"SPMDSLT1"
#: The only paths a trailer may name: ``<study key>/<SOP Instance UID>.dcm`` (:meth:`Spool.path_for`).
_TARGET = re.compile(r"^[0-9a-f]{24}/[0-9.]{1,64}\.dcm$")
#: A host name as a slot folder's name (never a path: no ``/``, no leading dot).
_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}$")
_HEAD = struct.Struct("<8sQI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
#: Start writing an instance's bytes back whenever this much has been written since the last start.
WRITEBACK_BYTES = 128 * 1024
#: How long settling waits for a batch to fill: each batch costs a few metadata commits whose cache
#: flushes queue with the listener's own, so fewer, larger batches keep the receive path fast.
BATCH_WINDOW_S = 0.1
_MAX_BATCH = 128
#: No instance acknowledged for this long ends the batch early.
_PAUSE_S = 0.02
#: Slots are written ahead only once the node has received nothing for this long (writing them competes
#: with receiving), unless fewer than ``_LOW_WATER`` are left.
IDLE_S = 0.25
_LOW_WATER = 8
_FILL_CHUNK = 8
_RETRY_S = (0.1, 0.5, 2.0, 5.0)


class SpilledFile(Protocol):
    """What the pool needs of a spool file (:class:`dicom_node.ingest.spool.SpoolFile`) to spill an instance into."""

    size: int

    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def fileno(self) -> int: ...
    def discard(self) -> None: ...
    def start_sync(self, pool: Executor) -> None: ...
    def open(self) -> io.BufferedReader: ...


@dataclass(eq=False)
class _Slot:
    path: Path
    fd: int


@dataclass(frozen=True, eq=False)
class _Acknowledged:
    slot: _Slot
    length: int
    target: Path
    on_stored: Callable[[], None]


@dataclass
class SlotStats:
    """Counters since start (exported as metrics)."""

    received: int = 0
    settled: int = 0
    spilled: int = 0
    recovered: int = 0
    written: int = 0
    failures: int = 0


class _Claim:
    """A spool path being made durable by one sender; a resend of it waits for the outcome."""

    __slots__ = ("done", "ok", "size")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.size = 0


class Claims:
    """Which spool paths are being written, so that the first copy of an instance is the one kept.

    An instance is a *resend* if its spool file exists or another copy of it is being made durable (in
    a slot, or directly).  A resend waits for that copy's outcome; if it failed, the resend becomes the
    first copy.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[Path, _Claim] = {}

    def claim(self, target: Path) -> _Claim | int:
        """Claim ``target`` for a new copy, or learn it is a resend: then the size of the first copy."""
        while True:
            with self._lock:
                claim = self._claims.get(target)
                if claim is None:
                    try:
                        return os.stat(target).st_size
                    except FileNotFoundError:
                        claim = self._claims[target] = _Claim()
                        return claim
            claim.done.wait()
            if claim.ok:
                return claim.size

    def settle(self, target: Path, claim: _Claim, ok: bool, size: int, in_spool: bool = True) -> None:
        """The outcome of a claimed copy.  A durable copy not yet at its spool path (``in_spool=False``:
        in a slot) keeps its claim until :meth:`release`."""
        claim.ok, claim.size = ok, size
        if not ok or in_spool:
            self.release(target)
        claim.done.set()

    def release(self, target: Path) -> None:
        with self._lock:
            self._claims.pop(target, None)


class SlotSink:
    """One instance being received into a slot; the interface of :class:`dicom_node.ingest.spool.SpoolFile`.

    An instance that outgrows the slot moves (*spills*) into a spool file of its own, and the slot goes
    back to the pool.
    """

    #: how many leading bytes :attr:`head` keeps (enough for the attributes before the pixel data)
    HEAD_BYTES = 64 * 1024

    def __init__(self, pool: SlotPool, slot: _Slot, spill_file: Callable[[], SpilledFile]) -> None:
        self.pool = pool
        self.slot: _Slot | None = slot
        self.size = 0
        self.crc = 0
        self.head = bytearray()
        self.spilled: SpilledFile | None = None
        self._spill_file = spill_file
        self._written_back = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``.

        Raises
        ------
        SpoolError
            The write failed (disk full, I/O error); the instance is discarded.
        """
        view = memoryview(data)
        if len(self.head) < self.HEAD_BYTES:
            self.head += view[: self.HEAD_BYTES - len(self.head)]
        if self.spilled is None and self.size + len(view) > CAPACITY:
            self._spill()
        if self.spilled is not None:
            self.spilled.write(view)
            self.size += len(view)
            return
        slot = self.slot
        if slot is None:
            raise SpoolError("slot already given back")
        try:
            while view:
                n = os.pwrite(slot.fd, view, self.size)
                self.crc = zlib.crc32(view[:n], self.crc)
                view = view[n:]
                self.size += n
            if self.size - self._written_back >= WRITEBACK_BYTES:
                start_writeback(slot.fd, self._written_back, self.size - self._written_back)
                self._written_back = self.size
        except OSError as exc:
            self.discard()
            raise SpoolError(f"cannot write instance to spool: {exc.strerror or exc}") from exc

    def _spill(self) -> None:
        """Move what arrived so far into a spool file of its own; the slot goes back to the pool."""
        slot = self.slot
        if slot is None:
            raise SpoolError("slot already given back")
        spilled = self._spill_file()
        try:
            copy_range(slot.fd, spilled.fileno(), 0, self.size)
            spilled.size = self.size
        except OSError as exc:
            spilled.discard()
            self.discard()
            raise SpoolError(f"cannot write instance to spool: {exc.strerror or exc}") from exc
        self.slot, self.spilled = None, spilled
        self.pool.give_back(slot, spilled=True)

    def start_sync(self, pool: Executor) -> None:
        """Nothing to start ahead for a slot: its one flush covers the trailer, written last."""
        if self.spilled is not None:
            self.spilled.start_sync(pool)

    def open(self) -> io.BufferedReader:
        """The instance's bytes, for reading its header with pydicom."""
        if self.spilled is not None:
            return self.spilled.open()
        if self.slot is None:
            raise SpoolError("slot already given back")
        return io.BufferedReader(_RangeReader(self.slot.fd, self.size, os.fspath(self.slot.path)))

    def discard(self) -> None:
        """Give the slot back without keeping the instance (idempotent; a no-op once acknowledged)."""
        if self.slot is not None:
            slot, self.slot = self.slot, None
            self.pool.give_back(slot)
        if self.spilled is not None:
            self.spilled.discard()


class _RangeReader(io.RawIOBase):
    """The first ``length`` bytes of ``fd``, read-only (``pread``: no shared file offset)."""

    def __init__(self, fd: int, length: int, name: str) -> None:
        self._fd, self._length, self._pos = fd, length, 0
        self.name = name  # pydicom names its FileDataset after it

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self._length - self._pos))
        data = os.pread(self._fd, n, self._pos) if n else b""
        memoryview(buffer)[: len(data)] = data
        self._pos += len(data)
        return len(data)


def trailer(length: int, crc: int, target: str) -> bytes:
    """The trailer of an acknowledged slot (see the module docstring).

    Raises
    ------
    ValueError
        ``target`` is not ASCII or too long for the trailer.
    """
    name = target.encode("ascii")
    head = _HEAD.pack(MAGIC, length, crc) + _U16.pack(len(name)) + name
    if len(head) > TRAILER - 4:
        raise ValueError(f"target: spool path too long for a slot trailer: {target!r}")
    head = head.ljust(TRAILER - 4, b"\x00")
    return head + _U32.pack(zlib.crc32(head))


def read_trailer(fd: int) -> tuple[int, str] | None:
    """``(length, target)`` of an acknowledged slot whose instance matches its checksum, else ``None``."""
    raw = os.pread(fd, TRAILER, CAPACITY)
    if len(raw) != TRAILER or raw[:8] != MAGIC or _U32.unpack_from(raw, TRAILER - 4)[0] != zlib.crc32(raw[:-4]):
        return None
    _, length, crc = _HEAD.unpack_from(raw)
    if length > CAPACITY:
        return None
    (n,) = _U16.unpack_from(raw, _HEAD.size)
    target = raw[_HEAD.size + 2 : _HEAD.size + 2 + n].decode("ascii", "replace")
    if not _TARGET.match(target):  # never a path outside the spool's layout, whatever the disk says
        return None
    return (length, target) if zlib.crc32(os.pread(fd, length, 0)) == crc else None


class SlotPool(BatchThread):
    """A host's receive slots, the thread that settles and writes them, and their recovery.

    The slots of one host live in ``directory/<host name>/``, held under an exclusive lock while the pool
    is open: receivers of several hosts may share a spool (``docs/scaling.md``), and each settles only its
    own slots after a crash.

    Parameters
    ----------
    directory
        Where the slots live: on the spool's file system (a slot becomes a spool file by a link).
    spool_root
        The spool; trailer paths are relative to it.
    slots
        How many slots to keep ready (each :data:`SLOT_BYTES` of disk).  A burst of more instances than
        this takes the direct path for the rest.
    claims
        The spool's claims on paths being written; a slot's is released once it is settled.
    spill_file
        Opens a file in the spool's ``.incoming/`` for an instance that outgrows its slot.
    free_bytes
        Free space on the spool's file system.
    keep_free_bytes
        The node's low-disk threshold (``node.min_free_disk_mb``): slots are written only while twice this
        much stays free, so that they never bring the node to refuse instances.

    host
        Whose slots: this host's (the default), or another's whose receiver is gone for good
        (:func:`dicom_node.ingest.receive.recover_host`).

    Raises
    ------
    ValueError
        ``slots`` below 1, or ``host`` not a host name.
    SpoolError
        (from :meth:`recover`) Another process holds this host's slots.
    """

    def __init__(self, directory: Path, spool_root: Path, slots: int, claims: Claims,
                 spill_file: Callable[[], SpilledFile], free_bytes: Callable[[], int], keep_free_bytes: int,
                 *, host: str | None = None) -> None:
        if slots < 1:
            raise ValueError(f"slots: must be at least 1, got {slots}")
        if host is not None and not _HOST.match(host):
            raise ValueError(f"host: not a host name: {host!r}")
        super().__init__("receive-slots")
        self.directory = directory / (host or socket.gethostname() or "localhost")
        self.spool_root = spool_root
        self.slots = slots
        self.claims = claims
        self.stats = SlotStats()
        self._spill_file = spill_file
        self._free_bytes = free_bytes
        self._keep_free = keep_free_bytes
        self._no_room_until = 0.0
        self._ready: list[_Slot] = []
        self._held = 0
        self._queue: list[_Acknowledged] = []
        self._last_received = 0.0
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ start, recovery, stop
    def _lock(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory.parent / f"{self.directory.name}.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise SpoolError(f"receive slots {self.directory} are in use by another process on this host "
                                 "(one receiver per data_dir and host)") from exc
            raise
        self._lock_fd = fd

    def recover(self) -> int:
        """Settle every acknowledged slot a crash left unsettled, and take the others as ready.

        Call before the listener starts.  Returns the number of instances put in the spool (the caller's
        reconcile then records them in the job store).

        Raises
        ------
        SpoolError
            Another process holds this host's slots.
        """
        if self._lock_fd is None:
            self._lock()
        recovered = 0
        acknowledged: list[_Acknowledged] = []
        for path in sorted(self.directory.iterdir()):
            if not path.name.startswith("slot-"):
                path.unlink()  # a slot whose writing a crash interrupted
                continue
            fd = os.open(path, os.O_RDWR)
            st = os.fstat(fd)
            found = read_trailer(fd) if st.st_size == SLOT_BYTES else None
            if st.st_nlink > 1 or (found is None and st.st_size != SLOT_BYTES):
                # settled (its spool name exists) but for removing this name; finish what step 2 may have left
                if found is not None:
                    os.ftruncate(fd, found[0])
                    os.fsync(fd)
                os.close(fd)
                path.unlink()
            elif found is not None:
                length, target = found
                acknowledged.append(_Acknowledged(_Slot(path, fd), length, self.spool_root / target, _no_one))
            else:
                self._ready.append(_Slot(path, fd))  # never acknowledged (or never used): ready again
        if acknowledged:
            self._settle(acknowledged)
            recovered = len(acknowledged)
            log.warning("instances acknowledged before a crash settled from their receive slots",
                        instances=recovered)
        fsync_dir(self.directory)
        self.stats.recovered += recovered
        return recovered

    def start(self) -> None:
        """Write slots until :attr:`slots` are ready (on the first start, a few seconds for thousands), then
        start the background thread."""
        while len(self._ready) < self.slots:
            if not self._write_slots(min(_FILL_CHUNK, self.slots - len(self._ready))):
                log.warning("disk space low: fewer receive slots than configured", ready=len(self._ready),
                            configured=self.slots)
                break
        self._start_thread()

    def close(self, timeout: float = 30.0) -> None:
        """Settle what is acknowledged (up to ``timeout``), stop, and close the ready slots (kept on disk)."""
        self._stop_thread(timeout)
        with self._cond:
            left = len(self._queue)
            ready, self._ready = self._ready, []
        if left:
            log.error("receive slots closed with instances not settled; settled at the next start", instances=left)
        for slot in ready:
            os.close(slot.fd)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def retire(self) -> int:
        """Remove this host's slots from disk, once :meth:`recover` has settled what they held and while the
        lock is still held; returns how many slots were removed.  For a host whose receiver is gone for good.

        Raises
        ------
        SpoolError
            :meth:`recover` has not run, or instances are still unsettled.
        """
        if self._lock_fd is None:
            raise SpoolError(f"receive slots {self.directory}: recover() them before retiring them")
        with self._cond:
            if self._queue:
                raise SpoolError(f"receive slots {self.directory}: {len(self._queue)} instances not settled")
            ready, self._ready = self._ready, []
        for slot in ready:
            os.close(slot.fd)
            slot.path.unlink(missing_ok=True)
        self.directory.rmdir()
        fsync_dir(self.directory.parent)
        (self.directory.parent / f"{self.directory.name}.lock").unlink()
        os.close(self._lock_fd)
        self._lock_fd = None
        return len(ready)

    def snapshot(self) -> tuple[int, int, int, int]:
        """``(ready, unsettled, received, spilled)`` at one instant, for the metrics."""
        with self._cond:
            return (len(self._ready), self._submitted - self._done, self.stats.received, self.stats.spilled)

    @property
    def ready(self) -> int:
        with self._cond:
            return len(self._ready)

    @property
    def writing(self) -> int:
        """Slots an instance is being received into right now."""
        with self._cond:
            return self._held

    # ------------------------------------------------------------------ the receive path
    def begin(self) -> SlotSink | None:
        """A sink in a ready slot, or ``None`` when none is ready (the caller writes a spool file directly)."""
        with self._cond:
            self._last_received = time.monotonic()
            if len(self._ready) <= _LOW_WATER:
                self._cond.notify_all()
            if not self._ready:
                return None
            slot = self._ready.pop()
            self._held += 1
        return SlotSink(self, slot, self._spill_file)

    def give_back(self, slot: _Slot, spilled: bool = False) -> None:
        """A sink no longer needs ``slot`` (its instance was refused, aborted, or spilled): ready again."""
        with self._cond:
            self._held -= 1
            self.stats.spilled += spilled
            self._ready.append(slot)

    def commit(self, sink: SlotSink, target: Path, on_durable: Callable[[], None],
               on_stored: Callable[[], None]) -> None:
        """Make ``sink``'s instance durable (Success may follow).  ``on_durable`` is called once it is, before
        the pool's thread can see it; ``on_stored`` from that thread once its spool file at ``target`` is
        settled and durable.

        Raises
        ------
        SpoolError
            The trailer could not be written or the slot flushed; the slot is removed.
        """
        slot = sink.slot
        if slot is None:
            raise SpoolError("slot already given back")
        try:
            os.pwrite(slot.fd, trailer(sink.size, sink.crc, target.relative_to(self.spool_root).as_posix()),
                      CAPACITY)
            fdatasync(slot.fd)
        except OSError as exc:
            # after a failed flush the page cache no longer says what is on disk: the slot is not reused.  Should
            # its trailer have reached the disk after all, the next start settles an instance its sender was
            # refused and sends again, recorded then as a resend.
            sink.slot = None
            with self._cond:
                self._held -= 1
                self.stats.failures += 1
            os.close(slot.fd)
            slot.path.unlink(missing_ok=True)
            log.error("receive slot flush failed; slot removed", detail=exc.strerror or str(exc))
            raise SpoolError(f"cannot flush instance to spool: {exc.strerror or exc}") from exc
        sink.slot = None
        on_durable()
        with self._cond:
            self._held -= 1
            self._queue.append(_Acknowledged(slot, sink.size, target, on_stored))
            self._submitted += 1
            self.stats.received += 1
            if len(self._queue) == 1 or len(self._queue) >= _MAX_BATCH:
                self._cond.notify_all()

    # ------------------------------------------------------------------ the background thread
    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    return
                fill = 0 if batch else min(_FILL_CHUNK, self._missing()) if self._should_fill() else 0
            if batch:
                try:
                    self._settle(batch)
                except OSError as exc:
                    failures += 1
                    with self._cond:
                        self.stats.failures += 1
                    delay = _RETRY_S[min(failures, len(_RETRY_S)) - 1]
                    log.error("cannot settle received instances into the spool; their slots keep them and "
                              "settling is retried", detail=exc.strerror or str(exc), queued=len(batch),
                              retry_in_s=delay)
                    with self._cond:
                        if self._stop and failures > len(_RETRY_S):
                            return  # settled by recover() at the next start
                        self._cond.wait(delay)
                    continue
                failures = 0
                with self._cond:
                    del self._queue[: len(batch)]
                    self._done += len(batch)
                    self.stats.settled += len(batch)
                    self._cond.notify_all()
            elif fill:
                try:
                    written = self._write_slots(fill)
                except OSError as exc:
                    written = 0
                    log.error("cannot write receive slots; instances take the direct path",
                              detail=exc.strerror or str(exc))
                if not written:  # no room (or an error): look again later
                    with self._cond:
                        self._no_room_until = time.monotonic() + _RETRY_S[-1]

    def _missing(self) -> int:
        return self.slots - len(self._ready) - self._held

    def _should_fill(self) -> bool:
        now = time.monotonic()
        idle = now - self._last_received >= IDLE_S
        return (self._missing() > 0 and (idle or len(self._ready) < _LOW_WATER) and not self._stop
                and now >= self._no_room_until)

    def _next_batch(self) -> list[_Acknowledged] | None:
        """Under the lock: the next batch to settle (waiting for it to fill), ``[]`` to write slots instead,
        ``None`` to stop."""
        while not self._queue:
            if self._stop:
                return None
            if self._should_fill():
                return []
            self._cond.wait(IDLE_S)
        # let the batch fill while instances keep arriving; settle at once when they stop (the end of a
        # study: its last instances are wanted soon) or someone is waiting in flush()
        deadline = time.monotonic() + BATCH_WINDOW_S
        while len(self._queue) < _MAX_BATCH and not self._stop and not self._flushers:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            queued = len(self._queue)
            self._cond.wait(min(left, _PAUSE_S))
            if len(self._queue) == queued:
                break
        return self._queue[:_MAX_BATCH]

    def _settle(self, batch: list[_Acknowledged]) -> None:
        """Steps 1-3 of the module docstring for ``batch``; idempotent, so a failed batch is simply retried."""
        directories: set[Path] = set()
        new_directory = False
        for ack in batch:  # 1. the spool name
            try:
                link(ack.slot.path, os.fspath(ack.target))
            except FileNotFoundError:  # the study's first instance: its directory does not exist yet
                os.makedirs(ack.target.parent, exist_ok=True)
                new_directory = True
                link(ack.slot.path, os.fspath(ack.target))
            except FileExistsError:
                if not os.path.samefile(ack.slot.path, ack.target):
                    log.warning("a spool file appeared where a received instance was going; the first copy is "
                                "kept", file=ack.target.name)
            directories.add(ack.target.parent)
        for directory in directories:
            fsync_dir(directory)
        if new_directory:
            fsync_dir(self.spool_root)
        for ack in batch:  # 2. the instance's own length
            os.ftruncate(ack.slot.fd, ack.length)
        for ack in batch:
            os.fsync(ack.slot.fd)
        for ack in batch:  # 3. the slot's name goes; the spool file stays
            ack.slot.path.unlink(missing_ok=True)
        for ack in batch:  # only once nothing can fail: a failed batch is retried whole
            os.close(ack.slot.fd)
        for ack in batch:
            self.claims.release(ack.target)
            try:
                ack.on_stored()
            except Exception:
                log.exception("handing a settled instance on failed")

    def _write_slots(self, n: int) -> int:
        """Write up to ``n`` new slots, as many as the disk has room for: every block written once and synced,
        so that receiving needs no allocation.  Returns how many."""
        n = min(n, max(0, (self._free_bytes() - 2 * self._keep_free) // SLOT_BYTES - 1))
        zeros = bytes(SLOT_BYTES)
        made: list[_Slot] = []
        try:
            for _ in range(n):
                part = self.directory / f"{uuid.uuid4().hex}.part"
                fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
                made.append(_Slot(part, fd))
                os.pwrite(fd, zeros, 0)
            for slot in made:
                os.fsync(slot.fd)
            for slot in made:
                final = self.directory / f"slot-{slot.path.stem}"
                os.rename(slot.path, final)
                slot.path = final
            fsync_dir(self.directory)
        except OSError:
            for slot in made:
                os.close(slot.fd)
                slot.path.unlink(missing_ok=True)
            raise
        with self._cond:
            self._ready[:0] = made  # behind the ones already ready, whose pages may still be cached
            self.stats.written += len(made)
        return len(made)


def _no_one() -> None:
    return None
