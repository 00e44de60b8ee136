"""Coded concepts used by the SpineMed SR templates.

Standard codes come from :data:`pydicom.sr.codedict.codes` (SNOMED CT ``SCT``, DICOM ``DCM``,
UCUM, LOINC ``LN``).  Where no standard code is available in the DICOM content mapping resource
(findings such as disc herniation, transitional vertebrae, the S1 vertebra, SpineMed report
sections, region-specific imaging procedures), concepts come from one private coding scheme,
:data:`SCHEME_DESIGNATOR` (``99SPINEMED``), declared in every SR's Coding Scheme Identification
Sequence and documented in ``docs/codes.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TypeVar

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.findings import (
    VERTEBRAE,
    FindingType,
    ImagePlane,
    Laterality,
    MeasurementType,
    Severity,
    is_segment,
    normalise_level,
)

__all__ = [
    "CHANGE_CODES",
    "FINDING_CODES",
    "LATERALITY_CODES",
    "MEASUREMENT_CODES",
    "MEASUREMENT_FINDING",
    "MEYERDING_GRADE_CODES",
    "NARRATIVE_SECTIONS",
    "SCHEME_DESIGNATOR",
    "SCHEME_NAME",
    "SCHEME_VERSION",
    "SEVERITY_CODES",
    "SOURCES",
    "SpineCodes",
    "apply_site_codes",
    "coding_scheme_identification",
    "finding_for_code",
    "is_private",
    "level_code",
    "level_for_code",
    "measurement_for_code",
    "override_keys",
    "private_code",
    "procedure_code",
    "unit_code",
]

#: Designator of our private coding scheme (PS3.16 8.2: private designators start with ``99``).
SCHEME_DESIGNATOR = "99SPINEMED"
SCHEME_NAME = "SpineMed node private concepts"
SCHEME_VERSION = "1"
_RESPONSIBLE = "SpineMed node maintainers (see docs/codes.md)"


#: Where each standard code that pydicom's PS3.16 dictionary does not list was checked (scheme, value) ->
#: citation; ``scripts/codes_doc.py`` writes these, and the context groups of the others, into docs/codes.md.
_SOURCES: dict[tuple[str, str], str] = {
    ("UMLS", "C0034375"): "PS3.16 TID 1500 row 12 (Qualitative Evaluations container)",
    **{("SCT", v): "SNOMED CT IPS Free Set [S1]" for v in ("73589001", "77547008", "76107001", "274152003",
                                                          "50448004", "298382003")},
}
SOURCES: Mapping[tuple[str, str], str] = MappingProxyType(_SOURCES)


def private_code(value: str, meaning: str) -> Code:
    """A concept of the private ``99SPINEMED`` scheme."""
    return Code(value, SCHEME_DESIGNATOR, meaning)


def is_private(code: Code | CodedConcept) -> bool:
    """True where ``code`` belongs to the private ``99SPINEMED`` scheme."""
    return str(code.scheme_designator) == SCHEME_DESIGNATOR


def coding_scheme_identification() -> list[CodingSchemeIdentificationItem]:
    """Items of the Coding Scheme Identification Sequence (0008,0110) for our SR objects."""
    return [
        CodingSchemeIdentificationItem(
            designator=SCHEME_DESIGNATOR,
            name=SCHEME_NAME,
            version=SCHEME_VERSION,
            responsible_organization=_RESPONSIBLE,
        )
    ]


class SpineCodes:
    """Concept names used by the templates (standard where one exists, else private)."""

    # --- TID 1500 / 1501 / 300 structure (standard)
    FINDING = codes.DCM.Finding  # 121071
    FINDING_SITE = codes.SCT.FindingSite  # 363698007
    SEVERITY = codes.SCT.Severity  # 246112005
    LATERALITY = codes.SCT.Laterality  # 272741003
    TOPOGRAPHICAL_MODIFIER = codes.SCT.TopographicalModifier  # 106233006
    COMMENT = codes.DCM.Comment  # 121106
    IMAGE_REGION = codes.DCM.ImageRegion  # 111030
    SOURCE_IMAGE = codes.DCM.SourceImage  # 121324
    SOURCE_IMAGE_FOR_PROCESSING = codes.DCM.SourceImageForImageProcessingOperation  # 121322
    KEY_IMAGES = codes.LN.KeyImages  # 55113-5 (CID 7001)
    OF_INTEREST = codes.DCM.OfInterest  # 113000
    PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment  # 109102
    DEVICE = codes.DCM.Device  # 121007
    QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
    SUPERIOR = codes.SCT.Superior  # upper end vertebra of a Cobb angle
    INFERIOR = codes.SCT.Inferior  # lower end vertebra of a Cobb angle
    MIDLINE = codes.SCT.Midline  # "central" laterality of a disc finding
    ABSENT = codes.SCT.Absent  # 272519000: a condition assessed and not present

    # --- private: what the standard code sets (as carried by pydicom) lack
    MEYERDING_GRADE = private_code("MEYERDING", "Meyerding grade")
    LOCALISATION = private_code("LOCALISATION", "Localisation by the algorithm")
    NOT_LOCALISED = private_code("LOC-NONE", "Image given, not localised by the algorithm")
    NO_IMAGE_EVIDENCE = private_code("LOC-NOIMAGE", "No supporting image given by the algorithm")
    TRANSITIONAL = private_code("TRANSITIONAL", "Transitional vertebral anatomy")
    DEMO_WARNING = private_code("DEMO", "Demo model output - not for clinical use")

    # --- comparison with a prior study (sr_templates.comparison)
    PREVIOUS_FINDING = codes.DCM.PreviousFinding  # 121069 (CID 7002)
    INTERVAL = codes.SCT.Interval  # 385673002
    STUDY_INSTANCE_UID = codes.DCM.StudyInstanceUID  # 110180
    STUDY_DATE = codes.DCM.StudyDate  # 111060
    SOURCE_OF_MEASUREMENT = codes.DCM.SourceOfMeasurement  # 121112 (CID 7003): the prior SR read
    DAYS = codes.UCUM.Day  # d
    CHANGE_SINCE_PRIOR = private_code("CHANGE", "Change since prior study")
    DIFFERENCE_FROM_PRIOR = private_code("CHANGE-VALUE", "Difference from prior study")
    NOT_SEEN = private_code("NOT-SEEN", "Reported in the prior study, not seen now")

    # --- narrative report (TID 2000-like)
    DIAGNOSTIC_IMAGING_REPORT = codes.LN.DiagnosticImagingReport  # 18748-4

    # --- consultation (sr_templates.consultation): questions and answers about a report
    REQUEST = codes.DCM.Request  # 121062: a question asked
    SOURCE_REPORT = codes.DCM.SourceReport  # 128225: the SR the consultation discusses


_K = TypeVar("_K")


def _inverse(table: Mapping[_K, Code], code: Code | CodedConcept) -> _K:
    """The concept a code stands for in one of our tables (read at call time: site codes apply)."""
    key = (str(code.scheme_designator), str(code.value))
    for concept, c in table.items():
        if (c.scheme_designator, c.value) == key:
            return concept
    raise KeyError(key)


# ------------------------------------------------------------------------------------------ levels
def _vertebra_keyword(name: str) -> str:
    return f"{name}Vertebra"


def _disc_keyword(segment: str) -> str:
    upper, lower = segment.split("-")
    return f"{upper}{lower}Disc"


def _build_level_codes() -> dict[str, Code]:
    from inference.findings import LEVELS

    table: dict[str, Code] = {}
    for level in LEVELS:
        keyword = _disc_keyword(level) if is_segment(level) else _vertebra_keyword(level)
        if level == "C1-C2":  # no disc between atlas and axis: the motion segment is the atlanto-axial joint
            keyword = "AtlantalAxialJoint"  # 62555009, PS3.16 CID 7482/7483/8134
        try:
            table[level] = getattr(codes.SCT, keyword)
        except AttributeError:
            if is_segment(level):
                upper, lower = level.split("-")
                meaning = f"{upper}/{lower} disc"
            else:
                meaning = f"{level} vertebra"
            table[level] = private_code(f"LEVEL-{level}", meaning)
    return table


_LEVELS: dict[str, Code] = _build_level_codes()
_LEVEL_CODES: Mapping[str, Code] = MappingProxyType(_LEVELS)


def level_code(level: str) -> Code:
    """The anatomic code of a vertebra (``"L4"``) or disc / motion segment (``"L4-L5"``).

    SNOMED CT from the DICOM content mapping resource where it exists; ``99SPINEMED`` for
    transitional anatomy (``T13``, ``L6``, ...), ``S1`` and ``C1-C2``.

    Raises
    ------
    TypeError
        ``level`` is not a ``str``.
    inference.findings.LevelError
        ``level`` is not a vertebra or motion segment.
    """
    return _LEVEL_CODES[normalise_level(level)]


def level_for_code(code: Code | CodedConcept) -> str:
    """Inverse of :func:`level_code`.

    Raises
    ------
    KeyError
        ``code`` is not the code of a level.
    """
    return _inverse(_LEVELS, code)


# ------------------------------------------------------------------------------------------ findings
_FINDINGS: dict[FindingType, Code] = dict(
    {
        # SNOMED CT from the IPS Free Set [S1] where a concept matches; the others have none that does
        FindingType.DISC_HERNIATION: Code("73589001", "SCT", "Intervertebral disc prolapse"),
        FindingType.DISC_BULGE: private_code("DISC-BULGE", "Disc bulge"),
        FindingType.DEGENERATIVE_DISC_DISEASE: Code("77547008", "SCT", "Degeneration of intervertebral disc"),
        FindingType.SPINAL_CANAL_STENOSIS: Code("76107001", "SCT", "Spinal stenosis"),
        FindingType.FORAMINAL_STENOSIS: private_code("FORAMEN-STENOSIS", "Foraminal stenosis"),
        FindingType.MODIC_CHANGE: private_code("MODIC", "Modic endplate change"),
        FindingType.SPONDYLOLISTHESIS: Code("274152003", "SCT", "Spondylolisthesis"),
        FindingType.VERTEBRAL_FRACTURE: Code("50448004", "SCT", "Fracture of vertebral column"),
        FindingType.SCOLIOSIS: Code("298382003", "SCT", "Scoliosis deformity of spine"),
        FindingType.NO_ABNORMALITY: codes.DCM.NoAbnormality,  # 111286
    }
)
FINDING_CODES: Mapping[FindingType, Code] = MappingProxyType(_FINDINGS)


def finding_for_code(code: Code | CodedConcept) -> FindingType:
    """Inverse of :data:`FINDING_CODES`.

    Raises
    ------
    KeyError
        ``code`` is not one of our finding codes.
    """
    return _inverse(_FINDINGS, code)


def measurement_for_code(code: Code | CodedConcept) -> MeasurementType:
    """Inverse of :data:`MEASUREMENT_CODES`.

    Raises
    ------
    KeyError
        ``code`` is not one of our measurement codes.
    """
    return _inverse(_MEASUREMENTS, code)


#: Severity of a present finding.  ``Severity.NONE`` has no code: on a condition it means the condition
#: is absent (coded as :attr:`SpineCodes.ABSENT`), on ``no_abnormality`` there is nothing to grade.
SEVERITY_CODES: Mapping[Severity, Code] = MappingProxyType(
    {
        Severity.MILD: codes.SCT.Mild,  # 255604002
        Severity.MODERATE: codes.SCT.Moderate,  # 6736007
        Severity.SEVERE: codes.SCT.Severe,  # 24484000
    }
)

_ROMAN = ("I", "II", "III", "IV", "V")
MEYERDING_GRADE_CODES: Mapping[int, Code] = MappingProxyType(
    {g: private_code(f"MEYERDING-{g}", f"Meyerding grade {_ROMAN[g - 1]}") for g in range(1, 6)}
)

#: What changed since the prior study (:class:`inference.comparison.ChangeKind`): PS3.16 CID 6002 "Change
#: Since Last Mammogram or Prior Surgery" holds the general SNOMED CT change findings; a finding of the prior
#: not seen now has no concept there.
CHANGE_CODES: Mapping[str, Code] = MappingProxyType(
    {
        "new": codes.SCT.NewFinding,  # 129721008
        "increased": codes.SCT.IncreaseInSize,  # 15454001
        "decreased": codes.SCT.DecreaseInSize,  # 19776001
        "unchanged": codes.SCT.NoSignificantChangesInTheFinding,  # 129723006
        "not_seen": SpineCodes.NOT_SEEN,
    }
)

#: Laterality codes; ``CENTRAL`` is not a laterality and is coded as a topographical modifier.
LATERALITY_CODES: Mapping[Laterality, Code] = MappingProxyType(
    {
        Laterality.LEFT: codes.SCT.Left,  # 7771000
        Laterality.RIGHT: codes.SCT.Right,  # 24028007
        Laterality.BILATERAL: codes.SCT.Bilateral,  # 51440002
        Laterality.CENTRAL: codes.SCT.Midline,  # 261129000
    }
)

# ------------------------------------------------------------------------------------------ measurements
_MEASUREMENTS: dict[MeasurementType, Code] = dict(
    {
        MeasurementType.COBB_ANGLE: codes.SCT.CobbAngle,  # 285285000
        MeasurementType.SLIP_PERCENTAGE: private_code("SLIP-PCT", "Vertebral slip percentage"),
        MeasurementType.SLIP_DISTANCE: private_code("SLIP-MM", "Vertebral slip distance"),
        MeasurementType.CANAL_AP_DIAMETER: private_code("CANAL-AP", "Spinal canal anteroposterior diameter"),
        MeasurementType.DISC_HEIGHT: private_code("DISC-HEIGHT", "Intervertebral disc height"),
        MeasurementType.VERTEBRAL_HEIGHT_LOSS: private_code("VB-HEIGHT-LOSS", "Vertebral body height loss"),
    }
)
MEASUREMENT_CODES: Mapping[MeasurementType, Code] = MappingProxyType(_MEASUREMENTS)

#: The finding each measurement type normally belongs to (used to re-associate on reading).
MEASUREMENT_FINDING: Mapping[MeasurementType, frozenset[FindingType]] = MappingProxyType(
    {
        MeasurementType.COBB_ANGLE: frozenset({FindingType.SCOLIOSIS}),
        MeasurementType.SLIP_PERCENTAGE: frozenset({FindingType.SPONDYLOLISTHESIS}),
        MeasurementType.SLIP_DISTANCE: frozenset({FindingType.SPONDYLOLISTHESIS}),
        MeasurementType.CANAL_AP_DIAMETER: frozenset(
            {FindingType.SPINAL_CANAL_STENOSIS, FindingType.DISC_HERNIATION, FindingType.DISC_BULGE}
        ),
        MeasurementType.DISC_HEIGHT: frozenset(
            {FindingType.DEGENERATIVE_DISC_DISEASE, FindingType.DISC_BULGE, FindingType.DISC_HERNIATION}
        ),
        MeasurementType.VERTEBRAL_HEIGHT_LOSS: frozenset({FindingType.VERTEBRAL_FRACTURE}),
    }
)

_UNITS: Mapping[str, Code] = MappingProxyType(
    {
        "deg": codes.UCUM.Degree,
        "%": codes.UCUM.Percent,
        "mm": codes.UCUM.Millimeter,
    }
)


def unit_code(unit: str) -> Code:
    """The UCUM code of ``unit`` (``deg``, ``%``, ``mm``).

    Raises
    ------
    ValueError
        ``unit`` is not one of the units of :data:`inference.findings.MEASUREMENT_UNITS`.
    """
    try:
        return _UNITS[unit]
    except KeyError:
        raise ValueError(f"unit: {unit!r} is not a supported UCUM unit") from None


# ------------------------------------------------------------------------------------------ procedure
_REGION_NAMES = {"C": "cervical", "T": "thoracic", "L": "lumbar", "S": "lumbar"}
_MODALITY_NAMES = {"MR": "MRI", "CT": "CT", "CR": "Radiography", "DX": "Radiography", "XA": "Radiography"}


def spine_region(levels: list[str], body_parts: list[str]) -> str:
    """``cervical``/``thoracic``/``lumbar`` or ``whole``, from the reported levels (else body part)."""
    regions = {_REGION_NAMES[v[0]] for lv in levels for v in lv.split("-")}
    if not regions:
        for part in body_parts:
            p = part.upper()
            if "WHOLE" in p or p == "SPINE":
                regions.add("whole")
            for key, name in (("CSPINE", "cervical"), ("TSPINE", "thoracic"), ("LSPINE", "lumbar")):
                if key in p:
                    regions.add(name)
    if len(regions) == 1:
        return regions.pop()
    return "whole"


_REGIONS = ("cervical", "thoracic", "lumbar", "whole")
_PROCEDURE_MODALITIES = {"MR": "MR", "CT": "CT", "CR": "XR", "DX": "XR", "XA": "XR"}  # else "IMG"


def _default_procedure(kind: str, region: str) -> Code:
    region_text = "whole spine" if region == "whole" else f"{region} spine"
    names = {"MR": "MRI", "CT": "CT", "XR": "Radiography", "IMG": "Imaging"}
    return private_code(f"PROC-{kind}-{region[0].upper()}", f"{names[kind]} of {region_text}")


#: LOINC / RSNA Radiology Playbook terms for imaging of each spine region by each modality, the ones that
#: say nothing about contrast or number of views (the node does not know them).  Other modalities keep a
#: private code.
_LOINC_PROCEDURES: dict[tuple[str, str], tuple[str, str]] = {
    ("MR", "cervical"): ("24935-9", "MR Cervical spine"),
    ("MR", "thoracic"): ("24980-5", "MR Thoracic spine"),
    ("MR", "lumbar"): ("24968-0", "MR Lumbar spine"),
    ("MR", "whole"): ("36067-7", "MR Spine"),
    ("CT", "cervical"): ("24932-6", "CT Cervical spine"),
    ("CT", "thoracic"): ("24978-9", "CT Thoracic spine"),
    ("CT", "lumbar"): ("24963-1", "CT Lumbar spine"),
    ("CT", "whole"): ("28566-8", "CT Spine"),
    ("XR", "cervical"): ("24946-6", "XR Cervical spine Views"),
    ("XR", "thoracic"): ("24983-9", "XR Thoracic spine Views"),
    ("XR", "lumbar"): ("24972-2", "XR Lumbar spine Views"),
    ("XR", "whole"): ("28613-8", "XR Spine Views"),
}
_PROCEDURES: dict[tuple[str, str], Code] = {
    (kind, region): (
        Code(*_LOINC_PROCEDURES[(kind, region)][:1], "LN", _LOINC_PROCEDURES[(kind, region)][1])
        if (kind, region) in _LOINC_PROCEDURES
        else _default_procedure(kind, region)
    )
    for kind in ("MR", "CT", "XR", "IMG")
    for region in _REGIONS
}
_PLAYBOOK_SOURCE = "LOINC Playbook term [L1]"  # the references are in docs/codes.md
_SOURCES.update({("LN", value): _PLAYBOOK_SOURCE for value, _ in _LOINC_PROCEDURES.values()})


def procedure_code(modality: str, region: str) -> Code:
    """Procedure Reported: imaging of a spine region by a modality.

    Parameters
    ----------
    modality
        DICOM modality of the analysed images (``MR``, ``CT``, ``CR``, ``DX``; others fall back to
        a generic spine imaging procedure).
    region
        ``cervical``, ``thoracic``, ``lumbar`` or ``whole``.

    Raises
    ------
    ValueError
        ``region`` is not one of the four regions.
    """
    if region not in _REGIONS:
        raise ValueError(f"region: {region!r} is not cervical, thoracic, lumbar or whole")
    return _PROCEDURES[(_PROCEDURE_MODALITIES.get(modality.upper(), "IMG"), region)]


# ------------------------------------------------------------------------------------------ site overrides
_DEFAULTS = (dict(_LEVELS), dict(_FINDINGS), dict(_MEASUREMENTS), dict(_PROCEDURES))


def override_keys() -> list[str]:
    """Every key a site may map to its own code: ``finding.<type>``, ``level.<level>``,
    ``measurement.<type>``, ``procedure.<MR|CT|XR|IMG>.<cervical|thoracic|lumbar|whole>``."""
    return (
        [f"finding.{f.value}" for f in _DEFAULTS[1]]
        + [f"level.{lv}" for lv in _DEFAULTS[0]]
        + [f"measurement.{m.value}" for m in _DEFAULTS[2]]
        + [f"procedure.{k}.{r}" for k, r in _DEFAULTS[3]]
    )


def apply_site_codes(overrides: Mapping[str, Code]) -> None:
    """Replace our codes by a site's (its terminology service's, a newer SNOMED CT release's), process-wide.

    Called once at start with ``[output.codes]`` from the config; every call starts from the built-in
    codes, so ``apply_site_codes({})`` restores them.  Outputs and the SR reader use the mapped codes.

    Raises
    ------
    TypeError
        A value is not a :class:`pydicom.sr.coding.Code`.
    ValueError
        A key is not one of :func:`override_keys`, or two concepts would share one code.
    """
    known = set(override_keys())
    for key, code in overrides.items():
        if key not in known:
            raise ValueError(f"overrides: {key!r} is not a concept that can be mapped (see override_keys())")
        if not isinstance(code, Code):
            raise TypeError(f"overrides: {key!r} must map to a Code, got {type(code).__name__}")
    levels: dict[str, Code] = dict(_DEFAULTS[0])
    findings: dict[FindingType, Code] = dict(_DEFAULTS[1])
    measurements: dict[MeasurementType, Code] = dict(_DEFAULTS[2])
    procedures: dict[tuple[str, str], Code] = dict(_DEFAULTS[3])
    for key, code in overrides.items():
        table, _, name = key.partition(".")
        if table == "level":
            levels[name] = code
        elif table == "finding":
            findings[FindingType(name)] = code
        elif table == "measurement":
            measurements[MeasurementType(name)] = code
        else:
            kind, _, region = name.partition(".")
            procedures[(kind, region)] = code
    for label, pairs in (
        ("level", list(levels.items())),
        ("finding", [(str(k.value), v) for k, v in findings.items()]),
        ("measurement", [(str(k.value), v) for k, v in measurements.items()]),
    ):
        seen: dict[tuple[str, str], str] = {}
        for concept, code in pairs:
            key2 = (code.scheme_designator, code.value)
            if key2 in seen:
                raise ValueError(f"overrides: {label} {concept} and {seen[key2]} would share the code {key2}")
            seen[key2] = concept
    _LEVELS.clear()
    _LEVELS.update(levels)
    _FINDINGS.clear()
    _FINDINGS.update(findings)
    _MEASUREMENTS.clear()
    _MEASUREMENTS.update(measurements)
    _PROCEDURES.clear()
    _PROCEDURES.update(procedures)


# ------------------------------------------------------------------------------------------ narrative
#: (field of NarrativeReport, section heading, text concept name), in report order.
NARRATIVE_SECTIONS: tuple[tuple[str, Code, Code], ...] = (
    # headings: LOINC, the encoding PS3.16 CID 7001 prefers (the DCM equivalents 121070/121072/121074 are kept
    # there for backward compatibility); text items: DCM 121071 / 121073 / 121075 (TID 2002)
    ("findings", codes.LN.Findings, codes.DCM.Finding),  # 59776-5
    ("diagnosis", codes.LN.Impressions, codes.DCM.Impression),  # 19005-8
    ("treatment_suggestions", codes.LN.Recommendations, codes.DCM.Recommendation),  # 18783-1
    (
        "risk_and_prognosis",
        private_code("SEC-RISK", "Risk and prognosis"),
        private_code("RISK-PROGNOSIS", "Risk and prognosis statement"),
    ),
    (
        "follow_up",
        private_code("SEC-FOLLOW-UP", "Follow-up and post-operative management"),
        private_code("FOLLOW-UP", "Follow-up statement"),
    ),
    (
        "diagnostic_basis",
        private_code("SEC-DX-BASIS", "Diagnostic basis"),
        private_code("DIAGNOSTIC-BASIS", "Diagnostic basis statement"),
    ),
)

#: Planes in which an input image shows the spine's levels along its length (key image choice).
LONGITUDINAL_PLANES = frozenset({ImagePlane.SAGITTAL, ImagePlane.CORONAL, ImagePlane.PROJECTION})

#: Every vertebra name (re-exported for docs generation).
ALL_VERTEBRAE = VERTEBRAE
