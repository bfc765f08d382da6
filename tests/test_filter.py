"""Gradient filtering of the fused log-prob backward (``filter_eps``), under the interpreter.

The filtered backward must equal the exact one restricted to the kept tiles — ``dH = (dX ⊙ K) W``,
``dW = (dX ⊙ K)ᵀ H``, ``db = Σ_i (dX ⊙ K)`` with K the kept-tile mask of ``filter_tiles`` and
dX the spec's logits gradient — and what each row drops must obey the stated L1 bound
``Σ_{dropped j} |dx_ij| ≤ eps·(|g_lse,i − g_logp,i| + |g_ent,i|)/T``.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import triton
from hypo_fast.kernels import _tiles as TILES
from hypo_fast.kernels import linear_kl as KL
from hypo_fast.kernels import linear_logprob as K
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import BF16, DEVICE, F32, F64, INTERPRET, gen, tma_loads

from hypo_fast import ops
from hypo_fast import reference as R


def peaked_case(seed, n, d, v, *, hot=24, dtype=F32, bias_gap=10.0):
    """A head whose softmax mass sits on a few "frequent" tokens (as a trained LM's does after
    sorting the vocabulary): a bias of +bias_gap/2 on ``hot`` tokens spread over two ranges and
    −bias_gap/2 elsewhere, plus a small h·w term. Labels are mostly hot tokens."""
    g = gen(seed)
    hidden = torch.randn(n, d, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(v, d, generator=g) * 0.7 / d**0.5).to(DEVICE, dtype)
    bias = torch.full((v,), -bias_gap / 2)
    hot_ids = torch.cat([torch.arange(min(hot, v)), torch.arange(v // 2, min(v, v // 2 + 4))])
    bias[hot_ids] = bias_gap / 2
    bias = bias.to(DEVICE, dtype)
    labels = hot_ids[torch.randint(0, len(hot_ids), (n,), generator=g)]
    labels[torch.rand(n, generator=g) < 0.05] = torch.randint(0, v, (1,), generator=g).item()
    labels[torch.rand(n, generator=g) < 0.25] = -100
    return hidden, weight, bias, labels.to(DEVICE), g


def spec_logits_grad(hidden, weight, bias, labels, rows, coefs, *, temperature, softcap, entropy):
    """``dX = ∂L/∂(H W^T + b)`` of the spec for ``L = Σ c·(logp, lse, entropy)`` on the valid
    rows, fp64."""
    x = (hidden[rows].double() @ weight.double().T + bias.double()).requires_grad_()
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    z = z / temperature
    logp, lse = R.logprob_from_logits(z, labels[rows])
    loss = (coefs[0] * logp).sum() + (coefs[1] * lse).sum()
    if entropy:
        loss = loss + (coefs[2] * R.entropy_from_logits(z)).sum()
    return torch.autograd.grad(loss, x)[0]


def run_filtered(hidden, weight, bias, labels, coefs, *, eps, temperature, softcap, entropy,
                 max_fraction=1.0, chunk_bytes=K.CHUNK_BYTES):
    rows = (labels != -100).nonzero().squeeze(1)
    lab = labels[rows]
    width = K.tile_width(hidden.dtype)
    tile_lse = torch.empty(triton.cdiv(weight.shape[0], width), hidden.shape[0], device=DEVICE)
    opts = dict(temperature=temperature, softcap=softcap)
    _, lse, ent, norm, _ = K.logprob_forward(hidden, weight, bias, lab, rows, want_entropy=entropy,
                                             tile_lse=tile_lse, **opts)
    g_logp, g_lse = coefs[0].float(), coefs[1].float()
    g_ent = coefs[2].float() if entropy else None
    grads = K.logprob_backward(hidden, weight, bias, lab, rows, norm, ent, g_logp, g_lse, g_ent,
                               need_bias=True, tile_lse=tile_lse, filter_eps=eps,
                               max_fraction=max_fraction, chunk_bytes=chunk_bytes, **opts)
    bm = K.block_config("backward", hidden.dtype)["BM"]
    keep = K.filter_tiles(tile_lse, lab, lse, ent, g_logp, g_lse, g_ent, eps, bm, width)
    element_keep = keep.repeat_interleave(bm, 0)[: rows.numel()]
    element_keep = element_keep.repeat_interleave(width, 1)[:, : weight.shape[0]]
    return rows, grads, keep, element_keep


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@settings(max_examples=12, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**20),
    n=st.integers(40, 200),
    v=st.integers(100, 700),
    temperature=st.sampled_from([1.0, 0.7]),
    softcap=st.sampled_from([None, 15.0]),
    entropy=st.booleans(),
    eps=st.sampled_from([2.0**-12, 1e-3, 1e-2]),
    gap=st.sampled_from([10.0, 24.0, 30.0]),
)
def test_filtered_equals_exact_on_kept_tiles_and_drops_only_small_entries(
    seed, n, v, temperature, softcap, entropy, eps, gap
):
    hidden, weight, bias, labels, g = peaked_case(seed, n, 32, v, bias_gap=gap)
    rows = (labels != -100).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    coefs = torch.randn(3, rows.numel(), generator=g, dtype=F64).to(DEVICE)
    _, (dh, dw, db), _, element_keep = run_filtered(
        hidden, weight, bias, labels, coefs, eps=eps, temperature=temperature, softcap=softcap,
        entropy=entropy)
    dx = spec_logits_grad(hidden, weight, bias, labels, rows, coefs, temperature=temperature,
                          softcap=softcap, entropy=entropy)
    kept = dx * element_keep
    assert rel(dh, kept @ weight.double()) <= 1e-5  # the valid rows' dH, in their order
    assert rel(dw, kept.T @ hidden[rows].double()) <= 1e-5
    assert rel(db, kept.sum(0)) <= 1e-5
    # the L1 bound on what each row drops (1e-12: fp64 rounding of the sums)
    scale = (coefs[1] - coefs[0]).abs() + (coefs[2].abs() if entropy else 0.0)
    dropped = (dx.abs() * (~element_keep)).sum(1)
    assert bool((dropped <= eps * scale / temperature + 1e-12).all())


def test_filtering_skips_most_tiles_of_a_peaked_head():
    """Not a vacuous filter: on the peaked head most tiles go, and the result moves by little."""
    hidden, weight, bias, labels, g = peaked_case(0, 256, 32, 1000, bias_gap=30.0)
    rows = (labels != -100).nonzero().squeeze(1)
    coefs = torch.randn(3, rows.numel(), generator=g, dtype=F64).to(DEVICE)
    opts = dict(temperature=1.0, softcap=None, entropy=True)
    _, filtered, keep, _ = run_filtered(hidden, weight, bias, labels, coefs, eps=2.0**-12, **opts)
    _, exact, _, _ = run_filtered(hidden, weight, bias, labels, coefs, eps=0.0, **opts)
    assert keep.float().mean() < 0.5
    for a, b in zip(filtered, exact, strict=True):
        assert 0 < rel(a, b) < 1e-2


def test_dense_fallback_is_the_exact_backward_bit_for_bit():
    hidden, weight, bias, labels, g = peaked_case(1, 128, 32, 600)
    rows = (labels != -100).nonzero().squeeze(1)
    coefs = torch.randn(3, rows.numel(), generator=g, dtype=F64).to(DEVICE)
    opts = dict(temperature=1.0, softcap=None, entropy=False)
    _, dense, _, _ = run_filtered(hidden, weight, bias, labels, coefs, eps=2.0**-12,
                                  max_fraction=0.0, **opts)
    _, exact, _, _ = run_filtered(hidden, weight, bias, labels, coefs, eps=0.0, **opts)
    for a, b in zip(dense, exact, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_public_op_filters_deterministically(dtype):
    """``filter_eps`` through ``ops.linear_logprob``: bit-identical across runs, close to exact
    (bf16: its own rounding), and ``filter_eps=None`` differs from the filtered result."""
    hidden, weight, bias, labels, g = peaked_case(2, 192, 32, 800, dtype=dtype, bias_gap=30.0)
    coef = torch.randn(labels.shape, generator=g).to(DEVICE)

    def grads(filter_eps):
        h, w, b = (t.detach().requires_grad_() for t in (hidden, weight, bias))
        out = ops.linear_logprob(h, w, labels, b, backend="triton", filter_eps=filter_eps)
        return torch.autograd.grad((out.logp * coef).sum(), (h, w, b))

    first, second, exact = grads(1e-3), grads(1e-3), grads(None)
    tol = 1e-3 if dtype == F32 else 2e-2
    for a, b, c in zip(first, second, exact, strict=True):
        assert torch.equal(a, b)
        assert rel(a, c) < tol
    assert any(not torch.equal(a, c) for a, c in zip(first, exact, strict=True))


def test_auto_eps_is_a_fraction_of_the_dtype_resolution():
    """``"auto"`` is machine epsilon / 32 (2^-12 for bf16): with it, a bf16 peaked head stays
    within two bf16 roundings (2^-7, relative) of the exact backward."""
    hidden, weight, bias, labels, g = peaked_case(3, 160, 32, 700, dtype=BF16, bias_gap=30.0)
    coef = torch.randn(labels.shape, generator=g).to(DEVICE)
    out = {}
    for mode in ("auto", None):
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        res = ops.linear_logprob(h, w, labels, bias, backend="triton", filter_eps=mode)
        out[mode] = torch.autograd.grad((res.logp * coef).sum(), (h, w))
    assert ops._filter_eps("auto", hidden.detach().requires_grad_(), weight) == 2.0**-12
    for a, b in zip(out["auto"], out[None], strict=True):
        assert rel(a, b) < 2.0**-7


def test_block_sparse_backward_of_a_strided_hidden_wider_than_a_block():
    """The block-sparse kernels on hidden states d = 96 wide (not a multiple of their d-block
    of 64) read as a column slice of a 128-wide buffer (row stride 128, not d): the same bits
    as on a contiguous copy, within the filter's error of the exact backward, every column of
    dH and dW written."""
    hidden, weight, bias, labels, g = peaked_case(7, 96, 96, 330, bias_gap=30.0)
    coefs = torch.randn(3, int((labels != -100).sum()), generator=g, dtype=F64).to(DEVICE)
    wide = torch.zeros(96, 128, device=DEVICE)
    wide[:, :96] = hidden
    run = functools.partial(run_filtered, weight=weight, bias=bias, labels=labels, coefs=coefs,
                            temperature=1.0, softcap=None, entropy=True)
    _, strided, keep, _ = run(wide[:, :96], eps=1e-3)
    _, copied, _, _ = run(hidden, eps=1e-3)
    _, exact, _, _ = run(hidden, eps=0.0)
    assert 0 < keep.float().mean() < 0.5  # the block-sparse path ran, skipping tiles
    for a, b, c in zip(strided, copied, exact, strict=True):
        assert torch.equal(a, b)
        assert rel(a, c) < 1e-3


@pytest.mark.parametrize("max_fraction", [1.0, 0.0])
@pytest.mark.parametrize("tiles_per_chunk", [1, 3])
def test_filtered_backward_with_tma_loads(tiles_per_chunk, max_fraction, monkeypatch):
    """bf16 (descriptor loads serve 16-bit heads): the filtered backward, sparse and dense
    fallback, over several chunks, loads through descriptors and computes what gathered pointer
    loads compute (bit for bit under the interpreter)."""
    hidden, weight, bias, labels, g = peaked_case(6, 96, 32, 330, dtype=BF16, bias_gap=30.0)
    coefs = torch.randn(3, int((labels != -100).sum()), generator=g, dtype=F64).to(DEVICE)
    made = []
    real = TILES.TensorDescriptor.from_tensor
    monkeypatch.setattr(TILES.TensorDescriptor, "from_tensor",
                        lambda t, block: made.append(block) or real(t, block))
    chunk = int((labels != -100).sum()) * 2 * K.tile_width(BF16) * tiles_per_chunk
    out = []
    for tma in (False, True):
        with tma_loads(tma):
            out.append(run_filtered(hidden, weight, bias, labels, coefs, eps=1e-3,
                                    temperature=1.0, softcap=None, entropy=True,
                                    max_fraction=max_fraction, chunk_bytes=chunk)[1])
    assert len(made) == 4  # forward and backward: H and W each
    for a, b in zip(*out, strict=True):
        if INTERPRET:
            assert torch.equal(a, b)
        else:
            assert rel(a, b) < 1e-2


@pytest.mark.parametrize("tiles_per_chunk", [1, 2, 3])
def test_filtered_backward_is_the_same_over_any_chunking(tiles_per_chunk):
    """The kept-tile bookkeeping (pairs by tile, segments of each row block per chunk) cut into
    chunks of 1-3 tiles — empty chunks and a partial last tile included — gives the gradients of
    one chunk: dW and db bit for bit (each chunk computes its rows whole), dH up to the fp32
    rounding of summing the chunks' partial products in another order."""
    hidden, weight, bias, labels, g = peaked_case(4, 96, 32, 330, bias_gap=30.0)
    rows = (labels != -100).nonzero().squeeze(1)
    lab = labels[rows]
    width = K.tile_width(hidden.dtype)
    tile_lse = torch.empty(triton.cdiv(weight.shape[0], width), hidden.shape[0], device=DEVICE)
    norm = K.logprob_forward(hidden, weight, bias, lab, rows, tile_lse=tile_lse).norm
    g_logp = torch.randn(rows.numel(), generator=g).to(DEVICE)

    def backward(chunk_bytes):
        return K.logprob_backward(hidden, weight, bias, lab, rows, norm, None, g_logp, None, None,
                                  need_bias=True, tile_lse=tile_lse, filter_eps=1e-3,
                                  max_fraction=1.0, chunk_bytes=chunk_bytes)

    (dh1, dw1, db1) = backward(1 << 30)
    (dh2, dw2, db2) = backward(rows.numel() * hidden.element_size() * width * tiles_per_chunk)
    assert torch.equal(dw1, dw2) and torch.equal(db1, db2)
    assert rel(dh2, dh1) < 1e-6


