"""spinemed-node: receive spine studies over DICOM, keep them durably, send back per-level SRs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spinemed-node")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
