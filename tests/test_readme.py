"""The README's Python examples run as written (the drop-in snippet with the names it assumes
defined), and its quick-start commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_usage_example_runs_and_trains():
    usage = blocks("python")[0]
    scope: dict = {}
    exec(compile(usage, "README.md (usage)", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["loss"].ndim == 0
    assert scope["hidden"].grad is not None and scope["hidden"].grad.abs().sum() > 0


def test_drop_in_example_runs():
    drop_in = blocks("python")[1]
    torch.manual_seed(0)
    pairs, length, d, vocab = 2, 12, 32, 100
    labels = torch.randint(0, vocab, (2 * pairs, length))
    labels[:, :4] = -100
    scope = {
        "lm_head": nn.Linear(d, vocab, bias=False),
        "ref_lm_head": nn.Linear(d, vocab, bias=False).requires_grad_(False),
        "hidden": torch.randn(2 * pairs, length, d, requires_grad=True),
        "ref_hidden": torch.randn(2 * pairs, length, d),
        "labels": labels,
    }
    exec(compile(drop_in, "README.md (drop-in)", "exec"), scope)
    loss = scope["loss"]
    assert torch.isfinite(loss) and loss.ndim == 0
    assert scope["chosen_logps"].shape == (pairs,)
    loss.backward()
    assert scope["lm_head"].weight.grad.abs().sum() > 0


def test_quick_start_commands_are_what_ci_runs():
    install, tests = (line.split("#")[0].strip() for line in blocks("bash")[0].splitlines())
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.split("&&")[0].strip() in ci
    assert re.search(rf"^\s*{re.escape(tests)}\b", ci, flags=re.MULTILINE)


def test_trainer_example_runs():
    from hf_helpers import reset_accelerate, tiny_llama

    trainer_example = blocks("python")[2]
    policy = tiny_llama(False, torch.float32)
    g = torch.Generator().manual_seed(0)
    pairs = [{key: torch.randint(1, 96, (n,), generator=g).tolist()
              for key, n in (("prompt_ids", 3), ("chosen_ids", 4), ("rejected_ids", 2))}
             for _ in range(8)]
    scope = {"policy": policy, "reference": tiny_llama(False, torch.float32),
             "pairs": pairs}
    reset_accelerate()
    try:
        exec(compile(trainer_example, "README.md (trainer)", "exec"), scope)
    finally:
        reset_accelerate()
    assert len(scope["history"]) == 2 and all(
        torch.isfinite(torch.tensor(h["loss"])) for h in scope["history"])
