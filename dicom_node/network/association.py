"""Association plumbing shared by the listener and the exporters.

* TCP_NODELAY on every association socket: without it Nagle's algorithm and delayed ACKs hold each
  small PDU back ~40 ms and loopback throughput collapses to ~15 instances/s.
* The transfer syntaxes we accept and offer.
"""

from __future__ import annotations

import socket
from typing import Any

from pydicom import uid
from pynetdicom import AllStoragePresentationContexts, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "WARNING_STATUSES",
    "free_port",
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


def nodelay_handlers() -> list[Any]:
    """Event handlers to bind on every association (acceptor and requestor)."""
    return [(evt.EVT_CONN_OPEN, _on_conn_open)]
