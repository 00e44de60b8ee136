"""The association acceptor: a TCP (optionally TLS) server, one thread per association.

Each association thread reads PDUs (:mod:`dicom_node.network.upper_layer`), negotiates
(:mod:`dicom_node.network.acceptor`), reassembles DIMSE messages (:mod:`dicom_node.network.dimse`) and hands them to
a :class:`StorageService`, which decides what is stored and with which status.  Data set fragments are
passed on as they arrive, so an instance never has to be held whole in memory.

The edge, against scanners, misconfigured modalities and slow links (PS3.8 9.1.5, 9.2):

* **The address gate right after ``accept()``**: a peer outside ``node.allowed_source_networks`` gets an
  A-ASSOCIATE-RJ written at once and its connection closed, with no thread, TLS handshake or read.
* **Pending connections are capped apart from associations**: at most ``max_pending`` connections, and
  ``max_pending_per_source`` from one address, may be waiting for their A-ASSOCIATE-RQ; more are closed
  at once.  ``max_associations`` counts established associations only, so idle connections cannot lock
  a modality out.
* **A real ARTIM deadline**: the TLS handshake and the whole A-ASSOCIATE-RQ must arrive within
  ``acse_timeout_s`` of ``accept()``, however they trickle in; a reaper thread closes connections past it.
* **A deadline per PDU inside an association**: each PDU must be whole within ``network_timeout_s``.
* **Bounded memory**: a command set is capped at :data:`MAX_COMMAND_BYTES`; data set fragments go to the
  service's sink (the spool), never into memory; the PDU buffer is the announced maximum.
* **The state table's other events** (PS3.8 9.2): an A-ABORT is never answered; an unknown DIMSE command
  is answered ``0x0211`` and one whose SOP class is not its presentation context's ``0x0122`` (the
  association goes on); other protocol violations abort with their reason.

TCP_NODELAY is set on every accepted socket.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

from dicom_node.errors import PeerClosed, ProtocolError
from dicom_node.log import get_logger
from dicom_node.network.acceptor import (
    REFUSE_PENDING,
    REFUSE_PENDING_SOURCE,
    Accepted,
    Rejection,
    negotiate,
    rejection_pdu,
)
from dicom_node.network.association import set_nodelay
from dicom_node.network.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    Command,
    decode_command,
    echo_response,
    failure_response,
    is_response,
    store_response,
)
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

__all__ = [
    "MAX_COMMAND_BYTES",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
    "STATUS_UNRECOGNISED_OPERATION",
    "AssociationInfo",
    "DatasetSink",
    "Listener",
    "StorageService",
    "StoreRequest",
]

log = get_logger(__name__)

_COMMAND, _LAST = 0x01, 0x02
#: The largest command set accepted (a C-STORE-RQ is ~200 bytes; PS3.7 command sets are small and flat).
MAX_COMMAND_BYTES = 64 * 1024
#: DIMSE statuses of requests the node does not perform (PS3.7 C.4.2): answered, the association goes on.
STATUS_UNRECOGNISED_OPERATION = 0x0211
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
#: how often the reaper looks for connections past their deadline, and how long a refused connection may
#: linger so the peer reads our A-ASSOCIATE-RJ before the close
_REAP_INTERVAL_S = 0.1
_LINGER_S = 1.0


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

    def address_rejection(self, peer_ip: str) -> Rejection | None:
        """The rejection of a source address itself (checked right after ``accept()``), or ``None``."""
        ...

    def connection_refused(self, peer_ip: str, rejection: Rejection) -> None:
        """A connection closed before its A-ASSOCIATE-RQ was read (address gate, pending caps)."""
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
    max_pending: int = 64
    max_pending_per_source: int = 16


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
        self._reaper_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self._next_id = 0
        self._negotiated: dict[bytes, tuple[A_ASSOCIATE, Accepted]] = {}
        #: connections awaiting their A-ASSOCIATE-RQ: key -> (ARTIM deadline, source address)
        self._pending: dict[int, tuple[float, str]] = {}
        self._pending_by_source: dict[str, int] = {}
        self._expired: set[int] = set()
        self._established = 0
        #: refused connections closing after the peer had time to read our A-ASSOCIATE-RJ: (close at, socket)
        self._lingering: list[tuple[float, socket.socket]] = []

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
        self._reaper_thread = threading.Thread(target=self._reap_loop, name="dicom-artim", daemon=True)
        self._reaper_thread.start()
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

    def counts(self) -> tuple[int, int]:
        """``(connections awaiting their A-ASSOCIATE-RQ, established associations)`` right now."""
        with self._lock:
            return len(self._pending), self._established

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, shut open associations' connections down and wait for their threads."""
        self._stop.set()
        for thread in (self._accept_thread, self._reaper_thread):
            if thread is not None:
                thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            active = list(self._active.values())
            lingering, self._lingering = self._lingering, []
        for _, sock in lingering:
            sock.close()
        for sock, _ in active:
            with contextlib.suppress(OSError):  # already closed by the peer
                sock.shutdown(socket.SHUT_RDWR)
        for _, thread in active:
            thread.join(timeout)

    # ------------------------------------------------------------------ accepting
    def _accept_loop(self) -> None:
        assert self._sock is not None
        with selectors.DefaultSelector() as selector:  # epoll: no FD_SETSIZE limit, unlike select()
            selector.register(self._sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not selector.select(0.2):
                    continue
                try:
                    conn, addr = self._sock.accept()
                except OSError as exc:
                    log.error("accept failed", error=type(exc).__name__, detail=str(exc))
                    if exc.errno in (24, 23):  # EMFILE / ENFILE: give the threads time to close some
                        self._stop.wait(0.1)
                    continue
                self._admit(conn, str(addr[0]), int(addr[1]))

    def _admit(self, conn: socket.socket, peer_ip: str, peer_port: int) -> None:
        """Gate a new connection before any thread, TLS or read: its source address, then the pending caps."""
        s = self.settings
        refused = self.service.address_rejection(peer_ip)
        if refused is None:
            with self._lock:
                from_source = self._pending_by_source.get(peer_ip, 0)
                if len(self._pending) >= s.max_pending:
                    refused = REFUSE_PENDING
                elif from_source >= s.max_pending_per_source:
                    refused = REFUSE_PENDING_SOURCE
                else:
                    self._next_id += 1
                    key = self._next_id
                    self._pending[key] = (time.monotonic() + s.acse_timeout_s, peer_ip)
                    self._pending_by_source[peer_ip] = from_source + 1
                    thread = threading.Thread(target=self._serve, args=(key, conn, peer_ip, peer_port),
                                              name=f"dicom-assoc-{key}", daemon=True)
                    self._active[key] = (conn, thread)
            if refused is None:
                set_nodelay(conn)
                thread.start()
                return
        self.service.connection_refused(peer_ip, refused)
        if refused.reason == "source_address" and s.ssl_context is None:
            # the answer a misconfigured modality can show its user: written now, without reading its request
            # (it waits in the socket buffer); the peer gets time to read it before the close
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.send(rejection_pdu(refused))
                conn.shutdown(socket.SHUT_WR)
            with self._lock:
                self._lingering.append((time.monotonic() + _LINGER_S, conn))
            return
        conn.close()

    def _reap_loop(self) -> None:
        """Close connections whose TLS handshake or A-ASSOCIATE-RQ is not complete by their ARTIM deadline
        (PS3.8: ARTIM expiry before an association closes the transport), and refused ones that lingered."""
        while not self._stop.wait(_REAP_INTERVAL_S):
            now = time.monotonic()
            expired: list[socket.socket] = []
            done: list[socket.socket] = []
            with self._lock:
                for key, (deadline, _) in list(self._pending.items()):
                    if deadline <= now and key not in self._expired and key in self._active:
                        self._expired.add(key)
                        expired.append(self._active[key][0])
                        self._unpend(key)  # no longer pending from now: its thread only has to finish
                done = [sock for at, sock in self._lingering if at <= now]
                self._lingering = [(at, sock) for at, sock in self._lingering if at > now]
            for sock in expired:  # the connection's thread wakes up (its read ends) and finishes
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            for sock in done:
                with contextlib.suppress(OSError):
                    while sock.recv(65536):  # drain what the peer sent, so the close is not a reset
                        pass
                sock.close()

    def _settle(self, key: int) -> None:
        """The connection ``key`` is no longer pending (associated, refused or closed)."""
        with self._lock:
            self._unpend(key)

    def _unpend(self, key: int) -> None:
        """:meth:`_settle` with the lock held."""
        item = self._pending.pop(key, None)
        if item is not None:
            source = item[1]
            left = self._pending_by_source.get(source, 1) - 1
            if left > 0:
                self._pending_by_source[source] = left
            else:
                self._pending_by_source.pop(source, None)

    def _reserve(self) -> bool:
        """Take one of ``max_associations`` for a connection whose request arrived; ``False`` when none is left."""
        with self._lock:
            if self._established >= self.settings.max_associations:
                return False
            self._established += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self._established -= 1

    def _serve(self, key: int, conn: socket.socket, peer_ip: str, peer_port: int) -> None:
        s = self.settings
        sock: socket.socket = conn
        pdus: PDUSocket | None = None
        with self._lock:
            item = self._pending.get(key)
        deadline = item[0] if item is not None else time.monotonic()  # already expired: the read times out
        reserved = False
        try:
            conn.settimeout(s.acse_timeout_s)
            if s.ssl_context is not None:
                sock = s.ssl_context.wrap_socket(conn, server_side=True)
                with self._lock:
                    self._active[key] = (sock, self._active[key][1])
            pdus = PDUSocket(sock, s.max_pdu_length)
            pdu_type, body = pdus.read_pdu(deadline)
            reserved = self._reserve()  # only now: a connection that never sends its request takes no slot
            info = self._negotiate(pdus, pdu_type, body, peer_ip, peer_port, busy=not reserved)
            if info is None:
                return
            self._settle(key)
            sock.settimeout(s.network_timeout_s)
            pdus.associated = True
            _Association(pdus, info[0], info[1], self.service, s.network_timeout_s).run()
        except ssl.SSLError as exc:
            log.warning("TLS handshake failed" if pdus is None else "association ended: TLS error", peer_ip=peer_ip,
                        error=type(exc).__name__, detail=exc.reason)
        except ProtocolError as exc:
            log.warning("association aborted: protocol error", peer_ip=peer_ip, detail=str(exc))
            _send_quietly(pdus, abort_pdu(exc.reason))
        except _PeerAborted:
            log.info("A-ABORT received before an association: connection closed", peer_ip=peer_ip)
        except TimeoutError:
            if pdus is not None and pdus.associated:
                log.warning("association aborted: a PDU did not arrive whole within network_timeout_s",
                            peer_ip=peer_ip)
                _send_quietly(pdus, abort_pdu(ABORT_NOT_SPECIFIED))
            else:  # ARTIM expired (PS3.8 AA-2): close the transport connection, nothing is sent
                log.warning("connection closed: no complete A-ASSOCIATE-RQ within acse_timeout_s", peer_ip=peer_ip)
        except (PeerClosed, OSError) as exc:
            with self._lock:
                expired = key in self._expired
            if expired:
                log.warning("connection closed: no complete A-ASSOCIATE-RQ within acse_timeout_s", peer_ip=peer_ip)
            elif isinstance(exc, PeerClosed) and pdus is not None and pdus.associated:
                log.info("connection closed by the peer", peer_ip=peer_ip)
            elif isinstance(exc, PeerClosed):  # a TCP probe (load balancer, monitoring): not worth an info line
                log.debug("connection closed before an association was requested", peer_ip=peer_ip)
            else:
                log.warning("association ended: connection error", peer_ip=peer_ip, error=type(exc).__name__)
        except Exception:  # a bug of ours: logged with its traceback, the association aborted, the listener lives on
            log.exception("association aborted: internal error", peer_ip=peer_ip)
            _send_quietly(pdus, abort_pdu(ABORT_NOT_SPECIFIED))
        finally:
            # the slots first: a peer that reconnects the moment it sees the close is not counted twice
            if reserved:
                self._release()
            self._settle(key)
            with self._lock:
                self._active.pop(key, None)
                self._expired.discard(key)
            sock.close()

    def _negotiate(self, pdus: PDUSocket, pdu_type: int, body: memoryview, peer_ip: str, peer_port: int,
                   busy: bool) -> tuple[AssociationInfo, Accepted] | None:
        s = self.settings
        if pdu_type == A_ABORT:  # PS3.8 AA-2 (Sta2): close, never answer an A-ABORT
            raise _PeerAborted
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


class _PeerAborted(Exception):
    """The peer sent an A-ABORT before any association: the connection is closed without an answer."""


class _Refusal:
    """The sink of a request answered without the service (unknown command, SOP class not its context's):
    its data set, if any, is read and dropped, then ``status`` goes back."""

    def __init__(self, status: int) -> None:
        self.status = status

    def write(self, data: memoryview) -> None:
        pass

    def discard(self) -> None:
        pass


class _Association:
    """The message loop of one accepted association."""

    def __init__(self, pdus: PDUSocket, info: AssociationInfo, accepted: Accepted, service: StorageService,
                 pdu_timeout_s: float) -> None:
        self.pdus = pdus
        self.info = info
        self.accepted = accepted
        self.service = service
        self.pdu_timeout_s = pdu_timeout_s
        self._command = bytearray()
        self._request: StoreRequest | None = None
        self._sink: DatasetSink | None = None

    def run(self) -> None:
        try:
            while True:
                pdu_type, body = self.pdus.read_pdu(time.monotonic() + self.pdu_timeout_s)
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
            if len(self._command) + len(fragment) > MAX_COMMAND_BYTES:
                raise ProtocolError(f"command set longer than {MAX_COMMAND_BYTES} bytes", ABORT_INVALID_PARAMETER)
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
            if isinstance(sink, _Refusal):
                self._send(failure_response(request.command, sink.status, context_id, self.accepted.peer_max_pdu))
                return
            status = self.service.end_store(self.info, request, sink)
            self._send(store_response(request.command, status, context_id, self.accepted.peer_max_pdu))

    def _on_command(self, context_id: int, command: Command) -> None:
        abstract, transfer = self.accepted.contexts[context_id]
        field = command.command_field
        if field == C_CANCEL_RQ or is_response(command):
            # C-CANCEL of an operation we do not run, or a response to nothing we asked: no answer is due
            log.warning("DIMSE message ignored", calling_ae=self.info.calling_ae, command=f"0x{field:04X}")
            return
        if field not in (C_ECHO_RQ, C_STORE_RQ):
            status = STATUS_UNRECOGNISED_OPERATION
        elif command.sop_class_uid and command.sop_class_uid != abstract:
            status = STATUS_SOP_CLASS_NOT_SUPPORTED  # not the SOP class its presentation context was accepted for
        elif (field == C_STORE_RQ) != command.has_dataset:
            raise ProtocolError(f"DIMSE command 0x{field:04X} with{'out' if not command.has_dataset else ''} a "
                                "data set", ABORT_INVALID_PARAMETER)
        elif field == C_ECHO_RQ:
            self._send(echo_response(command, 0x0000, context_id, self.accepted.peer_max_pdu))
            return
        else:
            request = StoreRequest(command, context_id, abstract, transfer)
            self._sink = self.service.begin_store(self.info, request)
            self._request = request
            return
        log.warning("DIMSE request refused", calling_ae=self.info.calling_ae, command=f"0x{field:04X}",
                    status=f"0x{status:04X}")
        if command.has_dataset:  # answered once its data set has arrived (and been dropped)
            self._request = StoreRequest(command, context_id, abstract, transfer)
            self._sink = _Refusal(status)
        else:
            self._send(failure_response(command, status, context_id, self.accepted.peer_max_pdu))

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
