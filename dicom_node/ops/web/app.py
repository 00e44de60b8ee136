"""The starlette application and the uvicorn server thread that serves it.

Routes: ``/health/live``, ``/health/ready`` (JSON; 200 or 503), ``/metrics`` (Prometheus text),
``/jobs`` (HTML, read-only), ``/shadow`` (shadow-mode agreement, no identifiers:
:mod:`dicom_node.ops.web.shadow_page`), ``/jobs/{id}/report/{kind}`` (the result SR rendered by ``dsr2html``),
``/api/v1/studies/...`` (a study's status as JSON, for the Orthanc plugin: :mod:`dicom_node.ops.web.api`),
the consultation page and API (``/jobs/{id}/consult``, ``/api/v1/jobs/{id}/consultation``:
:mod:`dicom_node.ops.web.consult`, the only routes that change anything) and ``/`` (redirects to ``/jobs``).
The reports, ``/api/v1`` and consultations carry patient data and answer only as
:mod:`dicom_node.ops.web.auth` allows (a token, else loopback clients).

:class:`HttpServer` binds its socket itself before starting uvicorn in a daemon thread, so a port that
is taken fails at once with an :class:`OSError` (the receiving node logs it and keeps receiving: DICOM
matters more than the dashboard).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from dicom_node.config import NodeConfig
from dicom_node.errors import JobNotFoundError
from dicom_node.log import get_logger
from dicom_node.ops.audit import AuditTrail, open_audit
from dicom_node.ops.metrics import NodeCollector, render_metrics
from dicom_node.ops.web.api import api_routes
from dicom_node.ops.web.auth import Guard, api_token
from dicom_node.ops.web.consult import consult_routes
from dicom_node.ops.web.health import Readiness
from dicom_node.ops.web.pages import ReportError, jobs_page, render_report
from dicom_node.ops.web.shadow_page import shadow_page

__all__ = ["HttpServer", "build_app"]

log = get_logger(__name__)

_PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def build_app(config: NodeConfig, readiness: Readiness, collector: NodeCollector,
              audit: AuditTrail | None = None) -> Starlette:
    """The HTTP application over one node's store and counters.

    ``audit`` is the receiving process's audit trail (consultations write to it); ``None`` opens one.

    Raises
    ------
    ConfigError
        ``[http] api_token_env`` names a variable that is not set, or a token too short.
    """
    store = collector.sources.store
    guard = Guard(api_token(config))  # the reports and /api/v1 carry patient data: dicom_node.ops.web.auth

    def live(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    def ready(request: Request) -> Response:
        rep = readiness.report()
        return JSONResponse(rep.as_dict(), status_code=200 if rep.ready else 503)

    def metrics(request: Request) -> Response:
        return Response(render_metrics(collector), media_type=_PROMETHEUS_TEXT)

    def jobs(request: Request) -> Response:
        return HTMLResponse(jobs_page(store, reports=config.http.reports, consult=config.consultation.enabled))

    def report(request: Request) -> Response:
        if not config.http.reports:
            return PlainTextResponse("reports are disabled ([http] reports = false)", status_code=404)
        refused = guard.refused(request)
        if refused is not None:
            return refused
        try:
            job_id = int(request.path_params["job_id"])
            body, media_type = render_report(store, job_id, str(request.path_params["kind"]))
            return Response(body, media_type=media_type)
        except JobNotFoundError:
            return PlainTextResponse("no such job", status_code=404)
        except ReportError as exc:
            return PlainTextResponse(str(exc), status_code=404)

    def shadow(request: Request) -> Response:
        refused = guard.refused(request)  # agreement with the site's results: not for whoever reaches the port
        if refused is not None:
            return refused
        return HTMLResponse(shadow_page(store, enabled=config.shadow.labels_dir is not None))

    def root(request: Request) -> Response:
        return RedirectResponse("/jobs")

    routes = [
        Route("/", root),
        Route("/health/live", live),
        Route("/health/ready", ready),
        Route("/metrics", metrics),
        Route("/jobs", jobs),
        Route("/shadow", shadow),
        Route("/jobs/{job_id:int}/report/{kind:str}", report),
        *api_routes(store, guard),
        *consult_routes(config, store, guard, audit if audit is not None else open_audit(config)),
    ]
    return Starlette(routes=routes)


class HttpServer:
    """uvicorn serving ``app`` from a daemon thread.

    Parameters
    ----------
    app
        The ASGI application.
    host, port
        Where to listen (``port`` 0: any free port; see :attr:`port` after :meth:`start`).
    """

    def __init__(self, app: Any, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> int:
        """Bind and start serving; returns the bound port.

        Raises
        ------
        OSError
            The address cannot be bound (port taken, address not local).
        RuntimeError
            uvicorn did not come up in ``timeout_s``.
        """
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        cfg = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2)
        server = uvicorn.Server(cfg)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        log.info("http listening", host=self.host, port=self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None
