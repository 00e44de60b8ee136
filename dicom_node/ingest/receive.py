"""The receiving service: C-ECHO and C-STORE on the node's listener.

The C-STORE path does no slow work.  Data set fragments are written to a receive slot
(:mod:`dicom_node.ingest.slots`) or the spool's ``.incoming/`` as they arrive; once the data set is complete
it is checked (decodable, UIDs as in the request) and made durable — one flush of its slot, or fsynced
and linked into place — and only then is Success answered.  Once its spool file is in place the job
store and the audit trail are written from it by the indexer in batches (group commit,
:mod:`dicom_node.ingest.indexer`); after a crash, unsettled slots are settled and the spool reconciled with
the job store.  Anything that cannot be
stored durably is refused with a failure status, so the sender keeps its copy and retries.  The
protocol side is :mod:`dicom_node.network.listener`.
"""

from __future__ import annotations

import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydicom.filereader import read_partial

from dicom_node.config import NodeConfig
from dicom_node.errors import SpoolError
from dicom_node.ingest.header import HeaderFields, scan_header
from dicom_node.ingest.indexer import InstanceIndexer, instance_record, reconcile
from dicom_node.ingest.slots import Claims, SlotPool, SlotSink, SpilledFile
from dicom_node.ingest.spool import UID_PATTERN, Incoming, Spool, SpoolFile, Stored, part10_header
from dicom_node.jobs.model import JobStore
from dicom_node.log import get_logger, phi_hash
from dicom_node.network.acceptor import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, Rejection
from dicom_node.network.access import REJECT_SOURCE_ADDRESS, AssociationGate
from dicom_node.network.association import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_INVALID_INSTANCE,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    storage_contexts,
)
from dicom_node.network.listener import AssociationInfo, DatasetSink, Listener, ListenerSettings, StoreRequest
from dicom_node.network.tls import server_context
from dicom_node.ops.audit import open_audit

__all__ = ["HostRecovery", "Receiver", "ReceiverStats", "recover_host"]

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


@dataclass(frozen=True)
class _Refused:
    """The sink of an instance refused before its data set arrived: its data set is read and dropped, then
    ``status`` goes back and ``event`` (with ``level``) names the cause in the log."""

    status: int
    event: str
    level: str = "warning"
    detail: str | None = None

    def write(self, data: memoryview) -> None:
        pass

    def discard(self) -> None:
        pass


_LOW_DISK = _Refused(STATUS_OUT_OF_RESOURCES, "instance refused: spool disk below min_free_disk_mb", "error")


def _meta_length(head: bytes | bytearray) -> int:
    """Bytes taken by the preamble and the File Meta Information we wrote (its group length is at 140)."""
    return 144 + int(struct.unpack_from("<I", head, 140)[0])


def _past_series_uid(tag: int, vr: str | None, length: int) -> bool:
    return tag > 0x0020000E


def _read_header(sink: Incoming) -> HeaderFields:
    """The listener's attributes read by pydicom, up to Series Instance UID (the rest is read later)."""
    with sink.open() as fp:
        return HeaderFields.from_dataset(read_partial(fp, stop_when=_past_series_uid))


