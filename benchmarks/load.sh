#!/usr/bin/env bash
# A department's day through the node (benchmarks/load.py): mixed studies from concurrent senders, end to end.
#   benchmarks/load.sh                 24 studies, 6 senders, 3 repeats: ingest, zero-latency model, demo model
#                                      with 1 and 2 analysis threads and batches of 4 (about 15 minutes)
#   benchmarks/load.sh --quick         smaller studies (a smoke run)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup
.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/python -m pip install -q -e '.[bench]'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SPINEMED_DEMO_MODEL="$PWD/.models/demo"
exec .venv/bin/python benchmarks/load.py "$@"
