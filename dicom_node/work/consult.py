"""Consultation turns, answered by the worker's model between studies.

The web process queues a question as a ``consult_turns`` row (:meth:`JobStore.ask`); the worker — the only
process with the model — claims it before its next study (a study in progress is never interrupted),
re-prepares the study's model images from its spool files with the analysis's own preprocessing, and asks
the model with the study's findings and the consultation's prior turns.  The answer's text is written into
the row as it is generated (at most every :data:`WRITE_INTERVAL_S`), so the web side streams it by reading
the row; the turn ends ``answered`` (with its token counts) or ``failed`` with a reason for the person who
asked.  Every answer is written to the audit trail (the question was, when it was asked).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Final

from dicom_node.config import NodeConfig
from dicom_node.errors import ConsultationError
from dicom_node.jobs.model import ConsultTurn, JobStore, TurnState
from dicom_node.log import get_logger, phi_hash, redact
from dicom_node.ops.audit import AuditTrail
from inference.errors import InferenceError
from inference.findings import SpineFindings
from inference.inputs import ModelInput, Turn
from inference.study import StudyError

if TYPE_CHECKING:
    from dicom_node.work.pipeline import Pipeline

__all__ = ["WRITE_INTERVAL_S", "ConsultationServer", "audit_text"]

log = get_logger(__name__)

#: How often an answer in progress is written to its row (the web side streams from there).
WRITE_INTERVAL_S: Final = 0.1
#: Studies whose model images are kept prepared between turns (a consultation asks several in a row).
_CACHED_STUDIES: Final = 2


def audit_text(text: str, limit: int = 4000) -> str:
    """A question or answer as the audit trail keeps it: UIDs and ``Family^Given`` names replaced by their
    digest (a person may type an identifier into a question), at most ``limit`` characters."""
    return redact(text)[:limit]


class ConsultationServer:
    """Answers queued consultation turns with the worker's pipeline and model.

    Parameters
    ----------
    config
        The node configuration (``[consultation]``, ``[model]``).
    store
        The job store holding the turn queue.
    pipeline
        The worker's pipeline (its loaded model and routing rules).
    audit
        The worker's audit trail.
    owner
        The worker's lease owner name (recorded on each turn it answers).
    """

    def __init__(self, config: NodeConfig, store: JobStore, pipeline: Pipeline, audit: AuditTrail,
                 owner: str) -> None:
        self.config = config
        self.store = store
        self.pipeline = pipeline
        self.audit = audit
        self.owner = owner
        self._inputs: OrderedDict[tuple[str, int], tuple[ModelInput, SpineFindings]] = OrderedDict()

    def serve_pending(self, limit: int = 32) -> int:
        """Answer queued turns, oldest first, up to ``limit``; returns how many were taken."""
        n = 0
        while n < limit and self.serve_one():
            n += 1
        return n

    def serve_one(self) -> bool:
        """Claim and answer one queued turn; ``False`` when none waits."""
        turn = self.store.claim_turn(self.owner, time.time())
        if turn is None:
            return False
        try:
            self._answer(turn)
        except ConsultationError as exc:
            self._end(turn, TurnState.FAILED, "", str(exc))
        except (InferenceError, StudyError) as exc:
            log.warning("consultation turn failed", turn=turn.id, error=type(exc).__name__)
            self._end(turn, TurnState.FAILED, "",
                      f"the model could not answer: {type(exc).__name__}: {redact(str(exc))}")
        except Exception as exc:  # the worker goes on with the queue; the person sees the reason
            log.exception("consultation turn failed with an internal error", turn=turn.id)
            self._end(turn, TurnState.FAILED, "", f"internal error: {type(exc).__name__}")
        return True

    def _end(self, turn: ConsultTurn, state: TurnState, answer: str, error: str | None, prompt_tokens: int = 0,
             completion_tokens: int = 0, seconds: float | None = None) -> None:
        done = self.store.finish_turn(turn.id, self.owner, state, answer, error=error, prompt_tokens=prompt_tokens,
                                      completion_tokens=completion_tokens)
        c = self.store.consultation(turn.consultation_id)
        self.audit.record(
            "consultation_answer",
            study=phi_hash(c.study_instance_uid),
            job=c.job_id,
            consultation=c.id,
            turn=turn.seq,
            user=turn.asked_by,
            outcome=str(done.state),
            answer=audit_text(answer),
            error=error,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            seconds=None if seconds is None else round(seconds, 3),
        )

    def _prepared(self, study_uid: str, revision: int) -> tuple[ModelInput, SpineFindings]:
        key = (study_uid, revision)
        if key in self._inputs:
            self._inputs.move_to_end(key)
            return self._inputs[key]
        from inference.preprocess import prepare_inputs
        from inference.screening import screen_study
        from inference.study import load_study

        stored = self.store.findings(study_uid, revision)
        if stored is None:
            raise ConsultationError("this analysis's findings were not kept (analysed by an older version of the "
                                    "node): retry the job to analyse it again, then consult it")
        findings = SpineFindings.model_validate_json(stored)
        records = self.store.instances(study_uid)
        paths = [r.path for r in records if r.unusable_reason is None]
        if not paths or not all(Path(p).is_file() for p in paths):
            raise ConsultationError("the study's images are no longer on the node (removed by retention after "
                                    "delivery, [retention] keep_spool_hours): the model cannot look at them again")
        study = screen_study(load_study(paths, study_instance_uid=study_uid)).study
        selection = self.pipeline.select(study)
        if not selection.series_uids:
            raise ConsultationError("no series of the study is one the model reads (routing rules)")
        inputs = prepare_inputs(study, selection.series_uids, self.config.model, self.pipeline.model.image_size)
        self._inputs[key] = (inputs, findings)
        while len(self._inputs) > _CACHED_STUDIES:
            self._inputs.popitem(last=False)
        return inputs, findings

    def _answer(self, turn: ConsultTurn) -> None:
        cfg = self.config.consultation
        c = self.store.consultation(turn.consultation_id)
        job = self.store.get(c.job_id)
        if job.revision != c.revision:
            raise ConsultationError("the study was analysed again since this consultation began: start a new one")
        history = [Turn(t.question, t.answer) for t in self.store.turns(c.id)
                   if t.seq < turn.seq and t.state is TurnState.ANSWERED]
        remaining = cfg.token_budget - self.store.study_tokens(c.study_instance_uid)
        if remaining <= 0:
            raise ConsultationError(f"token budget spent ({cfg.token_budget} tokens for this study)")
        started = time.monotonic()
        inputs, findings = self._prepared(c.study_instance_uid, c.revision)
        text: list[str] = []
        last_write = time.monotonic()

        def on_text(piece: str) -> None:
            nonlocal last_write
            text.append(piece)
            if time.monotonic() - last_write >= WRITE_INTERVAL_S:
                self.store.write_answer(turn.id, self.owner, "".join(text))
                last_write = time.monotonic()

        answer = self.pipeline.model.consult(inputs, findings, history, turn.question, on_text,
                                             max_new_tokens=max(1, min(cfg.max_answer_tokens, remaining)))
        seconds = time.monotonic() - started
        body = answer.text
        if answer.truncated:
            body += " […]"
        log.info("consultation turn answered", turn=turn.id, seconds=round(seconds, 3),
                 prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens)
        self._end(turn, TurnState.ANSWERED, body, None, answer.prompt_tokens, answer.completion_tokens, seconds)
