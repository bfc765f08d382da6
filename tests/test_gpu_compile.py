"""Every kernel compiles for a Hopper (sm_90) target, checked without a GPU: the interpreter the
other tests run under accepts programs the GPU compiler rejects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


# fp32: the forward's tiles are 128 wide, as a softcap's dX tiles: one sparse dW/dH width
@pytest.mark.parametrize(("dtype", "loads", "kernels"),
                         [("bf16", "", 16), ("fp32", "", 14), ("bf16", "--tma", 17)])
def test_kernels_compile_for_sm90(dtype, loads, kernels):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), dtype, loads], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok  ") == kernels, run.stdout
