"""The public losses (hypo_fast.losses) against objectives.py composed with naive log-softmax.

Every expected value here is built independently of hypo_fast.losses: full logits ``H W^T + b``,
``log_softmax``, gather, mask, per-sequence sums, then the objective of hypo_fast.objectives.
Values, metrics and gradients (input, weight, bias, masks) are compared in fp64 (the reference
backend computes in fp64 for fp64 inputs), tightly. The triton backend (on DEVICE: the GPU, or
interpreted on the CPU) is exercised on a few tiny cases. Equality with Liger-Kernel is in
test_losses_liger.py.
"""

from __future__ import annotations

import copy
import inspect
import math
import pickle
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import CPU, DEVICE, needs_triton, on
from torch import nn

from hypo_fast import losses, objectives
from hypo_fast.losses import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    LIGER_AUX_FIELDS,
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
    FusedLinearSparsePOLoss,
    HPOLoss,
    HyPOLoss,
)
from hypo_fast.losses.pairs import ld_token_weights

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
IGN = -100
SMOOTHING = {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 0.05}


# ---------------------------------------------------------------------------------------------
# data and the independent composition


@dataclass
class Pairs:
    """A padded pair batch: h [2B, T, d], y [2B, T] (prompt and ragged padding ignored), policy
    head (w, b) and reference (rh, rw, rb)."""

    h: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None
    y: torch.Tensor
    rh: torch.Tensor
    rw: torch.Tensor
    rb: torch.Tensor | None

    @property
    def num_pairs(self) -> int:
        return self.h.shape[0] // 2

    def leaves(self) -> Pairs:
        """A copy whose policy tensors are fresh leaves requiring grad."""
        fresh = [t.detach().clone().requires_grad_(True) if t is not None else None
                 for t in (self.h, self.w, self.b)]
        return replace(self, h=fresh[0], w=fresh[1], b=fresh[2])

    def grads_of(self, loss: torch.Tensor, *extra: torch.Tensor) -> list[torch.Tensor]:
        inputs = [t for t in (self.h, self.w, self.b) if t is not None] + list(extra)
        return list(torch.autograd.grad(loss, inputs))


def make_pairs(B=2, T=7, d=8, V=16, *, bias=True, dtype=F64, seed=0, prompt=2,
               device=CPU) -> Pairs:
    """Drawn on the CPU (the same values on every device), made on ``device``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, :prompt] = IGN
    for i in range(2 * B):  # ragged completions: row i loses i % 3 trailing tokens to padding
        if i % 3:
            y[i, T - i % 3:] = IGN
    return Pairs(
        h=rand(2 * B, T, d), w=rand(V, d, scale=2 / d**0.5), b=rand(V, scale=0.5) if bias else None,
        y=y.to(device), rh=rand(2 * B, T, d), rw=rand(V, d, scale=2 / d**0.5),
        rb=rand(V, scale=0.5) if bias else None,
    )


def logits(h, w, b):
    z = h @ w.T
    return z if b is None else z + b


def token_logps(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(z, -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(y != IGN, lp, torch.zeros_like(lp))


def row_stats(h, w, b, y):
    """Per-row (Σ logp, count) of a padded batch."""
    return token_logps(logits(h, w, b), y).sum(-1), (y != IGN).sum(-1).to(h.dtype)


def signature_defaults(fn) -> dict:
    """The parameters of ``fn`` that have a default, with it."""
    return {k: v.default for k, v in inspect.signature(fn).parameters.items()
            if v.default is not inspect.Parameter.empty}


def halves(t):
    n = t.shape[0] // 2
    return t[:n], t[n:]


def expected_logps(p: Pairs, *, average=False, ref=True):
    """(policy logps [2B], reference logps [2B] or None, sums, counts)."""
    sums, counts = row_stats(p.h, p.w, p.b, p.y)
    per = (lambda s, n: s / n.clamp(min=1)) if average else (lambda s, n: s)
    ref_logps = None
    if ref:
        with torch.no_grad():
            ref_logps = per(*row_stats(p.rh, p.rw, p.rb, p.y))
    return per(sums, counts), ref_logps, sums, counts


def expected_nll(sums, counts):
    s, _ = halves(sums)
    n, _ = halves(counts)
    return -s.sum() / n.sum().clamp(min=1)


def assert_metrics(aux, want: dict, keys=None):
    for k in keys or want:
        torch.testing.assert_close(aux.metrics[k].to(F64), want[k].detach().to(F64),
                                   msg=lambda m, k=k: f"metric {k}: {m}")


def assert_same(got_loss, got_grads, want_loss, want_grads):
    torch.testing.assert_close(got_loss, want_loss)
    assert len(got_grads) == len(want_grads)
    for i, (g, e) in enumerate(zip(got_grads, want_grads, strict=True)):
        torch.testing.assert_close(g, e, msg=lambda m, i=i: f"gradient {i}: {m}")


def call(module, p: Pairs, **kwargs):
    return module(p.w, p.h, p.y, p.b, p.rh, p.rw, p.rb, **kwargs)


# ---------------------------------------------------------------------------------------------
# DPO family


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_every_loss_type_matches_objectives(loss_type, average):
    eps = SMOOTHING.get(loss_type, 0.0)
    p = make_pairs(seed=DPO_LOSS_TYPES.index(loss_type)).leaves()
    module = FusedLinearDPOLoss(beta=0.3, loss_type=loss_type, label_smoothing=eps,
                                compute_nll_loss=True, alpha=0.7, average_log_prob=average)
    loss, aux = call(module, p)

    logps, ref, sums, counts = expected_logps(p, average=average)
    n = torch.ones_like(counts) if average else counts
    want, metrics = objectives.dpo_loss(
        *halves(logps), *halves(ref), beta=0.3, loss_type=loss_type, label_smoothing=eps,
        chosen_counts=halves(n)[0], rejected_counts=halves(n)[1],
    )
    nll = expected_nll(sums, counts)
    want = want + 0.7 * nll
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))
    metrics.update(nll_loss=nll)
    assert_metrics(aux, metrics)
    assert len(aux) == len(LIGER_AUX_FIELDS)
    for i, name in enumerate(LIGER_AUX_FIELDS):
        assert aux[i] is aux.metrics[name]
        assert not aux[i].requires_grad


@pytest.mark.parametrize(
    "options",
    [{"f_divergence_type": f} for f in F_DIVERGENCE_TYPES]
    + [{"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
       {"clip_ref_margin": True}, {"clip_ref_margin": True, "loss_type": "ipo"},
       {"loss_type": "discopop", "discopop_tau": 0.5}],
)
def test_dpo_modifiers_match_objectives(options):
    p = make_pairs(seed=11).leaves()
    loss, aux = call(FusedLinearDPOLoss(beta=0.2, **options), p)
    logps, ref, _, counts = expected_logps(p)
    want, metrics = objectives.dpo_loss(*halves(logps), *halves(ref), beta=0.2,
                                        chosen_counts=halves(counts)[0],
                                        rejected_counts=halves(counts)[1], **options)
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))
    assert_metrics(aux, metrics)


def test_dpo_logits_means_are_liger_definition():
    """Mean of H W^T + b over all tokens (ignored included) × vocabulary of each half."""
    p = make_pairs(B=3, T=5, V=24, seed=3)
    _, aux = call(FusedLinearDPOLoss(), p)
    z = logits(p.h, p.w, p.b)
    torch.testing.assert_close(aux[2].double(), z[:3].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux[3].double(), z[3:].mean(), rtol=1e-5, atol=1e-6)
    assert aux[2].dtype == F32
    _, aux = call(FusedLinearDPOLoss(), replace(p, b=None, rb=None))
    torch.testing.assert_close(aux[2].double(), (p.h[:3] @ p.w.T).mean(), rtol=1e-5, atol=1e-6)
    # hidden states as a view of a longer buffer (read in place): the same means
    wide = torch.zeros(p.h.shape[0], p.h.shape[1] + 1, p.h.shape[2], dtype=p.h.dtype)
    wide[:, 1:] = p.h.detach()
    _, aux_view = call(FusedLinearDPOLoss(), replace(p, h=wide[:, 1:]))
    _, aux = call(FusedLinearDPOLoss(), p)
    torch.testing.assert_close(aux_view[2:4], aux[2:4])


def test_logits_means_of_a_half_with_no_token_are_zero():
    """Packed, every chosen sequence empty: the chosen mean is 0 (not NaN, not mean(b)), the
    rejected one the mean over the rejected tokens."""
    p = make_pairs(B=1, T=5, V=24, seed=4)
    h, y = p.h[1], p.y[1].clone()
    y[2] = 3  # a token to score
    _, aux = FusedLinearSimPOLoss()(p.w, h, y, p.b, cu_seqlens=torch.tensor([0, 0, 5]))
    assert aux[2].item() == 0.0
    torch.testing.assert_close(aux[3].double(), logits(h, p.w, p.b).mean(), rtol=1e-5,
                               atol=1e-6)


def test_logits_means_do_not_overflow_fp16():
    """Hidden states of ~8 over 2 x 8192 chosen tokens: their sum overflows fp16 (was NaN)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 8192, 8, generator=g) + 8.0
    w = torch.randn(16, 8, generator=g) / 8
    y = torch.randint(0, 16, (4, 8192), generator=g)
    _, aux = FusedLinearSimPOLoss()(w.half(), h.half(), y)
    z = h.half().double() @ w.half().double().T
    # the half's mean hidden state rounded to fp16: ~5e-4 of each logit's magnitude
    for mean, half in zip(aux[2:4], (z[:2], z[2:]), strict=True):
        torch.testing.assert_close(mean.double(), half.mean(), rtol=0,
                                   atol=1e-3 * float(half.abs().mean()))


