"""The job model: one job per study, its states, and the records the stores keep.

States::

    receiving ──quiet/force──▶ complete ──claim──▶ inferring ──▶ reporting ──▶ exporting ──▶ done
                                   ▲                    │              │            │
                                   └── retry / lease ───┴──────────────┘            ├─▶ failed (reason)
    skipped (reason)   new instance after done/skipped/failed ──▶ receiving (next revision)

:class:`JobStore` is the interface the rest of the node uses; :mod:`dicom_node.jobs.machine` implements it
once in SQL, and :mod:`dicom_node.jobs.sqlite` / :mod:`dicom_node.jobs.postgres` supply the dialects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "JOB_COLUMNS",
    "TURN_COLUMNS",
    "TURN_FINAL_STATES",
    "ClaimWork",
    "ConsultTurn",
    "Consultation",
    "Delivery",
    "EndEvent",
    "InstanceRecord",
    "Job",
    "JobState",
    "JobStore",
    "OpsStats",
    "OutputRecord",
    "ShadowRow",
    "TurnState",
    "job_from_row",
    "turn_from_row",
]


#: What a claim takes: any job with work, only analyses (complete, or abandoned mid-analysis), or only
#: exports (results written, deliveries due).
ClaimWork = Literal["any", "analysis", "export"]


class JobState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    INFERRING = "inferring"
    REPORTING = "reporting"
    EXPORTING = "exporting"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


#: States in which the worker owns the job.
ACTIVE_STATES = frozenset({JobState.INFERRING, JobState.REPORTING, JobState.EXPORTING})
#: States a job rests in until new instances or a person's retry.
FINAL_STATES = frozenset({JobState.DONE, JobState.SKIPPED, JobState.FAILED})


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str
    series_description: str
    path: str
    transfer_syntax_uid: str
    size: int
    calling_ae: str
    received_at: float
    #: why the latest analysis left this instance out (undecodable pixels); ``None``: used
    unusable_reason: str | None = None


@dataclass(frozen=True)
class Job:
    id: int
    study_instance_uid: str
    state: JobState
    revision: int
    attempts: int
    reason: str | None
    source: str
    instance_count: int
    first_received_at: float | None
    last_received_at: float | None
    completed_at: float | None
    created_at: float
    updated_at: float
    next_attempt_at: float | None
    lease_owner: str | None
    lease_until: float | None
    pending_update: bool
    timings: dict[str, float]


@dataclass(frozen=True)
class OutputRecord:
    sop_instance_uid: str
    study_instance_uid: str
    revision: int
    kind: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class Delivery:
    output_uid: str
    destination: str
    state: str
    attempts: int
    last_status: str | None
    last_error: str | None
    next_attempt_at: float | None
    delivered_at: float | None


@dataclass(frozen=True)
class EndEvent:
    """A study reaching a final state (done, failed, skipped), from the job store's event log."""

    event_id: int
    study_instance_uid: str
    at: float
    state: JobState
    detail: str | None


@dataclass(frozen=True)
class OpsStats:
    """Aggregates for ``/metrics``, read from the store so every process (and node) sees the same numbers."""

    counts: dict[str, int]
    inference_seconds: list[float]  # per analysed job: reporting - inferring of its latest analysis
    delivery_attempts: int  # every C-STORE/STOW attempt recorded
    delivery_failed_attempts: int  # attempts that did not deliver (each one led to a retry or a give-up)
    deliveries_failed: int  # deliveries that ran out of attempts
    deliveries_delivered: int


@dataclass(frozen=True)
class ShadowRow:
    """One shadow-mode comparison: a study (by pseudonym), a labelled condition at a level, the site's
    grade and the node's (0 normal/mild, 1 moderate, 2 severe)."""

    study: str
    revision: int
    condition: str
    level: str
    truth_grade: int
    model_grade: int
    recorded_at: float
    source: str

    @property
    def agree(self) -> bool:
        return self.truth_grade == self.model_grade


class TurnState(StrEnum):
    """A consultation question's way: queued (web) → answering (worker) → answered | failed; or busy (no
    worker took it in time)."""

    QUEUED = "queued"
    ANSWERING = "answering"
    ANSWERED = "answered"
    FAILED = "failed"
    BUSY = "busy"


#: Turn states that will not change any more.
TURN_FINAL_STATES = frozenset({TurnState.ANSWERED, TurnState.FAILED, TurnState.BUSY})


@dataclass(frozen=True)
class Consultation:
    """Follow-up questions about one analysed job revision."""

    id: int
    job_id: int
    study_instance_uid: str
    revision: int
    created_by: str
    created_at: float
    #: SOP Instance UID of the consultation SR saved from it (``None``: not saved)
    saved_uid: str | None


@dataclass(frozen=True)
class ConsultTurn:
    """One question of a consultation and its answer (written progressively while ``answering``)."""

    id: int
    consultation_id: int
    seq: int
    question: str
    answer: str
    state: TurnState
    error: str | None
    asked_by: str
    asked_at: float
    started_at: float | None
    answered_at: float | None
    worker: str | None
    prompt_tokens: int
    completion_tokens: int

    @property
    def final(self) -> bool:
        return self.state in TURN_FINAL_STATES


TURN_COLUMNS = (
    "id, consultation_id, seq, question, answer, state, error, asked_by, asked_at, started_at, answered_at, "
    "worker, prompt_tokens, completion_tokens"
)


def turn_from_row(row: Sequence[Any]) -> ConsultTurn:
    """A ``consult_turns`` row (:data:`TURN_COLUMNS`) as a :class:`ConsultTurn`."""
    r = tuple(row)
    return ConsultTurn(int(r[0]), int(r[1]), int(r[2]), r[3], r[4], TurnState(r[5]), r[6], r[7], float(r[8]),
                       r[9], r[10], r[11], int(r[12]), int(r[13]))


