"""Deterministic UIDs for everything the node writes.

Every UID is derived (pydicom's :func:`~pydicom.uid.generate_uid` with explicit entropy
sources, i.e. a SHA-512 digest under a root) from the source study and what we put in the object,
so building the same outputs twice gives the same UIDs: a crashed job that re-sends its results
is idempotent at the receiver, and a corrected result (a new revision, or different content)
always gets a new SOP Instance UID.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from inference.findings import ModelIdentity

__all__ = [
    "NAMESPACE",
    "check_uid_prefix",
    "consultation_uids",
    "content_digest",
    "device_observer_uid",
    "output_series_uid",
    "sop_instance_uid",
    "tracking_uid",
]

#: Our namespace: mixed into every digest so our UIDs never collide with another generator's.
NAMESPACE = "spinemed-node/sr_templates/v1"

_MAX_PREFIX = 54  # generate_uid's limit: the digest needs the rest of the 64 characters


def check_uid_prefix(prefix: str | None) -> str:
    """Return the UID root to use (pydicom's when ``None``).

    Raises
    ------
    TypeError
        ``prefix`` is not a ``str`` or ``None``.
    ValueError
        ``prefix`` is not dotted digits ending in ``"."``, or longer than 54 characters.
    """
    if prefix is None:
        return PYDICOM_ROOT_UID
    if not isinstance(prefix, str):
        raise TypeError(f"uid_prefix: expected str or None, got {type(prefix).__name__}")
    parts = prefix.split(".")
    if (
        not prefix.endswith(".")
        or len(prefix) > _MAX_PREFIX
        or any(not p.isdigit() or (len(p) > 1 and p.startswith("0")) for p in parts[:-1])
    ):
        raise ValueError(
            f"uid_prefix: {prefix!r} must be dotted numbers without leading zeros, end with '.' "
            f"and be at most {_MAX_PREFIX} characters"
        )
    return prefix


def _uid(prefix: str | None, parts: Sequence[str]) -> str:
    root = check_uid_prefix(prefix)
    return str(generate_uid(prefix=root, entropy_srcs=[NAMESPACE, *parts]))


def content_digest(*parts: object) -> str:
    """SHA-256 over a canonical JSON rendering of ``parts`` (objects: dicts, lists, scalars)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def output_series_uid(study_instance_uid: str, prefix: str | None = None, *, kind: str = "sr") -> str:
    """The series of a study's SpineMed outputs of one modality, all revisions: ``"sr"`` (both SRs),
    ``"key-image"``, ``"key-object"`` (the KO) or ``"pdf"`` — one modality per series, as PACS and
    viewers file them."""
    if kind == "sr":
        return _uid(prefix, ["series", study_instance_uid])  # as before: existing SR series keep their UID
    if kind in SERIES_KINDS:
        return _uid(prefix, ["series", study_instance_uid, kind])
    raise ValueError(f"kind: {kind!r} is not 'sr', {', '.join(repr(k) for k in SERIES_KINDS)}")


#: The series other than the SR series, in series-number order after it (SR n, key image n+1, ...).
SERIES_KINDS = ("key-image", "key-object", "pdf")


def device_observer_uid(model: ModelIdentity, manufacturer: str, model_name: str, prefix: str | None = None) -> str:
    """Device Observer UID of the algorithm: one per (node product, model weights)."""
    return _uid(prefix, ["device", manufacturer, model_name, model.name, model.version, model.weights_digest])


def tracking_uid(study_instance_uid: str, level: str, prefix: str | None = None) -> str:
    """Tracking Unique Identifier of one level's measurement group.

    Stable across revisions and model versions: a corrected report tracks the same level.
    """
    return _uid(prefix, ["tracking", study_instance_uid, level])


def sop_instance_uid(
    kind: str,
    study_instance_uid: str,
    model: ModelIdentity,
    revision: int,
    digest: str,
    prefix: str | None = None,
) -> str:
    """SOP Instance UID of one output object.

    Parameters
    ----------
    kind
        Which object: ``"measurement-report"``, ``"narrative-report"``, ``"key-image"``.
    study_instance_uid
        The source study.
    model
        The model that produced the findings.
    revision
        Report revision (1 for the first).
    digest
        :func:`content_digest` of everything that goes into the object.
    prefix
        UID root (pydicom's when ``None``).
    """
    return _uid(
        prefix,
        [
            "sop",
            kind,
            study_instance_uid,
            model.name,
            model.version,
            model.weights_digest,
            model.backend,
            model.prompt_version,
            str(revision),
            digest,
        ],
    )


def consultation_uids(study_instance_uid: str, digest: str, prefix: str | None = None) -> tuple[str, str]:
    """``(series UID, SOP Instance UID)`` of a saved consultation: one series per study for all its
    consultations, one instance per saved content (``digest``: :func:`content_digest` of it)."""
    return (_uid(prefix, ["series", study_instance_uid, "consultation"]),
            _uid(prefix, ["sop", "consultation", study_instance_uid, digest]))
