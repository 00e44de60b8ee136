"""Consultation: follow-up questions about an analysed study, answered by the worker's model.

A real node (listener, job store, web app with an ``[http]`` token) and a worker thread with the demo model
analyse a phantom MR study and deliver its results to a storescp; then headless Chromium opens the
consultation page from the jobs page and asks two questions, which the worker answers from its turn queue.
The backend's own record of the messages it built shows the second turn carrying the first.  Saving makes a
consultation SR that dciodvfy passes and dsrdump shows with both turns, delivered like any result.  Without
the token the page and API refuse; the turn limit and a study not analysed are refused; a question no worker
takes is answered "busy".  The openai backend's consult path streams from a small real SSE server.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from conftest import StoreSCP, start_storescp, storescu, wait_until

from dicom_node.config import load_config
from dicom_node.devtools.phantoms import SyntheticStudy, make_lumbar_mr
from dicom_node.jobs.model import InstanceRecord, JobState, TurnState
from dicom_node.log import phi_hash
from dicom_node.node import ReceivingNode
from dicom_node.work.pipeline import Pipeline
from dicom_node.work.worker import Worker
from inference.findings import ImagePlane, InputImage, ModelAnswer, ModelIdentity, NarrativeReport, SpineFindings
from inference.inputs import ModelImage, ModelInput, Task, Turn
from inference.settings import ModelSettings, OpenAISettings
from sr_templates.consultation import ConsultationTurn, build_consultation_sr

pytestmark = pytest.mark.slow

TOKEN_ENV = "SPINEMED_CONSULT_TEST_TOKEN"
TOKEN = "consult-test-token-0123456789abcdefghij"
USER = "dr.house"
MAX_TURNS = 3
BUSY_S = 3.0
Q1 = "Is the L5 nerve root compressed?"
Q2 = "And what about the L4-L5 disc?"


@dataclass
class Node:
    node: ReceivingNode
    scp: StoreSCP
    study: SyntheticStudy
    base: str
    worker: Worker
    thread: threading.Thread
    job_id: int
    audit: Path


def _auth(user: str = USER, token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("consult")
    os.environ[TOKEN_ENV] = TOKEN
    scp = start_storescp(tmp)
    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp / "data", "min_free_disk_mb": 0},
        http={"port": 0, "api_token_env": TOKEN_ENV, "require_worker": False, "echo_destinations": False},
        completeness={"quiet_seconds": 1.0, "force_seconds": 60, "check_interval_s": 0.1},
        model={"backend": "demo", "path": str(demo_model_dir)},
        worker={"poll_interval_s": 0.05},
        consultation={"max_turns": MAX_TURNS, "max_answer_tokens": 48, "busy_timeout_s": BUSY_S},
        destinations=[{"name": "results", "ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port}],
    )
    n = ReceivingNode(cfg)
    n.start()
    worker = Worker(cfg, n.store, pipeline=Pipeline(cfg))
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    study = make_lumbar_mr(tmp / "mr", slices=5, size=96, seed=7, patient_id="CONSULT-PAT-4711")
    assert storescu(n.receiver.port, list(study.paths)).returncode == 0
    assert n.receiver.flush()
    job = wait_until(lambda: (j := n.store.by_study(study.study_instance_uid)).state is JobState.DONE and j,
                     180, "the study analysed and delivered")
    holder = Node(n, scp, study, f"http://127.0.0.1:{n.ops.http_port}", worker, thread, job.id, cfg.audit_path)
    yield holder
    holder.worker.stop()
    holder.thread.join(timeout=30)
    n.stop()
    scp.proc.terminate()
    scp.proc.wait(timeout=10)
    os.environ.pop(TOKEN_ENV, None)


def _chrome(auth: dict[str, str]) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    exe, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if exe is None or driver is None:
        pytest.fail("Debian chromium and chromium-driver are needed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1400,900"):
        opts.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    # the credential a browser sends after its Basic prompt, on every request (page, fetch, image)
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": auth})
    return browser


# ---------------------------------------------------------------------------------------------- access
def test_page_and_api_refuse_without_the_token(node: Node) -> None:
    page = f"{node.base}/jobs/{node.job_id}/consult"
    api = f"{node.base}/api/v1/jobs/{node.job_id}/consultation"
    for headers in ({}, _auth(token="x" * 40), {"Authorization": "Bearer wrong"}):
        assert httpx.get(page, headers=headers).status_code == 401
        assert httpx.post(api, headers=headers).status_code == 401
        assert httpx.get(api, headers=headers).status_code == 401
        assert httpx.get(f"{page}/key-image.png", headers=headers).status_code == 401
    r = httpx.get(page, headers=_auth())
    assert r.status_code == 200 and "demo — not for clinical use" in r.text
    assert node.study.study_instance_uid not in r.text and "CONSULT-PAT-4711" not in r.text
    assert httpx.get(api, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    png = httpx.get(f"{page}/key-image.png", headers=_auth())
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_study_not_analysed_is_refused(node: Node, tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.999001"
    rec = InstanceRecord("1.2.826.0.1.3680043.8.498.999002", uid, "1.2.826.0.1.3680043.8.498.999003",
                         "1.2.840.10008.5.1.4.1.1.4", "MR", "t2 sag", str(tmp_path / "none.dcm"), "1.2.840.10008.1.2.1",
                         1, "TEST", time.time())
    node.node.store.record_instance(rec)
    job = node.node.store.by_study(uid)
    assert job.state is not JobState.DONE
    r = httpx.post(f"{node.base}/api/v1/jobs/{job.id}/consultation", headers=_auth())
    assert r.status_code == 409 and "only a study the node has analysed" in r.json()["error"]
    assert httpx.get(f"{node.base}/jobs/{job.id}/consult", headers=_auth()).status_code == 409
    assert httpx.post(f"{node.base}/api/v1/jobs/999999/consultation", headers=_auth()).status_code == 404


# ---------------------------------------------------------------------------------------------- the page
def test_two_questions_in_headless_chromium_then_save(node: Node, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser = _chrome(_auth())
    try:
        browser.get(f"{node.base}/jobs")
        row = browser.find_element(By.ID, f"job-{node.job_id}")
        row.find_element(By.CSS_SELECTOR, "a.consult").click()  # reached by job id, from the jobs page
        assert browser.current_url.endswith(f"/jobs/{node.job_id}/consult")
        assert "demo — not for clinical use" in browser.find_element(By.ID, "demo-warning").text
        assert browser.find_elements(By.CSS_SELECTOR, "#findings tbody tr")
        wait_until(lambda: browser.execute_script(
            "return document.getElementById('key-image').naturalWidth") > 0, 30, "the key image shown")
        for i, question in enumerate((Q1, Q2)):
            field = browser.find_element(By.ID, "question")
            field.send_keys(question)
            browser.find_element(By.ID, "send").click()
            wait_until(lambda i=i: len(answers := browser.find_elements(By.CSS_SELECTOR, "#chat .a")) > i
                       and answers[i].get_attribute("data-state") == "answered", 60, f"answer {i + 1}")
        shown = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#chat .a")]
        assert [q.text for q in browser.find_elements(By.CSS_SELECTOR, "#chat .q")] == [Q1, Q2]
        shot = tmp_path / "consultation.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("SPINEMED_DOCS_SCREENSHOT"):  # scripts: refresh docs/images/consultation.png
            shutil.copyfile(shot, os.environ["SPINEMED_DOCS_SCREENSHOT"])
        browser.find_element(By.ID, "save-partial").click()
        wait_until(lambda: browser.find_element(By.ID, "status").text.startswith("saved"), 30, "saved")
        assert "2 turns, PARTIAL" in browser.find_element(By.ID, "status").text
    finally:
        browser.quit()

    store = node.node.store
    (c,) = store.consultations(node.job_id)
    turns = store.turns(c.id)
    assert [(t.question, t.state, t.asked_by) for t in turns] == [(Q1, TurnState.ANSWERED, USER),
                                                                  (Q2, TurnState.ANSWERED, USER)]
    assert all(t.answer.strip() for t in turns) and all(t.prompt_tokens > 0 < t.completion_tokens for t in turns)
    assert [s.strip() for s in shown] == [t.answer.strip() for t in turns], "the page shows the stored answers"
    # the second turn's request, as the backend built it, carries the first turn
    messages = node.worker.pipeline.model.last_consult_messages  # type: ignore[attr-defined]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    first = messages[1]["content"]
    assert sum(p["type"] == "image" for p in first) >= 1 and any("findings for this study" in p.get("text", "")
                                                                  for p in first)
    assert first[-1]["text"].endswith(Q1)
    assert messages[2]["content"] == turns[0].answer and messages[3]["content"] == Q2

    # the saved SR: its own series, both turns, the observer, the discussed SR, sent like every result
    (saved,) = [o for o in store.outputs(node.study.study_instance_uid) if o.kind == "consultation"]
    assert c.saved_uid == saved.sop_instance_uid
    wait_until(lambda: store.by_study(node.study.study_instance_uid).state is JobState.DONE
               and any(d.output_uid == saved.sop_instance_uid and d.state == "delivered"
                       for d in store.deliveries(node.study.study_instance_uid)), 60, "the consultation SR delivered")
    ds = pydicom.dcmread(saved.path)
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.Modality) == ("PARTIAL", "UNVERIFIED", "SR")
    measurement = next(o for o in store.outputs(node.study.study_instance_uid) if o.kind == "measurement_report")
    assert ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == measurement.sop_instance_uid
    assert ds.SeriesInstanceUID != pydicom.dcmread(measurement.path, stop_before_pixels=True).SeriesInstanceUID
    if shutil.which("dciodvfy"):
        proc = subprocess.run(["dciodvfy", saved.path], capture_output=True, text=True, timeout=60)
        lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        assert not [ln for ln in lines if "Error" in ln], lines
    else:
        pytest.fail("dicom3tools (dciodvfy) is needed")
    dump = subprocess.run(["dsrdump", "+Pl", saved.path], capture_output=True, text=True, timeout=60, check=True).stdout
    for text in (Q1, Q2, f'"{USER}^"', "Source report", "Completion Flag     : PARTIAL", "UNVERIFIED"):
        assert text in dump, text
    assert dump.index(Q1) < dump.index(Q2)

    # the audit trail: who, which study (its digest), each question and answer; no UID in clear
    lines = [json.loads(ln) for ln in node.audit.read_text().splitlines()]
    events = [e for e in lines if str(e["event"]).startswith("consultation_") and e.get("job") == node.job_id]
    asked = [e for e in events if e["event"] == "consultation_question"]
    answered = [e for e in events if e["event"] == "consultation_answer"]
    assert [e["question"] for e in asked] == [Q1, Q2] and all(e["user"] == USER for e in asked)
    assert len(answered) == 2 and all(e["study"] == phi_hash(node.study.study_instance_uid) for e in events)
    assert any(e["event"] == "consultation_saved" for e in events)
    assert node.study.study_instance_uid not in json.dumps(events)


def test_busy_then_turn_limit(node: Node) -> None:
    """With no worker serving turns a question is answered "busy" (not counted); then the study's turn
    limit stops the fourth question."""
    api = f"{node.base}/api/v1/jobs/{node.job_id}/consultation"
    cid = httpx.post(api, headers=_auth()).json()["consultation"]["id"]
    node.worker.stop()
    node.thread.join(timeout=30)
    with httpx.stream("POST", f"{api}/{cid}/turns", headers={**_auth(), "Accept": "text/event-stream"},
                      json={"question": "Anything else?"}, timeout=BUSY_S + 30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    done = json.loads(body.split("event: done\ndata: ")[1].split("\n")[0])
    assert done["state"] == "busy" and "model is busy" in done["error"] and "try again" in done["error"]

    # a worker again (the same loaded model): the third question is answered, the fourth refused
    node.worker = Worker(node.worker.config, node.node.store, pipeline=node.worker.pipeline)
    node.thread = threading.Thread(target=node.worker.run_forever, daemon=True)
    node.thread.start()
    r = httpx.post(f"{api}/{cid}/turns", headers=_auth(), json={"question": "Is there a fracture?"})
    assert r.status_code == 201, r.text
    with httpx.stream("GET", node.base + r.json()["events"], headers=_auth(), timeout=60) as s:
        body = "".join(s.iter_text())
    assert json.loads(body.split("event: done\ndata: ")[1].split("\n")[0])["state"] == "answered"
    transcript = httpx.get(f"{api}/{cid}", headers=_auth()).json()
    assert [t["state"] for t in transcript["turns"]] == ["busy", "answered"]
    r = httpx.post(f"{api}/{cid}/turns", headers=_auth(), json={"question": "One more?"})
    assert r.status_code == 429 and r.json()["error"].startswith(f"turn limit reached: {MAX_TURNS} questions")
    assert httpx.post(f"{api}/{cid}/turns", headers=_auth(), json={"question": " "}).status_code == 400


# ---------------------------------------------------------------------------------------------- units
def test_demo_backend_streams_what_it_answers(node: Node) -> None:
    model = node.worker.pipeline.model
    inputs, findings = node.worker.consultations._prepared(node.study.study_instance_uid, 1)
    pieces: list[str] = []
    answer = model.consult(inputs, findings, [Turn(Q1, "No.")], Q2, pieces.append, max_new_tokens=20)
    assert "".join(pieces) == answer.text and 0 < answer.completion_tokens <= 20
    assert answer.prompt_tokens > 100, "images, findings and the prior turn"


def _model_input() -> ModelInput:
    ref = InputImage(index=0, plane=ImagePlane.SAGITTAL, modality="MR", series_instance_uid="1.2.3",
                     sop_class_uid="1.2.840.10008.5.1.4.1.1.4", sop_instance_uids=("1.2.3.1",), rows=56, columns=56)
    return ModelInput("1.2.3.4", "MR", Task.STRUCTURED_REPORT, (ModelImage(np.zeros((56, 56), np.uint8), ref),))


def _findings(inputs: ModelInput) -> SpineFindings:
    report = NarrativeReport(findings="f", diagnosis="d", treatment_suggestions="t", risk_and_prognosis="r",
                             follow_up="u", diagnostic_basis="b")
    answer = ModelAnswer.model_validate({"levels": [{"level": "L4-L5", "finding": "disc_herniation",
                                                      "severity": "moderate"}], "report": report.model_dump()})
    ident = ModelIdentity(name="m", version="v", weights_digest="d", backend="openai", prompt_version="p", demo=False)
    return SpineFindings(study_instance_uid="1.2.3.4", model=ident, task="structured_report",
                         images=[i.ref for i in inputs.images], answer=answer)


def test_openai_backend_consult_streams_server_sent_events() -> None:
    from inference.backends.openai_backend import OpenAIBackend

    requests: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "spinegpt"}
            for i, piece in enumerate(["The L5 ", "root is ", "not compressed."]):
                choice = {"index": 0, "delta": {"content": piece, **({"role": "assistant"} if i == 0 else {})},
                          "finish_reason": None}
                self.wfile.write(f"data: {json.dumps({**base, 'choices': [choice]})}\n\n".encode())
                self.wfile.flush()
            end = {"index": 0, "delta": {}, "finish_reason": "stop"}
            self.wfile.write(f"data: {json.dumps({**base, 'choices': [end]})}\n\n".encode())
            usage = {"prompt_tokens": 321, "completion_tokens": 7, "total_tokens": 328}
            self.wfile.write(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = ModelSettings(backend="openai", openai=OpenAISettings(
            base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", timeout_s=20, max_retries=0))
        backend = OpenAIBackend(settings)
        inputs = _model_input()
        pieces: list[str] = []
        answer = backend.consult(inputs, _findings(inputs), [Turn(Q1, "Mild.")], Q2, pieces.append, max_new_tokens=64)
    finally:
        server.shutdown()
        server.server_close()
    assert pieces == ["The L5 ", "root is ", "not compressed."] and answer.text == "".join(pieces)
    assert (answer.prompt_tokens, answer.completion_tokens, answer.truncated) == (321, 7, False)
    (req,) = requests
    assert req["stream"] is True and req["max_tokens"] == 64 and "response_format" not in req
    roles = [m["role"] for m in req["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    first = req["messages"][1]["content"]
    assert any(p["type"] == "image_url" and p["image_url"]["url"].startswith("data:image/png;base64,") for p in first)
    assert req["messages"][2]["content"] == "Mild." and req["messages"][3]["content"] == Q2


def test_consultation_sr_round_trip(node: Node) -> None:
    """The SR reads back with highdicom: observer, reference, turns in order, flags."""
    import highdicom as hd

    measurement = next(o for o in node.node.store.outputs(node.study.study_instance_uid)
                       if o.kind == "measurement_report")
    discussed = pydicom.dcmread(measurement.path)
    turns = [ConsultationTurn(Q1, "No."), ConsultationTurn(Q2, "Mild bulge.")]
    sr = build_consultation_sr(discussed, turns, observer_name="House^Gregory", complete=True, demo=False)
    back = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(BytesIO(_bytes(sr))))
    assert (back.CompletionFlag, back.VerificationFlag, back.StudyInstanceUID) == (
        "COMPLETE", "UNVERIFIED", discussed.StudyInstanceUID)
    items = back.ContentSequence
    texts = [(i.ConceptNameCodeSequence[0].CodeValue, i.TextValue) for i in items if i.ValueType == "TEXT"]
    assert texts == [("121062", Q1), ("121106", "No."), ("121062", Q2), ("121106", "Mild bulge.")]
    (ref,) = [i for i in items if i.ValueType == "COMPOSITE"]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == discussed.SOPInstanceUID
    assert any(i.ValueType == "PNAME" and i.PersonName == "House^Gregory" for i in items)
    with pytest.raises(ValueError, match="turns"):
        build_consultation_sr(discussed, [], observer_name="x", complete=False, demo=False)
    with pytest.raises(TypeError, match="discussed"):
        build_consultation_sr(object(), turns, observer_name="x", complete=False, demo=False)  # type: ignore[arg-type]


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- the store
def test_turn_queue_in_both_stores(any_store: Any, tmp_path: Path) -> None:
    from dicom_node.errors import ConsultationError, ConsultationLimitError
    from dicom_node.jobs.model import OutputRecord

    store = any_store
    uid = "1.2.826.0.1.3680043.8.498.777"
    store.record_instance(InstanceRecord(uid + ".1", uid, uid + ".2", "1.2.840.10008.5.1.4.1.1.4", "MR", "", "/x",
                                         "1.2.840.10008.1.2.1", 1, "T", time.time()))
    job = store.by_study(uid)
    with pytest.raises(ConsultationError, match="only a study the node has analysed"):
        store.open_consultation(job.id, USER)
    (job,) = store.complete_due(time.time() + 100, 0, 1000)
    assert store.claim("w", time.time(), 60).id == job.id
    store.transition(job.id, "w", JobState.INFERRING)
    store.transition(job.id, "w", JobState.REPORTING)
    store.record_findings(uid, 1, '{"x": 1}')
    store.finish_report(job.id, "w", 1, [OutputRecord(uid + ".9", uid, 1, "measurement_report", "1.2", "/o")], [])
    store.transition(job.id, "w", JobState.DONE)
    assert store.findings(uid, 1) == '{"x": 1}' and store.findings(uid, 2) is None

    c = store.open_consultation(job.id, USER)
    t1 = store.ask(c.id, Q1, USER, max_turns=2, token_budget=1000)
    assert (t1.seq, t1.state) == (1, TurnState.QUEUED)
    with pytest.raises(ConsultationError, match="still being answered"):
        store.ask(c.id, Q2, USER, max_turns=2, token_budget=1000)
    claimed = store.claim_turn("w", time.time())
    assert claimed is not None and claimed.id == t1.id and claimed.state is TurnState.ANSWERING
    assert store.claim_turn("w2", time.time()) is None
    assert not store.give_up_turn(t1.id, "busy"), "a turn a worker took is not given up"
    store.write_answer(t1.id, "w", "Partly")
    assert store.turn(t1.id).answer == "Partly"
    done = store.finish_turn(t1.id, "w", TurnState.ANSWERED, "Partly, yes.", prompt_tokens=600, completion_tokens=3)
    assert done.final and store.study_tokens(uid) == 603
    t2 = store.ask(c.id, Q2, USER, max_turns=2, token_budget=1000)
    assert store.give_up_turn(t2.id, "busy") and store.turn(t2.id).state is TurnState.BUSY
    with pytest.raises(ConsultationLimitError, match="token budget spent"):
        store.ask(c.id, Q2, USER, max_turns=2, token_budget=603)
    t3 = store.ask(c.id, Q2, USER, max_turns=2, token_budget=1000)  # the busy turn did not count
    assert t3.seq == 3
    assert store.claim_turn("w", time.time()).id == t3.id and store.answering_workers() == {"w"}
    assert store.fail_turns_of("w", "the worker stopped") == 1 and store.turn(t3.id).state is TurnState.FAILED
    with pytest.raises(ConsultationLimitError, match="turn limit reached: 2"):
        store.ask(store.open_consultation(job.id, USER).id, "again?", USER, max_turns=2, token_budget=1000)
    assert [t.seq for t in store.turns(c.id)] == [1, 2, 3] and len(store.consultations(job.id)) == 2

    saved = OutputRecord(uid + ".10", uid, 1, "consultation", "1.2.840.10008.5.1.4.1.1.88.33", "/c")
    job = store.add_outputs(job.id, [saved], ["pacs"], detail="consultation saved")
    assert job.state is JobState.EXPORTING
    assert [d.output_uid for d in store.deliveries(uid, 1)] == [saved.sop_instance_uid]
    with pytest.raises(ConsultationError, match="done job only"):
        store.add_outputs(job.id, [saved], ["pacs"], detail="again")
    store.mark_saved(c.id, saved.sop_instance_uid)
    assert store.consultation(c.id).saved_uid == saved.sop_instance_uid
