"""The association acceptor: a TCP (optionally TLS) server, one thread per association.

Each association thread reads PDUs (:mod:`dicom_node.network.upper_layer`), negotiates
(:mod:`dicom_node.network.acceptor`), reassembles DIMSE messages (:mod:`dicom_node.network.dimse`) and hands them to
a :class:`StorageService`, which decides what is stored and with which status.  Data set fragments are
passed on as they arrive, so an instance never has to be held whole in memory.

Timeouts: ``acse_timeout_s`` bounds the TLS handshake and the wait for the A-ASSOCIATE-RQ (the ARTIM
timer); ``network_timeout_s`` bounds every later wait for the peer, after which the association is
aborted.  TCP_NODELAY is set on every accepted socket.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

from dicom_node.errors import PeerClosed, ProtocolError
from dicom_node.log import get_logger
from dicom_node.network.acceptor import Accepted, Rejection, negotiate, rejection_pdu
from dicom_node.network.association import set_nodelay
from dicom_node.network.dimse import C_ECHO_RQ, C_STORE_RQ, Command, decode_command, echo_response, store_response
from dicom_node.network.upper_layer import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ,
    ABORT_INVALID_PARAMETER,
    ABORT_NOT_SPECIFIED,
    ABORT_UNEXPECTED_PDU,
    MAX_PDU_LENGTH,
    P_DATA_TF,
    RELEASE_RP_PDU,
    PDUSocket,
    abort_pdu,
    iter_pdvs,
)

__all__ = ["AssociationInfo", "DatasetSink", "Listener", "StorageService", "StoreRequest"]

log = get_logger(__name__)

_COMMAND, _LAST = 0x01, 0x02


@dataclass(frozen=True)
class AssociationInfo:
    """Who is on an accepted association."""

    calling_ae: str
    called_ae: str
    peer_ip: str
    peer_port: int


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ: its command and the negotiated presentation context."""

    command: Command
    context_id: int
    abstract_syntax: str
    transfer_syntax: str


class DatasetSink(Protocol):
    """Where the data set fragments of one C-STORE go."""

    def write(self, data: memoryview) -> None: ...
    def discard(self) -> None: ...


class StorageService(Protocol):
    """What the listener asks of the node."""

    def check_peer(self, peer_ip: str) -> Rejection | None:
        """A rejection decided before negotiation (source address, low disk), or ``None``."""
        ...

    def association_rejected(self, peer_ip: str, calling_ae: str, rejection: Rejection) -> None: ...
    def association_accepted(self, info: AssociationInfo) -> None: ...
    def begin_store(self, info: AssociationInfo, request: StoreRequest) -> DatasetSink: ...

    def end_store(self, info: AssociationInfo, request: StoreRequest, sink: DatasetSink) -> int:
        """The whole data set arrived in ``sink``: store it, return the C-STORE status."""
        ...


@dataclass
class ListenerSettings:
    ae_title: str
    host: str
    port: int
    contexts: Sequence[PresentationContext]
    allowed_calling_aes: Sequence[str]
    max_associations: int
    acse_timeout_s: float
    network_timeout_s: float
    ssl_context: ssl.SSLContext | None = None
    max_pdu_length: int = MAX_PDU_LENGTH


