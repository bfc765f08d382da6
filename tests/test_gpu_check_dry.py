"""``benchmarks/gpu_check.py --dry``: the GPU check runs every section without a GPU (kernels
interpreted, small shapes), so a lease is never spent on a script that breaks half-way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
LAUNCHER = Path(__file__).resolve().parent / "fast_interpreter.py"
SECTIONS = ("correctness", "matmul-rate", "timings", "kl-correctness", "kl-timings", "filtered",
            "kl-filtered", "losses", "profile", "overhead", "sweep", "kl-sweep")


def dry_run(tmp_path, *args: str) -> str:
    """The script's log, run dry with ``args``; it must succeed."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(tmp_path)}
    env.pop("HYPO_FAST_TMA", None)
    run = subprocess.run([sys.executable, str(LAUNCHER), str(SCRIPT), "--dry", *args],
                         capture_output=True, text=True, env=env, timeout=900, cwd=SCRIPT.parent)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    return log


def test_every_section_of_the_gpu_check_runs_dry(tmp_path):
    log = dry_run(tmp_path, "--sweep")
    for section in SECTIONS:
        assert f"[{section}] " in log, section
    assert "FAILED" not in log and "errors in" not in log
    table = (tmp_path / "gpu_check.md").read_text()
    assert "fastest forward:" in table and "| dpo |" in table and "| 2.0 |" in table
    assert table.count("ours, dX chunk 192 MiB (no budget)") == 1  # the all-valid row only
    assert "| llama3-8b KL | 256 (256) | bfloat16 |  | input validation |" in table
    # issue 4's forward at each GROUP_M on kl-timings' own inputs, pointer loads not among them
    assert table.count("| KL public forward, kl-timings inputs |") == 5
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    # the dry shapes leave tokens to score (every token of a 256-token run was once a prompt)
    assert all(row["N_valid"] > 0 for row in results["timings"] + results["filtered"])
    collision = [row["collision_err"] for row in results["checks"]
                 if row.get("collision_err") is not None]
    assert collision and all(err < 1e-2 for err in collision), collision


def test_only_runs_the_named_sections_and_the_matmul_rate(tmp_path):
    log = dry_run(tmp_path, "--only", "profile, sweep")
    ran = {section for section in SECTIONS if f"[{section}] " in log}
    assert ran == {"matmul-rate", "profile", "sweep"}, ran
    assert "| kind | BM | BN | BK | GROUP_M |" in (tmp_path / "gpu_check.md").read_text()


def test_rounds_time_each_group_m_of_the_public_kl_forward_round_robin(tmp_path):
    dry_run(tmp_path, "--only", "kl-sweep", "--rounds", "2")
    sweep = json.loads((tmp_path / "gpu_check.json").read_text())["sweep"]
    groups = [row["GROUP_M"] for row in sweep if row["kind"] == "KL public forward"]
    assert groups == [2, 4, 8, 16, 32] * 2, groups


def test_only_refuses_a_section_it_does_not_have(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(tmp_path)}
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--only", "kl_timings"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=SCRIPT.parent)
    assert run.returncode == 2 and "no section kl_timings" in run.stderr, run.stderr
