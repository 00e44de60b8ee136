"""The spool: received instances written durably, exactly as received, before they are acknowledged.

Layout: ``<spool>/<study key>/<SOP Instance UID>.dcm`` where the study key is a digest of the Study
Instance UID (no identifiers in directory names).  A file is written to ``<spool>/.incoming/``,
fsynced, renamed into place and the directory fsynced: a file in the spool is always complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

from dicom_node.errors import SpoolError

__all__ = ["Spool", "study_key"]

_UID = re.compile(r"^[0-9.]{1,64}$")


def study_key(study_uid: str) -> str:
    return hashlib.sha256(study_uid.encode()).hexdigest()[:24]


class Spool:
    """Durable, atomic storage of received instances."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        # anything left here is from a crash before the rename: never acknowledged, safe to drop
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)

    def path_for(self, study_uid: str, sop_instance_uid: str) -> Path:
        if not _UID.match(sop_instance_uid):
            raise SpoolError(f"sop_instance_uid: not a valid UID: {sop_instance_uid!r}")
        return self.root / study_key(study_uid) / f"{sop_instance_uid}.dcm"

    def write(self, study_uid: str, sop_instance_uid: str, data: bytes) -> Path:
        """Write ``data`` durably and return its final path.

        Raises
        ------
        SpoolError
            The bytes could not be written and synced (disk full, I/O error).
        """
        final = self.path_for(study_uid, sop_instance_uid)
        if final.exists():
            # a resend of an instance we hold: keep the first copy (the job store counts the resend as a
            # duplicate; replacing the bytes would change an instance already received and analysed)
            return final
        tmp = self.incoming / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            new_dir = not final.parent.exists()
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(tmp, final)  # never replaces: two concurrent sends of one instance keep the first
            except FileExistsError:
                tmp.unlink()
                return final
            tmp.unlink()
            _fsync_dir(final.parent)
            if new_dir:
                _fsync_dir(self.root)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SpoolError(f"cannot write instance to spool {self.root}: {exc.strerror or exc}") from exc
        return final

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
