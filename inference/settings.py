"""Model settings: the ``[model]`` table of the node's config file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from inference.inputs import Task

__all__ = ["ModelSettings", "OpenAISettings"]


class OpenAISettings(BaseModel):
    """An OpenAI-compatible chat-completions server (vLLM, ``transformers serve``)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="server URL ending in /v1")
    model: str = Field(default="spinegpt", description="model name the server serves")
    api_key_env: str = Field(default="SPINEMED_OPENAI_API_KEY", description="env var holding the API key")
    timeout_s: float = Field(default=300.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)


class ModelSettings(BaseModel):
    """Which model runs, where its weights are, and how it decodes."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["demo", "transformers", "openai"] = "demo"
    path: Path | None = Field(
        default=None,
        description="weights directory (transformers) or where the demo model is built (demo); "
        "default for demo: <data_dir>/models/demo",
    )
    hub_id: str | None = Field(default=None, description="hub id instead of path (offline cache only)")
    revision: str | None = Field(default=None, description="model revision recorded in the SR")
    device: str = Field(default="auto", description='"auto", "cpu", "cuda", "cuda:1"')
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    task: Task = Task.STRUCTURED_REPORT
    max_new_tokens: int = Field(default=1200, ge=16, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 = greedy")
    seed: int = 0
    max_images: int = Field(default=6, ge=1, le=16)
    image_size: int = Field(default=448, ge=56, le=1344, description="longest side in px, multiple of 28")
    timeout_s: float = Field(default=900.0, gt=0)
    max_batch: int = Field(
        default=1, ge=1, le=64,
        description="transformers/demo: studies decoded together in one generate (each with its own grammar); "
        "they come from [worker] analysis_threads, so set that at least as high",
    )
    batch_wait_ms: float = Field(
        default=100.0, ge=0, le=10_000,
        description="with max_batch > 1: how long the model, when free, waits for a fuller batch before decoding",
    )
    static_cache: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="static KV cache with a compiled decoding step; auto = on for CUDA "
        "(H200: 120-144 vs 11-19 tokens/s eager, benchmarks/README.md)",
    )
    max_cache_len: int = Field(
        default=8192, ge=256, le=131072, description="static cache size: prompt + max_new_tokens must fit"
    )
    process: bool = Field(
        default=False,
        description="run the transformers/demo model in its own process so the worker's other threads never hold "
        "up its decoding loop (GIL); the openai backend ignores it",
    )
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
