"""The listener: C-ECHO and C-STORE SCP.

The C-STORE handler does no slow work.  It checks the request, writes the bytes exactly as received
(with a file meta header) to the spool, fsyncs and renames, records the instance in the job store,
and only then answers Success.  Anything it cannot store durably is refused with a failure status,
so the sender keeps its copy and retries.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.access import AssociationGate
from dicom_node.audit import open_audit
from dicom_node.config import NodeConfig
from dicom_node.errors import SpoolError, StoreError
from dicom_node.log import get_logger, phi_hash
from dicom_node.net import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    nodelay_handlers,
    storage_contexts,
)
from dicom_node.spool import Spool
from dicom_node.store import InstanceRecord, JobStore
from dicom_node.tls import server_context

__all__ = ["Receiver", "ReceiverStats"]

log = get_logger(__name__)


@dataclass
class ReceiverStats:
    """Counters since start (also exported as metrics)."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes: int = 0
    associations: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


class Receiver:
    """C-STORE / C-ECHO SCP writing to a :class:`Spool` and a :class:`JobStore`.

    Parameters
    ----------
    config
        The node configuration (``[node]`` table).
    store
        Where received instances are recorded.
    """

    def __init__(self, config: NodeConfig, store: JobStore) -> None:
        self.config = config
        self.store = store
        self.spool = Spool(config.spool_dir)
        self.stats = ReceiverStats()
        self._server: ThreadedAssociationServer | None = None
        n = config.node
        ae = AE(ae_title=n.ae_title)
        ae.supported_contexts = storage_contexts()
        ae.maximum_associations = n.max_associations
        ae.acse_timeout = n.acse_timeout_s
        ae.dimse_timeout = n.dimse_timeout_s
        ae.network_timeout = n.network_timeout_s
        ae.require_called_aet = True
        # calling AE allow-list: pynetdicom rejects others with 'calling AE title not recognised'
        ae.require_calling_aet = list(n.allowed_calling_aes)
        self.ae = ae
        # operations: audit trail, association gate (source addresses, low disk), DICOM TLS
        self.audit = open_audit(config)
        self.gate = AssociationGate(config, self.spool.free_bytes, self.audit)
        self.ssl_context = server_context(config.tls) if config.tls.enabled else None

    # ------------------------------------------------------------------ handlers
    def handlers(self) -> list[Any]:
        """All event handlers, registered in one place."""
        return [
            *nodelay_handlers(),
            *self.gate.handlers(),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store_audited),
        ]

    def _on_store_audited(self, event: Any) -> int | tuple[int, Dataset]:
        result = self._on_store(event)
        status = result[0] if isinstance(result, tuple) else result
        self.audit.record("instance_received", **_audit_fields(event), status=f"0x{status:04X}",
                          outcome="stored" if status == STATUS_SUCCESS else "refused")
        return result

    def _on_accepted(self, event: Any) -> None:
        self.stats.add(associations=1)

    def _on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _low_disk(self) -> bool:
        return self.spool.free_bytes() < self.config.node.min_free_disk_mb * 1024 * 1024

    def _on_store(self, event: Any) -> int | tuple[int, Dataset]:
        calling = event.assoc.requestor.ae_title.strip()
        if self._low_disk():
            self.stats.add(refused=1)
            log.error("instance refused: spool disk below min_free_disk_mb", calling_ae=calling)
            return STATUS_OUT_OF_RESOURCES
        req = event.request
        try:
            ds = event.dataset
            sop_uid = str(ds.SOPInstanceUID)
            sop_class = str(ds.SOPClassUID)
            study_uid = str(ds.StudyInstanceUID)
            series_uid = str(ds.SeriesInstanceUID)
            modality = str(ds.get("Modality", "") or "")
            series_desc = str(ds.get("SeriesDescription", "") or "")
        except Exception as exc:
            self.stats.add(refused=1)
            log.warning(
                "instance refused: cannot decode dataset",
                calling_ae=calling,
                error=type(exc).__name__,
                # pydicom's messages quote element values (names, IDs): only a digest, for correlation
                detail_digest=phi_hash(str(exc)),
            )
            return STATUS_CANNOT_UNDERSTAND
        if sop_uid != str(req.AffectedSOPInstanceUID) or sop_class != str(req.AffectedSOPClassUID):
            self.stats.add(refused=1)
            log.warning(
                "instance refused: dataset UIDs differ from the C-STORE request",
                calling_ae=calling,
                sop=phi_hash(sop_uid),
            )
            return STATUS_DATASET_MISMATCH
        try:
            data = event.encoded_dataset(include_meta=True)
            path = self.spool.write(study_uid, sop_uid, data)
            fresh = self.store.record_instance(
                InstanceRecord(
                    sop_instance_uid=sop_uid,
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    sop_class_uid=sop_class,
                    modality=modality,
                    series_description=series_desc,
                    path=str(path),
                    transfer_syntax_uid=str(event.context.transfer_syntax),
                    size=len(data),
                    calling_ae=calling,
                    received_at=time.time(),
                )
            )
        except SpoolError as exc:
            self.stats.add(refused=1)
            log.error("instance refused: spool write failed", calling_ae=calling, detail=str(exc))
            return STATUS_OUT_OF_RESOURCES
        except (StoreError, OSError) as exc:
            self.stats.add(refused=1)
            log.error("instance refused: job store write failed", calling_ae=calling, detail=str(exc))
            return STATUS_OUT_OF_RESOURCES
        if fresh:
            self.stats.add(stored=1, bytes=len(data))
        else:
            self.stats.add(duplicates=1)
        return STATUS_SUCCESS

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> int:
        """Start listening in background threads; returns the bound port."""
        n = self.config.node
        server = self.ae.start_server((n.host, n.port), block=False, evt_handlers=self.handlers(),
                                      ssl_context=self.ssl_context)
        assert server is not None  # block=False always returns the server
        self._server = server
        port = int(server.server_address[1])
        log.info("listening", ae_title=n.ae_title, host=n.host, port=port, tls=self.ssl_context is not None)
        return port

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("receiver not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.audit.close()


def _audit_fields(event: Any) -> dict[str, Any]:
    """Who sent what, for the audit trail: calling AE, peer address, hashed study and instance UIDs."""
    req = event.request
    try:
        study = phi_hash(str(event.dataset.StudyInstanceUID))
    except Exception as exc:  # an undecodable dataset is audited as such (the handler refused it)
        study = f"undecodable ({type(exc).__name__})"
    return {
        "calling_ae": str(event.assoc.requestor.ae_title).strip(),
        "peer_ip": str(event.assoc.requestor.address),
        "study": study,
        "sop": phi_hash(str(req.AffectedSOPInstanceUID)),
    }
