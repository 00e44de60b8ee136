"""The GPU check script runs end to end in its CPU ``--smoke`` mode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
