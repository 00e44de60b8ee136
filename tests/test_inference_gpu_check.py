"""The GPU check script runs end to end in its CPU ``--smoke`` mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.run(smoke=True, new_tokens=4, n_images=2, image_size=56)
    assert result["generated_tokens"] == 4 and result["prompt_tokens"] > 2 * 4
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    assert module._bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert module._bandwidth("NVIDIA H200") == 4.8e12
    assert module.CONFIG_7B["hidden_size"] == 3584 and module.CONFIG_7B["vocab_size"] == 152064


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_batch_smoke(tmp_path: Path) -> None:
    """Batch mode: left-padded rows of different studies decode exactly as each study alone (fp32), from the
    static cache that the CUDA run uses (uncompiled on CPU)."""
    module = _module()
    out = tmp_path / "batch.json"
    result = module.run_batches(smoke=True, sizes=[1, 2], new_tokens=4, n_images=2, image_size=56,
                                static=True, max_cache_len=512, json_out=str(out))
    assert json.loads(out.read_text(encoding="utf-8")) == result
    assert result["mode"] == "batch" and result["decode_mode"] == "static cache (max_cache_len 512)"
    lengths = [s["prompt_tokens"] for s in result["studies"]]
    assert len(lengths) == 2 and lengths[0] != lengths[1]  # the second row is left-padded
    assert [r["batch"] for r in result["batches"]] == [1, 2] and not result["skipped"] and not result["failed"]
    for row in result["batches"]:
        assert row["rows_matching_solo"] == row["batch"]
        assert row["padded_prompt_tokens"] == max(lengths[: row["batch"]])
        assert row["studies_per_hour"] > 0 and row["decode_tokens_per_s"] > 0 and row["seconds"] > 0
        assert row["compile_s"] is None and row["peak_gpu_memory_gib"] is None  # CPU: no compilation, no GPU
    assert result["batches"][0]["ratio_to_batch1"] == 1.0 and result["batches"][1]["ratio_to_batch1"] > 0
    assert result["check"] == {"tokens_compared": 4, "required": True, "all_rows_match": True}


def test_gpu_check_batch_collate_and_budget() -> None:
    module = _module()
    ids = [torch.tensor([[5, 6, 7]]), torch.tensor([[8]])]
    batch = module._collate(
        [{"input_ids": i, "attention_mask": torch.ones_like(i), "pixel_values": torch.full((2, 3), float(k))}
         for k, i in enumerate(ids)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["pixel_values"][:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert module._parse_sizes("8,1, 2,4,2") == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="batch"):
        module._parse_sizes("0,2")
    # no time left: batch 1 (the reference) runs, the other sizes are skipped, not attempted
    result = module.run_batches(smoke=True, sizes=[2], new_tokens=2, n_images=1, image_size=56, budget_s=0.0)
    assert [r["batch"] for r in result["batches"]] == [1]
    assert [(s["batch"], s["reason"]) for s in result["skipped"]] == [(2, "budget")]
