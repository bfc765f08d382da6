"""Sequence-level objectives against hand-written formulas (plain Python math), gradcheck, metrics
and argument validation. The HyPO KL estimators are in test_estimators.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_losses import signature_defaults

from hypo_fast.objectives import (
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    hpo_aux_term,
    hpo_loss,
    hypo_kl_term,
    orpo_loss,
    simpo_loss,
    sparsepo_loss,
    sparsepo_sequence_sums,
    wpo_pair_weights,
)

F64 = torch.float64


def log_sig(x: float) -> float:
    """log σ(x) in plain double precision, both branches overflow-free."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(log_sig(x))


# Per-pair DPO losses written from anchors/objectives.md §1.1 (APO from TRL main's code, which
# takes the log-ratios there, not the scores). c.s_w, c.s_l: scores; c.r_w, c.r_l: log-ratios ρ;
# c.d = s_w − s_l; c.dn = s_w/n_w − s_l/n_l; c.b = β; c.e = ε; c.tau = discopop τ.
EXPECTED_DPO = {
    "sigmoid": lambda c: -(1 - c.e) * log_sig(c.b * c.d) - c.e * log_sig(-c.b * c.d),
    "robust": lambda c: (-(1 - c.e) * log_sig(c.b * c.d) + c.e * log_sig(-c.b * c.d))
    / (1 - 2 * c.e),
    "hinge": lambda c: max(0.0, 1 - c.b * c.d),
    "ipo": lambda c: (c.dn - 1 / (2 * c.b)) ** 2,
    "exo_pair": lambda c: sig(c.b * c.d) * (log_sig(c.b * c.d) - math.log(1 - c.e))
    + sig(-c.b * c.d) * (log_sig(-c.b * c.d) - math.log(c.e)),
    "nca_pair": lambda c: -log_sig(c.b * c.s_w) - 0.5 * log_sig(-c.b * c.s_w)
    - 0.5 * log_sig(-c.b * c.s_l),
    "bco_pair": lambda c: -log_sig(c.b * c.s_w) - log_sig(-c.b * c.s_l),
    "sppo_hard": lambda c: (c.s_w - 1 / (2 * c.b)) ** 2 + (c.s_l + 1 / (2 * c.b)) ** 2,
    "apo_zero": lambda c: (1 - sig(c.b * c.r_w)) + sig(c.b * c.r_l),
    "apo_down": lambda c: sig(c.b * c.r_w) + (1 - sig(c.b * c.d)),
    "discopop": lambda c: (1 - sig(c.b * c.d / c.tau)) * -log_sig(c.b * c.d)
    + sig(c.b * c.d / c.tau) * math.exp(-c.b * c.d),
    "sigmoid_norm": lambda c: -log_sig(c.b * c.dn),
}
SMOOTHED = {"sigmoid": 0.2, "robust": 0.3, "exo_pair": 0.1, "aot": 0.15, "aot_unpaired": 0.25}
# AOT (TRL main) matches the batch's sorted statistics: d pairs the b-th smallest of each
SORTED_MARGINS = {
    "aot": lambda pw, pl, rw, rl: (sorted(a - b for a, b in zip(pw, pl, strict=True)),
                                   sorted(a - b for a, b in zip(rw, rl, strict=True))),
    "aot_unpaired": lambda pw, pl, rw, rl: (sorted(a - b for a, b in zip(pw, rw, strict=True)),
                                            sorted(a - b for a, b in zip(pl, rl, strict=True))),
}
assert set(EXPECTED_DPO) | set(SORTED_MARGINS) == set(DPO_LOSS_TYPES)

logp = st.floats(-20.0, 0.0, allow_nan=False)


@st.composite
def pair_batches(draw):
    b = draw(st.integers(1, 4))
    cols = [draw(st.lists(logp, min_size=b, max_size=b)) for _ in range(4)]
    counts = [draw(st.lists(st.integers(0, 30), min_size=b, max_size=b)) for _ in range(2)]
    return cols, counts


def _tensors(cols, counts):
    return [torch.tensor(c, dtype=F64) for c in cols], [torch.tensor(n) for n in counts]


