"""Consultation: follow-up questions about an analysed study, in a page and through ``/api/v1``.

The web process has no model: a question becomes a queued turn in the job store (:meth:`JobStore.ask`),
the worker answers it between studies (:mod:`dicom_node.work.consult`) and writes the answer into the
row as it is generated; the streams here read that row (every :data:`POLL_S`) and pass the new text on as
server-sent events.  A turn that no worker takes within ``[consultation] busy_timeout_s`` is ended
``busy`` ("the model is busy, try again").

Routes (all behind :class:`~dicom_node.ops.web.auth.Guard`: the ``[http]`` token, else loopback only):

* ``GET  /jobs/{job}/consult`` — the page: key image, per-level findings, the chat;
* ``GET  /jobs/{job}/consult/key-image.png`` — the job's key image as PNG;
* ``POST /api/v1/jobs/{job}/consultation`` — start one (``201``; ``409`` when the study is not analysed);
* ``GET  /api/v1/jobs/{job}/consultation`` — the job's consultations;
* ``GET  /api/v1/jobs/{job}/consultation/{c}`` — one, with its transcript;
* ``POST /api/v1/jobs/{job}/consultation/{c}/turns`` — ask ``{"question": ...}``: with ``Accept:
  text/event-stream`` the answer streams back (events ``text`` ``{"text": delta}``, then ``done`` with the
  turn); otherwise ``201`` with the queued turn;
* ``GET  /api/v1/jobs/{job}/consultation/{c}/turns/{t}/events`` — a turn's stream (again);
* ``POST /api/v1/jobs/{job}/consultation/{c}/save`` — ``{"complete": bool}``: the consultation as a DICOM SR
  (:func:`sr_templates.consultation.build_consultation_sr`), sent to the destinations like any result.

Who asks: the HTTP Basic user name, else the header ``[consultation] user_header`` set by the site's
authenticating proxy, else ``[consultation] observer_name``.  Every question, answer, refusal and save is in
the audit trail with the study's digest, never its UID.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import html
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import pydicom
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dicom_node.config import NodeConfig
from dicom_node.errors import ConsultationError, ConsultationLimitError, JobNotFoundError
from dicom_node.ingest.spool import study_key
from dicom_node.jobs.model import ConsultTurn, Job, JobState, JobStore, OutputRecord, TurnState
from dicom_node.log import get_logger, phi_hash
from dicom_node.ops.audit import AuditTrail
from dicom_node.ops.web.auth import Guard
from inference.findings import SpineFindings

__all__ = ["POLL_S", "consult_routes", "turn_json", "user_of"]

log = get_logger(__name__)

#: How often a stream reads its turn's row.
POLL_S: Final = 0.1
#: The output kind of a saved consultation.
CONSULTATION_KIND: Final = "consultation"


def user_of(request: Request, config: NodeConfig) -> str:
    """Who is asking: the Basic user name, else the proxy's user header, else the configured name."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            user = base64.b64decode(value.strip(), validate=True).decode().partition(":")[0].strip()
        except (binascii.Error, UnicodeDecodeError):
            user = ""
        if user:
            return user[:64]
    header = config.consultation.user_header
    if header:
        user = request.headers.get(header, "").strip()
        if user:
            return user[:64]
    return config.consultation.observer_name


def turn_json(turn: ConsultTurn) -> dict[str, Any]:
    """A turn as the API returns it."""
    return {"id": turn.id, "seq": turn.seq, "state": str(turn.state), "question": turn.question,
            "answer": turn.answer, "error": turn.error, "asked_by": turn.asked_by, "asked_at": turn.asked_at,
            "answered_at": turn.answered_at, "prompt_tokens": turn.prompt_tokens,
            "completion_tokens": turn.completion_tokens}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _findings(store: JobStore, job: Job) -> SpineFindings | None:
    text = store.findings(job.study_instance_uid, job.revision)
    return None if text is None else SpineFindings.model_validate_json(text)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