class Listener:
    """Accepts associations and serves C-STORE and C-ECHO on them.

    Parameters
    ----------
    settings
        Address, AE title, presentation contexts, limits and timeouts.
    service
        The storage service called for every association and instance.
    """

    def __init__(self, settings: ListenerSettings, service: StorageService) -> None:
        self.settings = settings
        self.service = service
        self._sock: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self._next_id = 0
        self._negotiated: dict[bytes, tuple[A_ASSOCIATE, Accepted]] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> int:
        """Bind, listen and accept in a background thread; returns the bound port."""
        s = self.settings
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((s.host, s.port))
        sock.listen(128)
        self._sock = sock
        self._accept_thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._accept_thread.start()
        return self.port

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("listener not started")
        return int(self._sock.getsockname()[1])

    def active_sockets(self) -> list[socket.socket]:
        """The sockets of the associations open right now (for diagnostics and tests)."""
        with self._lock:
            return [sock for sock, _ in self._active.values()]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, shut open associations' connections down and wait for their threads."""
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            active = list(self._active.values())
        for sock, _ in active:
            with contextlib.suppress(OSError):  # already closed by the peer
                sock.shutdown(socket.SHUT_RDWR)
        for _, thread in active:
            thread.join(timeout)

    # ------------------------------------------------------------------ accepting
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.2)
            if not ready:
                continue
            try:
                conn, addr = self._sock.accept()
            except OSError as exc:
                log.error("accept failed", error=type(exc).__name__, detail=str(exc))
                continue
            set_nodelay(conn)
            with self._lock:
                self._next_id += 1
                key = self._next_id
                thread = threading.Thread(target=self._serve, args=(key, conn, addr), name=f"dicom-assoc-{key}",
                                          daemon=True)
                self._active[key] = (conn, thread)
            thread.start()

    def _serve(self, key: int, conn: socket.socket, addr: tuple[str, int]) -> None:
        s = self.settings
        peer_ip, peer_port = str(addr[0]), int(addr[1])
        sock: socket.socket = conn
        pdus: PDUSocket | None = None
        try:
            conn.settimeout(s.acse_timeout_s)
            if s.ssl_context is not None:
                sock = s.ssl_context.wrap_socket(conn, server_side=True)
                with self._lock:
                    self._active[key] = (sock, self._active[key][1])
            pdus = PDUSocket(sock, s.max_pdu_length)
            info = self._negotiate(pdus, peer_ip, peer_port, busy=self._count() > s.max_associations)
            if info is None:
                return
            sock.settimeout(s.network_timeout_s)
            pdus.associated = True
            _Association(pdus, info[0], info[1], self.service).run()
        except ssl.SSLError as exc:
            log.warning("TLS handshake failed" if pdus is None else "association ended: TLS error", peer_ip=peer_ip,
                        error=type(exc).__name__, detail=exc.reason)
        except ProtocolError as exc:
            log.warning("association aborted: protocol error", peer_ip=peer_ip, detail=str(exc))
            _send_quietly(pdus, abort_pdu(exc.reason))
        except TimeoutError:
            log.warning("association aborted: peer silent for too long", peer_ip=peer_ip)
            _send_quietly(pdus, abort_pdu(ABORT_NOT_SPECIFIED))
        except PeerClosed:
            if pdus is not None and pdus.associated:
                log.info("connection closed by the peer", peer_ip=peer_ip)
            else:  # a TCP probe before any A-ASSOCIATE-RQ (load balancer, monitoring): not worth an info line
                log.debug("connection closed before an association was requested", peer_ip=peer_ip)
        except OSError as exc:
            log.warning("association ended: connection error", peer_ip=peer_ip, error=type(exc).__name__)
        except Exception:  # a bug of ours: logged with its traceback, the association aborted, the listener lives on
            log.exception("association aborted: internal error", peer_ip=peer_ip)
            _send_quietly(pdus, abort_pdu(ABORT_NOT_SPECIFIED))
        finally:
            try:
                sock.close()
            finally:
                with self._lock:
                    self._active.pop(key, None)

    def _count(self) -> int:
        with self._lock:
            return len(self._active)

    def _negotiate(self, pdus: PDUSocket, peer_ip: str, peer_port: int,
                   busy: bool) -> tuple[AssociationInfo, Accepted] | None:
        s = self.settings
        pdu_type, body = pdus.read_pdu()
        if pdu_type != A_ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}", ABORT_UNEXPECTED_PDU)
        whole = bytes((pdu_type, 0)) + len(body).to_bytes(4, "big") + bytes(body)
        rq, decision = negotiate(whole, ae_title=s.ae_title, supported=s.contexts,
                                 allowed_calling_aes=s.allowed_calling_aes, max_pdu_length=s.max_pdu_length,
                                 busy=busy, gate=self.service.check_peer(peer_ip), cache=self._negotiated)
        # recorded (counted, logged, audited) before the peer hears the answer, so a peer never sees an
        # answer the node has no record of
        if isinstance(decision, Rejection):
            self.service.association_rejected(peer_ip, str(rq.calling_ae_title).strip(), decision)
            pdus.send(rejection_pdu(decision))
            return None
        info = AssociationInfo(decision.calling_ae, decision.called_ae, peer_ip, peer_port)
        self.service.association_accepted(info)
        pdus.send(decision.ac_pdu)
        return info, decision


