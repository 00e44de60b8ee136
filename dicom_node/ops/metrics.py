"""Prometheus metrics of the node, served at ``/metrics`` by the receiving process.

Where each number comes from (the worker is another process, possibly on another host):

* **Listener counters** (instances received, duplicates, refused, bytes, associations, associations
  rejected by reason) live in the receiving process that serves ``/metrics``: they count since that
  process started, as Prometheus counters do.
* **Job metrics are derived from the job store** at scrape time (cached ``[http] ready_cache_s``), not
  kept in the worker: studies by state, the queue depth, the inference-seconds histogram (per analysed
  job: ``reporting − inferring`` of its latest analysis) and export attempts / retries / give-ups.  So
  they survive worker restarts, need no Prometheus multiprocess mode, and with a shared PostgreSQL
  store every node reports the same cluster-wide values (label them by scrape target, sum nothing).
* **Shadow-mode agreement** (:mod:`dicom_node.shadow`) is read from the job store the same way.
* **Worker liveness** comes from the worker's heartbeat file (:mod:`dicom_node.work.heartbeat`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node.delivery.webhook import WebhookStats
from dicom_node.ingest.receive import ReceiverStats
from dicom_node.ingest.slots import SlotPool
from dicom_node.jobs.model import JobState, JobStore, OpsStats
from dicom_node.network.access import GateStats
from dicom_node.ops.retention import RetentionStats
from dicom_node.shadow import ShadowSummary, summarise
from dicom_node.work.heartbeat import read_heartbeat

__all__ = ["INFERENCE_BUCKETS", "NodeCollector", "NodeSources", "render_metrics"]

#: Seconds: a demo model takes well under one, a 7B model on one GPU tens, a busy CPU fallback minutes.
INFERENCE_BUCKETS: tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900)


@dataclass
class NodeSources:
    """What the collector reads; any part may be absent (``None``)."""

    store: JobStore
    receiver: ReceiverStats | None = None
    gate: GateStats | None = None
    retention: RetentionStats | None = None
    webhook: WebhookStats | None = None
    heartbeat_file: Path | None = None
    free_bytes: Callable[[], int] | None = None
    slots: SlotPool | None = None


def _histogram(values: list[float]) -> tuple[list[tuple[str, float]], float]:
    values = sorted(values)
    buckets: list[tuple[str, float]] = []
    i = 0
    for bound in INFERENCE_BUCKETS:
        while i < len(values) and values[i] <= bound:
            i += 1
        buckets.append((str(float(bound)), float(i)))
    buckets.append(("+Inf", float(len(values))))
    return buckets, float(sum(values))


class NodeCollector(Collector):
    """A custom collector: reads its sources at scrape time.

    Parameters
    ----------
    sources
        The counters and the job store to read.
    store_cache_s
        How long one job-store snapshot is reused (scrapes from several Prometheus servers).
    """

    def __init__(self, sources: NodeSources, store_cache_s: float = 5.0) -> None:
        self.sources = sources
        self.store_cache_s = store_cache_s
        self._cached: tuple[float, OpsStats] | None = None
        self._shadow_cached: tuple[float, ShadowSummary] | None = None
        self._lock = threading.Lock()

    def _ops(self) -> OpsStats:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.store_cache_s:
                self._cached = (now, self.sources.store.ops_stats())
            return self._cached[1]

    def _shadow_summary(self) -> ShadowSummary:
        with self._lock:
            now = time.monotonic()
            if self._shadow_cached is None or now - self._shadow_cached[0] > self.store_cache_s:
                self._shadow_cached = (now, summarise(self.sources.store.shadow_rows()))
            return self._shadow_cached[1]

    def _shadow(self) -> Iterator[Metric]:
        s = self._shadow_summary()
        ratio = GaugeMetricFamily("spinemed_shadow_agreement_ratio",
                                  "Shadow mode: share of labelled cells where the node's grade equals the site's",
                                  labels=["condition"])
        compared = CounterMetricFamily("spinemed_shadow_compared",
                                       "Shadow mode: labelled cells compared (condition x level x study)",
                                       labels=["condition"])
        agreed = CounterMetricFamily("spinemed_shadow_agreed", "Shadow mode: labelled cells in agreement",
                                     labels=["condition"])
        for condition, a in s.by_condition.items():
            if a.ratio is not None:
                ratio.add_metric([condition], a.ratio)
            compared.add_metric([condition], a.n)
            agreed.add_metric([condition], a.agree)
        yield ratio
        yield compared
        yield agreed
        yield GaugeMetricFamily("spinemed_shadow_studies", "Shadow mode: studies compared", value=s.studies)

    def collect(self) -> Iterator[Metric]:
        s = self.sources
        if s.receiver is not None:
            r = s.receiver
            with r.lock:
                values = (r.stored, r.duplicates, r.refused, r.bytes, r.associations)
            yield CounterMetricFamily("spinemed_instances_received", "Instances stored (new SOP Instance UIDs)",
                                      value=values[0])
            yield CounterMetricFamily("spinemed_instances_duplicate", "Instances received again (already stored)",
                                      value=values[1])
            yield CounterMetricFamily("spinemed_instances_refused",
                                      "C-STORE requests answered with a failure status", value=values[2])
            yield CounterMetricFamily("spinemed_received_bytes", "Bytes of instances stored", value=values[3])
            yield CounterMetricFamily("spinemed_associations_accepted", "Associations accepted", value=values[4])
        if s.gate is not None:
            rejected = CounterMetricFamily("spinemed_associations_rejected", "Associations rejected, by reason",
                                           labels=["reason"])
            for reason, n in sorted(s.gate.snapshot().items()):
                rejected.add_metric([reason], n)
            yield rejected
        if s.retention is not None:
            ret = CounterMetricFamily("spinemed_retention_deleted_files", "Files deleted by retention, by kind",
                                      labels=["kind"])
            spool, outputs = s.retention.snapshot()
            ret.add_metric(["spool"], spool)
            ret.add_metric(["outputs"], outputs)
            yield ret
        if s.webhook is not None:
            sent, failures = s.webhook.snapshot()
            yield CounterMetricFamily("spinemed_webhook_sent", "Study-end notifications accepted by the webhook",
                                      value=sent)
            yield CounterMetricFamily("spinemed_webhook_failures", "Webhook POSTs not accepted (each retried)",
                                      value=failures)
        if s.slots is not None:
            ready, unsettled, received, spilled = s.slots.snapshot()
            yield GaugeMetricFamily("spinemed_receive_slots_ready", "Receive slots written ahead and ready",
                                    value=ready)
            yield GaugeMetricFamily("spinemed_receive_slots_unsettled",
                                    "Instances acknowledged in a slot, not yet at their spool path", value=unsettled)
            yield CounterMetricFamily("spinemed_instances_received_in_slots",
                                      "Instances received into a receive slot (the rest: no slot was ready)",
                                      value=received)
            yield CounterMetricFamily("spinemed_instances_spilled",
                                      "Instances larger than a receive slot, moved into a file of their own",
                                      value=spilled)
        if s.free_bytes is not None:
            yield GaugeMetricFamily("spinemed_spool_free_bytes", "Free bytes on the spool's file system",
                                    value=s.free_bytes())
        if s.heartbeat_file is not None:
            yield from self._worker()
        yield from self._jobs()
        yield from self._shadow()

    def _worker(self) -> Iterator[Metric]:
        assert self.sources.heartbeat_file is not None
        beat = read_heartbeat(self.sources.heartbeat_file)
        loaded = GaugeMetricFamily("spinemed_worker_model_loaded", "1 when the worker's last heartbeat says so")
        loaded.add_metric([], 1.0 if beat is not None and beat.model_loaded else 0.0)
        yield loaded
        up = GaugeMetricFamily("spinemed_model_backend_up",
                               "0 while the model backend fails with transient errors (studies wait, deferred)")
        up.add_metric([], 1.0 if beat is not None and beat.model_loaded and beat.model_available else 0.0)
        yield up
        if beat is not None:
            yield GaugeMetricFamily("spinemed_worker_heartbeat_age_seconds", "Age of the worker's last heartbeat",
                                    value=max(0.0, beat.age()))

    def _jobs(self) -> Iterator[Metric]:
        ops = self._ops()
        studies = GaugeMetricFamily("spinemed_studies", "Studies (jobs) by state, from the job store",
                                    labels=["state"])
        for state in JobState:
            studies.add_metric([state.value], float(ops.counts.get(state.value, 0)))
        yield studies
        yield GaugeMetricFamily("spinemed_queue_depth", "Complete studies waiting for the model",
                                value=float(ops.counts.get(JobState.COMPLETE.value, 0)))
        buckets, total = _histogram(ops.inference_seconds)
        yield HistogramMetricFamily("spinemed_inference_seconds",
                                    "Analysis time per study (inferring to reporting), from the job store",
                                    buckets=buckets, sum_value=total)
        yield CounterMetricFamily("spinemed_export_attempts", "Delivery attempts (per object and destination)",
                                  value=ops.delivery_attempts)
        yield CounterMetricFamily("spinemed_export_retries", "Failed delivery attempts that were retried",
                                  value=ops.delivery_failed_attempts - ops.deliveries_failed)
        yield CounterMetricFamily("spinemed_export_failures",
                                  "Deliveries that failed for good (ran out of attempts)", value=ops.deliveries_failed)
        yield CounterMetricFamily("spinemed_export_delivered", "Objects delivered (per destination)",
                                  value=ops.deliveries_delivered)


def render_metrics(collector: NodeCollector) -> bytes:
    """The Prometheus text exposition of ``collector`` (its own registry: no process-global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
