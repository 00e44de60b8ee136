"""The ``transformers`` backend: a Qwen2.5-VL-class checkpoint in-process, schema-constrained decoding.

The model and processor are loaded once, from a local directory (``[model].path``) or from the offline
Hugging Face cache (``[model].hub_id``; nothing is ever downloaded).  Each study is one request: all its
images go through the model's own processor and chat template together, and decoding is constrained by
:func:`inference.schema.answer_schema` with llguidance, so the answer always parses.  A wall-clock deadline
stops generation at ``[model].timeout_s``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from inference.backends.qwen_vl import PATCH_SIZE, check_unchanged, processor_policy
from inference.errors import (
    BackendUnavailableError,
    InferenceError,
    InferenceTimeoutError,
    InvalidModelOutputError,
)
from inference.findings import GradeProbabilities, ModelIdentity, SpineFindings
from inference.grade_probs import SeverityProbe
from inference.inputs import ConsultAnswer, ImageSizePolicy, ModelImage, ModelInput, Turn
from inference.postprocess import to_findings
from inference.prompts import PROMPT_VERSION, build_consult_messages, build_messages
from inference.schema import SchemaLimits, answer_schema, parse_answer
from inference.settings import ModelSettings

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "WEIGHT_SUFFIXES",
    "DeadlineCriteria",
    "LLGuidanceLogitsProcessor",
    "TextCallbackStreamer",
    "TransformersBackend",
    "resolve_device_dtype",
    "resolve_model_dir",
    "to_pil",
    "weights_digest",
]

_log = logging.getLogger(__name__)

#: File suffixes hashed into :attr:`ModelIdentity.weights_digest`.
WEIGHT_SUFFIXES: Final = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_DIGEST_CACHE_NAME: Final = "weights-digests.json"
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})$")


# ------------------------------------------------------------------------------------------ loading
def resolve_model_dir(settings: ModelSettings) -> Path:
    """Find the model directory: ``settings.path``, else the offline hub cache snapshot of ``hub_id``.

    Raises
    ------
    BackendUnavailableError
        No path or hub id given, the directory does not exist, or the hub id is not in the local cache.
    """
    if settings.path is not None:
        path = Path(settings.path).expanduser()
        if not (path / "config.json").is_file():
            raise BackendUnavailableError(f"model: no config.json in {path} (set [model].path to a model directory)")
        return path
    if settings.hub_id:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(settings.hub_id, revision=settings.revision, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            raise BackendUnavailableError(
                f"model: {settings.hub_id!r} (revision {settings.revision or 'main'}) is not in the local "
                f"Hugging Face cache and the node never downloads: {exc}"
            ) from exc
    raise BackendUnavailableError("model: set [model].path or [model].hub_id for the transformers backend")


def resolve_device_dtype(settings: ModelSettings) -> tuple[torch.device, torch.dtype]:
    """``auto`` device → CUDA when available, else CPU; ``auto`` dtype → bfloat16 on CUDA, float32 on CPU.

    Raises
    ------
    BackendUnavailableError
        A CUDA device was asked for but none is available.
    """
    import torch

    name = settings.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise BackendUnavailableError(f"model: invalid [model].device {settings.device!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"model: [model].device is {settings.device!r} but CUDA is not available")
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if settings.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = dtypes[settings.dtype]
    return device, dtype


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(model_dir: Path, *, cache_dir: Path | None = None) -> str:
    """SHA-256 over the model's weight files (name and content, in name order).

    Hashing 15 GB takes about a minute, so each file's digest is cached in ``cache_dir`` keyed by its
    resolved path, size and modification time; a changed file is hashed again.

    Parameters
    ----------
    model_dir
        The model directory.
    cache_dir
        Where the digest cache lives (``None``: no cache).

    Returns
    -------
    str
        64 hex digits.

    Raises
    ------
    BackendUnavailableError
        The directory holds no weight file.
    """
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise BackendUnavailableError(f"model: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {model_dir}")
    cache_file = cache_dir / _DIGEST_CACHE_NAME if cache_dir is not None else None
    cache: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            _log.warning("weights digest cache %s unreadable, rehashing: %s", cache_file, exc)
            cache = {}
    total = hashlib.sha256()
    changed = False
    for path in files:
        real = path.resolve()  # hub snapshots are symlinks to blobs
        st = real.stat()
        key = str(real)
        entry = cache.get(key)
        if isinstance(entry, Mapping) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            digest = str(entry["sha256"])
        else:
            digest = _file_sha256(real)
            cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            changed = True
        total.update(path.name.encode() + b"\0" + digest.encode() + b"\n")
    if changed and cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, cache_file)
        except OSError as exc:  # a read-only data dir costs a rehash next start, nothing more
            _log.warning("weights digest cache %s not written: %s", cache_file, exc)
    return total.hexdigest()


def to_pil(image: ModelImage) -> Image.Image:
    """The image as an RGB PIL image (grey levels replicated), the processor's input."""
    from PIL import Image

    pixels = image.pixels
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


