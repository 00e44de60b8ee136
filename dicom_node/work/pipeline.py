"""The pipeline, composed in one visible place:

    screen (inference.screening: undecodable instances left out, with reasons) → select (routing rules)
    → preprocess (inference.preprocess; the prior's findings as clinical context) → predict (a SpineModel
    backend) → compare (inference.comparison, with the prior the worker looked up) → report (sr_templates)
    → [export: the worker, durable and retried]

Each stage is a plain function with typed inputs and outputs.  ``spinemed-node analyze`` runs the
same :class:`Pipeline` on files, without network or job store.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from dicom_node.config import NodeConfig
from dicom_node.jobs.rules import Selection, select_series
from dicom_node.log import get_logger
from inference.errors import UnusableStudyError
from inference.screening import Exclusion, screen_study
from inference.study import Study

if TYPE_CHECKING:
    from dicom_node.work.priors import PriorLookup
    from inference.comparison import Comparison
    from inference.findings import SpineFindings
    from inference.inputs import SpineModel
    from sr_templates import OutputOptions

__all__ = ["Outcome", "Pipeline", "describe_exclusions", "output_kind"]

log = get_logger(__name__)


@dataclass
class Outcome:
    """What one pipeline run produced."""

    selection: Selection
    findings: SpineFindings | None = None
    datasets: list[Dataset] = field(default_factory=list)
    skipped_reason: str | None = None
    #: instances left out before the model (undecodable pixels), each with its reason
    excluded: tuple[Exclusion, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)
    #: the comparison with the prior study (``None``: priors not configured)
    comparison: Comparison | None = None


def describe_exclusions(excluded: Sequence[Exclusion]) -> str:
    """``"7 instances excluded: pixel data truncated (7)"``: a job reason, no identifiers."""
    counts: dict[str, int] = {}
    for e in excluded:
        kind = e.reason.split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    parts = ", ".join(f"{k} ({n})" for k, n in sorted(counts.items()))
    return f"{len(excluded)} instance{'s' if len(excluded) != 1 else ''} excluded: {parts}"


def output_kind(ds: Dataset) -> str:
    """``measurement_report`` (TID 1500), ``narrative_report`` (other SR), ``key_object_selection``
    (KO), ``pdf_report`` (Encapsulated PDF) or ``key_image``."""
    sop_class = str(ds.SOPClassUID)
    modality = str(ds.get("Modality", ""))
    if sop_class == Comprehensive3DSRStorage:
        return "measurement_report"
    if modality == "SR":
        return "narrative_report"
    if modality == "KO":
        return "key_object_selection"
    if modality == "DOC":
        return "pdf_report"
    return "key_image"


class Pipeline:
    """select → preprocess → predict → report, with the model loaded once.

    Parameters
    ----------
    config
        The node configuration.
    model
        A loaded model; ``None`` loads the configured backend on first use.
    """

    def __init__(self, config: NodeConfig, model: SpineModel | None = None) -> None:
        from pydicom.sr.coding import Code

        from sr_templates.codes import apply_site_codes

        self.config = config
        self._model = model
        # a model that does not declare itself safe for concurrent calls (``concurrent = True``: the openai
        # backend, whose server batches them) is used by one analysis thread at a time
        self._model_lock = threading.Lock()
        # the site's terminology, process-wide: one node, one config
        apply_site_codes({k: Code(c.value, c.scheme, c.meaning) for k, c in config.output.codes.items()})

    @property
    def model(self) -> SpineModel:
        if self._model is None:
            from inference.backends import load_model

            self._model = load_model(self.config.model, data_dir=self.config.node.data_dir)
        return self._model

    def close(self) -> None:
        """Release the model if it holds resources of its own (``[model] process``: stop its process)."""
        close = getattr(self._model, "close", None)
        if callable(close):
            close()

    def output_options(self) -> OutputOptions:
        from sr_templates import OutputOptions

        o = self.config.output
        return OutputOptions(
            institution_name=o.institution_name,
            institution_department_name=o.institution_department_name,
            series_number=o.series_number,
            key_image=o.key_image,
            pdf=o.pdf,
            uid_prefix=o.uid_prefix,
        )

    def warm_up(self) -> float:
        """Pay the one-time costs of the stages before the first study (as the model load is): import the
        preprocessing and report code (SimpleITK, pydicom's pixel handlers, highdicom) and load the tables
        highdicom reads on first use.  Returns the seconds it took.
        """
        import importlib

        t0 = time.perf_counter()
        modules = ("inference.preprocess", "inference.pixels", "inference.geometry", "sr_templates", "SimpleITK",
                   "pydicom.pixels.processing", "PIL.Image")
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:  # the stage that needs it reports it
                log.warning("warm-up: module not importable", module=name)
        try:  # highdicom's IOD / module tables (parsed JSON, cached by highdicom on first use: ~0.4 s)
            standard = importlib.import_module("highdicom._standard_utils")
            for loader in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
                getattr(standard, loader)()
        except (ImportError, AttributeError, OSError, ValueError):
            pass  # a highdicom without these private helpers: it loads them on first use instead
        # what is loaded now lives as long as the worker: keep the garbage collector from walking its
        # millions of objects (highdicom's tables) again in a full collection during the first studies
        gc.collect()
        gc.freeze()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ stages
    def select(self, study: Study) -> Selection:
        return select_series(study, self.config.routing.rules)

    def run(self, study: Study, *, revision: int = 1, predecessors: Sequence[Dataset] = (),
            prior: PriorLookup | None = None) -> Outcome:
        """Run every stage but export.

        ``prior`` (from :func:`dicom_node.work.priors.look_up_prior`, ``None`` when priors are off): its
        findings go to the model as clinical context and the report states the change since; without a
        prior report, the report says why there is no comparison.

        Raises
        ------
        inference.errors.InferenceError
            The study could not be analysed (unusable images, model failure, time-out).
        """
        from dataclasses import replace

        from dicom_node.work.priors import study_date
        from inference.comparison import Comparison, compare_with_prior, comparison_context
        from inference.preprocess import prepare_inputs
        from sr_templates import build_outputs

        t0 = time.perf_counter()
        screened = screen_study(study)
        if screened.excluded:
            log.warning("instances excluded before the model", excluded=len(screened.excluded),
                        reasons=sorted({e.reason.split(":")[0] for e in screened.excluded}))
        if not screened.study.instances:
            raise UnusableStudyError(f"no usable images: {describe_exclusions(screened.excluded)}",
                                     excluded=screened.excluded)
        study = screened.study
        selection = self.select(study)
        outcome = Outcome(selection=selection, excluded=screened.excluded)
        if not selection.series_uids:
            outcome.skipped_reason = selection.skip_reason
            return outcome
        t1 = time.perf_counter()
        inputs = prepare_inputs(study, selection.series_uids, self.config.model, self.model.image_size)
        current_date = study_date(study)
        if prior is not None and prior.report is not None:
            inputs = replace(inputs, clinical_context=" ".join(
                filter(None, (inputs.clinical_context, comparison_context(prior.report, current_date)))))
        model = self.model
        with contextlib.nullcontext() if getattr(model, "concurrent", False) else self._model_lock:
            t2 = time.perf_counter()  # (a wait for another thread's study is not this study's predict time)
            findings = model.analyze(inputs)
        t3 = time.perf_counter()
        comparison: Comparison | None = None
        if prior is not None:
            comparison = (compare_with_prior(findings.levels, prior.report, current_date) if prior.report is not None
                          else Comparison.without_prior(prior.reason or "unknown"))
        datasets = build_outputs(study, findings, self.output_options(), revision=revision, predecessors=predecessors,
                                 comparison=comparison)
        t4 = time.perf_counter()
        outcome.findings = findings
        outcome.comparison = comparison
        outcome.datasets = list(datasets)
        outcome.seconds = {"select": t1 - t0, "preprocess": t2 - t1, "predict": t3 - t2, "report": t4 - t3}
        return outcome