.demo{background:#fde8e8;border:1px solid #c33;color:#900;padding:.5em .8em;font-weight:600;margin-bottom:1em}
.cols{display:flex;gap:1.5em;align-items:flex-start}.left{flex:0 0 46%}.right{flex:1}
img.key{max-width:100%;border:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left}
th{background:#f3f3f3}#chat{border:1px solid #ccc;height:26em;overflow-y:auto;padding:.5em;background:#fafafa}
.q{font-weight:600;margin:.6em 0 .2em}.a{white-space:pre-wrap;margin:0 0 .6em 1em;color:#123}
.err{color:#a11;margin:0 0 .6em 1em}#ask{display:flex;gap:.5em;margin-top:.5em}#question{flex:1;padding:.4em}
small{color:#666}
"""

_SCRIPT = """
const job = JOB;
let consultation = null;
const chat = document.getElementById('chat');
const status = document.getElementById('status');
function add(cls, text) { const d = document.createElement('div'); d.className = cls; d.textContent = text;
  chat.appendChild(d); chat.scrollTop = chat.scrollHeight; return d; }
async function start() {
  const r = await fetch(`/api/v1/jobs/${job}/consultation`, {method: 'POST'});
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.status);
  consultation = body.consultation.id;
}
async function ask(ev) {
  ev.preventDefault();
  const input = document.getElementById('question');
  const question = input.value.trim();
  if (!question) return;
  input.value = ''; document.getElementById('send').disabled = true;
  add('q', question);
  const answer = add('a', '');
  answer.dataset.state = 'asking';
  try {
    if (consultation === null) await start();
    const r = await fetch(`/api/v1/jobs/${job}/consultation/${consultation}/turns`, {method: 'POST',
      headers: {'Content-Type': 'application/json', 'Accept': 'text/event-stream'},
      body: JSON.stringify({question})});
    if (!r.ok) { const b = await r.json(); throw new Error(b.error || r.status); }
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = '';
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf('\\n\\n')) >= 0) {
        const block = buf.slice(0, i); buf = buf.slice(i + 2);
        const ev = (block.match(/^event: (.*)$/m) || [])[1];
        const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1]);
        if (ev === 'text') { answer.textContent += data.text; answer.dataset.state = 'answering'; }
        else if (ev === 'done') { answer.dataset.state = data.state;
          if (data.state !== 'answered') { answer.className = 'err'; answer.textContent = data.error; } }
        else if (ev === 'error') { answer.dataset.state = 'error'; answer.className = 'err';
          answer.textContent = data.error; }
        chat.scrollTop = chat.scrollHeight;
      }
    }
  } catch (e) { answer.className = 'err'; answer.dataset.state = 'error'; answer.textContent = String(e.message || e); }
  document.getElementById('send').disabled = false;
}
async function save(complete) {
  if (consultation === null) { status.textContent = 'nothing to save yet'; return; }
  const r = await fetch(`/api/v1/jobs/${job}/consultation/${consultation}/save`, {method: 'POST',
    headers: {'Content-Type': 'application/json'}, body: JSON.stringify({complete})});
  const b = await r.json();
  status.textContent = r.ok ? `saved (${b.turns} turns, ${b.completion}); sent to ${b.destinations} destination(s)`
                            : b.error;
}
document.getElementById('ask').addEventListener('submit', ask);
document.getElementById('save-partial').addEventListener('click', () => save(false));
document.getElementById('save-complete').addEventListener('click', () => save(true));
"""


def consult_page(job: Job, findings: SpineFindings, has_key_image: bool) -> str:
    """The consultation page of one analysed job (no patient identifiers: the study by its digest)."""
    rows = []
    for f in findings.levels:
        lat = f.laterality.value if f.laterality is not None else ""
        meas = ", ".join(f"{m.type.value} {m.value:g}" for m in f.measurements)
        rows.append(f"<tr><td>{html.escape(f.level)}</td><td>{html.escape(f.finding.value)}</td>"
                    f"<td>{html.escape(f.severity.value)}</td><td>{html.escape(lat)}</td><td>{html.escape(meas)}</td></tr>")
    table = "\n".join(rows) or '<tr><td colspan="5">no findings</td></tr>'
    demo = ('<div class="demo" id="demo-warning">demo — not for clinical use: the answers come from a randomly '
            "initialised demonstration model and carry no medical meaning.</div>" if findings.model.demo else "")
    key = (f'<img class="key" id="key-image" alt="key image" src="/jobs/{job.id}/consult/key-image.png">'
           if has_key_image else "<p><small>no key image for this study</small></p>")
    impression = html.escape(findings.answer.report.diagnosis)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>spinemed-node consultation, job {job.id}</title>
<style>{_STYLE}</style></head>
<body><h1>Consultation — job {job.id} <small>study <code>{phi_hash(job.study_instance_uid)}</code>, revision
{job.revision}, model {html.escape(findings.model.name)}</small></h1>
{demo}
<div class="cols"><div class="left">{key}
<h2>Findings per level</h2>
<table id="findings"><thead><tr><th>level</th><th>finding</th><th>severity</th><th>side</th><th>measurements</th>
</tr></thead><tbody>
{table}
</tbody></table>
<p><small>Impression: {impression}</small></p></div>
<div class="right"><h2>Ask about this study</h2>
<div id="chat"></div>
<form id="ask"><input id="question" autocomplete="off" placeholder="e.g. Is the L5 nerve root compressed?">
<button id="send" type="submit">Ask</button></form>
<p><button id="save-partial" type="button">Save to the study (partial)</button>
<button id="save-complete" type="button">Save to the study (complete)</button> <span id="status"></span></p>
<p><small>Each question goes to the node's model with the study's images, these findings and the questions
before it. Answers are drafts for a clinician, unverified. <a href="/jobs">jobs</a></small></p>
</div></div>
<script>{_SCRIPT.replace("JOB", str(job.id))}</script></body></html>
"""


