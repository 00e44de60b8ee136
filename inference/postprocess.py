"""Turn a validated model answer into :class:`~inference.findings.SpineFindings`.

The answer's levels are already canonical and ordered (the types do that); what is added here is the
provenance: the model identity and, for every input image, where it came from, so that each evidence
index resolves to SOP instances.  Anything that does not resolve is an invalid model output, never
silently dropped.
"""

from __future__ import annotations

from pydantic import ValidationError

from inference.errors import InvalidModelOutputError
from inference.findings import ModelAnswer, ModelIdentity, SpineFindings
from inference.inputs import ModelInput

__all__ = ["to_findings"]


def to_findings(answer: ModelAnswer, inputs: ModelInput, identity: ModelIdentity) -> SpineFindings:
    """Attach provenance to ``answer``.

    Parameters
    ----------
    answer
        The parsed model answer.
    inputs
        The request the answer is for (its images, in index order, and task).
    identity
        The model that answered.

    Returns
    -------
    SpineFindings
        Findings whose evidence indices all resolve to ``inputs.images``.

    Raises
    ------
    InvalidModelOutputError
        An evidence index points past the input images, or an evidence point lies outside its image.
    """
    for finding in answer.levels:
        for ev in finding.evidence:
            if ev.image >= len(inputs.images):
                raise InvalidModelOutputError(
                    f"model output: evidence of {finding.level} cites image {ev.image}, "
                    f"but the request had {len(inputs.images)} images"
                )
            ref = inputs.images[ev.image].ref
            if ev.x is not None and ev.y is not None and not (ev.x <= ref.columns and ev.y <= ref.rows):
                raise InvalidModelOutputError(
                    f"model output: evidence point ({ev.x}, {ev.y}) of {finding.level} lies outside "
                    f"image {ev.image} ({ref.columns}x{ref.rows} px)"
                )
    try:
        return SpineFindings(
            study_instance_uid=inputs.study_instance_uid,
            model=identity,
            task=inputs.task.value,
            images=[img.ref for img in inputs.images],
            answer=answer,
        )
    except ValidationError as exc:
        raise InvalidModelOutputError(f"model output does not resolve to the inputs: {exc}") from exc