def test_dpo_precomputed_reference_equals_reference_head():
    p = make_pairs(seed=5).leaves()
    module = FusedLinearDPOLoss(beta=0.5, average_log_prob=True)
    loss, aux = call(module, p)
    _, ref, _, _ = expected_logps(p, average=True)
    # given log-probs that require grad: the reference is frozen, no gradient reaches them
    ref_w, ref_l = ref[:2].detach().requires_grad_(), ref[2:].detach().requires_grad_()
    loss2, aux2 = module(p.w, p.h, p.y, p.b, ref_chosen_logps=ref_w, ref_rejected_logps=ref_l)
    assert torch.autograd.grad(loss2, (ref_w, ref_l), retain_graph=True,
                               allow_unused=True) == (None, None)
    assert_same(loss2, p.grads_of(loss2), loss, p.grads_of(loss))
    for a, b in zip(aux, aux2, strict=True):
        torch.testing.assert_close(a, b)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_reference_logps_are_what_forward_scores_with_the_reference_head(data):
    """Any shape (all-ignored rows included), average_log_prob, LD-DPO weights, padded or
    packed, fp32 or fp64: reference_logps gives the reference log-probs forward uses, so that
    passing them back gives forward's loss, gradients and metrics."""
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    p = make_pairs(B=B, T=T, seed=data.draw(st.integers(0, 2**16)),
                   prompt=data.draw(st.integers(0, T)),
                   dtype=data.draw(st.sampled_from([F64, torch.float32]))).leaves()
    average = data.draw(st.booleans())
    module = FusedLinearDPOLoss(beta=0.3, average_log_prob=average,
                                ld_alpha=data.draw(st.sampled_from([None, 0.0, 0.4])),
                                loss_type=data.draw(st.sampled_from(["sigmoid", "ipo"])))
    layout, ref_args = {}, (p.rw, p.rh, p.y, p.rb)
    if data.draw(st.booleans(), label="packed"):  # the rows as one stream, padding included
        flat = [t.reshape(-1, t.shape[-1]) for t in (p.h, p.rh)]
        p = replace(p, h=flat[0].detach().requires_grad_(True), y=p.y.reshape(-1), rh=flat[1])
        layout, ref_args = {"cu_seqlens": torch.arange(0, 2 * B * T + 1, T)}, (
            p.rw, p.rh, p.y, p.rb)
    ref_w, ref_l = module.reference_logps(*ref_args, **layout)
    want_ref = expected_logps(replace(p, h=p.rh, w=p.rw, b=p.rb), average=average)[0] if (
        not layout and module.ld_alpha is None) else None
    if want_ref is not None:
        torch.testing.assert_close(torch.cat([ref_w, ref_l]), want_ref.to(ref_w.dtype))
    assert ref_w.shape == ref_l.shape == (B,) and not ref_w.requires_grad
    loss, aux = module(p.w, p.h, p.y, p.b, p.rh, p.rw, p.rb, **layout)
    again, aux2 = module(p.w, p.h, p.y, p.b, ref_chosen_logps=ref_w, ref_rejected_logps=ref_l,
                         **layout)
    assert_same(again, p.grads_of(again), loss, p.grads_of(loss))
    for k, v in aux.metrics.items():
        torch.testing.assert_close(aux2.metrics[k], v, msg=k)


def test_reference_logps_refuse_losses_that_cannot_take_them():
    p = make_pairs(seed=7)
    for module, message in [
        (FusedLinearDPOLoss(use_ref_model=False), "uses no reference model"),
        (FusedLinearSimPOLoss(), "uses no reference model"),
        (FusedLinearSparsePOLoss(), "needs the reference head in forward"),
    ]:
        with pytest.raises(ValueError, match=message):
            module.reference_logps(p.rw, p.rh, p.y, p.rb)


def test_dpo_without_reference_model():
    p = make_pairs(seed=6).leaves()
    loss, aux = FusedLinearDPOLoss(use_ref_model=False, loss_type="hinge")(
        p.w, p.h, p.y, p.b, p.rh, p.rw, p.rb  # ignored, as in Liger
    )
    logps, _, _, _ = expected_logps(p, ref=False)
    want, metrics = objectives.dpo_loss(*halves(logps), loss_type="hinge")
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))
    assert_metrics(aux, metrics)
    assert float(aux.metrics["nll_loss"]) == 0.0


def test_sequence_without_completion_tokens_counts_as_zero():
    """Counts clamp at 1: an all-ignored sequence has log-prob 0 (Liger: NaN with averaging)."""
    p = make_pairs(seed=8)
    p.y[1] = IGN
    p = p.leaves()
    loss, aux = call(FusedLinearDPOLoss(average_log_prob=True, compute_nll_loss=True), p)
    assert aux[0][1] == 0.0 and torch.isfinite(aux[0]).all()
    logps, ref, sums, counts = expected_logps(p, average=True)
    want = objectives.dpo_loss(*halves(logps), *halves(ref))[0] + expected_nll(sums, counts)
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))


def test_liger_only_arguments_are_ignored():
    p = make_pairs(seed=7)
    base, _ = call(FusedLinearDPOLoss(), p)
    other, _ = call(FusedLinearDPOLoss(compiled=False, chunk_size=3), p)
    torch.testing.assert_close(other, base, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# SimPO, CPO, ORPO


@pytest.mark.parametrize("nll", [True, False])
def test_simpo_matches_objectives(nll):
    p = make_pairs(seed=21).leaves()
    module = FusedLinearSimPOLoss(beta=2.0, gamma=0.4, label_smoothing=0.1, alpha=0.5,
                                  compute_nll_loss=nll)
    loss, aux = module(p.w, p.h, p.y, p.b)
    _, _, sums, counts = expected_logps(p, ref=False)
    chosen_nll = expected_nll(sums, counts)
    want, metrics = objectives.simpo_loss(*halves(sums), *halves(counts), beta=2.0, gamma=0.4,
                                          label_smoothing=0.1, sft_weight=0.5 if nll else 0.0)
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))
    assert_metrics(aux, metrics, ["chosen_rewards", "rejected_rewards", "margins", "accuracy"])
    torch.testing.assert_close(aux[0], halves(sums / counts)[0])  # Liger reports A, not S
    torch.testing.assert_close(aux[4], chosen_nll if nll else torch.zeros((), dtype=F64))


