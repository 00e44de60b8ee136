"""GPU throughput check: a full-size Qwen2.5-VL-7B-Instruct architecture with random bf16 weights.

SpineGPT is a Qwen2.5-VL-7B-Instruct fine-tune; its weights are not public and the GPU machine has no
network, so this builds the 7B *architecture* (hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate
18944, vocab 152064, the 7B vision tower) with random bf16 weights directly on the GPU and times one
study's worth of work: 4 key images of 512² through the Qwen2-VL image processor, prefill, then ~600
decoded tokens (no EOS stop).  It prints prefill tokens/s, decode tokens/s, peak GPU memory, seconds per
study, and decode tokens/s as a fraction of the memory-bandwidth ceiling of the card.

Self-contained on purpose: it needs only torch, transformers (>= 4.49, which has Qwen2.5-VL), tokenizers,
numpy and pillow — not this repository's other dependencies — and uses no API newer than transformers 4.50
where it can.  Run from the repository root::

    PYTHONPATH=. python benchmarks/gpu_check.py            # the real check (CUDA)
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke    # tiny config on CPU, seconds
    bash benchmarks/gpu_check.sh --batch 1,2,4,8            # batch mode (CUDA), under 8 minutes
    bash benchmarks/gpu_check.sh --smoke --batch 1,2,4     # batch mode, tiny config on CPU

Batch mode (``--batch 1,2,4,8``, :func:`run_batches`): the model is built once, then for each batch size
``b`` the first ``b`` of eight different studies (3, 2 or 1 images of 448² each, notes of different
lengths: 372-904 prompt tokens here) are left-padded into one batch (attention mask 0 on the pads, as the
node's transformers backend collates them) and decoded greedily, exactly 400 tokens per row (no EOS
stop), from a static KV cache (``max_cache_len`` 4096) with the compiled decoding step.  Per size: seconds
per batch, studies/hour, decode tokens/s summed over the rows, peak GPU memory, the compilation paid by
the first run of that shape, and studies/hour relative to batch 1 of the same process; a table, and JSON
with ``--json-out`` (rewritten after every size, so a run cut short keeps what it measured).  Each row
is also compared with its study decoded alone: all tokens and required equal with ``--smoke`` (fp32
CPU), the first 32 tokens and reported only on CUDA (bf16 sums round differently with the batch shape).
Sizes whose projected cost would end past ``--budget-s`` (420 s from the start; gpu_check.sh kills at
470 s) are reported as ``skipped: budget`` instead of being killed.

Time estimate for ``--batch 1,2,4,8`` on one H200 (measured there before: model build + random init
well under a minute; ≈ 48 s to compile the static step at batch 1; 120 decoded tok/s at batch 1):
≈ 60 s build; batch 1: 48 s compile + 2 × 3.5 s decoding; batch 2: one more compilation (transformers
5.2x compiles with ``dynamic=None``, so the second shape makes the batch dimension dynamic; ≤ 48 s);
batches 4 and 8 reuse that graph (CUDA-graph capture only, seconds) but the static-cache attention
reads ``b × 4096`` positions and copies the grouped KV heads per step, so 400 tokens take maybe
5-12 s per run; plus 8 × ≈ 0.5 s solo references.  About 4 minutes expected, ≈ 5.5 minutes if every
size recompiles for 48 s: within the 420 s budget.

Timing numbers are for the architecture, not for SpineGPT's answers (random weights).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

__all__ = ["main", "run", "run_batches"]

_T0 = time.perf_counter()  # the --budget-s clock starts here (torch imported, transformers not yet)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Memory bandwidth (bytes/s) by card name fragment, most specific first.
BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIE", 2.0e12),
    ("H100", 3.35e12),
    ("GH200", 4.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
)

#: Qwen2.5-VL-7B-Instruct's config.json (legacy flat layout: every transformers version reads it).
CONFIG_7B: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 152064,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}

#: A tiny configuration of the same architecture for ``--smoke`` (head_dim 16 → mrope sections sum to 8).
CONFIG_SMOKE: dict[str, Any] = {
    **CONFIG_7B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_window_layers": 2,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "vision_config": {
        **CONFIG_7B["vision_config"],
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    },
}


def _log(msg: str) -> None:
    print(msg, flush=True)


def _tokenizer() -> Any:
    """A byte-level BPE with the Qwen special tokens, trained here in a second (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Spine MR study. Sagittal T2, mid-sagittal slice. Disc herniation at L4-L5."] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _images(n: int, size: int, seed: int = 0) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for k in range(n):
        base = 127 + 60 * np.sin(xx / (7 + k) + seed) * np.cos(yy / (11 + seed % 5))
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(img).convert("RGB"))
    return out


