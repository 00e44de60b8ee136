"""Human-readable strings shared by the SR objects and the key image."""

from __future__ import annotations

import re
from collections.abc import Sequence

from inference.findings import FindingType, LevelFinding, Severity

__all__ = [
    "DEMO_SERIES_SUFFIX",
    "DEMO_TEXT",
    "NOT_FOR_DIAGNOSTIC_USE",
    "finding_label",
    "finding_summary",
    "short_string",
    "text_value",
]

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
DEMO_TEXT = (
    "DEMO MODEL OUTPUT - demo, not for clinical use - NOT FOR DIAGNOSTIC USE. "
    "These results come from a randomly initialised demonstration model and carry no medical meaning."
)
DEMO_SERIES_SUFFIX = " (DEMO - NOT FOR DIAGNOSTIC USE)"

_DASHES = str.maketrans({"\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-"})


#: C0 controls but TAB, LF, FF, CR; DEL; C1 controls; lone surrogates: no DICOM text VR (ST, LT, UT) allows them
#: (PS3.5 6.1.3; ESC is left out too: it would switch character sets)
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def text_value(value: str) -> str:
    """``value`` fit for a TEXT content item (UT) or ST/LT: characters no text VR allows are dropped (a
    model's answer can hold any character JSON can escape)."""
    return _NOT_TEXT.sub("", value)


def short_string(value: str, limit: int = 64) -> str:
    """``value`` fit for a LO/SH element: typographic dashes as ``-`` and cut to ``limit`` *bytes* of UTF-8
    (dciodvfy counts bytes: "—" is three), never inside a character."""
    text = value.translate(_DASHES)
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", errors="ignore").rstrip()


_NAMES = {
    FindingType.DISC_HERNIATION: "disc herniation",
    FindingType.DISC_BULGE: "disc bulge",
    FindingType.DEGENERATIVE_DISC_DISEASE: "degenerative disc disease",
    FindingType.SPINAL_CANAL_STENOSIS: "spinal canal stenosis",
    FindingType.FORAMINAL_STENOSIS: "foraminal stenosis",
    FindingType.MODIC_CHANGE: "Modic change",
    FindingType.SPONDYLOLISTHESIS: "spondylolisthesis",
    FindingType.VERTEBRAL_FRACTURE: "vertebral fracture",
    FindingType.SCOLIOSIS: "scoliosis",
    FindingType.NO_ABNORMALITY: "no abnormality",
}
_ROMAN = ("I", "II", "III", "IV", "V")


def finding_name(finding: FindingType) -> str:
    """``"disc herniation"``: the plain name of a finding type."""
    return _NAMES[finding]


def finding_label(f: LevelFinding) -> str:
    """``"disc herniation, moderate, left"``: one finding, short (``"no vertebral fracture"`` when absent)."""
    parts = [f"no {_NAMES[f.finding]}" if f.absent else _NAMES[f.finding]]
    if f.grade is not None:
        parts.append(f"grade {_ROMAN[f.grade - 1]}")
    if f.severity is not Severity.NONE:
        parts.append(f.severity.value)
    if f.laterality is not None:
        parts.append(f.laterality.value)
    for m in f.measurements:
        value = f"{m.value:g}{'' if m.unit == '%' else ' '}{'deg' if m.unit == 'deg' else m.unit}"
        if m.upper_end_vertebra and m.lower_end_vertebra:
            value += f" {m.upper_end_vertebra}-{m.lower_end_vertebra}"
        parts.append(value)
    return ", ".join(parts)


def finding_summary(level: str, findings: Sequence[LevelFinding]) -> str:
    """``"L4-L5: disc herniation, moderate, left"``: all findings at one level, short."""
    return f"{level}: " + "; ".join(finding_label(f) for f in findings)
