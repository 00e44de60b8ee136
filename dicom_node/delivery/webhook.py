"""Webhook notifications: each study's end (done, failed, skipped) POSTed as signed JSON, at least once.

The job store's event log is the outbox: every final-state transition is an event row with an id.  A
notifier thread in the receiving process reads the events after its cursor (``<data_dir>/notify/
webhook.cursor``, written atomically after each accepted POST), sends them in order, and advances.  A
failed POST (connection refused, time-out, any non-2xx answer, the signing key missing) is retried with
exponential backoff and blocks the events behind it: notifications wait, in order, and are never dropped.
A receiver deduplicates by ``X-SpineMed-Event-Id``.  On the first start the cursor is set to the newest
event: a site enabling the webhook is not sent its history.

Body (``application/json``)::

    {"event": "study.done", "event_id": 42, "state": "done", "reason": null,
     "at": "2026-12-04T06:01:02.123Z", "study": "<pseudonym>", "job_id": 7, "revision": 1,
     "node": "SPINEMED", "demo": false}

``study`` is the keyed hash the logs use (the same study, the same pseudonym); ``study_instance_uid`` is
added only with ``[notify] include_identifiers = true``.  Reason texts never carry patient data.

Signature: ``X-SpineMed-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` with the key
in the environment variable ``[notify] secret_env`` (at least 16 bytes), as :func:`verify` checks it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from dicom_node.config import NodeConfig
from dicom_node.delivery.result import backoff_delay
from dicom_node.errors import JobNotFoundError
from dicom_node.jobs.model import EndEvent, Job, JobStore
from dicom_node.log import get_logger, phi_hash

__all__ = ["EVENT_HEADER", "SIGNATURE_HEADER", "WebhookNotifier", "WebhookStats", "sign", "verify"]

log = get_logger(__name__)

SIGNATURE_HEADER = "X-SpineMed-Signature"
EVENT_HEADER = "X-SpineMed-Event-Id"
_MIN_KEY_BYTES = 16


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value: ``t=<timestamp>,v1=<HMAC-SHA256(key, "<timestamp>." + body)>``."""
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(key: bytes, header: str, body: bytes, *, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """Whether ``header`` signs ``body`` with ``key`` and its time is within ``tolerance_s`` of ``now``
    (what a receiver should check; a replayed old POST fails)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(key, timestamp, body), f"t={timestamp},v1={parts.get('v1', '')}")


@dataclass
class WebhookStats:
    """Notifications sent and failed POSTs since start, and the last failure's reason."""

    sent: int = 0
    failures: int = 0
    last_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.sent, self.failures


class WebhookNotifier:
    """Sends the store's end events to ``[notify] webhook_url``; :meth:`run_once` for one pass,
    :meth:`start` / :meth:`stop` for the thread.

    Parameters
    ----------
    config
        ``[notify]``, ``[node] ae_title`` and ``data_dir`` are read.
    store
        The job store whose event log is the outbox.
    transport
        An httpx transport (tests inject one only to reach a server they run); default: the network.
    """

    def __init__(self, config: NodeConfig, store: JobStore, *, transport: httpx.BaseTransport | None = None) -> None:
        if not config.notify.webhook_url:
            raise ValueError("config: [notify] webhook_url is not set")
        self.config = config
        self.store = store
        self.stats = WebhookStats()
        self.cursor_path = Path(config.node.data_dir) / "notify" / "webhook.cursor"
        self._client = httpx.Client(transport=transport, timeout=config.notify.timeout_s, follow_redirects=False)
        self._events = {f"{e}" for e in config.notify.events}
        self._attempt = 0
        self._next_try = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ cursor
    def cursor(self) -> int:
        """The id of the last event handled; on the first start, the newest event (no history is sent)."""
        try:
            return int(self.cursor_path.read_text().strip())
        except FileNotFoundError:
            start = self.store.last_event_id()
            self._save(start)
            return start

    def _save(self, event_id: int) -> None:
        self.cursor_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cursor_path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write(f"{event_id}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.cursor_path)

    # ------------------------------------------------------------------ one pass
    def payload(self, event: EndEvent) -> dict[str, Any]:
        """The JSON body for ``event`` (the module docstring)."""
        try:
            job: Job | None = self.store.by_study(event.study_instance_uid)
        except JobNotFoundError:  # a job row removed by hand: the event still goes
            job = None
        body: dict[str, Any] = {
            "event": f"study.{event.state}",
            "event_id": event.event_id,
            "state": str(event.state),
            "reason": event.detail,
            "at": datetime.fromtimestamp(event.at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "study": phi_hash(event.study_instance_uid),
            "job_id": job.id if job is not None else None,
            "revision": job.revision if job is not None else None,
            "node": self.config.node.ae_title,
            "demo": self.config.model.backend == "demo",
        }
        if self.config.notify.include_identifiers:
            body["study_instance_uid"] = event.study_instance_uid
        return body

    def run_once(self, now: float | None = None) -> int:
        """Send the pending events in order until one fails; returns how many were accepted."""
        now = time.time() if now is None else now
        if now < self._next_try:
            return 0
        sent = 0
        after = self.cursor()
        while True:
            events = self.store.end_events(after, limit=100)
            if not events:
                return sent
            for event in events:
                if str(event.state) in self._events:
                    error = self._post(event)
                    if error is not None:
                        self._failed(error, now)
                        return sent
                    sent += 1
                after = event.event_id
                self._save(after)
            self._attempt = 0

    def _post(self, event: EndEvent) -> str | None:
        """POST one event; ``None`` when the receiver accepted it (2xx), else the reason."""
        notify = self.config.notify
        assert notify.webhook_url is not None and notify.secret_env is not None
        key = os.environ.get(notify.secret_env, "").encode()
        if len(key) < _MIN_KEY_BYTES:
            return f"signing key: env var {notify.secret_env} unset or shorter than {_MIN_KEY_BYTES} bytes"
        body = json.dumps(self.payload(event), separators=(",", ":"), sort_keys=True).encode()
        headers = {"Content-Type": "application/json", EVENT_HEADER: str(event.event_id),
                   SIGNATURE_HEADER: sign(key, int(time.time()), body), "User-Agent": "spinemed-node"}
        try:
            resp = self._client.post(notify.webhook_url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        if 200 <= resp.status_code < 300:
            with self.stats.lock:
                self.stats.sent += 1
            log.info("webhook notified", event_id=event.event_id, state=str(event.state))
            return None
        return f"HTTP {resp.status_code}"

    def _failed(self, error: str, now: float) -> None:
        self._attempt += 1
        delay = backoff_delay(self._attempt, self.config.notify.backoff_initial_s, self.config.notify.backoff_max_s)
        self._next_try = now + delay
        with self.stats.lock:
            self.stats.failures += 1
            self.stats.last_error = error
        log.warning("webhook not accepted; the notification waits", error=error, attempt=self._attempt,
                    retry_in_s=round(delay, 1))

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # a store or disk error must not end notifications for good: logged, retried
                log.exception("webhook pass failed")
            self._stop.wait(self.config.notify.poll_interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.notify.timeout_s + 5)
        self._client.close()
