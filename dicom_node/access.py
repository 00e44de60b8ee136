"""Who may open an association, and when: checked once per association, before negotiation.

* Source address allow-list (``node.allowed_source_networks``, CIDRs): a peer outside every network
  gets A-ASSOCIATE-RJ *rejected-permanent*, source *service user*, reason *no reason given* (the
  standard has no "address not allowed" reason); the log line and the audit trail say why.
* Low disk (``node.min_free_disk_mb``): while the spool's file system has less free space, new
  associations get A-ASSOCIATE-RJ *rejected-transient*, source *service provider (presentation)*,
  reason *local limit exceeded* — senders queue and retry later.  Instances on associations already
  open get ``0xA700`` from the C-STORE handler, before the disk is full.

The calling AE allow-list (``node.allowed_calling_aes``) is pynetdicom's own ``require_calling_aet``.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt

from dicom_node.audit import AuditTrail
from dicom_node.config import NodeConfig
from dicom_node.log import get_logger

__all__ = ["AssociationGate", "GateStats"]

log = get_logger(__name__)

# A-ASSOCIATE-RJ parameters (PS3.8 9.3.4)
_PERMANENT, _TRANSIENT = 0x01, 0x02
_SERVICE_USER, _PROVIDER_PRESENTATION = 0x01, 0x03
_NO_REASON, _LOCAL_LIMIT = 0x01, 0x02
_PYNETDICOM_REJECTIONS: dict[tuple[int | None, int | None], tuple[str, str]] = {
    (0x01, 0x03): ("calling_ae", "calling AE title not in node.allowed_calling_aes"),
    (0x01, 0x07): ("called_ae", "called AE title is not ours"),
    (0x03, 0x02): ("max_associations", "node.max_associations reached (local limit exceeded)"),
}


@dataclass
class GateStats:
    """Associations refused by the gate since start, by reason."""

    rejected: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.rejected)


class AssociationGate:
    """The ``EVT_REQUESTED`` check: source address and free disk space.

    Parameters
    ----------
    config
        ``node.allowed_source_networks`` and ``node.min_free_disk_mb`` are read.
    free_bytes
        Free space on the spool's file system, in bytes.
    audit
        Where refusals are recorded.
    """

    def __init__(self, config: NodeConfig, free_bytes: Callable[[], int], audit: AuditTrail) -> None:
        self.networks = [ipaddress.ip_network(n) for n in config.node.allowed_source_networks]
        self.min_free = config.node.min_free_disk_mb * 1024 * 1024
        self.free_bytes = free_bytes
        self.audit = audit
        self.stats = GateStats()

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_REJECTED, self._on_rejected)]

    def address_allowed(self, address: str) -> bool:
        """Whether a peer at ``address`` may associate (always, with an empty allow-list)."""
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def low_disk(self) -> bool:
        return self.min_free > 0 and self.free_bytes() < self.min_free

    def _reject(self, event: Any, reason: str, why: str, params: tuple[int, int, int]) -> None:
        assoc = event.assoc
        peer = str(assoc.requestor.address)
        calling = str(assoc.requestor.ae_title).strip()
        self.stats.add(reason)
        log.warning("association rejected: " + why, peer_ip=peer, calling_ae=calling, reason=reason)
        self.audit.record("association_rejected", durable=False, peer_ip=peer, calling_ae=calling, reason=reason,
                          detail=why)
        assoc.acse.send_reject(*params)
        assoc.kill()  # as pynetdicom does after its own rejections: the RJ PDU goes out, then the socket closes

    def _on_rejected(self, event: Any) -> None:
        """pynetdicom's own rejections: calling/called AE title, too many associations."""
        assoc = event.assoc
        rsp = assoc.acceptor.primitive
        key = (getattr(rsp, "result_source", None), getattr(rsp, "diagnostic", None))
        reason, why = _PYNETDICOM_REJECTIONS.get(key, ("other", "association rejected during negotiation"))
        peer = str(assoc.requestor.address)
        calling = str(assoc.requestor.ae_title).strip()
        self.stats.add(reason)
        log.warning("association rejected: " + why, peer_ip=peer, calling_ae=calling, reason=reason)
        self.audit.record("association_rejected", durable=False, peer_ip=peer, calling_ae=calling, reason=reason,
                          detail=why)

    def _on_requested(self, event: Any) -> None:
        peer = str(event.assoc.requestor.address)
        if not self.address_allowed(peer):
            self._reject(event, "source_address", "source address not in node.allowed_source_networks",
                         (_PERMANENT, _SERVICE_USER, _NO_REASON))
        elif self.low_disk():
            self._reject(event, "low_disk", "spool disk below node.min_free_disk_mb (local limit exceeded)",
                         (_TRANSIENT, _PROVIDER_PRESENTATION, _LOCAL_LIMIT))
