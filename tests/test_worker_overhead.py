"""The worker's own overhead: headers read while a study arrives, one-time costs paid at start-up."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import load_config
from dicom_node.devtools import phantoms as synthetic
from dicom_node.jobs.model import InstanceRecord, JobState
from dicom_node.jobs.sqlite import SQLiteJobStore
from dicom_node.work.pipeline import Pipeline
from dicom_node.work.worker import HeaderCache
from inference.study import load_study, read_header


def _record(path: Path) -> InstanceRecord:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return InstanceRecord(
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        modality=str(ds.Modality),
        series_description=str(ds.get("SeriesDescription", "")),
        path=str(path),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        size=path.stat().st_size,
        calling_ae="TEST",
        received_at=time.time(),
    )


def test_load_study_uses_known_headers(tmp_path: Path, counted_reads: list[object]) -> None:
    paths = list(synthetic.make_spine_ct(tmp_path, slices=10, size=64).paths)
    reference = load_study(paths)
    known = {p: read_header(p) for p in paths[:7]}
    counted_reads.clear()
    study = load_study(paths, known_headers=known)
    assert study == reference
    assert sorted(map(str, counted_reads)) == sorted(map(str, paths[7:]))  # only the unknown ones read
    first = study.series[0].instances[0]
    assert study.header(first) is study.headers[first.sop_instance_uid]


def test_header_cache_reads_arriving_studies_once(tmp_path: Path, counted_reads: list[object]) -> None:
    paths = list(synthetic.make_spine_ct(tmp_path / "ct", slices=12, size=64).paths)
    store = SQLiteJobStore(tmp_path / "jobs.db")
    try:
        store.record_instances([_record(p) for p in paths[:8]])
        cache = HeaderCache()
        counted_reads.clear()
        assert cache.prefetch(store, budget_s=10.0) is False  # all read: nothing left
        assert len(cache) == 8 and len(counted_reads) == 8
        assert cache.prefetch(store, budget_s=10.0) is False and len(counted_reads) == 8  # not read again
        store.record_instances([_record(p) for p in paths[8:]])
        counted_reads.clear()
        cache.prefetch(store, budget_s=10.0)
        assert len(cache) == 12 and len(counted_reads) == 4  # only the new arrivals
        # a file that changed since it was read is not trusted
        os.utime(paths[0], ns=(1, 1))
        known = cache.take([str(p) for p in paths])
        assert set(known) == {Path(p) for p in paths[1:]} and len(cache) == 0
        counted_reads.clear()
        study = load_study(paths, known_headers=known)
        assert [str(p) for p in counted_reads] == [str(paths[0])]
        assert len(study.instances) == 12
        # a study no longer arriving is forgotten
        cache.prefetch(store, budget_s=10.0)
        job = store.by_study(study.study_instance_uid)
        assert store.claim("me", time.time(), 60.0) is None  # still receiving: nothing to claim
        store.complete_due(time.time() + 3600, 1.0, 7200.0)
        claimed = store.claim("me", time.time(), 60.0)
        assert claimed is not None and claimed.id == job.id
        store.transition(job.id, "me", JobState.INFERRING)
        cache.prefetch(store, budget_s=10.0)
        assert len(cache) == 0
    finally:
        store.close()


def test_header_cache_respects_its_budget(tmp_path: Path) -> None:
    paths = list(synthetic.make_spine_ct(tmp_path / "ct", slices=10, size=64).paths)
    store = SQLiteJobStore(tmp_path / "jobs.db")
    try:
        store.record_instances([_record(p) for p in paths])
        cache = HeaderCache()
        assert cache.prefetch(store, budget_s=0.0) is True  # out of time after one header: more to read
        assert len(cache) == 1
        for _ in range(20):
            if not cache.prefetch(store, budget_s=0.0):
                break
        assert len(cache) == 10
        assert HeaderCache(max_entries=3).prefetch(store, budget_s=10.0) is False  # full: stops, nothing pending
    finally:
        store.close()


def test_warm_up_loads_stage_code_and_freezes_it(tmp_path: Path) -> None:
    cfg = load_config(node={"host": "127.0.0.1", "port": 0, "data_dir": tmp_path, "min_free_disk_mb": 0})
    try:
        seconds = Pipeline(cfg).warm_up()
        assert seconds >= 0 and gc.get_freeze_count() > 0
        import sys

        assert {"inference.preprocess", "sr_templates", "SimpleITK", "highdicom"} <= set(sys.modules)
    finally:
        gc.unfreeze()


def test_completeness_check_and_idle_worker_wake_when_a_study_falls_due(tmp_path: Path) -> None:
    from dicom_node.jobs.completeness import CompletenessMonitor, due_at
    from dicom_node.work.worker import Worker

    paths = list(synthetic.make_spine_ct(tmp_path / "ct", slices=8, size=64).paths)
    cfg = load_config(
        node={"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "node", "min_free_disk_mb": 0},
        completeness={"quiet_seconds": 0.5, "force_seconds": 60, "check_interval_s": 30.0},
        worker={"poll_interval_s": 5.0},
    )
    store = SQLiteJobStore(tmp_path / "jobs.db")
    monitor = CompletenessMonitor(cfg.completeness, store)
    try:
        store.record_instances([_record(p) for p in paths])
        (job,) = store.jobs([JobState.RECEIVING])
        due = due_at(job, cfg.completeness)
        assert due == pytest.approx((job.last_received_at or 0) + 0.5)
        # nothing due: the regular interval; a study due in 0.3 s: just after that
        assert monitor.next_wait(now=due - 100) == pytest.approx(30.0)
        assert monitor.next_wait(now=due - 0.3) == pytest.approx(0.3, abs=0.01)
        worker = Worker(cfg, store, Pipeline(cfg))
        assert worker.idle_wait(now=due - 100) == pytest.approx(5.0)
        assert worker.idle_wait(now=due - 0.3) == pytest.approx(0.31, abs=0.01)
        assert worker.idle_wait(now=due + 0.1) == pytest.approx(0.01)  # due: look again very soon
        assert worker.idle_wait(now=due + 120) == pytest.approx(5.0)  # long overdue (required series)
        worker.audit.close()
        # the monitor completes it right after the quiet period, not after its 30 s interval
        monitor.start()
        deadline = time.monotonic() + 10
        while store.get(job.id).state is JobState.RECEIVING and time.monotonic() < deadline:
            time.sleep(0.02)
        done = store.get(job.id)
        assert done.state is JobState.COMPLETE
        assert (done.completed_at or 0) - due < 0.5
    finally:
        monitor.stop()
        store.close()