@pytest.mark.parametrize("average", [False, True])
def test_cpo_matches_objectives(average):
    p = make_pairs(seed=22).leaves()
    module = FusedLinearCPOLoss(beta=0.3, alpha=2.0, label_smoothing=0.2,
                                average_log_prob=average)
    loss, aux = module(p.w, p.h, p.y, p.b)
    logps, _, sums, counts = expected_logps(p, average=average, ref=False)
    nll = expected_nll(sums, counts)
    want, metrics = objectives.cpo_loss(*halves(logps), nll, beta=0.3, alpha=2.0,
                                        label_smoothing=0.2)
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))
    assert_metrics(aux, metrics)


@pytest.mark.parametrize("nll_target", [False, True])
def test_orpo_matches_objectives(nll_target):
    p = make_pairs(seed=23, prompt=1).leaves()
    target = None
    _, _, sums, counts = expected_logps(p, ref=False)
    nll = expected_nll(sums, counts)
    if nll_target:  # NLL on other labels: the full chosen rows, prompt included
        target = torch.randint(0, p.w.shape[0], p.y.shape, generator=torch.Generator())
        target[:, :1] = IGN
        nll = expected_nll(*row_stats(p.h, p.w, p.b, target))
    loss, aux = FusedLinearORPOLoss(beta=0.25)(p.w, p.h, p.y, p.b, target)
    want, metrics = objectives.orpo_loss(*halves(sums), *halves(counts), beta=0.25,
                                         chosen_nll=nll)
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))
    del metrics["chosen_logps"], metrics["rejected_logps"]  # Liger reports A, not S
    assert_metrics(aux, metrics)
    torch.testing.assert_close(aux[1], halves(sums / counts)[1])
    torch.testing.assert_close(aux[4], nll)
    assert len(aux) == 9
    assert aux[7] is aux.metrics["log_odds_ratio"] and aux[8] is aux.metrics["log_odds_chosen"]


def test_orpo_without_nll():
    p = make_pairs(seed=24, bias=False).leaves()
    loss, aux = FusedLinearORPOLoss(compute_nll_loss=False)(p.w, p.h, p.y)
    _, _, sums, counts = expected_logps(p, ref=False)
    zero = torch.zeros((), dtype=F64)
    want, _ = objectives.orpo_loss(*halves(sums), *halves(counts), chosen_nll=zero)
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))
    assert float(aux[4]) == 0.0


def ld_pairs(seed: int) -> Pairs:
    """Pairs whose chosen and rejected completions differ in length, one of them empty (its
    partner's public length is 0: every token of the partner is verbose)."""
    p = make_pairs(B=3, T=9, seed=seed)
    y = p.y.clone()
    y[0, 4:] = IGN  # chosen 0: 2 tokens, rejected 0 (row 3): 7
    y[4, 5:] = IGN  # chosen 1 (row 1): 6 tokens, rejected 1: 3
    y[2, :] = IGN  # chosen 2: no token; rejected 2 (row 5): 5
    return replace(p, y=y).leaves()


def ld_logps(p: Pairs, ld_alpha: float, *, ref: bool = False) -> torch.Tensor:
    """LD-DPO's sequence log-probs as TRL writes them for a padded batch, under the policy or
    the reference head: completion position ≤ public length → weight 1, later ones → ld_alpha."""
    lp = token_logps(logits(p.rh, p.rw, p.rb) if ref else logits(p.h, p.w, p.b), p.y)
    valid = p.y != IGN
    n = valid.sum(-1)
    public = torch.minimum(*halves(n)).repeat(2)
    position = valid.long().cumsum(-1)
    shared = (position <= public[:, None]) & valid
    tail = (position > public[:, None]) & valid
    return (lp * shared).sum(-1) + ld_alpha * (lp * tail).sum(-1)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.35, 1.0])
def test_ld_dpo_matches_trl_definition(ld_alpha, average):
    p = ld_pairs(seed=21)
    module = FusedLinearDPOLoss(beta=0.3, loss_type="ipo", ld_alpha=ld_alpha,
                                compute_nll_loss=True, alpha=0.5, average_log_prob=average)
    loss, aux = call(module, p)

    _, _, sums, counts = expected_logps(p, average=average)
    norm = counts.clamp(min=1) if average else 1
    logps = ld_logps(p, ld_alpha) / norm
    ref = ld_logps(p, ld_alpha, ref=True).detach() / norm
    n = torch.ones_like(counts) if average else counts
    want, metrics = objectives.dpo_loss(
        *halves(logps), *halves(ref), beta=0.3, loss_type="ipo",
        chosen_counts=halves(n)[0], rejected_counts=halves(n)[1],
    )
    nll = expected_nll(sums, counts)  # the NLL term is not reweighted
    want = want + 0.5 * nll
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))
    # fp64 inputs weigh with α in fp64 (not rounded to fp32: 0.35 would be 1e-8 off)
    torch.testing.assert_close(aux.metrics["chosen_logps"], halves(logps)[0].detach(),
                               rtol=1e-13, atol=1e-13)
    metrics.update(nll_loss=nll)
    assert_metrics(aux, metrics)
    precomputed, _ = module(p.w, p.h, p.y, p.b, ref_chosen_logps=halves(ref)[0],
                            ref_rejected_logps=halves(ref)[1])
    torch.testing.assert_close(precomputed, loss)
    if ld_alpha == 1.0:
        plain, _ = call(FusedLinearDPOLoss(beta=0.3, loss_type="ipo", compute_nll_loss=True,
                                           alpha=0.5, average_log_prob=average), p)
        torch.testing.assert_close(loss, plain)
    else:  # the pairs here do differ in length, so the discount shows
        assert not torch.allclose(logps, expected_logps(p, average=average)[0])


@pytest.mark.parametrize("estimator", ["rloo", "exact"])
def test_ld_dpo_in_hypo_reweights_the_pairs_only(estimator):
    """HyPO adds a KL term on online samples to the DPO loss: with ld_alpha, the pairs' term is
    LD-DPO's and the KL term is unchanged, in value and gradients."""
    p = ld_pairs(seed=22)
    oh, oy, orh, groups = online_batch(seed=23)
    online = dict(online_input=oh, online_target=oy, online_ref_input=orh, group_ids=groups)
    kl_terms, totals = {}, {}
    for ld in (None, 0.25):
        totals[ld], aux = call(HyPOLoss(beta=0.2, estimator=estimator, ld_alpha=ld), p, **online)
        dpo, _ = call(FusedLinearDPOLoss(beta=0.2, ld_alpha=ld), p)
        torch.testing.assert_close(aux.metrics["dpo_loss"], dpo.detach())
        kl_terms[ld] = totals[ld] - dpo
    assert_same(kl_terms[0.25], p.grads_of(kl_terms[0.25], oh), kl_terms[None],
                p.grads_of(kl_terms[None], oh))
    assert not torch.allclose(totals[0.25], totals[None])


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_ld_token_weights_rank_each_sequences_valid_tokens(data):
    """Any packing (sequences interleaved, empty, all-ignored): weight 1 on a sequence's first
    min(n_w, n_l) valid tokens in storage order, ld_alpha on its later ones, 0 elsewhere."""
    pairs = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(1, 40))
    ids = torch.tensor(data.draw(st.lists(st.integers(0, 2 * pairs - 1), min_size=n,
                                          max_size=n)))
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    alpha = data.draw(st.sampled_from([0.0, 0.5, 2.0]))
    got = ld_token_weights(valid, ids, pairs, alpha)

    counts = [int(valid[ids == s].sum()) for s in range(2 * pairs)]
    seen = [0] * (2 * pairs)
    want = torch.zeros(n)
    for i, (s, v) in enumerate(zip(ids.tolist(), valid.tolist(), strict=True)):
        if v:
            public = min(counts[s % pairs], counts[s % pairs + pairs])
            want[i] = 1.0 if seen[s] < public else alpha
            seen[s] += 1
    assert torch.equal(got, want)
    assert torch.equal(ld_token_weights(valid.reshape(1, -1), ids.reshape(1, -1), pairs, alpha),
                       want.reshape(1, -1))