class Receiver:
    """The storage service of the listener, writing to a :class:`Spool` and a :class:`JobStore`.

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
        self.spool = Spool(config.spool_dir, slots=config.node.receive_slots,
                           keep_free_bytes=config.node.min_free_disk_mb << 20)
        self.stats = ReceiverStats()
        # operations: audit trail, association gate (source addresses, low disk), DICOM TLS
        self.audit = open_audit(config)
        self.gate = AssociationGate(config, self.spool.free_bytes, self.audit)
        self.indexer = InstanceIndexer(store, self.audit, truth_dir=config.shadow.labels_dir)
        self._sync_pool = ThreadPoolExecutor(max_workers=min(32, config.node.max_associations),
                                             thread_name_prefix="fsync")
        n = config.node
        self.listener = Listener(
            ListenerSettings(
                ae_title=n.ae_title,
                host=n.host,
                port=n.port,
                contexts=storage_contexts(),
                allowed_calling_aes=list(n.allowed_calling_aes),
                max_associations=n.max_associations,
                acse_timeout_s=n.acse_timeout_s,
                network_timeout_s=n.network_timeout_s,
                max_pending=n.max_pending_connections,
                max_pending_per_source=n.max_pending_per_source,
                ssl_context=server_context(config.tls) if config.tls.enabled else None,
            ),
            self,
        )

    # ------------------------------------------------------------------ associations
    def check_peer(self, peer_ip: str) -> Rejection | None:
        return self.gate.check(peer_ip)

    def address_rejection(self, peer_ip: str) -> Rejection | None:
        return None if self.gate.address_allowed(peer_ip) else REJECT_SOURCE_ADDRESS

    def connection_refused(self, peer_ip: str, rejection: Rejection) -> None:
        self.gate.record(peer_ip, "", rejection)

    def association_rejected(self, peer_ip: str, calling_ae: str, rejection: Rejection) -> None:
        self.gate.record(peer_ip, calling_ae, rejection)

    def association_accepted(self, info: AssociationInfo) -> None:
        self.stats.add(associations=1)

    # ------------------------------------------------------------------ C-STORE
    def begin_store(self, info: AssociationInfo, request: StoreRequest) -> DatasetSink:
        command = request.command
        if not UID_PATTERN.match(command.sop_instance_uid):  # a permanent fault of this instance: never 0xA700
            return _Refused(STATUS_INVALID_INSTANCE,
                            "instance refused: invalid SOP Instance UID in the C-STORE request")
        if not UID_PATTERN.match(command.sop_class_uid):
            return _Refused(STATUS_CANNOT_UNDERSTAND, "instance refused: invalid SOP Class UID in the C-STORE request")
        if self.gate.low_disk():  # the same threshold that refuses new associations
            return _LOW_DISK
        try:
            incoming = self.spool.begin()
        except SpoolError as exc:
            return _Refused(STATUS_OUT_OF_RESOURCES, "instance refused: spool write failed", "error", str(exc))
        try:
            incoming.write(part10_header(command.sop_class_uid, command.sop_instance_uid,
                                         request.transfer_syntax, IMPLEMENTATION_CLASS_UID,
                                         IMPLEMENTATION_VERSION_NAME, info.calling_ae))
        except SpoolError as exc:
            incoming.discard()
            return _Refused(STATUS_OUT_OF_RESOURCES, "instance refused: spool write failed", "error", str(exc))
        except ValueError as exc:  # a transfer syntax or AE title the file meta cannot carry
            incoming.discard()
            return _Refused(STATUS_CANNOT_UNDERSTAND, "instance refused: cannot write its file meta", detail=str(exc))
        return incoming

    def end_store(self, info: AssociationInfo, request: StoreRequest, sink: DatasetSink) -> int:
        try:
            status, study = self._store(info, request, sink)
        finally:
            sink.discard()  # a no-op once committed; removes the partial file otherwise
        if status != STATUS_SUCCESS:  # stored instances are audited by the indexer, once recorded
            self.audit.record("instance_received", durable=False, calling_ae=info.calling_ae, peer_ip=info.peer_ip,
                              study=study, sop=phi_hash(request.command.sop_instance_uid),
                              status=f"0x{status:04X}", outcome="refused")
        return status

    def _refuse(self, status: int) -> int:
        self.stats.add(refused=1)
        return status

    def _store(self, info: AssociationInfo, request: StoreRequest, sink: DatasetSink) -> tuple[int, str]:
        """Check, sync, record: ``(status, hashed study UID for the audit trail)``."""
        calling = info.calling_ae
        if isinstance(sink, _Refused):
            getattr(log, sink.level)(sink.event, calling_ae=calling, status=f"0x{sink.status:04X}",
                                     **({"detail": sink.detail} if sink.detail else {}))
            return self._refuse(sink.status), "not read (refused before its data set)"
        if not isinstance(sink, (SlotSink, SpoolFile)):
            raise TypeError(f"sink: not one of ours: {type(sink).__name__}")
        fields = scan_header(bytes(sink.head[_meta_length(sink.head) :]), request.transfer_syntax)
        if fields is None:  # deflated, big endian, non-ASCII text, an unusual header: pydicom reads it,
            sink.start_sync(self._sync_pool)  # ~1 ms, while the fsync runs in the pool
            try:
                fields = _read_header(sink)
            except Exception as exc:  # peer data: any decoding failure is refused with 0xC000, never raised
                log.warning(
                    "instance refused: cannot decode dataset",
                    calling_ae=calling,
                    error=type(exc).__name__,
                    # pydicom's messages quote element values (names, IDs): only a digest, for correlation
                    detail_digest=phi_hash(str(exc)),
                )
                return self._refuse(STATUS_CANNOT_UNDERSTAND), f"undecodable ({type(exc).__name__})"
        if not all(UID_PATTERN.match(uid) for uid in (fields.study_instance_uid, fields.series_instance_uid)):
            log.warning("instance refused: invalid UID in the data set", calling_ae=calling, status="0xC000",
                        sop=phi_hash(fields.sop_instance_uid))
            return self._refuse(STATUS_CANNOT_UNDERSTAND), "invalid UID"
        study = phi_hash(fields.study_instance_uid)
        command = request.command
        if fields.sop_instance_uid != command.sop_instance_uid or fields.sop_class_uid != command.sop_class_uid:
            log.warning("instance refused: dataset UIDs differ from the C-STORE request", calling_ae=calling,
                        sop=phi_hash(fields.sop_instance_uid))
            return self._refuse(STATUS_DATASET_MISMATCH), study
        received_at = time.time()

        def index(stored: Stored) -> None:
            # the spool file is in place and durable: the job store and the audit trail follow in the indexer's
            # next batch.  A resend is submitted too: it is audited, and recorded if a crash came between its
            # first copy and the index
            self.indexer.submit(
                instance_record(fields, stored.path, request.transfer_syntax, stored.size, calling, received_at),
                calling_ae=calling,
                peer_ip=info.peer_ip,
                study=study,
                sop=phi_hash(fields.sop_instance_uid),
            )

        try:
            stored = self.spool.commit(sink, fields.study_instance_uid, fields.sop_instance_uid, index)
        except SpoolError as exc:
            log.error("instance refused: spool write failed", calling_ae=calling, detail=str(exc))
            return self._refuse(STATUS_OUT_OF_RESOURCES), study
        # durable now: Success may go back
        self.stats.add(**({"stored": 1, "bytes": stored.size} if stored.fresh else {"duplicates": 1}))
        return STATUS_SUCCESS, study

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> int:
        """Recover what a crash left unrecorded, then listen in background threads; returns the bound port."""
        self.spool.start()  # slots a crash left unsettled go to the spool first, then the job store learns of them
        reconcile(self.spool.root, self.store, self.audit)
        self.indexer.start()
        port = self.listener.start()
        n = self.config.node
        log.info("listening", ae_title=n.ae_title, host=n.host, port=port,
                 tls=self.listener.settings.ssl_context is not None)
        return port

    @property
    def port(self) -> int:
        return self.listener.port

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every instance acknowledged so far is recorded in the job store."""
        deadline = time.monotonic() + timeout
        return self.spool.flush(timeout) and self.indexer.flush(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        self.listener.stop()
        self._sync_pool.shutdown(wait=True)
        self.spool.close()  # hands the last settled instances to the indexer
        self.indexer.stop()
        self.audit.close()


# ---------------------------------------------------------------------------------------------- a host gone for good
@dataclass(frozen=True)
class HostRecovery:
    """What :func:`recover_host` did: instances settled from the host's slots, instances the job store
    learnt of (the whole spool is reconciled), slots removed."""

    settled: int
    recorded: int
    retired: int


def _no_spill() -> SpilledFile:
    raise SpoolError("recovering another host's slots receives nothing")


def recover_host(config: NodeConfig, store: JobStore, host: str, *, retire: bool = False) -> HostRecovery:
    """Settle the receive slots that ``host``'s receiver left in a shared spool, and record them.

    Each receiver settles only its own host's slots at its start (``docs/scaling.md``); a host that crashed
    and never comes back leaves its last acknowledged instances in ``<spool>/.slots/<host>/``.  This takes
    that host's slot lock (so it refuses while that receiver runs), settles every acknowledged slot into
    the spool, reconciles the spool with the job store (each instance recorded once, audited
    ``recovered``), and with ``retire`` removes the host's slots from disk.

    Raises
    ------
    ValueError
        ``host`` is not a host name.
    SpoolError
        The spool holds no slots of ``host``, or its receiver is running (it holds their lock).
    """
    slots_dir = config.spool_dir / ".slots"
    pool = SlotPool(slots_dir, config.spool_dir, 1, Claims(), _no_spill, lambda: 0, 0, host=host)
    if not pool.directory.is_dir():
        hosts = sorted(p.name for p in slots_dir.iterdir() if p.is_dir()) if slots_dir.is_dir() else []
        raise SpoolError(f"no receive slots of host {host!r} in {slots_dir} (hosts with slots: "
                         f"{', '.join(hosts) or 'none'})")
    try:
        settled = pool.recover()
        retired = pool.retire() if retire else 0
    finally:
        pool.close()
    audit = open_audit(config)
    try:
        recorded = reconcile(config.spool_dir, store, audit)
    finally:
        audit.close()
    log.info("receive slots of another host recovered", host=host, settled=settled, recorded=recorded,
             retired=retired)
    return HostRecovery(settled, recorded, retired)
