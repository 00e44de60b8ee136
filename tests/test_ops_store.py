"""The job store contract on both backends: SQLite and a real PostgreSQL server started here.

The state-machine tests of ``tests/test_store.py`` are collected again in this module, where their ``store``
fixture is parametrized over both backends; PostgreSQL-specific tests follow (``SKIP LOCKED`` claims from
several connections, concurrent receivers of one study, the config switch).  The server is Debian's
``postgresql`` (``initdb`` + ``pg_ctl`` into a temporary folder, on a free port; as root it runs as the
``postgres`` user).  Missing binaries fail the tests with a message — nothing is skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# the backend-independent contract, re-collected here against the parametrized `store` fixture below
from test_store import (  # noqa: F401  (collected by pytest)
    STUDY,
    _to_complete,
    rec,
    test_claim_lease_and_lifecycle,
    test_concurrent_writers,
    test_expired_lease_is_reclaimed_and_restarts_analysis,
    test_new_instance_after_done_opens_next_revision,
    test_one_job_per_study_and_duplicates,
    test_our_own_result_routed_back_is_not_a_new_source,
    test_quiet_and_force_completion,
    test_required_series_waits_until_forced,
    test_restart_gives_receiving_studies_a_new_quiet_period,
    test_retry_failed,
)

from dicom_node.config import load_config
from dicom_node.errors import StoreError
from dicom_node.jobs.model import JobState, JobStore, OutputRecord
from dicom_node.jobs.postgres import PostgresJobStore
from dicom_node.jobs.sqlite import SQLiteJobStore
from dicom_node.jobs.stores import open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    s: JobStore
    if request.param == "sqlite":
        s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    else:
        s = PostgresJobStore(request.getfixturevalue("pg_url"))
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------- both backends
def test_ops_stats_from_the_store(store: JobStore) -> None:
    _to_complete(store)
    job = store.claim("w", time.time(), 60)
    assert job is not None
    store.transition(job.id, "w", JobState.INFERRING)
    time.sleep(0.05)
    store.transition(job.id, "w", JobState.REPORTING)
    out = OutputRecord("1.2.3.4", STUDY, 1, "measurement_report", "1.2.840.10008.5.1.4.1.1.88.34", "/o.dcm")
    store.finish_report(job.id, "w", 1, [out], ["pacs", "viewer"])
    store.record_delivery("1.2.3.4", "pacs", False, None, "down", time.time(), False)
    store.record_delivery("1.2.3.4", "pacs", True, "0x0000", None, None, False)
    store.record_delivery("1.2.3.4", "viewer", False, None, "down", None, True)
    s = store.ops_stats()
    assert s.counts == {"exporting": 1}
    assert len(s.inference_seconds) == 1 and 0.04 < s.inference_seconds[0] < 5
    totals = (s.delivery_attempts, s.delivery_failed_attempts, s.deliveries_failed, s.deliveries_delivered)
    assert totals == (3, 2, 1, 1)


# ---------------------------------------------------------------------------------------------- PostgreSQL only
def test_skip_locked_claims_from_many_workers_never_collide(pg_url: str) -> None:
    setup = PostgresJobStore(pg_url)
    for i in range(40):
        setup.record_instance(rec(i, study=f"1.2.840.99.{i}"))
    assert len(setup.complete_due(time.time() + 100, 1, 1000)) == 40
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        s = PostgresJobStore(pg_url)  # its own connections, as another node's worker would have
        try:
            while (job := s.claim(f"w{n}", time.time(), 60)) is not None:
                s.transition(job.id, f"w{n}", JobState.INFERRING)
                with lock:
                    claimed.append((f"w{n}", job.id))
        finally:
            s.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ids = [j for _, j in claimed]
    assert sorted(ids) == sorted({j.id for j in setup.jobs()}), "every job claimed exactly once"
    assert len({w for w, _ in claimed}) > 1, "the work was shared"
    setup.close()


def test_two_receivers_of_one_study_make_one_job(pg_url: str) -> None:
    a, b = PostgresJobStore(pg_url), PostgresJobStore(pg_url)

    def send(s: PostgresJobStore, start: int) -> None:
        for i in range(start, start + 60):
            s.record_instance(rec(i))
            s.record_instance(rec(i))  # and every one of them twice

    ta, tb = threading.Thread(target=send, args=(a, 0)), threading.Thread(target=send, args=(b, 30))
    ta.start(), tb.start()
    ta.join(), tb.join()
    jobs = a.jobs()
    assert len(jobs) == 1 and jobs[0].instance_count == 90 and len(a.instances(STUDY)) == 90
    a.close(), b.close()


def test_config_selects_postgresql_and_hides_the_password(pg_url: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(store={"url": pg_url}, node={"data_dir": tmp_path})
    s = open_store(cfg)
    assert isinstance(s, PostgresJobStore)
    s.record_instance(rec(1))
    assert s.counts() == {"receiving": 1}
    s.close()
    assert isinstance(open_store(load_config(node={"data_dir": tmp_path})), SQLiteJobStore)
    monkeypatch.delenv("SPINEMED_TEST_PG_PW", raising=False)
    with pytest.raises(StoreError, match="SPINEMED_TEST_PG_PW is not set"):
        PostgresJobStore(pg_url, password_env="SPINEMED_TEST_PG_PW")
    shown = PostgresJobStore.__new__(PostgresJobStore)  # repr without connecting
    shown.url = "postgresql://u:secret@h/db"
    assert "secret" not in repr(shown) and "u:***@h" in repr(shown)