def test_mpo_loss_list_is_the_weighted_sum_of_its_types():
    """TRL's MPO: 0.8·sigmoid + 0.2·bco_pair + 1.0·sft, with the sft term as the NLL."""
    p = make_pairs(seed=25).leaves()
    module = FusedLinearDPOLoss(beta=0.2, loss_type=["sigmoid", "bco_pair"],
                                loss_weights=[0.8, 0.2], compute_nll_loss=True, alpha=1.0)
    loss, aux = call(module, p)
    sigmoid, _ = call(FusedLinearDPOLoss(beta=0.2), p)
    bco, _ = call(FusedLinearDPOLoss(beta=0.2, loss_type="bco_pair"), p)
    _, _, sums, counts = expected_logps(p)
    want = 0.8 * sigmoid + 0.2 * bco + expected_nll(sums, counts)
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))
    torch.testing.assert_close(aux.metrics["loss_bco_pair"], bco.detach())
    assert "loss_type=['sigmoid', 'bco_pair']" in repr(module)


@pytest.mark.parametrize("options", [{}, {"loss_type": "ipo", "average_log_prob": True},
                                     {"ld_alpha": 0.5, "loss_type": "hinge"}])
def test_wpo_weighting_matches_trl_definition(options):
    """TRL's use_weighting: each pair's loss times exp(m_w + m_l), m the token mean of
    log π(y_t) − (logsumexp(2z) − 2 logsumexp(z)), no gradient through the weights."""
    p = ld_pairs(seed=24)
    module = FusedLinearDPOLoss(beta=0.2, use_weighting=True, compute_nll_loss=True, **options)
    loss, aux = call(module, p)

    z = logits(p.h, p.w, p.b)
    valid = p.y != IGN
    with torch.no_grad():
        log_denom = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
        mean = ((token_logps(z, p.y) - log_denom) * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        weights = torch.exp(mean)
        pair_weights = weights[:3] * weights[3:]
    per_pair = []
    for b in range(3):  # the unweighted module's loss, pair by pair
        pair = replace(p, **{k: getattr(p, k)[[b, b + 3]] for k in ("h", "y", "rh")})
        per_pair.append(call(FusedLinearDPOLoss(beta=0.2, **options), pair)[0])
    _, _, sums, counts = expected_logps(p)
    want = (torch.stack(per_pair) * pair_weights).mean() + expected_nll(sums, counts)
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))
    torch.testing.assert_close(aux.metrics["pair_weights"], pair_weights)
    assert not torch.allclose(pair_weights, torch.ones(3, dtype=F64))


# ---------------------------------------------------------------------------------------------
# packed layout


def pack(p: Pairs, order: list[int] | None = None):
    """The batch as one token stream without padding (each row cut after its last completion
    token), sequences in ``order``; returns (h [N, d], y [N], seq_ids [N], cu_seqlens, index of
    each packed token in the padded [2B*T] grid)."""
    lengths = [int((row != IGN).nonzero().max()) + 1 for row in p.y]
    order = order if order is not None else list(range(len(lengths)))
    T = p.y.shape[1]
    index = torch.cat([torch.arange(lengths[s]) + s * T for s in order])
    flat_h = p.h.reshape(-1, p.h.shape[-1])
    seq_ids = torch.cat([torch.full((lengths[s],), s) for s in order])
    cu = torch.tensor([0] + [lengths[s] for s in order]).cumsum(0)
    return flat_h[index], p.y.reshape(-1)[index], seq_ids, cu, index


def test_packed_layout_equals_padded():
    p = make_pairs(B=3, seed=31).leaves()
    module = FusedLinearDPOLoss(beta=0.2, compute_nll_loss=True, loss_type="ipo")
    loss, aux = call(module, p)
    grads = p.grads_of(loss)

    h, y, seq_ids, cu, index = pack(p)
    rh = p.rh.reshape(-1, p.rh.shape[-1])[index]
    h = h.detach().requires_grad_(True)
    variants = {
        "cu_seqlens": dict(cu_seqlens=cu),
        "seq_ids": dict(seq_ids=seq_ids),
        "[1, N, d]": dict(cu_seqlens=cu, shape=(1, -1)),
    }
    for name, kw in variants.items():
        shape = kw.pop("shape", (-1,))
        hh, yy = h.reshape(*shape, h.shape[-1]), y.reshape(*shape)
        rr = rh.reshape(*shape, rh.shape[-1])
        got, got_aux = module(p.w, hh, yy, p.b, rr, p.rw, p.rb, **kw)
        torch.testing.assert_close(got, loss, msg=name)
        for k in ("chosen_logps", "rejected_logps", "nll_loss", "chosen_rewards"):
            torch.testing.assert_close(got_aux.metrics[k], aux.metrics[k], msg=f"{name} {k}")
        g_h, g_w, g_b = torch.autograd.grad(got, [h, p.w, p.b])
        torch.testing.assert_close(g_h, grads[0].reshape(-1, h.shape[-1])[index])
        torch.testing.assert_close(g_w, grads[1])
        torch.testing.assert_close(g_b, grads[2])
        z = logits(h, p.w, p.b).detach()  # logits mean: every token of the chosen sequences
        torch.testing.assert_close(got_aux[2].double(), z[seq_ids < 3].mean(), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_packed_sequences_in_any_order(ld_alpha):
    p = make_pairs(B=2, seed=32)
    module = FusedLinearDPOLoss(ld_alpha=ld_alpha)
    loss, aux = call(module, p)
    h, y, seq_ids, _, index = pack(p, order=[2, 0, 3, 1])  # pairs interleaved in the stream
    rh = p.rh.reshape(-1, p.rh.shape[-1])[index]
    got, got_aux = module(p.w, h, y, p.b, rh, p.rw, p.rb, seq_ids=seq_ids)
    torch.testing.assert_close(got, loss)
    torch.testing.assert_close(got_aux[5], aux[5])


# ---------------------------------------------------------------------------------------------
# SparsePO


def expected_sparsepo(p: Pairs, reward_mask, kl_mask, *, beta, l1_u, l1_d):
    """objectives.sparsepo_* on per-token ℓ − ℓ_ref and KL(π_ref ‖ π) from full logits."""
    z, r = logits(p.h, p.w, p.b), logits(p.rh, p.rw, p.rb).detach()
    valid = (p.y != IGN).to(z.dtype)
    lp, lq = torch.log_softmax(z, -1), torch.log_softmax(r, -1)
    kl = (lq.exp() * (lq - lp)).sum(-1) * valid
    ratio = token_logps(z, p.y) - token_logps(r, p.y)
    ids = torch.arange(p.y.shape[0])[:, None].expand_as(p.y).reshape(-1)
    ones = torch.ones_like(valid)
    mu = (reward_mask if reward_mask is not None else ones) * valid
    md = (kl_mask if kl_mask is not None else ones) * valid
    parts = objectives.sparsepo_sequence_sums(ratio.reshape(-1), kl.reshape(-1), ids,
                                              p.y.shape[0], reward_weights=mu.reshape(-1),
                                              kl_weights=md.reshape(-1))
    return objectives.sparsepo_loss(*(x for t in parts for x in halves(t)), beta=beta,
                                    l1_u=l1_u, l1_d=l1_d)


@pytest.mark.parametrize(
    ("on_reward", "on_kl", "separate"),
    [(True, True, False), (True, False, False), (False, True, False), (True, True, True)],
)
def test_sparsepo_learned_masks_match_objectives(on_reward, on_kl, separate):
    p = make_pairs(seed=41).leaves()
    g = torch.Generator().manual_seed(1)
    token_mask = torch.rand(p.y.shape, generator=g, dtype=F64).requires_grad_(True)
    kl_mask = torch.rand(p.y.shape, generator=g, dtype=F64).requires_grad_(True)
    module = FusedLinearSparsePOLoss(beta=0.6, l1_u=0.01, l1_d=0.02, mask_on_reward=on_reward,
                                     mask_on_kl=on_kl)
    kwargs = {"token_mask": token_mask, "kl_mask": kl_mask if separate else None}
    loss, aux = call(module, p, **kwargs)

    m_u = token_mask if on_reward else None
    m_d = (kl_mask if separate else token_mask) if on_kl else None
    # HEBO's SparseTrainer: no penalty on a term without its mask; a common mask, penalised in
    # both terms, has both weights halved
    half = 0.5 if on_reward and on_kl and not separate else 1.0
    want, metrics = expected_sparsepo(p, m_u, m_d, beta=0.6, l1_u=0.01 * half * on_reward,
                                      l1_d=0.02 * half * on_kl)
    masks = [token_mask] + ([kl_mask] if separate else [])
    got_g, want_g = p.grads_of(loss, *masks), p.grads_of(want, *masks)
    assert_same(loss, got_g, want, want_g)
    assert want_g[-1].abs().sum() > 0  # the masks do receive gradient
    assert_metrics(aux, metrics)
    _, _, sums, _ = expected_logps(p)
    torch.testing.assert_close(aux[0], halves(sums)[0])


def test_sparsepo_without_masks_and_with_nll():
    p = make_pairs(seed=42).leaves()
    loss, aux = call(FusedLinearSparsePOLoss(compute_nll_loss=True, alpha=0.5), p)
    want, metrics = expected_sparsepo(p, None, None, beta=0.8, l1_u=0.0, l1_d=0.0)
    _, _, sums, counts = expected_logps(p)
    want = want + 0.5 * expected_nll(sums, counts)
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))
    assert_metrics(aux, metrics)


