"""Edge cases of the public ops' triton path: fp64 inputs, backend misuse, layouts of the
backward op's outputs, empty launches (under ``torch.compile`` validation is skipped)."""

from __future__ import annotations

import pytest
import torch
from hypo_fast.kernels import linear_logprob as K
from kernel_helpers import CPU, DEVICE, on, tma_loads

from hypo_fast import _layout, ops
from hypo_fast import reference as R


def small(dtype=torch.float64, seed=0, device=DEVICE):
    """A head drawn on the CPU (the same values on every device), its leaves made on ``device``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, 16, generator=g, dtype=dtype).to(device).requires_grad_()
    weight = (torch.randn(50, 16, generator=g, dtype=dtype) / 4).to(device).requires_grad_()
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, :3] = -100
    return hidden, weight, labels.to(device)


def test_fp64_inputs_run_in_fp32_and_get_fp64_gradients():
    hidden, weight, labels = small()
    out = ops.linear_logprob(hidden, weight, labels, backend="triton", return_entropy=True)
    ref = R.linear_logprob(hidden, weight, labels, return_entropy=True)
    assert out.logp.dtype == torch.float32
    torch.testing.assert_close(out.logp.double(), ref.logp, rtol=1e-5, atol=1e-5)
    g_ours = torch.autograd.grad((out.logp + out.entropy).sum(), (hidden, weight))
    g_ref = torch.autograd.grad((ref.logp + ref.entropy).sum(), (hidden, weight))
    for a, b in zip(g_ours, g_ref, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fp64_kl_runs_in_fp32():
    hidden, weight, labels = small()
    ref_hidden, ref_weight = hidden.detach() * 0.9, weight.detach() * 1.1
    out = ops.linear_kl(hidden, weight, ref_hidden, ref_weight, labels=labels, backend="triton")
    ref = R.linear_kl(hidden, weight, ref_hidden, ref_weight, labels=labels)
    torch.testing.assert_close(out.kl.double(), ref.kl, rtol=1e-4, atol=1e-6)
    (grad,) = torch.autograd.grad(out.kl.sum(), (weight,))
    assert grad.dtype == torch.float64


def test_triton_backend_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
        ops.resolve_backend("triton", torch.device("cpu"))


def test_backward_op_returns_row_major_gradients_for_column_major_inputs():
    """The fake impl must describe the real outputs: row-major dH and dW even when hidden and
    weight are column-major views (the real op copies them)."""
    hidden, weight, labels = small(torch.float32)
    hidden_t = hidden.detach().reshape(18, 16).T.contiguous().T
    weight_t = weight.detach().T.contiguous().T
    labels = labels.reshape(18)
    _, _, ent, _, tile_lse, norm = torch.ops.hypo_fast.linear_logprob(
        hidden_t, weight_t, labels, None, -100, 1.0, 0.0, True, False, 0.0)
    g = torch.randn(18).to(DEVICE)
    args = (hidden_t, weight_t, labels, None, norm, ent, tile_lse, g, -g, g, -100, 1.0, 0.0, 0.0,
            [True, True, False])
    torch.library.opcheck(torch.ops.hypo_fast.linear_logprob_backward.default, args)
    dh, dw, _ = torch.ops.hypo_fast.linear_logprob_backward(*args)
    assert dh.is_contiguous() and dw.is_contiguous()


def test_forward_launcher_with_no_valid_row_returns_empties():
    hidden, weight, _ = small(torch.float32)
    rows = torch.zeros(0, dtype=torch.long, device=DEVICE)
    logp, lse, ent, norm, coll = K.logprob_forward(
        hidden.detach().reshape(18, 16), weight.detach(), None, rows, rows, want_entropy=True,
        want_collision=True)
    assert logp.shape == lse.shape == ent.shape == coll.shape == (0,) and norm.shape == (2, 0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_token_weights_without_seq_ids_is_an_error(backend):
    hidden, weight, labels = small(torch.float32, device=on(backend))
    weights = torch.ones(2, 9, device=on(backend))
    with pytest.raises(ValueError, match="pass seq_ids"):
        ops.linear_logprob(hidden, weight, labels, token_weights=weights, backend=backend)


def shifted_case():
    """A causal LM's shift: hidden[:, :-1] of a [3, 10, 16] buffer (``reshape`` would copy it),
    labels aligned with it, a frozen reference head laid out alike."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 10, 16, generator=g).to(DEVICE).requires_grad_()
    ref_base = torch.randn(3, 10, 16, generator=g).to(DEVICE)
    weight = (torch.randn(40, 16, generator=g) / 4).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 40, (3, 9), generator=g)
    labels[1, :4] = -100
    return base, ref_base, weight, labels.to(DEVICE)


