#!/usr/bin/env bash
# What a lent GPU runs, from a copy of the committed tree (benchmarks/RESULTS.md says how):
# install the package without its dependencies (the device image has torch and triton), then
# gpu_check with the sweep; the log and gpu_check's JSON + markdown land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation -e .
cd benchmarks
PYTHONUNBUFFERED=1 timeout "${GPU_CHECK_SECONDS:-500}" python3 gpu_check.py --sweep "$@" 2>&1 \
    | tee "${OUT:-.}/log.txt"