# ---------------------------------------------------------------------------------------------
# HyPO and HPO


def online_batch(M=4, T=6, d=8, V=16, seed=0, device=CPU):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (M, T), generator=g)
    y[:, :2] = IGN
    y[1, -1] = IGN
    h = torch.randn(M, T, d, generator=g, dtype=F64).to(device).requires_grad_(True)
    rh = torch.randn(M, T, d, generator=g, dtype=F64).to(device)
    return h, y.to(device), rh, torch.tensor([0, 0, 1, 1], device=device)


@pytest.mark.parametrize("estimator", ["reinforce", "rloo", "exact"])
def test_hypo_matches_objectives(estimator):
    p = make_pairs(seed=51).leaves()
    oh, oy, orh, groups = online_batch(seed=52)
    module = HyPOLoss(beta=0.2, loss_type="robust", label_smoothing=0.1, kl_coef=0.3,
                      estimator=estimator)
    loss, aux = call(module, p, online_input=oh, online_target=oy, online_ref_input=orh,
                     group_ids=groups)

    logps, ref, _, _ = expected_logps(p)
    dpo, metrics = objectives.dpo_loss(*halves(logps), *halves(ref), beta=0.2,
                                       loss_type="robust", label_smoothing=0.1)
    z, r = logits(oh, p.w, p.b), logits(orh, p.rw, p.rb).detach()
    seq, ref_seq = token_logps(z, oy).sum(-1), token_logps(r, oy).sum(-1)
    if estimator == "exact":
        lp, lq = torch.log_softmax(z, -1), torch.log_softmax(r, -1)
        token_kl = (lp.exp() * (lp - lq)).sum(-1) * (oy != IGN)
        ids = torch.arange(oy.shape[0])[:, None].expand_as(oy).reshape(-1)
        term, km = objectives.hypo_kl_term(
            seq, ref_seq, estimator="exact", token_kl=token_kl.reshape(-1),
            token_logps=token_logps(z, oy).reshape(-1), token_seq_ids=ids,
        )
    else:
        term, km = objectives.hypo_kl_term(seq, ref_seq, estimator=estimator, group_ids=groups)
    want = dpo + 0.3 * term
    got_g, want_g = p.grads_of(loss, oh), p.grads_of(want, oh)
    assert_same(loss, got_g, want, want_g)
    assert want_g[-1].abs().sum() > 0  # the online samples do get a gradient
    metrics.update(dpo_loss=dpo, kl_term=term, online_kl=km["kl"])
    assert_metrics(aux, metrics)


def test_hypo_precomputed_online_reference_and_packed_online():
    p = make_pairs(seed=53)
    oh, oy, orh, groups = online_batch(seed=54)
    module = HyPOLoss(estimator="rloo")
    loss, aux = call(module, p, online_input=oh, online_target=oy, online_ref_input=orh,
                     group_ids=groups)
    ref_seq = token_logps(logits(orh, p.rw, p.rb), oy).sum(-1)
    T = oy.shape[1]
    got, got_aux = call(
        module, p, online_input=oh.reshape(-1, oh.shape[-1]), online_target=oy.reshape(-1),
        online_ref_logps=ref_seq, group_ids=groups,
        online_cu_seqlens=torch.arange(0, oy.numel() + 1, T),
    )
    torch.testing.assert_close(got, loss)
    torch.testing.assert_close(got_aux.metrics["online_kl"], aux.metrics["online_kl"])


@pytest.mark.parametrize("ld_alpha", [None, 0.3])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("chosen_only", [False, True])
def test_hpo_matches_objectives(chosen_only, average, ld_alpha):
    """The auxiliary term weighs the log-probs the DPO term uses: averaged per token with
    ``average_log_prob``, LD-weighted with ``ld_alpha``."""
    p = ld_pairs(seed=61)
    n = p.num_pairs if chosen_only else 2 * p.num_pairs
    rewards = torch.linspace(-1.0, 2.0, n, dtype=F64)
    baseline = torch.full((n,), 0.25, dtype=F64)
    module = HPOLoss(beta=0.2, aux_coef=0.5, aux_tau=0.7, aux_w_max=3.0,
                     average_log_prob=average, ld_alpha=ld_alpha)
    loss, aux = call(module, p, aux_rewards=rewards, aux_baseline=baseline)
    logps, ref, _, counts = expected_logps(p, average=average)
    if ld_alpha is not None:
        norm = counts.clamp(min=1) if average else 1
        logps = ld_logps(p, ld_alpha) / norm
        ref = ld_logps(p, ld_alpha, ref=True).detach() / norm
    want, metrics = objectives.hpo_loss(*halves(logps), *halves(ref), logps[:n], rewards,
                                        alpha=0.5, aux_baseline=baseline, tau=0.7, w_max=3.0,
                                        beta=0.2)
    assert_same(loss, p.grads_of(loss), want, p.grads_of(want))
    assert_metrics(aux, metrics)


# ---------------------------------------------------------------------------------------------
# autocast, frozen head, tied embeddings, triton backend


@pytest.mark.parametrize("kind", ["dpo", "sparsepo", "hypo_exact"])
def test_reference_head_requiring_grad_is_frozen(kind):
    """A reference head that requires grad (a copy of the policy, say) is used detached, as in
    Liger: same loss, and no gradient reaches it (the KL op would refuse it otherwise)."""
    p = make_pairs(seed=73).leaves()
    oh, oy, orh, _ = online_batch(seed=74)

    def run(q, online_ref):
        if kind == "dpo":
            return call(FusedLinearDPOLoss(), q)[0]
        if kind == "sparsepo":
            return call(FusedLinearSparsePOLoss(), q)[0]
        return call(HyPOLoss(estimator="exact"), q, online_input=oh, online_target=oy,
                    online_ref_input=online_ref)[0]

    want = run(p, orh)
    live = replace(p, rh=p.rh.clone().requires_grad_(True), rw=p.rw.clone().requires_grad_(True),
                   rb=p.rb.clone().requires_grad_(True))
    online_ref = orh.clone().requires_grad_(True)
    got = run(live, online_ref)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.backward()
    assert all(t.grad is None for t in (live.rh, live.rw, live.rb, online_ref))
    assert live.w.grad is not None


