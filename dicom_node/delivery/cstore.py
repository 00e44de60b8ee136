"""C-STORE SCU: send result objects to a DICOM destination and report, per object, whether it was stored.

Success and warning statuses (``0xB000``, ``0xB006``, ``0xB007``, ``0x0001``) count as delivered.
One association per destination and attempt; the retry schedule lives in the job store, so a
restart keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom import uid
from pynetdicom import AE, build_context

from dicom_node.config import DestinationConfig
from dicom_node.delivery.result import SendResult, status_is_permanent
from dicom_node.network.association import STATUS_SUCCESS, WARNING_STATUSES, RequestWatch, nodelay_handlers
from dicom_node.network.tls import client_tls_args

__all__ = ["echo", "send_files"]


def _ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s  # else a dead host holds the worker for the OS TCP timeout (minutes)
    return ae


def send_files(
    dest: DestinationConfig, paths: Sequence[Path], *, calling_ae: str, timeout_s: float = 60.0
) -> list[SendResult]:
    """C-STORE every file in ``paths`` to ``dest`` over one association.

    Never raises for network or peer errors: each result says what happened to its object.
    """
    assert dest.host is not None and dest.port is not None and dest.ae_title is not None
    datasets = [(Path(p), pydicom.dcmread(p)) for p in paths]
    ae = _ae(calling_ae, timeout_s)
    for sop_class in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
        ae.requested_contexts.append(
            build_context(sop_class, [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian])
        )
    watch = RequestWatch()
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                             evt_handlers=[*nodelay_handlers(), *watch.handlers()], tls_args=client_tls_args(dest))
    except (OSError, RuntimeError, ValueError) as exc:
        return [
            SendResult(p, str(ds.SOPInstanceUID), False, None, f"cannot associate: {exc}")
            for p, ds in datasets
        ]
    if not assoc.is_established:
        why = watch.why_not(assoc, dest.name)
        return [SendResult(p, str(ds.SOPInstanceUID), False, None, why) for p, ds in datasets]
    results: list[SendResult] = []
    try:
        for path, ds in datasets:
            sop = str(ds.SOPInstanceUID)
            if not assoc.is_established:
                results.append(SendResult(path, sop, False, None, "association lost"))
                continue
            try:
                status = assoc.send_c_store(ds)
            except (OSError, RuntimeError, ValueError, AttributeError) as exc:
                results.append(SendResult(path, sop, False, None, f"send failed: {exc}"))
                continue
            code = int(status.Status) if status is not None and "Status" in status else None
            if code is None:
                results.append(SendResult(path, sop, False, None, "no response (timeout or abort)"))
            elif code == STATUS_SUCCESS or code in WARNING_STATUSES:
                results.append(SendResult(path, sop, True, code, None))
            else:
                results.append(SendResult(path, sop, False, code, f"refused with status 0x{code:04X}",
                                          permanent=status_is_permanent(code)))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def echo(dest: DestinationConfig, *, calling_ae: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """C-ECHO ``dest``; returns (ok, message)."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    if dest.type != "dicom":
        return False, f"{dest.type} destination: C-ECHO does not apply"
    assert dest.host is not None and dest.port is not None and dest.ae_title is not None
    ae = _ae(calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    watch = RequestWatch()
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                             evt_handlers=[*nodelay_handlers(), *watch.handlers()], tls_args=client_tls_args(dest))
    except (OSError, RuntimeError, ValueError) as exc:
        return False, f"cannot associate: {exc}"
    if not assoc.is_established:
        return False, watch.why_not(assoc, dest.name)
    try:
        status = assoc.send_c_echo()
        code = int(status.Status) if status is not None and "Status" in status else None
    finally:
        assoc.release()
    if code == STATUS_SUCCESS:
        return True, "C-ECHO success"
    return False, "no C-ECHO response" if code is None else f"C-ECHO status 0x{code:04X}"
