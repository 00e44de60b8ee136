"""The spool's direct path without ``O_TMPFILE`` (NFS and other file systems without it): named temporary
files that say which host and process wrote them, and a start that removes only dead writers' leftovers,
as receivers on several hosts may share one spool.  Real files and real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.ingest.spool import LEGACY_PART_AGE_S, Spool, Stored

STUDY = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def no_tmpfile(monkeypatch: pytest.MonkeyPatch) -> None:
    """A platform without ``O_TMPFILE``, as the spool sees it."""
    monkeypatch.delattr(os, "O_TMPFILE", raising=False)


@pytest.fixture
def sleeper() -> Iterator[int]:
    """The pid of a live process on this host (not ours)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _part(directory: Path, host: str, pid: int) -> Path:
    path = directory / f"{host}-{pid}-{uuid.uuid4().hex}.part"
    path.write_bytes(b"\x00" * 1000)
    return path


def test_without_o_tmpfile_an_instance_is_written_under_a_name_of_this_host_and_process(
        tmp_path: Path, no_tmpfile: None) -> None:
    spool = Spool(tmp_path / "spool")
    incoming = spool.begin_file()
    assert incoming.path is not None, "a named temporary file"
    assert incoming.path.parent == spool.incoming
    assert incoming.path.name.startswith(f"{socket.gethostname()}-{os.getpid()}-")
    incoming.write(b"DICM-ish payload")
    seen: list[Stored] = []
    stored = spool.commit(incoming, STUDY, "1.2.3.4", seen.append)
    assert stored.fresh and stored.path == spool.path_for(STUDY, "1.2.3.4")
    assert stored.path.read_bytes() == b"DICM-ish payload"
    assert seen == [stored]
    assert list(spool.incoming.iterdir()) == [], "the temporary name is gone once linked"


def test_a_start_removes_only_the_leftovers_of_dead_writers_on_this_host(
        tmp_path: Path, no_tmpfile: None, sleeper: int) -> None:
    incoming = tmp_path / "spool" / ".incoming"
    incoming.mkdir(parents=True)
    host = socket.gethostname()
    dead = _part(incoming, host, _dead_pid())
    live = _part(incoming, host, sleeper)  # another receiver process on this host, still writing
    other_host = _part(incoming, "another-receiver.example", _dead_pid())  # its pids mean nothing here
    legacy_old = incoming / f"{uuid.uuid4().hex}.part"  # the layout of an older release
    legacy_old.write_bytes(b"x")
    old = time.time() - LEGACY_PART_AGE_S - 60
    os.utime(legacy_old, (old, old))
    legacy_new = incoming / f"{uuid.uuid4().hex}.part"
    legacy_new.write_bytes(b"x")

    Spool(tmp_path / "spool")

    left = {p.name for p in incoming.iterdir()}
    assert left == {live.name, other_host.name, legacy_new.name}
    assert not dead.exists() and not legacy_old.exists()