@pytest.mark.parametrize("softcap", [None, 15.0])
def test_filtered_backward_on_narrower_dx_tiles(softcap):
    """dX tiles half the forward's tile width (what a softcap gets on a GPU): each kept tile is
    computed as its two halves, so the gradients are those of full-width tiles; a width that
    does not divide the forward's tiles is refused."""
    hidden, weight, bias, labels, g = peaked_case(8, 96, 32, 330, bias_gap=30.0)
    rows = (labels != -100).nonzero().squeeze(1)
    lab = labels[rows]
    width = K.tile_width(hidden.dtype)
    tile_lse = torch.empty(triton.cdiv(weight.shape[0], width), hidden.shape[0], device=DEVICE)
    norm = K.logprob_forward(hidden, weight, bias, lab, rows, softcap=softcap,
                             tile_lse=tile_lse).norm
    g_logp = torch.randn(rows.numel(), generator=g).to(DEVICE)

    def backward(bn):
        config = {**K.backward_config(hidden.dtype, softcap), "BN": bn}
        return K.logprob_backward(hidden, weight, bias, lab, rows, norm, None, g_logp, None,
                                  None, softcap=softcap, need_bias=True, tile_lse=tile_lse,
                                  filter_eps=1e-3, max_fraction=1.0, config=config)

    full, half = backward(width), backward(width // 2)
    assert full[0].abs().sum() > 0
    for a, b in zip(half, full, strict=True):
        assert rel(a, b) < 1e-6
    with pytest.raises(ValueError, match="dividing tile_width"):
        backward(width // 2 + 16)


# --------------------------------------------------------------------------------------------
# linear_kl's filtered backward
# --------------------------------------------------------------------------------------------


def run_kl_filtered(seed, n, v, *, reverse, eps, temperature, softcap, gap, distance=0.1):
    """The KL launchers on a peaked policy head and a copy of it perturbed by about
    ``distance`` (relative) as the reference: ``(rows, labels, coefs, (dH, dW, db),
    element_keep, keep)`` of a filtered backward."""
    hidden, weight, bias, labels, g = peaked_case(seed, n, 32, v, bias_gap=gap)
    ref_weight = weight * (1 + distance * torch.randn(weight.shape, generator=g).to(DEVICE))
    ref_bias = bias + 10 * distance * torch.randn(bias.shape, generator=g).to(DEVICE)
    rows = (labels != -100).nonzero().squeeze(1)
    lab = labels[rows]
    policy = KL.Head(hidden, weight, bias)
    ref = KL.Head(hidden * (1 - distance), ref_weight, ref_bias)
    width = KL.tile_width(hidden.dtype)
    stats = torch.empty(KL.TILE_STATS, triton.cdiv(v, width), n, device=DEVICE)
    opts = dict(reverse=reverse, temperature=temperature, softcap=softcap)
    st = KL.kl_forward(policy, ref, rows, lab, want_entropy=True, tile_stats=stats, **opts)
    coefs = torch.randn(3, rows.numel(), generator=g).to(DEVICE)
    grads = KL.kl_backward(policy, ref, rows, lab, st.norm, st.entropy, *coefs, need_bias=True,
                           tile_stats=stats, filter_eps=eps, max_fraction=1.0, **opts)
    bm = KL.two_head_config("backward", hidden.dtype)["BM"]
    keep = KL.filter_tiles(stats, st.norm, lab, st.entropy, *coefs, reverse, eps, bm, width)
    element_keep = keep.repeat_interleave(bm, 0)[: rows.numel()]
    element_keep = element_keep.repeat_interleave(width, 1)[:, :v]
    return (hidden, weight, bias, ref, rows, lab, coefs), grads, element_keep, keep


@settings(max_examples=12, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**20),
    n=st.integers(40, 160),
    v=st.integers(100, 600),
    reverse=st.booleans(),
    temperature=st.sampled_from([1.0, 0.7]),
    softcap=st.sampled_from([None, 15.0]),
    eps=st.sampled_from([2.0**-12, 1e-3, 1e-2]),
    gap=st.sampled_from([10.0, 30.0]),
    distance=st.sampled_from([0.1, 0.01, 1e-4]),
)
def test_kl_filtered_equals_exact_on_kept_tiles_and_drops_only_small_entries(
    seed, n, v, reverse, temperature, softcap, eps, gap, distance
):
    """As the log-prob op's: the filtered KL backward is the exact one restricted to the kept
    tiles, and what each row drops obeys ``filter_tiles``' L1 bound, for far and close heads."""
    case, (dh, dw, db), element_keep, _ = run_kl_filtered(
        seed, n, v, reverse=reverse, eps=eps, temperature=temperature, softcap=softcap, gap=gap,
        distance=distance)
    hidden, weight, bias, ref, rows, lab, coefs = case
    if rows.numel() == 0:
        return
    x = (hidden[rows].double() @ weight.double().T + bias.double()).requires_grad_()
    z = (x if softcap is None else R.soft_cap(x, softcap)) / temperature
    r = R.linear_logits(ref.hidden[rows].double(), ref.weight.double(), ref.bias.double(),
                        temperature=temperature, softcap=softcap)
    c = coefs.double()
    loss = ((c[0] * R.kl_from_logits(z, r, "reverse" if reverse else "forward")).sum()
            + (c[1] * R.entropy_from_logits(z)).sum()
            + (c[2] * R.logprob_from_logits(z, lab)[0]).sum())
    dx = torch.autograd.grad(loss, x)[0]
    kept = dx * element_keep
    assert rel(dh, kept @ weight.double()) <= 1e-5
    assert rel(dw, kept.T @ hidden[rows].double()) <= 1e-5
    assert rel(db, kept.sum(0)) <= 1e-5
    dropped = (dx.abs() * (~element_keep)).sum(1)
    assert bool((dropped <= eps * c.abs().sum(0) / temperature + 1e-12).all())


@pytest.mark.parametrize("flushed", ["whole tile", "all but one"])
def test_kl_forward_filter_keeps_a_tile_whose_policy_mass_underflowed(flushed):
    """Forward KL, the policy's mass in tile 0 and the reference's partly in tile 1, whose
    policy logits are so low that their terms flush to 0 in the forward's tile sum (all of
    them: the statistic is -inf; all but one: it is finite but ~20x too small). |p − q| there
    sums to ~1 or 0.03, so tile 1 must be kept and the filtered dH stays within the bound
    (found by review: bounds through the flushed P read 0, then ~W times too little)."""
    n, d, v = 1, 32, 1024
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(v, d, generator=g) * 0.01).to(DEVICE)
    hidden = torch.randn(n, d, generator=g).to(DEVICE)
    width = KL.tile_width(hidden.dtype)
    tile1 = slice(width, 2 * width)
    bias, ref_bias = (torch.full((v,), -150.0, device=DEVICE) for _ in range(2))
    bias[:width] = ref_bias[:width] = 0.0
    if flushed == "whole tile":
        ref_bias[tile1] = 10.0
    else:  # the interpreter's exp keeps subnormals: e^-103 survives, e^-104.6 does not
        weight[tile1], hidden = 0.01, hidden * 1e-4
        bias[width], bias[width + 1:2 * width] = -103.0, -104.6
        ref_bias[width], ref_bias[width + 1:2 * width] = -200.0, -3.46
    policy, ref = KL.Head(hidden, weight, bias), KL.Head(hidden, weight, ref_bias)
    rows, eps, g_kl = torch.arange(n, device=DEVICE), 2e-3, torch.ones(n, device=DEVICE)
    stats = torch.empty(KL.TILE_STATS, triton.cdiv(v, width), n, device=DEVICE)
    norm = KL.kl_forward(policy, ref, rows, reverse=False, tile_stats=stats).norm
    true_lse = torch.logsumexp((hidden @ weight.T + bias)[0, tile1].double(), 0)
    if flushed == "whole tile":  # the cases themselves
        assert stats[0, 1, 0] == -math.inf
    else:
        assert -math.inf < stats[0, 1, 0] < true_lse - 2
    keep = KL.filter_tiles(stats, norm, None, None, g_kl, None, None, False, eps,
                           KL.two_head_config("backward", hidden.dtype)["BM"], width)
    assert bool(keep[0, 1])
    exact = KL.kl_backward(policy, ref, rows, None, norm, None, g_kl, None, None,
                           reverse=False)[0]
    filtered = KL.kl_backward(policy, ref, rows, None, norm, None, g_kl, None, None,
                              reverse=False, tile_stats=stats, filter_eps=eps,
                              max_fraction=1.0)[0]
    assert (exact - filtered).abs().max() <= eps * weight.abs().max()


