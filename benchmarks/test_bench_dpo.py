"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only``.

One DPO step (policy forward + backward, reference under no_grad) and the per-token log-prob op,
on the same inputs in one process, for every path installed here:

- ``naive``: TRL's way (logits by ``F.linear`` in the input dtype, fp32 log-softmax, gather);
  ``naive_wpo`` adds TRL's WPO pair weights (a second logsumexp, of 2z), ``hypo_fast_wpo``
  is the module with ``use_weighting=True``;
- ``hypo_fast``: :class:`hypo_fast.losses.FusedLinearDPOLoss` / :func:`hypo_fast.ops.linear_logprob`
  on their default backend (triton on CUDA; on the CPU the reference, until the C++ backend),
  with the default gradient filter; ``hypo_fast_exact``: the log-probs with ``filter_eps=None``;
- ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (``compiled=False`` on the CPU);
- ``cce`` / ``cce_exact``: Cut Cross-Entropy's ``linear_cross_entropy(reduction="none")`` with
  its default gradient filter / exact (CUDA only).

Shapes: on CUDA the Llama-3-8B head (d 4096, V 128256), 4 pairs x 1024 tokens, half prompt; on the
CPU a small head (d 256, V 8000), 2 pairs x 256 tokens. Inputs follow DESIGN.md §5 (mean entropy
~3 nats). Compare the rows of one run (same machine, same inputs): ratios, not absolute times.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from baselines import logprob_of_logits, naive_logprob, realistic_inputs

from hypo_fast.losses import FusedLinearDPOLoss
from hypo_fast.objectives import dpo_loss
from hypo_fast.ops import linear_logprob

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
PAIRS, SEQ, D, V = (4, 1024, 4096, 128256) if CUDA else (2, 256, 256, 8000)
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAS_CCE = CUDA and importlib.util.find_spec("cut_cross_entropy") is not None


@pytest.fixture(scope="module")
def batch():
    """Policy and reference heads and a padded pair batch ``[2P, T, d]``, chosen rows first."""
    n = 2 * PAIRS * SEQ
    hidden, weight, labels, _ = realistic_inputs(n, D, V, DTYPE, DEVICE, prompt_fraction=0.5)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    noise = torch.randn(weight.shape, generator=g, device=DEVICE, dtype=torch.float32)
    ref_weight = (weight.float() * (1 + 0.02 * noise)).to(DTYPE)
    shape = (2 * PAIRS, SEQ)
    return (hidden.reshape(*shape, D), weight, ref_weight, labels.reshape(shape))


def run(benchmark, step):
    """Time ``step`` (which returns its gradients) with the device synchronised inside the
    timing; on CUDA also record its peak memory above what was allocated before it (inputs,
    gradients included) as ``extra_info["peak_mib"]``."""

    def timed():
        out = step()
        if CUDA:
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(timed, rounds=5 if CUDA else 10, iterations=1, warmup_rounds=1)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads = timed()
        benchmark.extra_info["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del grads


def naive_dpo(hidden, weight, ref_weight, labels):
    """TRL: per-sequence summed log-probs from materialised logits, sigmoid DPO."""
    seq = naive_logprob(hidden, weight, labels).sum(-1)
    with torch.no_grad():
        ref = naive_logprob(hidden, ref_weight, labels).sum(-1)
    return dpo_loss(seq[:PAIRS], seq[PAIRS:], ref[:PAIRS], ref[PAIRS:])[0]


def naive_wpo_dpo(hidden, weight, ref_weight, labels):
    """TRL main's ``use_weighting``: each pair's sigmoid DPO loss times exp(m_w + m_l), m the token
    mean of log π(y_t) − (logsumexp(2z) − 2·logsumexp(z)) from the same logits, no grad."""
    logits = torch.nn.functional.linear(hidden, weight).float()
    logp = logprob_of_logits(logits, labels)
    with torch.no_grad():
        valid = labels != -100
        log_denom = torch.logsumexp(2.0 * logits, -1) - 2.0 * torch.logsumexp(logits, -1)
        m = ((logp - log_denom) * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        weights = torch.exp(m[:PAIRS] + m[PAIRS:])
        ref = naive_logprob(hidden, ref_weight, labels).sum(-1)
    seq = logp.sum(-1)
    return dpo_loss(seq[:PAIRS], seq[PAIRS:], ref[:PAIRS], ref[PAIRS:], pair_weights=weights)[0]


def dpo_step(path, hidden, weight, ref_weight, labels):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if path == "naive":
        loss = naive_dpo(h, w, ref_weight, labels)
    elif path == "naive_wpo":
        loss = naive_wpo_dpo(h, w, ref_weight, labels)
    elif path.startswith("hypo_fast"):
        module = FusedLinearDPOLoss(use_weighting=path == "hypo_fast_wpo")
        loss = module(w, h, labels, ref_input=hidden, ref_weight=ref_weight)[0]
    else:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(compiled=CUDA)
        loss = liger(w, h, labels, ref_input=hidden, ref_weight=ref_weight)[0]
    loss.backward()
    return h.grad, w.grad


DPO_PATHS = ["naive", "hypo_fast"] + (["liger"] if HAS_LIGER else [])


@pytest.mark.parametrize("path", DPO_PATHS)
def test_dpo_step(benchmark, batch, path):
    benchmark.group = f"DPO step {2 * PAIRS}x{SEQ} d={D} V={V} {str(DTYPE)[6:]} {DEVICE}"
    run(benchmark, lambda: dpo_step(path, *batch))


def logprob_step(path, hidden, weight, labels):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if path == "naive":
        logp = naive_logprob(h, w, labels)
    elif path in ("hypo_fast", "hypo_fast_exact"):
        filter_eps = "auto" if path == "hypo_fast" else None
        logp = linear_logprob(h, w, labels, filter_eps=filter_eps).logp
    else:
        from cut_cross_entropy import linear_cross_entropy

        # CCE's default gradient filter (whatever its release names it) or its exact path
        exact = {"filter_eps": None} if path == "cce_exact" else {}
        logp = -linear_cross_entropy(h, w, labels, reduction="none", **exact)
    logp.sum().backward()
    return h.grad, w.grad


LOGPROB_PATHS = ["naive", "hypo_fast", "hypo_fast_exact"] + (["cce", "cce_exact"] if HAS_CCE
                                                              else [])


@pytest.mark.parametrize("path", LOGPROB_PATHS)
def test_logprob_fwd_bwd(benchmark, batch, path):
    hidden, weight, _, labels = batch
    benchmark.group = f"per-token log-probs fwd+bwd {labels.numel()} tokens {DEVICE}"
    run(benchmark, lambda: logprob_step(path, hidden, weight, labels))


@pytest.mark.parametrize("path", ["naive_wpo", "hypo_fast_wpo"])
def test_wpo_dpo_step(benchmark, batch, path):
    """The DPO step with WPO's pair weights (TRL's ``use_weighting``): the naive path takes a
    second logsumexp over its logits, the fused forward one more multiply-add per logit. Last
    in the file: a lease short of time cuts this group, not the established ones."""
    benchmark.group = f"WPO DPO step {2 * PAIRS}x{SEQ} d={D} V={V} {str(DTYPE)[6:]} {DEVICE}"
    run(benchmark, lambda: dpo_step(path, *batch))