def _hand_dpo(loss_type, cols, counts, beta, eps, tau=0.05, score=lambda r: r, weights=None):
    if loss_type in SORTED_MARGINS:
        policy, ref = SORTED_MARGINS[loss_type](*cols)
        losses = [-(1 - eps) * log_sig(beta * (a - b)) - eps * log_sig(-beta * (a - b))
                  for a, b in zip(policy, ref, strict=True)]
        return sum(losses) / len(losses)
    losses = []
    for pw, pl, rw, rl, nw, nl in zip(*cols, *counts, strict=True):
        s_w, s_l = score(pw - rw), score(pl - rl)
        c = SimpleNamespace(
            s_w=s_w, s_l=s_l, r_w=pw - rw, r_l=pl - rl, d=s_w - s_l,
            dn=s_w / max(nw, 1) - s_l / max(nl, 1), b=beta, e=eps, tau=tau,
        )
        losses.append(EXPECTED_DPO[loss_type](c))
    if weights is not None:
        losses = [w * loss for w, loss in zip(weights, losses, strict=True)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@settings(max_examples=25, deadline=None)
@given(batch=pair_batches(), beta=st.floats(0.01, 2.0))
def test_dpo_loss_types_match_hand_formulas(loss_type, batch, beta):
    (pw, pl, rw, rl), (nw, nl) = _tensors(*batch)
    eps = SMOOTHED.get(loss_type, 0.0)
    loss, _ = dpo_loss(
        pw, pl, rw, rl, beta=beta, loss_type=loss_type, label_smoothing=eps,
        chosen_counts=nw, rejected_counts=nl,
    )
    expected = _hand_dpo(loss_type, *batch, beta, eps)
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair"])
@settings(max_examples=20, deadline=None)
@given(batch=pair_batches(), data=st.data())
def test_pair_weights_scale_each_pairs_loss(loss_type, batch, data):
    b = len(batch[0][0])
    weights = data.draw(st.lists(st.floats(0.0, 5.0), min_size=b, max_size=b))
    (pw, pl, rw, rl), (nw, nl) = _tensors(*batch)
    w = torch.tensor(weights, dtype=F64)
    loss, metrics = dpo_loss(pw, pl, rw, rl, beta=0.3, loss_type=loss_type, chosen_counts=nw,
                             rejected_counts=nl, pair_weights=w)
    expected = _hand_dpo(loss_type, *batch, 0.3, 0.0, weights=weights)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert torch.equal(metrics["pair_weights"], w)


@settings(max_examples=25, deadline=None)
@given(batch=pair_batches(), data=st.data())
def test_loss_type_lists_weigh_each_types_loss(batch, data):
    """TRL's multi-loss form: Σ_k w_k · loss_k per pair, each type with its own margin (the
    length-normalised ones included) and ε where it uses one."""
    types = data.draw(st.lists(st.sampled_from(DPO_LOSS_TYPES), min_size=1, max_size=3,
                               unique=True))
    weights = data.draw(st.lists(st.floats(0.0, 3.0), min_size=len(types),
                                 max_size=len(types)))
    eps = 0.1 if set(types) & set(SMOOTHED) else 0.0
    clip = data.draw(st.booleans()) and not set(types) & set(SORTED_MARGINS)
    (pw, pl, rw, rl), (nw, nl) = _tensors(*batch)
    common = dict(beta=0.4, label_smoothing=eps, chosen_counts=nw, rejected_counts=nl,
                  clip_ref_margin=clip)
    loss, metrics = dpo_loss(pw, pl, rw, rl, loss_type=types, loss_weights=weights, **common)
    singles = {t: dpo_loss(pw, pl, rw, rl, loss_type=t,
                           **{**common, "label_smoothing": eps if t in SMOOTHED else 0.0})[0]
               for t in types}
    want = sum(w * singles[t] for t, w in zip(types, weights, strict=True))
    assert loss.item() == pytest.approx(float(want), rel=1e-9, abs=1e-9)
    if len(types) > 1:
        for t in types:
            assert metrics[f"loss_{t}"].item() == pytest.approx(singles[t].item(), rel=1e-12)
    else:
        assert not [k for k in metrics if k.startswith("loss_")]


@settings(max_examples=30, deadline=None)
@given(batch=pair_batches(), collisions=st.lists(st.floats(-60.0, 0.0), min_size=8, max_size=8))
def test_wpo_pair_weights_match_hand_formula(batch, collisions):
    (sw, sl, _, _), (nw, nl) = _tensors(*batch)
    b = sw.numel()
    cw, cl = torch.tensor(collisions[:b], dtype=F64), torch.tensor(collisions[4:4 + b],
                                                                    dtype=F64)
    sw.requires_grad_(True)
    got = wpo_pair_weights(sw, sl, cw, cl, nw, nl)
    for i in range(b):
        m_w = (sw[i].item() - cw[i].item()) / max(int(nw[i]), 1)
        m_l = (sl[i].item() - cl[i].item()) / max(int(nl[i]), 1)
        assert got[i].item() == pytest.approx(math.exp(m_w + m_l), rel=1e-12)
    assert not got.requires_grad


@pytest.mark.parametrize(
    ("f_type", "coef", "score"),
    [
        ("forward_kl", 0.5, lambda r: -math.exp(-r)),
        ("js_divergence", 0.5, log_sig),
        ("alpha_divergence", 0.5, lambda r: math.exp(-0.5 * r) / -0.5),
        ("alpha_divergence", 0.3, lambda r: math.exp(-0.7 * r) / -0.7),
        ("alpha_divergence", 1.0, lambda r: r),
    ],
)
@pytest.mark.parametrize("loss_type", ["sigmoid", "nca_pair", "apo_zero", "apo_down"])
def test_f_divergence_scores(f_type, coef, score, loss_type):
    gen = torch.Generator().manual_seed(0)
    cols = [(-5 * torch.rand(6, generator=gen, dtype=F64)).tolist() for _ in range(4)]
    counts = [[1] * 6, [1] * 6]
    (pw, pl, rw, rl), _ = _tensors(cols, counts)
    loss, _ = dpo_loss(
        pw, pl, rw, rl, beta=0.3, loss_type=loss_type, f_divergence_type=f_type,
        f_alpha_divergence_coef=coef,
    )
    assert loss.item() == pytest.approx(_hand_dpo(loss_type, cols, counts, 0.3, 0.0, score=score))


@pytest.mark.parametrize("f_type", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_rewards_are_beta_log_ratios_under_every_f_divergence(f_type):
    """TRL logs β·ρ as the rewards whatever the f-divergence; the scores enter the loss only."""
    pw, pl = torch.tensor([-3.0, -6.0], dtype=F64), torch.tensor([-4.0, -5.0], dtype=F64)
    rw, rl = torch.tensor([-3.5, -5.0], dtype=F64), torch.tensor([-3.0, -5.5], dtype=F64)
    _, m = dpo_loss(pw, pl, rw, rl, beta=0.5, f_divergence_type=f_type,
                    f_alpha_divergence_coef=0.3)
    torch.testing.assert_close(m["chosen_rewards"], 0.5 * (pw - rw))
    torch.testing.assert_close(m["rejected_rewards"], 0.5 * (pl - rl))
    torch.testing.assert_close(m["margins"], 0.5 * ((pw - rw) - (pl - rl)))
    assert m["accuracy"].item() == 0.5


@pytest.mark.parametrize(("f_type", "rho"), [("forward_kl", -60.0), ("alpha_divergence", -150.0)])
def test_f_divergence_scores_exact_up_to_exponent_80(f_type, rho):
    """Exponents up to 80 (e^60 here; e^75 for α = 0.5 at ρ = −150) are not clamped."""
    pw, pl, rw, rl = (torch.tensor([v], dtype=F64) for v in (rho, -1.0, 0.0, -1.0))
    loss, _ = dpo_loss(pw, pl, rw, rl, beta=0.1, f_divergence_type=f_type,
                       f_alpha_divergence_coef=0.5)
    score = (lambda r: -math.exp(-r)) if f_type == "forward_kl" else (
        lambda r: math.exp(-0.5 * r) / -0.5)
    expected = -log_sig(0.1 * (score(rho) - score(0.0)))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_exo_pair_zero_smoothing_means_1e_3():
    pw, pl, rw, rl = (torch.tensor([v], dtype=F64) for v in (-3.0, -4.0, -3.5, -3.2))
    loss, _ = dpo_loss(pw, pl, rw, rl, loss_type="exo_pair")
    expected = _hand_dpo("exo_pair", [[-3.0], [-4.0], [-3.5], [-3.2]], [[1], [1]], 0.1, 1e-3)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(batch=pair_batches(), beta=st.floats(0.01, 2.0))
def test_sigmoid_closed_forms(batch, beta):
    (pw, pl, rw, rl), _ = _tensors(*batch)
    delta = (pw - rw) - (pl - rl)
    plain = -torch.log(torch.sigmoid(beta * delta)).mean()
    loss, _ = dpo_loss(pw, pl, rw, rl, beta=beta)
    swapped, _ = dpo_loss(pl, pw, rl, rw, beta=beta)
    torch.testing.assert_close(loss, plain, rtol=1e-9, atol=1e-12)
    # −log σ(−z) − (−log σ(z)) = z
    torch.testing.assert_close(swapped - loss, (beta * delta).mean(), rtol=1e-9, atol=1e-9)
    # ε = 1/2 makes cDPO symmetric in the preference
    half, _ = dpo_loss(pw, pl, rw, rl, beta=beta, label_smoothing=0.5)
    half_swapped, _ = dpo_loss(pl, pw, rl, rw, beta=beta, label_smoothing=0.5)
    torch.testing.assert_close(half, half_swapped, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(batch=pair_batches(), beta=st.floats(0.05, 2.0))
def test_ipo_is_length_normalised_square(batch, beta):
    (pw, pl, rw, rl), (nw, nl) = _tensors(*batch)
    dbar = (pw - rw) / nw.clamp(min=1) - (pl - rl) / nl.clamp(min=1)
    expected = ((dbar - 1 / (2 * beta)) ** 2).mean()
    loss, _ = dpo_loss(
        pw, pl, rw, rl, beta=beta, loss_type="ipo", chosen_counts=nw, rejected_counts=nl
    )
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)


def test_reference_free_and_clipped_margin():
    pw = torch.tensor([-3.0, -6.0, -2.0], dtype=F64)
    pl = torch.tensor([-4.0, -5.0, -2.5], dtype=F64)
    rw = torch.tensor([-2.0, -7.0, -3.0], dtype=F64)
    rl = torch.tensor([-4.0, -5.0, -2.0], dtype=F64)
    free, _ = dpo_loss(pw, pl, beta=0.5)
    zeros = [0.0] * 3
    ones = [[1] * 3] * 2
    hand_free = _hand_dpo("sigmoid", [pw.tolist(), pl.tolist(), zeros, zeros], ones, 0.5, 0.0)
    assert free.item() == pytest.approx(hand_free)
    clipped, _ = dpo_loss(pw, pl, rw, rl, beta=0.5, clip_ref_margin=True)
    hand = [
        -log_sig(0.5 * ((a - b) - max(0.0, c - d)))
        for a, b, c, d in zip(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist(), strict=True)
    ]
    assert clipped.item() == pytest.approx(sum(hand) / 3)
    # a reference that prefers y_l (Δref < 0) is ignored, one that prefers y_w is subtracted
    unclipped, _ = dpo_loss(pw, pl, rw, rl, beta=0.5)
    assert clipped.item() != pytest.approx(unclipped.item())


def test_discopop_guards_overflow():
    pw = torch.tensor([-500.0, 0.0])
    pl = torch.tensor([0.0, -500.0])
    loss, _ = dpo_loss(pw, pl, beta=1.0, loss_type="discopop")
    assert torch.isfinite(loss)
    loss, _ = dpo_loss(pw, pl, beta=1.0, loss_type="discopop", discopop_tau=2.0)
    assert torch.isfinite(loss)
    # at z = −500, m = σ(−10⁴) underflows and the logistic part dominates: loss ≈ (500 + 0)/2
    loss, _ = dpo_loss(pw, pl, beta=1.0, loss_type="discopop")
    assert loss.item() == pytest.approx(250.0, rel=1e-6)


def _gradcheck(fn, *tensors):
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in tensors)
    assert torch.autograd.gradcheck(lambda *xs: fn(*xs)[0], inputs, eps=1e-6, atol=1e-7)


GRADCHECK_CASES = [(lt, "reverse_kl") for lt in DPO_LOSS_TYPES] + [
    (lt, f) for lt in ("sigmoid", "nca_pair") for f in ("forward_kl", "js_divergence",
                                                        "alpha_divergence")
]


@pytest.mark.parametrize(("loss_type", "f_type"), GRADCHECK_CASES)
def test_dpo_gradcheck(loss_type, f_type):
    gen = torch.Generator().manual_seed(1)
    pw, pl, rw, rl = (-3 * torch.rand(4, generator=gen, dtype=F64) - 0.1 for _ in range(4))
    nw, nl = torch.tensor([3, 1, 7, 2]), torch.tensor([5.0, 2.0, 1.0, 0.0], dtype=F64)

    def fn(a, b, c, d):
        return dpo_loss(
            a, b, c, d, beta=0.7, loss_type=loss_type, f_divergence_type=f_type,
            label_smoothing=SMOOTHED.get(loss_type, 0.0), chosen_counts=nw, rejected_counts=nl,
            discopop_tau=0.5,
        )

    _gradcheck(fn, pw, pl, rw, rl)
    if f_type == "reverse_kl":
        _gradcheck(lambda a, b, c, d: dpo_loss(a, b, c, d, clip_ref_margin=True), pw, pl, rw, rl)


def test_dpo_metrics():
    pw = torch.tensor([-3.0, -6.0, -2.0, -1.0], requires_grad=True)
    pl = torch.tensor([-4.0, -5.0, -2.0, -1.5], requires_grad=True)
    rw = torch.tensor([-3.5, -5.5, -2.5, -1.0])
    rl = torch.tensor([-3.5, -5.5, -2.0, -1.5])
    _, m = dpo_loss(pw, pl, rw, rl, beta=0.5)
    assert set(m) >= {"chosen_rewards", "rejected_rewards", "margins", "accuracy",
                      "chosen_logps", "rejected_logps"}
    assert all(not v.requires_grad for v in m.values())
    torch.testing.assert_close(m["chosen_rewards"], torch.tensor([0.25, -0.25, 0.25, 0.0]))
    torch.testing.assert_close(m["rejected_rewards"], torch.tensor([-0.25, 0.25, 0.0, 0.0]))
    torch.testing.assert_close(m["margins"], torch.tensor([0.5, -0.5, 0.25, 0.0]))
    # a tie is no win (TRL and Liger count margins > 0)
    assert m["accuracy"].dim() == 0 and m["accuracy"].item() == pytest.approx(2 / 4)
    torch.testing.assert_close(m["chosen_logps"], pw.detach())


def test_half_precision_inputs_compute_in_fp32():
    pw = torch.tensor([-30.0, -2.0], dtype=torch.bfloat16)
    pl = torch.tensor([-31.0, -1.0], dtype=torch.bfloat16)
    loss, m = dpo_loss(pw, pl, beta=0.1)
    assert loss.dtype == torch.float32 and m["margins"].dtype == torch.float32
    expected = (-log_sig(0.1) - log_sig(-0.1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# SimPO, CPO, ORPO


@settings(max_examples=40, deadline=None)
@given(
    batch=pair_batches(), beta=st.floats(0.1, 10.0), gamma=st.floats(0.0, 5.0),
    eps=st.floats(0.0, 0.5), sft=st.floats(0.0, 2.0),
)
def test_simpo_matches_hand_formula(batch, beta, gamma, eps, sft):
    (sw, sl, _, _), (nw, nl) = _tensors(*batch)
    loss, m = simpo_loss(
        sw, sl, nw, nl, beta=beta, gamma=gamma, label_smoothing=eps, sft_weight=sft
    )
    terms, aw_list = [], []
    for a, b, n, k in zip(sw.tolist(), sl.tolist(), nw.tolist(), nl.tolist(), strict=True):
        aw, al = a / max(n, 1), b / max(k, 1)
        z = beta * (aw - al) - gamma  # γ absolute
        terms.append(-(1 - eps) * log_sig(z) - eps * log_sig(-z))
        aw_list.append(beta * aw)
    nll = -sum(sw.tolist()) / max(sum(nw.tolist()), 1)
    expected = sum(terms) / len(terms) + (sft * nll if sft > 0 else 0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    torch.testing.assert_close(m["chosen_rewards"], torch.tensor(aw_list, dtype=F64))


def test_simpo_explicit_nll_and_gradcheck():
    sw, sl = torch.tensor([-6.0, -3.0], dtype=F64), torch.tensor([-4.0, -9.0], dtype=F64)
    nw, nl = torch.tensor([3, 2]), torch.tensor([2, 3])
    nll = torch.tensor(1.25, dtype=F64)
    loss, m = simpo_loss(sw, sl, nw, nl, beta=2.0, gamma=1.0, sft_weight=0.5, chosen_nll=nll)
    base, _ = simpo_loss(sw, sl, nw, nl, beta=2.0, gamma=1.0)
    assert (loss - base).item() == pytest.approx(0.625)
    assert m["nll"].item() == 1.25
    _gradcheck(
        lambda a, b, c: simpo_loss(a, b, nw, nl, sft_weight=0.3, chosen_nll=c, label_smoothing=0.1),
        sw, sl, nll,
    )


def test_cpo_matches_hand_formula_and_gradcheck():
    sw = torch.tensor([-6.0, -3.0, -10.0], dtype=F64)
    sl = torch.tensor([-4.0, -9.0, -10.5], dtype=F64)
    nw = torch.tensor([3, 2, 5])
    loss, m = cpo_loss(sw, sl, beta=0.2, alpha=0.7, label_smoothing=0.1, chosen_counts=nw)
    pairs = [-(0.9) * log_sig(0.2 * (a - b)) - 0.1 * log_sig(-0.2 * (a - b))
             for a, b in zip(sw.tolist(), sl.tolist(), strict=True)]
    expected = sum(pairs) / 3 + 0.7 * (19.0 / 10.0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert m["nll"].item() == pytest.approx(1.9)
    torch.testing.assert_close(m["chosen_rewards"], 0.2 * sw)
    no_nll, _ = cpo_loss(sw, sl, beta=0.2, alpha=0.0)
    assert no_nll.item() == pytest.approx(-sum(log_sig(0.2 * (a - b)) for a, b in
                                               zip(sw.tolist(), sl.tolist(), strict=True)) / 3)
    _gradcheck(lambda a, b: cpo_loss(a, b, chosen_counts=nw, label_smoothing=0.2), sw, sl)


def _hand_log1mexp(x: float) -> float:
    return math.log(-math.expm1(x))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_orpo_matches_hand_formula(dtype):
    # averages A = S/n span the log1mexp branch point −ln 2 and the extremes
    sw = [-1e-6 * 4, -0.5, -3.0, -80.0]
    sl = [-2.0, -0.2, -0.9, -1e-5 * 2]
    nw, nl = [4, 1, 3, 2], [1, 1, 1, 2]
    loss, m = orpo_loss(
        torch.tensor(sw, dtype=dtype), torch.tensor(sl, dtype=dtype), torch.tensor(nw),
        torch.tensor(nl), beta=0.25,
    )
    log_odds = []
    for a, b, n, k in zip(sw, sl, nw, nl, strict=True):
        aw, al = a / n, b / k
        log_odds.append((aw - al) - (_hand_log1mexp(aw) - _hand_log1mexp(al)))
    ratio = [log_sig(o) for o in log_odds]
    nll = -sum(sw) / sum(nw)
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    assert loss.item() == pytest.approx(nll - 0.25 * sum(ratio) / 4, rel=rel)
    assert m["log_odds_chosen"].item() == pytest.approx(sum(log_odds) / 4, rel=rel)
    assert m["log_odds_ratio"].item() == pytest.approx(sum(ratio) / 4, rel=rel)
    assert m["chosen_rewards"][1].item() == pytest.approx(0.25 * -0.5, rel=rel)


def test_orpo_stays_finite_at_certainty_and_gradcheck():
    loss, _ = orpo_loss(torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([2]),
                        torch.tensor([2]))
    assert torch.isfinite(loss)
    sw, sl = torch.tensor([-2.0, -0.3], dtype=F64), torch.tensor([-1.0, -7.0], dtype=F64)
    n = torch.tensor([2, 3])
    _gradcheck(lambda a, b: orpo_loss(a, b, n, n, beta=0.5), sw, sl)


# ---------------------------------------------------------------------------------------------
# SparsePO


def test_sparsepo_matches_anchor_formula():
    rw, rl = torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([0.2, 0.3], dtype=F64)
    kw, kl = torch.tensor([0.4, 0.1], dtype=F64), torch.tensor([0.05, 0.9], dtype=F64)
    mw, ml = torch.tensor([3.0, 2.0], dtype=F64), torch.tensor([1.0, 4.0], dtype=F64)
    dw, dl = torch.tensor([0.5, 1.5], dtype=F64), torch.tensor([2.5, 0.0], dtype=F64)
    loss, m = sparsepo_loss(rw, rl, kw, kl, mw, ml, dw, dl, beta=0.8, l1_u=0.01, l1_d=0.02)
    expected = []
    for i in range(2):
        # anchors §4: logit = β[u − (Σ m^d_l KL_l − Σ m^d_w KL_w)]
        u = rw[i].item() - rl[i].item()
        logit = 0.8 * (u - (kl[i].item() - kw[i].item()))
        l1 = 0.01 * (mw[i].item() + ml[i].item()) + 0.02 * (dw[i].item() + dl[i].item())
        expected.append(-log_sig(logit) + l1)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-12)
    torch.testing.assert_close(m["chosen_rewards"], 0.8 * rw)
    torch.testing.assert_close(m["margins"], 0.8 * (rw - rl))
    # more KL on the chosen side raises the logit (lowers the loss)
    lower, _ = sparsepo_loss(rw, rl, kw + 1.0, kl, beta=0.8)
    base, _ = sparsepo_loss(rw, rl, kw, kl, beta=0.8)
    assert lower < base
    _gradcheck(lambda *xs: sparsepo_loss(*xs, beta=0.8, l1_u=0.1, l1_d=0.3),
               rw, rl, kw, kl, mw, ml, dw, dl)


def test_objective_defaults_are_the_anchors():
    """TRL's DPOConfig; official SimPO (β 2.0, γ = β·gamma_beta_ratio = 2.0·0.25); SparsePO's
    README β 0.8; TRL's CPO / ORPO β 0.1; HyPO's RLOO baseline; HPO's AWR clip."""
    dpo, simpo, sparsepo = (signature_defaults(f) for f in (dpo_loss, simpo_loss, sparsepo_loss))
    assert dpo | {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                  "discopop_tau": 0.05, "f_divergence_type": "reverse_kl",
                  "f_alpha_divergence_coef": 0.5} == dpo
    assert simpo | {"beta": 2.0, "gamma": 0.5, "sft_weight": 0.0} == simpo
    assert sparsepo | {"beta": 0.8, "l1_u": 0.0, "l1_d": 0.0} == sparsepo
    assert signature_defaults(cpo_loss)["beta"] == signature_defaults(orpo_loss)["beta"] == 0.1
    assert signature_defaults(cpo_loss)["alpha"] == 1.0
    assert signature_defaults(hypo_kl_term)["estimator"] == "rloo"
    hpo = signature_defaults(hpo_aux_term)
    assert hpo | {"tau": 1.0, "w_max": 20.0} == hpo


def test_sparsepo_l1_is_of_absolute_mask_weights():
    """‖m‖₁ = Σ|m_t|: a negative mask weight adds to the penalty."""
    lr, kl = torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)
    mu = torch.tensor([0.5, -2.0, 1.0], dtype=F64)
    md = torch.tensor([-0.25, 0.0, 3.0], dtype=F64)
    _, _, l1u, l1d = sparsepo_sequence_sums(lr, kl, torch.tensor([0, 0, 1]), 2,
                                            reward_weights=mu, kl_weights=md)
    torch.testing.assert_close(l1u, torch.tensor([2.5, 1.0], dtype=F64))
    torch.testing.assert_close(l1d, torch.tensor([0.25, 3.0], dtype=F64))


def test_sparsepo_sequence_sums_and_mask_gradients():
    gen = torch.Generator().manual_seed(3)
    lr, kl = torch.randn(7, generator=gen, dtype=F64), torch.rand(7, generator=gen, dtype=F64)
    ids = torch.tensor([0, 0, 2, 2, 2, 1, 1])
    mu = torch.rand(7, generator=gen, dtype=F64).requires_grad_(True)
    md = torch.rand(7, generator=gen, dtype=F64)
    r, k, l1u, l1d = sparsepo_sequence_sums(lr, kl, ids, 3, reward_weights=mu, kl_weights=md)
    for s in range(3):
        sel = [i for i in range(7) if ids[i] == s]
        assert r[s].item() == pytest.approx(sum(mu[i].item() * lr[i].item() for i in sel))
        assert k[s].item() == pytest.approx(sum(md[i].item() * kl[i].item() for i in sel))
        assert l1u[s].item() == pytest.approx(sum(mu[i].item() for i in sel))
        assert l1d[s].item() == pytest.approx(sum(md[i].item() for i in sel))
    r.sum().backward()
    torch.testing.assert_close(mu.grad, lr)
    _, _, counts, _ = sparsepo_sequence_sums(lr, kl, ids, 4)
    torch.testing.assert_close(counts, torch.tensor([2.0, 2.0, 3.0, 0.0], dtype=F64))


# ---------------------------------------------------------------------------------------------
# HPO


def test_hpo_aux_term_weights_and_gradient():
    s = torch.tensor([-3.0, -5.0, -1.0, -2.0], dtype=F64, requires_grad=True)
    r = torch.tensor([0.0, 1.0, 10.0, -2.0], dtype=F64)
    term, m = hpo_aux_term(s, r, tau=0.5, w_max=20.0)
    mean_r = sum(r.tolist()) / 4
    w = [min(math.exp((x - mean_r) / 0.5), 20.0) for x in r.tolist()]
    assert w[2] == 20.0  # the clip is active
    torch.testing.assert_close(m["weights"], torch.tensor(w, dtype=F64))
    assert term.item() == pytest.approx(-sum(a * b for a, b in zip(w, s.tolist(), strict=True)) / 4)
    term.backward()
    torch.testing.assert_close(s.grad, -torch.tensor(w, dtype=F64) / 4)
    assert not m["weights"].requires_grad
    # explicit baselines: a number and a value-head tensor
    _, m1 = hpo_aux_term(s, r, baseline=1.0, w_max=1e9)
    torch.testing.assert_close(m1["weights"], torch.exp(r - 1.0))
    v = torch.tensor([0.5, 0.5, 9.0, -1.0], dtype=F64, requires_grad=True)
    term2, m2 = hpo_aux_term(s, r, baseline=v, w_max=1e9)
    torch.testing.assert_close(m2["advantages"], (r - v).detach())
    assert not m2["advantages"].requires_grad and not m2["weights"].requires_grad
    term2.backward()
    assert v.grad is None  # w = sg(...): the value head is not trained through this term
    assert torch.isfinite(hpo_aux_term(s, r * 1e6, w_max=5.0)[0])


def test_hpo_loss_is_dpo_plus_alpha_aux():
    pw, pl = torch.tensor([-3.0, -4.0], dtype=F64), torch.tensor([-5.0, -1.0], dtype=F64)
    rw, rl = torch.tensor([-3.5, -4.0], dtype=F64), torch.tensor([-4.0, -2.0], dtype=F64)
    aux_s, aux_r = torch.cat([pw, pl]), torch.tensor([1.0, 0.0, -1.0, 2.0], dtype=F64)
    loss, m = hpo_loss(pw, pl, rw, rl, aux_s, aux_r, alpha=0.3, beta=0.2, loss_type="hinge")
    dpo, _ = dpo_loss(pw, pl, rw, rl, beta=0.2, loss_type="hinge")
    aux, _ = hpo_aux_term(aux_s, aux_r)
    assert loss.item() == pytest.approx(dpo.item() + 0.3 * aux.item())
    assert m["dpo_loss"].item() == pytest.approx(dpo.item())
    assert {"aux_weights", "aux_advantages", "margins"} <= set(m)


# ---------------------------------------------------------------------------------------------
# argument validation

_B = torch.tensor([-1.0, -2.0])


@pytest.mark.parametrize(
    ("call", "exc", "name"),
    [
        (lambda: dpo_loss(_B, torch.ones(3)), ValueError, "policy_rejected_logps"),
        (lambda: dpo_loss(_B, _B.to(torch.int64)), TypeError, "policy_rejected_logps"),
        (lambda: dpo_loss(_B, _B, _B, _B.to("meta")), ValueError, "ref_rejected_logps"),
        (lambda: dpo_loss(_B, _B, _B.view(2, 1), _B), ValueError, "ref_chosen_logps"),
        (lambda: dpo_loss(_B, _B, _B), ValueError, "ref_rejected_logps"),
        (lambda: dpo_loss(torch.tensor([]), torch.tensor([])), ValueError, "policy_chosen_logps"),
        (lambda: dpo_loss(_B, _B, beta=0.0), ValueError, "beta"),
        (lambda: dpo_loss(_B, _B, beta=-1.0), ValueError, "beta"),
        (lambda: dpo_loss(_B, _B, beta="1"), TypeError, "beta"),
        (lambda: dpo_loss(_B, _B, loss_type="dpo"), ValueError, "loss_type"),
        (lambda: dpo_loss(_B, _B, f_divergence_type="kl"), ValueError, "f_divergence_type"),
        (lambda: dpo_loss(_B, _B, label_smoothing=0.6), ValueError, "label_smoothing"),
        (lambda: dpo_loss(_B, _B, label_smoothing=-0.1), ValueError, "label_smoothing"),
        (lambda: dpo_loss(_B, _B, loss_type="robust", label_smoothing=0.5), ValueError,
         "label_smoothing"),
        (lambda: dpo_loss(_B, _B, loss_type="exo_pair", label_smoothing=0.7), ValueError,
         "label_smoothing"),
        (lambda: dpo_loss(_B, _B, loss_type="hinge", label_smoothing=0.1), ValueError,
         "label_smoothing"),
        (lambda: dpo_loss(_B, _B, loss_type="ipo"), ValueError, "chosen_counts"),
        (lambda: dpo_loss(_B, _B, loss_type="sigmoid_norm", chosen_counts=torch.tensor([1, 2])),
         ValueError, "rejected_counts"),
        (lambda: dpo_loss(_B, _B, loss_type="ipo", chosen_counts=torch.tensor([1]),
                          rejected_counts=torch.tensor([1, 2])), ValueError, "chosen_counts"),
        (lambda: dpo_loss(_B, _B, loss_type="ipo", chosen_counts=torch.tensor([True, False]),
                          rejected_counts=torch.tensor([1, 2])), TypeError, "chosen_counts"),
        (lambda: dpo_loss(_B, _B, discopop_tau=0.0), ValueError, "discopop_tau"),
        (lambda: dpo_loss(_B, _B, clip_ref_margin=True, f_divergence_type="js_divergence"),
         ValueError, "clip_ref_margin"),
        (lambda: dpo_loss(_B, _B, pair_weights=torch.ones(3)), ValueError, "pair_weights"),
        (lambda: dpo_loss(_B, _B, loss_type=[]), ValueError, "loss_type"),
        (lambda: dpo_loss(_B, _B, loss_type=["sigmoid", "sft"]), ValueError, "compute_nll_loss"),
        (lambda: dpo_loss(_B, _B, loss_type=["sigmoid", "kto"]), ValueError, "loss_type"),
        (lambda: dpo_loss(_B, _B, loss_type=["hinge", "hinge"]), ValueError, "twice"),
        (lambda: dpo_loss(_B, _B, loss_type=["sigmoid", "hinge"], loss_weights=[1.0]),
         ValueError, "loss_weights"),
        (lambda: dpo_loss(_B, _B, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, -0.5]),
         ValueError, "loss_weights"),
        (lambda: dpo_loss(_B, _B, loss_type=["hinge", "bco_pair"], label_smoothing=0.1),
         ValueError, "label_smoothing"),
        (lambda: dpo_loss(_B, _B, loss_type=["sigmoid", "robust"], label_smoothing=0.5),
         ValueError, "label_smoothing"),
        (lambda: dpo_loss(_B, _B, loss_type=["sigmoid", "ipo"]), ValueError, "chosen_counts"),
        (lambda: dpo_loss(_B, _B, _B, _B, loss_type="aot", pair_weights=_B.abs()), ValueError,
         "pair_weights"),
        (lambda: dpo_loss(_B, _B, _B, _B, loss_type=["sigmoid", "aot_unpaired"],
                          clip_ref_margin=True), ValueError, "clip_ref_margin"),
        (lambda: dpo_loss(_B, _B, pair_weights=_B * math.nan), ValueError,
         "pair_weights contains NaN"),
        (lambda: wpo_pair_weights(_B, _B, _B, _B, torch.tensor([1, 1]), None), ValueError,
         "rejected_counts"),
        (lambda: wpo_pair_weights(_B, _B, _B * math.inf, _B, torch.tensor([1, 1]),
                                  torch.tensor([1, 1])), ValueError,
         "chosen_log_collision contains NaN"),
        (lambda: simpo_loss(_B, _B, torch.tensor([1, 1]), None), ValueError, "rejected_counts"),
        (lambda: simpo_loss(_B, _B, torch.tensor([1, 1]), torch.tensor([1, 1]),
                            label_smoothing=0.7), ValueError, "label_smoothing"),
        (lambda: simpo_loss(_B, _B, torch.tensor([1, 1]), torch.tensor([1, 1]), sft_weight=-1.0),
         ValueError, "sft_weight"),
        (lambda: cpo_loss(_B, _B), ValueError, "chosen_counts"),
        (lambda: cpo_loss(_B, _B, alpha=-1.0), ValueError, "alpha"),
        (lambda: cpo_loss(_B, _B, torch.tensor([1.0])), ValueError, "chosen_nll"),
        (lambda: orpo_loss(_B, _B, torch.tensor([1, 1]), torch.tensor([1, 1]), beta=0),
         ValueError, "beta"),
        (lambda: sparsepo_loss(_B, _B, _B, _B, l1_u=0.1), ValueError, "chosen_mask_l1"),
        (lambda: sparsepo_loss(_B, _B, _B, _B, _B, _B, _B, l1_d=0.1), ValueError,
         "rejected_kl_mask_l1"),
        (lambda: sparsepo_loss(_B, _B, _B, _B, l1_u=-0.1), ValueError, "l1_u"),
        (lambda: sparsepo_sequence_sums(_B, _B, torch.tensor([0, 2]), 2), ValueError, "seq_ids"),
        (lambda: hpo_aux_term(_B, _B, tau=0.0), ValueError, "tau"),
        (lambda: hpo_aux_term(_B, _B, w_max=-1.0), ValueError, "w_max"),
        (lambda: hpo_aux_term(_B, _B, baseline=torch.ones(3)), ValueError, "baseline"),
        (lambda: hpo_aux_term(_B, _B.to(torch.int32)), TypeError, "aux_rewards"),
        (lambda: hpo_loss(_B, _B, None, None, _B, _B, alpha=-1.0), ValueError, "alpha"),
        # NaN / inf would poison the loss: named before any arithmetic
        (lambda: dpo_loss(_B, _B * math.nan), ValueError, "policy_rejected_logps contains NaN"),
        (lambda: dpo_loss(_B, _B, _B, _B - math.inf), ValueError, "ref_rejected_logps contains"),
        (lambda: dpo_loss(_B, _B, loss_type="ipo", chosen_counts=torch.tensor([1.0, math.nan]),
                          rejected_counts=torch.tensor([1, 2])), ValueError, "chosen_counts"),
        (lambda: simpo_loss(_B, _B, torch.tensor([1, 1]), torch.tensor([1, 1]),
                            sft_weight=1.0, chosen_nll=torch.tensor(math.nan)), ValueError,
         "chosen_nll contains NaN"),
        (lambda: sparsepo_sequence_sums(_B, _B, torch.tensor([0, 1]), 2,
                                        reward_weights=_B * math.inf), ValueError,
         "reward_weights contains NaN"),
        (lambda: hypo_kl_term(_B, _B * math.nan, estimator="reinforce"), ValueError,
         "ref_seq_logps contains NaN"),
        (lambda: hpo_aux_term(_B, _B * math.nan), ValueError, "aux_rewards contains NaN"),
        (lambda: hpo_aux_term(_B, _B, baseline=torch.tensor(math.inf)), ValueError,
         "baseline contains NaN"),
    ],
)
def test_bad_arguments_are_named(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_value_checks_cost_one_host_sync_per_call(monkeypatch):
    """NaN/inf checks of a public objective, its callees' included (hpo_loss calls dpo_loss
    and hpo_aux_term), are read back together: one host synchronisation per call."""
    from hypo_fast import _checks

    reads = []
    real = _checks.raise_flagged
    monkeypatch.setattr(_checks, "raise_flagged",
                        lambda flags: (reads.append(len(flags)) if flags else None, real(flags)))
    b = torch.tensor([-1.0, -2.0])
    for call in (lambda: dpo_loss(b, b, b, b),
                 lambda: hpo_loss(b, b, b, b, b, b, aux_baseline=torch.tensor(0.0)),
                 lambda: simpo_loss(b, b, torch.tensor([1, 1]), torch.tensor([1, 1]),
                                    sft_weight=1.0, chosen_nll=torch.tensor(1.0))):
        reads.clear()
        call()
        assert len(reads) == 1 and reads[0] >= 2
    with pytest.raises(ValueError, match="aux_rewards contains NaN"):
        hpo_loss(b, b, b, b, b, b * math.nan)
