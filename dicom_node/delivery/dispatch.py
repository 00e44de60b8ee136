"""Send result objects to one destination by its type: C-STORE (``dicom``), STOW-RS (``dicomweb``), an HL7 v2
ORU^R01 over MLLP (``hl7``) or a FHIR R4 transaction Bundle (``fhir``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dicom_node.config import DestinationConfig
from dicom_node.delivery.cstore import echo, send_files
from dicom_node.delivery.fhir import probe_fhir, send_files_fhir
from dicom_node.delivery.hl7 import probe_hl7, send_files_hl7
from dicom_node.delivery.result import SendResult
from dicom_node.delivery.stow import send_files_stow

__all__ = ["check", "deliver"]


def deliver(
    dest: DestinationConfig, paths: Sequence[Path], *, calling_ae: str, timeout_s: float = 60.0
) -> list[SendResult]:
    """Send ``paths`` to ``dest`` by its type (the module docstring); one result per path."""
    if dest.type == "dicomweb":
        return send_files_stow(dest, paths, timeout_s=timeout_s)
    if dest.type == "hl7":
        return send_files_hl7(dest, paths, timeout_s=timeout_s)
    if dest.type == "fhir":
        return send_files_fhir(dest, paths, timeout_s=timeout_s)
    return send_files(dest, paths, calling_ae=calling_ae, timeout_s=timeout_s)


def check(dest: DestinationConfig, *, calling_ae: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """Whether ``dest`` answers, by its type: C-ECHO (``dicom``), an MLLP connection (``hl7``), the FHIR
    server's CapabilityStatement (``fhir``); a STOW-RS endpoint is not checked (``ok`` with a note)."""
    if dest.type == "hl7":
        return probe_hl7(dest, timeout_s=timeout_s)
    if dest.type == "fhir":
        return probe_fhir(dest, timeout_s=timeout_s)
    if dest.type == "dicomweb":
        return True, "STOW-RS endpoint: not checked"
    return echo(dest, calling_ae=calling_ae, timeout_s=timeout_s)
