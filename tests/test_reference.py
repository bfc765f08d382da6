"""reference.py checked against independent facts (not against itself).

Independent facts used: torch's cross_entropy / logsumexp / softmax on logits built by hand,
Python loops for per-sequence sums, closed-form gradients w.r.t. the logits, Monte-Carlo means of
the k1/k3 estimators, exact enumeration for k2's expected gradient, finite differences
(gradcheck), and the argument validation contract of _checks.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypo_fast import reference as R

F64 = torch.float64
HYP = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every tensor here is tiny: one intra-op thread avoids OpenMP spin-waits, which make the
    tests many times slower on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_logits(h, w, b=None, *, temperature=1.0, softcap=None):
    """Logits in fp64, written out independently of reference.linear_logits."""
    z = torch.einsum("...d,vd->...v", h.to(F64), w.to(F64))
    if b is not None:
        z = z + b.to(F64)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


# --------------------------------------------------------------------------------------------
# linear_logprob: values against cross_entropy / logsumexp / a Python loop
# --------------------------------------------------------------------------------------------


@st.composite
def head_cases(draw):
    B = draw(st.integers(1, 3))
    L = draw(st.integers(1, 5))
    case = dict(
        B=B,
        L=L,
        d=draw(st.integers(1, 12)),
        V=draw(st.integers(2, 40)),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        temperature=draw(st.just(1.0) | st.floats(0.3, 3.0)),
        softcap=draw(st.none() | st.floats(0.5, 20.0)),
        use_bias=draw(st.booleans()),
        ignore_index=draw(st.sampled_from([-100, -1])),
        p_ignore=draw(st.sampled_from([0.0, 0.3, 0.7])),
        dead_seq=draw(st.integers(-1, B - 1)),  # a sequence whose every token is ignored
        label_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        use_weights=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return case


def build_head(c):
    g = gen(c["seed"])
    B, L, d, V = c["B"], c["L"], c["d"], c["V"]
    hidden = torch.randn(B, L, d, generator=g).to(c["dtype"])
    weight = (torch.randn(V, d, generator=g) * (3.0 / math.sqrt(d))).to(c["dtype"])
    bias = torch.randn(V, generator=g).to(c["dtype"]) if c["use_bias"] else None
    labels = torch.randint(0, V, (B, L), generator=g)
    ignored = torch.rand(B, L, generator=g) < c["p_ignore"]
    dead = c["dead_seq"] if B > 1 else -1
    if dead >= 0:
        ignored[dead] = True
    if not (~ignored).any():
        keep = 0 if dead != 0 else 1
        ignored[keep, 0] = False
    labels = torch.where(ignored, c["ignore_index"], labels).to(c["label_dtype"])
    seq_ids = torch.arange(B)[:, None].expand(B, L).to(c["label_dtype"])
    token_weights = torch.rand(B, L, generator=g) * 2 if c["use_weights"] else None
    return hidden, weight, bias, labels, seq_ids, token_weights


@HYP
@given(head_cases())
def test_logprob_matches_cross_entropy_logsumexp_and_loops(c):
    hidden, weight, bias, labels, seq_ids, token_weights = build_head(c)
    V, ii = c["V"], c["ignore_index"]
    out = R.linear_logprob(
        hidden, weight, labels, bias, ignore_index=ii, temperature=c["temperature"],
        softcap=c["softcap"], seq_ids=seq_ids, token_weights=token_weights, return_entropy=True,
    )
    for name in ("logp", "lse", "entropy", "seq_sum", "seq_count"):
        assert getattr(out, name).dtype == torch.float32, name
    assert out.logp.shape == labels.shape and out.lse.shape == labels.shape

    z = hand_logits(hidden, weight, bias, temperature=c["temperature"], softcap=c["softcap"])
    valid = labels != ii
    ce = F.cross_entropy(
        z.reshape(-1, V), labels.reshape(-1).long(), ignore_index=ii, reduction="none"
    ).reshape(labels.shape)
    exp_logp = -ce
    exp_lse = torch.where(valid, torch.logsumexp(z, -1), 0.0)
    p = torch.softmax(z, -1)
    exp_ent = torch.where(valid, -(p * torch.log_softmax(z, -1)).sum(-1), 0.0)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logp.double(), exp_logp, **tol)
    torch.testing.assert_close(out.lse.double(), exp_lse, **tol)
    torch.testing.assert_close(out.entropy.double(), exp_ent, **tol)
    assert (out.logp[~valid] == 0).all() and (out.lse[~valid] == 0).all()
    assert (out.entropy >= -1e-5).all() and (out.entropy <= math.log(V) + 1e-4).all()
    assert (out.logp <= 1e-5).all()

    # per-sequence statistics against a Python loop
    S = c["B"]
    sums, wsums, counts = [0.0] * S, [0.0] * S, [0] * S
    flat_lp, flat_y, flat_s = exp_logp.reshape(-1), labels.reshape(-1), seq_ids.reshape(-1)
    flat_w = token_weights.reshape(-1) if token_weights is not None else None
    for i in range(flat_y.numel()):
        if int(flat_y[i]) == ii:
            continue
        s = int(flat_s[i])
        sums[s] += float(flat_lp[i])
        counts[s] += 1
        if flat_w is not None:
            wsums[s] += float(flat_w[i]) * float(flat_lp[i])
    torch.testing.assert_close(out.seq_sum.double(), torch.tensor(sums, dtype=F64), **tol)
    assert out.seq_count.tolist() == [float(n) for n in counts]
    if c["dead_seq"] >= 0 and S > 1:
        assert out.seq_count[c["dead_seq"]] == 0 and out.seq_sum[c["dead_seq"]] == 0
    if token_weights is None:
        assert out.seq_weighted_sum is None
    else:
        torch.testing.assert_close(
            out.seq_weighted_sum.double(), torch.tensor(wsums, dtype=F64), **tol
        )


def test_packed_seq_ids_and_explicit_num_seqs():
    g = gen(1)
    hidden, weight = torch.randn(7, 5, generator=g), torch.randn(11, 5, generator=g)
    labels = torch.tensor([3, -100, 0, 10, 4, -100, 7])
    seq_ids = torch.tensor([2, 0, 2, 0, 1, 1, 2])  # interleaved, not sorted
    w = torch.tensor([0.5, 9.0, 2.0, 1.0, -1.0, 3.0, 0.0])
    out = R.linear_logprob(hidden, weight, labels, seq_ids=seq_ids, num_seqs=5, token_weights=w)
    lp = -F.cross_entropy(hand_logits(hidden, weight), labels, reduction="none")
    exp_sum = torch.zeros(5, dtype=F64)
    exp_w = torch.zeros(5, dtype=F64)
    exp_n = torch.zeros(5)
    for i in range(7):
        if labels[i] != -100:
            exp_sum[seq_ids[i]] += lp[i]
            exp_w[seq_ids[i]] += w[i].double() * lp[i]
            exp_n[seq_ids[i]] += 1
    assert out.seq_sum.shape == (5,)
    torch.testing.assert_close(out.seq_sum.double(), exp_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.seq_weighted_sum.double(), exp_w, rtol=1e-5, atol=1e-5)
    assert out.seq_count.tolist() == exp_n.tolist() == [1.0, 1.0, 3.0, 0.0, 0.0]


def test_uniform_logits_entropy_is_log_v():
    V = 37
    hidden = torch.randn(4, 8, generator=gen(2))
    weight = torch.zeros(V, 8)
    labels = torch.tensor([0, 5, 36, -100])
    out = R.linear_logprob(hidden, weight, labels, return_entropy=True)
    logv = torch.full((3,), math.log(V))
    torch.testing.assert_close(out.entropy[:3], logv)
    torch.testing.assert_close(out.lse[:3], logv)
    torch.testing.assert_close(out.logp[:3], -logv)
    assert out.entropy[3] == 0


def test_peaked_logits_entropy_near_zero():
    weight = torch.zeros(20, 3)
    weight[7] = torch.tensor([100.0, 0.0, 0.0])
    out = R.linear_logprob(torch.tensor([[1.0, 0.0, 0.0]]), weight, torch.tensor([7]),
                           return_entropy=True)
    assert 0 <= out.entropy.item() < 1e-30 or out.entropy.item() < 1e-6
    assert abs(out.logp.item()) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("cap", [0.7, 3.0, 30.0])
def test_softcap_equals_hand_tanh(cap, temperature):
    g = gen(3)
    hidden, weight, bias = torch.randn(6, 4, generator=g) * 3, torch.randn(9, 4, generator=g), \
        torch.randn(9, generator=g)
    labels = torch.tensor([0, 8, 3, -100, 5, 1])
    out = R.linear_logprob(hidden, weight, labels, bias, softcap=cap, temperature=temperature,
                           return_entropy=True)
    raw = hidden.double() @ weight.double().T + bias.double()
    z = cap * torch.tanh(raw / cap) / temperature
    assert z.abs().max() <= cap / temperature + 1e-12
    valid = labels != -100
    lse = torch.logsumexp(z, -1)
    lp = z.gather(1, labels.clamp(min=0)[:, None])[:, 0] - lse
    torch.testing.assert_close(out.logp.double(), torch.where(valid, lp, 0.0), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(out.lse.double(), torch.where(valid, lse, 0.0), rtol=1e-5,
                               atol=1e-5)
    # capped logits bound the log-sum-exp and the log-prob
    assert (out.lse[valid] <= cap / temperature + math.log(9) + 1e-4).all()
    assert (out.logp[valid] >= -2 * cap / temperature - math.log(9) - 1e-4).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_softcap_gradient_is_sech_squared_also_where_tanh_saturates(dtype):
    """The softcap's value is c·tanh(x/c) and its derivative sech²(x/c) = 1/cosh²(x/c) (here
    from cosh in fp64) to within rounding, at 0, in the linear range and where tanh saturates:
    there ``1 − tanh²`` (torch.tanh's backward) cancels to 0, which would make a kernel that gets
    these tiny gradients right look wrong against the spec."""
    c = 20.0
    x = torch.tensor([-1500.0, -549.0, -120.0, -3.0, 0.0, 1e-4, 2.5, 200.0, 700.0], dtype=dtype,
                     requires_grad=True)
    z = R.soft_cap(x, c)
    (slope,) = torch.autograd.grad(z.sum(), x)
    u = x.detach().double() / c
    torch.testing.assert_close(z.double(), c * torch.tanh(u), rtol=4 * torch.finfo(dtype).eps,
                               atol=0.0)
    want = 1.0 / torch.cosh(u) ** 2
    normal = want >= torch.finfo(dtype).tiny  # below it the dtype keeps few digits
    assert bool((want[normal] > 0).all()) and int(normal.sum()) >= 7
    torch.testing.assert_close(slope.double()[normal], want[normal],
                               rtol=64 * torch.finfo(dtype).eps, atol=0.0)
    assert bool((slope.double()[~normal] <= 2 * torch.finfo(dtype).tiny).all())


def test_softcap_changes_result_and_large_cap_is_identity():
    g = gen(4)
    hidden, weight = torch.randn(5, 4, generator=g, dtype=F64) * 4, torch.randn(
        8, 4, generator=g, dtype=F64)
    labels = torch.arange(5)
    plain = R.linear_logprob(hidden, weight, labels)
    capped = R.linear_logprob(hidden, weight, labels, softcap=1.0)
    huge = R.linear_logprob(hidden, weight, labels, softcap=1e7)
    assert not torch.allclose(plain.logp, capped.logp, atol=1e-3)
    torch.testing.assert_close(huge.logp, plain.logp, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("T", [0.25, 0.8, 3.0])
def test_temperature_equals_scaled_hidden(T):
    g = gen(5)
    hidden = torch.randn(2, 4, 6, generator=g, dtype=F64)
    weight = torch.randn(13, 6, generator=g, dtype=F64)
    bias = torch.randn(13, generator=g, dtype=F64)
    labels = torch.tensor([[1, 2, -100, 12], [0, 0, 5, 7]])
    seq_ids = torch.tensor([[0] * 4, [1] * 4])
    kw = dict(seq_ids=seq_ids, return_entropy=True)
    a = R.linear_logprob(hidden, weight, labels, temperature=T, **kw)
    b = R.linear_logprob(hidden / T, weight, labels, **kw)
    for name in ("logp", "lse", "entropy", "seq_sum"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-10)
    # with a bias, the bias is divided by T as well
    a = R.linear_logprob(hidden, weight, labels, bias, temperature=T, **kw)
    b = R.linear_logprob(hidden / T, weight, labels, bias / T, **kw)
    torch.testing.assert_close(a.logp, b.logp, rtol=1e-10, atol=1e-10)
    # and temperature actually matters
    c = R.linear_logprob(hidden, weight, labels, bias, **kw)
    assert not torch.allclose(a.logp, c.logp, atol=1e-3)


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "softcap"), [(1.0, None), (0.7, 2.0)])
def test_gradcheck_linear_logprob(temperature, softcap):
    g = gen(6)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=F64, requires_grad=True)
    tw = torch.rand(2, 3, generator=g, dtype=F64, requires_grad=True)
    labels = torch.tensor([[0, 4, -100], [2, 2, 1]])
    seq_ids = torch.tensor([[0, 0, 0], [1, 1, 1]])

    def fn(h, w, b, t):
        o = R.linear_logprob(h, w, labels, b, temperature=temperature, softcap=softcap,
                             seq_ids=seq_ids, token_weights=t, return_entropy=True)
        return o.logp, o.lse, o.entropy, o.seq_sum, o.seq_weighted_sum

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias, tw))


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize(("temperature", "softcap"), [(1.0, None), (1.3, 3.0)])
def test_gradcheck_linear_kl(direction, temperature, softcap):
    g = gen(7)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    ref_hidden = torch.randn(2, 3, 5, generator=g, dtype=F64)
    ref_weight = torch.randn(6, 5, generator=g, dtype=F64)
    ref_bias = torch.randn(6, generator=g, dtype=F64)
    labels = torch.tensor([[0, 5, -100], [2, 3, 1]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    seq_ids = torch.tensor([[0, 0, 0], [1, 1, 1]])
    tw = torch.rand(2, 3, generator=g, dtype=F64)

    def fn(h, w, b):
        o = R.linear_kl(h, w, ref_hidden, ref_weight, bias=b, ref_bias=ref_bias,
                        direction=direction, labels=labels, mask=mask, temperature=temperature,
                        softcap=softcap, seq_ids=seq_ids, token_weights=tw, return_entropy=True)
        return o.kl, o.seq_kl, o.entropy, o.logp

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_logprob_gradient_wrt_logits_is_onehot_minus_softmax():
    # weight = I makes hidden the logits, so dH = dz; DESIGN: dz = g·(onehot(y) - softmax(z)).
    V = 7
    z = torch.randn(5, V, generator=gen(8), dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 6, -100, 3, 3])
    g_out = torch.tensor([1.0, -2.0, 5.0, 0.5, 3.0], dtype=F64)
    out = R.linear_logprob(z, torch.eye(V, dtype=F64), labels)
    (dz,) = torch.autograd.grad((out.logp * g_out).sum(), z, retain_graph=True)
    valid = (labels != -100).double()[:, None]
    onehot = F.one_hot(labels.clamp(min=0), V).double()
    expected = g_out[:, None] * valid * (onehot - torch.softmax(z.detach(), -1))
    torch.testing.assert_close(dz, expected, rtol=1e-12, atol=1e-12)
    (dz_lse,) = torch.autograd.grad(out.lse.sum(), z)
    torch.testing.assert_close(dz_lse, valid * torch.softmax(z.detach(), -1))


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_kl_gradient_wrt_logits_matches_design_formula(direction):
    # DESIGN §3: reverse p_j (log p_j - log q_j - KL); forward p_j - q_j.
    V = 9
    g = gen(9)
    z = torch.randn(4, V, generator=g, dtype=F64, requires_grad=True)
    r = torch.randn(4, V, generator=g, dtype=F64)
    eye = torch.eye(V, dtype=F64)
    out = R.linear_kl(z, eye, r, eye, direction=direction)
    (dz,) = torch.autograd.grad(out.kl.sum(), z)
    p, q = torch.softmax(z.detach(), -1), torch.softmax(r, -1)
    if direction == "reverse":
        kl = (p * (p.log() - q.log())).sum(-1, keepdim=True)
        expected = p * (p.log() - q.log() - kl)
    else:
        expected = p - q
    torch.testing.assert_close(dz, expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# KL: properties, Monte-Carlo estimators, k2 gradient by enumeration
# --------------------------------------------------------------------------------------------


def two_heads(seed, N=3, d=5, d_ref=4, V=16, scale=2.0, dtype=F64):
    g = gen(seed)
    h = torch.randn(N, d, generator=g, dtype=dtype)
    w = torch.randn(V, d, generator=g, dtype=dtype) * scale / math.sqrt(d)
    b = torch.randn(V, generator=g, dtype=dtype) * 0.5
    hr = torch.randn(N, d_ref, generator=g, dtype=dtype)
    wr = torch.randn(V, d_ref, generator=g, dtype=dtype) * scale / math.sqrt(d_ref)
    br = torch.randn(V, generator=g, dtype=dtype) * 0.5
    return h, w, b, hr, wr, br


def hand_kl(zp, zq):
    lp, lq = torch.log_softmax(zp, -1), torch.log_softmax(zq, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@HYP
@given(
    seed=st.integers(0, 2**31 - 1),
    V=st.integers(2, 30),
    d=st.integers(1, 8),
    d_ref=st.integers(1, 8),
    scale=st.floats(0.1, 6.0),
    direction=st.sampled_from(["reverse", "forward"]),
    softcap=st.none() | st.floats(0.5, 10.0),
    temperature=st.floats(0.5, 2.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, F64]),
)
def test_kl_values_nonneg_and_swap_symmetry(seed, V, d, d_ref, scale, direction, softcap,
                                            temperature, dtype):
    h, w, b, hr, wr, br = (t.to(dtype) for t in two_heads(seed, 4, d, d_ref, V, scale))
    kw = dict(temperature=temperature, softcap=softcap)
    out = R.linear_kl(h, w, hr, wr, bias=b, ref_bias=br, direction=direction, **kw)
    assert out.kl.dtype == (F64 if dtype == F64 else torch.float32)
    assert (out.kl >= -1e-5).all()
    zp = hand_logits(h, w, b, **kw)
    zq = hand_logits(hr, wr, br, **kw)
    expected = hand_kl(zp, zq) if direction == "reverse" else hand_kl(zq, zp)
    torch.testing.assert_close(out.kl.double(), expected, rtol=1e-4, atol=1e-5)
    other = "forward" if direction == "reverse" else "reverse"
    swapped = R.linear_kl(hr, wr, h, w, bias=br, ref_bias=b, direction=other, **kw)
    torch.testing.assert_close(swapped.kl, out.kl, rtol=1e-5, atol=1e-6)
    same = R.linear_kl(h, w, h.clone(), w.clone(), bias=b, ref_bias=b.clone(),
                       direction=direction, **kw)
    assert same.kl.abs().max() <= 1e-6


def test_kl_reference_head_is_frozen():
    """Policy side only (DESIGN §3): the same hidden states as both heads' input get the policy's
    gradient alone, as with a detached copy."""
    h, w, _, _, wr, _ = two_heads(11, d_ref=5)
    h.requires_grad_()
    (shared,) = torch.autograd.grad(R.linear_kl(h, w, h, wr).kl.sum(), h)
    (policy,) = torch.autograd.grad(R.linear_kl(h, w, h.detach(), wr).kl.sum(), h)
    torch.testing.assert_close(shared, policy, rtol=0, atol=0)


@pytest.mark.parametrize("fp64_head", ["policy", "reference"])
def test_kl_heads_of_mixed_precision_compute_in_fp64(fp64_head):
    """fp64 when any head is fp64 (fp32 values of the other head widened first), every output."""
    heads = two_heads(12)
    narrowed = [t.float() for t in heads]
    if fp64_head == "policy":
        narrowed[:3] = heads[:3]
    else:
        narrowed[3:] = heads[3:]
    labels = torch.tensor([1, 4, 10])
    h, w, b, hr, wr, br = narrowed
    out = R.linear_kl(h, w, hr, wr, bias=b, ref_bias=br, labels=labels)
    h, w, b, hr, wr, br = (t.double() for t in narrowed)
    want = R.linear_kl(h, w, hr, wr, bias=b, ref_bias=br, labels=labels)
    for got, exp in ((out.kl, want.kl), (out.logp, want.logp), (out.ref_logp, want.ref_logp)):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


def test_kl_d_ref_differs_and_seq_reductions():
    h, w, b, hr, wr, br = two_heads(10, N=6, d=7, d_ref=3, V=11)
    labels = torch.tensor([1, -100, 4, 10, 0, 2])
    mask = torch.tensor([True, True, False, True, True, True])
    seq_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    tw = torch.tensor([0.5, 2.0, 3.0, 1.5, 0.0, 1.0], dtype=F64)
    out = R.linear_kl(h, w, hr, wr, bias=b, ref_bias=br, labels=labels, mask=mask,
                      seq_ids=seq_ids, token_weights=tw, return_entropy=True)
    zp, zq = hand_logits(h, w, b), hand_logits(hr, wr, br)
    valid = (labels != -100) & mask
    exp = torch.where(valid, hand_kl(zp, zq), 0.0)
    torch.testing.assert_close(out.kl, exp)
    exp_seq = torch.zeros(3, dtype=F64)
    exp_n = [0.0, 0.0, 0.0]
    for i in range(6):
        if valid[i]:
            exp_seq[seq_ids[i]] += tw[i] * exp[i]
            exp_n[seq_ids[i]] += 1
    torch.testing.assert_close(out.seq_kl, exp_seq)
    assert out.seq_count.tolist() == exp_n == [1.0, 1.0, 2.0]
    lp = -F.cross_entropy(zp, labels, reduction="none")
    lq = -F.cross_entropy(zq, labels, reduction="none")
    torch.testing.assert_close(out.logp, torch.where(valid, lp, 0.0))
    torch.testing.assert_close(out.ref_logp, torch.where(valid, lq, 0.0))
    p = torch.softmax(zp, -1)
    torch.testing.assert_close(out.entropy, torch.where(valid, -(p * p.log()).sum(-1), 0.0))
    # without token_weights seq_kl is the plain sum
    plain = R.linear_kl(h, w, hr, wr, bias=b, ref_bias=br, mask=mask, seq_ids=seq_ids)
    m = mask.double() * hand_kl(zp, zq)
    torch.testing.assert_close(plain.seq_kl, torch.stack([m[0:2].sum(), m[2:4].sum(),
                                                          m[4:6].sum()]))


def sample_kl_terms(seed, K, sample_from):
    """Draw K tokens per row from the policy (or the reference) and return the exact KLs and the
    per-sample log-probs of both heads, computed by linear_kl on [N, K, d] hidden states."""
    h, w, b, hr, wr, br = two_heads(seed, N=3, d=5, d_ref=4, V=16, scale=3.0)
    N = h.shape[0]
    zs = hand_logits(h, w, b) if sample_from == "policy" else hand_logits(hr, wr, br)
    y = torch.multinomial(torch.softmax(zs, -1), K, replacement=True, generator=gen(seed + 1))
    out = R.linear_kl(h[:, None].expand(N, K, 5), w, hr[:, None].expand(N, K, 4), wr,
                      bias=b, ref_bias=br, labels=y)
    rev = R.linear_kl(h, w, hr, wr, bias=b, ref_bias=br, direction="reverse").kl
    fwd = R.linear_kl(h, w, hr, wr, bias=b, ref_bias=br, direction="forward").kl
    return rev, fwd, out.logp, out.ref_logp


def assert_mc_close(samples, exact, other):
    K = samples.shape[1]
    mean, se = samples.mean(1), samples.std(1) / math.sqrt(K)
    assert ((mean - exact).abs() <= 5 * se).all(), (mean, exact, se)
    # power: the estimator distinguishes the right KL from the other direction
    assert ((mean - other).abs() > 5 * se).any(), (mean, other, se)


K_MC = 20000


def test_reverse_kl_is_mc_mean_of_k1_under_policy():
    rev, fwd, logp, ref_logp = sample_kl_terms(11, K_MC, "policy")
    assert_mc_close(R.k1(logp, ref_logp), rev, fwd)


def test_forward_kl_is_mc_mean_of_k1_under_reference():
    rev, fwd, logp, ref_logp = sample_kl_terms(12, K_MC, "reference")
    assert_mc_close(R.k1(ref_logp, logp), fwd, rev)


def test_k3_mc_mean_under_policy_matches_reverse_kl():
    rev, fwd, logp, ref_logp = sample_kl_terms(13, K_MC, "policy")
    k3 = R.k3(logp, ref_logp)
    assert (k3 >= 0).all()
    assert_mc_close(k3, rev, fwd)


def test_k_estimators_closed_form():
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
    lq = torch.tensor([-1.5, -2.0, -3.0], dtype=F64)
    torch.testing.assert_close(R.k1(lp, lq), lp - lq)
    torch.testing.assert_close(R.k2(lp, lq), 0.5 * (lp - lq) ** 2)
    ratio = (lq - lp).exp()
    torch.testing.assert_close(R.k3(lp, lq), ratio - 1 - ratio.log())


@pytest.mark.parametrize("k", [R.k1, R.k2, R.k3])
@pytest.mark.parametrize(
    ("logp", "ref_logp", "exc", "match"),
    [
        (torch.zeros(4), torch.zeros(4, 1), ValueError, "one shape"),  # would broadcast to 4x4
        (torch.zeros(4), torch.zeros(4, dtype=torch.int64), TypeError, "ref_logp"),
        (torch.tensor([0.0, math.nan]), torch.zeros(2), ValueError, "logp contains NaN"),
        (torch.zeros(2), torch.tensor([0.0, -math.inf]), ValueError, "ref_logp contains NaN"),
    ],
)
def test_k_estimators_reject(k, logp, ref_logp, exc, match):
    with pytest.raises(exc, match=match):
        k(logp, ref_logp)


def test_k2_expected_gradient_equals_kl_gradient_by_enumeration():
    d, d_ref, V = 5, 3, 12
    h0, w0, b0, hr, wr, br = two_heads(14, N=1, d=d, d_ref=d_ref, V=V, scale=2.5)
    h = h0[0].clone().requires_grad_()
    w = w0.clone().requires_grad_()
    b = b0.clone().requires_grad_()
    y = torch.arange(V)
    out = R.linear_kl(h.expand(V, d), w, hr[0].expand(V, d_ref), wr, bias=b, ref_bias=br,
                      labels=y)
    p = out.logp.detach().exp()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=F64))
    grads_k2 = torch.autograd.grad((p * R.k2(out.logp, out.ref_logp)).sum(), (h, w, b))
    kl = R.linear_kl(h[None], w, hr, wr, bias=b, ref_bias=br).kl.sum()
    grads_kl = torch.autograd.grad(kl, (h, w, b))
    for gk2, gkl in zip(grads_k2, grads_kl, strict=True):
        assert gkl.abs().max() > 1e-3
        torch.testing.assert_close(gk2, gkl, rtol=1e-10, atol=1e-12)
    # and k1's expected gradient is zero (score-function identity E_p[∇ log p] = 0)
    out = R.linear_kl(h.expand(V, d), w, hr[0].expand(V, d_ref), wr, bias=b, ref_bias=br,
                      labels=y)
    grads_k1 = torch.autograd.grad((p * R.k1(out.logp, out.ref_logp)).sum(), (h, w, b))
    for gk1 in grads_k1:
        assert gk1.abs().max() < 1e-12


# --------------------------------------------------------------------------------------------
# validation: every bad input raises before any compute, naming the argument
# --------------------------------------------------------------------------------------------


def lp_base():
    g = gen(20)
    return dict(
        hidden=torch.randn(2, 3, 4, generator=g),
        weight=torch.randn(5, 4, generator=g),
        labels=torch.tensor([[0, 1, -100], [4, 2, 3]]),
        bias=torch.randn(5, generator=g),
        seq_ids=torch.tensor([[0, 0, 0], [1, 1, 1]]),
        token_weights=torch.rand(2, 3, generator=g),
    )


def kl_base():
    g = gen(21)
    return dict(
        hidden=torch.randn(2, 3, 4, generator=g),
        weight=torch.randn(5, 4, generator=g),
        ref_hidden=torch.randn(2, 3, 6, generator=g),
        ref_weight=torch.randn(5, 6, generator=g),
        bias=torch.randn(5, generator=g),
        ref_bias=torch.randn(5, generator=g),
        labels=torch.tensor([[0, 1, -100], [4, 2, 3]]),
        mask=torch.tensor([[True, False, True], [True, True, True]]),
        seq_ids=torch.tensor([[0, 0, 0], [1, 1, 1]]),
        token_weights=torch.rand(2, 3, generator=g),
    )


def with_value(t, index, value):
    t = t.clone()
    t[index] = value
    return t


META = torch.device("meta")

LP_CASES = [
    # (id, mutation of the kwargs, exception, match)
    ("hidden-not-tensor", lambda k: k.update(hidden=[[1.0] * 4]), TypeError, "hidden"),
    ("hidden-1d", lambda k: k.update(hidden=torch.randn(4)), ValueError, "hidden"),
    ("hidden-wrong-d", lambda k: k.update(hidden=torch.randn(2, 3, 5)), ValueError, "hidden"),
    ("hidden-int", lambda k: k.update(hidden=torch.ones(2, 3, 4, dtype=torch.int64)),
     TypeError, "hidden"),
    ("weight-1d", lambda k: k.update(weight=torch.randn(20)), ValueError, "weight"),
    ("weight-3d", lambda k: k.update(weight=torch.randn(5, 4, 1)), ValueError, "weight"),
    ("weight-int", lambda k: k.update(weight=torch.ones(5, 4, dtype=torch.int32)),
     TypeError, "weight"),
    ("labels-shape", lambda k: k.update(labels=torch.zeros(2, 4, dtype=torch.long)),
     ValueError, "labels"),
    ("labels-flat", lambda k: k.update(labels=torch.zeros(6, dtype=torch.long)),
     ValueError, "labels"),
    ("labels-float", lambda k: k.update(labels=k["labels"].float()), TypeError, "labels"),
    ("labels-ge-V", lambda k: k.update(labels=with_value(k["labels"], (0, 0), 5)),
     ValueError, "labels"),
    ("labels-negative", lambda k: k.update(labels=with_value(k["labels"], (1, 1), -1)),
     ValueError, "labels"),
    ("labels-other-ignore-index", lambda k: k.update(ignore_index=-1), ValueError, "labels"),
    ("bias-shape", lambda k: k.update(bias=torch.randn(6)), ValueError, "bias"),
    ("bias-2d", lambda k: k.update(bias=torch.randn(1, 5)), ValueError, "bias"),
    ("bias-int", lambda k: k.update(bias=torch.ones(5, dtype=torch.long)), TypeError, "bias"),
    ("token-weights-shape", lambda k: k.update(token_weights=torch.rand(3, 2)), ValueError,
     "token_weights"),
    ("token-weights-int", lambda k: k.update(token_weights=torch.ones(2, 3, dtype=torch.long)),
     TypeError, "token_weights"),
    ("seq-ids-shape", lambda k: k.update(seq_ids=torch.zeros(6, dtype=torch.long)), ValueError,
     "seq_ids"),
    ("seq-ids-float", lambda k: k.update(seq_ids=k["seq_ids"].float()), TypeError, "seq_ids"),
    ("seq-ids-negative", lambda k: k.update(seq_ids=with_value(k["seq_ids"], (0, 1), -1)),
     ValueError, "seq_ids"),
    ("seq-ids-ge-num-seqs", lambda k: k.update(num_seqs=1), ValueError, "seq_ids"),
    ("num-seqs-zero", lambda k: k.update(num_seqs=0), ValueError, "num_seqs"),
    ("num-seqs-without-seq-ids",
     lambda k: k.update(num_seqs=2, seq_ids=None, token_weights=None), ValueError, "num_seqs"),
    ("ignore-index-float", lambda k: k.update(ignore_index=-100.5), TypeError, "ignore_index"),
    ("ignore-index-bool", lambda k: k.update(ignore_index=True), TypeError, "ignore_index"),
    ("hidden-nan", lambda k: k.update(hidden=with_value(k["hidden"], (1, 2, 0), math.nan)),
     ValueError, "hidden"),
    ("hidden-inf", lambda k: k.update(hidden=with_value(k["hidden"], (0, 0, 3), math.inf)),
     ValueError, "hidden"),
    ("weight-nan", lambda k: k.update(weight=with_value(k["weight"], (4, 1), math.nan)),
     ValueError, "weight"),
    ("weight-neg-inf", lambda k: k.update(weight=with_value(k["weight"], (0, 0), -math.inf)),
     ValueError, "weight"),
    ("bias-inf", lambda k: k.update(bias=with_value(k["bias"], 2, math.inf)), ValueError,
     "bias"),
    ("bias-nan", lambda k: k.update(bias=with_value(k["bias"], 0, math.nan)), ValueError,
     "bias"),
    ("token-weights-nan",
     lambda k: k.update(token_weights=with_value(k["token_weights"], (0, 0), math.nan)),
     ValueError, "token_weights"),
    ("empty-batch", lambda k: k.update(hidden=torch.randn(0, 4),
                                       labels=torch.zeros(0, dtype=torch.long),
                                       seq_ids=None, token_weights=None),
     ValueError, "hidden has no token"),
    ("temperature-zero", lambda k: k.update(temperature=0.0), ValueError, "temperature"),
    ("temperature-negative", lambda k: k.update(temperature=-1.0), ValueError, "temperature"),
    ("temperature-nan", lambda k: k.update(temperature=math.nan), ValueError, "temperature"),
    ("temperature-inf", lambda k: k.update(temperature=math.inf), ValueError, "temperature"),
    ("temperature-str", lambda k: k.update(temperature="1"), TypeError, "temperature"),
    ("softcap-zero", lambda k: k.update(softcap=0.0), ValueError, "softcap"),
    ("softcap-negative", lambda k: k.update(softcap=-30.0), ValueError, "softcap"),
    ("weight-on-meta", lambda k: k.update(weight=k["weight"].to(META)), ValueError, "weight"),
    ("hidden-on-meta", lambda k: k.update(hidden=k["hidden"].to(META)), ValueError, "hidden"),
    ("labels-on-meta", lambda k: k.update(labels=k["labels"].to(META)), ValueError, "labels"),
    ("bias-on-meta", lambda k: k.update(bias=k["bias"].to(META)), ValueError, "bias"),
    ("seq-ids-on-meta", lambda k: k.update(seq_ids=k["seq_ids"].to(META)), ValueError,
     "seq_ids"),
    ("token-weights-on-meta", lambda k: k.update(token_weights=k["token_weights"].to(META)),
     ValueError, "token_weights"),
]

KL_CASES = [
    ("direction", lambda k: k.update(direction="sideways"), ValueError, "direction"),
    ("direction-case", lambda k: k.update(direction="Reverse"), ValueError, "direction"),
    ("ref-vocab", lambda k: k.update(ref_weight=torch.randn(6, 6)), ValueError,
     "^ref_weight has vocabulary 6 but weight has 5"),
    ("ref-hidden-wrong-d", lambda k: k.update(ref_hidden=torch.randn(2, 3, 4)), ValueError,
     "ref_hidden"),
    ("ref-hidden-tokens", lambda k: k.update(ref_hidden=torch.randn(2, 4, 6)), ValueError,
     "ref_hidden"),
    ("ref-hidden-int", lambda k: k.update(ref_hidden=torch.ones(2, 3, 6, dtype=torch.long)),
     TypeError, "ref_hidden"),
    ("ref-weight-3d", lambda k: k.update(ref_weight=torch.randn(5, 6, 1)), ValueError,
     "ref_weight"),
    ("ref-bias-shape", lambda k: k.update(ref_bias=torch.randn(4)), ValueError, "ref_bias"),
    ("ref-hidden-nan",
     lambda k: k.update(ref_hidden=with_value(k["ref_hidden"], (0, 1, 2), math.nan)),
     ValueError, "ref_hidden"),
    ("ref-weight-inf",
     lambda k: k.update(ref_weight=with_value(k["ref_weight"], (3, 3), math.inf)),
     ValueError, "ref_weight"),
    ("ref-bias-nan", lambda k: k.update(ref_bias=with_value(k["ref_bias"], 1, math.nan)),
     ValueError, "ref_bias"),
    ("hidden-nan", lambda k: k.update(hidden=with_value(k["hidden"], (0, 0, 0), math.nan)),
     ValueError, "hidden"),
    ("bias-shape", lambda k: k.update(bias=torch.randn(6)), ValueError, "bias"),
    ("mask-shape", lambda k: k.update(mask=torch.ones(3, 2, dtype=torch.bool)), ValueError,
     "mask"),
    ("mask-not-bool", lambda k: k.update(mask=k["mask"].long()), TypeError, "mask"),
    ("labels-ge-V", lambda k: k.update(labels=with_value(k["labels"], (1, 0), 99)),
     ValueError, "labels"),
    ("labels-float", lambda k: k.update(labels=k["labels"].double()), TypeError, "labels"),
    ("seq-ids-out-of-range", lambda k: k.update(num_seqs=1), ValueError, "seq_ids"),
    ("token-weights-shape", lambda k: k.update(token_weights=torch.rand(6)), ValueError,
     "token_weights"),
    ("temperature-zero", lambda k: k.update(temperature=0), ValueError, "temperature"),
    ("softcap-negative", lambda k: k.update(softcap=-1.0), ValueError, "softcap"),
    ("empty-batch", lambda k: k.update(
        hidden=torch.randn(0, 4), ref_hidden=torch.randn(0, 6), labels=None, mask=None,
        seq_ids=None, token_weights=None), ValueError, "hidden has no token"),
    ("ref-weight-on-meta", lambda k: k.update(ref_weight=k["ref_weight"].to(META)),
     ValueError, "ref_weight"),
    ("ref-head-on-meta", lambda k: k.update(ref_hidden=k["ref_hidden"].to(META),
                                            ref_weight=k["ref_weight"].to(META),
                                            ref_bias=k["ref_bias"].to(META)),
     ValueError, "^labels is on cpu but ref_hidden is on meta"),
    ("ref-head-on-meta-no-labels", lambda k: k.update(
        ref_hidden=k["ref_hidden"].to(META), ref_weight=k["ref_weight"].to(META),
        ref_bias=k["ref_bias"].to(META), labels=None),
     ValueError, "^ref_hidden is on meta but hidden is on cpu"),
    ("mask-on-meta", lambda k: k.update(mask=k["mask"].to(META)), ValueError, "mask"),
    ("weight-on-meta", lambda k: k.update(weight=k["weight"].to(META)), ValueError, "weight"),
]


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if the logits are computed: validation must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("logits computed before the inputs were validated")

    monkeypatch.setattr(R, "linear_logits", boom)


def test_valid_bases_run():
    out = R.linear_logprob(**lp_base())
    assert torch.isfinite(out.logp).all() and out.seq_weighted_sum is not None
    out = R.linear_kl(**kl_base())
    assert torch.isfinite(out.kl).all() and out.seq_kl is not None


@pytest.mark.parametrize(("mutate", "exc", "match"),
                         [pytest.param(*c[1:], id=c[0]) for c in LP_CASES])
def test_linear_logprob_rejects(mutate, exc, match, no_compute):
    kw = lp_base()
    mutate(kw)
    with pytest.raises(exc, match=match):
        R.linear_logprob(**kw)


@pytest.mark.parametrize(("mutate", "exc", "match"),
                         [pytest.param(*c[1:], id=c[0]) for c in KL_CASES])
def test_linear_kl_rejects(mutate, exc, match, no_compute):
    kw = kl_base()
    mutate(kw)
    with pytest.raises(exc, match=match):
        R.linear_kl(**kw)


def test_kl_from_logits_rejects_direction():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="direction"):
        R.kl_from_logits(z, z, "both")


@pytest.mark.parametrize("case", ["empty-vocab", "zero-hidden-size"])
def test_zero_size_head_gives_named_error_or_result(case):
    hidden, weight, labels = {
        "empty-vocab": (torch.randn(2, 3), torch.randn(0, 3), torch.tensor([-100, 0])),
        "zero-hidden-size": (torch.randn(2, 0), torch.randn(5, 0), torch.tensor([1, 4])),
    }[case]
    with pytest.raises(ValueError, match=r"weight must be \[V, d\] with V >= 1 and d >= 1"):
        R.linear_logprob(hidden, weight, labels)


def test_linear_kl_names_ref_hidden_shape():
    h, w = torch.randn(2, 3, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match="ref_hidden must have the token shape"):
        R.linear_kl(h, w, torch.randn(2, 4, 6), torch.randn(7, 6))
