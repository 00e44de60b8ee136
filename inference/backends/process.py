"""The ``transformers``/``demo`` model in a process of its own (``[model] process = true``).

The in-process backend decodes in a Python loop of many small torch operations plus the grammar's logits
processor; it shares the interpreter lock (GIL) with every other thread of the worker, and a thread doing
Python-heavy work (reading DICOM headers, preprocessing the next study) slows its decoding many times over.
:class:`ModelProcess` loads the model in a child process (``multiprocessing``, *spawn*) and forwards each
:meth:`~ModelProcess.analyze` and :meth:`~ModelProcess.consult` call over a pipe:

* parent → child: ``("analyze", id, inputs)``, ``("consult", id, inputs, findings, history, question,
  max_new_tokens)``, ``("stop",)``;
* child → parent: ``("ready", identity, image_size)`` or ``("failed", message)`` once, at start; then
  ``("text", id, piece)`` while a consultation streams, and ``("result", id, value)`` or
  ``("error", id, exception)`` per request.

The child serves every request in a thread of its own, so calls made together reach the backend together
and its batcher (``[model] max_batch``) decodes them as one batch.  The child ends when the parent closes
the pipe (or dies: the pipe reaches end of file).  When the child dies, every waiting call raises
:class:`~inference.errors.BackendUnavailableError` (transient: the study is tried again later) and the next
call starts a new child.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from inference.errors import BackendUnavailableError, InferenceError, InferenceTimeoutError
from inference.findings import ModelIdentity, SpineFindings
from inference.inputs import ConsultAnswer, ImageSizePolicy, ModelInput, Turn
from inference.settings import ModelSettings

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

__all__ = ["ModelProcess"]

_log = logging.getLogger(__name__)

#: Seconds a call waits beyond the child's own deadlines (which end every request in time) before it gives up.
_MARGIN_S: Final = 30.0


class _Closed:
    """The end of a request's message queue: the child is gone."""

    def __init__(self, error: BackendUnavailableError) -> None:
        self.error = error


