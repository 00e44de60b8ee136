"""Association plumbing shared by the listener and the exporters.

* TCP_NODELAY on every association socket: without it Nagle's algorithm and delayed ACKs hold each
  small PDU back ~40 ms and loopback throughput collapses to ~15 instances/s.
* The transfer syntaxes we accept and offer.
* Why a requested association was not established, told truthfully (:class:`RequestWatch`).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from pydicom import uid
from pynetdicom import AllStoragePresentationContexts, build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "WARNING_STATUSES",
    "ReactorCheckpoint",
    "RequestWatch",
    "free_port",
    "install_reactor_checkpoint",
    "nodelay_handlers",
    "set_nodelay",
    "storage_contexts",
    "wait_port",
]

#: C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C).
STATUS_SUCCESS = 0x0000
#: "Invalid SOP Instance": the SOP Instance UID violates the UID construction rules (PS3.7 Annex C.5)
STATUS_INVALID_INSTANCE = 0x0117
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
#: Warning statuses: the peer stored the object (coerced, elements discarded, not validated).
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})

#: Uncompressed, deflated and the common compressed transfer syntaxes; stored exactly as received.
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
)


def storage_contexts() -> list[PresentationContext]:
    """Every storage SOP class (plus Verification) with every accepted transfer syntax."""
    contexts = [
        build_context(str(cx.abstract_syntax), list(ACCEPTED_TRANSFER_SYNTAXES))
        for cx in AllStoragePresentationContexts
    ]
    contexts.append(build_context(Verification, [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]))
    return contexts


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for demos, tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, *, proc: Any = None, host: str = "127.0.0.1") -> None:
    """Wait until something listens on ``port``; fail early if ``proc`` (a Popen) exited.

    Raises
    ------
    TimeoutError
        Nothing listened within ``timeout`` seconds.
    RuntimeError
        ``proc`` exited first.
    """
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout:.0f}s")


def set_nodelay(sock: socket.socket | None) -> None:
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _on_conn_open(event: Any) -> None:
    set_nodelay(getattr(event.assoc.dul.socket, "socket", None))
    install_reactor_checkpoint(event.assoc)


class ReactorCheckpoint(threading.Event):
    """pynetdicom's association reactor pause, made race-free.

    Before each ``send_c_*`` pynetdicom pauses the association's reactor thread (it clears
    ``_reactor_checkpoint`` and waits for ``_is_paused``) so that the reactor does not take the response off
    the DIMSE queue.  The handshake has a gap: the reactor sets ``_is_paused = True``, its ``wait()`` returns
    (the checkpoint is still set from the last request), the sender clears it and reads ``_is_paused`` — still
    True — and sends; the reactor then sets ``_is_paused = False`` and takes the response itself ("Received
    unexpected C-STORE service message"), and the sender waits for the DIMSE timeout.  Under CPU load that
    was 15 of 300 four-object exports to dcmtk's storescp (and the "57 s stall" of benchmarks/load.py).

    This event closes the gap: the reactor's ``wait()`` returns only if the checkpoint is still set once it
    holds the lock that ``clear()`` takes, and a ``clear()`` that comes while the reactor runs marks it
    running (``_is_paused = False``) so the sender waits until it is back in ``wait()``.
    """

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self._assoc = assoc
        self._guard = threading.Lock()
        self._waiting = False
        self.set()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:  # (pynetdicom never passes one)
            return super().wait(timeout)
        while True:
            with self._guard:
                self._waiting = True
                self._assoc._is_paused = True  # blocked here: what the sender waits for
            super().wait()
            with self._guard:
                self._waiting = False
                if self.is_set():
                    return True
            # cleared between waking and taking the lock: a sender has paused us; wait again

    def clear(self) -> None:
        with self._guard:
            super().clear()
            if not self._waiting:  # the reactor is running: the sender must wait until it is in wait()
                self._assoc._is_paused = False


def install_reactor_checkpoint(assoc: Any) -> None:
    """Give ``assoc`` a :class:`ReactorCheckpoint` (before its reactor thread starts)."""
    if isinstance(getattr(assoc, "_reactor_checkpoint", None), threading.Event):
        assoc._reactor_checkpoint = ReactorCheckpoint(assoc)


def nodelay_handlers() -> list[Any]:
    """Event handlers to bind on every association (acceptor and requestor): TCP_NODELAY, and the race-free
    reactor pause (:class:`ReactorCheckpoint`)."""
    return [(evt.EVT_CONN_OPEN, _on_conn_open)]


class RequestWatch:
    """Watches one association request so that a failure can say why, truthfully.

    Bind :meth:`handlers` on ``AE.associate``; if the association is not established, :meth:`why_not`
    names the cause: the peer's A-ASSOCIATE-RJ (result, source, reason), no connection within the
    connection timeout, no acceptable presentation context, or an abort / no answer.

    The rejection is read from the A-ASSOCIATE-RJ PDU itself, not from ``Association.is_rejected``: when
    the peer closes the connection right after its RJ (DCMTK and so Orthanc do), pynetdicom's state
    machine can take the close first and call the association aborted although the RJ was received
    (about 1 in 5 requests to Orthanc with a wrong called AE title, under CPU load).
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self.rejection: A_ASSOCIATE_RJ | None = None

    def _saw(self, event: Any) -> None:
        self._seen.add(event.event.name)

    def _pdu(self, event: Any) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ) and self.rejection is None:
            self.rejection = event.pdu

    def handlers(self) -> list[Any]:
        """Event handlers to bind on the association request (with :func:`nodelay_handlers`)."""
        return [(evt.EVT_CONN_OPEN, self._saw), (evt.EVT_ACCEPTED, self._saw), (evt.EVT_PDU_RECV, self._pdu)]

    @property
    def rejected(self) -> bool:
        """True if the peer answered with an A-ASSOCIATE-RJ."""
        return self.rejection is not None

    @property
    def connected(self) -> bool:
        """True if the TCP connection was made."""
        return "EVT_CONN_OPEN" in self._seen

    def why_not(self, assoc: Association, peer: str) -> str:
        """Why ``assoc`` (requested to the destination named ``peer``) is not established."""
        if self.rejection is not None:
            rj = self.rejection.to_primitive()
            return (f"association rejected by {peer} ({rj.result_str}, source: {rj.source_str}, "
                    f"reason: {rj.reason_str})")
        if not self.connected:
            return (f"{peer} unreachable (connection refused or not answered within "
                    f"{assoc.connection_timeout or 0:g} s)")
        if "EVT_ACCEPTED" in self._seen:
            return f"{peer} accepted none of our presentation contexts"
        return f"association with {peer} aborted or not answered within {assoc.acse_timeout or 0:g} s"
