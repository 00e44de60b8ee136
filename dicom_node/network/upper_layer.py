"""DICOM Upper Layer (PS3.8 section 9) for the listener: PDU framing on one blocking socket.

The listener runs one thread per association and reads PDUs straight off the socket: a 6-byte header,
then the body into a buffer reused for the whole association.  P-DATA-TF bodies are split into
presentation data values here; A-ASSOCIATE, A-RELEASE and A-ABORT PDUs are encoded and decoded with
pynetdicom's own PDU classes (:mod:`dicom_node.network.acceptor`).

Why not pynetdicom's association reactor: its two polling threads per association, an event queue and
a state-machine step per PDU cost ~6 ms per instance on a 2-core server (storescu -> a pynetdicom SCP
that does nothing: 130-160 instances/s, against 500-740/s into dcmtk ``storescp``); see
``benchmarks/README.md``.  The storage SCP only needs the acceptor half of the protocol, which is small.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Final

from dicom_node.errors import PeerClosed, ProtocolError

__all__ = [
    "ABORT_INVALID_PARAMETER",
    "ABORT_NOT_SPECIFIED",
    "ABORT_UNEXPECTED_PDU",
    "ABORT_UNRECOGNISED_PDU",
    "A_ABORT",
    "A_ASSOCIATE_AC",
    "A_ASSOCIATE_RJ",
    "A_ASSOCIATE_RQ",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "MAX_PDU_LENGTH",
    "P_DATA_TF",
    "RELEASE_RP_PDU",
    "PDUSocket",
    "abort_pdu",
    "iter_pdvs",
    "p_data_pdu",
]

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ: Final = 0x01
A_ASSOCIATE_AC: Final = 0x02
A_ASSOCIATE_RJ: Final = 0x03
P_DATA_TF: Final = 0x04
A_RELEASE_RQ: Final = 0x05
A_RELEASE_RP: Final = 0x06
A_ABORT: Final = 0x07
_KNOWN = frozenset({A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT})

# A-ABORT provider reasons (PS3.8 9.3.8, source 0x02 = service provider)
ABORT_NOT_SPECIFIED: Final = 0x00
ABORT_UNRECOGNISED_PDU: Final = 0x01
ABORT_UNEXPECTED_PDU: Final = 0x02
ABORT_INVALID_PARAMETER: Final = 0x06

#: Maximum P-DATA-TF PDU length we announce (Maximum Length Sub-Item).  Large PDUs mean fewer reads per
#: instance; the buffer is per association, so memory does not grow with study size.
MAX_PDU_LENGTH: Final = 1 << 20
#: A-ASSOCIATE-RQ with every storage class and transfer syntax stays well below this.
_MAX_CONTROL_PDU: Final = 1 << 20
_HEADER = struct.Struct(">BxI")
_TIMEOUT_SLACK_S: Final = 1.0
_PDV_HEADER = struct.Struct(">IBB")


class PDUSocket:
    """Reads and writes whole PDUs on a connected (optionally TLS) socket.

    Parameters
    ----------
    sock
        The connected socket, blocking, with its timeout already set.
    max_pdu_length
        The largest P-DATA-TF body accepted (what we announced); other PDUs are capped separately.
    """

    def __init__(self, sock: socket.socket, max_pdu_length: int = MAX_PDU_LENGTH) -> None:
        self.sock = sock
        self.max_pdu_length = max_pdu_length
        #: set once an association is established on this connection
        self.associated = False
        self._header = bytearray(_HEADER.size)
        self._body = bytearray(64 * 1024)

    def _read_exactly(self, view: memoryview, deadline: float | None) -> None:
        got = 0
        total = len(view)
        sock = self.sock
        while got < total:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("PDU not complete before its deadline")
                # settimeout costs two fcntl calls under the GIL: change it only when the deadline is more
                # than a second off what is set (so a PDU may overrun its deadline by at most that second)
                current = sock.gettimeout()
                if current is None or abs(current - left) > _TIMEOUT_SLACK_S:
                    sock.settimeout(left)
            n = sock.recv_into(view[got:], total - got)
            if n == 0:
                raise PeerClosed("connection closed by the peer")
            got += n

    def read_pdu(self, deadline: float | None = None) -> tuple[int, memoryview]:
        """Read one PDU: ``(pdu type, body)``.  The body is valid until the next call.

        Parameters
        ----------
        deadline
            ``time.monotonic()`` by which the whole PDU must have arrived, however it trickles in;
            ``None``: only the socket's own timeout, per read.

        Raises
        ------
        ProtocolError
            Unknown PDU type or a length over the limits.
        PeerClosed
            The connection was closed (before or in the middle of a PDU).
        TimeoutError
            The PDU was not complete by ``deadline`` (or a read waited longer than the socket's timeout).
        """
        header = memoryview(self._header)
        self._read_exactly(header, deadline)
        pdu_type, length = _HEADER.unpack(self._header)
        if pdu_type not in _KNOWN:
            raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNISED_PDU)
        limit = self.max_pdu_length + 6 if pdu_type == P_DATA_TF and self.max_pdu_length else _MAX_CONTROL_PDU
        if length > limit:
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} of {length} bytes exceeds {limit}",
                                ABORT_INVALID_PARAMETER)
        if length > len(self._body):
            self._body = bytearray(length)
        body = memoryview(self._body)[:length]
        self._read_exactly(body, deadline)
        return pdu_type, body

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self.sock.sendall(data)


def iter_pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """The presentation data values of a P-DATA-TF body: ``(context id, control header, fragment)``.

    Raises
    ------
    ProtocolError
        An item length runs past the PDU or is too short to hold its header.
    """
    at = 0
    end = len(body)
    while at < end:
        if end - at < _PDV_HEADER.size:
            raise ProtocolError("truncated presentation data value item", ABORT_INVALID_PARAMETER)
        length, context_id, control = _PDV_HEADER.unpack_from(body, at)
        if length < 2 or at + 4 + length > end:
            raise ProtocolError(f"presentation data value item length {length} is invalid",
                                ABORT_INVALID_PARAMETER)
        yield context_id, control, body[at + 6 : at + 4 + length]
        at += 4 + length


def p_data_pdu(context_id: int, control: int, fragment: bytes) -> bytes:
    """One P-DATA-TF PDU holding one presentation data value."""
    return b"".join((_HEADER.pack(P_DATA_TF, len(fragment) + 6), _PDV_HEADER.pack(len(fragment) + 2, context_id,
                                                                                     control), fragment))


#: the A-RELEASE-RP PDU (it has no parameters)
RELEASE_RP_PDU: Final = bytes((A_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def abort_pdu(reason: int = ABORT_NOT_SPECIFIED, source: int = 0x02) -> bytes:
    """An A-ABORT PDU (source 0x02: service provider, with ``reason``; 0x00: service user)."""
    return bytes((A_ABORT, 0, 0, 0, 0, 4, 0, 0, source, reason if source == 0x02 else 0))
