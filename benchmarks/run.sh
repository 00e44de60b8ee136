#!/usr/bin/env bash
# Reproduce every figure in benchmarks/README.md (about 7 minutes on 2 cores after scripts/setup).
#   benchmarks/run.sh            full run
#   benchmarks/run.sh --quick    smaller studies
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup
.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/python -m pip install -q -e '.[bench]'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SPINEMED_DEMO_MODEL="$PWD/.models/demo"
exec .venv/bin/python benchmarks/bench.py "$@"