def _inputs(tokenizer: Any, images: list[Any], note: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """Pixel values from the Qwen2-VL image processor and the prompt with each image's visual tokens.

    ``note`` is put before the question (batch mode: prompts of different lengths).

    Uses ``Qwen2_5_VLProcessor`` when this transformers version can build it from parts; else expands
    the image tokens by hand exactly as the processor does (``grid_t * grid_h * grid_w / merge²``).
    """
    from transformers import Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor()
    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    prompt += "".join("<|vision_start|><|image_pad|><|vision_end|>" for _ in images)
    prompt += note + "Report the findings per vertebral level as JSON.<|im_end|>\n<|im_start|>assistant\n"
    try:
        from transformers import Qwen2_5_VLProcessor

        kwargs: dict[str, Any] = {"image_processor": image_processor, "tokenizer": tokenizer}
        try:
            from transformers import Qwen2VLVideoProcessor

            kwargs["video_processor"] = Qwen2VLVideoProcessor()
        except ImportError:
            pass
        processor = Qwen2_5_VLProcessor(**kwargs)
        enc = processor(text=[prompt], images=images, return_tensors="pt")
        return {
            k: v
            for k, v in enc.items()
            if k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        }, "Qwen2_5_VLProcessor"
    except (ImportError, TypeError, ValueError, AttributeError) as exc:
        _log(f"processor path unavailable ({type(exc).__name__}: {exc}); expanding image tokens by hand")
    vision = image_processor(images=images, return_tensors="pt")
    merge = int(image_processor.merge_size) ** 2
    expanded = prompt
    for thw in vision["image_grid_thw"]:
        n = int(thw.prod()) // merge
        expanded = expanded.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
    expanded = expanded.replace("<|placeholder|>", "<|image_pad|>")
    ids = tokenizer(expanded, return_tensors="pt")
    return {
        "input_ids": ids["input_ids"],
        "attention_mask": ids["attention_mask"],
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
    }, "Qwen2VLImageProcessor + manual token expansion"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _build_model(cfg: dict[str, Any], tokenizer: Any, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}
    cfg = {
        **cfg,
        # the big vocabulary is kept; the special tokens are where this tokenizer has them
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
    }
    config = Qwen2_5_VLConfig.from_dict(cfg)
    for sub in ("text_config",):  # transformers >= 4.53 keeps the token ids on sub-configs too
        sub_cfg = getattr(config, sub, None)
        if sub_cfg is not None:
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                setattr(sub_cfg, key, cfg[key])
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(dtype):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.to(device=device, dtype=dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bandwidth(name: str) -> float | None:
    upper = name.upper()
    for fragment, value in BANDWIDTH:
        if fragment in upper:
            return value
    return None


def run(smoke: bool, new_tokens: int, n_images: int, image_size: int, static: bool = False) -> dict[str, Any]:
    """Build, run, time; return the measurements (also printed)."""
    import transformers

    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    dtype = torch.float32 if smoke else torch.bfloat16
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    _log(
        f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
        f"transformers {transformers.__version__} | device {card}"
    )

    t0 = time.perf_counter()
    tokenizer = _tokenizer()
    enc, path = _inputs(tokenizer, _images(n_images, image_size))
    _log(
        f"inputs via {path}: {int(enc['input_ids'].shape[1])} prompt tokens, image grids "
        f"{enc['image_grid_thw'].tolist()}"
    )
    model = _build_model(CONFIG_SMOKE if smoke else CONFIG_7B, tokenizer, device, dtype)
    _sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    visual = getattr(model, "visual", None) or getattr(getattr(model, "model", None), "visual", None)
    n_visual = sum(p.numel() for p in visual.parameters()) if visual is not None else 0
    decode_bytes = (n_params - n_visual) * torch.finfo(dtype).bits // 8
    _log(
        f"model built in {time.perf_counter() - t0:.1f} s: {n_params / 1e9:.2f} B parameters "
        f"({n_visual / 1e9:.2f} B vision), {dtype}"
    )

    enc = {k: v.to(device) for k, v in enc.items()}
    prompt_len = int(enc["input_ids"].shape[1])
    gen = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t = time.perf_counter()
        model.generate(**enc, max_new_tokens=1, min_new_tokens=1, **gen)
        _sync(device)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen)
        _sync(device)
        study_s = time.perf_counter() - t
        eager_study_s = study_s
        if static:
            # static KV cache: transformers compiles the decoding step (CUDA graphs) on first use
            sgen = {**gen, "cache_implementation": "static"}
            if hasattr(transformers.GenerationConfig(), "max_cache_len"):
                sgen["max_cache_len"] = 4096
            t = time.perf_counter()
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **sgen)
            _sync(device)
            compile_s = time.perf_counter() - t
            t = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **sgen)
            _sync(device)
            study_s = time.perf_counter() - t
            # other studies have other prompt lengths: with one cache ceiling (max_cache_len) the compiled
            # step must be reused, not recompiled
            other_runs = []
            for k in range(max(1, n_images - 2), n_images):
                enc_k, _ = _inputs(tokenizer, _images(k, image_size))
                enc_k = {key: v.to(device) for key, v in enc_k.items()}
                t = time.perf_counter()
                model.generate(**enc_k, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **sgen)
                _sync(device)
                other_runs.append({"images": k, "prompt_tokens": int(enc_k["input_ids"].shape[1]),
                                   "seconds": round(time.perf_counter() - t, 3)})
    generated = int(out.shape[1]) - prompt_len
    decode_s = max(study_s - prefill_s, 1e-9)
    decode_tps = (generated - 1) / decode_s
    result: dict[str, Any] = {
        "device": card,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "images": n_images,
        "image_size": image_size,
        "prompt_tokens": prompt_len,
        "generated_tokens": generated,
        "prefill_s": round(prefill_s, 4),
        "prefill_tokens_per_s": round(prompt_len / prefill_s, 1),
        "decode_tokens_per_s": round(decode_tps, 2),
        "seconds_per_study": round(study_s, 3),
        "decode_mode": "static cache + compiled step" if static else "eager (dynamic cache)",
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "decode_bytes_per_token_gb": round(decode_bytes / 1e9, 2),
    }
    if static:
        result["eager_seconds_per_study"] = round(eager_study_s, 3)
        result["eager_decode_tokens_per_s"] = round((generated - 1) / max(eager_study_s - prefill_s, 1e-9), 2)
        result["first_static_run_s_incl_compile"] = round(compile_s, 1)
        result["static_max_cache_len"] = sgen.get("max_cache_len")
        result["static_other_prompt_lengths"] = other_runs
    bw = _bandwidth(card) if device.type == "cuda" else None
    if bw is not None:
        ceiling = bw / decode_bytes
        result["bandwidth_tb_s"] = bw / 1e12
        result["decode_ceiling_tokens_per_s"] = round(ceiling, 1)
        result["decode_fraction_of_ceiling"] = round(decode_tps / ceiling, 3)
    _log(json.dumps(result, indent=1))
    _log(
        f"prefill {result['prefill_tokens_per_s']} tok/s | decode {result['decode_tokens_per_s']} tok/s"
        + (
            f" ({100 * result['decode_fraction_of_ceiling']:.0f}% of the"
            f" {result['decode_ceiling_tokens_per_s']}"
            f" tok/s bandwidth ceiling)"
            if "decode_fraction_of_ceiling" in result
            else ""
        )
        + f" | {result['seconds_per_study']} s per study | peak {result['peak_gpu_memory_gib']} GiB"
    )
    if generated != new_tokens:
        raise SystemExit(f"generated {generated} tokens, expected {new_tokens}")
    return result


