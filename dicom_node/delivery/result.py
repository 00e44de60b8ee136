"""What every delivery transport returns, and the retry schedule they share (a leaf module)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["SendResult", "backoff_delay"]


@dataclass(frozen=True)
class SendResult:
    path: Path
    sop_instance_uid: str
    delivered: bool
    status: int | None
    error: str | None


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: ``initial * 2**(attempt-1)``, capped at ``max_s`` (attempt counts from 1)."""
    if attempt < 1:
        raise ValueError("attempt: counts from 1")
    return float(min(max_s, initial_s * 2 ** (attempt - 1)))