def _key_image_png(store: JobStore, job: Job) -> bytes | None:
    from PIL import Image

    for o in store.outputs(job.study_instance_uid, job.revision):
        if o.kind == "key_image" and Path(o.path).is_file():
            arr = pydicom.dcmread(o.path).pixel_array
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            return buf.getvalue()
    return None


def consult_routes(config: NodeConfig, store: JobStore, guard: Guard, audit: AuditTrail) -> list[Route]:
    """The consultation page and API over ``store``, each behind ``guard``."""
    cfg = config.consultation

    async def job_of(request: Request) -> Job | Response:
        refused = guard.refused(request)
        if refused is not None:
            return refused
        if not cfg.enabled:
            return _error("consultations are disabled ([consultation] enabled = false)", 404)
        try:
            return await run_in_threadpool(store.get, int(request.path_params["job_id"]))
        except JobNotFoundError:
            return _error("no such job", 404)

    async def consultation_of(request: Request) -> tuple[Job, int] | Response:
        job = await job_of(request)
        if isinstance(job, Response):
            return job
        cid = int(request.path_params["cid"])
        try:
            c = await run_in_threadpool(store.consultation, cid)
        except ConsultationError as exc:
            return _error(str(exc), 404)
        if c.job_id != job.id:
            return _error(f"consultation {cid} is not about job {job.id}", 404)
        return job, cid

    async def _audit(event: str, job: Job, **fields: Any) -> None:
        # durable: the line is on disk before the answer goes out (an fsync: off the event loop)
        await run_in_threadpool(lambda: audit.record(event, study=phi_hash(job.study_instance_uid), job=job.id,
                                                     **fields))

    async def page(request: Request) -> Response:
        job = await job_of(request)
        if isinstance(job, Response):
            return job
        findings = await run_in_threadpool(_findings, store, job)
        if findings is None or job.revision < 1 or job.state not in (JobState.DONE, JobState.EXPORTING):
            why = (f"job {job.id} is {job.state.value}: only a study the node has analysed (job done, with results) "
                   "can be consulted")
            return HTMLResponse(f"<!doctype html><p id='refused'>{html.escape(why)}</p><p><a href='/jobs'>jobs</a></p>",
                                status_code=409)
        outputs = await run_in_threadpool(store.outputs, job.study_instance_uid, job.revision)
        has_key = any(o.kind == "key_image" and Path(o.path).is_file() for o in outputs)
        return HTMLResponse(consult_page(job, findings, has_key))

    async def key_image(request: Request) -> Response:
        job = await job_of(request)
        if isinstance(job, Response):
            return job
        png = await run_in_threadpool(_key_image_png, store, job)
        if png is None:
            return _error("no key image on disk for this job", 404)
        return Response(png, media_type="image/png")

    async def start(request: Request) -> Response:
        job = await job_of(request)
        if isinstance(job, Response):
            return job
        user = user_of(request, config)
        try:
            if await run_in_threadpool(store.findings, job.study_instance_uid, job.revision) is None and \
                    job.revision >= 1:
                raise ConsultationError("this analysis's findings were not kept (analysed by an older version of "
                                        "the node): retry the job to analyse it again, then consult it")
            c = await run_in_threadpool(store.open_consultation, job.id, user)
        except ConsultationError as exc:
            await _audit("consultation_refused", job, user=user, reason=str(exc))
            return _error(str(exc), 409)
        await _audit("consultation_started", job, consultation=c.id, user=user, revision=c.revision)
        return JSONResponse({"consultation": {"id": c.id, "job": c.job_id, "revision": c.revision,
                                              "created_by": c.created_by, "created_at": c.created_at}},
                            status_code=201)

    async def listing(request: Request) -> Response:
        job = await job_of(request)
        if isinstance(job, Response):
            return job
        cs = await run_in_threadpool(store.consultations, job.id)
        return JSONResponse({"job": job.id, "consultations": [
            {"id": c.id, "revision": c.revision, "created_by": c.created_by, "created_at": c.created_at,
             "saved": c.saved_uid is not None} for c in cs]})

    async def transcript(request: Request) -> Response:
        found = await consultation_of(request)
        if isinstance(found, Response):
            return found
        job, cid = found
        c = await run_in_threadpool(store.consultation, cid)
        turns = await run_in_threadpool(store.turns, cid)
        return JSONResponse({"consultation": {"id": c.id, "job": job.id, "revision": c.revision,
                                              "created_by": c.created_by, "saved": c.saved_uid is not None},
                             "turns": [turn_json(t) for t in turns]})

    async def stream(turn_id: int, job: Job) -> AsyncIterator[bytes]:
        sent = 0
        started = time.monotonic()
        while True:
            turn = await run_in_threadpool(store.turn, turn_id)
            if len(turn.answer) > sent:
                yield _sse("text", {"text": turn.answer[sent:]})
                sent = len(turn.answer)
            if turn.final:
                yield _sse("done", turn_json(turn))
                return
            if turn.state is TurnState.QUEUED and time.time() - turn.asked_at > cfg.busy_timeout_s:
                message = (f"The model is busy (no worker took the question within {cfg.busy_timeout_s:g} s): "
                           "try again in a moment.")
                if await run_in_threadpool(store.give_up_turn, turn_id, message):
                    await _audit("consultation_busy", job, consultation=turn.consultation_id, turn=turn.seq,
                           user=turn.asked_by)
                continue
            if time.monotonic() - started > cfg.answer_timeout_s:
                yield _sse("error", {"error": f"no complete answer within {cfg.answer_timeout_s:g} s; the "
                                              "transcript will show it when it ends", "turn": turn_id})
                return
            await asyncio.sleep(POLL_S)

    def _sse_response(body: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def ask(request: Request) -> Response:
        found = await consultation_of(request)
        if isinstance(found, Response):
            return found
        job, cid = found
        try:
            body = await request.json()
        except ValueError:
            return _error("the body must be JSON: {\"question\": \"...\"}", 400)
        question = body.get("question") if isinstance(body, dict) else None
        if not isinstance(question, str) or not question.strip():
            return _error("question: a non-empty string is required", 400)
        question = question.strip()
        if len(question) > cfg.max_question_chars:
            return _error(f"question: longer than {cfg.max_question_chars} characters", 400)
        user = user_of(request, config)
        try:
            turn = await run_in_threadpool(lambda: store.ask(cid, question, user, max_turns=cfg.max_turns,
                                                             token_budget=cfg.token_budget))
        except ConsultationError as exc:
            await _audit("consultation_refused", job, consultation=cid, user=user, reason=str(exc))
            return _error(str(exc), 429 if isinstance(exc, ConsultationLimitError) else 409)
        from dicom_node.work.consult import audit_text

        await _audit("consultation_question", job, consultation=cid, turn=turn.seq, user=user,
               question=audit_text(question))
        if "text/event-stream" in request.headers.get("accept", ""):
            return _sse_response(stream(turn.id, job))
        return JSONResponse({"turn": turn_json(turn),
                             "events": f"/api/v1/jobs/{job.id}/consultation/{cid}/turns/{turn.id}/events"},
                            status_code=201)

    async def events(request: Request) -> Response:
        found = await consultation_of(request)
        if isinstance(found, Response):
            return found
        job, cid = found
        try:
            turn = await run_in_threadpool(store.turn, int(request.path_params["tid"]))
        except ConsultationError as exc:
            return _error(str(exc), 404)
        if turn.consultation_id != cid:
            return _error("no such turn in this consultation", 404)
        return _sse_response(stream(turn.id, job))

    async def save(request: Request) -> Response:
        found = await consultation_of(request)
        if isinstance(found, Response):
            return found
        job, cid = found
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            return _error("the body must be JSON: {\"complete\": true|false}", 400)
        complete = body.get("complete", False) if isinstance(body, dict) else None
        if not isinstance(complete, bool):
            return _error("complete: true or false", 400)
        user = user_of(request, config)
        try:
            result = await run_in_threadpool(_save, config, store, job, cid, user, complete)
        except ConsultationError as exc:
            return _error(str(exc), 409)
        await _audit("consultation_saved", job, consultation=cid, user=user, sop=phi_hash(result["sop_instance_uid"]),
               turns=result["turns"], completion=result["completion"])
        result["sop_instance_uid"] = phi_hash(result["sop_instance_uid"])
        return JSONResponse(result, status_code=201)

    base = "/api/v1/jobs/{job_id:int}/consultation"
    return [
        Route("/jobs/{job_id:int}/consult", page),
        Route("/jobs/{job_id:int}/consult/key-image.png", key_image),
        Route(base, start, methods=["POST"]),
        Route(base, listing, methods=["GET"]),
        Route(base + "/{cid:int}", transcript, methods=["GET"]),
        Route(base + "/{cid:int}/turns", ask, methods=["POST"]),
        Route(base + "/{cid:int}/turns/{tid:int}/events", events, methods=["GET"]),
        Route(base + "/{cid:int}/save", save, methods=["POST"]),
    ]


def _save(config: NodeConfig, store: JobStore, job: Job, cid: int, user: str, complete: bool) -> dict[str, Any]:
    """Build the consultation SR, write it beside the job's results and record it with its deliveries."""
    from dicom_node.work.worker import write_dataset_atomic
    from sr_templates.consultation import ConsultationTurn, build_consultation_sr
    from sr_templates.errors import ReportError
    from sr_templates.reader import read_measurement_report

    c = store.consultation(cid)
    if c.revision != job.revision:
        raise ConsultationError("the study was analysed again since this consultation began: it cannot be saved "
                                "against the new results")
    turns = [ConsultationTurn(t.question, t.answer) for t in store.turns(cid) if t.state is TurnState.ANSWERED]
    if not turns:
        raise ConsultationError("no answered question to save yet")
    discussed = [o for o in store.outputs(job.study_instance_uid, job.revision) if o.kind == "measurement_report"]
    if not discussed or not Path(discussed[0].path).is_file():
        raise ConsultationError("the report this consultation discusses is no longer on the node (retention)")
    ds = pydicom.dcmread(discussed[0].path)
    try:
        read = read_measurement_report(ds)
        sr = build_consultation_sr(
            ds, turns, observer_name=user, complete=complete, demo=read.demo,
            series_number=config.consultation.series_number,
            instance_number=len([o for o in store.outputs(job.study_instance_uid) if o.kind == CONSULTATION_KIND]) + 1,
            device_name=read.device_observer_name or None, device_uid=read.device_observer_uid or None,
            institution_name=config.output.institution_name, uid_prefix=config.output.uid_prefix,
        )
    except (ReportError, ValueError) as exc:
        raise ConsultationError(f"the consultation SR could not be built: {exc}") from exc
    uid = str(sr.SOPInstanceUID)
    out_dir = config.outputs_dir / study_key(job.study_instance_uid) / f"r{job.revision}"
    path = out_dir / f"{CONSULTATION_KIND}-{uid}.dcm"
    write_dataset_atomic(sr, path)
    destinations = [] if config.routing.dry_run else [d.name for d in config.destinations]
    kinds = {d.name: d.output_kinds for d in config.destinations if d.output_kinds is not None}
    record = OutputRecord(uid, job.study_instance_uid, job.revision, CONSULTATION_KIND, str(sr.SOPClassUID), str(path))
    store.add_outputs(job.id, [record], destinations, kinds, detail=f"consultation {cid} saved")
    store.mark_saved(cid, uid)
    sent_to = sum(1 for d in destinations if d not in kinds or CONSULTATION_KIND in kinds[d])
    return {"sop_instance_uid": uid, "turns": len(turns), "completion": "COMPLETE" if complete else "PARTIAL",
            "destinations": sent_to}