def test_loss_defaults():
    """Liger's constructor defaults (test_losses_liger checks them against Liger's own), the
    SparsePO README's β 0.8, HyPO's RLOO baseline, HPO's AWR weights."""
    sparsepo = signature_defaults(FusedLinearSparsePOLoss.__init__)
    assert sparsepo | {"beta": 0.8, "mask_on_reward": True, "mask_on_kl": True, "l1_u": 0.0,
                       "l1_d": 0.0} == sparsepo
    assert signature_defaults(HyPOLoss.__init__) == {"kl_coef": 0.1, "estimator": "rloo"}
    assert signature_defaults(HPOLoss.__init__) == {"aux_coef": 1.0, "aux_tau": 1.0,
                                                    "aux_w_max": 20.0}
    assert HyPOLoss().beta == HPOLoss().beta == FusedLinearDPOLoss().beta == 0.1


def test_autocast_casts_like_f_linear():
    p = make_pairs(seed=71, dtype=F32).leaves()
    module = FusedLinearDPOLoss(compute_nll_loss=True)
    with torch.autocast("cpu", dtype=BF16):
        loss, _ = call(module, p)
    grads = p.grads_of(loss)
    assert loss.dtype == F32 and all(g.dtype == F32 for g in grads)

    q = replace(p, **{k: getattr(p, k).detach().to(BF16) for k in ("h", "w", "b", "rh", "rw",
                                                                      "rb")}).leaves()
    want, _ = call(module, q)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    for got_g, want_g in zip(grads, q.grads_of(want), strict=True):
        torch.testing.assert_close(got_g, want_g.float(), rtol=0, atol=0)
    full, _ = call(module, p)  # and autocast did change the computation
    assert abs(full.item() - loss.item()) > 1e-6


def test_mixed_dtypes_outside_autocast_raise():
    p = make_pairs(seed=72, dtype=F32)
    with pytest.raises(TypeError, match="lin_weight dtype"):
        call(FusedLinearDPOLoss(), replace(p, w=p.w.to(BF16)))


def test_frozen_head_gets_no_gradient():
    p = make_pairs(seed=73).leaves()
    module = FusedLinearDPOLoss(compute_nll_loss=True)
    loss, _ = call(module, p)
    g_h = torch.autograd.grad(loss, p.h)[0]
    frozen = replace(p, w=p.w.detach(), b=p.b.detach(), h=p.h.detach().requires_grad_(True))
    loss2, _ = call(module, frozen)
    loss2.backward()
    assert frozen.w.grad is None and frozen.b.grad is None
    torch.testing.assert_close(frozen.h.grad, g_h)


def test_tied_embeddings_accumulate_both_paths():
    torch.manual_seed(0)
    V, d, B, T = 16, 8, 2, 6
    emb, body = nn.Embedding(V, d).double(), nn.Linear(d, d).double()
    ids = torch.randint(0, V, (2 * B, T + 1))
    target = ids[:, 1:].clone()
    target[:, :2] = IGN

    def run(loss_fn):
        emb.zero_grad(), body.zero_grad()
        hidden = torch.tanh(body(emb(ids[:, :-1])))
        loss = loss_fn(emb.weight, hidden)
        loss.backward()
        return loss.detach(), emb.weight.grad.clone(), body.weight.grad.clone()

    def naive(w, hidden):
        s = token_logps(hidden @ w.T, target).sum(-1)
        return objectives.dpo_loss(*halves(s))[0]

    got = run(lambda w, h: FusedLinearDPOLoss(use_ref_model=False)(w, h, target)[0])
    want = run(naive)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    head_only = torch.autograd.grad(naive(emb.weight, torch.tanh(body(emb(ids[:, :-1]))).detach()),
                                    emb.weight)[0]
    assert (want[1] - head_only).abs().max() > 1e-6  # the input path contributes too


@needs_triton
@pytest.mark.parametrize("kind", ["dpo", "dpo_ld", "dpo_wpo", "orpo_nll_target", "sparsepo",
                                  "hypo_exact", "hypo_rloo", "hypo_rloo_ld", "hypo_rloo_wpo"])
