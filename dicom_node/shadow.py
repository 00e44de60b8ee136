"""Shadow mode: how often the node's findings agree with the site's own results.

A node in dry run (``[routing] dry_run = true``: it exports nothing) analyses live traffic; the site drops
its own results as per-level label CSVs (the format of :func:`inference.validation.labels.load_own_csv`,
``study`` = Study Instance UID) into ``[shadow] labels_dir``.  The worker looks there every
``[shadow] poll_s`` between studies; for each labelled study the node has analysed it compares every
labelled condition and level with the findings it kept for the study's current revision (the same
comparison as ``spinemed-node validate``: the highest grade of the matching findings, normal/mild where
there is none) and records one :class:`~dicom_node.jobs.model.ShadowRow` per cell in the job store, the
study named by its pseudonym (the keyed digest the logs use).

A radiologist's TID 1500 SR sent to the node over DICOM for a study the node knows is truth too: the
instance indexer (:mod:`dicom_node.ingest.indexer`) moves it from the spool into ``labels_dir`` as
``sr-<digest>.dcm`` instead of recording it as an instance, so it never re-opens the study for another
analysis; our own SRs routed back are recognised (:func:`dicom_node.network.priors.is_our_report`) and
ignored as before.  The watcher reads it with :func:`inference.validation.labels.load_sr`.

Each file ends in ``done/`` or ``failed/`` beside a ``<name>.reason.txt`` that says what was compared
and what was not.  A file naming a study the node is still receiving or analysing stays until ``[shadow]
wait_s`` after it was written, then is processed with what there is; a study the node never received is
reported at once.  Write label files
elsewhere and move them in (a rename), so that the worker never reads half a file.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from dicom_node.config import NodeConfig
from dicom_node.errors import JobNotFoundError
from dicom_node.jobs.model import FINAL_STATES, JobStore, ShadowRow
from dicom_node.log import get_logger, phi_hash
from inference.findings import SpineFindings
from inference.validation.labels import LabelError, StudyTruth, load_own_csv, load_sr
from inference.validation.metrics import CaseInput, score_case

__all__ = ["Agreement", "ShadowSummary", "ShadowWatcher", "compare", "iso_week", "summarise"]

log = get_logger(__name__)

#: A file changed this recently may still be being written: it waits for the next look.
_SETTLE_S: Final = 1.0


def compare(truth: StudyTruth, findings: SpineFindings, *, study: str, revision: int, now: float,
            source: str) -> list[ShadowRow]:
    """The shadow rows of one labelled study: each labelled cell of a condition the model assesses.

    Parameters
    ----------
    truth
        The site's labels of the study.
    findings
        What the node found (its kept findings of ``revision``).
    study
        The study's pseudonym.
    revision, now, source
        Recorded with each row.
    """
    score = score_case(CaseInput(0, truth, findings))
    return [ShadowRow(study, revision, row.condition.name, row.level, int(row.truth), int(row.predicted), now, source)
            for row in score.rows if row.predicted is not None]


@dataclass
class Agreement:
    """Comparisons and agreements of one group."""

    n: int = 0
    agree: int = 0

    @property
    def ratio(self) -> float | None:
        return self.agree / self.n if self.n else None

    def add(self, row: ShadowRow) -> None:
        self.n += 1
        self.agree += int(row.agree)


def iso_week(t: float) -> str:
    """The ISO week (UTC) of a time: ``"2026-W49"``."""
    year, week, _ = dt.datetime.fromtimestamp(t, dt.UTC).isocalendar()
    return f"{year}-W{week:02d}"


@dataclass
class ShadowSummary:
    """Running agreement: in all, per condition, per condition and level, per ISO week; no identifiers."""

    total: Agreement = field(default_factory=Agreement)
    studies: int = 0
    by_condition: dict[str, Agreement] = field(default_factory=dict)
    by_level: dict[tuple[str, str], Agreement] = field(default_factory=dict)
    by_week: dict[str, Agreement] = field(default_factory=dict)


def summarise(rows: Sequence[ShadowRow]) -> ShadowSummary:
    """Aggregate shadow rows (groups sorted by name, levels cranio-caudally, weeks in time order)."""
    from inference.findings import level_sort_key

    out = ShadowSummary()
    studies: set[str] = set()
    for r in rows:
        studies.add(r.study)
        out.total.add(r)
        out.by_condition.setdefault(r.condition, Agreement()).add(r)
        out.by_level.setdefault((r.condition, r.level), Agreement()).add(r)
        out.by_week.setdefault(iso_week(r.recorded_at), Agreement()).add(r)
    out.studies = len(studies)
    out.by_condition = dict(sorted(out.by_condition.items()))

    def level_key(k: tuple[str, str]) -> tuple[str, int, str]:
        try:
            return (k[0], level_sort_key(k[1]), k[1])
        except KeyError:
            return (k[0], 10_000, k[1])

    out.by_level = dict(sorted(out.by_level.items(), key=lambda kv: level_key(kv[0])))
    out.by_week = dict(sorted(out.by_week.items()))
    return out


class ShadowWatcher:
    """Process the label files dropped in ``[shadow] labels_dir`` (see the module's description).

    Parameters
    ----------
    config
        The node's configuration (``[shadow]``).
    store
        The job store: the findings kept per analysis, and where the rows go.
    """

    def __init__(self, config: NodeConfig, store: JobStore) -> None:
        self.config = config
        self.store = store
        self._next = 0.0

    @property
    def enabled(self) -> bool:
        return self.config.shadow.labels_dir is not None

    def due(self, now: float) -> bool:
        """Whether a look into the folder is due (every ``poll_s``)."""
        return self.enabled and now >= self._next

    def poll(self, now: float | None = None) -> int:
        """Look into the folder if due; returns the number of files finished (done or failed)."""
        now = time.time() if now is None else now
        if not self.due(now):
            return 0
        self._next = now + self.config.shadow.poll_s
        return self.scan(now)

    def scan(self, now: float | None = None) -> int:
        """Process every settled label file in the folder now; returns the number finished."""
        folder = self.config.shadow.labels_dir
        if folder is None:
            return 0
        now = time.time() if now is None else now
        folder.mkdir(parents=True, exist_ok=True)
        finished = 0
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in (".csv", ".dcm"):
                continue
            try:
                written = path.stat().st_mtime
            except FileNotFoundError:
                continue  # taken by another worker
            if now - written < _SETTLE_S:
                continue
            finished += self._process(folder, path, written, now)
        return finished

    def _claim(self, folder: Path, path: Path) -> Path | None:
        claimed = folder / "processing" / f"{os.getpid()}-{path.name}"
        claimed.parent.mkdir(exist_ok=True)
        try:
            os.rename(path, claimed)  # atomic: one worker takes the file
        except FileNotFoundError:
            return None
        return claimed

    def _finish(self, folder: Path, claimed: Path, original: str, outcome: str, reason: str, now: float) -> None:
        target_dir = folder / outcome
        target_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        target = target_dir / f"{stamp}-{original}"
        os.replace(claimed, target)
        target.with_name(target.name + ".reason.txt").write_text(reason + "\n", encoding="utf-8")

    def _process(self, folder: Path, path: Path, written: float, now: float) -> int:
        claimed = self._claim(folder, path)
        if claimed is None:
            return 0
        sr = claimed.suffix.lower() == ".dcm"
        try:
            truth = load_sr(claimed) if sr else load_own_csv(claimed)
        except LabelError as exc:
            log.warning("shadow label file refused", reason=str(exc)[:300])
            self._finish(folder, claimed, path.name, "failed", f"not read: {exc}", now)
            return 1
        compared: list[tuple[StudyTruth, SpineFindings, str, int]] = []
        unknown: list[str] = []
        pending: list[str] = []
        not_analysed: list[str] = []
        for key, study_truth in truth.studies.items():
            uid = study_truth.study_instance_uid or key
            ref = phi_hash(uid)
            try:
                job = self.store.by_study(uid)
            except JobNotFoundError:
                unknown.append(ref)
                continue
            text = self.store.findings(job.study_instance_uid, job.revision) if job.revision >= 1 else None
            if text is None:
                (not_analysed if job.state in FINAL_STATES else pending).append(ref)
                continue
            compared.append((study_truth, SpineFindings.model_validate_json(text), ref, job.revision))
        if pending and now - written < self.config.shadow.wait_s:
            os.rename(claimed, path)  # back, to wait for the studies still being worked on / received
            return 0
        rows = [r for t, f, ref, revision in compared for r in compare(t, f, study=ref, revision=revision, now=now,
                                                                       source="sr" if sr else "csv")]
        self.store.record_shadow(rows)
        agree = sum(r.agree for r in rows)
        lines = [f"{len(compared)} of {len(truth.studies)} studies compared: {len(rows)} labelled cells, "
                 f"{agree} agree"]
        for what, refs in (("unknown to this node (never received)", unknown),
                           ("not analysed (skipped or failed)", not_analysed),
                           (f"still not analysed after {self.config.shadow.wait_s:g} s", pending)):
            if refs:
                lines.append(f"{len(refs)} {what}: " + ", ".join(refs))
        lines.append("studies are named by their pseudonym (the digest the logs use)")
        outcome = "done" if compared else "failed"
        self._finish(folder, claimed, path.name, outcome, "\n".join(lines), now)
        log.info("shadow labels processed", outcome=outcome, studies=len(compared), cells=len(rows), agree=agree,
                 unknown=len(unknown), not_analysed=len(not_analysed) + len(pending))
        return 1
