"""DIMSE messages the listener handles (PS3.7): C-STORE-RQ and C-ECHO-RQ in, their responses out.

Command sets are always Implicit VR Little Endian and flat (PS3.7 6.3.1, E.1): a run of
``tag, 32-bit length, value`` with a fixed set of attributes.  They are decoded and encoded here
directly, at a few microseconds each, because they sit on the per-instance path; the test suite checks
both directions byte for byte against pynetdicom's DIMSE message classes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from dicom_node.errors import ProtocolError
from dicom_node.network.upper_layer import ABORT_INVALID_PARAMETER, p_data_pdu

__all__ = [
    "C_CANCEL_RQ",
    "C_ECHO_RQ",
    "C_ECHO_RSP",
    "C_STORE_RQ",
    "C_STORE_RSP",
    "Command",
    "command_pdus",
    "decode_command",
    "echo_response",
    "encode_command",
    "failure_response",
    "is_response",
    "store_response",
]

#: Command Field values (PS3.7 E.1)
C_STORE_RQ: Final = 0x0001
C_ECHO_RQ: Final = 0x0030
C_CANCEL_RQ: Final = 0x0FFF  # C-CANCEL-RQ carries no Message ID and gets no response
_RESPONSE_BIT: Final = 0x8000
_NO_DATASET: Final = 0x0101


@dataclass(frozen=True)
class Command:
    """The parts of a request's command set the listener uses."""

    command_field: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    has_dataset: bool
    move_originator_ae: str = ""


_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
# command set tags (group 0000)
_GROUP_LENGTH, _SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID, _RESPONDED_TO = 0x0000, 0x0002, 0x0100, 0x0110, 0x0120
_DATASET_TYPE, _STATUS, _SOP_INSTANCE, _MOVE_ORIGINATOR_AE = 0x0800, 0x0900, 0x1000, 0x1030
_US_TAGS = frozenset({_COMMAND_FIELD, _MESSAGE_ID, _RESPONDED_TO, _DATASET_TYPE, _STATUS, 0x0700, 0x1031})
C_STORE_RSP: Final = 0x8001
C_ECHO_RSP: Final = 0x8030
VERIFICATION: Final = "1.2.840.10008.1.1"


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii")


def decode_command(data: bytes) -> Command:
    """Decode a command set.

    Raises
    ------
    ProtocolError
        Not a well-formed command set with a Command Field and a Message ID.
    """
    values: dict[int, bytes] = {}
    at, end = 0, len(data)
    try:
        while at < end:
            group, element, length = _ELEMENT.unpack_from(data, at)
            at += 8
            if group != 0x0000 or at + length > end:
                raise ValueError(f"element ({group:04X},{element:04X}) of length {length}")
            values[element] = data[at : at + length]
            at += length
        for tag in _US_TAGS & values.keys():
            if len(values[tag]) != 2:
                raise ValueError(f"(0000,{tag:04X}) is not a US")
        command_field = _US.unpack(values[_COMMAND_FIELD])[0]
        if command_field == C_CANCEL_RQ:  # identified by Message ID Being Responded To instead
            values.setdefault(_MESSAGE_ID, values.get(_RESPONDED_TO, b"\x00\x00"))
        elif command_field & _RESPONSE_BIT:  # a response (a peer that thinks it is the SCP): no Message ID
            values.setdefault(_MESSAGE_ID, b"\x00\x00")
        return Command(
            command_field=command_field,
            message_id=_US.unpack(values[_MESSAGE_ID])[0],
            sop_class_uid=_text(values.get(_SOP_CLASS, b"")),
            sop_instance_uid=_text(values.get(_SOP_INSTANCE, b"")),
            has_dataset=_US.unpack(values.get(_DATASET_TYPE, b"\x01\x01"))[0] != _NO_DATASET,
            move_originator_ae=_text(values.get(_MOVE_ORIGINATOR_AE, b"")),
        )
    except (struct.error, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed DIMSE command set ({exc})", ABORT_INVALID_PARAMETER) from exc


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set from ``(element number, encoded value)`` pairs in ascending order; the Command
    Group Length is computed and prepended."""
    body = b"".join(_ELEMENT.pack(0x0000, tag, len(value)) + value for tag, value in elements)
    return _ELEMENT.pack(0x0000, _GROUP_LENGTH, 4) + _UL.pack(len(body)) + body


def command_pdus(command: bytes, context_id: int, max_pdu: int) -> bytes:
    """P-DATA-TF PDU(s) carrying one command set, fragmented for a peer whose maximum is ``max_pdu``."""
    room = max_pdu - 6 if max_pdu else len(command)
    if room <= 0:
        raise ProtocolError(f"peer maximum PDU length {max_pdu} is too small", ABORT_INVALID_PARAMETER)
    return b"".join(
        p_data_pdu(context_id, 0x03 if at + room >= len(command) else 0x01, command[at : at + room])  # last: 0x03
        for at in range(0, len(command), room)
    )


def store_response(request: Command, status: int, context_id: int, max_pdu: int) -> bytes:
    """The C-STORE-RSP for ``request``, as P-DATA-TF PDU bytes (``max_pdu``: the peer's maximum, 0 = none)."""
    command = encode_command([
        (_SOP_CLASS, _uid(request.sop_class_uid)),
        (_COMMAND_FIELD, _US.pack(C_STORE_RSP)),
        (_RESPONDED_TO, _US.pack(request.message_id)),
        (_DATASET_TYPE, _US.pack(_NO_DATASET)),
        (_STATUS, _US.pack(status)),
        (_SOP_INSTANCE, _uid(request.sop_instance_uid)),
    ])
    return command_pdus(command, context_id, max_pdu)


def echo_response(request: Command, status: int, context_id: int, max_pdu: int) -> bytes:
    """The C-ECHO-RSP for ``request``, as P-DATA-TF PDU bytes."""
    command = encode_command([
        (_SOP_CLASS, _uid(request.sop_class_uid or VERIFICATION)),
        (_COMMAND_FIELD, _US.pack(C_ECHO_RSP)),
        (_RESPONDED_TO, _US.pack(request.message_id)),
        (_DATASET_TYPE, _US.pack(_NO_DATASET)),
        (_STATUS, _US.pack(status)),
    ])
    return command_pdus(command, context_id, max_pdu)


def is_response(command: Command) -> bool:
    """Whether ``command`` is a response (Command Field with bit 15 set)."""
    return bool(command.command_field & _RESPONSE_BIT)


def failure_response(request: Command, status: int, context_id: int, max_pdu: int) -> bytes:
    """The response to a request the node does not perform — e.g. ``0x0211`` unrecognised operation or
    ``0x0122`` SOP class not supported (PS3.7 C.4) — in the response command of the request's own type
    (Command Field with bit 15 set), as P-DATA-TF PDU bytes."""
    elements: list[tuple[int, bytes]] = []
    if request.sop_class_uid:
        elements.append((_SOP_CLASS, _uid(request.sop_class_uid)))
    elements += [
        (_COMMAND_FIELD, _US.pack(request.command_field | _RESPONSE_BIT)),
        (_RESPONDED_TO, _US.pack(request.message_id)),
        (_DATASET_TYPE, _US.pack(_NO_DATASET)),
        (_STATUS, _US.pack(status)),
    ]
    if request.sop_instance_uid:
        elements.append((_SOP_INSTANCE, _uid(request.sop_instance_uid)))
    return command_pdus(encode_command(elements), context_id, max_pdu)