class _Association:
    """The message loop of one accepted association."""

    def __init__(self, pdus: PDUSocket, info: AssociationInfo, accepted: Accepted, service: StorageService) -> None:
        self.pdus = pdus
        self.info = info
        self.accepted = accepted
        self.service = service
        self._command = bytearray()
        self._request: StoreRequest | None = None
        self._sink: DatasetSink | None = None

    def run(self) -> None:
        try:
            while True:
                pdu_type, body = self.pdus.read_pdu()
                if pdu_type == P_DATA_TF:
                    for context_id, control, fragment in iter_pdvs(body):
                        self._on_pdv(context_id, control, fragment)
                elif pdu_type == A_RELEASE_RQ:
                    if self._request is not None:
                        raise ProtocolError("A-RELEASE-RQ in the middle of a message", ABORT_UNEXPECTED_PDU)
                    self.pdus.send(RELEASE_RP_PDU)
                    log.debug("association released", calling_ae=self.info.calling_ae)
                    return
                elif pdu_type == A_ABORT:
                    log.info("association aborted by the peer", calling_ae=self.info.calling_ae)
                    return
                else:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}", ABORT_UNEXPECTED_PDU)
        finally:
            if self._sink is not None:
                self._sink.discard()
                self._sink = None

    def _on_pdv(self, context_id: int, control: int, fragment: memoryview) -> None:
        if context_id not in self.accepted.contexts:
            raise ProtocolError(f"data on presentation context {context_id}, which was not accepted",
                                ABORT_INVALID_PARAMETER)
        if control & _COMMAND:
            if self._request is not None:
                raise ProtocolError("command fragment while a data set was expected", ABORT_UNEXPECTED_PDU)
            self._command += fragment
            if control & _LAST:
                command = decode_command(bytes(self._command))
                self._command.clear()
                self._on_command(context_id, command)
            return
        request = self._request
        if request is None or context_id != request.context_id or self._sink is None:
            raise ProtocolError("data set fragment without its command", ABORT_UNEXPECTED_PDU)
        self._sink.write(fragment)
        if control & _LAST:
            sink, self._sink, self._request = self._sink, None, None
            status = self.service.end_store(self.info, request, sink)
            self._send(store_response(request.command, status, context_id, self.accepted.peer_max_pdu))

    def _on_command(self, context_id: int, command: Command) -> None:
        abstract, transfer = self.accepted.contexts[context_id]
        if command.command_field == C_ECHO_RQ and not command.has_dataset:
            self._send(echo_response(command, 0x0000, context_id, self.accepted.peer_max_pdu))
        elif command.command_field == C_STORE_RQ and command.has_dataset:
            request = StoreRequest(command, context_id, abstract, transfer)
            self._sink = self.service.begin_store(self.info, request)
            self._request = request
        else:
            raise ProtocolError(f"unsupported DIMSE command 0x{command.command_field:04X}", ABORT_NOT_SPECIFIED)

    def _send(self, data: bytes) -> None:
        self.pdus.send(data)


def _send_quietly(pdus: PDUSocket | None, data: bytes) -> None:
    """Best effort (an A-ABORT on a connection that may already be gone)."""
    if pdus is None:
        return
    try:
        pdus.send(data)
    except OSError as exc:
        log.debug("could not send A-ABORT", error=type(exc).__name__)
