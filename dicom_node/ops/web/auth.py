"""Who may read what carries patient data over HTTP: the rendered reports and ``/api/v1``.

One rule for both (``/health/*``, ``/metrics`` and the jobs page carry no identifiers and stay open to
whoever reaches the port):

* with ``[http] api_token_env`` set, a request needs the token in that environment variable (at least
  :data:`MIN_TOKEN_CHARS` characters, compared in constant time): ``Authorization: Bearer <token>`` (the
  Orthanc plugin), or HTTP Basic with any user name and the token as password (a browser asks for it);
* without it, only loopback clients are answered (a plugin or a reverse proxy on the node's own host).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dicom_node.config import NodeConfig
from dicom_node.errors import ConfigError

__all__ = ["MIN_TOKEN_CHARS", "Guard", "api_token"]

#: The shortest token accepted (a guessable token is worse than none: it looks like protection).
MIN_TOKEN_CHARS = 32


def api_token(config: NodeConfig, env: dict[str, str] | None = None) -> str | None:
    """The token ``[http] api_token_env`` names, ``None`` when none is configured.

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


def _given(request: Request) -> str | None:
    """The credential a request carries: a bearer token, or a Basic password."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


class Guard:
    """The access rule above for one node; :meth:`refused` says why a request may not read (or ``None``)."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    def refused(self, request: Request) -> Response | None:
        if self._token is None:
            host = request.client.host if request.client is not None else ""
            try:
                if ipaddress.ip_address(host).is_loopback:
                    return None
            except ValueError:
                pass
            return JSONResponse({"error": "only loopback clients without [http] api_token_env"}, status_code=403)
        given = _given(request)
        if given is not None and hmac.compare_digest(given.encode(), self._token.encode()):
            return None
        return JSONResponse({"error": "a valid token is required"}, status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="spinemed-node", Basic realm="spinemed-node"'})
