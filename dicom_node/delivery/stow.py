"""STOW-RS export: send result objects to a DICOMweb endpoint and report, per object, what happened.

Used by :func:`dicom_node.delivery.cstore.deliver` for ``type = "dicomweb"`` destinations.  One STOW-RS request
(``POST {url}/studies``, multipart/related; type="application/dicom") per destination and attempt; the
retry schedule stays in the job store, so the HTTP client itself never retries.

Outcome per instance, from the STOW-RS response (PS3.18 10.5.3):

* listed in Referenced SOP Sequence (0008,1199) without Warning Reason: delivered, status 0x0000;
* listed there with Warning Reason (0008,1196): delivered, status = that warning code (e.g. 0xB000);
* listed in Failed SOP Sequence (0008,1198): not delivered, status = Failure Reason (0008,1197);
* in neither: not delivered ("not acknowledged").

Network errors, time-outs, HTTP errors without a STOW-RS body and unreadable files never raise: they
become failed results carrying the reason.  The password is read from the environment variable named by
``dest.password_env`` at each call, never from the config file, and never logged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from dicom_node.config import DestinationConfig
from dicom_node.delivery.result import SendResult, status_is_permanent
from dicom_node.log import get_logger

__all__ = ["parse_stow_response", "send_files_stow"]

log = get_logger(__name__)

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_WARNING_REASON = "00081196"
_FAILURE_REASON = "00081197"


def _first_value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if isinstance(values, list) and values:
        return values[0]
    return None


def parse_stow_response(body: dict[str, Any]) -> dict[str, tuple[bool, int | None, str | None]]:
    """Per-SOP-Instance outcome from a STOW-RS response in DICOM JSON.

    Parameters
    ----------
    body
        The decoded ``application/dicom+json`` response (one dataset, not a list).

    Returns
    -------
    dict
        SOP Instance UID → ``(delivered, status, error)``; instances absent from the response are absent
        from the mapping.
    """
    out: dict[str, tuple[bool, int | None, str | None]] = {}
    for seq_tag, delivered in ((_REFERENCED_SOP_SEQUENCE, True), (_FAILED_SOP_SEQUENCE, False)):
        element = body.get(seq_tag)
        items = element.get("Value", []) if isinstance(element, dict) else []
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            uid = _first_value(item, _REFERENCED_SOP_INSTANCE_UID)
            if not isinstance(uid, str):
                continue
            if delivered:
                warning = _first_value(item, _WARNING_REASON)
                out[uid] = (True, int(warning) if isinstance(warning, int) else 0, None)
            else:
                reason = _first_value(item, _FAILURE_REASON)
                failure = int(reason) if isinstance(reason, int) else None
                why = "refused by the STOW-RS server"
                if failure is not None:
                    why += f" (failure reason 0x{failure:04X})"
                out[uid] = (False, failure, why)
    return out


def _all_failed(items: Sequence[tuple[Path, str]], why: str, permanent: bool = False) -> list[SendResult]:
    return [SendResult(path, sop, False, None, why, permanent=permanent) for path, sop in items]


def _session(dest: DestinationConfig) -> tuple[requests.Session, str | None]:
    """A session with basic auth when configured; returns (session, error)."""
    session = requests.Session()
    if dest.username:
        password = os.environ.get(dest.password_env or "") if dest.password_env else None
        if dest.password_env and password is None:
            return session, f"password environment variable {dest.password_env} is not set"
        session.auth = (dest.username, password or "")
    return session, None


def _response_json(response: requests.Response | None) -> dict[str, Any] | None:
    """The STOW-RS body of an error response, when it carries one."""
    if response is None or not response.content:
        return None
    ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype not in ("application/dicom+json", "application/json"):
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    return body if isinstance(body, dict) else None


def send_files_stow(
    dest: DestinationConfig, paths: Sequence[Path], *, timeout_s: float = 60.0
) -> list[SendResult]:
    """STOW-RS every file in ``paths`` to ``dest.url`` in one request.

    Parameters
    ----------
    dest
        A ``type = "dicomweb"`` destination: ``url`` is the DICOMweb base URL (the STOW-RS resource is
        ``{url}/studies``); ``username`` + ``password_env`` give HTTP basic auth.
    paths
        Part 10 files (our result objects).
    timeout_s
        Connect and read time-out of the request.

    Returns
    -------
    list of SendResult
        One per path, in order.  Never raises for network, HTTP or peer errors.
    """
    if dest.type != "dicomweb" or not dest.url:
        raise ValueError(f"destination {dest.name}: not a dicomweb destination with a url")
    readable: list[tuple[Path, str, Dataset]] = []
    results: dict[Path, SendResult] = {}
    for p in map(Path, paths):
        try:
            ds = pydicom.dcmread(p)
            readable.append((p, str(ds.SOPInstanceUID), ds))
        except (OSError, pydicom.errors.InvalidDicomError, AttributeError) as exc:
            why = f"cannot read result file: {type(exc).__name__}: {exc}"
            results[p] = SendResult(p, "", False, None, why)
    if readable:
        for r in _stow(dest, readable, timeout_s):
            results[r.path] = r
    return [results[Path(p)] for p in paths]


def _stow(
    dest: DestinationConfig, readable: list[tuple[Path, str, Dataset]], timeout_s: float
) -> list[SendResult]:
    items = [(p, sop) for p, sop, _ in readable]
    session, problem = _session(dest)
    if problem is not None:
        return _all_failed(items, problem)
    assert dest.url is not None
    try:
        client = DICOMwebClient(dest.url.rstrip("/"), session=session, timeout=timeout_s)
        client.set_http_retry_params(retry=False)  # retries belong to the job store's schedule
        reply = client.store_instances([ds for _, _, ds in readable])
        body: dict[str, Any] | None = reply.to_json_dict() if len(reply) else {}
    except requests.HTTPError as exc:
        response = exc.response
        body = _response_json(response)
        code = response.status_code if response is not None else None
        if body is None:
            reason = response.reason if response is not None else ""
            # 4xx (but 408 time-out, 429 too many requests) will not change by retrying; 5xx may
            permanent = code is not None and 400 <= code < 500 and code not in (408, 429)
            return _all_failed(items, f"STOW-RS to {dest.name} answered HTTP {code} {reason}".rstrip(), permanent)
        log.warning("STOW-RS partly refused", destination=dest.name, http_status=code)
    except requests.Timeout:
        return _all_failed(items, f"STOW-RS to {dest.name}: no answer within {timeout_s:g} s")
    except requests.RequestException as exc:
        return _all_failed(items, f"STOW-RS to {dest.name}: cannot connect: {type(exc).__name__}")
    except ValueError as exc:  # malformed URL, or a response dicomweb-client cannot decode
        return _all_failed(items, f"STOW-RS to {dest.name}: {exc}")
    finally:
        session.close()
    outcome = parse_stow_response(body or {})
    out: list[SendResult] = []
    for path, sop in items:
        if sop in outcome:
            ok, status, error = outcome[sop]
            out.append(SendResult(path, sop, ok, status, error,
                                  permanent=not ok and status is not None and status_is_permanent(status)))
        else:
            out.append(SendResult(path, sop, False, None, "not acknowledged in the STOW-RS response"))
    return out