class ModelProcess:
    """A :class:`~inference.inputs.SpineModel` whose backend runs in a child process.

    Parameters
    ----------
    settings
        The ``[model]`` table; the child loads it with ``process`` off (any backend but ``openai``).
    data_dir
        The node's data directory, passed to :func:`inference.backends.loading.load_in_process` in the child.

    Raises
    ------
    BackendUnavailableError
        The child could not load the model (its message), or did not start within ``settings.timeout_s``.
    """

    #: Calls may come from several threads at once: the child's backend batches or queues them.
    concurrent = True

    def __init__(self, settings: ModelSettings, *, data_dir: Path) -> None:
        self.settings = settings.model_copy(update={"process": False})
        self.data_dir = Path(data_dir)
        self._ctx = multiprocessing.get_context("spawn")
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()  # guards _slots, _alive, _closed
        self._start_lock = threading.Lock()  # one (re)start at a time
        # one thread at a time reaps a child: two joining at once race in waitpid, and the loser may see a
        # reaped child as alive
        self._reap_lock = threading.Lock()
        self._slots: dict[int, queue.SimpleQueue[Any]] = {}
        self._alive = False
        self._closed = False
        self._conn: Connection | None = None
        self._process: BaseProcess | None = None
        self._identity: ModelIdentity | None = None
        self._image_size: ImageSizePolicy | None = None
        self._start()

    # -- the child ------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The child's process id (``None`` before it started)."""
        return self._process.pid if self._process is not None else None

    def _start(self) -> None:
        """Start a child and wait for its ``ready`` (or ``failed``)."""
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_serve, args=(child_conn, self.settings, self.data_dir, logging.getLogger().getEffectiveLevel()),
            name="spinemed-model", daemon=True,
        )
        process.start()
        child_conn.close()  # the child holds the only other end: its exit is end of file here
        limit = self.settings.timeout_s + _MARGIN_S
        try:
            if not parent_conn.poll(limit):
                raise BackendUnavailableError(f"model process: not ready within {limit:g} s")
            message = parent_conn.recv()
        except (EOFError, OSError) as exc:
            process.join(timeout=5)
            parent_conn.close()
            raise BackendUnavailableError(
                f"model process exited while loading the model (exit code {process.exitcode})") from exc
        except BackendUnavailableError:
            _stop_process(process, parent_conn)
            raise
        if message[0] == "failed":
            process.join(timeout=10)
            parent_conn.close()
            raise BackendUnavailableError(str(message[1]))
        if message[0] != "ready":  # pragma: no cover - a protocol bug
            _stop_process(process, parent_conn)
            raise BackendUnavailableError(f"model process: unexpected first message {message[0]!r}")
        self._identity, self._image_size = message[1], message[2]
        with self._state_lock:
            self._conn, self._process, self._alive = parent_conn, process, True
        threading.Thread(target=self._read, args=(parent_conn, process), name="model-process-reader",
                         daemon=True).start()
        _log.info("model process %d ready", process.pid)

    def _read(self, conn: Connection, process: BaseProcess) -> None:
        """The reader thread: hand each message to the queue of its request until the pipe ends."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            with self._state_lock:
                slot = self._slots.get(message[1])
            if slot is not None:  # else its caller gave up: the late answer is dropped
                slot.put(message)
        with self._reap_lock:
            process.join(timeout=5)
            exitcode = process.exitcode
        with self._state_lock:
            closed = self._closed
            if self._process is process:
                self._alive = False
            slots = list(self._slots.values())
        reason = "closed" if closed else f"exited (exit code {exitcode})"
        if not closed:
            _log.warning("model process %d %s", process.pid, reason)
        for slot in slots:
            slot.put(_Closed(BackendUnavailableError(f"model process {reason}; the request was not answered")))

    def _ensure_started(self) -> Connection:
        with self._start_lock:
            with self._state_lock:
                if self._closed:
                    raise BackendUnavailableError("model process closed")
                if self._alive and self._conn is not None:
                    return self._conn
            old = self._conn
            if old is not None:
                old.close()
            _log.warning("model process not running: starting a new one")
            self._start()
            assert self._conn is not None
            return self._conn

    def _call(self, message: tuple[Any, ...], on_text: Callable[[str], None] | None, wait_s: float) -> Any:
        """Send one request and wait for its outcome (passing streamed text to ``on_text`` on the way)."""
        conn = self._ensure_started()
        request_id = next(self._ids)
        slot: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self._state_lock:
            self._slots[request_id] = slot
            alive = self._alive and self._conn is conn
        try:
            if not alive:
                raise BackendUnavailableError("model process exited; the request was not sent")
            try:
                with self._send_lock:
                    conn.send((message[0], request_id, *message[1:]))
            except (OSError, ValueError) as exc:
                raise BackendUnavailableError(f"model process: request not sent: {exc}") from exc
            deadline = time.monotonic() + wait_s
            while True:
                remaining = deadline - time.monotonic()
                try:
                    got = slot.get(timeout=max(remaining, 0.0))
                except queue.Empty:
                    raise InferenceTimeoutError(f"model process: no answer within {wait_s:g} s") from None
                if isinstance(got, _Closed):
                    raise got.error
                kind = got[0]
                if kind == "text":
                    if on_text is not None:
                        on_text(got[2])
                elif kind == "result":
                    return got[2]
                elif kind == "error":
                    raise _rebuild(got[2])
                else:  # pragma: no cover - a protocol bug
                    raise BackendUnavailableError(f"model process: unexpected message {kind!r}")
        finally:
            with self._state_lock:
                self._slots.pop(request_id, None)

    # -- SpineModel -----------------------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity:
        """The identity the child's backend reported when it loaded."""
        assert self._identity is not None
        return self._identity

    @property
    def image_size(self) -> ImageSizePolicy:
        """The image sizes the child's backend takes unchanged."""
        assert self._image_size is not None
        return self._image_size

    def analyze(self, inputs: ModelInput) -> SpineFindings:
        """Run the model on one study in the child and return its findings.

        Raises
        ------
        inference.errors.InferenceError
            What the backend raised (same type and message); :class:`BackendUnavailableError` when the child
            died or was closed; :class:`InferenceTimeoutError` when no answer came within twice
            ``settings.timeout_s`` (the child's own deadline, behind at most one request ahead) plus 30 s.
        """
        result = self._call(("analyze", inputs), None, 2 * self.settings.timeout_s + _MARGIN_S)
        if not isinstance(result, SpineFindings):  # pragma: no cover - a protocol bug
            raise InferenceError(f"model process: analyze returned {type(result).__name__}")
        return result

    def consult(
        self,
        inputs: ModelInput,
        findings: SpineFindings,
        history: Sequence[Turn],
        question: str,
        on_text: Callable[[str], None],
        *,
        max_new_tokens: int,
    ) -> ConsultAnswer:
        """Answer a follow-up question in the child; its text pieces reach ``on_text`` in this thread, in order.

        Raises
        ------
        ValueError
            As the backend raises it (``max_new_tokens`` below 1, an empty question).
        inference.errors.InferenceError
            As for :meth:`analyze`.
        """
        result = self._call(("consult", inputs, findings, tuple(history), question, max_new_tokens), on_text,
                            2 * self.settings.timeout_s + _MARGIN_S)
        if not isinstance(result, ConsultAnswer):  # pragma: no cover - a protocol bug
            raise InferenceError(f"model process: consult returned {type(result).__name__}")
        return result

    def close(self) -> None:
        """Stop the child (waiting calls raise :class:`BackendUnavailableError`); later calls raise it too."""
        with self._start_lock:
            with self._state_lock:
                if self._closed:
                    return
                self._closed = True
                conn, process = self._conn, self._process
            if conn is not None and process is not None:
                with self._send_lock, contextlib.suppress(OSError, ValueError):  # already gone: nothing to stop
                    conn.send(("stop",))
                with self._reap_lock:
                    _stop_process(process, conn)


