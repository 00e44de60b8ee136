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


class Gauge(ScriptedCobb):
    """A scripted model that counts the analyses in flight at once; ``concurrent`` says, as the openai
    backend does, that it takes concurrent calls.  Each call waits (up to 10 s) until ``want`` calls are in
    flight, so a node that overlaps analyses is seen doing so however loaded the machine is."""

    def __init__(self, concurrent: bool, want: int) -> None:
        super().__init__(20.0)
        self.concurrent = concurrent
        self.want = want
        self.in_flight = 0
        self.max_in_flight = 0
        self.cond = threading.Condition()

    def analyze(self, inputs: Any) -> Any:
        with self.cond:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.in_flight >= self.want, timeout=10 if self.concurrent else 2.0)
        try:
            return super().analyze(inputs)
        finally:
            with self.cond:
                self.in_flight -= 1


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent-model", "in-process-model"])
def test_analysis_threads_overlap_only_a_model_that_takes_concurrent_calls(tmp_path: Path, concurrent: bool) -> None:
    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp_path / "data", "min_free_disk_mb": 0},
        http={"enabled": False},
        completeness={"quiet_seconds": 0.3, "force_seconds": 60, "check_interval_s": 0.1},
        worker={"poll_interval_s": 0.05, "analysis_threads": 3},
    )
    model = Gauge(concurrent, want=3)
    studies = [make_scoliosis_radiograph(tmp_path / f"s{i}", seed=60 + i, patient_id=f"THR-{i}") for i in range(3)]
    with running_node(cfg, Pipeline(cfg, model=model)) as node:
        for st in studies:
            assert storescu(node.receiver.port, list(st.paths)).returncode == 0
        wait_until(lambda: all(_done_or_kept(node, st.study_instance_uid) for st in studies), 120,
                   "the three studies reported")
    if concurrent:
        assert model.max_in_flight == 3, "three studies analysed side by side"
    else:
        assert model.max_in_flight == 1, "an in-process model is used by one study at a time"


def _done_or_kept(node: Any, study_uid: str) -> bool:
    try:
        return node.store.by_study(study_uid).state in (JobState.DONE, JobState.FAILED)
    except JobNotFoundError:
        return False