def test_triton_backend_matches_reference(kind):
    p = make_pairs(B=2, T=5, d=16, V=40, dtype=F32, seed=81, device=DEVICE).leaves()
    oh, oy, orh, _ = online_batch(M=2, T=5, d=16, V=40, seed=82, device=DEVICE)
    oh = oh.detach().float().requires_grad_(True)
    mask = torch.rand(p.y.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    mask.requires_grad_(True)
    nll_target = torch.randint(0, 40, p.y.shape, generator=torch.Generator().manual_seed(3))
    nll_target[:, :2] = IGN
    nll_target = nll_target.to(DEVICE)
    ld = 0.4 if kind.endswith("_ld") else None  # the pairs differ in length: the weights show
    wpo = kind.endswith("_wpo")
    results = []
    for backend in ("reference", "triton"):
        if kind.startswith("dpo"):
            loss, aux = call(FusedLinearDPOLoss(compute_nll_loss=True, ld_alpha=ld,
                                                use_weighting=wpo, backend=backend), p)
            extra = []
        elif kind == "orpo_nll_target":  # one call: the pairs' labels and the NLL's, gathered
            loss, aux = FusedLinearORPOLoss(backend=backend)(p.w, p.h, p.y, p.b, nll_target)
            extra = []
        elif kind == "sparsepo":
            loss, aux = call(FusedLinearSparsePOLoss(backend=backend), p, token_mask=mask)
            extra = [mask]
        else:
            estimator = kind.split("_")[1]
            loss, aux = call(HyPOLoss(estimator=estimator, ld_alpha=ld, use_weighting=wpo,
                                      backend=backend), p,
                             online_input=oh, online_target=oy, online_ref_input=orh.float(),
                             group_ids=torch.tensor([0, 0], device=DEVICE) if estimator == "rloo"
                             else None)
            extra = [oh]
        results.append((loss, list(aux), p.grads_of(loss, *extra)))
    (ref_loss, ref_aux, ref_g), (tri_loss, tri_aux, tri_g) = results
    torch.testing.assert_close(tri_loss, ref_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(tri_aux, ref_aux, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(tri_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# API surface and bad inputs


def test_functional_forms_are_reexported():
    for name in ("dpo_loss", "simpo_loss", "cpo_loss", "orpo_loss", "sparsepo_loss",
                 "sparsepo_sequence_sums", "hypo_kl_term", "hpo_aux_term", "hpo_loss",
                 "wpo_pair_weights"):
        assert getattr(losses, name) is getattr(objectives, name)


def test_preference_output_pickles_and_unpacks():
    _, aux = call(FusedLinearDPOLoss(), make_pairs(seed=91))
    for back in (pickle.loads(pickle.dumps(aux)), copy.deepcopy(aux)):
        assert type(back) is type(aux) and len(back) == 7
        assert set(back.metrics) == set(aux.metrics)
        *_, chosen_rewards, rejected_rewards = back
        torch.testing.assert_close(chosen_rewards - rejected_rewards, aux.metrics["margins"])


def test_preference_output_rebuilds_from_an_iterable():
    """As container utilities rebuild a tuple, ``type(t)(generator)`` (transformers'
    nested_detach): Liger's fields stay named."""
    transformers = pytest.importorskip("transformers")
    p = make_pairs(seed=92)
    _, aux = FusedLinearORPOLoss()(p.w, p.h, p.y, p.b)  # 9 values: Liger's 7, ORPO's 2
    rebuilt = type(aux)(t.clone() for t in aux)
    assert type(rebuilt) is type(aux) and len(rebuilt) == len(aux)
    assert list(rebuilt.metrics) == list(LIGER_AUX_FIELDS)
    assert rebuilt.metrics["chosen_rewards"] is rebuilt[5]
    detached = transformers.trainer_pt_utils.nested_detach(aux)
    assert type(detached) is type(aux)
    assert all(torch.equal(a, b) for a, b in zip(detached, aux, strict=True))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: FusedLinearDPOLoss(loss_type="kto"), ValueError, "loss_type"),
        (lambda: FusedLinearDPOLoss(loss_type="hinge", label_smoothing=0.1), ValueError,
         "label_smoothing"),
        (lambda: FusedLinearDPOLoss(loss_type="robust", label_smoothing=0.5), ValueError,
         "label_smoothing"),
        (lambda: FusedLinearDPOLoss(beta=0.0), ValueError, "beta"),
        (lambda: FusedLinearDPOLoss(alpha=-1.0), ValueError, "alpha"),
        (lambda: FusedLinearDPOLoss(ld_alpha=-0.5), ValueError, "^ld_alpha"),
        (lambda: FusedLinearDPOLoss(ld_alpha=1.5), ValueError, "^ld_alpha"),
        (lambda: FusedLinearDPOLoss(loss_type="aot", use_weighting=True), ValueError,
         "pair_weights"),
        (lambda: FusedLinearDPOLoss(loss_type=["sigmoid", "sft"]), ValueError,
         "compute_nll_loss"),
        (lambda: FusedLinearDPOLoss(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]),
         ValueError, "loss_weights"),
        (lambda: HyPOLoss(ld_alpha=float("nan")), ValueError, "^ld_alpha"),
        (lambda: FusedLinearDPOLoss(backend="cuda"), ValueError, "backend"),
        (lambda: FusedLinearSimPOLoss(label_smoothing=0.7), ValueError, "label_smoothing"),
        (lambda: FusedLinearSparsePOLoss(l1_u=-1.0), ValueError, "l1_u"),
        (lambda: HyPOLoss(estimator="k3"), ValueError, "estimator"),
        (lambda: HyPOLoss(kl_coef=-0.1), ValueError, "kl_coef"),
        (lambda: HPOLoss(aux_tau=0.0), ValueError, "^aux_tau"),
        (lambda: HPOLoss(aux_w_max=-1.0), ValueError, "^aux_w_max"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _bad_calls():
    p = make_pairs(B=2, T=5, d=8, V=16, seed=99)
    dpo = FusedLinearDPOLoss()
    ref = torch.zeros(2, dtype=F64)
    h_flat, y_flat = p.h.reshape(-1, 8), p.y.reshape(-1)
    return [
        ("odd batch", lambda: dpo(p.w, p.h[:3], p.y[:3], p.b, p.rh[:3], p.rw, p.rb),
         ValueError, "odd number of sequences"),
        ("target length mismatch", lambda: dpo(p.w, p.h, p.y[:, :4], p.b, p.rh, p.rw),
         ValueError, "target must have shape"),
        ("ref_input length mismatch", lambda: dpo(p.w, p.h, p.y, p.b, p.rh[:, :4], p.rw),
         ValueError, "ref_input must have shape"),
        ("hidden size", lambda: dpo(p.w, p.h[..., :5], p.y, p.b, p.rh, p.rw),
         ValueError, "_input has hidden size 5"),
        ("weight not 2-D", lambda: dpo(p.w[None], p.h, p.y, p.b, p.rh, p.rw),
         ValueError, "lin_weight must be 2-D"),
        ("bias shape", lambda: dpo(p.w, p.h, p.y, p.b[:3], p.rh, p.rw),
         ValueError, "bias must have shape"),
        ("float target", lambda: dpo(p.w, p.h, p.y.double(), p.b, p.rh, p.rw),
         TypeError, "target must be an int"),
        ("padded needs 3-D", lambda: dpo(p.w, h_flat, y_flat, p.b, p.rh, p.rw),
         ValueError, r"\[num_seqs, T, d\]"),
        ("missing reference", lambda: dpo(p.w, p.h, p.y, p.b), ValueError,
         "use_ref_model=True needs the reference"),
        ("missing ref_weight", lambda: dpo(p.w, p.h, p.y, p.b, p.rh), ValueError,
         "ref_weight is None"),
        ("both references", lambda: dpo(p.w, p.h, p.y, p.b, p.rh, p.rw, ref_chosen_logps=ref,
                                        ref_rejected_logps=ref), ValueError, "not both"),
        ("one precomputed", lambda: dpo(p.w, p.h, p.y, p.b, ref_chosen_logps=ref), ValueError,
         "ref_rejected_logps is None"),
        ("precomputed length", lambda: dpo(p.w, p.h, p.y, p.b, ref_chosen_logps=ref,
                                           ref_rejected_logps=ref[:1]),
         ValueError, r"ref_rejected_logps must have shape \(2,\)"),
        ("precomputed without ref model",
         lambda: FusedLinearDPOLoss(use_ref_model=False)(p.w, p.h, p.y, ref_chosen_logps=ref,
                                                         ref_rejected_logps=ref),
         ValueError, "use_ref_model=False"),
        ("ref vocabulary", lambda: dpo(p.w, p.h, p.y, p.b, p.rh, p.rw[:5]), ValueError,
         "ref_weight has vocabulary 5"),
        ("label out of range", lambda: dpo(p.w, p.h, p.y.clamp(min=0) + 16, p.b, p.rh, p.rw),
         ValueError, r"^target must be in \[0, 16\)"),
        ("odd packed", lambda: dpo(p.w, h_flat, y_flat, p.b, p.rh.reshape(-1, 8), p.rw,
                                   cu_seqlens=torch.tensor([0, 5, 10, 20])),
         ValueError, "odd number of sequences"),
        ("cu_seqlens total", lambda: dpo(p.w, h_flat, y_flat, p.b, p.rh.reshape(-1, 8), p.rw,
                                         cu_seqlens=torch.tensor([0, 5, 10, 15, 19])),
         ValueError, "cu_seqlens must start at 0, end at N = 20"),
        ("seq_ids and cu_seqlens", lambda: dpo(p.w, h_flat, y_flat, p.b, p.rh.reshape(-1, 8),
                                               p.rw, seq_ids=y_flat.clamp(min=0) % 4,
                                               cu_seqlens=torch.tensor([0, 20])),
         ValueError, "not both"),
        ("sparsepo needs the head", lambda: FusedLinearSparsePOLoss()(
            p.w, p.h, p.y, p.b), ValueError, "FusedLinearSparsePOLoss needs the reference head"),
        ("sparsepo unused kl_mask", lambda: FusedLinearSparsePOLoss(mask_on_kl=False)(
            p.w, p.h, p.y, p.b, p.rh, p.rw, kl_mask=torch.ones(p.y.shape, dtype=F64)),
         ValueError, "kl_mask is given but no term uses it"),
        ("sparsepo mask shape", lambda: FusedLinearSparsePOLoss()(
            p.w, p.h, p.y, p.b, p.rh, p.rw, token_mask=torch.ones(4, 4, dtype=F64)),
         ValueError, "token_mask must have shape"),
        ("hypo missing online reference", lambda: HyPOLoss()(
            p.w, p.h, p.y, p.b, p.rh, p.rw, online_input=p.h, online_target=p.y),
         ValueError, "online_ref_input"),
        ("hypo both online references", lambda: HyPOLoss(estimator="reinforce")(
            p.w, p.h, p.y, p.b, p.rh, p.rw, online_input=p.h, online_target=p.y,
            online_ref_input=p.rh, online_ref_logps=torch.zeros(4, dtype=F64)), ValueError,
         "online_ref_input or online_ref_logps, not both"),
        ("hypo exact with precomputed", lambda: HyPOLoss(estimator="exact")(
            p.w, p.h, p.y, p.b, p.rh, p.rw, online_input=p.h, online_target=p.y,
            online_ref_logps=torch.zeros(4, dtype=F64)), ValueError, "needs the reference head"),
        ("hypo rloo without groups", lambda: HyPOLoss(estimator="rloo")(
            p.w, p.h, p.y, p.b, p.rh, p.rw, online_input=p.h, online_target=p.y,
            online_ref_input=p.rh), ValueError, "group_ids is required"),
        ("orpo joint call, target out of range", lambda: FusedLinearORPOLoss()(
            p.w, p.h, p.y.clamp(min=0) + 16, p.b, p.y), ValueError, r"^target must be in"),
        ("hypo online_target out of range", lambda: HyPOLoss(estimator="reinforce")(
            p.w, p.h, p.y, p.b, p.rh, p.rw, online_input=p.h, online_target=p.y.clamp(min=0) - 1,
            online_ref_input=p.rh), ValueError, r"^online_target must be in \[0, 16\)"),
        ("ref_input inf", lambda: dpo(p.w, p.h, p.y, p.b, p.rh * math.inf, p.rw, p.rb),
         ValueError, "^ref_input contains NaN or inf"),
        ("ref_weight nan", lambda: dpo(p.w, p.h, p.y, p.b, p.rh, p.rw * math.nan, p.rb),
         ValueError, "^ref_weight contains NaN or inf"),
        ("_input nan", lambda: dpo(p.w, p.h * math.nan, p.y, p.b, p.rh, p.rw, p.rb),
         ValueError, "^_input contains NaN or inf"),
        ("online_ref_input inf", lambda: HyPOLoss(estimator="reinforce")(
            p.w, p.h, p.y, p.b, p.rh, p.rw, online_input=p.h, online_target=p.y,
            online_ref_input=p.rh * math.inf), ValueError, "^online_ref_input contains NaN"),
        ("hypo exact online_input nan", lambda: HyPOLoss(estimator="exact")(
            p.w, p.h, p.y, p.b, p.rh, p.rw, online_input=p.h * math.nan, online_target=p.y,
            online_ref_input=p.rh), ValueError, "^online_input contains NaN"),
        ("sparsepo ref_input inf", lambda: FusedLinearSparsePOLoss()(
            p.w, p.h, p.y, p.b, p.rh * math.inf, p.rw), ValueError, "^ref_input contains NaN"),
        ("hypo exact interleaved online_seq_ids", lambda: HyPOLoss(estimator="exact")(
            p.w, p.h, p.y, p.b, p.rh, p.rw, online_input=h_flat, online_target=y_flat,
            online_ref_input=p.rh.reshape(-1, 8), online_seq_ids=torch.arange(20) % 2),
         ValueError, "contiguous in online_seq_ids"),
        ("ref_chosen_logps nan", lambda: dpo(p.w, p.h, p.y, p.b, ref_chosen_logps=ref * math.nan,
                                             ref_rejected_logps=ref), ValueError,
         "^ref_chosen_logps contains NaN or inf"),
        ("sparsepo token_mask inf", lambda: FusedLinearSparsePOLoss()(
            p.w, p.h, p.y, p.b, p.rh, p.rw, token_mask=torch.full(p.y.shape, math.inf)),
         ValueError, "^token_mask contains NaN or inf"),
        ("hypo online_ref_logps nan", lambda: HyPOLoss(estimator="reinforce")(
            p.w, p.h, p.y, p.b, p.rh, p.rw, online_input=p.h, online_target=p.y,
            online_ref_logps=torch.full((4,), math.nan, dtype=F64)), ValueError,
         "^online_ref_logps contains NaN or inf"),
        ("hpo aux_rewards nan", lambda: HPOLoss()(
            p.w, p.h, p.y, p.b, p.rh, p.rw, aux_rewards=torch.full((4,), math.nan, dtype=F64)),
         ValueError, "aux_rewards contains NaN or inf"),
        ("hpo aux_baseline inf", lambda: HPOLoss()(
            p.w, p.h, p.y, p.b, p.rh, p.rw, aux_rewards=torch.zeros(4, dtype=F64),
            aux_baseline=torch.tensor(math.inf, dtype=F64)), ValueError,
         "aux_baseline contains NaN or inf"),
        ("orpo nll_target nan on a prompt row", lambda: FusedLinearORPOLoss()(
            p.w, torch.where(torch.arange(5)[:, None] == 0, math.nan, p.h), p.y, p.b, p.y),
         ValueError, "^_input contains NaN or inf"),
        ("orpo nll_target out of range", lambda: FusedLinearORPOLoss()(
            p.w, p.h, p.y, p.b, p.y + 16), ValueError, r"^nll_target \(chosen sequences\) must"),
        ("hpo rewards shape", lambda: HPOLoss()(
            p.w, p.h, p.y, p.b, p.rh, p.rw, aux_rewards=torch.zeros(3, dtype=F64)),
         ValueError, r"aux_rewards must have shape \(4,\)"),
    ]


@pytest.mark.parametrize(("name", "run", "error", "match"), _bad_calls(),
                         ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_raise_clear_errors(name, run, error, match):
    with pytest.raises(error, match=match):
        run()


def test_objectives_add_no_host_sync_inside_a_loss(monkeypatch):
    """A loss checks its inputs before any kernel; the objectives it calls then skip their value
    checks, which would wait for the queued kernels (a host synchronisation) to read them."""
    from hypo_fast import _checks

    # its constructor tries its options on CPU numbers
    loss = FusedLinearDPOLoss(use_weighting=True, ld_alpha=0.5)
    seen = []
    real = _checks.raise_flagged
    monkeypatch.setattr(_checks, "raise_flagged", lambda flags: (seen.extend(flags), real(flags)))
    p = make_pairs(seed=7).leaves()
    ref = torch.zeros(2, dtype=F64)
    loss(p.w, p.h, p.y, p.b, ref_chosen_logps=ref, ref_rejected_logps=ref)
    assert not [m for m, _ in seen if "policy_chosen_logps" in m or "log_collision" in m]
    objectives.dpo_loss(ref, ref)
    assert [m for m, _ in seen if "policy_chosen_logps" in m]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_a_batch_without_completion_tokens_still_gives_a_loss(backend):
    """Every completion truncated away: no error (one rank raising stops a data-parallel job).
    Every sequence log-prob is 0, so DPO's loss is log 2 (as Liger's), and the gradients are 0
    but present for the weight and the hidden states."""
    device = on(backend)
    p = make_pairs(seed=97, device=device).leaves()
    none = torch.full_like(p.y, IGN)
    oh, _, orh, groups = online_batch(seed=98, device=device)
    online = {"online_input": oh, "online_target": torch.full((4, 6), IGN, device=device),
              "online_ref_input": orh}
    cases = {
        "dpo": lambda: FusedLinearDPOLoss(backend=backend)(p.w, p.h, none, p.b, p.rh, p.rw, p.rb),
        "simpo": lambda: FusedLinearSimPOLoss(backend=backend)(p.w, p.h, none, p.b),
        "orpo nll_target": lambda: FusedLinearORPOLoss(backend=backend)(p.w, p.h, none, p.b,
                                                                         none),
        # packed, the rejected sequences first: the NLL's labels have no token, the pairs'
        # have (the first token, a rejected one's, stands in for the NLL's in the joint call)
        "orpo packed nll_target": lambda: FusedLinearORPOLoss(backend=backend)(
            p.w, p.h.reshape(-1, p.h.shape[-1]), p.y.flip(0).reshape(-1), p.b,
            none.reshape(-1), seq_ids=(3 - torch.arange(4, device=device))[:, None].expand(
                p.y.shape).reshape(-1)),
        "sparsepo": lambda: FusedLinearSparsePOLoss(backend=backend)(p.w, p.h, none, p.b, p.rh,
                                                                     p.rw, p.rb),
        "hpo": lambda: HPOLoss(backend=backend)(p.w, p.h, none, p.b, p.rh, p.rw, p.rb,
                                                aux_rewards=torch.ones(4, dtype=F64,
                                                                       device=device)),
        **{f"hypo {e}": lambda e=e: HyPOLoss(estimator=e, backend=backend)(
            p.w, p.h, none, p.b, p.rh, p.rw, p.rb, **online,
            group_ids=groups if e == "rloo" else None) for e in ("reinforce", "rloo", "exact")},
    }
    for name, run in cases.items():
        loss, aux = run()
        assert torch.isfinite(loss), name
        if name == "orpo packed nll_target":
            assert float(aux[4]) == 0.0  # the NLL
            continue
        assert not aux[0].any() and not aux[1].any(), name
        for g in p.grads_of(loss, oh) if name.startswith("hypo") else p.grads_of(loss):
            assert not g.any(), name
        if name == "dpo":
            torch.testing.assert_close(loss, torch.tensor(math.log(2.0), dtype=loss.dtype,
                                                          device=device))
