"""The ``openai`` backend: any OpenAI-compatible chat-completions server (vLLM, ``transformers serve``).

Each study is one chat completion: images go as base64 PNG ``image_url`` parts, and the answer schema
goes as ``response_format`` (``json_schema``, ``strict``), which vLLM enforces with guided decoding.
Servers that ignore ``response_format`` (``transformers serve`` does) are handled too: the schema is also
summarised in the prompt, every answer is validated with :func:`~inference.schema.parse_answer`, and an
answer that does not validate is asked for once more before :class:`InvalidModelOutputError` is raised.

The HTTP client can be injected (an ``httpx.Client``), e.g. to add TLS settings or to swap the transport.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from inference.backends.qwen_vl import policy_for
from inference.errors import (
    BackendUnavailableError,
    InferenceError,
    InferenceTimeoutError,
    InvalidModelOutputError,
)
from inference.findings import ModelIdentity, SpineFindings
from inference.grade_probs import from_logprobs
from inference.inputs import ConsultAnswer, ImageSizePolicy, ModelImage, ModelInput, Turn
from inference.postprocess import to_findings
from inference.prompts import PROMPT_VERSION, build_consult_messages, build_messages
from inference.schema import SchemaLimits, answer_schema, parse_answer
from inference.settings import ModelSettings

__all__ = ["ANSWER_ATTEMPTS", "OpenAIBackend", "png_data_url"]

_log = logging.getLogger(__name__)

#: Attempts per study when the server's answer does not validate (one retry).
ANSWER_ATTEMPTS: Final = 2
_SCHEMA_NAME: Final = "spine_model_answer"
_TOP_LOGPROBS: Final = 5
_NO_DIGEST: Final = "unknown (remote server; set [model].path to hash)"


def png_data_url(image: ModelImage) -> str:
    """The image as a ``data:image/png;base64,...`` URL (lossless)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.pixels).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIBackend:
    """A model behind an OpenAI-compatible server (implements :class:`~inference.inputs.SpineModel`).

    Parameters
    ----------
    settings
        The ``[model]`` table; ``settings.openai`` gives URL, served model name, API-key variable,
        per-request timeout and transport retries.  ``settings.timeout_s`` bounds a whole study.
    http_client
        Optional HTTP client handed to the OpenAI client (an ``httpx.Client``-compatible object: TLS,
        proxies, or a swapped transport in tests).
    limits
        Answer size limits for the schema (default: the contract's).
    cache_dir
        Digest cache directory, used when ``settings.path`` points at the served weights.
    schema_in_prompt
        Also embed the full JSON Schema in the prompt (thousands of tokens); useful only for servers
        that ignore ``response_format``.  The prompt always carries a summary of the answer format.
    """

    #: Safe to call from several analysis threads at once (``[worker] analysis_threads``): each call is one
    #: HTTP request with no state shared between calls, and the server batches concurrent requests.
    concurrent = True

    backend_name: str = "openai"

    def __init__(
        self,
        settings: ModelSettings,
        *,
        http_client: Any = None,
        limits: SchemaLimits | None = None,
        cache_dir: Path | None = None,
        schema_in_prompt: bool = False,
    ) -> None:
        from openai import OpenAI

        self.schema_in_prompt = schema_in_prompt

        self.settings = settings
        self.limits = limits or SchemaLimits()
        oa = settings.openai
        api_key = os.environ.get(oa.api_key_env) or "not-needed"  # vLLM / transformers serve need none
        self._client = OpenAI(
            base_url=oa.base_url,
            api_key=api_key,
            timeout=oa.timeout_s,
            max_retries=oa.max_retries,
            http_client=http_client,
        )
        self._identity = ModelIdentity(
            name=oa.model[:64],
            version=(settings.revision or "served")[:64],
            weights_digest=self._digest(cache_dir),
            backend=self.backend_name,
            prompt_version=PROMPT_VERSION,
            demo=self._is_demo(),
        )

    def _digest(self, cache_dir: Path | None) -> str:
        if self.settings.path is None:
            return _NO_DIGEST
        from inference.backends.transformers_backend import weights_digest

        return weights_digest(Path(self.settings.path), cache_dir=cache_dir)

    def _is_demo(self) -> bool:
        from inference.demo_model import DEMO_MARKER_FILE

        return self.settings.path is not None and (Path(self.settings.path) / DEMO_MARKER_FILE).is_file()

    @property
    def image_size(self) -> ImageSizePolicy:
        """Qwen2.5-VL's sizes with its published pixel limits: the server's processor cannot be seen from
        here, so configure it with these limits (or larger) — else it resizes and coordinates move."""
        return policy_for(self.settings)

    @property
    def identity(self) -> ModelIdentity:
        """Who answers (the served model name; the weights digest only when ``settings.path`` is set)."""
        return self._identity

    def messages(self, inputs: ModelInput) -> list[dict[str, Any]]:
        """Chat messages of one request, images as PNG data URLs."""
        return self._with_images(build_messages(inputs, include_schema=self.schema_in_prompt), inputs)

    def _with_images(self, messages: list[dict[str, Any]], inputs: ModelInput) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for msg in messages:
            content = msg["content"]
            if isinstance(content, list):
                content = [
                    {"type": "image_url", "image_url": {"url": png_data_url(inputs.images[p["image_index"]])}}
                    if p["type"] == "image"
                    else p
                    for p in content
                ]
            out.append({"role": msg["role"], "content": content})
        return out

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
        """Answer a follow-up question about one analysed study: one streamed chat completion
        (``stream=True``; each content delta goes to ``on_text`` as it arrives).

        Token counts are the server's ``usage`` (asked for with ``stream_options.include_usage``); a
        server that sends none is counted by its content chunks (about one token each).

        Raises
        ------
        ValueError
            ``max_new_tokens`` is below 1, or ``question`` is empty.
        BackendUnavailableError
            The server cannot be reached or refuses.
        InferenceTimeoutError
            No complete answer within ``settings.openai.timeout_s`` / ``settings.timeout_s``.
        InferenceError
            Any other error of the server.
        """
        import openai

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be 1 or more, got {max_new_tokens}")
        s = self.settings
        messages = self._with_images(build_consult_messages(inputs, findings, history, question), inputs)
        timeout = min(s.timeout_s, s.openai.timeout_s)
        deadline = time.monotonic() + timeout
        create: Any = self._client.chat.completions.create
        parts: list[str] = []
        chunks = prompt_tokens = completion_tokens = 0
        finish: str | None = None
        try:
            stream = create(model=s.openai.model, messages=messages, max_tokens=max_new_tokens,
                            temperature=s.temperature, seed=s.seed, timeout=timeout, stream=True,
                            stream_options={"include_usage": True})
            with stream:
                for chunk in stream:
                    if time.monotonic() > deadline:
                        raise InferenceTimeoutError(f"model server: answer not complete within {timeout:.0f} s")
                    usage = getattr(chunk, "usage", None)
                    if usage is not None:
                        prompt_tokens = int(usage.prompt_tokens or 0)
                        completion_tokens = int(usage.completion_tokens or 0)
                    for choice in chunk.choices or ():
                        text = choice.delta.content if choice.delta is not None else None
                        if text:
                            chunks += 1
                            parts.append(text)
                            on_text(text)
                        if choice.finish_reason:
                            finish = str(choice.finish_reason)
        except openai.OpenAIError as exc:
            raise self._server_error(exc, timeout) from exc
        return ConsultAnswer(text="".join(parts), prompt_tokens=prompt_tokens,
                             completion_tokens=completion_tokens or chunks, truncated=finish == "length")

    def _server_error(self, exc: Exception, timeout: float) -> InferenceError:
        """What an OpenAI client error means for the study: a time-out, the server unavailable (retried
        with backoff), or this request refused (final)."""
        import openai

        base_url = self.settings.openai.base_url
        if isinstance(exc, openai.APITimeoutError):
            return InferenceTimeoutError(f"model server: no answer within {timeout:.0f} s ({base_url})")
        if isinstance(exc, openai.APIConnectionError):
            return BackendUnavailableError(f"model server {base_url} unreachable: {exc}")
        if isinstance(exc, openai.APIStatusError):
            detail = str(exc.message)[:300]
            # 5xx, 429 (overloaded) and a server that refuses us (token, model name: the site's setup, not
            # the study) wait for the server; any other 4xx is this request's own fault and final
            if exc.status_code in (401, 403, 404, 408, 429) or exc.status_code >= 500:
                return BackendUnavailableError(f"model server: HTTP {exc.status_code}: {detail}")
            return InferenceError(f"model server rejected the request: HTTP {exc.status_code}: {detail}")
        return InferenceError(f"model server: {type(exc).__name__}: {exc}")

    def _complete(
        self, messages: list[dict[str, Any]], schema: dict[str, Any], timeout: float
    ) -> tuple[str, list[dict[str, Any]]]:
        """One completion: the answer text and its per-token logprobs (empty where the server gives none)."""
        import openai

        s = self.settings
        create: Any = self._client.chat.completions.create
        try:
            response = create(
                model=s.openai.model,
                messages=messages,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": _SCHEMA_NAME, "schema": schema, "strict": True},
                },
                max_tokens=s.max_new_tokens,
                temperature=s.temperature,
                seed=s.seed,
                # the severity tokens' probabilities give per-grade probabilities (inference.grade_probs)
                logprobs=True,
                top_logprobs=_TOP_LOGPROBS,
                timeout=timeout,
            )
        except openai.OpenAIError as exc:
            raise self._server_error(exc, timeout) from exc
        if not response.choices:
            raise InvalidModelOutputError("model server returned no choices")
        choice = response.choices[0]
        text = choice.message.content or ""
        if choice.finish_reason == "length":
            raise InvalidModelOutputError(f"model output cut at max_tokens={s.max_new_tokens} ({len(text)} characters)")
        logprobs = getattr(choice, "logprobs", None)
        content = getattr(logprobs, "content", None) or []
        return text, [c.model_dump() if hasattr(c, "model_dump") else dict(c) for c in content]

    def analyze(self, inputs: ModelInput) -> SpineFindings:
        """Ask the server about one study; validate, retry once on an invalid answer.

        Raises
        ------
        BackendUnavailableError
            The server cannot be reached or refuses (authentication, unknown model, server error).
        InferenceTimeoutError
            No answer within ``settings.openai.timeout_s`` per request / ``settings.timeout_s`` per study.
        InvalidModelOutputError
            The answers of :data:`ANSWER_ATTEMPTS` attempts did not validate.
        """
        deadline = time.monotonic() + self.settings.timeout_s
        schema = answer_schema(image_sizes=[(i.ref.columns, i.ref.rows) for i in inputs.images], limits=self.limits)
        messages = self.messages(inputs)
        last: InvalidModelOutputError | None = None
        for attempt in range(1, ANSWER_ATTEMPTS + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InferenceTimeoutError(f"model server: no valid answer within {self.settings.timeout_s:g} s")
            timeout = min(remaining, self.settings.openai.timeout_s)
            try:
                text, logprobs = self._complete(messages, schema, timeout)
                findings = to_findings(parse_answer(text), inputs, self._identity)
                probabilities = from_logprobs(text, logprobs)
                if probabilities:
                    findings = findings.model_copy(update={"grade_probabilities": probabilities})
                return findings
            except InvalidModelOutputError as exc:
                _log.warning("model server answer %d/%d invalid: %s", attempt, ANSWER_ATTEMPTS, exc)
                last = exc
        raise InvalidModelOutputError(f"model server: no valid answer in {ANSWER_ATTEMPTS} attempts; last: {last}")
