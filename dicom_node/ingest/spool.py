"""The spool: received instances written durably, exactly as received, before they are acknowledged.

Layout: ``<spool>/<study key>/<SOP Instance UID>.dcm`` where the study key is a digest of the Study
Instance UID (no identifiers in directory names).  A file is written to ``<spool>/.incoming/`` (as an
unnamed ``O_TMPFILE`` inode where the file system supports it, else under a temporary name), fsynced,
linked into place and the directory fsynced: a file in the spool is always complete.

A temporary name says which host and process wrote it (``<host>-<pid>-<random>.part``): receivers on
several hosts may share one spool (``docs/scaling.md``), so a starting receiver removes only the leftovers
of dead processes on its own host, never a file another receiver is still writing.

With receive slots on (the default, :mod:`dicom_node.ingest.slots`), an instance is received into a file
written ahead of time, made durable with one data flush, and *settled* at its spool path by the
pool's thread moments later; :meth:`Spool.commit` says when it is there.  Instances larger than a slot,
and those that arrive while no slot is ready, take the direct path above.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
import socket
import struct
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import SpoolError
from dicom_node.ingest.fileio import fsync_dir, link, start_writeback
from dicom_node.ingest.slots import Claims, SlotPool, SlotSink

__all__ = ["UID_PATTERN", "Incoming", "Spool", "SpoolFile", "Stored", "part10_header", "remove_dead_parts", "study_key"]

#: A DICOM UID as the node accepts it in a spool path or a request (digits and dots, at most 64)
UID_PATTERN = re.compile(r"^[0-9.]{1,64}$")
_PART = re.compile(r"^(?P<host>.+)-(?P<pid>[0-9]+)-[0-9a-f]{32}\.part$")
#: a temporary file of an unknown layout (an older release) is removed once it is this old
LEGACY_PART_AGE_S = 24 * 3600.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_parts(directory: Path, host: str, now: float | None = None) -> int:
    """Remove the temporary files in ``directory`` that no live writer holds; returns how many.

    Such a file is from a crash before its link: never acknowledged, so safe to drop.  Files of other hosts
    are kept (their receivers may be writing them; each host cleans its own), as are those of live processes
    on this host; a name of no known layout is removed once older than :data:`LEGACY_PART_AGE_S`.
    """
    now = time.time() if now is None else now
    removed = 0
    for leftover in directory.iterdir():
        m = _PART.match(leftover.name)
        if m is not None:
            if m["host"] != host or _alive(int(m["pid"])):
                continue
        else:
            try:
                if now - leftover.stat().st_mtime < LEGACY_PART_AGE_S:
                    continue
            except FileNotFoundError:
                continue
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed


_SHORT = struct.Struct("<HH2sH")
_LONG = struct.Struct("<HH2sxxI")


def _meta_element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return _LONG.pack(0x0002, element, vr, len(value)) + value
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, implementation_uid: str,
                  implementation_version: str, source_ae: str = "") -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1) for an instance stored as received.

    Encoded directly (Explicit VR Little Endian, a handful of elements) because it is written once per
    received instance; the tests check it byte for byte against pydicom's ``write_file_meta_info``.

    Raises
    ------
    ValueError
        A UID that is not a valid UID, or an AE title that is not 1-16 ASCII characters.
    """
    uids = (sop_class_uid, sop_instance_uid, transfer_syntax_uid, implementation_uid)
    for name, value in zip(("sop_class_uid", "sop_instance_uid", "transfer_syntax_uid", "implementation_uid"), uids,
                           strict=True):
        if not UID_PATTERN.match(value):
            raise ValueError(f"{name}: not a valid UID ({len(value)} characters; digits and dots only)")
    if source_ae and (len(source_ae) > 16 or not source_ae.isascii() or "\\" in source_ae):
        raise ValueError(f"source_ae: not a valid AE title: {source_ae!r}")
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01", b"\x00"),
        _meta_element(0x0002, b"UI", sop_class_uid.encode(), b"\x00"),
        _meta_element(0x0003, b"UI", sop_instance_uid.encode(), b"\x00"),
        _meta_element(0x0010, b"UI", transfer_syntax_uid.encode(), b"\x00"),
        _meta_element(0x0012, b"UI", implementation_uid.encode(), b"\x00"),
        _meta_element(0x0013, b"SH", implementation_version.encode("ascii"), b" "),
        _meta_element(0x0016, b"AE", source_ae.encode("ascii"), b" ") if source_ae else b"",
    ))
    return b"\x00" * 128 + b"DICM" + _SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<I", len(body)) + body


