"""``spinemed-node validate``: the node's pipeline run on a site's labelled cases (inference.validation).

The analysis is the real :class:`~dicom_node.work.pipeline.Pipeline` (screening, routing rules,
preprocessing, the configured backend, the SR builder), on files, without network or job store, as
``spinemed-node analyze`` does.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.config import NodeConfig
from dicom_node.log import get_logger
from dicom_node.work.pipeline import Pipeline
from inference.errors import InferenceError
from inference.findings import SpineFindings
from inference.inputs import SpineModel
from inference.study import Study
from inference.validation.labels import load_labels
from inference.validation.run import Analyser, ValidationResult, validate_cases

__all__ = ["pipeline_analyser", "run_validation"]

log = get_logger(__name__)


def pipeline_analyser(pipeline: Pipeline) -> Analyser:
    """The pipeline as a validation analyser: findings, or why a study was not analysed.

    A permanent analysis error (unusable study, an answer that never validates) is that study's reason; a
    transient one (the model down, out of GPU memory, too slow) stops the run: it says nothing of the
    study, and every later study would meet it too.
    """

    def analyse(study: Study) -> SpineFindings | str:
        try:
            outcome = pipeline.run(study)
        except InferenceError as exc:
            if exc.transient:
                raise
            log.warning("validation: study not analysed", error=type(exc).__name__)
            return f"{type(exc).__name__}: {exc}"
        if outcome.findings is None:
            return f"skipped: {outcome.skipped_reason or 'no series selected'}"
        return outcome.findings

    return analyse


def run_validation(
    config: NodeConfig,
    cases: Path,
    labels: Path,
    out: Path,
    *,
    labels_format: str = "auto",
    model: SpineModel | None = None,
    resamples: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> ValidationResult:
    """Read ``labels``, run the pipeline (``model``, else the configured backend) on every labelled study
    under ``cases`` and write ``report.html``, ``metrics.json`` and ``cases.csv`` to ``out``.

    Raises
    ------
    inference.validation.labels.LabelError
        The labels cannot be read.
    ValueError
        ``cases`` is not a folder or holds no labelled study.
    inference.errors.InferenceError
        A transient model error (the backend is down): the run stops.
    """
    truth = load_labels(labels, labels_format)
    pipeline = Pipeline(config, model=model)
    return validate_cases(cases, truth, pipeline_analyser(pipeline), out, resamples=resamples, seed=seed,
                          progress=progress)
