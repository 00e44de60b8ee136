#!/usr/bin/env bash
# GPU throughput check of the Qwen2.5-VL-7B architecture (random bf16 weights; no download).
# Run from anywhere on the GPU machine:  bash benchmarks/gpu_check.sh        (about 2-4 minutes)
# CPU smoke test of the same script:    bash benchmarks/gpu_check.sh --smoke
# Batch sizes 1/2/4/8 (studies/hour per size, static cache + compiled step; skips sizes past a 420 s
# budget):                               bash benchmarks/gpu_check.sh --batch 1,2,4,8 --json-out batch.json
# ... and its CPU smoke test:            bash benchmarks/gpu_check.sh --smoke --batch 1,2,4
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 470 "$PY" benchmarks/gpu_check.py "$@"
