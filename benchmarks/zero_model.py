"""A zero-latency model for measuring the node's own overhead (benchmarks only, never configured).

It answers instantly with one fixed, valid finding on the first input image, through the same
post-processing as the real backends, so the SR stage gets realistic input.
"""

from __future__ import annotations

from inference.backends.qwen_vl import policy_for
from inference.findings import ModelAnswer, ModelIdentity, SpineFindings
from inference.inputs import ImageSizePolicy, ModelInput
from inference.postprocess import to_findings
from inference.settings import ModelSettings

__all__ = ["ZeroLatencyModel"]

_ANSWER = {
    "levels": [
        {"level": "L4-L5", "finding": "disc_herniation", "severity": "moderate", "grade": None,
         "laterality": "left", "measurements": [], "evidence": [{"image": 0, "x": 10.0, "y": 10.0}]},
    ],
    "report": {k: "benchmark" for k in ("findings", "diagnosis", "treatment_suggestions", "risk_and_prognosis",
                                         "follow_up", "diagnostic_basis")},
}


class ZeroLatencyModel:
    """Implements :class:`inference.inputs.SpineModel` with no model at all."""

    def __init__(self) -> None:
        self._identity = ModelIdentity(name="zero-latency benchmark model", version="0", weights_digest="none",
                                       backend="benchmark", prompt_version="none", demo=True)
        self._answer = ModelAnswer.model_validate(_ANSWER)

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def image_size(self) -> ImageSizePolicy:
        return policy_for(ModelSettings())  # the images the real model would get

    def analyze(self, inputs: ModelInput) -> SpineFindings:
        return to_findings(self._answer, inputs, self._identity)
