"""Which objects in an Orthanc study are ours, and which studies are worth sending to the node.

Pure functions on Orthanc's *main DICOM tags* (what ``/studies/{id}/series`` returns), standard library
only, so the loop guard is unit-tested without Orthanc and runs inside Orthanc's interpreter.

Our result objects are written by ``sr_templates`` in up to four series, one modality each: the
measurement and narrative SRs ("SpineMed AI results", ``output.series_number``), the key image ("SpineMed
AI key images", the next number), its key object selection ("SpineMed AI key image note", +2) and the
PDF report ("SpineMed AI report (PDF)", +3); all have Manufacturer ``SpineMed`` and a Series Description
starting ``SpineMed AI``.  A series is ours when its Manufacturer is exactly ours *and* its
description or number is ours: the synthetic phantoms ("SpineMed Phantom") and a site whose modality
happens to use series number 9901 are not.  The node's job store (the SOP Instance UIDs it wrote) is a
second, independent guard applied by the bridge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["OwnMarkers", "StudyFilter", "is_candidate_series", "is_own_series", "split_series"]


@dataclass(frozen=True)
class OwnMarkers:
    """How our own result series are recognised.

    Parameters
    ----------
    manufacturer
        Manufacturer (0008,0070) of our objects, compared exactly (case and outer blanks ignored).
    series_description_prefix
        Series Description (0008,103E) prefix of our objects.
    series_number
        Series Number (0020,0011) of our SR series (``output.series_number``); the key image, key object
        and PDF series have the next three numbers.
    """

    manufacturer: str = "SpineMed"
    series_description_prefix: str = "SpineMed AI"
    series_number: int | None = 9901


@dataclass(frozen=True)
class StudyFilter:
    """A cheap pre-filter so that only plausible spine studies are shipped to the node.

    The node's routing rules stay the authority (they may still skip a study); this only keeps a busy
    Orthanc from copying every CT head and chest X-ray to the node.

    Parameters
    ----------
    modalities
        Modality values that can feed the model.
    body_parts
        Body Part Examined values (upper case) that make a series a candidate.
    description_pattern
        Regex searched in Series Description, Protocol Name and Study Description; a match makes a
        series of a listed modality a candidate even without a body part.
    """

    modalities: frozenset[str] = frozenset({"MR", "CT", "CR", "DX"})
    body_parts: frozenset[str] = frozenset(
        {"SPINE", "LSPINE", "TSPINE", "CSPINE", "WHOLESPINE", "SSPINE", "COCCYX", "SACRUM"}
    )
    description_pattern: str = (
        r"(?i)(spine|spinal|lumbar|thoracic|cervical|l-?spine|t-?spine|c-?spine|lws|bws|hws|scoli)"
    )
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(self.description_pattern))

    def matches_text(self, *texts: str) -> bool:
        return any(self._regex.search(t) for t in texts if t)


def _tag(tags: Mapping[str, object], name: str) -> str:
    value = tags.get(name)
    return value.strip() if isinstance(value, str) else ""


def is_own_series(tags: Mapping[str, object], markers: OwnMarkers) -> bool:
    """Whether a series (its Orthanc main DICOM tags) holds our own result objects.

    Parameters
    ----------
    tags
        ``MainDicomTags`` of the series: Manufacturer, SeriesDescription, SeriesNumber, Modality.
    markers
        What our objects carry.

    Returns
    -------
    bool
        ``True`` when Manufacturer is ours and the description prefix or the series number is ours.
    """
    if _tag(tags, "Manufacturer").casefold() != markers.manufacturer.strip().casefold():
        return False
    if _tag(tags, "SeriesDescription").startswith(markers.series_description_prefix):
        return True
    number = _tag(tags, "SeriesNumber")
    if markers.series_number is None or not number.lstrip("+").isdigit():
        return False
    # SRs n, key image n+1, key object selection n+2, PDF n+3 (sr_templates.uids.SERIES_KINDS)
    return markers.series_number <= int(number) <= markers.series_number + 3


def is_candidate_series(
    tags: Mapping[str, object], flt: StudyFilter, study_tags: Mapping[str, object] | None = None
) -> bool:
    """Whether a (non-own) series could feed the model: a listed modality and a spine body part or text.

    Parameters
    ----------
    tags
        ``MainDicomTags`` of the series.
    flt
        The pre-filter.
    study_tags
        ``MainDicomTags`` of the study (its Study Description is searched too).
    """
    if _tag(tags, "Modality").upper() not in flt.modalities:
        return False
    if _tag(tags, "BodyPartExamined").upper() in flt.body_parts:
        return True
    study_desc = _tag(study_tags or {}, "StudyDescription")
    return flt.matches_text(_tag(tags, "SeriesDescription"), _tag(tags, "ProtocolName"), study_desc)


def split_series(
    series: Iterable[Mapping[str, object]],
    markers: OwnMarkers,
    flt: StudyFilter,
    study_tags: Mapping[str, object] | None = None,
) -> tuple[set[str], set[str], bool]:
    """Split a study's series (Orthanc ``/studies/{id}/series`` entries) into ours and sources.

    Returns
    -------
    tuple
        ``(own series IDs, source series IDs, any source series is a candidate)``.
    """
    own: set[str] = set()
    source: set[str] = set()
    candidate = False
    for s in series:
        sid = s.get("ID")
        raw = s.get("MainDicomTags")
        tags: Mapping[str, object] = raw if isinstance(raw, Mapping) else {}
        if not isinstance(sid, str):
            continue
        if is_own_series(tags, markers):
            own.add(sid)
        else:
            source.add(sid)
            candidate = candidate or is_candidate_series(tags, flt, study_tags)
    return own, source, candidate