@pytest.mark.parametrize("reverse", [True, False])
def test_kl_filtering_skips_more_of_a_closer_reference(reverse):
    """The bounds shrink with the heads' distance: with the KL term alone (no labels), a
    reference 1% from the policy lets the filter skip at least as many tiles as one 10% away,
    and one 0.01% away most of them (what is skipped obeys the bound: property-tested above)."""
    n, v = 256, 1000
    hidden, weight, bias, _, g = peaked_case(0, n, 32, v, bias_gap=10.0)
    rows = torch.arange(n, device=DEVICE)
    width = KL.tile_width(hidden.dtype)
    bm = KL.two_head_config("backward", hidden.dtype)["BM"]
    g_kl = torch.randn(n, generator=g).to(DEVICE)
    kept = []
    for distance in (0.1, 0.01, 1e-4):
        ref = KL.Head(hidden * (1 - distance),
                      weight * (1 + distance * torch.randn(weight.shape, generator=g).to(DEVICE)),
                      bias + 10 * distance * torch.randn(bias.shape, generator=g).to(DEVICE))
        stats = torch.empty(KL.TILE_STATS, triton.cdiv(v, width), n, device=DEVICE)
        norm = KL.kl_forward(KL.Head(hidden, weight, bias), ref, rows, reverse=reverse,
                             tile_stats=stats).norm
        keep = KL.filter_tiles(stats, norm, None, None, g_kl, None, None, reverse, 2.0**-12, bm,
                               width)
        kept.append(float(keep.float().mean()))
    assert kept[0] >= kept[1] >= kept[2]
    assert kept[2] < 0.5 * kept[0], kept


