"""What the plugin reads of the node, per study: its job (state, revision, reason), the SOP Instance
UIDs the node has received, and those it wrote (our results).  Two ways, one :class:`NodeView`:

* :class:`NodeJobStore`: the node's SQLite job store (``<data_dir>/jobs.sqlite3``) on the same host,
  opened ``mode=ro``.  In WAL mode a read-only reader needs the ``-wal`` and ``-shm`` files to exist (the
  node creates them) and to be readable by the Orthanc user; ``docs/orthanc.md`` gives the permissions.
* :class:`NodeApi`: the node's ``/api/v1`` over HTTP(S) with a bearer token — Orthanc on another host
  than the node, or a node whose job store is PostgreSQL.

The plugin never writes to the node.  Standard library only: this runs inside Orthanc's interpreter.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["NodeApi", "NodeInstances", "NodeJob", "NodeJobStore", "NodeStoreUnavailable", "NodeView"]


class NodeStoreUnavailable(RuntimeError):
    """The node's status cannot be read (job store missing or locked, node unreachable, token refused)."""


@dataclass(frozen=True)
class NodeJob:
    state: str
    revision: int
    reason: str | None
    pending_update: bool


@dataclass(frozen=True)
class NodeInstances:
    """A study's SOP Instance UIDs the node holds durably (``received``) and wrote (``outputs``)."""

    received: frozenset[str]
    outputs: frozenset[str]


class NodeView(Protocol):
    """The node as the bridge sees it; every method raises :class:`NodeStoreUnavailable` when it cannot
    answer."""

    def job(self, study_uid: str) -> NodeJob | None: ...
    def instances(self, study_uid: str) -> NodeInstances: ...
    def close(self) -> None: ...


class NodeJobStore:
    """:class:`NodeView` on the node's SQLite job store, read-only.

    Parameters
    ----------
    path
        The node's ``jobs.sqlite3``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            if not self.path.is_file():
                raise NodeStoreUnavailable(f"node job store {self.path} does not exist (node not started?)")
            try:
                db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10,
                                     check_same_thread=False)
                db.execute("PRAGMA query_only = ON")
            except sqlite3.Error as exc:
                raise NodeStoreUnavailable(f"node job store {self.path}: {exc}") from exc
            self._db = db
        return self._db

    def _query(self, sql: str, args: tuple[str, ...]) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return list(self._conn().execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                if self._db is not None:
                    self._db.close()
                    self._db = None
                raise NodeStoreUnavailable(f"node job store {self.path}: {exc}") from exc

    def __repr__(self) -> str:
        return f"job store {self.path}"

    def job(self, study_uid: str) -> NodeJob | None:
        """The node's job for a study, ``None`` when the node never received it."""
        rows = self._query("SELECT state, revision, reason, pending_update FROM jobs WHERE study_uid = ?",
                           (study_uid,))
        if not rows:
            return None
        state, revision, reason, pending = rows[0]
        return NodeJob(str(state), int(revision), None if reason is None else str(reason), bool(pending))  # type: ignore[call-overload]

    def instances(self, study_uid: str) -> NodeInstances:
        received = self._query("SELECT sop_instance_uid FROM instances WHERE study_uid = ?", (study_uid,))
        outputs = self._query("SELECT sop_instance_uid FROM outputs WHERE study_uid = ?", (study_uid,))
        return NodeInstances(frozenset(str(r[0]) for r in received), frozenset(str(r[0]) for r in outputs))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _job(value: Any) -> NodeJob | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("job: not an object")
    reason = value.get("reason")
    return NodeJob(str(value["state"]), int(value["revision"]), None if reason is None else str(reason),
                   bool(value["pending_update"]))


def _uids(value: Any, key: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: not a list of UIDs")
    return frozenset(value)


class NodeApi:
    """:class:`NodeView` over the node's HTTP API (``/api/v1``, :mod:`dicom_node.ops.web.api`).

    Parameters
    ----------
    url
        The node's HTTP root, e.g. ``https://gpu-node.example.org:8080``.
    token
        The bearer token (the node's ``[http] api_token_env``); ``None`` for a node on this host that
        answers loopback clients without one.
    timeout_s
        How long one request may take (the bridge's thread waits for it).
    """

    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url: not an http(s) URL: {url!r}")
        self.url = url.rstrip("/")
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"node API {self.url}"  # never the token

    def _get(self, path: str) -> dict[str, Any]:
        request = urllib.request.Request(self.url + path, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            why = {401: "the token was refused", 403: "refused (set [http] api_token_env on the node)"}.get(
                exc.code, f"HTTP {exc.code}")
            raise NodeStoreUnavailable(f"node API {self.url}: {why}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise NodeStoreUnavailable(f"node API {self.url}: {getattr(exc, 'reason', exc)}") from exc
        except ValueError as exc:
            raise NodeStoreUnavailable(f"node API {self.url}: not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise NodeStoreUnavailable(f"node API {self.url}: unexpected answer")
        return body

    def job(self, study_uid: str) -> NodeJob | None:
        body = self._get(f"/api/v1/studies/{urllib.parse.quote(study_uid, safe='')}/job")
        try:
            return _job(body.get("job"))
        except (KeyError, TypeError, ValueError) as exc:
            raise NodeStoreUnavailable(f"node API {self.url}: unexpected answer: {exc}") from exc

    def instances(self, study_uid: str) -> NodeInstances:
        body = self._get(f"/api/v1/studies/{urllib.parse.quote(study_uid, safe='')}")
        try:
            return NodeInstances(_uids(body.get("received"), "received"), _uids(body.get("outputs"), "outputs"))
        except ValueError as exc:
            raise NodeStoreUnavailable(f"node API {self.url}: unexpected answer: {exc}") from exc

    def close(self) -> None:
        return None
