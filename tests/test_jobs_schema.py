"""Schema versions of the job store: a database made by the unversioned node (the schema of
``tests/data/jobstore-unversioned-*.sql``, copied from spinemed-node 0.1 before migrations existed) is filled,
upgraded by opening it, and every job, instance, output, delivery and event is found intact and usable."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dicom_node.jobs.machine import SQLJobStore
from dicom_node.jobs.model import JobState
from dicom_node.jobs.postgres import PostgresJobStore
from dicom_node.jobs.schema import head_revision
from dicom_node.jobs.sqlite import SQLiteJobStore

DATA = Path(__file__).parent / "data"
STUDY = "1.2.826.0.1.3680043.8.498.1"
DONE_STUDY = "1.2.826.0.1.3680043.8.498.2"
T0 = 1_764_000_000.0


def _rows(mark: str, timings: Callable[[dict[str, float]], Any]) -> list[tuple[str, tuple[Any, ...]]]:
    """The same content for both dialects: a job exporting with one failed delivery, a done job, its history."""
    q = ",".join([mark] * 18)
    jobs = f"INSERT INTO jobs VALUES ({q})"
    inst = f"INSERT INTO instances VALUES ({','.join([mark] * 11)})"
    out = f"INSERT INTO outputs VALUES ({','.join([mark] * 6)})"
    dlv = f"INSERT INTO deliveries VALUES ({','.join([mark] * 8)})"
    ev = f"INSERT INTO events(study_uid, at, from_state, to_state, detail) VALUES ({','.join([mark] * 5)})"
    return [
        (jobs, (1, STUDY, "exporting", 1, 1, None, "dicom", 2, T0, T0 + 1, T0 + 5, T0, T0 + 9, T0 + 60, None, None,
                False, timings({"inferring": T0 + 6, "reporting": T0 + 8}))),
        (jobs, (2, DONE_STUDY, "done", 1, 1, None, "orthanc", 1, T0, T0, T0 + 5, T0, T0 + 9, None, None, None,
                False, timings({"inferring": T0 + 6, "reporting": T0 + 7, "done": T0 + 9}))),
        *[(inst, (f"{STUDY}.1.{i}", STUDY, f"{STUDY}.1", "1.2.840.10008.5.1.4.1.1.4", "MR", "T2 SAG",
                  f"/spool/{i}.dcm", "1.2.840.10008.1.2.1", 1000 + i, "MODALITY", T0 + i)) for i in (1, 2)],
        (inst, (f"{DONE_STUDY}.1.1", DONE_STUDY, f"{DONE_STUDY}.1", "1.2.840.10008.5.1.4.1.1.1.1", "DX", "AP",
                "/spool/x.dcm", "1.2.840.10008.1.2.1", 2000, "ORTHANC", T0)),
        (out, (f"{STUDY}.9.1", STUDY, 1, "sr", "1.2.840.10008.5.1.4.1.1.88.34", "/out/sr.dcm")),
        (out, (f"{STUDY}.9.2", STUDY, 1, "key_image", "1.2.840.10008.5.1.4.1.1.7", "/out/ki.dcm")),
        (dlv, (f"{STUDY}.9.1", "pacs", "delivered", 1, "0x0000", None, None, T0 + 10)),
        (dlv, (f"{STUDY}.9.2", "pacs", "failed", 5, "0xA700", "refused with status 0xA700", None, None)),
        (ev, (STUDY, T0, None, "receiving", "first instance from dicom")),
        (ev, (STUDY, T0 + 9, "reporting", "exporting", "revision 1")),
    ]


def _check_intact(store: SQLJobStore) -> None:
    assert store.schema_version() == head_revision()
    job = store.by_study(STUDY)
    assert (job.id, job.state, job.revision, job.instance_count, job.source) == (1, JobState.EXPORTING, 1, 2, "dicom")
    assert job.timings == {"inferring": T0 + 6, "reporting": T0 + 8}
    assert job.next_attempt_at == T0 + 60 and job.completed_at == T0 + 5 and not job.pending_update
    done = store.by_study(DONE_STUDY)
    assert (done.state, done.source, done.timings["done"]) == (JobState.DONE, "orthanc", T0 + 9)
    inst = store.instances(STUDY)
    assert [(i.sop_instance_uid, i.path, i.size, i.calling_ae) for i in inst] == [
        (f"{STUDY}.1.1", "/spool/1.dcm", 1001, "MODALITY"), (f"{STUDY}.1.2", "/spool/2.dcm", 1002, "MODALITY")]
    assert store.instance_paths() == {"/spool/1.dcm", "/spool/2.dcm", "/spool/x.dcm"}
    assert [(o.kind, o.path) for o in store.outputs(STUDY, 1)] == [("key_image", "/out/ki.dcm"),
                                                                      ("sr", "/out/sr.dcm")]
    d = {x.output_uid: x for x in store.deliveries(STUDY)}
    assert (d[f"{STUDY}.9.1"].state, d[f"{STUDY}.9.1"].delivered_at) == ("delivered", T0 + 10)
    assert (d[f"{STUDY}.9.2"].state, d[f"{STUDY}.9.2"].attempts, d[f"{STUDY}.9.2"].last_status) == \
        ("failed", 5, "0xA700")
    assert [e["to"] for e in store.events(STUDY)] == ["receiving", "exporting"]
    assert store.counts() == {"exporting": 1, "done": 1}
    stats = store.ops_stats()
    assert sorted(stats.inference_seconds) == [1.0, 2.0] and stats.deliveries_failed == 1
    # the upgraded store still runs the state machine on the old rows: the exporting job is claimed when due,
    # a new instance for the done study re-opens it, and ids continue after the old ones
    claimed = store.claim("w1", T0 + 61, 30)
    assert claimed is not None and claimed.id == 1
    store.set_next_attempt(1, "w1", T0 + 120)
    from dicom_node.jobs.model import InstanceRecord
    assert store.record_instance(InstanceRecord(f"{DONE_STUDY}.1.2", DONE_STUDY, f"{DONE_STUDY}.1",
                                                "1.2.840.10008.5.1.4.1.1.1.1", "DX", "LAT", "/spool/y.dcm",
                                                "1.2.840.10008.1.2.1", 10, "ORTHANC", T0 + 100))
    assert store.by_study(DONE_STUDY).state is JobState.RECEIVING
    assert store.record_instance(InstanceRecord("1.2.3.4", "1.2.3", "1.2.3.5", "1.2.840.10008.5.1.4.1.1.4", "MR",
                                                "", "/spool/z.dcm", "1.2.840.10008.1.2.1", 1, "M", T0))
    assert store.by_study("1.2.3").id > 2  # (PostgreSQL may skip a sequence value on a conflict)


@pytest.fixture
def old_sqlite(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.executescript((DATA / "jobstore-unversioned-sqlite.sql").read_text())
    for sql, args in _rows("?", json.dumps):
        db.execute(sql, args)
    db.commit()
    db.close()
    return path


def test_sqlite_unversioned_database_is_upgraded_intact(old_sqlite: Path) -> None:
    store = SQLiteJobStore(old_sqlite)
    try:
        _check_intact(store)
    finally:
        store.close()
    columns = {r[1] for r in sqlite3.connect(old_sqlite).execute("PRAGMA table_info(instances)")}
    assert "unusable_reason" in columns


def test_postgresql_unversioned_database_is_upgraded_intact(pg_url: str) -> None:
    from psycopg.types.json import Jsonb

    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute((DATA / "jobstore-unversioned-postgresql.sql").read_text().encode())
        for sql, args in _rows("%s", Jsonb):
            db.execute(sql.encode(), args)
        db.execute("SELECT setval('jobs_id_seq', 2)")  # as the old node's inserts would have left it
    store = PostgresJobStore(pg_url)
    try:
        _check_intact(store)
    finally:
        store.close()


def test_a_new_database_starts_at_head_and_reopening_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    SQLiteJobStore(path).close()
    before = sqlite3.connect(path).execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    store = SQLiteJobStore(path)
    assert store.schema_version() == head_revision()
    store.close()
    assert sqlite3.connect(path).execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == before


def test_many_processes_opening_one_new_file_migrate_it_once(tmp_path: Path) -> None:
    """Receiver and worker start together: whoever takes the lock migrates, the others find it at head."""
    path = tmp_path / "jobs.sqlite3"
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def open_one() -> None:
        try:
            barrier.wait()
            SQLiteJobStore(path).close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    versions = sqlite3.connect(path).execute("SELECT version_num FROM alembic_version").fetchall()
    assert versions == [(head_revision(),)]


def test_postgresql_nodes_starting_together_migrate_once(pg_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_one() -> None:
        try:
            barrier.wait()
            PostgresJobStore(pg_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]