#: One static KV-cache ceiling for every batch size and prompt length (as the node's backend does).
MAX_CACHE_LEN = 4096


def _collate(encoded: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Single-study encodings as one batch, as the node's transformers backend collates them.

    Token-aligned tensors (``input_ids``, ``attention_mask``) are left-padded to the longest prompt
    (``pad_id`` / mask 0 on the pads); pixel patches and image grids are concatenated in row order.
    """
    lengths = [int(e["input_ids"].shape[1]) for e in encoded]
    longest = max(lengths)
    out: dict[str, torch.Tensor] = {}
    for key in encoded[0]:
        values = [e[key] for e in encoded]
        if all(v.ndim == 2 and v.shape[0] == 1 and v.shape[1] == n for v, n in zip(values, lengths, strict=True)):
            fill = pad_id if key == "input_ids" else 0
            out[key] = torch.cat([torch.nn.functional.pad(v, (longest - v.shape[1], 0), value=fill) for v in values])
        else:
            out[key] = torch.cat(values)
    return out


def _study(tokenizer: Any, k: int, n_images: int, image_size: int) -> tuple[dict[str, torch.Tensor], int]:
    """Study ``k`` of a batch: its own images (seed ``k``), ``n_images``, ``n_images - 1`` or
    ``n_images - 2`` of them (at least 1) and a note of its own, so prompts differ in length."""
    count = max(1, n_images - k % min(3, n_images))
    enc, _ = _inputs(tokenizer, _images(count, image_size, seed=k), note=f"Study {k}. " + "Urgent. " * (k % 4))
    return enc, count


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"batch: expected comma-separated batch sizes such as 1,2,4,8, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch: batch sizes must be >= 1, got {text!r}")
    return sizes


def run_batches(
    smoke: bool,
    sizes: list[int],
    new_tokens: int,
    n_images: int,
    image_size: int,
    budget_s: float = 420.0,
    check_tokens: int = 32,
    static: bool | None = None,
    max_cache_len: int = MAX_CACHE_LEN,
    json_out: str | None = None,
) -> dict[str, Any]:
    """Batch mode: the same model decodes 1, 2, 4, … studies at once; studies/hour per batch size.

    Each batch holds ``b`` different studies (different images and prompt lengths), left-padded as the
    node's transformers backend pads them, decoded greedily with exactly ``new_tokens`` tokens per row.
    On CUDA the decoding step runs from a static KV cache (one ``max_cache_len``) and is compiled; the
    first run of each batch size pays the compilation and is reported apart from the timed run.  Batch
    sizes whose projected cost no longer fits ``budget_s`` (seconds since the script started) are
    skipped, not killed.  Correctness: every batch row is compared with its study decoded alone — all
    ``new_tokens`` tokens and required equal in ``smoke`` (fp32 CPU); the first ``check_tokens`` tokens,
    reported only, on CUDA (bf16 rounding differs with the batch shape).  ``static`` (default: on CUDA
    only) decodes from the static cache; transformers compiles the step on CUDA only, so a CPU smoke run
    with ``static=True`` checks the static cache with left-padded rows, uncompiled.
    """
    import transformers

    if 1 not in sizes:
        sizes = [1, *sizes]
        _log("batch 1 added: it is the reference of the ratios")
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    dtype = torch.float32 if smoke else torch.bfloat16
    static = device.type == "cuda" if static is None else static
    compiled = static and device.type == "cuda"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    _log(
        f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
        f"transformers {transformers.__version__} | device {card}"
    )
    if compiled:
        from torch._dynamo import config as dynamo_config

        # one compiled variant per batch size at most; keep dynamo from giving up on the later ones
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(64, int(getattr(dynamo_config, name))))
                break

    t0 = time.perf_counter()
    tokenizer = _tokenizer()
    pad_id = int(tokenizer.pad_token_id)
    studies: list[dict[str, torch.Tensor]] = []
    study_info: list[dict[str, int]] = []
    for k in range(max(sizes)):
        enc, count = _study(tokenizer, k, n_images, image_size)
        studies.append(enc)
        study_info.append({"study": k, "images": count, "prompt_tokens": int(enc["input_ids"].shape[1])})
    longest = max(s["prompt_tokens"] for s in study_info)
    if static and longest + new_tokens > max_cache_len:
        raise SystemExit(f"{longest} prompt + {new_tokens} new tokens exceed max_cache_len {max_cache_len}")
    _log(f"studies: prompt tokens {[s['prompt_tokens'] for s in study_info]}, "
         f"images {[s['images'] for s in study_info]}")
    model = _build_model(CONFIG_SMOKE if smoke else CONFIG_7B, tokenizer, device, dtype)
    _sync(device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"model built in {build_s:.1f} s ({n_params / 1e9:.2f} B parameters, {dtype})")

    gen: dict[str, Any] = {
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "pad_token_id": pad_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if static:
        gen["cache_implementation"] = "static"
        if hasattr(transformers.GenerationConfig(), "max_cache_len"):
            gen["max_cache_len"] = max_cache_len

    def generate(inputs: dict[str, torch.Tensor], tokens: int) -> tuple[torch.Tensor, float]:
        inputs = {key: v.to(device) for key, v in inputs.items()}
        _sync(device)
        t = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, **gen)
        _sync(device)
        seconds = time.perf_counter() - t
        generated = out[:, int(inputs["input_ids"].shape[1]):].cpu()
        if generated.shape[1] != tokens:
            raise SystemExit(f"generated {generated.shape[1]} tokens, expected {tokens}")
        return generated, seconds

    match_tokens = new_tokens if smoke else min(check_tokens, new_tokens)
    solo: dict[int, list[int]] = {}
    solo_s = 0.0  # seconds per study decoded alone (the reference runs)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []

    def summary() -> dict[str, Any]:
        return {
            "mode": "batch",
            "device": card,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": str(dtype).removeprefix("torch."),
            "decode_mode": (f"static cache (max_cache_len {max_cache_len})" + (" + compiled step" if compiled else ""))
            if static else "eager (dynamic cache)",
            "new_tokens": new_tokens,
            "images_per_study": n_images,
            "image_size": image_size,
            "budget_s": budget_s,
            "build_s": round(build_s, 1),
            "studies": study_info,
            "batches": rows,
            "skipped": skipped,
            "failed": failed,
            "check": {
                "tokens_compared": match_tokens,
                "required": smoke,
                "all_rows_match": all(r["rows_matching_solo"] == r["batch"] for r in rows),
            },
            "elapsed_s": round(time.perf_counter() - _T0, 1),
        }

    def measure(b: int) -> dict[str, Any]:
        nonlocal solo_s
        batch = _collate(studies[:b], pad_id)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _, first_s = generate(batch, new_tokens)  # compiles the step for this batch shape on CUDA
        _, prefill_s = generate(batch, 1)
        out, seconds = generate(batch, new_tokens)
        peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
        # each study alone (batch 1: its compiled step is reused on CUDA) as the reference of its row
        t = time.perf_counter()
        missing = [k for k in range(b) if k not in solo]
        for k in missing:
            solo[k] = generate(studies[k], match_tokens)[0][0].tolist()
        if missing:
            solo_s = (time.perf_counter() - t) / len(missing)
        return {
            "batch": b,
            "padded_prompt_tokens": int(batch["input_ids"].shape[1]),
            "seconds": round(seconds, 3),
            "prefill_s": round(prefill_s, 4),
            "studies_per_hour": round(b * 3600 / seconds, 1),
            "decode_tokens_per_s": round(b * (new_tokens - 1) / max(seconds - prefill_s, 1e-9), 1),
            "peak_gpu_memory_gib": peak,
            "first_run_s": round(first_s, 2),
            "compile_s": round(max(first_s - seconds, 0.0), 1) if compiled else None,
            "rows_matching_solo": sum(out[k, :match_tokens].tolist() == solo[k][:match_tokens] for k in range(b)),
        }

    with torch.inference_mode():
        for b in sizes:
            elapsed = time.perf_counter() - _T0
            if rows:
                last = rows[-1]
                # compile + one decode (as the last size's first run), prefill and timed run scaled by the
                # batch growth, the new studies alone
                projected = last["first_run_s"] + (last["prefill_s"] + last["seconds"]) * b / last["batch"]
                projected += (b - len(solo)) * solo_s
                if elapsed + projected > budget_s:
                    _log(f"batch {b}: skipped: budget ({elapsed:.0f} s elapsed + ~{projected:.0f} s projected "
                         f"> {budget_s:.0f} s)")
                    skipped.append({"batch": b, "reason": "budget", "elapsed_s": round(elapsed, 1),
                                    "projected_s": round(projected, 1)})
                    continue
            try:
                row = measure(b)
            except Exception as exc:
                # out of memory, a compilation failure: recorded as this size's result (traceback
                # printed, exit status 1), the other sizes still run
                _log(f"batch {b}: FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                failed.append({"batch": b, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            reference = rows[0] if rows and rows[0]["batch"] == 1 else row if b == 1 else None
            row["ratio_to_batch1"] = (
                round(row["studies_per_hour"] / reference["studies_per_hour"], 2) if reference else None
            )
            rows.append(row)
            _log(
                f"batch {b}: {row['seconds']:.2f} s, {row['studies_per_hour']} studies/h, "
                f"{row['decode_tokens_per_s']} decode tok/s, ratio {row['ratio_to_batch1']}, "
                f"rows = alone {row['rows_matching_solo']}/{b}"
                + (f", compile {row['compile_s']} s" if compiled else "")
                + (f", peak {row['peak_gpu_memory_gib']} GiB" if device.type == "cuda" else "")
            )
            if json_out:  # a run cut short still leaves what it measured
                with open(json_out, "w", encoding="utf-8") as f:
                    json.dump(summary(), f, indent=1)
    result = summary()
    if json_out:
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    _log(json.dumps(result, indent=1))
    _log(_table(rows, skipped, failed))
    if smoke and not result["check"]["all_rows_match"]:
        raise SystemExit("batch rows differ from the studies decoded alone (fp32 CPU): padding is wrong")
    if smoke and failed:
        raise SystemExit(f"batch sizes failed: {[f['batch'] for f in failed]}")
    return result


def _table(rows: list[dict[str, Any]], skipped: list[dict[str, Any]], failed: list[dict[str, Any]]) -> str:
    head = "| batch | s / batch | studies / h | decode tok/s (all rows) | peak GiB | compile s | ratio | rows = alone |"
    lines = [head, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['seconds']:.2f} | {r['studies_per_hour']:.0f} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['peak_gpu_memory_gib'] if r['peak_gpu_memory_gib'] is not None else '-'} | "
            f"{r['compile_s'] if r['compile_s'] is not None else '-'} | "
            f"{r['ratio_to_batch1'] if r['ratio_to_batch1'] is not None else '-'} | "
            f"{r['rows_matching_solo']}/{r['batch']} |"
        )
    lines += [f"| {s['batch']} | skipped: budget | | | | | | |" for s in skipped]
    lines += [f"| {f['batch']} | FAILED ({f['error'][:60]}) | | | | | | |" for f in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU (seconds)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens to decode per study (600, batch mode 400; smoke 16, batch smoke 8)")
    parser.add_argument("--images", type=int, default=None, help="images per study (4, batch mode 3)")
    parser.add_argument("--image-size", type=int, default=None, help="px (512, batch mode 448; smoke 112)")
    parser.add_argument("--json-out", default=None, help="also write the result as JSON here")
    parser.add_argument("--static", action="store_true",
                        help="also decode with a static cache (compiled step); batch mode: static on CPU too")
    parser.add_argument("--batch", default=None, metavar="SIZES",
                        help="batch mode: decode this many studies at once, e.g. 1,2,4,8 (static cache on CUDA)")
    parser.add_argument("--max-cache-len", type=int, default=MAX_CACHE_LEN,
                        help=f"batch mode: static KV cache length ({MAX_CACHE_LEN}; the node's default is 8192)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="batch mode: skip batch sizes that would end later than this many seconds (420)")
    args = parser.parse_args(argv)
    if args.batch is not None:
        try:
            sizes = _parse_sizes(args.batch)
        except ValueError as exc:
            parser.error(str(exc))
        result = run_batches(
            args.smoke,
            sizes,
            args.new_tokens or (8 if args.smoke else 400),
            args.images or 3,
            args.image_size or (112 if args.smoke else 448),
            budget_s=args.budget_s,
            static=True if args.static else None,
            max_cache_len=args.max_cache_len,
            json_out=args.json_out,
        )
        return 1 if result["failed"] else 0
    else:
        new_tokens = args.new_tokens or (16 if args.smoke else 600)
        image_size = args.image_size or (112 if args.smoke else 512)
        result = run(args.smoke, new_tokens, args.images or 4, image_size, static=args.static)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