# ------------------------------------------------------------------------------------------ decoding
def _make_logits_processor_base() -> type[Any]:
    from transformers import LogitsProcessor

    return LogitsProcessor


def _make_stopping_base() -> type[Any]:
    from transformers import StoppingCriteria

    return StoppingCriteria


class LLGuidanceLogitsProcessor(_make_logits_processor_base()):  # type: ignore[misc]
    """Mask each row's logits to the tokens its own llguidance grammar allows next.

    One matcher per row: the rows of a batch are different studies, each with its own schema (evidence
    is bounded by that study's images).  The bitmasks of all live rows are filled by llguidance in
    parallel (``fill_next_token_bitmask_par``), unpacked with numpy and applied with one ``masked_fill``;
    llguidance's own ``apply_token_bitmask_inplace`` would ``torch.compile`` a kernel first (≈19 s on CPU).

    A row that has written an end token is finished (``generate`` pads it from then on).  A row whose
    grammar fails is *failed*: its reason is kept in :attr:`errors` and only ``stop_token`` is allowed
    for it, so it ends at once while the other rows go on.

    Parameters
    ----------
    ll_tokenizer
        ``llguidance.LLTokenizer`` of the model's tokenizer.
    grammars
        One llguidance grammar per row (e.g. from ``LLMatcher.grammar_from_json_schema``).
    prompt_length
        Number of prompt tokens (padded: the same for every row): tokens after them are the answers.
    end_tokens
        Token ids after which a row is over: the end-of-sequence ids and the padding id.
    stop_token
        An end-of-sequence id that ``generate`` stops a row on: the one a failed row is given.
    probes
        Optional :class:`~inference.grade_probs.SeverityProbe` per row: sees each step's unconstrained
        scores and the allowed-token mask, to read the per-grade probabilities.
    executor
        The ``llguidance.LLExecutor`` that fills the rows' masks (default: one with one thread).

    Raises
    ------
    ValueError
        ``grammars`` is empty, ``stop_token`` is not among ``end_tokens``, or ``probes`` has another length.
    InferenceError
        llguidance rejected a grammar.
    """

    def __init__(self, ll_tokenizer: Any, grammars: Sequence[str], *, prompt_length: int,
                 end_tokens: Collection[int], stop_token: int,
                 probes: Sequence[SeverityProbe | None] | None = None, executor: Any = None) -> None:
        import llguidance

        if not grammars:
            raise ValueError("grammars: at least one row is needed")
        if stop_token not in end_tokens:
            raise ValueError(f"stop_token: {stop_token} is not among end_tokens")
        if probes is not None and len(probes) != len(grammars):
            raise ValueError(f"probes: {len(probes)} given for {len(grammars)} rows")
        self._matchers = [llguidance.LLMatcher(ll_tokenizer, g, log_level=0) for g in grammars]
        for i, m in enumerate(self._matchers):
            if m.is_error():
                raise InferenceError(f"constrained decoding: grammar of row {i} rejected: {m.get_error()}")
        self._executor = executor if executor is not None else llguidance.LLExecutor(1)
        self._vocab = int(ll_tokenizer.vocab_size)
        self._prompt_length = prompt_length
        self._end = frozenset(int(t) for t in end_tokens)
        self._stop_token = int(stop_token)
        self._consumed = [0] * len(grammars)
        self._finished = [False] * len(grammars)
        #: per row: why its decoding failed (``None``: it did not)
        self.errors: list[str | None] = [None] * len(grammars)
        self._probes = list(probes) if probes is not None else [None] * len(grammars)

    def accepting(self, row: int = 0) -> bool:
        """Whether the tokens of ``row`` so far form a complete answer."""
        return self.errors[row] is None and bool(self._matchers[row].is_accepting())

    def _advance(self, row: int, tokens: list[int]) -> list[int]:
        """Feed a row's new tokens to its matcher; returns the answer tokens among them."""
        self._consumed[row] += len(tokens)
        answer: list[int] = []
        for token in tokens:
            if token in self._end:  # the row ended: what generate appends from now on is padding
                self._finished[row] = True
                break
            if not self._matchers[row].consume_token(token):
                self.errors[row] = f"constrained decoding failed: {self._matchers[row].get_error()}"
                break
            answer.append(token)
        return answer

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import llguidance.numpy
        import torch

        rows = input_ids.shape[0]
        if rows != len(self._matchers):
            raise InferenceError(f"constrained decoding: {rows} rows for {len(self._matchers)} grammars")
        live: list[tuple[int, list[int]]] = []
        for row in range(rows):
            if self._finished[row] or self.errors[row] is not None:
                continue
            new = input_ids[row, self._prompt_length + self._consumed[row]:].tolist()
            answer = self._advance(row, [int(t) for t in new])
            if not self._finished[row] and self.errors[row] is None:
                live.append((row, answer))
        vocab = scores.shape[-1]
        allowed = np.zeros((rows, vocab), dtype=bool)
        if live:
            bitmask = llguidance.numpy.allocate_token_bitmask(len(live), self._vocab)
            llguidance.numpy.fill_next_token_bitmask_par(
                self._executor, [(self._matchers[row], i) for i, (row, _) in enumerate(live)], bitmask)
            bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").astype(bool)
            n = min(vocab, bits.shape[1])
            for i, (row, answer) in enumerate(live):
                if self._matchers[row].is_error():
                    self.errors[row] = f"constrained decoding failed: {self._matchers[row].get_error()}"
                    continue
                if not bits[i, :n].any():
                    self.errors[row] = "constrained decoding: the grammar allows no next token"
                    continue
                allowed[row, :n] = bits[i, :n]
                probe = self._probes[row]
                if probe is not None:
                    probe.step(answer, self._consumed[row], scores[row], bits[i, :n])
        for row in range(rows):
            if self._finished[row] or self.errors[row] is not None:
                # finished: generate overwrites its token with padding anyway; failed: end it now
                allowed[row, :] = False
                allowed[row, self._stop_token if self._stop_token < vocab else 0] = True
        mask = torch.from_numpy(allowed).to(scores.device)
        return scores.masked_fill(~mask, float("-inf"))  # type: ignore[return-value]


