"""``benchmarks/gpu_check.py --dry``: the GPU check runs every section without a GPU (kernels
interpreted, small shapes), so a lease is never spent on a script that breaks half-way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SECTIONS = ("correctness", "matmul-rate", "timings", "kl-correctness", "kl-timings", "filtered",
            "kl-filtered", "losses", "profile", "overhead", "sweep")


def test_every_section_of_the_gpu_check_runs_dry(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(tmp_path)}
    env.pop("HYPO_FAST_TMA", None)
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--sweep"], capture_output=True,
                         text=True, env=env, timeout=900, cwd=SCRIPT.parent)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    for section in SECTIONS:
        assert f"[{section}] " in log, section
    assert "FAILED" not in log and "errors in" not in log
    table = (tmp_path / "gpu_check.md").read_text()
    assert "fastest forward:" in table and "| dpo |" in table and "| 2.0 |" in table