@pytest.mark.parametrize("reverse", [True, False])
def test_kl_filtering_skips_tiles_of_a_peaked_head(reverse):
    """Not a vacuous filter: on peaked heads many tiles go, and the result moves by little."""
    kw = dict(reverse=reverse, temperature=1.0, softcap=None, gap=30.0)
    _, filtered, _, keep = run_kl_filtered(0, 256, 1000, eps=1e-2, **kw)
    _, exact, _, _ = run_kl_filtered(0, 256, 1000, eps=0.0, **kw)
    assert keep.float().mean() < 0.75
    for a, b in zip(filtered, exact, strict=True):
        assert 0 < rel(a, b) < 2e-2


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_public_kl_op_filters_deterministically(direction, monkeypatch):
    """``ops.linear_kl(filter_eps=...)``: the block-sparse backward runs (tiles are dropped),
    its gradients are within the filter's reach of the exact ones (here the dropped tiles carry
    ~e^-30 of the mass, so they may round to the same bits) and bit-identical run to run;
    without gradients to compute the forward records no tile statistics (ε resolves to 0)."""
    kept, real = [], KL.filter_tiles

    def spy(*args, **kwargs):
        keep = real(*args, **kwargs)
        kept.append(float(keep.float().mean()))
        return keep

    monkeypatch.setattr(KL, "filter_tiles", spy)
    hidden, weight, bias, labels, g = peaked_case(9, 128, 32, 700, bias_gap=30.0)
    hidden.requires_grad_()
    ref_weight = weight * (1 + 0.1 * torch.randn(weight.shape, generator=g).to(DEVICE))
    coef = torch.randn(128, generator=g).to(DEVICE)

    def grads(filter_eps):
        out = ops.linear_kl(hidden, weight, hidden.detach() * 0.9, ref_weight, bias=bias,
                            ref_bias=bias, labels=labels, direction=direction,
                            filter_eps=filter_eps, backend="triton")
        return torch.autograd.grad((out.kl * coef).sum() + out.logp.sum(), hidden)[0]

    exact, filtered = grads(None), grads(1e-2)
    assert len(kept) == 1 and kept[0] < 0.5  # the exact backward filters nothing
    assert rel(filtered, exact) < 2e-2
    assert torch.equal(filtered, grads(1e-2))
    assert ops._filter_eps("auto", hidden.detach(), weight) == 0.0
    with torch.no_grad():  # a reference forward: no backward to filter, no tile statistics
        assert ops._filter_eps("auto", hidden, weight) == 0.0
    assert ops._filter_eps("auto", hidden, weight) == torch.finfo(hidden.dtype).eps / 32