@pytest.mark.parametrize("op", ["logprob", "kl"])
def test_shifted_hidden_is_read_in_place(op, monkeypatch):
    """hidden[:, :-1] reaches the kernels, forward and backward, as a view of its own memory (the
    forward, validation included, copies no hidden states; the backward's launcher reads them in
    place too), and gives exactly what a contiguous copy gives; the gradient of the buffer's
    last position is 0."""
    from hypo_fast.kernels import linear_kl as KL

    base, ref_base, weight, labels = shifted_case()
    hidden, ref_hidden = base[:, :-1], ref_base[:, :-1]
    launchers = ((K, ("logprob_forward", "logprob_backward")) if op == "logprob"
                 else (KL, ("kl_forward", "kl_backward")))
    read = []
    for name in launchers[1]:
        real = getattr(launchers[0], name)

        def spy(first, *args, real=real, **kwargs):
            heads = (first,) if op == "logprob" else (first.hidden, args[0].hidden)
            read.append(tuple(h.untyped_storage().data_ptr() for h in heads))
            return real(first, *args, **kwargs)

        monkeypatch.setattr(launchers[0], name, spy)

    def loss(h, h_ref):
        if op == "logprob":
            out = ops.linear_logprob(h, weight, labels, backend="triton", return_entropy=True)
            return (out.logp + out.entropy).sum()
        return ops.linear_kl(h, weight, h_ref, weight.detach(), labels=labels,
                             backend="triton").kl.sum()

    with torch.profiler.profile(record_shapes=True) as prof:  # the forward, validation included
        total = loss(hidden, ref_hidden)
    copies = [e.key for e in prof.key_averages(group_by_input_shape=True)
              if e.key in ("aten::clone", "aten::contiguous", "aten::copy_")
              and [3, 9, 16] in e.input_shapes]
    assert not copies, copies
    g_view = torch.autograd.grad(total, (base, weight))
    stored = (base, ref_base)[: 1 if op == "logprob" else 2]
    assert read == [tuple(t.untyped_storage().data_ptr() for t in stored)] * 2
    copy = hidden.detach().contiguous().requires_grad_()
    g_copy = torch.autograd.grad(loss(copy, ref_hidden.contiguous()), (copy, weight))
    assert torch.equal(g_view[0][:, :-1], g_copy[0]) and not g_view[0][:, -1].any()
    assert torch.equal(g_view[1], g_copy[1])
    if op == "kl":  # heads laid out unlike each other: both copied, the same result
        g_mixed = torch.autograd.grad(loss(hidden, ref_hidden.contiguous()), (base, weight))
        assert all(torch.equal(a, b) for a, b in zip(g_mixed, g_view, strict=True))


