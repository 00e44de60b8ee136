"""Study-end notifications: a real HTTP receiver on loopback gets a signed POST per ended study, at least once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import free_port, storescu, wait_until

from dicom_node.config import ConfigError, load_config
from dicom_node.delivery.webhook import EVENT_HEADER, SIGNATURE_HEADER, WebhookNotifier, sign, verify
from dicom_node.devtools.phantoms import make_lumbar_mr
from dicom_node.jobs.model import JobState
from dicom_node.log import phi_hash
from dicom_node.node import ReceivingNode
from dicom_node.ops.metrics import render_metrics
from dicom_node.work.pipeline import Pipeline
from dicom_node.work.worker import Worker

KEY = "k" * 32


class Hook:
    """An HTTP endpoint recording each POST (headers, body) and answering ``statuses`` in turn, then 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes, int]] = []
        self.statuses: list[int] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = hook.statuses.pop(0) if hook.statuses else 200
                hook.posts.append(({k: v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass  # quiet test output

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/spinemed"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self) -> list[tuple[dict[str, str], bytes, int]]:
        return [p for p in self.posts if p[2] == 200]


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.server.shutdown()
    h.server.server_close()


def test_signature_verifies_only_the_signed_body_key_and_time() -> None:
    body = b'{"event":"study.done"}'
    header = sign(KEY.encode(), 1_800_000_000, body)
    assert verify(KEY.encode(), header, body, now=1_800_000_010)
    assert not verify(KEY.encode(), header, body + b" ", now=1_800_000_010), "a changed body"
    assert not verify(b"x" * 32, header, body, now=1_800_000_010), "another key"
    assert not verify(KEY.encode(), header, body, now=1_800_001_000), "replayed 1000 s later"
    assert not verify(KEY.encode(), "garbage", body)


def test_webhook_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="secret_env"):
        load_config(node={"data_dir": tmp_path}, notify={"webhook_url": "https://ris.example/hook"})
    with pytest.raises(ConfigError, match="http"):
        load_config(node={"data_dir": tmp_path}, notify={"webhook_url": "ftp://x", "secret_env": "K"})
    with pytest.raises(ConfigError, match="events"):
        load_config(node={"data_dir": tmp_path},
                    notify={"webhook_url": "https://x/", "secret_env": "K", "events": ["started"]})


@pytest.mark.slow
def test_an_ended_study_is_notified_signed_without_identifiers_and_waits_out_failures(
        tmp_path: Path, hook: Hook, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPINEMED_TEST_HOOK_KEY", raising=False)
    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp_path / "data", "min_free_disk_mb": 0},
        http={"enabled": False},
        completeness={"quiet_seconds": 0.3, "force_seconds": 60, "check_interval_s": 0.1},
        model={"backend": "demo", "path": str(demo_model_dir)},
        worker={"poll_interval_s": 0.05},
        notify={"webhook_url": hook.url, "secret_env": "SPINEMED_TEST_HOOK_KEY", "poll_interval_s": 0.1,
                "backoff_initial_s": 0.2, "backoff_max_s": 0.4, "timeout_s": 5},
    )
    node = ReceivingNode(cfg)
    node.start()
    worker = Worker(cfg, node.store, pipeline=Pipeline(cfg))
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    try:
        assert node.ops.webhook is not None
        st = make_lumbar_mr(tmp_path / "mr", slices=5, size=96, seed=41)
        assert storescu(node.receiver.port, list(st.paths)).returncode == 0
        wait_until(lambda: node.store.by_study(st.study_instance_uid).state is JobState.DONE, 120, "done")

        # no signing key: nothing leaves, the notification waits with the reason
        stats = node.ops.webhook.stats
        wait_until(lambda: stats.failures >= 1, 10, "a failure for the missing key")
        assert hook.posts == [] and "SPINEMED_TEST_HOOK_KEY" in (stats.last_error or "")
        # the key set, the receiver failing once: retried, then accepted, every end event in order (a study
        # re-analysed after late instances ends twice: both are told)
        hook.statuses = [503]
        monkeypatch.setenv("SPINEMED_TEST_HOOK_KEY", KEY)
        ends = wait_until(lambda: (e := node.store.end_events(0)) and len(hook.accepted()) == len(e) and e, 20,
                     "every end event accepted")
        assert [p[2] for p in hook.posts] == [503] + [200] * len(ends)
        assert hook.posts[0][0][EVENT_HEADER] == hook.posts[1][0][EVENT_HEADER], "the same event, sent again"
        assert [int(p[0][EVENT_HEADER]) for p in hook.accepted()] == [e.event_id for e in ends]
        source = pydicom.dcmread(st.paths[0], stop_before_pixels=True)
        for headers, body, _ in hook.accepted():
            assert verify(KEY.encode(), headers[SIGNATURE_HEADER], body)
            for identifier in (st.study_instance_uid, source.PatientID, str(source.PatientName.family_name),
                               source.AccessionNumber):
                assert identifier not in body.decode(), "no identifier unless the site turns them on"
        payload = json.loads(hook.accepted()[-1][1])
        job = node.store.by_study(st.study_instance_uid)
        assert payload["event"] == "study.done" and payload["state"] == "done" and payload["demo"] is True
        assert payload["job_id"] == job.id and payload["revision"] == job.revision
        assert payload["study"] == phi_hash(st.study_instance_uid)
        assert "study_instance_uid" not in payload

        # the cursor is durable: a restarted notifier sends nothing again; a new one starts at the present
        cursor_file = tmp_path / "data" / "notify" / "webhook.cursor"
        # written right after the receiver's 2xx, which the receiver records first
        wait_until(lambda: int(cursor_file.read_text()) == ends[-1].event_id, 10, "the cursor advanced")
        again = WebhookNotifier(cfg, node.store)
        assert again.run_once() == 0 and len(hook.accepted()) == len(ends)
        fresh_cfg = cfg.model_copy(update={"node": cfg.node.model_copy(update={"data_dir": tmp_path / "other"})})
        assert WebhookNotifier(fresh_cfg, node.store).run_once() == 0, "no history on a first start"

        text = render_metrics(node.ops.collector).decode()
        assert f"spinemed_webhook_sent_total {len(ends):.1f}" in text
        failures = float(text.split("\nspinemed_webhook_failures_total ")[1].split()[0])
        assert failures == stats.failures >= 2
    finally:
        worker.stop()
        thread.join(timeout=30)
        node.stop()


def test_include_identifiers_adds_the_study_uid(tmp_path: Path, hook: Hook, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.jobs.model import EndEvent
    from dicom_node.jobs.sqlite import SQLiteJobStore

    monkeypatch.setenv("SPINEMED_TEST_HOOK_KEY", KEY)
    cfg = load_config(node={"data_dir": tmp_path / "data"},
                      notify={"webhook_url": hook.url, "secret_env": "SPINEMED_TEST_HOOK_KEY",
                              "include_identifiers": True})
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    notifier = WebhookNotifier(cfg, store)
    payload = notifier.payload(EndEvent(9, "1.2.3.4", 1_800_000_000.0, JobState.FAILED, "model unavailable"))
    assert payload["study_instance_uid"] == "1.2.3.4" and payload["job_id"] is None
    assert payload["event"] == "study.failed" and payload["reason"] == "model unavailable"
    assert payload["at"] == "2027-01-15T08:00:00.000Z"
    store.close()