# ---------------------------------------------------------------------------------------------
# The bounds one term at a time (with every gradient term on, the other terms' slack hid a
# bound ~10-20% too small), per-row decisions, eps swept to just below each tile's true Σ|dz|


def tile_sums(dx, n_tiles, width):
    """``[n, n_tiles]``: Σ_{j in tile} |dx_ij| of a ``[n, V]`` logits gradient."""
    n, v = dx.shape
    return torch.nn.functional.pad(dx.abs(), (0, n_tiles * width - v)).view(n, n_tiles, -1).sum(2)


def assert_drops_within_budget(per_tile, scale, keep_at):
    """For ε at 97% of every (row, tile)'s Σ|dz| / scale (60 of them): what ``keep_at(ε)`` drops
    adds up, per row, to at most ε·scale."""
    edges = sorted(set((per_tile * 0.97 / scale[:, None]).flatten().tolist()))
    for eps in edges[:: max(1, len(edges) // 60)]:
        dropped = (per_tile * (~keep_at(eps)).double()).sum(1)
        assert bool((dropped <= eps * scale + 1e-12).all()), (eps, (dropped - eps * scale).max())


def test_logprob_drops_obey_the_bound_of_the_entropy_term_alone():
    """g_lse = g_logp (no label term) and a low-mass tile uniform inside (its entropy log W, the
    bound's worst case)."""
    g = gen(0)
    n, d, v = 40, 32, 300
    hidden = torch.randn(n, d, generator=g).to(DEVICE)
    weight = (torch.randn(v, d, generator=g) * 3.0 / d**0.5).to(DEVICE)
    weight[64:128] = 0.0
    bias = torch.randn(v, generator=g).to(DEVICE)
    bias[64:128] = -3.0
    labels = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    rows = torch.arange(n, device=DEVICE)
    width = K.tile_width(hidden.dtype)
    tile_lse = torch.empty(triton.cdiv(v, width), n, device=DEVICE)
    fwd = K.logprob_forward(hidden, weight, bias, labels, rows, want_entropy=True,
                            tile_lse=tile_lse)
    g_ent, g_logp = (torch.randn(n, generator=g).to(DEVICE) for _ in range(2))
    dx = spec_logits_grad(hidden, weight, bias, labels, rows,
                          (g_logp.double(), g_logp.double(), g_ent.double()), temperature=1.0,
                          softcap=None, entropy=True)
    assert_drops_within_budget(
        tile_sums(dx, tile_lse.shape[0], width), g_ent.double().abs(),
        lambda eps: K.filter_tiles(tile_lse, labels, fwd.lse, fwd.entropy, g_logp, g_logp, g_ent,
                                   eps, 1, width))


@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("favoured", [None, 1.0, 3.0], ids=["random", "ref+1", "ref+3"])
def test_kl_drops_obey_the_bound_of_the_kl_term_alone(reverse, favoured):
    """The KL gradient alone: a random reference nearby, or one that puts e^c more weight on one
    low-mass tile while the others are negligible (there |dz| = p·|x − KL| exceeds p·max|x| by
    p·KL: the |KL| term of the bound covers it)."""
    g = gen(3)
    n, d, v = 24, 32, 400
    hidden = torch.randn(n, d, generator=g)
    if favoured is None:
        weight = torch.randn(v, d, generator=g) * 2 / d**0.5
        bias = torch.randn(v, generator=g) * 3
        ref_w = weight + 0.3 * torch.randn(v, d, generator=g) * 2 / d**0.5
        ref_b = bias + 0.9 * torch.randn(v, generator=g)
    else:
        weight = ref_w = torch.randn(v, d, generator=g) * 0.05
        bias = torch.full((v,), -30.0)  # negligible tiles: no slack of theirs pads the budget
        bias[:64], bias[192:256] = 4.0, 0.0
        ref_b = bias.clone()
        ref_b[192:256] += favoured
    hidden, weight, bias = hidden.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)
    ref_w, ref_b = ref_w.to(DEVICE), ref_b.to(DEVICE)
    width = KL.tile_width(hidden.dtype)
    stats = torch.empty(KL.TILE_STATS, triton.cdiv(v, width), n, device=DEVICE)
    st = KL.kl_forward(KL.Head(hidden, weight, bias), KL.Head(hidden, ref_w, ref_b),
                       torch.arange(n, device=DEVICE), reverse=reverse, tile_stats=stats)
    g_kl = torch.randn(n, generator=g).to(DEVICE)
    x = (hidden.double() @ weight.double().T + bias.double()).requires_grad_()
    kl = R.kl_from_logits(x, hidden.double() @ ref_w.double().T + ref_b.double(),
                          "reverse" if reverse else "forward")
    (dx,) = torch.autograd.grad((g_kl.double() * kl).sum(), x)
    assert_drops_within_budget(
        tile_sums(dx, stats.shape[1], width), g_kl.double().abs(),
        lambda eps: KL.filter_tiles(stats, st.norm, None, None, g_kl, None, None, reverse, eps, 1,
                                    width))


def test_recorded_tile_masses_bound_the_true_ones_at_extreme_logits():
    """The forward's per-tile log-sum-exps, as ``log_mass`` reads them, are upper bounds of each
    tile's fp64 mass at logits ~±1e3 (the bounds' rounding slack); masses below e^-80 may read
    as 0 (documented)."""
    g = gen(1)
    n, d, v = 40, 32, 300
    hidden = torch.randn(n, d, generator=g).to(DEVICE)
    weight = (torch.randn(v, d, generator=g) * 350.0 / d**0.5).to(DEVICE)
    bias = torch.randn(v, generator=g).to(DEVICE)
    labels = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    width = K.tile_width(hidden.dtype)
    tile_lse = torch.empty(triton.cdiv(v, width), n, device=DEVICE)
    fwd = K.logprob_forward(hidden, weight, bias, labels, torch.arange(n, device=DEVICE),
                            tile_lse=tile_lse)
    z = hidden.double() @ weight.double().T + bias.double()
    padded = torch.nn.functional.pad(z, (0, tile_lse.shape[0] * width - v), value=-math.inf)
    true = (torch.logsumexp(padded.view(n, -1, width), 2) - torch.logsumexp(z, 1)[:, None]).T
    got = TILES.log_mass(tile_lse, fwd.lse[None, :]).double()
    ok = (got >= true) | (true < -80)
    assert bool(ok.all()), (true - got)[~ok].max()
