"""One logging pipeline, identifiers redacted, a per-install key for their digest (issue 14).

A real ``spinemed-node serve`` subprocess whose export destination is down (pynetdicom, a standard-library
logger, reports the failed association): every line of its log is JSON from the one pipeline, and no UID,
patient name or ID of the study appears.  In process: structlog and stdlib events, messages and tracebacks
pass the redaction; the digest key is made once per install with mode 0600 and differs between installs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import NodeProcess, free_port, node_config_text, start_node, storescu

from dicom_node import log as node_log
from dicom_node.devtools.phantoms import make_lumbar_mr
from dicom_node.errors import ConfigError


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


@pytest.mark.slow
def test_every_line_of_a_serve_log_is_json_without_identifiers(tmp_path: Path, demo_model_dir: Path) -> None:
    data, port = tmp_path / "data", free_port()
    config = tmp_path / "node.toml"
    down = free_port()  # nothing listens: the export's association fails, pynetdicom logs it (stdlib)
    config.write_text(node_config_text(data, demo_model_dir, port, [("pacs", "PACS", down)], quiet=0.5,
                                       extra="[http]\nenabled = false\n"))
    node: NodeProcess = start_node(config, data, port)
    try:
        study = make_lumbar_mr(tmp_path / "mr", slices=5, size=64, seed=51)
        assert storescu(node.port, list(study.paths)).returncode == 0
        store = node.store()
        try:
            import time

            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                ds = store.deliveries(study.study_instance_uid)
                if any(d.attempts >= 2 for d in ds):
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(node.log.read_text()[-3000:])
        finally:
            store.close()
    finally:
        node.stop()
    text = node.log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line of the pipeline: {line[:200]!r}") from None
    assert all({"timestamp", "level", "event"} <= r.keys() for r in records)
    stdlib = [r for r in records if str(r.get("logger", "")).startswith("pynetdicom")]
    assert stdlib, "pynetdicom's failed association is logged through the same pipeline"
    ds = pydicom.dcmread(study.paths[0], stop_before_pixels=True)
    for phi in (study.study_instance_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.PatientID),
                str(ds.PatientName)):
        assert phi not in text
    key = data / node_log.KEY_FILE
    assert key.stat().st_mode & 0o777 == 0o600 and key.parent.stat().st_mode & 0o777 == 0o700


def test_structlog_and_stdlib_events_and_tracebacks_are_redacted(tmp_path: Path, restore_logging: None,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    node_log.use_phi_key(tmp_path)
    node_log.configure_logging("INFO", json=True)
    uid = "1.2.826.0.1.3680043.8.498.1234567890"
    name = "Doe^Jane"
    node_log.get_logger("t").warning(f"study {uid} of {name}", series=[uid], sop_class="1.2.840.10008.5.1.4.1.1.4")
    try:
        raise ValueError(f"bad instance {uid} for {name}")
    except ValueError:
        logging.getLogger("somelib").exception("library failure")
    logging.getLogger("somelib").warning("peer 127.0.0.1 sent %s", uid)
    err = capsys.readouterr().err
    records = [json.loads(line) for line in err.splitlines()]
    assert len(records) == 3
    digest = f"uid:{node_log.phi_hash(uid)}"
    assert records[0]["event"] == f"study {digest} of <name>" and records[0]["series"] == [digest]
    assert records[0]["sop_class"] == "1.2.840.10008.5.1.4.1.1.4"  # the standard's UIDs are no identifiers
    assert records[1]["logger"] == "somelib" and "ValueError: bad instance" in records[1]["exception"]
    assert digest in records[1]["exception"] and "<name>" in records[1]["exception"]
    assert records[2]["event"] == f"peer 127.0.0.1 sent {digest}"  # an address is not a UID
    assert uid not in err and name not in err


def test_digest_key_is_made_once_per_install_and_must_be_private(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    node_log.use_phi_key(a)
    first = node_log.phi_hash("1.2.3.4.5")
    key = a / node_log.KEY_FILE
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    node_log.use_phi_key(b)
    assert node_log.phi_hash("1.2.3.4.5") != first  # another install, another key
    node_log.use_phi_key(a)
    assert node_log.phi_hash("1.2.3.4.5") == first  # the same install: the same digest, across restarts
    os.chmod(b / node_log.KEY_FILE, 0o644)
    node_log._key_path = None  # as a new process would
    with pytest.raises(ConfigError, match="chmod 600"):
        node_log.use_phi_key(b)
