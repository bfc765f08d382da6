"""HyPO KL-gradient estimators (``hypo_kl_term``) on an enumerable autoregressive model.

The model has vocabulary 3 and length 3; its logits are a learnable table with one row per prefix
(1 + 3 + 9 rows), the reference a fixed table. All 27 sequences can be enumerated, so the exact
sequence-level KL(π‖π_ref), its gradient, and the EXPECTED gradient of each estimator (every
sample, or tuple of samples, weighted by its probability) are computed without sampling noise.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hypo_fast.objectives import hypo_kl_term

F64 = torch.float64
V, T = 3, 3
SEQS = list(itertools.product(range(V), repeat=T))


def _prefix_row(prefix: tuple[int, ...]) -> int:
    if len(prefix) == 0:
        return 0
    if len(prefix) == 1:
        return 1 + prefix[0]
    return 1 + V + V * prefix[0] + prefix[1]


ROWS = torch.tensor([[_prefix_row(y[:t]) for t in range(T)] for y in SEQS])  # [27, T]
TOKENS = torch.tensor(SEQS)  # [27, T]


def _model(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(1 + V + V * V, V, generator=gen, dtype=F64).requires_grad_(True)
    ref = 0.7 * torch.randn(1 + V + V * V, V, generator=gen, dtype=F64)
    return theta, ref


def _stats(theta, ref):
    """Per-token log π, log π_ref of the sampled token and full-vocabulary KL_t(π‖π_ref),
    each [27, T], plus the exact sequence KL and the sequence probabilities (detached)."""
    lp, lq = theta.log_softmax(-1), ref.log_softmax(-1)
    tok_lp, tok_lq = lp[ROWS, TOKENS], lq[ROWS, TOKENS]
    tok_kl = (lp.exp() * (lp - lq)).sum(-1)[ROWS]
    s, s_ref = tok_lp.sum(-1), tok_lq.sum(-1)
    prob = s.exp()
    kl = (prob * (s - s_ref)).sum()
    return tok_lp, tok_kl, s, s_ref, prob.detach(), kl


def _grad(value, theta):
    (g,) = torch.autograd.grad(value, theta, retain_graph=True)
    return g


def test_model_is_a_distribution_and_kl_chain_rule():
    theta, ref = _model()
    _, tok_kl, _, _, prob, kl = _stats(theta, ref)
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-14)
    # E_y[Σ_t KL_t] = KL(π‖π_ref) at the sequence level
    assert (prob * tok_kl.sum(-1)).sum().item() == pytest.approx(kl.item(), rel=1e-12)
    assert kl.item() > 0.1


def test_reinforce_expected_gradient_is_exact():
    theta, ref = _model(1)
    _, _, s, s_ref, prob, kl = _stats(theta, ref)
    expected = 0.0
    for i in range(len(SEQS)):
        term, metrics = hypo_kl_term(s[i : i + 1], s_ref[i : i + 1], estimator="reinforce")
        expected = expected + prob[i] * term
        assert metrics["kl"].item() == pytest.approx((s[i] - s_ref[i]).item())
    assert expected.item() == pytest.approx(kl.item(), rel=1e-12)  # value: E[r] = KL
    torch.testing.assert_close(_grad(expected, theta), _grad(kl, theta), rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 2])
def test_rloo_expected_gradient_is_exact(seed):
    theta, ref = _model(seed)
    _, _, s, s_ref, prob, kl = _stats(theta, ref)
    group = torch.zeros(2, dtype=torch.long)
    expected = 0.0
    for i, j in itertools.product(range(len(SEQS)), repeat=2):
        idx = torch.tensor([i, j])
        term, _ = hypo_kl_term(s[idx], s_ref[idx], estimator="rloo", group_ids=group)
        expected = expected + prob[i] * prob[j] * term
    assert expected.item() == pytest.approx(kl.item(), rel=1e-12)
    torch.testing.assert_close(_grad(expected, theta), _grad(kl, theta), rtol=0, atol=1e-10)


def _exact_call(tok_lp, tok_kl, s, s_ref, seqs, lengths):
    """One batched ``exact`` call on sequences ``seqs`` truncated to ``lengths`` tokens."""
    tl = torch.cat([tok_lp[i, :n] for i, n in zip(seqs, lengths, strict=True)])
    tk = torch.cat([tok_kl[i, :n] for i, n in zip(seqs, lengths, strict=True)])
    ids = torch.cat([torch.full((n,), b) for b, n in enumerate(lengths)])
    return hypo_kl_term(
        s[seqs], s_ref[seqs], estimator="exact", token_kl=tk, token_logps=tl, token_seq_ids=ids
    )


def test_exact_expected_value_and_gradient_are_exact():
    theta, ref = _model(3)
    tok_lp, tok_kl, s, s_ref, prob, kl = _stats(theta, ref)
    expected = 0.0
    for i in range(len(SEQS)):
        term, metrics = _exact_call(tok_lp, tok_kl, s, s_ref, [i], [T])
        assert metrics["kl"].item() == pytest.approx(tok_kl[i].sum().item(), rel=1e-14)
        expected = expected + prob[i] * term
    assert expected.item() == pytest.approx(kl.item(), rel=1e-12)
    torch.testing.assert_close(_grad(expected, theta), _grad(kl, theta), rtol=0, atol=1e-10)


def test_exact_without_score_term_would_be_biased():
    """The fixed-sample gradient Σ_t ∇KL_t alone misses the score term: the test above can fail."""
    theta, ref = _model(3)
    _, tok_kl, _, _, prob, kl = _stats(theta, ref)
    naive = (prob * tok_kl.sum(-1)).sum()
    assert (_grad(naive, theta) - _grad(kl, theta)).abs().max() > 1e-3


def test_exact_batches_ragged_unsorted_sequences():
    theta, ref = _model(4)
    tok_lp, tok_kl, s, s_ref, _, _ = _stats(theta, ref)
    seqs, lengths = [5, 0, 26, 13], [3, 1, 2, 3]
    order = [2, 0, 3, 1]  # sequence blocks laid out out of id order
    tl = torch.cat([tok_lp[seqs[b], : lengths[b]] for b in order])
    tk = torch.cat([tok_kl[seqs[b], : lengths[b]] for b in order])
    ids = torch.cat([torch.full((lengths[b],), b) for b in order])
    term, metrics = hypo_kl_term(
        s[seqs], s_ref[seqs], estimator="exact", token_kl=tk, token_logps=tl, token_seq_ids=ids
    )
    hand, hand_kl = 0.0, []
    for b, n in zip(seqs, lengths, strict=True):
        k, lp = tok_kl[b, :n], tok_lp[b, :n]
        score = sum(k[t + 1 :].sum().detach() * lp[t] for t in range(n))
        hand = hand + k.sum() + score - score.detach()
        hand_kl.append(k.sum().item())
    hand = hand / len(seqs)
    assert term.item() == pytest.approx(hand.item(), rel=1e-14)
    torch.testing.assert_close(metrics["kl"], torch.tensor(hand_kl, dtype=F64))
    torch.testing.assert_close(_grad(term, theta), _grad(hand, theta), rtol=1e-12, atol=1e-14)


def test_rloo_constant_log_ratio_in_group_gives_zero_gradient():
    s = torch.tensor([-3.0, -5.5, -1.25, -2.0, -7.0, -0.5, -4.0], dtype=F64, requires_grad=True)
    groups = torch.tensor([7, 7, 2, 2, 2, 9, 9])
    shift = torch.tensor([0.75, 0.75, -1.5, -1.5, -1.5, 3.0, 3.0], dtype=F64)
    term, metrics = hypo_kl_term(s, s.detach() - shift, estimator="rloo", group_ids=groups)
    (g,) = torch.autograd.grad(term, s)
    assert torch.equal(g, torch.zeros_like(g))
    torch.testing.assert_close(metrics["kl"], shift)
    # REINFORCE on the same batch does push the sequences
    term, _ = hypo_kl_term(s, s.detach() - shift, estimator="reinforce")
    (g,) = torch.autograd.grad(term, s)
    torch.testing.assert_close(g, shift / 7)


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(-50, 5, allow_nan=False), st.integers(0, 3)), min_size=2, max_size=9
    )
)
def test_rloo_advantages_match_leave_one_out_by_hand(data):
    r = [x for x, _ in data]
    g = [k for _, k in data]
    if min(g.count(k) for k in g) < 2:
        with pytest.raises(ValueError, match="group_ids"):
            hypo_kl_term(torch.tensor(r, dtype=F64), torch.zeros(len(r), dtype=F64),
                         estimator="rloo", group_ids=torch.tensor(g))
        return
    s = torch.tensor(r, dtype=F64, requires_grad=True)
    term, metrics = hypo_kl_term(s, torch.zeros(len(r), dtype=F64), estimator="rloo",
                                 group_ids=torch.tensor(g))
    adv = []
    for i, (x, k) in enumerate(data):
        others = [r[j] for j in range(len(r)) if j != i and g[j] == k]
        adv.append(x - sum(others) / len(others))
    torch.testing.assert_close(metrics["advantages"], torch.tensor(adv, dtype=F64))
    (grad,) = torch.autograd.grad(term, s)
    torch.testing.assert_close(grad, torch.tensor(adv, dtype=F64) / len(r))
    assert term.item() == pytest.approx(sum(r) / len(r))
    assert all(not v.requires_grad for v in metrics.values())


_S = torch.tensor([-1.0, -2.0, -3.0])
_TOK = torch.tensor([-0.5, -0.5, -1.0, -1.0, -3.0])


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"estimator": "k3"}, ValueError, "estimator"),
        ({"estimator": "rloo"}, ValueError, "group_ids"),
        ({"estimator": "rloo", "group_ids": torch.tensor([0, 0, 1])}, ValueError, "group_ids"),
        ({"estimator": "rloo", "group_ids": torch.tensor([0.0, 0.0, 0.0])}, TypeError, "group_ids"),
        ({"estimator": "rloo", "group_ids": torch.tensor([0, 0])}, ValueError, "group_ids"),
        ({"estimator": "exact", "token_logps": _TOK,
          "token_seq_ids": torch.tensor([0, 1, 1, 2, 2])},
         ValueError, "token_kl"),
        ({"estimator": "exact", "token_kl": _TOK, "token_logps": _TOK,
          "token_seq_ids": torch.tensor([0, 1, 0, 2, 2])}, ValueError, "contiguous"),
        ({"estimator": "exact", "token_kl": _TOK, "token_logps": _TOK,
          "token_seq_ids": torch.tensor([0, 0, 1, 3, 3])}, ValueError, "token_seq_ids"),
        ({"estimator": "exact", "token_kl": _TOK, "token_logps": _TOK[:4],
          "token_seq_ids": torch.tensor([0, 0, 1, 2, 2])}, ValueError, "token_logps"),
    ],
)
def test_bad_estimator_arguments_are_named(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        hypo_kl_term(_S, _S, **kwargs)


def test_bad_sequence_arguments_are_named():
    with pytest.raises(ValueError, match="ref_seq_logps"):
        hypo_kl_term(_S, _S.to("meta"), estimator="reinforce")
    with pytest.raises(ValueError, match="seq_logps"):
        hypo_kl_term(torch.tensor([]), torch.tensor([]), estimator="reinforce")
    with pytest.raises(TypeError, match="ref_seq_logps"):
        hypo_kl_term(_S, torch.tensor([1, 2, 3]), estimator="reinforce")
