"""A model server that is down, then back: studies wait (deferred with the persisted backoff), readiness and
metrics say so, and they are analysed when it answers; one that stays down fails the job with the reason.

A real ``spinemed-node serve`` subprocess with ``backend = "openai"``; the peer is an OpenAI-compatible HTTP
server on loopback (the stdlib's ``ThreadingHTTPServer``, started only after the study arrived) that answers
each request with a schema-valid answer, or with the HTTP status a test asks for.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import NodeProcess, free_port, start_node, storescu

from dicom_node.devtools.phantoms import make_lumbar_mr
from dicom_node.jobs.model import Job, JobState

pytestmark = pytest.mark.slow

ANSWER = {
    "levels": [
        {
            "level": "L4-L5",
            "finding": "disc_herniation",
            "severity": "moderate",
            "grade": None,
            "laterality": "left",
            "measurements": [],
            "evidence": [{"image": 0, "x": 2.0, "y": 2.0}],
        }
    ],
    "report": {
        k: "Synthetic answer of the test's model server."
        for k in ("findings", "diagnosis", "treatment_suggestions", "risk_and_prognosis", "follow_up",
                  "diagnostic_basis")
    },
}


class ModelServer:
    """An OpenAI-compatible chat-completions server: ``status`` 200 answers :data:`ANSWER`, else that status."""

    def __init__(self, port: int, status: int = 200) -> None:
        self.status = status
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.requests += 1
                if outer.status != 200:
                    body = json.dumps({"error": {"message": "test model server refuses"}}).encode()
                    self.send_response(outer.status)
                else:
                    body = json.dumps({
                        "id": "t", "object": "chat.completion", "created": 0, "model": "spinegpt",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": json.dumps(ANSWER)}}],
                    }).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _node(tmp_path: Path, model_port: int, *, max_attempts: int) -> NodeProcess:
    data, port, http_port = tmp_path / "data", free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(f"""
[node]
host = "127.0.0.1"
port = {port}
data_dir = "{data}"
min_free_disk_mb = 0

[http]
port = {http_port}
ready_cache_s = 0

[completeness]
quiet_seconds = 0.5
force_seconds = 300
check_interval_s = 0.1

[model]
backend = "openai"
timeout_s = 30

[model.openai]
base_url = "http://127.0.0.1:{model_port}/v1"
max_retries = 0
timeout_s = 10

[worker]
poll_interval_s = 0.1
model_max_attempts = {max_attempts}
model_backoff_initial_s = 0.5
model_backoff_max_s = 1.0
""")
    node = start_node(config, data, port)
    node.http_port = http_port  # type: ignore[attr-defined]
    return node


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for n in started:
        n.stop()


def _wait_job(node: NodeProcess, study_uid: str, ok: Callable[[Job], bool], what: str, timeout: float = 90) -> Job:
    job: Job = node.wait_job(study_uid, ok, what, timeout)
    return job


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _events(node: NodeProcess, study_uid: str) -> list[dict[str, Any]]:
    store = node.store()
    try:
        return store.events(study_uid)
    finally:
        store.close()


def test_model_server_down_then_up_study_waits_then_is_analysed(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    model_port = free_port()  # nothing listens there yet: connection refused
    node = _node(tmp_path, model_port, max_attempts=50)
    nodes.append(node)
    base = f"http://127.0.0.1:{node.http_port}"  # type: ignore[attr-defined]
    study = make_lumbar_mr(tmp_path / "mr", slices=5, size=96, seed=31)
    assert storescu(node.port, list(study.paths)).returncode == 0

    # the model server is down: the study waits, deferred, with the reason; never failed
    job = _wait_job(node, study.study_instance_uid,
                    lambda j: j.state is JobState.COMPLETE and j.attempts >= 2 and j.next_attempt_at is not None,
                    "deferred twice")
    assert (job.reason or "").startswith("waiting for the model (attempt ")
    assert "BackendUnavailableError" in (job.reason or "") and "unreachable" in (job.reason or "")
    deadline = time.monotonic() + 15  # the heartbeat is rewritten every 2 s
    while _metric(base, "spinemed_model_backend_up") != 0.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(base, "spinemed_model_backend_up") == 0.0
    ready = httpx.get(f"{base}/health/ready", timeout=20)
    assert ready.status_code == 503
    assert "model backend unavailable" in ready.json()["checks"]["worker"]["detail"]

    # the server comes back: the study is analysed and its reports written
    server = ModelServer(model_port)
    try:
        job = _wait_job(node, study.study_instance_uid, lambda j: j.state is JobState.DONE, "done after recovery")
        assert not (job.reason or "").startswith("waiting") and server.requests >= 1
        deferred = [e for e in _events(node, study.study_instance_uid)
                    if (e.get("detail") or "").startswith("waiting for the model")]
        assert len(deferred) >= 2
        store = node.store()
        try:
            kinds = {o.kind for o in store.outputs(study.study_instance_uid)}
        finally:
            store.close()
        assert "measurement_report" in kinds
        deadline = time.monotonic() + 15
        while _metric(base, "spinemed_model_backend_up") != 1.0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _metric(base, "spinemed_model_backend_up") == 1.0
    finally:
        server.close()


def test_model_server_down_for_good_fails_after_the_attempts_and_a_bad_request_fails_at_once(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    model_port = free_port()
    node = _node(tmp_path, model_port, max_attempts=3)
    nodes.append(node)
    a = make_lumbar_mr(tmp_path / "a", slices=5, size=96, seed=32)
    assert storescu(node.port, list(a.paths)).returncode == 0
    job = _wait_job(node, a.study_instance_uid, lambda j: j.state is JobState.FAILED, "failed after 3 attempts")
    assert job.attempts == 3
    assert (job.reason or "").startswith("model unavailable after 3 attempts: BackendUnavailableError")

    # a server that rejects the request itself (HTTP 400: this request's fault) fails the study at once
    server = ModelServer(model_port, status=400)
    try:
        b = make_lumbar_mr(tmp_path / "b", slices=5, size=96, seed=33)
        assert storescu(node.port, list(b.paths)).returncode == 0
        job = _wait_job(node, b.study_instance_uid, lambda j: j.state is JobState.FAILED, "failed at once")
        assert job.attempts == 1 and server.requests == 1
        assert "HTTP 400" in (job.reason or "") and not (job.reason or "").startswith("model unavailable")
    finally:
        server.close()