def study_key(study_uid: str) -> str:
    return hashlib.sha256(study_uid.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Stored:
    """Where an acknowledged instance is kept: ``fresh`` is ``False`` for a resend of one we hold (its
    first copy is kept, and ``size`` is that copy's)."""

    path: Path
    fresh: bool
    size: int


def _nothing(stored: Stored) -> None:
    return None


class Spool:
    """Durable, atomic storage of received instances.

    Parameters
    ----------
    root
        The spool directory.
    slots
        How many receive slots (:mod:`dicom_node.ingest.slots`, 1 MiB of disk each) to keep ready; 0 writes every
        instance straight to its spool file.
    keep_free_bytes
        The low-disk threshold; slots are written only while twice this much stays free.
    """

    def __init__(self, root: str | Path, slots: int = 0, keep_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.incoming = self.root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._host = (socket.gethostname() or "localhost").replace("/", "_")
        remove_dead_parts(self.incoming, self._host)
        self._anonymous = hasattr(os, "O_TMPFILE")
        self.claims = Claims()
        self.pool: SlotPool | None = None
        if slots > 0:
            self.pool = SlotPool(self.root / ".slots", self.root, slots, self.claims, self.begin_file, self.free_bytes,
                                 keep_free_bytes)

    def start(self) -> int:
        """Settle the slots of instances acknowledged before a crash, write the missing slots, start the
        pool's thread; returns how many instances a crash had left unsettled."""
        if self.pool is None:
            return 0
        recovered = self.pool.recover()
        self.pool.start()
        return recovered

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every instance acknowledged so far is at its spool path; ``False`` on timeout."""
        return self.pool is None or self.pool.flush(timeout)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def path_for(self, study_uid: str, sop_instance_uid: str) -> Path:
        if not UID_PATTERN.match(sop_instance_uid):
            raise SpoolError(f"sop_instance_uid: not a valid UID: {sop_instance_uid!r}")
        return self.root / study_key(study_uid) / f"{sop_instance_uid}.dcm"

    def begin(self) -> Incoming:
        """Start receiving one instance: in a receive slot if one is ready, else in ``.incoming/``.

        Raises
        ------
        SpoolError
            The file cannot be created.
        """
        if self.pool is not None:
            sink = self.pool.begin()
            if sink is not None:
                return sink
        return self.begin_file()

    def begin_file(self) -> SpoolFile:
        """A new file in ``.incoming/``, to be linked into place by :meth:`commit`.

        Raises
        ------
        SpoolError
            The file cannot be created.
        """
        if self._anonymous:
            try:  # an inode without a name: nothing to clean up after a crash, no directory entry to undo
                return SpoolFile(None, os.open(self.incoming, os.O_TMPFILE | os.O_WRONLY, 0o640))
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise SpoolError(f"cannot write instance to spool {self.root}: {exc.strerror or exc}") from exc
                self._anonymous = False  # this file system has no O_TMPFILE: named temporary files
        tmp = self.incoming / f"{self._host}-{os.getpid()}-{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            raise SpoolError(f"cannot write instance to spool {self.root}: {exc.strerror or exc}") from exc
        return SpoolFile(tmp, fd)

    def commit(self, incoming: Incoming, study_uid: str, sop_instance_uid: str,
               on_stored: Callable[[Stored], None] = _nothing) -> Stored:
        """Make ``incoming`` durable (Success may follow); ``on_stored`` is called once its spool file is
        in place and durable — before this returns, or from the slot pool's thread moments later.

        A resend of an instance we hold is not stored again: the first copy is kept (the job store counts
        the resend as a duplicate; replacing the bytes would change an instance already received and
        analysed) and ``incoming`` is discarded.

        Raises
        ------
        SpoolError
            The bytes could not be synced or linked (disk full, I/O error).
        """
        final = self.path_for(study_uid, sop_instance_uid)
        claim = self.claims.claim(final)
        if isinstance(claim, int):
            incoming.discard()
            stored = Stored(final, False, claim)
            on_stored(stored)
            return stored
        stored = Stored(final, True, incoming.size)
        try:
            if isinstance(incoming, SlotSink) and incoming.spilled is None:
                incoming.pool.commit(incoming, final,
                                     lambda: self.claims.settle(final, claim, True, stored.size, in_spool=False),
                                     lambda: on_stored(stored))
                return stored
            file = incoming.spilled if isinstance(incoming, SlotSink) else incoming
            assert isinstance(file, SpoolFile)
            fresh = self._commit_file(file, final)
        except BaseException:
            self.claims.settle(final, claim, False, 0)
            incoming.discard()
            raise
        self.claims.settle(final, claim, True, stored.size)
        if not fresh:  # placed there behind our back (not by a sender of ours): the file there is kept
            stored = Stored(final, False, os.stat(final).st_size)
        on_stored(stored)
        return stored

    def _commit_file(self, incoming: SpoolFile, final: Path) -> bool:
        try:
            incoming.sync()
            try:
                new_dir = self._place(incoming, final)
            except FileExistsError:
                incoming.discard()
                return False
            incoming.discard()
            fsync_dir(final.parent)
            if new_dir:
                fsync_dir(self.root)
        except OSError as exc:
            incoming.discard()
            raise SpoolError(f"cannot write instance to spool {self.root}: {exc.strerror or exc}") from exc
        return True

    def _place(self, incoming: SpoolFile, final: Path) -> bool:
        """Link ``incoming`` to ``final``: whether the study's directory had to be created (FileExistsError
        if ``final`` exists)."""
        target = os.fspath(final)
        try:
            link(incoming.path, target)
        except FileNotFoundError:  # the study's first instance: its directory does not exist yet
            os.makedirs(os.path.dirname(target), exist_ok=True)
            link(incoming.path, target)
            return True
        return False

    def write(self, study_uid: str, sop_instance_uid: str, data: bytes) -> Path:
        """Write ``data`` (a whole Part 10 file) durably to its spool file and return its final path.

        Raises
        ------
        SpoolError
            The bytes could not be written and synced (disk full, I/O error).
        """
        incoming = self.begin_file()
        incoming.write(data)
        return self.commit(incoming, study_uid, sop_instance_uid).path

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


class SpoolFile:
    """An instance being received into ``.incoming/``: written as it arrives, synced on commit."""

    #: how many leading bytes :attr:`head` keeps (enough for the attributes before the pixel data)
    HEAD_BYTES = 64 * 1024
    #: start writing back to disk whenever this much has been written since the last start
    WRITEBACK_BYTES = 128 * 1024

    def __init__(self, path: Path | None, fd: int) -> None:
        self._named = path
        self.size = 0
        #: the first :attr:`HEAD_BYTES` written, kept in memory for checking the header
        self.head = bytearray()
        self._written_back = 0
        self._fd: int | None = fd
        self._sync: Future[None] | None = None

    def start_sync(self, pool: Executor) -> None:
        """Start the fsync on ``pool`` now, so that it overlaps with other work on the instance (checking
        its header); :meth:`sync_and_close` then waits for it."""
        if self._fd is not None and self._sync is None:
            self._sync = pool.submit(os.fsync, self._fd)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``.

        Raises
        ------
        SpoolError
            The write failed (disk full, I/O error); the file is discarded.
        """
        if self._fd is None:
            raise SpoolError(f"{self.path.name}: already closed")
        view = memoryview(data)
        if len(self.head) < self.HEAD_BYTES:
            self.head += view[: self.HEAD_BYTES - len(self.head)]
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.size += n
            if self.size - self._written_back >= self.WRITEBACK_BYTES:
                start_writeback(self._fd, self._written_back, self.size - self._written_back)
                self._written_back = self.size
        except OSError as exc:
            self.discard()
            raise SpoolError(f"cannot write instance to spool: {exc.strerror or exc}") from exc

    @property
    def path(self) -> Path:
        """A path that opens (and links) this file: its temporary name, or ``/proc/self/fd/N`` for an
        unnamed (``O_TMPFILE``) one while it is open."""
        if self._named is not None:
            return self._named
        return Path(f"/proc/self/fd/{self._fd}")

    def fileno(self) -> int:
        if self._fd is None:
            raise OSError(f"{self.path}: already closed")
        return self._fd

    def open(self) -> io.BufferedReader:
        """The bytes written so far, for reading the header with pydicom."""
        return open(self.path, "rb")

    def sync(self) -> None:
        """Wait for the fsync started by :meth:`start_sync`, or fsync now (raises :class:`OSError`)."""
        if self._fd is None:
            raise OSError(f"{self.path}: already closed")
        if self._sync is not None:
            self._sync.result()  # re-raises the fsync's OSError
        else:
            os.fsync(self._fd)

    def discard(self) -> None:
        """Close and delete the partial file (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if self._sync is not None:
                wait([self._sync])  # never close the descriptor under a running fsync; its outcome no longer matters
            os.close(fd)
        if self._named is not None:
            self._named.unlink(missing_ok=True)


#: An instance being received: into a receive slot, or into a file of its own.
Incoming = SlotSink | SpoolFile
