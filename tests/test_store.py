"""The job store's state machine, on a real SQLite file."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dicom_node.errors import StoreError
from dicom_node.jobs.model import InstanceRecord, JobState, OutputRecord
from dicom_node.jobs.sqlite import SQLiteJobStore

STUDY = "1.2.826.0.1.3680043.8.498.1"


def rec(n: int, study: str = STUDY, desc: str = "SAG T2") -> InstanceRecord:
    return InstanceRecord(
        f"{study}.{n}",
        study,
        f"{study}.9",
        "1.2.840.10008.5.1.4.1.1.4",
        "MR",
        desc,
        f"/spool/{n}.dcm",
        "1.2.840.10008.1.2.1",
        100,
        "SCU",
        time.time(),
    )


@pytest.fixture
def store(tmp_path: Path) -> SQLiteJobStore:
    s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def test_wal_and_full_sync(store: SQLiteJobStore) -> None:
    db = store._conn()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_one_job_per_study_and_duplicates(store: SQLiteJobStore) -> None:
    assert store.record_instance(rec(1))
    assert store.record_instance(rec(2))
    assert not store.record_instance(rec(2)), "a resend of the same SOP Instance UID is not recorded twice"
    jobs = store.jobs()
    assert len(jobs) == 1
    assert jobs[0].state is JobState.RECEIVING and jobs[0].instance_count == 2
    assert len(store.instances(STUDY)) == 2


def test_quiet_and_force_completion(store: SQLiteJobStore) -> None:
    store.record_instance(rec(1))
    now = time.time()
    assert store.complete_due(now, quiet_s=10, force_s=100) == []
    done = store.complete_due(now + 11, quiet_s=10, force_s=100)
    assert [j.state for j in done] == [JobState.COMPLETE]
    store.record_instance(rec(1, study="9.9"))
    # keeps arriving (not quiet) but open longer than force_s
    done = store.complete_due(now + 200, quiet_s=1000, force_s=100)
    assert [j.study_instance_uid for j in done] == ["9.9"]
    assert store.events("9.9")[-1]["detail"].startswith("forced")


def test_required_series_waits_until_forced(store: SQLiteJobStore) -> None:
    store.record_instance(rec(1, desc="SAG T1"))
    now = time.time()
    assert store.complete_due(now + 11, 10, 100, required_series=["T2"]) == []
    store.record_instance(rec(2, desc="SAG T2 TSE"))
    assert len(store.complete_due(now + 50, 10, 100, required_series=["T2"])) == 1


def _to_complete(store: SQLiteJobStore) -> None:
    store.record_instance(rec(1))
    store.complete_due(time.time() + 100, 1, 1000)


def test_claim_lease_and_lifecycle(store: SQLiteJobStore, tmp_path: Path) -> None:
    _to_complete(store)
    job = store.claim("w1", time.time(), 60)
    assert job is not None and job.lease_owner == "w1"
    assert store.claim("w2", time.time(), 60) is None, "a leased job is not claimed twice"
    with pytest.raises(StoreError, match="not leased by w2"):
        store.transition(job.id, "w2", JobState.INFERRING)
    job = store.transition(job.id, "w1", JobState.INFERRING)
    assert job.attempts == 1
    store.transition(job.id, "w1", JobState.REPORTING)
    out = OutputRecord("1.2.3.4", STUDY, 1, "measurement_report", "1.2.840.10008.5.1.4.1.1.88.34", "/o.dcm")
    job = store.finish_report(job.id, "w1", 1, [out], ["pacs", "viewer"])
    assert job.state is JobState.EXPORTING and job.revision == 1
    assert {d.destination for d in store.deliveries(STUDY)} == {"pacs", "viewer"}
    store.record_delivery("1.2.3.4", "pacs", True, "0x0000", None, None, False)
    store.record_delivery("1.2.3.4", "viewer", False, None, "down", time.time() + 5, False)
    states = {d.destination: d.state for d in store.deliveries(STUDY)}
    assert states == {"pacs": "delivered", "viewer": "pending"}
    job = store.transition(job.id, "w1", JobState.DONE)
    assert job.lease_owner is None and "done" in job.timings


def test_expired_lease_is_reclaimed_and_restarts_analysis(store: SQLiteJobStore) -> None:
    _to_complete(store)
    now = time.time()
    job = store.claim("dead", now, 10)
    assert job is not None
    store.transition(job.id, "dead", JobState.INFERRING)
    assert store.claim("w2", now + 5, 10) is None
    again = store.claim("w2", now + 11, 10)
    assert again is not None and again.state is JobState.COMPLETE and again.lease_owner == "w2"


def test_new_instance_after_done_opens_next_revision(store: SQLiteJobStore) -> None:
    _to_complete(store)
    job = store.claim("w", time.time(), 60)
    assert job is not None
    store.transition(job.id, "w", JobState.INFERRING)
    store.record_instance(rec(5))  # arrives while the worker holds it
    assert store.get(job.id).pending_update
    job = store.transition(job.id, "w", JobState.SKIPPED, reason="test")
    assert job.state is JobState.RECEIVING and not job.pending_update
    store.complete_due(time.time() + 100, 1, 1000)
    job = store.claim("w", time.time(), 60)
    assert job is not None
    job = store.transition(job.id, "w", JobState.DONE)
    store.record_instance(rec(6))
    assert store.get(job.id).state is JobState.RECEIVING


def test_retry_failed(store: SQLiteJobStore) -> None:
    _to_complete(store)
    job = store.claim("w", time.time(), 60)
    assert job is not None
    with pytest.raises(StoreError, match="only failed"):
        store.retry(job.id)
    store.transition(job.id, "w", JobState.FAILED, reason="model exploded")
    job = store.retry(job.id)
    assert job.state is JobState.COMPLETE and job.reason is None


def test_concurrent_writers(store: SQLiteJobStore) -> None:
    def work(t: int) -> None:
        for i in range(50):
            store.record_instance(rec(t * 1000 + i, study=f"1.2.{t % 3}"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(j.instance_count for j in store.jobs()) == 400
    assert len(store.jobs()) == 3


def test_restart_gives_receiving_studies_a_new_quiet_period(store: SQLiteJobStore) -> None:
    store.record_instance(rec(1))
    later = time.time() + 50
    assert store.restart_quiet_timers(later) == 1
    assert store.complete_due(later + 5, quiet_s=10, force_s=1000) == []
    assert len(store.complete_due(later + 11, quiet_s=10, force_s=1000)) == 1


def test_our_own_result_routed_back_is_not_a_new_source(store: SQLiteJobStore) -> None:
    _to_complete(store)
    job = store.claim("w", time.time(), 60)
    assert job is not None
    out = OutputRecord("1.2.3.99", STUDY, 1, "measurement_report", "1.2.840.10008.5.1.4.1.1.88.34", "/o.dcm")
    store.finish_report(job.id, "w", 1, [out], [])
    store.transition(job.id, "w", JobState.DONE)
    echo = InstanceRecord(
        "1.2.3.99",
        STUDY,
        "1.2.3.98",
        out.sop_class_uid,
        "SR",
        "SpineMed AI results",
        "/x.dcm",
        "1.2.840.10008.1.2.1",
        10,
        "PACS",
        time.time(),
    )
    assert not store.record_instance(echo)
    assert store.get(job.id).state is JobState.DONE


def test_claim_by_kind_of_work(any_store: Any) -> None:
    """A worker's analysis loop claims analyses only, its export threads exports only (both stores)."""
    store = any_store
    for n, study in enumerate(("1.2.826.0.1.3680043.8.498.801", "1.2.826.0.1.3680043.8.498.802")):
        store.record_instance(rec(n, study=study))
    first, second = sorted(store.complete_due(time.time() + 100, 0, 1000), key=lambda j: j.id)
    now = time.time()
    job = store.claim("w", now, 60, work="analysis")
    assert job is not None and job.id == first.id
    store.transition(job.id, "w", JobState.INFERRING)
    store.transition(job.id, "w", JobState.REPORTING)
    out = OutputRecord("1.2.3.9", job.study_instance_uid, 1, "measurement_report", "1.2.840.10008.5.1.4.1.1.88.34",
                       "/o.dcm")
    store.finish_report(job.id, "w", 1, [out], ["pacs"])
    store.release(job.id, "w")
    # the analysis loop takes the next analysis, not the export; an export thread takes the export only
    nxt = store.claim("w", now, 60, work="analysis")
    assert nxt is not None and nxt.id == second.id
    exp = store.claim("x", now, 60, work="export")
    assert exp is not None and exp.id == first.id and exp.state is JobState.EXPORTING
    assert store.claim("x2", now, 60, work="export") is None
    assert store.claim("w2", now, 60, work="analysis") is None
    with pytest.raises(ValueError, match="work"):
        store.claim("w", now, 60, work="everything")
