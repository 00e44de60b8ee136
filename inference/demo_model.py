"""Build a tiny, randomly initialised Qwen2.5-VL model fully offline: the ``demo`` backend's weights.

The demo model has exactly the architecture of SpineGPT / Qwen2.5-VL-7B-Instruct
(:class:`transformers.Qwen2_5_VLForConditionalGeneration`: a windowed-attention ViT with 2×2 patch
merging and an M-RoPE decoder), only tiny: hidden size 64, two decoder layers, two vision blocks.
Its tokenizer is a byte-level BPE trained here on the node's own prompt and schema vocabulary, with
the Qwen special tokens, and its processor uses the Qwen2-VL chat template.  The saved directory
reloads with :class:`transformers.AutoProcessor` and :class:`transformers.AutoModelForImageTextToText`
under ``HF_HUB_OFFLINE=1``, so the demo backend runs the real transformers code path end to end.

Its answers are random (schema-valid only because decoding is constrained): it is **not for clinical
use**, which the directory says in ``SPINEMED_DEMO_MODEL.txt`` and in its ``config.json``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

__all__ = [
    "DEMO_BUILD_VERSION",
    "DEMO_MARKER_FILE",
    "DEMO_MODEL_NAME",
    "DEMO_NOTICE",
    "QWEN_SPECIAL_TOKENS",
    "build_demo_model",
    "demo_model_is_complete",
    "qwen2_vl_chat_template",
]

_log = logging.getLogger(__name__)

#: Bump when the builder changes what it writes: an existing build of another version is rebuilt.
DEMO_BUILD_VERSION: Final = "spinemed-demo-3"
#: Name recorded as the model name in findings and SRs.
DEMO_MODEL_NAME: Final = "spinemed-demo-tiny-random"
#: Human-readable warning written into the model directory and its config.
DEMO_NOTICE: Final = "demo — not for clinical use"
#: Marker file whose content proves a complete build (written last, before the atomic rename).
DEMO_MARKER_FILE: Final = "SPINEMED_DEMO_MODEL.txt"

#: Qwen2.5-VL special tokens, in Qwen's id order (``<|endoftext|>`` first).
QWEN_SPECIAL_TOKENS: Final[tuple[str, ...]] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_VOCAB_SIZE: Final = 1024  # byte alphabet (256) + merges + special tokens
_REQUIRED_FILES: Final[tuple[str, ...]] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    DEMO_MARKER_FILE,
)


def qwen2_vl_chat_template() -> str:
    """Return the Qwen2-VL / Qwen2.5-VL chat template (Jinja), as shipped with the Instruct models.

    Returns
    -------
    str
        Renders ``system``/``user``/``assistant`` messages whose ``content`` is a string or a list of
        ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts; every image becomes
        ``<|vision_start|><|image_pad|><|vision_end|>``, which the processor expands to the image's
        visual tokens.
    """
    return (
        "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
        "{% set image_count.value = image_count.value + 1 %}"
        "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif content['type'] == 'video' or 'video' in content %}"
        "{% set video_count.value = video_count.value + 1 %}"
        "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
        "<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _marker_text(seed: int) -> str:
    return (
        f"{DEMO_MODEL_NAME}: {DEMO_NOTICE}.\n"
        "A tiny Qwen2.5-VL with random weights, built locally by inference.demo_model.\n"
        "Its output is random text that only has the right shape; never use it for a diagnosis.\n"
        f"build_version={DEMO_BUILD_VERSION}\n"
        f"seed={seed}\n"
    )


def demo_model_is_complete(path: Path, *, seed: int = 0) -> bool:
    """Tell whether ``path`` holds a complete demo build of this version and seed.

    Parameters
    ----------
    path
        The demo model directory.
    seed
        The seed the build must have used.
    """
    marker = path / DEMO_MARKER_FILE
    if not all((path / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        return marker.read_text(encoding="utf-8") == _marker_text(seed)
    except (OSError, UnicodeDecodeError):
        return False


def _training_corpus() -> list[str]:
    """Text the BPE merges are learnt from: the answer schema, its enums and the prompts' words."""
    # Imported here: the schema and prompts import findings, which is cheap, but keep module import light.
    from inference.findings import LEVELS, FindingType, Laterality, MeasurementType, Severity
    from inference.prompts import prompt_corpus
    from inference.schema import answer_schema

    words: list[str] = [*LEVELS, *(m.value for m in FindingType), *(m.value for m in Severity)]
    words += [m.value for m in Laterality] + [m.value for m in MeasurementType]
    corpus = [json.dumps(answer_schema(), separators=(",", ":")), *prompt_corpus(), " ".join(words)]
    example = {
        "levels": [
            {
                "level": "L4-L5",
                "finding": "disc_herniation",
                "severity": "moderate",
                "grade": None,
                "laterality": "left",
                "measurements": [],
                "evidence": [{"image": 0, "x": 120.0, "y": 200.5}],
            }
        ],
        "report": {
            "findings": "Disc herniation at L4-L5 compressing the left L5 nerve root.",
            "diagnosis": "Lumbar disc herniation.",
            "treatment_suggestions": "Conservative management, physiotherapy.",
            "risk_and_prognosis": "Good prognosis.",
            "follow_up": "Review in six weeks.",
            "diagnostic_basis": "Sagittal T2 MR.",
        },
    }
    corpus += [json.dumps(example, separators=(",", ":"))] * 20
    return corpus