@pytest.mark.parametrize(("dtype", "tma"), [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-pointers", "bf16-descriptors"])
@pytest.mark.parametrize("op", ["logprob", "kl"])
def test_transposed_hidden_every_row_valid(op, dtype, tma):
    """hidden [T, B, d] as a transpose of a [B, T, d] buffer, every label valid: its rows are
    every row of the buffer but in another order, so the kernels must follow the row index
    (not take the buffer's rows in order); the same values and gradients as a copy."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(3, 5, 16, generator=g, dtype=dtype).to(DEVICE)
    ref = torch.randn(3, 5, 16, generator=g, dtype=dtype).to(DEVICE).transpose(0, 1)
    weight = (torch.randn(40, 16, generator=g, dtype=dtype) / 4).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 40, (5, 3), generator=g).to(DEVICE)

    def run(h):
        if op == "logprob":
            out = ops.linear_logprob(h, weight, labels, backend="triton")
            return out.logp, out.logp.sum()
        out = ops.linear_kl(h, weight, ref, weight.detach(), labels=labels, backend="triton")
        return out.kl, out.kl.sum()

    view = base.clone().requires_grad_().transpose(0, 1)
    assert _layout.row_map(view) is not None and not view.is_contiguous()
    copy = view.detach().contiguous().requires_grad_()
    with tma_loads(tma):
        (got, total), (want, want_total) = run(view), run(copy)
        g_view = torch.autograd.grad(total, (view, weight))
        g_copy = torch.autograd.grad(want_total, (copy, weight))
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(g_view, g_copy, strict=True))


def test_descriptor_loads_need_d_rows_of_16_bytes():
    """bf16, d = 44 (88-byte rows): a weight sliced from a 48-wide buffer has aligned rows, but
    the gathered hidden rows would not, so HYPO_FAST_TMA=1 falls back to pointer loads (a
    descriptor over them fails) and computes what pointer loads compute."""
    g = torch.Generator().manual_seed(8)
    weight = (torch.randn(40, 48, generator=g) / 6).bfloat16().to(DEVICE)[:, :44].requires_grad_()
    hidden = torch.randn(2, 9, 44, generator=g).bfloat16().to(DEVICE).requires_grad_()
    labels = torch.randint(0, 40, (2, 9), generator=g)
    labels[0, :3] = -100
    labels = labels.to(DEVICE)
    out = []
    for tma in (False, True):
        with tma_loads(tma):
            lp = ops.linear_logprob(hidden, weight, labels, backend="triton").logp
            out.append((lp, *torch.autograd.grad(lp.sum(), (hidden, weight))))
    assert all(torch.equal(a, b) for a, b in zip(*out, strict=True))


def test_row_map_edges():
    """Which hidden layouts are read in place: views whose rows start at 16-byte aligned
    multiples of one stride (size-1 dims do not count); copies otherwise, and for no tokens."""
    wide = torch.zeros(4, 6, 20)
    assert _layout.row_map(wide[:, :-1, :16]) == (20, (120 // 20, 1))
    assert _layout.row_map(torch.zeros(1, 5, 16)[:, 1:]) == (16, (0, 1))  # size-1 dim: 0
    assert _layout.row_map(torch.zeros(5, 16).expand(3, 5, 16)) == (16, (0, 1))  # stride 0
    assert _layout.row_map(torch.zeros(4, 6, 17)[..., :16]) is None  # 68-byte rows: unaligned
    assert _layout.row_map(torch.zeros(3, 0, 16)) is None  # no tokens
    assert _layout.row_map(torch.zeros(65)[1:].view(4, 16)) is None  # base not 16-byte aligned
    assert _layout.row_map(torch.zeros(1, 1, 16)) == (16, (0, 0))  # one token: its own row
    assert _layout.row_map(torch.zeros(16, 4).T) is None  # d not unit-stride
    rows = torch.tensor([0, 3, 7])
    contiguous = torch.randn(2, 4, 16)
    view, index = _layout.row_source(contiguous, rows, _layout.row_map(contiguous))
    assert index is rows and view.data_ptr() == contiguous.data_ptr()
    shifted = torch.randn(2, 5, 16)[:, 1:]
    view, index = _layout.row_source(shifted, rows, _layout.row_map(shifted))
    assert torch.equal(view[index], shifted.reshape(-1, 16)[rows])


@pytest.mark.parametrize("op", ["logprob", "kl"])
def test_every_token_valid_gathers_no_rows(op):
    """With no ignored token the hidden states serve as their own valid rows: neither pass
    gathers an [n, d] copy of them (a launcher told so checks that it is true)."""
    hidden, weight, _ = small(torch.float32)
    labels = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.profiler.profile(record_shapes=True) as prof:
        if op == "logprob":
            loss = ops.linear_logprob(hidden, weight, labels, backend="triton").logp.sum()
        else:
            loss = ops.linear_kl(hidden, weight, hidden.detach() * 0.5, weight.detach(),
                                 backend="triton").kl.sum()
        loss.backward()
    gathers = [e.input_shapes for e in prof.key_averages(group_by_input_shape=True)
               if e.key == "aten::index_select" and e.input_shapes[:1] == [[18, 16]]]
    assert not gathers, gathers
    rows = torch.arange(17, device=DEVICE)
    with pytest.raises(ValueError, match="all_rows: rows must be every row"):
        K.logprob_forward(hidden.detach().reshape(18, 16), weight.detach(), None,
                          labels.reshape(-1)[:17], rows, all_rows=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_does_not_lower_the_precision(backend):
    """Both ops compute in fp32 under torch.autocast too: the spec's matmul is not autocast to
    bf16 (it was: log-probs came back bf16, 5e-2 off)."""
    hidden, weight, labels = small(torch.float32, device=on(backend))
    ref_hidden, ref_weight = hidden.detach() * 0.9, weight.detach() * 1.1
    results = []
    for enabled in (False, True):
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=enabled):
            lp = ops.linear_logprob(hidden, weight, labels, backend=backend)
            kl = ops.linear_kl(hidden, weight, ref_hidden, ref_weight, labels=labels,
                               backend=backend)
        results.append((lp.logp, lp.lse, kl.kl, kl.logp, kl.ref_logp))
    for plain, autocast in zip(*results, strict=True):
        assert autocast.dtype == torch.float32
        torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["logprob", "kl"])
def test_reference_backend_compiles_without_graph_breaks(op):
    """The CPU default (the reference) under ``torch.compile(fullgraph=True)``: validation,
    which reads values back to the host, is skipped in a graph, as on the triton path."""
    torch._dynamo.reset()
    hidden, weight, labels = small(torch.float32, device=CPU)
    seq_ids = torch.arange(2)[:, None].expand(2, 9)

    def fn(hidden, weight, num_seqs=2):
        if op == "logprob":
            out = ops.linear_logprob(hidden, weight, labels, seq_ids=seq_ids, num_seqs=num_seqs,
                                     backend="reference")
            return out.seq_sum.sum()
        out = ops.linear_kl(hidden, weight, hidden.detach() * 0.9, weight.detach(),
                            labels=labels, seq_ids=seq_ids, num_seqs=num_seqs,
                            backend="reference")
        return out.seq_kl.sum()

    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(hidden, weight)
    want = fn(hidden, weight)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (hidden, weight)),
                    torch.autograd.grad(want, (hidden, weight)), strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="num_seqs must be given"):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(hidden, weight, None)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("filter_eps", [None, "auto"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
def test_no_counted_token_gives_zeros_and_zero_gradients(backend, filter_eps, tma):
    """Every label ignored (a micro-batch whose completions were all truncated): no error,
    every output 0, and gradients of zeros that still reach every input (a data-parallel
    reducer expects one for each parameter)."""
    hidden, weight, labels = small(torch.float32, device=on(backend))
    bias = torch.randn(50).to(hidden.device).requires_grad_()
    weights = torch.rand(2, 9).to(hidden.device).requires_grad_()
    ignored = torch.full_like(labels, -100)
    seq_ids = torch.arange(2, device=hidden.device)[:, None].expand(2, 9)
    with tma_loads(tma):
        lp = ops.linear_logprob(hidden, weight, ignored, bias, seq_ids=seq_ids,
                                token_weights=weights, return_entropy=True, backend=backend,
                                filter_eps=filter_eps)
        kl = ops.linear_kl(hidden, weight, hidden.detach() * 0.5, weight.detach(), bias=bias,
                           labels=ignored, seq_ids=seq_ids, token_weights=weights,
                           return_entropy=True, backend=backend, filter_eps=filter_eps)
        outputs = (lp.logp, lp.lse, lp.entropy, lp.seq_sum, lp.seq_weighted_sum, lp.seq_count,
                   kl.kl, kl.entropy, kl.logp, kl.ref_logp, kl.seq_kl, kl.seq_count)
        assert not any(t.any() for t in outputs)
        loss = sum(t.sum() for t in outputs if t.requires_grad)
        inputs = (hidden, weight, bias, weights)
        for g, t in zip(torch.autograd.grad(loss, inputs), inputs, strict=True):
            assert g.shape == t.shape and not g.any()


def _both_ops(hidden, weight, labels, backend):
    """Both ops' outputs on one head (the KL against a scaled copy of it)."""
    return (ops.linear_logprob(hidden, weight, labels, backend=backend).logp,
            ops.linear_kl(hidden, weight, hidden.detach() * 0.9, weight.detach(), labels=labels,
                          backend=backend).kl)


def test_double_backward_is_a_clear_error_on_triton():
    """The reference differentiates twice; the kernels' backward says it cannot, by name."""
    hidden, weight, labels = small()
    for backend in ("reference", "triton"):
        for out in _both_ops(hidden, weight, labels, backend):
            (g_hidden,) = torch.autograd.grad(out.sum(), hidden, create_graph=True)
            second = lambda g=g_hidden: torch.autograd.grad(g.square().sum(), weight)  # noqa: E731
            if backend == "reference":
                assert second()[0].abs().sum() > 0
            else:
                with pytest.raises(NotImplementedError, match=r"double backward .* reference"):
                    second()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_labels_made_in_inference_mode(backend):
    """Labels from an evaluation-time collator (inference tensors) train like any others."""
    hidden, weight, labels = small(device=on(backend))
    with torch.inference_mode():
        frozen = labels.clone()
    grads = [torch.autograd.grad(sum(o.sum() for o in _both_ops(hidden, weight, y, backend)),
                                 (hidden, weight)) for y in (labels, frozen)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["linear_logprob", "linear_logprob_backward", "linear_kl",
                                  "linear_kl_backward"])
def test_ops_tell_torch_compile_they_cannot_be_graph_captured(name):
    """Each op syncs with the host (row compaction), so a cudagraph mode must leave it out."""
    assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.hypo_fast, name).default.tags
