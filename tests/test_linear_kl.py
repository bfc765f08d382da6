"""The triton backend of ``ops.linear_kl`` against the spec, ``reference.linear_kl``.

Without a CUDA GPU the kernels run under Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before triton is imported) on CPU tensors; the interpreter's block sizes
are BM=32, BN=64, BK=32, so the drawn sizes mostly are not multiples of any block.

Values and gradients (dH, dW, db, d token_weights) are compared as relative errors
``‖a − b‖ / ‖b‖``: ≤ 1e-5 for every value (the reference upcasts the same inputs to fp32, so
fp16/bf16 inputs must agree as tightly as fp32 ones) and for fp32 gradients, ≤ 2e-2 for fp16/bf16
gradients (dX is rounded to the input dtype before the dH/dW GEMMs).

The fp32 spec is not always the more accurate side: the KL of two *close* heads (KL ~ 1e-6) is a
difference of O(1) terms there (0.5% off), which the kernel avoids, and logits of |z| ~ 1e2..1e3
resolve log-probabilities only to ~ulp(|z|). So ``test_close_heads_as_accurate_as_the_spec``
judges both against an fp64 evaluation of the spec, and so does ``check_against_reference``
wherever the kernel and the spec differ by more than the tolerance.
"""

from __future__ import annotations

import importlib
import math
from functools import partial

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_helpers import (
    BF16,
    DEVICE,
    F16,
    F32,
    GRAD_TOL,
    HYP_BASE,
    INPUTS,
    INTERPRET,
    SIZE_EDGES,
    VALUE_TOL,
    assert_comparable,
    assert_rel,
    assert_same_over_chunks,
    combined_loss,
    gen,
    kernel_forbidder,
    layout,
    needs_triton,
    rel_err,
    representable,
    tma_loads,
)
from kernel_helpers import grads as input_grads

from hypo_fast import ops
from hypo_fast import reference as R

# hypo_fast.kernels is installed from kernels/ (a package-dir mapping ruff's isort cannot see)
K = importlib.import_module("hypo_fast.kernels.linear_kl")
TILES = importlib.import_module("hypo_fast.kernels._tiles")

HYP = settings(HYP_BASE, max_examples=40)
OUTPUTS = ("kl", "entropy", "logp", "ref_logp", "seq_kl")
forbid_kernels = kernel_forbidder(K, "kl_forward", "kl_backward")
# gradients w.r.t. every differentiable input present, zeros where unused (e.g. ref_logp alone)
grads = partial(input_grads, unused="zeros")


# --------------------------------------------------------------------------------------------
# Building cases
# --------------------------------------------------------------------------------------------

LOGIT_SCALES = {"normal": 1.0, "peaked": 6.0, "extreme": 300.0}  # std of z


