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
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

__all__ = ["main"]

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


def _images(n: int, size: int) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for k in range(n):
        base = 127 + 60 * np.sin(xx / (7 + k)) * np.cos(yy / 11)
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(img).convert("RGB"))
    return out


def _inputs(tokenizer: Any, images: list[Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Pixel values from the Qwen2-VL image processor and the prompt with each image's visual tokens.

    Uses ``Qwen2_5_VLProcessor`` when this transformers version can build it from parts; else expands
    the image tokens by hand exactly as the processor does (``grid_t * grid_h * grid_w / merge²``).
    """
    from transformers import Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor()
    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    prompt += "".join("<|vision_start|><|image_pad|><|vision_end|>" for _ in images)
    prompt += "Report the findings per vertebral level as JSON.<|im_end|>\n<|im_start|>assistant\n"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU (seconds)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to decode (600; smoke 16)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=None, help="px (512; smoke 112)")
    parser.add_argument("--json-out", default=None, help="also write the result as JSON here")
    parser.add_argument("--static", action="store_true", help="also decode with a static cache (compiled step)")
    args = parser.parse_args(argv)
    new_tokens = args.new_tokens or (16 if args.smoke else 600)
    image_size = args.image_size or (112 if args.smoke else 512)
    result = run(args.smoke, new_tokens, args.images, image_size, static=args.static)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
