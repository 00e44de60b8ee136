"""Who may open an association, and when: checked once per connection, before negotiation.

* Source address allow-list (``node.allowed_source_networks``, CIDRs), checked right after ``accept()``:
  a peer outside every network gets A-ASSOCIATE-RJ *rejected-permanent*, source *service user*, reason
  *no reason given* (the standard has no "address not allowed" reason), written without reading its
  request, and the connection is closed; the log line and the audit trail say why.
* Pending connections over ``node.max_pending_connections`` (or ``max_pending_per_source`` from one
  address) are closed at once by the listener and recorded here.  Refusals that come in floods (these,
  and refused addresses) are logged and audited at most once a minute per address and reason, with the
  count of those left out; every one is counted in the metrics.
* Low disk (``node.min_free_disk_mb``): while the spool's file system has less free space, new
  associations get A-ASSOCIATE-RJ *rejected-transient*, source *service provider (presentation)*,
  reason *local limit exceeded* — senders queue and retry later.  Instances on associations already
  open get ``0xA700`` from the C-STORE handler, before the disk is full.

The calling AE allow-list, the called AE title and ``node.max_associations`` are checked during
negotiation (:mod:`dicom_node.network.acceptor`); every refusal, whichever check made it, is counted and
audited here.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_node.config import NodeConfig
from dicom_node.log import get_logger
from dicom_node.network.acceptor import Rejection
from dicom_node.ops.audit import AuditTrail

__all__ = ["REJECT_LOW_DISK", "REJECT_SOURCE_ADDRESS", "AssociationGate", "GateStats"]

log = get_logger(__name__)

#: refusals that arrive in floods (a scanner, a connection storm): logged and audited once per this many
#: seconds per address and reason
_THROTTLE_S = 60.0
_THROTTLED = frozenset({"source_address", "pending_connections", "pending_per_source"})

REJECT_SOURCE_ADDRESS = Rejection(0x01, 0x01, 0x01, "source_address",
                                  "source address not in node.allowed_source_networks")
REJECT_LOW_DISK = Rejection(0x02, 0x03, 0x02, "low_disk",
                            "spool disk below node.min_free_disk_mb (local limit exceeded)")


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
    """The checks made before negotiation (source address, free disk space), and the refusal record.

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
        self._throttle: dict[tuple[str, str], tuple[float, int]] = {}
        self._throttle_lock = threading.Lock()

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

    def check(self, peer_ip: str) -> Rejection | None:
        """The rejection for a peer at ``peer_ip`` before negotiation, or ``None``."""
        if not self.address_allowed(peer_ip):
            return REJECT_SOURCE_ADDRESS
        if self.low_disk():
            return REJECT_LOW_DISK
        return None

    def record(self, peer_ip: str, calling_ae: str, rejection: Rejection) -> None:
        """Count, log and audit one refused association (whichever check refused it)."""
        self.stats.add(rejection.reason)
        if rejection.reason in _THROTTLED:
            now = time.monotonic()
            key = (peer_ip, rejection.reason)
            with self._throttle_lock:
                since, left_out = self._throttle.get(key, (-_THROTTLE_S, 0))
                if now - since < _THROTTLE_S:
                    self._throttle[key] = (since, left_out + 1)
                    return
                self._throttle[key] = (now, 0)
                if len(self._throttle) > 10_000:  # a scan of many addresses: forget the oldest
                    for old in sorted(self._throttle, key=lambda k: self._throttle[k][0])[:5_000]:
                        del self._throttle[old]
            if left_out:
                log.warning("connections refused and not logged in the last minute", peer_ip=peer_ip,
                            reason=rejection.reason, count=left_out)
        log.warning("association rejected: " + rejection.detail, peer_ip=peer_ip, calling_ae=calling_ae,
                    reason=rejection.reason)
        self.audit.record("association_rejected", durable=False, peer_ip=peer_ip, calling_ae=calling_ae,
                          reason=rejection.reason, detail=rejection.detail)