@st.composite
def kl_cases(draw):
    if draw(st.booleans()):
        tokens = (draw(st.sampled_from([*SIZE_EDGES, 200]) | st.integers(1, 200)),)
    else:
        B = draw(st.integers(1, 4))
        tokens = (B, draw(st.integers(1, 200 // B)))
    dims = st.sampled_from([16, 31, 32, 33, 96]) | st.integers(16, 96)
    return dict(
        tokens=tokens,
        d=draw(dims),
        d_ref=draw(dims),
        V=draw(st.sampled_from([*SIZE_EDGES, 700]) | st.integers(1, 700)),
        dtype=draw(st.sampled_from([F32, BF16, F16])),
        ref_dtype=draw(st.sampled_from(["same", "same", "fp32"])),
        direction=draw(st.sampled_from(R.KL_DIRECTIONS)),
        use_bias=draw(st.booleans()),
        use_ref_bias=draw(st.booleans()),
        temperature=draw(st.just(1.0) | st.floats(0.5, 2.0)),
        softcap=draw(st.none() | st.floats(1.0, 30.0)),
        entropy=draw(st.booleans()),
        labels=draw(st.sampled_from(["none", "all", "some_ignored"])),
        ignore_index=draw(st.sampled_from([-100, -1])),
        mask=draw(st.sampled_from(["none", "random", "whole_seqs"])),
        seqs=draw(st.sampled_from(["none", "ids", "ids_weights"])),
        explicit_num_seqs=draw(st.booleans()),
        hidden_layout=draw(st.sampled_from(["contig", "transposed", "sliced", "rowstep"])),
        weight_layout=draw(st.sampled_from(["contig", "transposed", "sliced", "rowstep"])),
        scale=draw(st.sampled_from(list(LOGIT_SCALES))),
        tma=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


BASE_CASE = dict(
    tokens=(77,), d=40, d_ref=24, V=203, dtype=F32, ref_dtype="same", direction="reverse",
    use_bias=True, use_ref_bias=True, temperature=1.0, softcap=None, entropy=True,
    labels="some_ignored", ignore_index=-100, mask="random", seqs="ids_weights",
    explicit_num_seqs=False, hidden_layout="contig", weight_layout="contig", scale="normal",
    tma=False, seed=0,
)


def build_case(c):
    """``(inputs, kwargs, coefs)``: tensors (the policy's differentiable), call options, and the
    coefficients of the random linear combination of the outputs used as the loss."""
    g = gen(c["seed"])
    tokens, d, d_ref, V, dtype = c["tokens"], c["d"], c["d_ref"], c["V"], c["dtype"]
    ref_dtype = dtype if c["ref_dtype"] == "same" else F32
    n = math.prod(tokens)
    scale = LOGIT_SCALES[c["scale"]]
    hidden = torch.randn(*tokens, d, generator=g)
    weight = torch.randn(V, d, generator=g) * (scale / math.sqrt(d))
    ref_hidden = torch.randn(*tokens, d_ref, generator=g)
    ref_weight = torch.randn(V, d_ref, generator=g) * (scale / math.sqrt(d_ref))

    if len(tokens) == 2:
        seq_ids = torch.arange(tokens[0])[:, None].expand(tokens).clone()
    else:
        S = int(torch.randint(1, max(2, n // 8) + 1, (), generator=g))
        seq_ids = torch.randint(0, S, (n,), generator=g).sort().values
    num_seqs = int(seq_ids.max()) + 1 + (2 if c["explicit_num_seqs"] else 0)

    mask = None
    if c["mask"] == "random":
        mask = torch.rand(tokens, generator=g) < 0.7
    elif c["mask"] == "whole_seqs":
        mask = (torch.rand(num_seqs, generator=g) < 0.5)[seq_ids]
    if mask is not None:
        mask.view(-1)[0] = True  # at least one row counts (label 0 is never ignored)
    labels = None
    if c["labels"] != "none":
        labels = torch.randint(0, V, tokens, generator=g)
        labels.view(-1)[::7] = V - 1  # the last column lives in a partial tile
        if c["labels"] == "some_ignored":
            ignored = torch.rand(tokens, generator=g) < 0.3
            ignored.view(-1)[0] = False  # at least one label counts
            labels = torch.where(ignored, c["ignore_index"], labels)
    token_weights = None
    if c["seqs"] == "ids_weights":
        token_weights = (torch.rand(tokens, generator=g) * 2.5 - 0.5).to(DEVICE).requires_grad_()
    coefs = {name: torch.randn(num_seqs if name == "seq_kl" else tokens, generator=g).to(DEVICE)
             for name in OUTPUTS}

    def bias(use: bool, grad: bool, dt: torch.dtype):
        return torch.randn(V, generator=g).to(DEVICE, dt).requires_grad_(grad) if use else None

    inputs = dict(
        hidden=layout(hidden.to(DEVICE, dtype), c["hidden_layout"]),
        weight=layout(weight.to(DEVICE, dtype), c["weight_layout"]),
        bias=bias(c["use_bias"], True, dtype),
        ref_hidden=layout(ref_hidden.to(DEVICE, ref_dtype), c["hidden_layout"], grad=False),
        ref_weight=layout(ref_weight.to(DEVICE, ref_dtype), c["weight_layout"], grad=False),
        ref_bias=bias(c["use_ref_bias"], False, ref_dtype),
        token_weights=token_weights,
    )
    kwargs = dict(
        direction=c["direction"], ignore_index=c["ignore_index"], temperature=c["temperature"],
        softcap=c["softcap"], return_entropy=c["entropy"],
        labels=labels.to(DEVICE) if labels is not None else None,
        mask=mask.to(DEVICE) if mask is not None else None,
    )
    if c["seqs"] != "none":
        kwargs.update(seq_ids=seq_ids.to(DEVICE),
                      num_seqs=num_seqs if c["explicit_num_seqs"] else None)
    return inputs, kwargs, coefs


def call(fn, inputs, kwargs, **extra) -> R.KLOutput:
    return fn(inputs["hidden"], inputs["weight"], inputs["ref_hidden"], inputs["ref_weight"],
              bias=inputs["bias"], ref_bias=inputs["ref_bias"],
              token_weights=inputs["token_weights"], **kwargs, **extra)


def counted(kwargs) -> torch.Tensor:
    """The rows that count: mask & label != ignore_index."""
    labels, mask = kwargs["labels"], kwargs["mask"]
    valid = torch.ones(
        labels.shape if labels is not None else (mask.shape if mask is not None else ()),
        dtype=torch.bool, device=DEVICE)
    if labels is not None:
        valid = valid & (labels != kwargs["ignore_index"])
    if mask is not None:
        valid = valid & mask
    return valid


def check_against_reference(c):
    """Values and gradients of the triton backend against the spec (see the module docstring).

    Where they differ by more than the tolerance the spec itself may be the inaccurate one: rows
    with |z| ~ 1e2..1e3 resolve log-probabilities only to ~ulp(|z|) in fp32. Then both are
    judged against the spec evaluated in fp64, and the kernel must be within the tolerance of
    it, or no less accurate than the spec (error ≤ 2x the spec's), or at fp32's floor for such
    logits (8 ulps of the largest |logit|: the rounding noise of a difference of two O(|z|)
    numbers). A gradient may also err by that floor x (‖upstream gradients‖·‖other GEMM operand‖
    / T) in absolute terms (not by the tolerance x that: with 16-bit inputs it let a dX 50% off
    pass): rows peaked beyond fp64's resolution (p_top = 1 - e^{-69}) have dz ~ 1e-30 that not
    even the fp64 spec gets right (it cancels 1 - 1 where the kernel keeps the terms apart), and
    the reverse KL's ``dz = p·(δ - KL)`` cancels two O(|z|) numbers: its noise is the floor's
    per unit of p (where one token holds all of p, the fp32 spec happens to cancel exactly, as
    its δ and KL are the same rounding of one term). And a result off by less than fp32's
    smallest normal number (1.2e-38) is at the format's floor (a KL of 6e-37 between two heads
    peaked on one token sums subnormal terms, which a GPU flushes to 0).
    """
    inputs, kwargs, coefs = build_case(c)
    with tma_loads(c["tma"]):
        out = call(ops.linear_kl, inputs, kwargs, backend="triton")
        g_out = grads(combined_loss(out, coefs), inputs)
    ref = call(R.linear_kl, inputs, kwargs)
    exact = {}

    def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
        assert_comparable(name, got, want)
        if rel_err(got, want) <= tol:
            return
        if not exact:
            x_inputs = {k: (v.detach().double().requires_grad_(k in INPUTS)
                            if v is not None else None) for k, v in inputs.items()}
            x = call(R.linear_kl, x_inputs, kwargs)
            exact.update({k: getattr(x, k) for k in OUTPUTS if getattr(x, k) is not None})
            exact.update({f"d{k}": v for k, v in grads(combined_loss(x, coefs), x_inputs).items()})
            logits = [R.linear_logits(x_inputs[f"{p}hidden"], x_inputs[f"{p}weight"],
                                      x_inputs[f"{p}bias"], temperature=c["temperature"],
                                      softcap=c["softcap"]) for p in ("", "ref_")]
            exact["floor"] = 8 * 2.0**-24 * max(t.abs().max().item() for t in logits)
            g_norm = math.sqrt(sum(t.double().norm().item() ** 2 for t in coefs.values()))
            exact["bound"] = {f"d{k}": g_norm * o / c["temperature"] for k, o in (
                ("hidden", inputs["weight"].double().norm().item()),
                ("weight", inputs["hidden"].double().norm().item()), ("bias", 1.0))}
        err_out, err_ref = rel_err(got, exact[name]), rel_err(want, exact[name])
        off = (got.detach().double() - exact[name].detach().double()).abs().max().item()
        if off <= torch.finfo(torch.float32).tiny:  # below fp32's normal range (a GPU flushes)
            return
        if name in exact["bound"]:
            diff = (got.detach().double() - exact[name].detach().double()).norm().item()
            if diff <= exact["floor"] * exact["bound"][name]:
                return
        assert err_out <= max(tol, 2 * err_ref, exact["floor"]), (
            f"{name}: relative error {rel_err(got, want):.3g} > {tol:g} vs the spec; vs fp64 "
            f"{err_out:.3g}, the spec's {err_ref:.3g}")

    for name in OUTPUTS:
        got, want = getattr(out, name), getattr(ref, name)
        assert (got is None) == (want is None), name
        if got is not None:
            check(name, got, want, VALUE_TOL)
    if ref.seq_count is not None:
        assert torch.equal(out.seq_count, ref.seq_count)
    assert bool((out.kl >= 0).all())
    g_ref = representable(g_out, grads(combined_loss(ref, coefs), inputs))
    for name, want in g_ref.items():
        tol = VALUE_TOL if name == "token_weights" else GRAD_TOL[c["dtype"]]
        check(f"d{name}", g_out[name], want, tol)
    return inputs, kwargs, out, g_out


# --------------------------------------------------------------------------------------------
# The property test: values and gradients against the reference
# --------------------------------------------------------------------------------------------


@needs_triton
@HYP
@given(kl_cases())
@example(c={**BASE_CASE, "tokens": (1, 1), "d": 43, "d_ref": 26, "V": 534,
            "direction": "reverse", "use_bias": False, "use_ref_bias": False,
            "temperature": 1.0, "softcap": None, "entropy": False, "labels": "none",
            "mask": "none", "seqs": "none", "scale": "extreme", "seed": 41}
         ).via("discovered failure")  # one token holds p (|z| ~ 800, KL ~ 1087): dz is noise
@example(c={**BASE_CASE, "tokens": (1, 1), "d": 18, "d_ref": 31, "V": 4, "direction": "forward",
            "use_bias": False, "use_ref_bias": False, "temperature": 2.0, "softcap": None,
            "entropy": False, "labels": "none", "mask": "none", "seqs": "none",
            "scale": "extreme", "seed": 536870911}
         ).via("discovered failure")  # a KL of 6e-37, 2e-39 off: subnormal terms
@example(c={**BASE_CASE, "tokens": (200,), "V": 700})  # entropy over several tiles per split
def test_triton_matches_reference_values_and_grads(c):
    _, kwargs, out, g_out = check_against_reference(c)
    if kwargs["mask"] is not None or kwargs["labels"] is not None:
        skipped = ~counted(kwargs)
        for name in ("kl", "entropy", "logp", "ref_logp"):
            value = getattr(out, name)
            if value is not None:
                assert bool((value[skipped] == 0).all()), f"{name} not 0 on masked rows"
        assert bool((g_out["hidden"][skipped] == 0).all()), "dH not 0 on masked rows"


# --------------------------------------------------------------------------------------------
# Deterministic cases the property test may not hit every run
# --------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("direction", R.KL_DIRECTIONS)
@pytest.mark.parametrize(
    ("tokens", "d", "d_ref", "V"),
    [((200,), 96, 16, 700), ((1,), 16, 96, 1), ((3, 22), 33, 33, 129)],
)
def test_edge_sizes(tokens, d, d_ref, V, direction, dtype):
    check_against_reference({**BASE_CASE, "tokens": tokens, "d": d, "d_ref": d_ref, "V": V,
                             "direction": direction, "dtype": dtype, "softcap": 7.0,
                             "temperature": 0.7})


@needs_triton
@pytest.mark.parametrize("direction", R.KL_DIRECTIONS)
@pytest.mark.parametrize(("dtype", "d", "d_ref", "descriptors"), [
    (F16, 40, 24, 8), (BF16, 40, 24, 8), (BF16, 40, 20, 0), (F32, 40, 24, 0)])
def test_tma_loads_for_both_heads_or_neither(dtype, d, d_ref, descriptors, direction,
                                             monkeypatch):
    """With ``HYPO_FAST_TMA=1`` both heads load through descriptors (H and W each, in both
    passes) when both can, else both gather through pointers; either way they match the spec."""
    made = []
    real = TILES.TensorDescriptor.from_tensor
    monkeypatch.setattr(TILES.TensorDescriptor, "from_tensor",
                        lambda t, block: made.append(block) or real(t, block))
    check_against_reference({**BASE_CASE, "d": d, "d_ref": d_ref, "dtype": dtype,
                             "direction": direction, "tma": True})
    assert len(made) == descriptors, made


@needs_triton
@pytest.mark.parametrize("direction", R.KL_DIRECTIONS)
def test_descriptors_over_one_row_of_a_wider_buffer(direction):
    """Every token valid, the hidden states one row sliced out of a wider buffer: contiguous,
    but based off 16-byte alignment, so the descriptors read a copy (the log-prob property test
    found a crash there)."""
    check_against_reference({**BASE_CASE, "tokens": (1,), "d": 16, "d_ref": 16, "V": 9,
                             "dtype": BF16, "hidden_layout": "sliced", "labels": "none",
                             "mask": "none", "seqs": "none", "tma": True,
                             "direction": direction})


@needs_triton
@pytest.mark.parametrize("direction", R.KL_DIRECTIONS)
@pytest.mark.parametrize("with_kl", [True, False])
@pytest.mark.parametrize(("dtype", "d_ref", "ref_dtype", "fused"), [
    (BF16, 80, BF16, True), (F16, 80, F16, True), (BF16, 48, BF16, False),
    (BF16, 80, F32, False)])
def test_one_loop_for_both_products(dtype, d_ref, ref_dtype, fused, with_kl, direction):
    """``FUSE_K`` (descriptors, heads of the same d and dtype) computes both products in one
    loop: the same sums in the same order as two loops (bit for bit under the interpreter),
    forward and backward, with or without a KL gradient; otherwise it falls back to two loops."""
    g = gen(3)
    n, d, V = 70, 80, 300  # d: several K blocks
    policy = K.Head(torch.randn(n, d, generator=g).to(DEVICE, dtype),
                    (torch.randn(V, d, generator=g) / 4).to(DEVICE, dtype),
                    torch.randn(V, generator=g).to(DEVICE, dtype))
    ref = K.Head(torch.randn(n, d_ref, generator=g).to(DEVICE, ref_dtype),
                 (torch.randn(V, d_ref, generator=g) / 4).to(DEVICE, ref_dtype), None)
    rows = torch.arange(n, device=DEVICE)
    labels = torch.randint(0, V, (n,), generator=g).to(DEVICE)
    g_kl, g_logp = (torch.randn(n, generator=g).to(DEVICE) for _ in range(2))
    opts = dict(reverse=direction == "reverse", softcap=5.0, temperature=0.8)
    seen, results = [], []
    for fuse in (False, True):
        cfg = {**K.two_head_config("forward", dtype), "TMA": True, "FUSE_K": fuse}
        seen.append(K._kernel_heads(policy, ref, rows, cfg)[1]["FUSE_K"])
        stats = K.kl_forward(policy, ref, rows, labels, config=cfg, **opts)
        grads = K.kl_backward(policy, ref, rows, labels, stats.norm, None,
                              g_kl if with_kl else None, None, g_logp, need_bias=True,
                              config=cfg, **opts)
        results.append((stats.kl, stats.norm, stats.logp, stats.ref_logp, *grads))
    assert seen == [False, fused]
    for a, b in zip(*results, strict=True):
        if INTERPRET:
            assert torch.equal(a, b)
        else:  # a compiled kernel may schedule the MMAs of one loop and of two differently
            assert_rel("fused", a, b, GRAD_TOL[dtype])


@needs_triton
@pytest.mark.parametrize("direction", R.KL_DIRECTIONS)
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_identical_heads_give_zero_kl_and_zero_gradient(softcap, dtype, direction):
    """The reference a frozen copy of the policy: KL and its gradient are 0 — exactly under the
    interpreter, which computes both heads' tiles bit for bit alike. A compiled kernel need not
    (two dot loops may get different MMA schedules: on an H200, bf16, they differed), so there
    KL and the gradient only have to be at rounding level."""
    c = {**BASE_CASE, "d_ref": BASE_CASE["d"], "dtype": dtype, "direction": direction,
         "softcap": softcap, "temperature": 0.8, "scale": "peaked"}
    inputs, kwargs, coefs = build_case(c)
    inputs.update(ref_hidden=inputs["hidden"].detach().clone(),
                  ref_weight=inputs["weight"].detach().clone(),
                  ref_bias=inputs["bias"].detach().clone())
    out = call(ops.linear_kl, inputs, kwargs, backend="triton")
    g_out = grads(combined_loss(out, coefs, ("kl", "seq_kl")), inputs)
    if INTERPRET:
        assert bool((out.kl == 0).all()) and bool((out.seq_kl == 0).all())
        assert torch.equal(out.logp, out.ref_logp)
        for name, g in g_out.items():
            assert bool((g == 0).all()), f"d{name} is not 0"
        return
    assert out.kl.abs().max().item() <= 1e-6 and out.seq_kl.abs().max().item() <= 1e-5
    assert_rel("ref_logp", out.ref_logp, out.logp, VALUE_TOL)
    # the gradient of a KL this far from 0 (reference moved by 0.1·noise), as the scale
    far = dict(inputs, ref_hidden=inputs["ref_hidden"] + 0.1 * torch.randn_like(
        inputs["ref_hidden"]))
    g_far = grads(combined_loss(call(ops.linear_kl, far, kwargs, backend="triton"), coefs,
                                ("kl", "seq_kl")), inputs)
    for name, g in g_out.items():
        assert g.double().norm() <= 1e-3 * g_far[name].double().norm(), f"d{name} is not ~0"


@needs_triton
@pytest.mark.parametrize("direction", R.KL_DIRECTIONS)
@pytest.mark.parametrize("eps", [1e-3, 3e-2, 0.3])
def test_close_heads_as_accurate_as_the_spec(eps, direction):
    """Reference = policy + ε·noise (KL ~ ε²), against an fp64 evaluation of the spec: the fp32
    spec's KL subtracts O(1) terms (log-softmaxes) and loses ~1e-6/KL (5e-3 relative at ε = 1e-3);
    the kernel forms lse_z - lse_r and E_p[Δ] without cancellation, so its KL stays ≤ 1e-4 relative
    (3e-5 measured), and its gradients are no less accurate than the spec's."""
    c = {**BASE_CASE, "d_ref": BASE_CASE["d"], "direction": direction, "mask": "none",
         "seqs": "none", "entropy": False}
    inputs, kwargs, coefs = build_case(c)
    g = gen(3)
    for name in ("hidden", "weight", "bias"):
        t = inputs[name].detach()
        inputs[f"ref_{name}"] = t + eps * torch.randn(t.shape, generator=g).to(DEVICE)
    exact_inputs = {k: (v.detach().double().requires_grad_(k in INPUTS) if v is not None else v)
                    for k, v in inputs.items()}
    runs = {
        "ours": (call(ops.linear_kl, inputs, kwargs, backend="triton"), inputs),
        "spec": (call(R.linear_kl, inputs, kwargs), inputs),
        "exact": (call(R.linear_kl, exact_inputs, kwargs), exact_inputs),
    }
    assert bool((runs["ours"][0].kl >= 0).all())
    results = {k: (out.kl, grads(combined_loss(out, coefs, ("kl",)), ins))
               for k, (out, ins) in runs.items()}
    exact_kl, exact_g = results.pop("exact")
    err = {k: [rel_err(kl, exact_kl)] + [rel_err(gr[n], exact_g[n]) for n in gr]
           for k, (kl, gr) in results.items()}
    assert err["ours"][0] <= 1e-4, err
    for ours, spec in zip(err["ours"][1:], err["spec"][1:], strict=True):
        assert ours <= max(VALUE_TOL, 2 * spec), err


@needs_triton
@pytest.mark.parametrize("direction", R.KL_DIRECTIONS)
def test_nearly_identical_heads_give_no_negative_kl(direction):
    """A reference 1e-7 away (biases only): the KL, ~1e-14, is below fp32's rounding of its
    terms; what comes out must still be a KL, ≥ 0."""
    c = {**BASE_CASE, "d_ref": BASE_CASE["d"], "direction": direction, "mask": "none",
         "seqs": "none", "entropy": False}
    inputs, kwargs, _ = build_case(c)
    for name in ("hidden", "weight", "bias"):
        inputs[f"ref_{name}"] = inputs[name].detach()
    noise = torch.randn(inputs["bias"].shape, generator=gen(4)).to(DEVICE)
    inputs["ref_bias"] = inputs["ref_bias"] + 1e-7 * noise
    assert bool((call(ops.linear_kl, inputs, kwargs, backend="triton").kl >= 0).all())


@needs_triton
@pytest.mark.parametrize("scale", [30.0, 300.0, 1000.0])
def test_entropy_of_peaked_rows_is_as_accurate_as_the_spec(scale):
    g = gen(11)
    hidden = torch.randn(64, 64, generator=g).to(DEVICE)
    weight = (torch.randn(500, 64, generator=g) * scale / 8).to(DEVICE)
    ref_hidden = torch.randn(64, 32, generator=g).to(DEVICE)
    ref_weight = torch.randn(500, 32, generator=g).to(DEVICE)
    args = (hidden, weight, ref_hidden, ref_weight)
    out = ops.linear_kl(*args, backend="triton", return_entropy=True)
    ref = R.linear_kl(*args, return_entropy=True)
    exact = R.linear_kl(*(t.double() for t in args), return_entropy=True)
    err_ref, err_out = rel_err(ref.entropy, exact.entropy), rel_err(out.entropy, exact.entropy)
    assert err_out <= max(VALUE_TOL, 2 * err_ref), f"{err_out:.2g} vs the spec's {err_ref:.2g}"


@needs_triton
def test_masked_rows_give_zero_and_cost_nothing(monkeypatch):
    c = {**BASE_CASE, "tokens": (4, 50), "mask": "none", "labels": "all"}
    inputs, kwargs, coefs = build_case(c)
    mask = torch.ones(4, 50, dtype=torch.bool, device=DEVICE)
    mask[0] = False
    mask[2, 5:] = False
    kwargs["mask"] = mask
    kwargs["labels"][1, :10] = -100
    rows_seen, forward = [], K.kl_forward

    def spy(policy, ref, rows, *args, **kw):
        rows_seen.append(rows.numel())
        return forward(policy, ref, rows, *args, **kw)

    monkeypatch.setattr(K, "kl_forward", spy)
    out = call(ops.linear_kl, inputs, kwargs, backend="triton")
    assert rows_seen == [200 - 50 - 45 - 10]  # only the counted rows reach the kernel
    ref = call(R.linear_kl, inputs, kwargs)
    for name in OUTPUTS:
        assert_rel(name, getattr(out, name), getattr(ref, name), VALUE_TOL)
    skipped = ~counted(kwargs)
    for name in ("kl", "entropy", "logp", "ref_logp"):
        assert bool((getattr(out, name)[skipped] == 0).all()), name
        assert bool((getattr(out, name)[~skipped] != 0).all()), name
    assert out.seq_kl[0] == 0 and out.seq_count.tolist() == [0.0, 40.0, 5.0, 50.0]
    g_out, g_ref = grads(combined_loss(out, coefs), inputs), grads(combined_loss(ref, coefs),
                                                                   inputs)
    for name, want in g_ref.items():
        assert_rel(f"d{name}", g_out[name], want, VALUE_TOL)
    assert bool((g_out["hidden"][skipped] == 0).all())


@needs_triton
@pytest.mark.parametrize("labels", [False, True])
def test_every_row_masked_gives_zeros(labels):
    """Nothing counted is no error (a micro-batch may have no completion token): every output
    and gradient is 0."""
    inputs, kwargs, coefs = build_case({**BASE_CASE, "labels": "all" if labels else "none"})
    kwargs["mask"] = torch.zeros_like(kwargs["mask"])
    out = call(ops.linear_kl, inputs, kwargs, backend="triton")
    for name in OUTPUTS:
        value = getattr(out, name)
        assert value is None or not value.any(), name
    for name, g in grads(combined_loss(out, coefs), inputs).items():
        assert g.shape == inputs[name].shape and not g.any(), name


@needs_triton
def test_launchers_accept_no_rows():
    """Zero valid rows (reachable under torch.compile, which skips validation): empty statistics,
    zero gradients, no kernel launch."""
    inputs, _, _ = build_case(BASE_CASE)
    policy = K.Head(inputs["hidden"].detach(), inputs["weight"].detach(),
                    inputs["bias"].detach())
    ref = K.Head(inputs["ref_hidden"], inputs["ref_weight"], inputs["ref_bias"])
    rows = torch.zeros(0, dtype=torch.long, device=DEVICE)
    st_ = K.kl_forward(policy, ref, rows, rows, want_entropy=True)
    assert st_.norm.shape == (5, 0) and all(t.shape == (0,) for t in st_ if t.dim() == 1)
    dh, dw, db = K.kl_backward(policy, ref, rows, rows, st_.norm, st_.entropy, st_.kl, st_.kl,
                               st_.kl, need_bias=True)
    assert not dh.any() and not dw.any() and not db.any()
    assert dh.shape == (0, policy.hidden.shape[1]) and dw.shape == policy.weight.shape


@needs_triton
def test_grads_of_each_output_alone():
    """Each output as the only loss term: the others get no (None) upstream gradient."""
    c = {**BASE_CASE, "softcap": 5.0, "temperature": 1.3}
    for direction in R.KL_DIRECTIONS:
        inputs, kwargs, coefs = build_case({**c, "direction": direction})
        out = call(ops.linear_kl, inputs, kwargs, backend="triton")
        ref = call(R.linear_kl, inputs, kwargs)
        for name in OUTPUTS:
            g_out = grads(combined_loss(out, coefs, (name,)), inputs)
            g_ref = grads(combined_loss(ref, coefs, (name,)), inputs)
            for k, want in g_ref.items():
                assert_rel(f"d{k} from {name}", g_out[k], want, VALUE_TOL)


@needs_triton
def test_grad_only_w_r_t_some_inputs():
    """needs_input_grad: only dW (hidden and bias frozen), only dH, only db."""
    inputs, kwargs, coefs = build_case({**BASE_CASE, "seqs": "none"})
    for trainable in ("weight", "hidden", "bias"):
        args = {k: (v.detach().requires_grad_(k == trainable) if k in INPUTS[:3] else v)
                for k, v in inputs.items()}
        out = call(ops.linear_kl, args, kwargs, backend="triton")
        ref = call(R.linear_kl, args, kwargs)
        (got,) = torch.autograd.grad(combined_loss(out, coefs), [args[trainable]])
        (want,) = torch.autograd.grad(combined_loss(ref, coefs), [args[trainable]])
        assert_rel(f"d{trainable}", got, want, VALUE_TOL)


@needs_triton
@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize(("dtype", "tma"), [(F32, False), (BF16, True)])
def test_chunked_backward_matches_one_chunk(reverse, dtype, tma):
    """dX written in several vocabulary chunks (dW complete per chunk, dH accumulated) gives the
    one-chunk result; also with descriptor loads (column offsets mid-vocabulary)."""
    with tma_loads(tma):
        check_chunked_backward(reverse, dtype)


def check_chunked_backward(reverse, dtype):
    inputs, kwargs, _ = build_case({**BASE_CASE, "V": 333, "dtype": dtype})
    g = gen(5)
    policy = K.Head(inputs["hidden"].detach(), inputs["weight"].detach(),
                    inputs["bias"].detach())
    ref = K.Head(inputs["ref_hidden"], inputs["ref_weight"], inputs["ref_bias"])
    rows = torch.arange(0, 77, 2, device=DEVICE)
    labels = kwargs["labels"].clamp_min(0).index_select(0, rows)
    st_ = K.kl_forward(policy, ref, rows, labels, reverse=reverse, want_entropy=True)
    g_kl, g_ent, g_logp = (torch.randn(rows.numel(), generator=g).to(DEVICE) for _ in range(3))
    args = (policy, ref, rows, labels, st_.norm, st_.entropy, g_kl, g_ent, g_logp)
    one = K.kl_backward(*args, reverse=reverse, need_bias=True)
    chunked = K.kl_backward(*args, reverse=reverse, need_bias=True, chunk_bytes=rows.numel() * 4
                            * 64)
    assert_same_over_chunks("dW", chunked[1], one[1])
    for name, a, b in (("dH", chunked[0], one[0]), ("db", chunked[2], one[2])):
        # 16-bit dH: the chunks' fp32 sums, in another order, may round to a neighbour
        assert_rel(name, a, b, 1e-6 if dtype == F32 or name != "dH" else 1e-2)
    assert one[0].shape == (rows.numel(), policy.hidden.shape[1])  # the valid rows' dH


@needs_triton
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_backward_is_bit_identical_run_to_run(dtype):
    inputs, kwargs, coefs = build_case({**BASE_CASE, "tokens": (150,), "V": 333, "dtype": dtype,
                                        "softcap": 10.0})
    runs = [grads(combined_loss(call(ops.linear_kl, inputs, kwargs, backend="triton"), coefs),
                  inputs) for _ in range(2)]
    for name in INPUTS:
        assert torch.equal(runs[0][name], runs[1][name]), name
        assert bool(runs[0][name].abs().sum() > 0), name


# --------------------------------------------------------------------------------------------
# Custom ops under torch.compile; backend dispatch; estimators
# --------------------------------------------------------------------------------------------


def small_inputs(requires_grad=False):
    g = gen(7)
    hidden = torch.randn(9, 16, generator=g)
    weight = torch.randn(21, 16, generator=g) / 4
    bias = torch.randn(21, generator=g)
    ref_hidden = torch.randn(9, 24, generator=g)
    ref_weight = torch.randn(21, 24, generator=g) / 4
    labels = torch.tensor([0, 20, 3, -100, 7, 7, 1, 19, -100])
    mask = torch.tensor([True, True, False, True, True, True, True, False, True])
    policy = [t.to(DEVICE).requires_grad_(requires_grad) for t in (hidden, weight, bias)]
    return [*policy, *(t.to(DEVICE) for t in (ref_hidden, ref_weight, labels, mask))]


@needs_triton
@pytest.mark.parametrize(("with_labels", "softcap", "reverse", "eps"),
                         [(True, 0.0, True, 0.0), (False, 5.0, False, 0.0),
                          (True, 3.0, False, 1e-3), (True, 0.0, True, 1e-2),
                          (False, 0.0, True, 1e-3)])
def test_opcheck(with_labels, softcap, reverse, eps):
    hidden, weight, bias, ref_hidden, ref_weight, labels, mask = small_inputs(requires_grad=True)
    valid = mask & (labels != -100)
    args = (hidden, weight, ref_hidden, ref_weight, bias, None, valid,
            labels if with_labels else None, reverse, 1.0, softcap, True, eps)
    torch.library.opcheck(torch.ops.hypo_fast.linear_kl.default, args)
    _, stats, entropy, _, _, tile_stats = (
        t.detach() for t in torch.ops.hypo_fast.linear_kl(*args))
    g = torch.randn(9, generator=gen(3)).to(DEVICE)
    weight, bias = weight.detach(), bias.detach()
    for needs in ([True, True, True], [False, True, False]):
        for h in (hidden.detach(), hidden.detach().T.contiguous().T):  # row- and column-major
            bargs = (h, weight, ref_hidden, ref_weight, bias, None, valid,
                     labels if with_labels else None, stats, entropy, tile_stats, g,
                     None if reverse else -g, 0.5 * g if with_labels else None, reverse, 1.0,
                     softcap, eps, needs)
            torch.library.opcheck(torch.ops.hypo_fast.linear_kl_backward.default, bargs)


@needs_triton
def test_opcheck_backward_every_row_valid():
    """No row masked: dH is the kernels' result itself, viewed as hidden's shape."""
    hidden, weight, bias, ref_hidden, ref_weight, labels, _ = small_inputs()
    valid = torch.ones_like(labels, dtype=torch.bool)
    labels = torch.where(labels == -100, 5, labels)
    args = (hidden, weight, ref_hidden, ref_weight, bias, None, valid, labels, True, 1.0, 0.0,
            True, 0.0)
    _, stats, entropy, _, _, tile_stats = torch.ops.hypo_fast.linear_kl(*args)
    g = torch.randn(9, generator=gen(3)).to(DEVICE)
    torch.library.opcheck(torch.ops.hypo_fast.linear_kl_backward.default, (
        hidden, weight, ref_hidden, ref_weight, bias, None, valid, labels, stats, entropy,
        tile_stats, g, None, 0.5 * g, True, 1.0, 0.0, 0.0, [True, True, True]))


@needs_triton
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    hidden, weight, bias, ref_hidden, ref_weight, labels, mask = small_inputs(requires_grad=True)
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2], device=DEVICE)

    def fn(hidden, weight, bias):
        out = ops.linear_kl(hidden, weight, ref_hidden, ref_weight, bias=bias, labels=labels,
                            mask=mask, return_entropy=True, seq_ids=seq_ids, num_seqs=3,
                            backend="triton")
        return out.seq_kl.sum() + 0.3 * out.entropy.sum() - out.logp.sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, want = compiled(hidden, weight, bias), fn(hidden, weight, bias)
    assert_rel("loss", got, want, 1e-6)
    for a, b in zip(torch.autograd.grad(got, (hidden, weight, bias)),
                    torch.autograd.grad(want, (hidden, weight, bias)), strict=True):
        assert_rel("grad", a, b, 1e-6)

    def no_num_seqs(hidden):
        return ops.linear_kl(hidden, weight, ref_hidden, ref_weight, seq_ids=seq_ids,
                             backend="triton").kl

    torch._dynamo.reset()
    with pytest.raises(Exception, match="num_seqs"):
        torch.compile(no_num_seqs, backend="aot_eager", fullgraph=True)(hidden)


@pytest.mark.parametrize("backend", [None, "cpu", "reference"])
def test_cpu_tensors_default_to_the_reference(monkeypatch, backend):
    forbid_kernels(monkeypatch)
    monkeypatch.delenv("HYPO_FAST_BACKEND", raising=False)
    hidden, weight, bias, ref_hidden, ref_weight, labels, mask = (
        t.cpu() for t in small_inputs(requires_grad=True))
    kwargs = dict(bias=bias, labels=labels, mask=mask, direction="forward", return_entropy=True)
    out = ops.linear_kl(hidden, weight, ref_hidden, ref_weight, backend=backend, **kwargs)
    ref = R.linear_kl(hidden, weight, ref_hidden, ref_weight, **kwargs)
    for name in ("kl", "entropy", "logp", "ref_logp"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name


def test_estimators_are_the_reference_ones():
    assert (ops.k1, ops.k2, ops.k3) == (R.k1, R.k2, R.k3)


# --------------------------------------------------------------------------------------------
# Bad inputs raise, naming the argument, before any kernel runs
# --------------------------------------------------------------------------------------------

BAD_INPUTS = {
    # name: (edit of the args dict, exception, text the message must contain)
    "ref_hidden_requires_grad": (lambda a: {**a, "ref_hidden": a["ref_hidden"].requires_grad_()},
                                 ValueError, "ref_hidden"),
    "ref_weight_requires_grad": (lambda a: {**a, "ref_weight": a["ref_weight"].requires_grad_()},
                                 ValueError, "ref_weight"),
    "ref_bias_requires_grad": (lambda a: {**a, "ref_bias": a["bias"].detach().requires_grad_()},
                               ValueError, "ref_bias"),
    "vocab_mismatch": (lambda a: {**a, "ref_weight": a["ref_weight"][:-1]}, ValueError,
                       "ref_weight"),
    "ref_hidden_size": (lambda a: {**a, "ref_hidden": a["ref_hidden"][:, :5]}, ValueError,
                        "ref_hidden"),
    "ref_tokens": (lambda a: {**a, "ref_hidden": a["ref_hidden"][:-1]}, ValueError, "ref_hidden"),
    "ref_bias_shape": (lambda a: {**a, "ref_bias": a["bias"].detach()[:-1]}, ValueError,
                       "ref_bias"),
    "ref_weight_dtype": (lambda a: {**a, "ref_weight": a["ref_weight"].to(BF16)}, TypeError,
                         "ref_weight"),
    "weight_dtype": (lambda a: {**a, "weight": a["weight"].detach().to(F16)}, TypeError, "weight"),
    "nan_ref_weight": (lambda a: {**a, "ref_weight": a["ref_weight"] * math.nan}, ValueError,
                       "ref_weight"),
    "direction": (lambda a: {**a, "direction": "both"}, ValueError, "direction"),
    "mask_dtype": (lambda a: {**a, "mask": a["mask"].float()}, TypeError, "mask"),
    "mask_shape": (lambda a: {**a, "mask": a["mask"][:-1]}, ValueError, "mask"),
    "softcap_zero": (lambda a: {**a, "softcap": 0.0}, ValueError, "softcap"),
}


@needs_triton
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_before_any_kernel(monkeypatch, case):
    forbid_kernels(monkeypatch)
    hidden, weight, bias, ref_hidden, ref_weight, labels, mask = small_inputs(requires_grad=True)
    args = dict(hidden=hidden, weight=weight, ref_hidden=ref_hidden, ref_weight=ref_weight,
                bias=bias, ref_bias=None, labels=labels, mask=mask, direction="reverse",
                softcap=None)
    edit, exc, text = BAD_INPUTS[case]
    args = edit(args)
    with pytest.raises(exc, match=text):
        ops.linear_kl(args.pop("hidden"), args.pop("weight"), args.pop("ref_hidden"),
                      args.pop("ref_weight"), backend="triton", **args)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if c.endswith("_requires_grad")])
def test_reference_requiring_grad_is_an_error_on_every_backend(backend, case):
    """As on triton: the reference head is frozen, so a gradient wanted there is an error."""
    hidden, weight, bias, ref_hidden, ref_weight, *_ = small_inputs(requires_grad=True)
    args = BAD_INPUTS[case][0](dict(ref_hidden=ref_hidden, ref_weight=ref_weight, bias=bias,
                                    ref_bias=None))
    with pytest.raises(ValueError, match=case.removesuffix("_requires_grad")):
        ops.linear_kl(hidden, weight, args.pop("ref_hidden"), args.pop("ref_weight"),
                      backend=backend, **args)


@needs_triton
def test_reference_requiring_grad_is_accepted_without_grad_mode():
    """Under no_grad nothing is recorded, so a reference that requires grad (e.g. one lm_head
    Parameter shared by policy and reference, in evaluation) is no error."""
    hidden, weight, bias, ref_hidden, ref_weight, *_ = small_inputs(requires_grad=True)
    with torch.no_grad():
        shared = ops.linear_kl(hidden, weight, ref_hidden.requires_grad_(),
                               ref_weight.requires_grad_(), bias=bias, ref_bias=bias,
                               backend="triton").kl
    assert torch.equal(shared, ops.linear_kl(hidden, weight, ref_hidden.detach(),
                                             ref_weight.detach(), bias=bias,
                                             ref_bias=bias.detach(), backend="triton").kl)


@pytest.mark.parametrize("eps", [-1e-3, math.nan, math.inf, "exact"])
def test_filter_eps_rejects_meaningless_values(monkeypatch, eps):
    forbid_kernels(monkeypatch)
    hidden, weight, bias, ref_hidden, ref_weight, labels, _ = small_inputs(requires_grad=True)
    with pytest.raises(ValueError, match="filter_eps"):
        ops.linear_kl(hidden, weight, ref_hidden, ref_weight, bias=bias, labels=labels,
                      filter_eps=eps, backend="triton")
