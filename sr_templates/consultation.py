"""A consultation saved as a DICOM SR: the questions asked about a SpineMed report and the model's answers.

Content tree (Comprehensive SR, built with highdicom's content item classes)::

    CONTAINER (18748-4, LN, "Diagnostic Imaging Report")
      HAS OBS CONTEXT  person observer: who asked (and the device observer: the model that answered)
      CONTAINS COMPOSITE (128225, DCM, "Source report") = the SR the consultation discusses
      CONTAINS TEXT    (121106, DCM, "Comment") = the demo notice (demo model only)
      CONTAINS TEXT    (121062, DCM, "Request") = question 1
      CONTAINS TEXT    (121106, DCM, "Comment") = answer 1
      ...              one Request / Comment pair per turn, in order

The discussed SR is also in the Current Requested Procedure Evidence Sequence (highdicom records every
referenced object there), so a viewer can open it from here.  Completion Flag is PARTIAL or COMPLETE as
asked, Verification Flag UNVERIFIED: an answer of the model is a draft for the clinician.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from sr_templates import uids
from sr_templates.codes import SpineCodes
from sr_templates.errors import ReportBuildError
from sr_templates.text import DEMO_SERIES_SUFFIX, DEMO_TEXT, text_value

__all__ = ["CONSULTATION_SERIES_DESCRIPTION", "ConsultationTurn", "build_consultation_sr"]

CONSULTATION_SERIES_DESCRIPTION = "SpineMed AI consultation"

_PN_BAD = re.compile(r"[\\\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ConsultationTurn:
    """One question and the model's answer to it."""

    question: str
    answer: str


def _person_name(name: str) -> str:
    """``name`` as a Person Name value: no backslash or control characters, at most 64 characters per
    component group; a name without components (a login name) gets a trailing caret, so it reads as a
    single family-name component (PS3.5 6.2.1.2)."""
    clean = _PN_BAD.sub(" ", name).strip()[:63]
    if not clean:
        raise ValueError("observer_name: empty")
    return clean if "^" in clean else clean + "^"


def build_consultation_sr(
    discussed: pydicom.Dataset,
    turns: Sequence[ConsultationTurn],
    *,
    observer_name: str,
    complete: bool,
    demo: bool,
    series_number: int = 9905,
    instance_number: int = 1,
    device_name: str | None = None,
    device_uid: str | None = None,
    manufacturer: str = "SpineMed",
    institution_name: str | None = None,
    uid_prefix: str | None = None,
    created_at: datetime.datetime | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the SR of one consultation about ``discussed`` (a SpineMed SR of the same study).

    Parameters
    ----------
    discussed
        The report the questions were about (its patient and study are the SR's; it is referenced).
    turns
        The answered questions, in order (at least one).
    observer_name
        Who asked: the person observer (Person Name; a login name or ``Family^Given``).
    complete
        Completion Flag COMPLETE (the consultation is over) or PARTIAL (it may go on).
    demo
        The answers come from the demo model: the notice is added as text and to the series description.
    series_number, instance_number
        Of the consultation's own series.
    device_name, device_uid
        The model as device observer (both, or neither).
    manufacturer, institution_name
        Equipment attributes of the SR.
    uid_prefix
        Site UID root (pydicom's when ``None``).
    created_at
        Content date and time (default: now).

    Returns
    -------
    highdicom.sr.ComprehensiveSR
        Verification Flag UNVERIFIED.

    Raises
    ------
    TypeError
        ``discussed`` is not a pydicom Dataset.
    ValueError
        No turns, an empty question, or an empty observer name.
    ReportBuildError
        highdicom refused the content (an attribute of ``discussed`` it cannot carry over).
    """
    if not isinstance(discussed, pydicom.Dataset):
        raise TypeError(f"discussed: expected a pydicom Dataset, got {type(discussed).__name__}")
    if not turns:
        raise ValueError("turns: a consultation SR needs at least one answered question")
    if any(not t.question.strip() for t in turns):
        raise ValueError("turns: a question is empty")
    when = created_at or datetime.datetime.now()
    person = hd.sr.ObserverContext(
        observer_type=codes.cid270.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=_person_name(observer_name)),
    )
    device = None
    if device_uid:
        device = hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid, name=(device_name or None) and device_name[:64]),
        )
    context = hd.sr.ObservationContext(observer_person_context=person, observer_device_context=device)
    root = hd.sr.ContainerContentItem(name=SpineCodes.DIAGNOSTIC_IMAGING_REPORT)
    items: list[pydicom.Dataset] = list(context)
    items.append(hd.sr.CompositeContentItem(
        name=SpineCodes.SOURCE_REPORT,
        referenced_sop_class_uid=str(discussed.SOPClassUID),
        referenced_sop_instance_uid=str(discussed.SOPInstanceUID),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    ))
    if demo:
        items.append(hd.sr.TextContentItem(name=SpineCodes.COMMENT, value=DEMO_TEXT,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    for t in turns:
        items.append(hd.sr.TextContentItem(name=SpineCodes.REQUEST, value=text_value(t.question.strip()),
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        answer = text_value(t.answer.strip()) or "(no answer)"
        items.append(hd.sr.TextContentItem(name=SpineCodes.COMMENT, value=answer,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    root.ContentSequence = pydicom.Sequence(items)
    digest = uids.content_digest(str(discussed.SOPInstanceUID), observer_name, complete,
                                 [(t.question, t.answer) for t in turns], when.isoformat())
    series_uid, sop_uid = uids.consultation_uids(str(discussed.StudyInstanceUID), digest, uid_prefix)
    description = CONSULTATION_SERIES_DESCRIPTION + (DEMO_SERIES_SUFFIX if demo else "")
    try:
        sr = hd.sr.ComprehensiveSR(
            evidence=[discussed],
            content=root,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            is_complete=complete,
            is_final=False,
            is_verified=False,
            institution_name=institution_name,
            series_description=description[:64],
            content_date=when.date(),
            content_time=when.time(),
            specific_character_set="ISO_IR 192",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportBuildError(f"consultation SR: {exc}") from exc
    ds: pydicom.Dataset = sr
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S.%f")
    return sr