def _build_tokenizer(out: Path) -> Any:
    """Train a byte-level BPE with the Qwen special tokens and save it as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    hf: Any = importlib.import_module("transformers")  # partially typed: use it as untyped

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = hf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    fast.save_pretrained(out)
    return fast


def _build(out: Path, seed: int) -> None:
    """Write a complete demo model into the empty directory ``out``."""
    import torch

    hf: Any = importlib.import_module("transformers")  # partially typed: use it as untyped

    tokenizer = _build_tokenizer(out)
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = len(tokenizer)
    vocab_size += -vocab_size % 64  # room to spare, like Qwen's 151643 → 152064

    hidden, heads = 64, 4  # head_dim 16 → M-RoPE sections sum to head_dim / 2 = 8
    config = hf.Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,  # a multiple of patch × merge = 28
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.spinemed_demo = f"{DEMO_MODEL_NAME}: {DEMO_NOTICE}"
    config.spinemed_demo_build = DEMO_BUILD_VERSION
    torch.manual_seed(seed)
    model = hf.Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = hf.GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)

    image_processor = hf.Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=1344 * 1344, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    video_processor = hf.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = hf.Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=qwen2_vl_chat_template(),
    )
    processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(qwen2_vl_chat_template(), encoding="utf-8")
    (out / DEMO_MARKER_FILE).write_text(_marker_text(seed), encoding="utf-8")


def build_demo_model(path: Path, *, seed: int = 0) -> Path:
    """Build the tiny random demo model into ``path`` unless a complete build is already there.

    The build happens in a temporary sibling directory that is renamed onto ``path`` when complete,
    so a crash never leaves a half-written model and concurrent builders do not collide.  An existing
    directory of another build version or seed is replaced.  Nothing is downloaded.

    Parameters
    ----------
    path
        Directory to hold the model (created, with its parents, if missing).
    seed
        Seed of the random weights.

    Returns
    -------
    pathlib.Path
        ``path``, ready for ``from_pretrained(path)``.

    Raises
    ------
    OSError
        The directory could not be written.
    """
    path = Path(path)
    if demo_model_is_complete(path, seed=seed):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.build-", dir=path.parent))
    try:
        _log.info("building demo model (%s) in %s", DEMO_NOTICE, path)
        _build(tmp, seed)
        if path.exists():
            if demo_model_is_complete(path, seed=seed):  # another process finished first
                return path
            stale = path.with_name(f".{path.name}.stale-{os.getpid()}")
            os.replace(path, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            if not demo_model_is_complete(path, seed=seed):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
