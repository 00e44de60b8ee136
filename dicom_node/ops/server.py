"""Operations that run beside the listener in the receiving process: the HTTP side and retention.

:class:`NodeOps` wires the pieces to one receiver and job store; :class:`dicom_node.node.ReceivingNode`
starts and stops it with the listener.
"""

from __future__ import annotations

from dicom_node.config import NodeConfig
from dicom_node.delivery.webhook import WebhookNotifier
from dicom_node.ingest.receive import Receiver
from dicom_node.jobs.model import JobStore
from dicom_node.log import get_logger
from dicom_node.ops.metrics import NodeCollector, NodeSources
from dicom_node.ops.retention import RetentionTask
from dicom_node.ops.web import HttpServer, build_app
from dicom_node.ops.web.health import Readiness
from dicom_node.work.heartbeat import heartbeat_path

__all__ = ["NodeOps"]

log = get_logger(__name__)


class NodeOps:
    """Retention task, webhook notifier + HTTP server (health, metrics, jobs page) for one receiving node.

    Parameters
    ----------
    config
        ``[http]`` and ``[retention]`` are read.
    store
        The node's job store.
    receiver
        Its listener (counters, spool, audit trail).
    """

    def __init__(self, config: NodeConfig, store: JobStore, receiver: Receiver) -> None:
        self.config = config
        self.retention = RetentionTask(config, store, receiver.audit)
        self.webhook = WebhookNotifier(config, store) if config.notify.webhook_url else None
        self.readiness = Readiness(config, store, receiver.spool.free_bytes)
        self.collector = NodeCollector(
            NodeSources(store=store, receiver=receiver.stats, gate=receiver.gate.stats,
                        retention=self.retention.stats,
                        webhook=self.webhook.stats if self.webhook is not None else None,
                        heartbeat_file=heartbeat_path(config.node.data_dir),
                        free_bytes=receiver.spool.free_bytes, slots=receiver.spool.pool),
            store_cache_s=config.http.ready_cache_s,
        )
        self.http: HttpServer | None = None
        if config.http.enabled:
            app = build_app(config, self.readiness, self.collector, receiver.audit)
            self.http = HttpServer(app, config.http.host, config.http.port)
        self.http_port: int | None = None

    def start(self) -> None:
        self.retention.start()
        if self.webhook is not None:
            self.webhook.start()
        if self.http is not None:
            try:
                self.http_port = self.http.start()
            except (OSError, RuntimeError) as exc:
                # DICOM reception matters more than the dashboard: keep receiving, say so loudly
                log.error("http endpoint not started: health, metrics and jobs page unavailable",
                          host=self.config.http.host, port=self.config.http.port, error=str(exc))
                self.http = None

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        if self.webhook is not None:
            self.webhook.stop()
        self.retention.stop()
