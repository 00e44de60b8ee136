"""Association negotiation for the listener (ACSE, PS3.8 section 7.1 and Annex D of PS3.7).

An A-ASSOCIATE-RQ is decoded with pynetdicom's PDU classes, presentation contexts and SCP/SCU roles
are negotiated with pynetdicom's :func:`~pynetdicom.presentation.negotiate_as_acceptor`, and the
answer is an A-ASSOCIATE-AC or -RJ PDU.  Checks, in order (the first failing one decides):

* the association gate (:mod:`dicom_node.network.access`): source address, low disk;
* protocol version and application context name;
* calling AE title allow-list, called AE title (ours);
* ``node.max_associations``.

Rejection parameters are those pynetdicom uses, so peers see the same answers as before.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateACPDU
from pynetdicom.pdu import A_ASSOCIATE_RJ as AssociateRJPDU
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRQPDU
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dicom_node.errors import ProtocolError
from dicom_node.network.upper_layer import ABORT_INVALID_PARAMETER

__all__ = [
    "APPLICATION_CONTEXT_NAME",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "Accepted",
    "Rejection",
    "negotiate",
    "rejection_pdu",
]

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
#: This node's Implementation Class UID (a 2.25 UUID-derived UID, fixed for the product).
IMPLEMENTATION_CLASS_UID = "2.25.141217340236512183453366913125627640371"
IMPLEMENTATION_VERSION_NAME = "SPINEMED_NODE_1"
_CACHE_SIZE = 64


@dataclass(frozen=True)
class Rejection:
    """Why an association is refused: A-ASSOCIATE-RJ parameters (PS3.8 9.3.4) and a metrics key.

    Attributes
    ----------
    result
        0x01 rejected-permanent, 0x02 rejected-transient.
    source
        0x01 service user, 0x02 service provider (ACSE), 0x03 service provider (presentation).
    diagnostic
        The reason code for that source.
    reason
        Short key for metrics and the audit trail (``calling_ae``, ``low_disk`` …).
    detail
        One line for the log.
    """

    result: int
    source: int
    diagnostic: int
    reason: str
    detail: str


REJECT_CALLING_AE = Rejection(0x01, 0x01, 0x03, "calling_ae", "calling AE title not in node.allowed_calling_aes")
REJECT_CALLED_AE = Rejection(0x01, 0x01, 0x07, "called_ae", "called AE title is not ours")
REJECT_CONTEXT = Rejection(0x01, 0x01, 0x02, "application_context", "application context name not supported")
REJECT_VERSION = Rejection(0x01, 0x02, 0x02, "protocol_version", "protocol version not supported")
REJECT_BUSY = Rejection(0x02, 0x03, 0x02, "max_associations", "node.max_associations reached (local limit exceeded)")
#: not sent (the connection is closed before it could be read): the reason recorded for the refusal
REFUSE_PENDING = Rejection(0x02, 0x03, 0x02, "pending_connections",
                           "node.max_pending_connections reached: connection closed before its request")
REFUSE_PENDING_SOURCE = Rejection(0x02, 0x03, 0x02, "pending_per_source",
                                  "node.max_pending_per_source reached for this address: connection closed")


@dataclass
class Accepted:
    """A negotiated association."""

    calling_ae: str
    called_ae: str
    #: accepted presentation contexts: ``{context id: (abstract syntax, transfer syntax)}``
    contexts: dict[int, tuple[str, str]]
    #: the peer's Maximum Length (0: no limit) — our P-DATA PDUs to it must not be longer
    peer_max_pdu: int
    ac_pdu: bytes = field(repr=False)


def _decode_request(pdu: bytes) -> A_ASSOCIATE:
    rq = AssociateRQPDU()
    try:
        rq.decode(pdu)
        return rq.to_primitive()
    except Exception as exc:  # any decoding failure of peer bytes is a protocol error, aborted by the caller
        raise ProtocolError(f"undecodable A-ASSOCIATE-RQ ({type(exc).__name__})", ABORT_INVALID_PARAMETER) from exc


def rejection_pdu(rejection: Rejection) -> bytes:
    """The A-ASSOCIATE-RJ PDU for ``rejection``."""
    primitive = A_ASSOCIATE()
    primitive.result = rejection.result
    primitive.result_source = rejection.source
    primitive.diagnostic = rejection.diagnostic
    rj = AssociateRJPDU()
    rj.from_primitive(primitive)
    return bytes(rj.encode())


def negotiate(
    pdu: bytes,
    *,
    ae_title: str,
    supported: Sequence[PresentationContext],
    allowed_calling_aes: Sequence[str],
    max_pdu_length: int,
    busy: bool,
    gate: Rejection | None = None,
    cache: MutableMapping[bytes, tuple[A_ASSOCIATE, Accepted]] | None = None,
) -> tuple[A_ASSOCIATE, Accepted | Rejection]:
    """Answer one A-ASSOCIATE-RQ ``pdu`` (whole PDU, header included).

    Parameters
    ----------
    pdu
        The A-ASSOCIATE-RQ PDU as received.
    ae_title
        Our AE title; the called AE title must match it.
    supported
        The presentation contexts we accept.
    allowed_calling_aes
        Calling AE titles allowed (empty: any).
    max_pdu_length
        The Maximum Length we announce.
    busy
        ``node.max_associations`` is reached.
    gate
        A rejection already decided by the association gate (source address, low disk).
    cache
        Earlier answers by request bytes: a sender proposes the same ~100 presentation contexts on every
        association, and decoding and negotiating them costs ~30 ms.  The checks above still run each
        time; only the decoding and the presentation-context answer are reused.

    Returns
    -------
    tuple
        The decoded request and either :class:`Accepted` or the :class:`Rejection`.

    Raises
    ------
    ProtocolError
        The PDU cannot be decoded (the caller aborts the association).
    """
    cached = cache.get(pdu) if cache is not None else None
    rq = cached[0] if cached is not None else _decode_request(pdu)
    calling = str(rq.calling_ae_title).strip()
    called = str(rq.called_ae_title).strip()
    if gate is not None:
        return rq, gate
    if rq.application_context_name != APPLICATION_CONTEXT_NAME:
        return rq, REJECT_CONTEXT
    if allowed_calling_aes and calling not in {a.strip() for a in allowed_calling_aes}:
        return rq, REJECT_CALLING_AE
    if called != ae_title.strip():
        return rq, REJECT_CALLED_AE
    if busy:
        return rq, REJECT_BUSY
    if cached is not None:
        return cached

    roles = {
        UID(str(item.sop_class_uid)): (item.scu_role, item.scp_role)
        for item in rq.user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
    }
    try:
        results, role_items = negotiate_as_acceptor(rq.presentation_context_definition_list, list(supported),
                                                    roles or None)
    except Exception as exc:  # peer data pynetdicom decoded but cannot negotiate (e.g. a context without an
        # abstract syntax sub-item, found by tests/test_fuzz_protocol.py): a malformed request, aborted
        raise ProtocolError(f"A-ASSOCIATE-RQ presentation contexts cannot be negotiated ({type(exc).__name__})",
                            ABORT_INVALID_PARAMETER) from exc
    contexts = {
        int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in results
        if cx.result == 0x00 and cx.context_id is not None and cx.transfer_syntax
    }

    ac = A_ASSOCIATE()
    ac.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    ac.calling_ae_title = rq.calling_ae_title
    ac.called_ae_title = rq.called_ae_title
    ac.result = 0x00
    ac.result_source = 0x01
    ac.presentation_context_definition_results_list = results
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu_length
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    impl_name = ImplementationVersionNameNotification()
    impl_name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    # asynchronous operations, user identity and extended negotiation get no response item: one
    # operation at a time, no identity assertion, no extended behaviour (PS3.7 D.3.3)
    ac.user_information = [max_length, impl_uid, impl_name, *role_items]
    pdu_ac = AssociateACPDU()
    pdu_ac.from_primitive(ac)
    accepted = Accepted(
        calling_ae=calling,
        called_ae=called,
        contexts=contexts,
        peer_max_pdu=int(rq.maximum_length_received or 0),
        ac_pdu=bytes(pdu_ac.encode()),
    )
    if cache is not None:
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[pdu] = (rq, accepted)
    return rq, accepted