def _stop_process(process: BaseProcess, conn: Connection) -> None:
    """Let the child exit, then terminate (and kill) it if it does not."""
    process.join(timeout=10)
    if process.is_alive():
        process.terminate()
        process.join(timeout=5)
    if process.is_alive():  # pragma: no cover - ignores SIGTERM
        process.kill()
        process.join(timeout=5)
    conn.close()


# ------------------------------------------------------------------------------------------ exceptions
def _portable(exc: BaseException) -> Any:
    """``exc`` itself when it survives pickling with its type and message, else (module, name, message)."""
    try:
        back = pickle.loads(pickle.dumps(exc))
        if type(back) is type(exc) and str(back) == str(exc):
            return exc
    except Exception:  # any pickling failure: send it by name
        pass
    return (type(exc).__module__, type(exc).__qualname__, str(exc))


def _rebuild(sent: Any) -> BaseException:
    """The exception the child raised, from what :func:`_portable` sent."""
    if isinstance(sent, BaseException):
        return sent
    module, name, message = sent
    with contextlib.suppress(ImportError):
        cls = getattr(importlib.import_module(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            with contextlib.suppress(Exception):
                return cls(message)
    return InferenceError(f"model: {name}: {message}")


# ------------------------------------------------------------------------------------------ the child
def _serve(conn: Connection, settings: ModelSettings, data_dir: Path, log_level: int) -> None:
    """The child's main function: load the model, then serve requests until ``stop`` or end of file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s [model process] %(levelname)s %(name)s: %(message)s")
    from inference.backends.loading import load_in_process

    try:
        model = load_in_process(settings, data_dir=data_dir)
        conn.send(("ready", model.identity, model.image_size))
    except Exception as exc:  # whatever stops the load is the parent's error message
        message = str(exc) if isinstance(exc, InferenceError) else f"model: loading failed: {type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            conn.send(("failed", message))
        conn.close()
        return
    send_lock = threading.Lock()
    model_lock = contextlib.nullcontext() if getattr(model, "concurrent", False) else threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    def handle(request: tuple[Any, ...]) -> None:
        kind, request_id = request[0], request[1]
        try:
            with model_lock:
                if kind == "analyze":
                    result: Any = model.analyze(request[2])
                elif kind == "consult":
                    result = model.consult(request[2], request[3], request[4], request[5],
                                           lambda piece: send(("text", request_id, piece)), max_new_tokens=request[6])
                else:
                    raise BackendUnavailableError(f"model process: unknown request {kind!r}")
        except Exception as exc:  # every failure goes back to its caller
            reply: tuple[Any, ...] = ("error", request_id, _portable(exc))
        else:
            reply = ("result", request_id, result)
        try:
            send(reply)
        except (OSError, ValueError):  # the parent is gone: the reader loop ends the process
            pass
        except Exception as exc:  # a result that does not pickle fails its request
            send(("error", request_id, _portable(InferenceError(f"model process: answer not sent: {exc}"))))

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the parent closed the pipe or died
            break
        if request[0] == "stop":
            break
        threading.Thread(target=handle, args=(request,), name=f"request-{request[1]}", daemon=True).start()
    sys.stderr.flush()
    os._exit(0)  # without waiting for requests in flight: nobody is left to take their answers
