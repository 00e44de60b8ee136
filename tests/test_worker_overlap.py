"""The model does not wait for the network: with ``[worker] export_threads`` the next study is analysed while
the last one's results are still being sent to a slow PACS (a real pynetdicom Storage SCP on loopback that
takes a second per object); with ``export_threads = 0`` each study's results are sent before the next
analysis starts.  The order is read from the job store's events."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, running_node, storescu, wait_until
from pynetdicom import AE, AllStoragePresentationContexts, evt
from test_priors_compare import ScriptedCobb

from dicom_node.config import load_config
from dicom_node.devtools.phantoms import make_scoliosis_radiograph
from dicom_node.errors import JobNotFoundError
from dicom_node.jobs.model import JobState
from dicom_node.work.pipeline import Pipeline

SLOW_S = 1.0  # per C-STORE: a study's 4-5 result objects take 4-5 s to send


class SlowPacs:
    """A Storage SCP that answers each C-STORE after :data:`SLOW_S` seconds."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="SLOWPACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        time.sleep(SLOW_S)
        with self.lock:
            self.received.append((time.time(), str(event.request.AffectedSOPInstanceUID)))
        return 0x0000


@pytest.fixture
def pacs() -> Iterator[SlowPacs]:
    p = SlowPacs()
    yield p
    p.server.shutdown()


def _state_times(node: Any, study_uid: str) -> dict[str, float]:
    """First time the study entered each state."""
    out: dict[str, float] = {}
    for e in node.store.events(study_uid):
        out.setdefault(str(e["to"]), float(e["at"]))
    return out


def _done(node: Any, study_uid: str) -> bool:
    try:
        return node.store.by_study(study_uid).state is JobState.DONE
    except JobNotFoundError:
        return False


@pytest.mark.parametrize("export_threads", [1, 0])
def test_the_next_study_is_analysed_while_the_last_is_sent(tmp_path: Path, pacs: SlowPacs,
                                                            export_threads: int) -> None:
    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp_path / "data", "min_free_disk_mb": 0},
        http={"enabled": False},
        completeness={"quiet_seconds": 0.5, "force_seconds": 60, "check_interval_s": 0.1},
        destinations=[{"name": "pacs", "type": "dicom", "ae_title": "SLOWPACS", "host": "127.0.0.1",
                       "port": pacs.port}],
        export={"timeout_s": 30},
        worker={"poll_interval_s": 0.05, "export_threads": export_threads},
    )
    first = make_scoliosis_radiograph(tmp_path / "a", seed=51, patient_id="OVL-1")
    second = make_scoliosis_radiograph(tmp_path / "b", seed=52, patient_id="OVL-2")
    with running_node(cfg, Pipeline(cfg, model=ScriptedCobb(20.0))) as node:
        assert storescu(node.receiver.port, list(first.paths)).returncode == 0
        assert storescu(node.receiver.port, list(second.paths)).returncode == 0
        wait_until(lambda: _done(node, first.study_instance_uid) and _done(node, second.study_instance_uid),
                   120, "both studies delivered")
        a = _state_times(node, first.study_instance_uid)
        b = _state_times(node, second.study_instance_uid)
    assert len(pacs.received) >= 8, "both studies' results reached the PACS"
    if export_threads:
        # the second analysis began while the first study's results were still on their way
        assert b["inferring"] < a["done"], (a, b)
    else:
        assert a["done"] < b["inferring"], (a, b)
