"""The exception tree of the sr_templates package.

Constructors of the template classes validate their arguments and raise ``TypeError`` / ``ValueError``
naming the bad one, as highdicom's do: those are the caller's mistakes.  :func:`sr_templates.build_outputs`
turns a refusal met while building (highdicom rejecting content made from a model's findings and a
source study's headers) into :class:`ReportBuildError`, so the worker can fail that study with the reason
instead of reporting an internal error.  Nothing here is transient: the same findings and study give the
same refusal.  Messages never carry patient data.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["ReportBuildError", "ReportError"]


class ReportError(ValueError):
    """Base class: a result object could not be built."""

    #: whether building the same objects later could succeed (never: the input decides)
    transient: ClassVar[bool] = False


class ReportBuildError(ReportError):
    """highdicom (or a template) refused the content built from these findings and this study."""
