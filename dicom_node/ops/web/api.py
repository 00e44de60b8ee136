"""``/api/v1``: a study's status as JSON, for the Orthanc plugin on another host (read-only).

Routes:

* ``GET /api/v1/studies/{study_uid}/job``: ``{"job": {"state", "revision", "reason", "pending_update"}}``,
  ``"job": null`` when the node never received the study;
* ``GET /api/v1/studies/{study_uid}``: the same, plus ``"received"`` (the SOP Instance UIDs the node holds
  durably) and ``"outputs"`` (those it wrote: our results, never to be sent back to it).

The answers carry UIDs: who may read them is :mod:`dicom_node.ops.web.auth`'s rule (a token from
``[http] api_token_env``, else loopback clients only).  Put a TLS-terminating proxy in front when the
token crosses a network you do not trust.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dicom_node.errors import JobNotFoundError
from dicom_node.ingest.spool import UID_PATTERN
from dicom_node.jobs.model import JobStore
from dicom_node.ops.web.auth import Guard

__all__ = ["api_routes"]



def _job(store: JobStore, study_uid: str) -> dict[str, Any] | None:
    try:
        job = store.by_study(study_uid)
    except JobNotFoundError:
        return None
    return {"state": job.state.value, "revision": job.revision, "reason": job.reason,
            "pending_update": job.pending_update}


def api_routes(store: JobStore, guard: Guard) -> list[Route]:
    """The ``/api/v1`` routes over ``store``, each behind ``guard``."""

    def study_uid_of(request: Request) -> str | Response:
        refused = guard.refused(request)
        if refused is not None:
            return refused
        uid = str(request.path_params["study_uid"])
        if not UID_PATTERN.match(uid):
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
