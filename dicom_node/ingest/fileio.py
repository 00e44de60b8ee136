"""The few Linux file calls the spool and the receive slots make durable writes with."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["copy_range", "fdatasync", "fsync_dir", "link", "start_writeback"]


def _writeback_function() -> Callable[[int, int, int], None]:
    """Linux ``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)``: start writing a range back to disk
    without waiting — as PostgreSQL does with ``*_flush_after`` — so that the flush before Success finds
    most of an instance already on its way.  A no-op where the call does not exist."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, n: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, n: int) -> None:
        call(fd, offset, n, 2)  # SYNC_FILE_RANGE_WRITE; a failure here only loses the head start: the flush decides

    return start_writeback


start_writeback = _writeback_function()

#: ``fdatasync`` where the platform has it (it skips metadata not needed to read the data back)
fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Append ``length`` bytes of ``src`` from ``offset`` to ``dst``: in the kernel (``copy_file_range``)
    where the file system allows, else through a buffer.

    Raises
    ------
    OSError
        A read or write failed, or ``src`` ended early.
    """
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src, dst, length - done, offset + done)
            if n == 0:
                raise OSError(errno.EIO, "source ended before the range did")
            done += n
        return
    except OSError as exc:
        if done or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while done < length:
        chunk = os.pread(src, min(1 << 20, length - done), offset + done)
        if not chunk:
            raise OSError(errno.EIO, "source ended before the range did")
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]
        done += len(chunk)


_ANY_DIR_FD: int | None = None


def link(source: Path, target: str) -> None:
    """Hard-link ``source`` to ``target``; never replaces (FileExistsError), so two concurrent sends of one
    instance keep the first.  Passing a directory fd makes Python call ``linkat(..., AT_SYMLINK_FOLLOW)``,
    which links an ``O_TMPFILE`` inode by its ``/proc/self/fd`` path.  The source is made absolute, so which
    directory the fd names does not matter (one for the process); the target resolves as usual."""
    global _ANY_DIR_FD
    if _ANY_DIR_FD is None:
        _ANY_DIR_FD = os.open("/", os.O_RDONLY)
    os.link(os.path.abspath(source), target, src_dir_fd=_ANY_DIR_FD, follow_symlinks=True)
