"""The narrative report: the model's six report sections as a TID 2000-like Basic Diagnostic
Imaging Report, readable in any SR viewer.

Content tree::

    CONTAINER (18748-4, LN, "Diagnostic Imaging Report")                     TID 2000
      HAS OBS CONTEXT  device observer (the algorithm)                        TID 1001
      CONTAINS CONTAINER (121070, DCM, "Findings")          TEXT (121071, DCM, "Finding") ...
      CONTAINS CONTAINER (121072, DCM, "Impressions")       TEXT (121073, DCM, "Impression")
      CONTAINS CONTAINER (121074, DCM, "Recommendations")   TEXT (121075, DCM, "Recommendation")
      CONTAINS CONTAINER (SEC-RISK-PROGNOSIS, 99SPINEMED, "Risk and prognosis")       TEXT
      CONTAINS CONTAINER (SEC-FOLLOW-UP, 99SPINEMED, "Follow-up and post-operative management") TEXT
                                                            (+ the comparison with the prior study)
      CONTAINS CONTAINER (SEC-DIAGNOSTIC-BASIS, 99SPINEMED, "Diagnostic basis")       TEXT
      CONTAINS CONTAINER (121180, DCM, "Key Images")        IMAGE (113000, DCM, "Of Interest")
      CONTAINS TEXT (121106, DCM, "Comment") = demo warning                  demo model only

The Findings section holds the model's findings text, then one short line per reported level
(``"L4-L5: disc herniation, moderate, left"``) so the levels read the same as in the TID 1500 SR.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from highdicom.sr.templates import Template

from inference.findings import NarrativeReport
from sr_templates.codes import NARRATIVE_SECTIONS, SpineCodes
from sr_templates.text import DEMO_TEXT, text_value

__all__ = ["SpineNarrativeReport"]

_REL = hd.sr.RelationshipTypeValues
_EMPTY = "(no text given by the model)"


class SpineNarrativeReport(Template):
    """TID 2000-like Basic Diagnostic Imaging Report with the six SpineMed sections.

    Parameters
    ----------
    report
        The model's narrative report.
    observation_context
        Observer context (the algorithm as device observer).
    level_summaries
        One short line per reported level, appended to the Findings section.
    follow_up_lines
        The comparison with the prior study (or why there is none), appended to the follow-up section.
    key_image
        The key image to reference in a Key Images section, or ``None``.
    demo
        True for the demo model: adds the not-for-diagnostic-use statement.

    Raises
    ------
    TypeError
        An argument has the wrong type.
    """

    def __init__(
        self,
        report: NarrativeReport,
        observation_context: hd.sr.ObservationContext,
        level_summaries: Sequence[str] = (),
        *,
        follow_up_lines: Sequence[str] = (),
        key_image: pydicom.Dataset | None = None,
        demo: bool = False,
    ) -> None:
        if not isinstance(report, NarrativeReport):
            raise TypeError(f"report: expected NarrativeReport, got {type(report).__name__}")
        if not isinstance(observation_context, hd.sr.ObservationContext):
            raise TypeError(
                f"observation_context: expected ObservationContext, got {type(observation_context).__name__}"
            )
        if isinstance(level_summaries, str) or any(not isinstance(s, str) for s in level_summaries):
            raise TypeError("level_summaries: expected a sequence of str")
        if isinstance(follow_up_lines, str) or any(not isinstance(s, str) for s in follow_up_lines):
            raise TypeError("follow_up_lines: expected a sequence of str")
        if key_image is not None and not isinstance(key_image, pydicom.Dataset):
            raise TypeError(f"key_image: expected a pydicom Dataset or None, got {type(key_image).__name__}")
        if not isinstance(demo, bool):
            raise TypeError(f"demo: expected bool, got {type(demo).__name__}")
        super().__init__(is_root=True)
        root = hd.sr.ContainerContentItem(name=SpineCodes.DIAGNOSTIC_IMAGING_REPORT, template_id="2000")
        items: list[hd.sr.ContentItem] = [item for item in observation_context if isinstance(item, hd.sr.ContentItem)]
        for field, heading, concept in NARRATIVE_SECTIONS:
            section = hd.sr.ContainerContentItem(name=heading, relationship_type=_REL.CONTAINS)
            text = text_value(str(getattr(report, field))).strip() or _EMPTY
            texts = [text]
            if field == "findings":
                texts.extend(level_summaries)
            if field == "follow_up":
                texts.extend(follow_up_lines)
            section.ContentSequence = hd.sr.ContentSequence(
                [hd.sr.TextContentItem(name=concept, value=text_value(t), relationship_type=_REL.CONTAINS)
                 for t in texts]
            )
            items.append(section)
        if key_image is not None:
            section = hd.sr.ContainerContentItem(name=SpineCodes.KEY_IMAGES, relationship_type=_REL.CONTAINS)
            section.ContentSequence = hd.sr.ContentSequence(
                [
                    hd.sr.ImageContentItem(
                        name=SpineCodes.OF_INTEREST,
                        referenced_sop_class_uid=key_image.SOPClassUID,
                        referenced_sop_instance_uid=key_image.SOPInstanceUID,
                        relationship_type=_REL.CONTAINS,
                    )
                ]
            )
            items.append(section)
        if demo:
            items.append(
                hd.sr.TextContentItem(name=SpineCodes.COMMENT, value=DEMO_TEXT, relationship_type=_REL.CONTAINS)
            )
        root.ContentSequence = hd.sr.ContentSequence(items)
        self.append(root)
