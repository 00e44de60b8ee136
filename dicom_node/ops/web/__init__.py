"""The node's HTTP side: health, Prometheus metrics and the read-only jobs page (starlette + uvicorn)."""

from dicom_node.ops.web.app import HttpServer, build_app

__all__ = ["HttpServer", "build_app"]
