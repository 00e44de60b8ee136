"""DICOM outputs of the SpineMed node: TID 1500 SR, narrative SR and key image, built with highdicom.

The pipeline calls :func:`build_outputs`; the template classes are public for reuse and tests.
"""

from __future__ import annotations

from sr_templates.builder import SERIES_DESCRIPTION, OutputOptions, build_outputs
from sr_templates.errors import ReportBuildError, ReportError
from sr_templates.key_image import SpineKeyImage
from sr_templates.measurement_report import (
    SpineLevelEvaluation,
    SpineMeasurementReport,
    SpinePlanarROIGroup,
    algorithm_identification,
)
from sr_templates.narrative import SpineNarrativeReport
from sr_templates.reader import ReadBack, read_measurement_report

__all__ = [
    "SERIES_DESCRIPTION",
    "OutputOptions",
    "ReadBack",
    "ReportBuildError",
    "ReportError",
    "SpineKeyImage",
    "SpineLevelEvaluation",
    "SpineMeasurementReport",
    "SpineNarrativeReport",
    "SpinePlanarROIGroup",
    "algorithm_identification",
    "build_outputs",
    "read_measurement_report",
]
