#!/usr/bin/env bash
# What a lent GPU runs, from a copy of the committed tree (benchmarks/RESULTS.md says how):
# install the package without its dependencies (the device image has torch and triton), run
# gpu_check with the sweep, then, in the time left, `pytest benchmarks --benchmark-only` (with
# Liger-Kernel and Cut Cross-Entropy when WHEELS names a folder of their wheels). The logs and
# gpu_check's JSON + markdown land in $OUT.
#
#   WHEELS=$PWD/.whl bash .gpurun/benchmarks/run_on_device.sh [gpu_check arguments]
#
# LIMIT (default 560 s) bounds the whole script, inside the device's 600 s per call;
# GPU_CHECK_SECONDS (default 450) bounds gpu_check alone. Exit status: gpu_check's if it failed
# (124: out of time), else the benchmarks'.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
mkdir -p "${OUT:-.}" && out="$(cd "${OUT:-.}" && pwd)" || exit 1
limit="${LIMIT:-560}"
# The baselines are optional: without them their rows are missing, which the log says.
if ! compgen -G "${WHEELS:-/nonexistent}/*.whl" > /dev/null; then
    echo "WARNING: no wheels in WHEELS=${WHEELS:-(unset)}: no Liger-Kernel / CCE rows"
elif python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "baselines installed: $(cd "$WHEELS" && echo *.whl)"
else
    echo "WARNING: the wheels in $WHEELS did not install: no Liger-Kernel / CCE rows"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
(cd benchmarks && PYTHONUNBUFFERED=1 timeout "${GPU_CHECK_SECONDS:-450}" \
    python3 gpu_check.py --sweep "$@" 2>&1 | tee "$out/log.txt")
check=$?
echo "gpu_check: exit $check after $SECONDS s"
bench=0
left=$((limit - SECONDS))
if [ "$left" -gt 90 ]; then
    # SIGINT: pytest ends the session and still writes the JSON of what finished
    PYTHONUNBUFFERED=1 timeout -s INT -k 20 "$((left - 20))" python3 -m pytest benchmarks \
        --benchmark-only -q -p no:cacheprovider --benchmark-json "$out/bench.json" 2>&1 \
        | tee "$out/bench.txt"
    bench=$?
    echo "benchmarks: exit $bench after $SECONDS s"
else
    echo "benchmarks: skipped, $left s left"
fi
exit $((check ? check : bench))
