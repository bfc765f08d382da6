#!/usr/bin/env bash
# The kernel tests against the compiled kernels, on a lent GPU, from a copy of the committed tree
# (benchmarks/RESULTS.md says how to make one). There TRITON_INTERPRET is unset, so
# tests/kernel_helpers.py puts the tensors on cuda and hypothesis draws CI's examples.
#
#   bash .gpurun/tests/gpu_run.sh [test files; default: the kernel test files, the losses'
#                                   and the Hugging Face DPO step's]
#
# LIMIT (default 300 s) bounds pytest; SIGINT at the limit still writes the summary and
# $OUT/junit.xml. The log is $OUT/tests.txt. Exit status: pytest's (124: out of time).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
mkdir -p "${OUT:-.}" && out="$(cd "${OUT:-.}" && pwd)" || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
unset TRITON_INTERPRET
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(tests/test_linear_logprob.py tests/test_linear_kl.py
                                 tests/test_filter.py tests/test_ops_robustness.py
                                 tests/test_losses.py tests/test_hf_models.py)
CI=1 PYTHONUNBUFFERED=1 timeout -s INT -k 20 "${LIMIT:-300}" python3 -m pytest -q \
    -p no:cacheprovider -n "$(nproc)" --junitxml "$out/junit.xml" "${files[@]}" \
    > "$out/tests.txt" 2>&1
status=$?
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.txt" | tail -60
exit $status
