"""``/api/v1``: a study's status as JSON, for the Orthanc plugin on another host (read-only).

Routes:

* ``GET /api/v1/studies/{study_uid}/job``: ``{"job": {"state", "revision", "reason", "pending_update"}}``,
  ``"job": null`` when the node never received the study;
* ``GET /api/v1/studies/{study_uid}``: the same, plus ``"received"`` (the SOP Instance UIDs the node holds
  durably) and ``"outputs"`` (those it wrote: our results, never to be sent back to it).

The answers carry UIDs, so they are not public: with ``[http] api_token_env`` set, every request needs
``Authorization: Bearer <token>`` (the variable's value, at least :data:`MIN_TOKEN_CHARS` characters,
compared in constant time); without it, only loopback clients are answered (the plugin on the node's own
host).  Put a TLS-terminating proxy in front when the token crosses a network you do not trust.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dicom_node.config import NodeConfig
from dicom_node.errors import ConfigError, JobNotFoundError
from dicom_node.store import JobStore

__all__ = ["MIN_TOKEN_CHARS", "api_routes", "api_token"]

#: The shortest bearer token accepted (a guessable token is worse than none: it looks like protection).
MIN_TOKEN_CHARS = 32
_UID = re.compile(r"^[0-9.]{1,64}$")


def api_token(config: NodeConfig, env: dict[str, str] | None = None) -> str | None:
    """The bearer token ``[http] api_token_env`` names, ``None`` when none is configured.

    Raises
    ------
    ConfigError
        The variable is not set, or its token is shorter than :data:`MIN_TOKEN_CHARS`.
    """
    name = config.http.api_token_env
    if name is None:
        return None
    token = (os.environ if env is None else env).get(name, "")
    if not token:
        raise ConfigError(f"http.api_token_env: environment variable {name} is not set")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"http.api_token_env: the token in {name} is shorter than {MIN_TOKEN_CHARS} characters")
    return token


def _refused(request: Request, token: str | None) -> Response | None:
    """Why ``request`` may not read the API, or ``None`` when it may."""
    if token is None:
        host = request.client.host if request.client is not None else ""
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return None
        return JSONResponse({"error": "only loopback clients without [http] api_token_env"}, status_code=403)
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return None
    return JSONResponse({"error": "a valid bearer token is required"}, status_code=401,
                        headers={"WWW-Authenticate": 'Bearer realm="spinemed-node"'})


def _job(store: JobStore, study_uid: str) -> dict[str, Any] | None:
    try:
        job = store.by_study(study_uid)
    except JobNotFoundError:
        return None
    return {"state": job.state.value, "revision": job.revision, "reason": job.reason,
            "pending_update": job.pending_update}


def api_routes(config: NodeConfig, store: JobStore) -> list[Route]:
    """The ``/api/v1`` routes over ``store``.

    Raises
    ------
    ConfigError
        From :func:`api_token`.
    """
    token = api_token(config)

    def study_uid_of(request: Request) -> str | Response:
        refused = _refused(request, token)
        if refused is not None:
            return refused
        uid = str(request.path_params["study_uid"])
        if not _UID.match(uid):
            return JSONResponse({"error": "not a Study Instance UID"}, status_code=400)
        return uid

    def job(request: Request) -> Response:
        uid = study_uid_of(request)
        if isinstance(uid, Response):
            return uid
        return JSONResponse({"study_instance_uid": uid, "job": _job(store, uid)})

    def study(request: Request) -> Response:
        uid = study_uid_of(request)
        if isinstance(uid, Response):
            return uid
        return JSONResponse({
            "study_instance_uid": uid,
            "job": _job(store, uid),
            "received": sorted(r.sop_instance_uid for r in store.instances(uid)),
            "outputs": sorted({o.sop_instance_uid for o in store.outputs(uid)}),
        })

    return [Route("/api/v1/studies/{study_uid:str}/job", job), Route("/api/v1/studies/{study_uid:str}", study)]
