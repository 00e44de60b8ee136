"""What every delivery transport returns, and the retry schedule they share (a leaf module)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["SendResult", "backoff_delay", "status_is_permanent"]


@dataclass(frozen=True)
class SendResult:
    """What became of one object at one destination.

    ``permanent`` marks a refusal that retrying cannot change (the destination does not support the SOP
    class, cannot understand the object, is not authorised to take it): the job fails at once with the
    reason instead of retrying ``export.max_attempts`` times.  Unreachable destinations, time-outs and
    "out of resources" are transient.
    """

    path: Path
    sop_instance_uid: str
    delivered: bool
    status: int | None
    error: str | None
    permanent: bool = False


def status_is_permanent(status: int) -> bool:
    """Whether a DIMSE failure status (PS3.7 C.4.2, Annex C) refuses for good.

    ``0x0122`` SOP class not supported, ``0x0124`` not authorised, ``0x0211`` unrecognised operation,
    ``0xA9xx`` data set does not match the SOP class, ``0xCxxx`` cannot understand: permanent.
    ``0xA7xx`` out of resources, ``0x0213`` resource limitation and anything else: transient.
    """
    return status in (0x0122, 0x0124, 0x0211) or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: ``initial * 2**(attempt-1)``, capped at ``max_s`` (attempt counts from 1)."""
    if attempt < 1:
        raise ValueError("attempt: counts from 1")
    return float(min(max_s, initial_s * 2 ** (attempt - 1)))