class DeadlineCriteria(_make_stopping_base()):  # type: ignore[misc]
    """Stop each row of a generation once its wall-clock deadline (``time.monotonic()``) has passed.

    Parameters
    ----------
    deadlines
        One deadline per row (a single float: every row).
    """

    def __init__(self, deadlines: float | Sequence[float]) -> None:
        self.deadlines = [float(deadlines)] if isinstance(deadlines, (int, float)) else [float(d) for d in deadlines]
        #: per row: whether its deadline passed while it was being generated
        self.expired_rows = [False] * len(self.deadlines)

    @property
    def expired(self) -> bool:
        """Whether any row's deadline has passed."""
        return any(self.expired_rows)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        import torch

        now = time.monotonic()
        rows = input_ids.shape[0]
        if len(self.deadlines) == 1 and rows > 1:
            self.deadlines *= rows
            self.expired_rows *= rows
        for row in range(rows):
            self.expired_rows[row] = self.expired_rows[row] or now > self.deadlines[row]
        return torch.tensor(self.expired_rows, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def _make_streamer_base() -> type[Any]:
    from transformers.generation.streamers import BaseStreamer

    return BaseStreamer


class TextCallbackStreamer(_make_streamer_base()):  # type: ignore[misc]
    """Pass each new piece of generated text to a callback, in the generating thread (batch size 1).

    The answer's tokens are decoded together each time (a character can span tokens) and only the new
    text is passed on; the first :meth:`put` (the prompt) is skipped.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    on_text
        Called with each new piece of text.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self._tokenizer = tokenizer
        self._on_text = on_text
        self._prompt_seen = False
        self.tokens: list[int] = []
        self.text = ""

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = str(self._tokenizer.decode(self.tokens, skip_special_tokens=True))
        if text.endswith("\ufffd"):  # a character not complete yet: wait for its next token
            return
        if text.startswith(self.text) and len(text) > len(self.text):
            new, self.text = text[len(self.text):], text
            self._on_text(new)

    def end(self) -> None:
        text = str(self._tokenizer.decode(self.tokens, skip_special_tokens=True))
        if text.startswith(self.text) and len(text) > len(self.text):
            self._on_text(text[len(self.text):])
        self.text = text


# ------------------------------------------------------------------------------------------ backend
def _short(text: str, n: int = 64) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def quiet_transformers(hf: Any) -> None:
    """Send transformers' log records through the node's one logging pipeline (it has a handler of its own
    otherwise) and drop its progress bars, which are not log lines."""
    hf.utils.logging.disable_default_handler()
    hf.utils.logging.enable_propagation()
    hf.utils.logging.disable_progress_bar()


@dataclasses.dataclass(eq=False)
class _Request:
    """One study waiting for the model."""

    inputs: ModelInput
    seed: int
    #: ``time.monotonic()`` by which the answer must be complete (``[model] timeout_s`` from the call)
    deadline: float
    outcome: _Answer | BaseException | None = None


@dataclasses.dataclass(frozen=True)
class _Answer:
    """One row's decoded answer."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    grade_probabilities: tuple[GradeProbabilities, ...]


def _collate(encoded: Sequence[Mapping[str, Any]], *, pad_token: int) -> tuple[dict[str, Any], list[int]]:
    """The processor outputs of single requests as one batch: token-aligned tensors (``input_ids``,
    ``attention_mask``, ``mm_token_type_ids``, …) left-padded to the longest prompt, the rest (pixel
    patches, image grids) concatenated in row order, as the processor does for several texts.

    Returns the batch and each row's own prompt length.
    """
    import torch

    lengths = [int(e["input_ids"].shape[1]) for e in encoded]
    longest = max(lengths)
    out: dict[str, Any] = {}
    for key in encoded[0]:
        values = [e[key] for e in encoded]
        if all(v.ndim == 2 and v.shape[0] == 1 and v.shape[1] == n for v, n in zip(values, lengths, strict=True)):
            fill = pad_token if key == "input_ids" else 0
            out[key] = torch.cat([torch.nn.functional.pad(v, (longest - v.shape[1], 0), value=fill) for v in values])
        else:
            out[key] = torch.cat(values)
    return out, lengths


class TransformersBackend:
    """A Qwen2.5-VL-class model loaded in this process (implements :class:`~inference.inputs.SpineModel`).

    Parameters
    ----------
    settings
        The ``[model]`` table.
    cache_dir
        Where to keep the weights-digest cache (the node passes ``<data_dir>/cache``).
    limits
        Answer size limits for the schema (default: the contract's).
    name, demo
        Override the model name / demo flag recorded in :attr:`identity` (the demo backend sets them).
        A checkpoint whose config says it is the SpineMed demo model is flagged demo in any case.
    num_threads
        Torch intra-op threads while generating (default: torch's).  A tiny model on CPU is several
        times faster with one thread: its operations are too small to split.

    Raises
    ------
    BackendUnavailableError
        The model, its processor or the grammar tokenizer could not be loaded.
    """

    backend_name: str = "transformers"

    def __init__(
        self,
        settings: ModelSettings,
        *,
        cache_dir: Path | None = None,
        limits: SchemaLimits | None = None,
        name: str | None = None,
        demo: bool = False,
        num_threads: int | None = None,
    ) -> None:
        self.settings = settings
        self.num_threads = num_threads
        self.limits = limits or SchemaLimits()
        #: token counts of the last generation (prompt, answer), for benchmarks and logs
        self.last_prompt_tokens = 0
        self.last_generated_tokens = 0
        #: the chat messages of the last consultation turn (images as ``image_index`` parts)
        self.last_consult_messages: list[dict[str, Any]] = []
        #: per-grade probabilities read while generating the last answer (see :mod:`inference.grade_probs`)
        self.last_grade_probabilities: tuple[GradeProbabilities, ...] = ()
        self.model_dir = resolve_model_dir(settings)
        self.device, self.dtype = resolve_device_dtype(settings)
        self.static_cache = settings.static_cache == "on" or (
            settings.static_cache == "auto" and self.device.type == "cuda"
        )
        # the model is used by one generate at a time (a batch, or a consultation turn)
        self._lock = threading.Lock()
        #: studies decoded together at most (``[model] max_batch``)
        self.max_batch = settings.max_batch
        self._queue: list[_Request] = []
        self._queue_changed = threading.Condition()
        self._decoding = False
        try:
            import llguidance
            import llguidance.hf
            import torch

            hf: Any = importlib.import_module("transformers")  # partially typed: use it as untyped
            quiet_transformers(hf)
            self.processor: Any = hf.AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
            self.model: Any = hf.AutoModelForImageTextToText.from_pretrained(
                self.model_dir,
                dtype=self.dtype,
                local_files_only=True,
                # load straight onto the GPU (a 7B model is 15 GB: no detour through host memory)
                device_map={"": str(self.device)} if self.device.type == "cuda" else None,
            )
            self.model.to(self.device)
            self.model.eval()
            tokenizer = self.processor.tokenizer
            self._ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)
            # fills the grammar masks of a batch's rows in parallel (llguidance's own Rust threads)
            self._executor = llguidance.LLExecutor(min(self.max_batch, os.cpu_count() or 1))
        except (OSError, ValueError, ImportError, KeyError, RuntimeError, TypeError) as exc:
            raise BackendUnavailableError(f"model: cannot load {self.model_dir}: {type(exc).__name__}: {exc}") from exc
        torch.set_grad_enabled(False)
        self._image_size = processor_policy(self.processor, settings)
        self._patch_size = int(getattr(self.processor.image_processor, "patch_size", None) or PATCH_SIZE)
        config = self.model.config
        self._eos_ids = self._eos_token_ids()
        self._stop_id, self._pad_id = self._stop_and_pad_ids()
        # after one of these a row of a batch is over: its end, or the padding generate gives it after that
        self._end_ids = frozenset(self._eos_ids | {self._pad_id})
        is_demo = demo or bool(getattr(config, "spinemed_demo", None))
        digest = weights_digest(self.model_dir, cache_dir=cache_dir)
        self._identity = ModelIdentity(
            name=_short(name or self._model_name()),
            version=_short(self._model_version(config, digest)),
            weights_digest=digest,
            backend=self.backend_name,
            prompt_version=PROMPT_VERSION,
            demo=is_demo,
        )
        _log.info(
            "model loaded: %s %s on %s/%s (demo=%s)",
            self._identity.name,
            self._identity.version,
            self.device,
            str(self.dtype).removeprefix("torch."),
            is_demo,
        )

    @property
    def image_size(self) -> ImageSizePolicy:
        """Qwen2.5-VL's sizes, with this processor's own patch size and pixel limits."""
        return self._image_size

    # -- identity -------------------------------------------------------------------------------
    def _model_name(self) -> str:
        if self.settings.hub_id:
            return self.settings.hub_id
        m = _SNAPSHOT.search(self.model_dir.resolve().as_posix())
        if m:
            return f"{m['org']}/{m['name']}"
        return self.model_dir.resolve().name or "model"

    def _model_version(self, config: Any, digest: str) -> str:
        if self.settings.revision:
            return self.settings.revision
        m = _SNAPSHOT.search(self.model_dir.resolve().as_posix())
        if m:
            return m["commit"]
        commit = getattr(config, "_commit_hash", None)
        if commit:
            return str(commit)
        build = getattr(config, "spinemed_demo_build", None)
        if build:
            return str(build)
        return f"sha256:{digest[:16]}"

    def _eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        tok_eos = self.processor.tokenizer.eos_token_id
        if tok_eos is not None:
            ids.add(int(tok_eos))
        return {int(i) for i in ids}

    def _stop_and_pad_ids(self) -> tuple[int, int]:
        """The end-of-sequence id that ``generate`` stops a row on, and the id that pads rows."""
        eos = self.model.generation_config.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos] if eos is not None else []
        stop = int(eos_list[0]) if eos_list else min(self._eos_ids) if self._eos_ids else None
        if stop is None:
            raise BackendUnavailableError(f"model: {self.model_dir} declares no end-of-sequence token")
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.processor.tokenizer.pad_token_id
        return stop, int(pad) if pad is not None else stop

    @property
    def identity(self) -> ModelIdentity:
        """Who answers: name, revision, weights digest, backend, prompt version, demo flag."""
        return self._identity

    # -- inference ------------------------------------------------------------------------------
    @property
    def concurrent(self) -> bool:
        """Whether the pipeline may call :meth:`analyze` from several threads at once: with
        ``[model] max_batch`` > 1 the calls that arrive together are decoded as one batch."""
        return self.max_batch > 1

    def schema(self, inputs: ModelInput) -> dict[str, Any]:
        """The answer schema of one request (evidence bounded by its images, this backend's limits)."""
        return answer_schema(image_sizes=[(i.ref.columns, i.ref.rows) for i in inputs.images], limits=self.limits)

    def generate_text(self, inputs: ModelInput, *, seed: int | None = None) -> str:
        """Run the model on one request and return the raw (schema-constrained) answer text.

        Parameters
        ----------
        inputs
            The study's images and task.
        seed
            Sampling seed (default ``settings.seed``); only matters when ``settings.temperature > 0``.

        Raises
        ------
        InferenceTimeoutError
            The answer was not complete within ``settings.timeout_s``.
        InvalidModelOutputError
            Decoding ran out of ``max_new_tokens`` or the grammar failed.
        InferenceError
            The model raised.
        """
        answer = self._answer(inputs, seed)
        self.last_prompt_tokens, self.last_generated_tokens = answer.prompt_tokens, answer.generated_tokens
        self.last_grade_probabilities = answer.grade_probabilities
        return answer.text

    def _answer(self, inputs: ModelInput, seed: int | None) -> _Answer:
        """Queue one request and wait for its answer.

        The first waiting thread that finds the model free leads: it waits up to ``[model] batch_wait_ms``
        for the queue to hold ``max_batch`` requests (the studies other analysis threads are still
        preparing; the threads of the batch just answered come back at once), then decodes the oldest
        requests (up to ``max_batch`` of one seed) as one batch and hands every row its outcome; the
        others wait.  Studies that arrive while the model is busy form the next batch.
        """
        request = _Request(inputs, self.settings.seed if seed is None else seed,
                           time.monotonic() + self.settings.timeout_s)
        with self._queue_changed:
            self._queue.append(request)
            self._queue_changed.notify_all()  # a leader gathering its batch sees one more
            while True:
                while request.outcome is None and self._decoding:
                    self._queue_changed.wait()
                if request.outcome is not None:
                    break
                self._decoding = True  # this thread leads; the others wait for their outcome
                if self.max_batch > 1 and len(self._queue) < self.max_batch:
                    self._queue_changed.wait_for(lambda: len(self._queue) >= self.max_batch,
                                                 timeout=self.settings.batch_wait_ms / 1000)
                batch = [r for r in self._queue if r.seed == self._queue[0].seed][: self.max_batch]
                for r in batch:
                    self._queue.remove(r)
                self._queue_changed.release()
                outcomes: list[_Answer | BaseException]
                try:
                    outcomes = list(self._decode_batch(batch))
                except BaseException as exc:  # a bug or an interrupt: no waiting row is left hanging
                    outcomes = [InferenceError(f"model: batch abandoned: {type(exc).__name__}") for _ in batch]
                    outcomes[batch.index(request)] = exc
                finally:
                    self._queue_changed.acquire()
                    self._decoding = False
                for r, outcome in zip(batch, outcomes, strict=True):
                    r.outcome = outcome
                self._queue_changed.notify_all()
        if isinstance(request.outcome, BaseException):
            raise request.outcome
        return request.outcome

    def _encode(self, request: _Request) -> dict[str, Any]:
        """One request through the chat template and the processor (on the CPU)."""
        messages = _to_processor_messages(build_messages(request.inputs))
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images = [to_pil(img) for img in request.inputs.images]
        try:
            encoded = self.processor(text=[text], images=images, return_tensors="pt")
        except (ValueError, TypeError, RuntimeError) as exc:
            raise InferenceError(f"model processor rejected the images: {exc}") from exc
        check_unchanged([(img.ref.rows, img.ref.columns) for img in request.inputs.images],
                        encoded["image_grid_thw"].tolist(), self._patch_size)
        return dict(encoded)

    def _decode_batch(self, batch: Sequence[_Request]) -> list[_Answer | InferenceError]:
        """Decode the requests of one batch together; each row's failure is that row's alone.

        Rows are left-padded to one prompt length; each row is constrained by its own grammar and
        stopped by its own deadline.  A failure of the whole ``generate`` (out of memory, a model error)
        is every row's outcome.
        """
        import llguidance
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        s = self.settings
        outcomes: list[_Answer | InferenceError | None] = [None] * len(batch)
        rows: list[int] = []
        encoded: list[dict[str, Any]] = []
        grammars: list[str] = []
        now = time.monotonic()
        for i, request in enumerate(batch):
            if now > request.deadline:
                outcomes[i] = InferenceTimeoutError(
                    f"model: no answer within {s.timeout_s:g} s (timed out before decoding)")
                continue
            try:
                encoded.append(self._encode(request))
            except InferenceError as exc:
                outcomes[i] = exc
                continue
            grammars.append(llguidance.LLMatcher.grammar_from_json_schema(
                self.schema(request.inputs), defaults={"whitespace_flexible": False}))
            rows.append(i)
        if not rows:
            return [o for o in outcomes if o is not None]
        inputs, prompt_lengths = _collate(encoded, pad_token=self._pad_id)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        prompt_length = int(inputs["input_ids"].shape[1])
        probes = [SeverityProbe(self.processor.tokenizer) for _ in rows]
        guide = LLGuidanceLogitsProcessor(self._ll_tokenizer, grammars, prompt_length=prompt_length,
                                          end_tokens=self._end_ids, stop_token=self._stop_id,
                                          probes=probes, executor=self._executor)
        stop = DeadlineCriteria([batch[i].deadline for i in rows])
        gen_kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "do_sample": s.temperature > 0,
                                      "pad_token_id": self._pad_id}
        if s.temperature > 0:
            gen_kwargs.update(temperature=s.temperature, top_p=1.0, top_k=0)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.static_cache:
            # One cache ceiling for every study: the compiled decoding step is reused across prompt
            # lengths instead of recompiled (measured on an H200: benchmarks/README.md).
            gen_kwargs["cache_implementation"] = "static"
            if prompt_length + s.max_new_tokens <= s.max_cache_len:
                gen_kwargs["max_cache_len"] = s.max_cache_len
        with self._lock:
            torch.manual_seed(batch[rows[0]].seed)
            threads = torch.get_num_threads()
            if self.num_threads:
                torch.set_num_threads(self.num_threads)
            try:
                out = self.model.generate(
                    **inputs,
                    logits_processor=LogitsProcessorList([guide]),
                    stopping_criteria=StoppingCriteriaList([stop]),
                    **gen_kwargs,
                )
            except InferenceError as exc:
                return [o if o is not None else exc for o in outcomes]
            except torch.OutOfMemoryError as exc:  # another job on the GPU, a large batch: wait, try again
                del inputs
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                error: InferenceError = BackendUnavailableError(
                    f"model: out of {self.device.type.upper()} memory (the study waits and is tried again)")
                error.__cause__ = exc
                return [o if o is not None else error for o in outcomes]
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                error = InferenceError(f"model: generation failed: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                return [o if o is not None else error for o in outcomes]
            finally:
                torch.set_num_threads(threads)
        for k, i in enumerate(rows):
            outcomes[i] = self._row_outcome(out[k, prompt_length:].tolist(), k, guide, stop, probes[k],
                                            prompt_lengths[k])
        return [o for o in outcomes if o is not None]

    def _row_outcome(self, tokens: list[int], row: int, guide: LLGuidanceLogitsProcessor, stop: DeadlineCriteria,
                     probe: SeverityProbe, prompt_tokens: int) -> _Answer | InferenceError:
        s = self.settings
        end = next((j for j, t in enumerate(tokens) if t in self._end_ids), None)
        answer_tokens = tokens[:end] if end is not None else tokens
        generated = len(answer_tokens) + (1 if end is not None else 0)
        if stop.expired_rows[row]:
            return InferenceTimeoutError(f"model: no answer within {s.timeout_s:g} s ({generated} tokens generated)")
        if guide.errors[row] is not None:
            return InvalidModelOutputError(str(guide.errors[row]))
        if end is None or tokens[end] not in self._eos_ids or not guide.accepting(row):
            return InvalidModelOutputError(
                f"model output incomplete after {generated} tokens (max_new_tokens={s.max_new_tokens})")
        text = str(self.processor.tokenizer.decode(answer_tokens, skip_special_tokens=False))
        return _Answer(text=text, prompt_tokens=prompt_tokens, generated_tokens=generated,
                       grade_probabilities=probe.grade_probabilities(text, answer_tokens))

    def analyze(self, inputs: ModelInput) -> SpineFindings:
        """Run the model on one study and return validated findings.

        Safe to call from several threads: with ``[model] max_batch`` > 1 the studies that wait together
        are decoded as one batch (:meth:`_answer`).

        Raises
        ------
        InferenceError
            Timeout (:class:`InferenceTimeoutError`), output that does not validate
            (:class:`InvalidModelOutputError`) or a model failure.
        """
        started = time.monotonic()
        answer = self._answer(inputs, None)
        findings = to_findings(parse_answer(answer.text), inputs, self._identity)
        if answer.grade_probabilities:
            findings = findings.model_copy(update={"grade_probabilities": answer.grade_probabilities})
        _log.info(
            "study analysed: %d images, %d level findings, %.2f s",
            len(inputs.images),
            len(findings.levels),
            time.monotonic() - started,
        )
        return findings

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
        """Answer a follow-up question about one analysed study (free text, streamed to ``on_text``).

        The images go through the processor as for :meth:`analyze`; generation is greedy (or sampled with
        ``settings.temperature``), not constrained, and stops at ``max_new_tokens`` or the model's end.

        Raises
        ------
        ValueError
            ``max_new_tokens`` is below 1, or ``question`` is empty.
        InferenceError
            The model failed, or timed out after ``settings.timeout_s`` (:class:`InferenceTimeoutError`).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be 1 or more, got {max_new_tokens}")
        messages = build_consult_messages(inputs, findings, history, question)
        self.last_consult_messages = messages
        return _consult(self, inputs, messages, on_text, max_new_tokens)


def _consult(
    backend: TransformersBackend,
    inputs: ModelInput,
    messages: list[dict[str, Any]],
    on_text: Callable[[str], None],
    max_new_tokens: int,
) -> ConsultAnswer:
    import torch
    from transformers import StoppingCriteriaList

    s = backend.settings
    deadline = time.monotonic() + s.timeout_s
    text = backend.processor.apply_chat_template(_to_processor_messages(messages), add_generation_prompt=True,
                                                 tokenize=False)
    try:
        encoded = backend.processor(text=[text], images=[to_pil(img) for img in inputs.images], return_tensors="pt")
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InferenceError(f"model processor rejected the images: {exc}") from exc
    encoded = encoded.to(backend.device)
    prompt_length = int(encoded["input_ids"].shape[1])
    stop = DeadlineCriteria(deadline)
    streamer = TextCallbackStreamer(backend.processor.tokenizer, on_text)
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": s.temperature > 0}
    if s.temperature > 0:
        gen_kwargs.update(temperature=s.temperature, top_p=1.0, top_k=0)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    with backend._lock:
        torch.manual_seed(s.seed)
        threads = torch.get_num_threads()
        if backend.num_threads:
            torch.set_num_threads(backend.num_threads)
        try:
            out = backend.model.generate(**encoded, stopping_criteria=StoppingCriteriaList([stop]), streamer=streamer,
                                         **gen_kwargs)
        except torch.OutOfMemoryError as exc:
            del encoded
            if backend.device.type == "cuda":
                torch.cuda.empty_cache()
            raise BackendUnavailableError(f"model: out of {backend.device.type.upper()} memory") from exc
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise InferenceError(f"model: generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            torch.set_num_threads(threads)
    tokens = out[0, prompt_length:].tolist()
    backend.last_prompt_tokens, backend.last_generated_tokens = prompt_length, len(tokens)
    if stop.expired:
        raise InferenceTimeoutError(f"model: no answer within {s.timeout_s:g} s ({len(tokens)} tokens generated)")
    finished = bool(tokens) and tokens[-1] in backend._eos_ids
    answer = str(backend.processor.tokenizer.decode(tokens, skip_special_tokens=True))
    return ConsultAnswer(text=answer, prompt_tokens=prompt_length, completion_tokens=len(tokens),
                         truncated=not finished)


def _to_processor_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prompt messages for ``processor.apply_chat_template``: string content becomes one text part."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = [{"type": "image"} if part["type"] == "image" else dict(part) for part in content]
        out.append({"role": msg["role"], "content": parts})
    return out
