"""The six attributes the listener checks on every received instance, read without building a Dataset.

Before answering a C-STORE the listener needs the SOP Class and Instance UIDs (to compare with the
request), the Study and Series Instance UIDs (the spool path, the job) and Modality and Series
Description (routing).  pydicom reads them in ~1 ms of CPU per instance on a small server — more than
the whole protocol exchange — so :func:`scan_header` walks the top-level elements of the first bytes of
the data set directly, skipping values (and nested sequences) up to (0020,000E), in tens of
microseconds.

It handles Implicit and Explicit VR Little Endian data sets, defined and undefined lengths.  For
anything else — deflated or big-endian data sets, a header longer than the bytes given, values that
are not plain ASCII (their character set would matter), malformed structure — it returns ``None`` and
the caller reads the instance with pydicom.  The tests compare it with pydicom on pydicom's own test
files and on every synthetic phantom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["HeaderFields", "scan_header"]

_IMPLICIT_LE = "1.2.840.10008.1.2"
#: deflated (1.2.840.10008.1.2.1.99, and the JPIP deflate variant) and big endian data sets
_PYDICOM_ONLY = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.2"})
#: explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_WANTED = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080060: "modality",
    0x0008103E: "series_description",
    0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid",
}
_LAST = 0x0020000E
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_MAX_DEPTH = 16


@dataclass(frozen=True)
class HeaderFields:
    """What the listener reads of a received data set."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_description: str

    @classmethod
    def from_dataset(cls, ds: Any) -> HeaderFields:
        """The same attributes from a pydicom Dataset (raises ``AttributeError`` if a UID is missing)."""
        return cls(
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            modality=str(ds.get("Modality", "") or ""),
            series_description=str(ds.get("SeriesDescription", "") or ""),
        )


class _Unsupported(Exception):
    """Leave this one to pydicom."""


def _element(data: bytes, pos: int, explicit: bool) -> tuple[int, int, int]:
    """``(tag, value length, value offset)`` of the element at ``pos``."""
    if pos + 8 > len(data):
        raise _Unsupported
    group, elem = _TAG.unpack_from(data, pos)
    tag = group << 16 | elem
    if group == 0xFFFE or not explicit:  # item and delimiter tags never carry a VR
        return tag, _U32.unpack_from(data, pos + 4)[0], pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _Unsupported
        return tag, _U32.unpack_from(data, pos + 8)[0], pos + 12
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise _Unsupported  # not a VR: malformed, or implicit data under an explicit transfer syntax
    return tag, _U16.unpack_from(data, pos + 6)[0], pos + 8


def _skip_sequence(data: bytes, pos: int, explicit: bool, depth: int) -> int:
    """Skip an undefined-length sequence's items; returns the offset after its delimiter."""
    if depth > _MAX_DEPTH:
        raise _Unsupported
    while True:
        tag, length, pos = _element(data, pos, False)
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Unsupported
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements up to the item delimiter
            tag, length, pos = _element(data, pos, explicit)
            if tag == _ITEM_END:
                break
            pos = _skip_sequence(data, pos, explicit, depth + 1) if length == _UNDEFINED else pos + length


def _text(value: bytes) -> str:
    if not value.isascii():
        raise _Unsupported  # the Specific Character Set would matter: pydicom decodes it
    return value.decode("ascii").strip("\x00 ")


def scan_header(data: bytes, transfer_syntax_uid: str) -> HeaderFields | None:
    """The listener's six attributes from the start of an encoded data set, or ``None`` to use pydicom.

    Parameters
    ----------
    data
        The first bytes of the data set (no preamble or file meta).
    transfer_syntax_uid
        The transfer syntax it was sent with.
    """
    if transfer_syntax_uid in _PYDICOM_ONLY:
        return None
    # every other transfer syntax (encapsulated ones included) encodes the data set as Explicit VR LE
    explicit = transfer_syntax_uid != _IMPLICIT_LE
    found: dict[str, str] = {}
    pos = 0
    try:
        while len(found) < len(_WANTED):
            tag, length, pos = _element(data, pos, explicit)
            if tag > _LAST:
                break
            if length == _UNDEFINED:
                pos = _skip_sequence(data, pos, explicit, 0)
                continue
            if pos + length > len(data):
                raise _Unsupported
            name = _WANTED.get(tag)
            if name is not None:
                found[name] = _text(data[pos : pos + length])
            pos += length
    except (_Unsupported, struct.error):
        return None
    for required in ("sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid"):
        if not found.get(required):
            return None  # absent or empty: pydicom decides (and the listener refuses)
    return HeaderFields(
        sop_class_uid=found["sop_class_uid"],
        sop_instance_uid=found["sop_instance_uid"],
        study_instance_uid=found["study_instance_uid"],
        series_instance_uid=found["series_instance_uid"],
        modality=found.get("modality", ""),
        series_description=found.get("series_description", ""),
    )
