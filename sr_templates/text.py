"""Human-readable strings shared by the SR objects and the key image."""

from __future__ import annotations

from collections.abc import Sequence

from inference.findings import FindingType, LevelFinding, Severity

__all__ = ["DEMO_SERIES_SUFFIX", "DEMO_TEXT", "NOT_FOR_DIAGNOSTIC_USE", "finding_label", "finding_summary"]

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
DEMO_TEXT = (
    "DEMO MODEL OUTPUT - demo, not for clinical use - NOT FOR DIAGNOSTIC USE. "
    "These results come from a randomly initialised demonstration model and carry no medical meaning."
)
DEMO_SERIES_SUFFIX = " (DEMO - NOT FOR DIAGNOSTIC USE)"

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


def finding_label(f: LevelFinding) -> str:
    """``"disc herniation, moderate, left"``: one finding, short."""
    parts = [_NAMES[f.finding]]
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