class JobStore(Protocol):
    """What the receiver, the scheduler and the worker need from durable storage."""

    def record_instance(self, rec: InstanceRecord, *, source: str = "dicom") -> bool: ...
    def record_instances(self, recs: Sequence[InstanceRecord], *, source: str = "dicom") -> list[bool]: ...
    def instance_paths(self) -> set[str]: ...
    def complete_due(
        self, now: float, quiet_s: float, force_s: float, required_series: Sequence[str] = ()
    ) -> list[Job]: ...
    def restart_quiet_timers(self, now: float) -> int: ...
    def claim(self, owner: str, now: float, lease_s: float, *, work: ClaimWork = "any") -> Job | None: ...
    def transition(self, job_id: int, owner: str, to: JobState, *, reason: str | None = None) -> Job: ...
    def release(self, job_id: int, owner: str) -> None: ...
    def finish_report(
        self,
        job_id: int,
        owner: str,
        revision: int,
        outputs: Sequence[OutputRecord],
        destinations: Sequence[str],
        kinds: Mapping[str, frozenset[str]] | None = None,
        note: str | None = None,
    ) -> Job: ...
    def get(self, job_id: int) -> Job: ...
    def by_study(self, study_uid: str) -> Job: ...
    def jobs(self, states: Sequence[JobState] = ()) -> list[Job]: ...
    def instances(self, study_uid: str) -> list[InstanceRecord]: ...
    def outputs(self, study_uid: str, revision: int | None = None) -> list[OutputRecord]: ...
    def deliveries(self, study_uid: str, revision: int | None = None) -> list[Delivery]: ...
    def record_delivery(
        self,
        output_uid: str,
        destination: str,
        ok: bool,
        status: str | None,
        error: str | None,
        next_attempt_at: float | None,
        give_up: bool,
    ) -> None: ...
    def set_next_attempt(self, job_id: int, owner: str, at: float) -> None: ...
    def mark_unusable(self, study_uid: str, reasons: Mapping[str, str]) -> None: ...
    def unusable_summary(self) -> dict[str, dict[str, int]]: ...
    def defer_analysis(self, job_id: int, owner: str, at: float, reason: str) -> Job: ...
    def force_release(self, job_id: int) -> None: ...
    def retry(self, job_id: int) -> Job: ...
    def counts(self) -> dict[str, int]: ...
    def events(self, study_uid: str) -> list[dict[str, Any]]: ...
    def end_events(self, after_id: int, limit: int = 100) -> list[EndEvent]: ...
    def last_event_id(self) -> int: ...

    def add_outputs(
        self,
        job_id: int,
        outputs: Sequence[OutputRecord],
        destinations: Sequence[str],
        kinds: Mapping[str, frozenset[str]] | None = None,
        *,
        detail: str,
    ) -> Job: ...
    def record_findings(self, study_uid: str, revision: int, findings_json: str) -> None: ...
    def record_shadow(self, rows: Sequence[ShadowRow]) -> int: ...
    def shadow_rows(self) -> list[ShadowRow]: ...
    def findings(self, study_uid: str, revision: int) -> str | None: ...
    def open_consultation(self, job_id: int, created_by: str) -> Consultation: ...
    def consultation(self, consultation_id: int) -> Consultation: ...
    def consultations(self, job_id: int) -> list[Consultation]: ...
    def ask(self, consultation_id: int, question: str, asked_by: str, *, max_turns: int,
            token_budget: int) -> ConsultTurn: ...
    def turn(self, turn_id: int) -> ConsultTurn: ...
    def turns(self, consultation_id: int) -> list[ConsultTurn]: ...
    def study_tokens(self, study_uid: str) -> int: ...
    def claim_turn(self, owner: str, now: float) -> ConsultTurn | None: ...
    def write_answer(self, turn_id: int, owner: str, answer: str) -> None: ...
    def finish_turn(self, turn_id: int, owner: str, state: TurnState, answer: str, *, error: str | None = None,
                    prompt_tokens: int = 0, completion_tokens: int = 0) -> ConsultTurn: ...
    def give_up_turn(self, turn_id: int, error: str) -> bool: ...
    def answering_workers(self) -> set[str]: ...
    def fail_turns_of(self, owner: str, error: str) -> int: ...
    def mark_saved(self, consultation_id: int, sop_instance_uid: str) -> None: ...

    def ops_stats(self) -> OpsStats: ...
    def schema_version(self) -> str | None: ...
    def close(self) -> None: ...


JOB_COLUMNS = (
    "id, study_uid, state, revision, attempts, reason, source, instance_count, first_received_at, "
    "last_received_at, completed_at, created_at, updated_at, next_attempt_at, lease_owner, lease_until, "
    "pending_update, timings"
)


def job_from_row(row: Sequence[Any]) -> Job:
    """A ``jobs`` row (:data:`JOB_COLUMNS`) as a :class:`Job`; ``timings`` is JSON text (SQLite) or already
    decoded (PostgreSQL's ``jsonb``)."""
    r = tuple(row)
    timings = json.loads(r[17]) if isinstance(r[17], str | bytes) else r[17]
    return Job(
        id=int(r[0]),
        study_instance_uid=r[1],
        state=JobState(r[2]),
        revision=r[3],
        attempts=r[4],
        reason=r[5],
        source=r[6],
        instance_count=r[7],
        first_received_at=r[8],
        last_received_at=r[9],
        completed_at=r[10],
        created_at=r[11],
        updated_at=r[12],
        next_attempt_at=r[13],
        lease_owner=r[14],
        lease_until=r[15],
        pending_update=bool(r[16]),
        timings={str(k): float(v) for k, v in (timings or {}).items()},
    )
