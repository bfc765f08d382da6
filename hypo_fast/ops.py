"""Public fused ops and their backend dispatch (the only module that knows backends exist).

Backends: ``triton`` (the kernels in :mod:`hypo_fast.kernels`, registered as ``torch.library``
custom ops with fake implementations so ``torch.compile`` traces them), ``reference`` (the
naive spec, :mod:`hypo_fast.reference`) and ``cpu`` (the C++ backend; until it lands, CPU
tensors are served by the reference). Default: CUDA tensors → triton, others → cpu. The
``backend=`` argument, then the ``HYPO_FAST_BACKEND`` environment variable, override it;
``triton`` on CPU tensors runs the kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os

import torch

from . import reference
from ._checks import check_choice, check_tensor, validate_head
from ._layout import all_rows, row_map, row_source, rows_view
from .reference import LogProbOutput

BACKENDS = ("triton", "cpu", "reference")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend a call runs on: ``backend``, else ``$HYPO_FAST_BACKEND``, else by device."""
    chosen = backend or os.environ.get("HYPO_FAST_BACKEND") or None
    if chosen is None:
        return "triton" if device.type == "cuda" else "cpu"
    check_choice("backend", chosen, BACKENDS)
    if chosen == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' needs CUDA tensors, got {device.type} ones (on the CPU "
                         "the kernels run only under TRITON_INTERPRET=1, for testing)")
    return chosen


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per-valid-row fp32 ``values [n]`` placed at ``rows`` of a zero tensor shaped ``shape``."""
    out = torch.zeros(shape.numel(), dtype=torch.float32, device=values.device)
    return out.index_copy_(0, rows, values).reshape(shape)


def _on_device(t: torch.Tensor):
    """Make t's GPU the current one while kernels launch (Triton launches on the current
    device, not on the tensors')."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _fp32_if_fp64(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The kernels compute in fp32: fp64 inputs are cast (autograd casts the gradients back)."""
    return tuple(t.float() if t is not None and t.dtype == torch.float64 else t for t in tensors)


# The ops compact their valid rows (nonzero) and the filtered backward reads its tile lists on
# the host: a CUDA graph cannot capture them, so torch.compile's cudagraph modes leave them out.
_HOST_SYNCING = (torch.Tag.cudagraph_unsafe,)


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)


def _check_filter_eps(filter_eps: object) -> None:
    if filter_eps not in ("auto", None) and (
        isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float))
        or not math.isfinite(filter_eps) or filter_eps < 0
    ):
        raise ValueError(f"filter_eps must be 'auto', None or a finite number >= 0, got "
                         f"{filter_eps!r}")


def _filter_eps(filter_eps: float | str | None, hidden: torch.Tensor,
                *params: torch.Tensor | None) -> float:
    """The ε a backward filters with: 0 (exact) for None or without gradients to compute, the
    input dtype's machine epsilon / 32 for ``"auto"``."""
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (hidden, *params))):
        return 0.0
    if filter_eps == "auto":
        return torch.finfo(hidden.dtype).eps / 32
    return float(filter_eps or 0.0)


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


def _saveable(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a copy of it where autograd could not save it: labels made under
    ``torch.inference_mode`` (the reference backend indexes with them as they are). Dynamo
    cannot ask a tensor that, so in a graph ``t`` is taken as it is."""
    if (t is not None and not torch.compiler.is_compiling() and torch.is_grad_enabled()
            and t.is_inference()):
        return t.clone()
    return t


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "double backward (the gradient of a gradient taken with create_graph=True) through "
        "hypo_fast's triton ops is not supported; the reference backend (backend='reference') "
        "supports it")


def _head_grads(hidden, bias, rows, dh, dw, db):
    """A backward op's outputs ``(dH, dW, db)``: the gradients shaped like their inputs (dH from
    the valid rows' ``dh [n, d]``, zero elsewhere), a fresh empty tensor for each absent one (an
    op's outputs must not alias)."""
    if dh is not None and rows.numel() == hidden.shape[:-1].numel():  # every row, in order
        full = dh.view(hidden.shape)
    elif dh is not None:
        full = hidden.new_zeros(hidden.shape)
        full.view(-1, hidden.shape[-1]).index_copy_(0, rows, dh)
    return (
        full if dh is not None else hidden.new_empty(0),
        dw if dw is not None else hidden.new_empty(0),
        db.to(bias.dtype) if db is not None and bias is not None else hidden.new_empty(0),
    )


def _fake_head_grads(hidden, weight, bias, needs):
    """What :func:`_head_grads` returns, for the fake impls: dense row-major gradients, as the
    real ops build them whatever the inputs' strides."""
    return (
        hidden.new_empty(hidden.shape) if needs[0] else hidden.new_empty(0),
        weight.new_empty(weight.shape) if needs[1] else hidden.new_empty(0),
        bias.new_empty(bias.shape) if needs[2] and bias is not None else hidden.new_empty(0),
    )


@torch.library.custom_op("hypo_fast::linear_logprob", mutates_args=(), tags=_HOST_SYNCING)
def _linear_logprob_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float,
    want_entropy: bool,
    want_collision: bool,
    filter_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, lse, entropy, log_collision, tile_lse, norm)``; entropy and log_collision
    empty unless wanted, ``tile_lse`` (per-row log-sum-exp of every vocabulary tile, for the
    filtered backward) empty unless ``filter_eps > 0``, ``norm [2, labels.numel()]`` the
    log-sum-exp in two parts (the kernels' ``Forward.norm``, saved for backward)."""
    from .kernels.linear_logprob import logprob_forward

    rows = _valid_rows(labels, ignore_index)
    flat = labels.reshape(-1)
    h, h_rows = row_source(hidden, rows, row_map(hidden))
    with _on_device(hidden):
        tile_lse = _tile_stats_buffer("linear_logprob", (), hidden, weight, labels, filter_eps)
        fwd = logprob_forward(
            h, rows_view(weight), _contiguous(bias), flat.index_select(0, rows), h_rows,
            all_rows=all_rows(h, h_rows, rows), temperature=temperature,
            softcap=softcap or None,
            want_entropy=want_entropy, want_collision=want_collision,
            tile_lse=tile_lse if tile_lse.numel() else None,
        )

    def per_token(values: torch.Tensor | None) -> torch.Tensor:
        if values is None:
            return labels.new_empty(0, dtype=torch.float32)
        return _scatter_rows(values, rows, labels.shape)

    norm = torch.zeros((2, labels.numel()), dtype=torch.float32, device=labels.device)
    return (per_token(fwd.logp), per_token(fwd.lse), per_token(fwd.entropy),
            per_token(fwd.log_collision), tile_lse, norm.index_copy_(1, rows, fwd.norm))


def _tile_stats_buffer(family: str, planes: tuple[int, ...], hidden, weight, tokens,
                       filter_eps: float) -> torch.Tensor:
    """The per-tile statistics a filtered backward of kernel family ``family`` needs,
    ``[*planes, cdiv(V, tile_width), tokens.numel()]`` fp32 (column i for valid row i); empty
    without filtering."""
    if filter_eps <= 0:
        return tokens.new_empty(0, dtype=torch.float32)
    kernels = importlib.import_module(f".kernels.{family}", __package__)
    n_tiles = -(-weight.shape[0] // kernels.tile_width(hidden.dtype))
    # zeros, not empty: the columns past the valid rows' are never written, and an op's outputs
    # must not depend on uninitialised memory
    return tokens.new_zeros((*planes, n_tiles, tokens.numel()), dtype=torch.float32)


@_linear_logprob_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, temperature, softcap, want_entropy,
      want_collision, filter_eps):
    out = labels.new_empty(labels.shape, dtype=torch.float32)
    entropy = torch.empty_like(out) if want_entropy else out.new_empty(0)
    collision = torch.empty_like(out) if want_collision else out.new_empty(0)
    return (out, torch.empty_like(out), entropy, collision,
            _tile_stats_buffer("linear_logprob", (), hidden, weight, labels, filter_eps),
            out.new_empty(2, labels.numel()))


@torch.library.custom_op("hypo_fast::linear_logprob_backward", mutates_args=(), tags=_HOST_SYNCING)
def _linear_logprob_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    norm: torch.Tensor,
    entropy: torch.Tensor,
    tile_lse: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_lse: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float,
    filter_eps: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels.linear_logprob import logprob_backward

    rows = _valid_rows(labels, ignore_index)

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.reshape(-1).index_select(0, rows).float() if t is not None and t.numel() else None

    g_logp = pick(g_logp)
    h, h_rows = row_source(hidden, rows, row_map(hidden))
    with _on_device(hidden):
        dh, dw, db = logprob_backward(
            h, rows_view(weight), _contiguous(bias), labels.reshape(-1).index_select(0, rows),
            h_rows, norm.index_select(1, rows), pick(entropy),
            g_logp if g_logp is not None else norm.new_zeros(rows.numel()), pick(g_lse),
            pick(g_entropy), all_rows=all_rows(h, h_rows, rows),
            temperature=temperature, softcap=softcap or None,
            need_hidden=needs[0], need_weight=needs[1], need_bias=needs[2],
            tile_lse=tile_lse if tile_lse.numel() else None, filter_eps=filter_eps,
        )
    return _head_grads(hidden, bias, rows, dh, dw, db)


@_linear_logprob_backward_op.register_fake
def _(hidden, weight, labels, bias, norm, entropy, tile_lse, g_logp, g_lse, g_entropy,
      ignore_index, temperature, softcap, filter_eps, needs):
    return _fake_head_grads(hidden, weight, bias, needs)


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, temperature, softcap, _, _, filter_eps = inputs
    _, _, entropy, log_collision, tile_lse, norm = output
    ctx.save_for_backward(hidden, weight, labels, bias, norm, entropy, tile_lse)
    ctx.options = (ignore_index, temperature, softcap, filter_eps)
    ctx.mark_non_differentiable(log_collision, tile_lse, norm)
    # Unused outputs then get None, not zeros: no tile_lse-sized zeros (32 MiB at 16384 tokens
    # of a 128k vocabulary) while the backward runs, and no g_lse/g_entropy terms in the kernel.
    ctx.set_materialize_grads(False)


def _backward(ctx, g_logp, g_lse, g_entropy, *_):
    hidden, weight, labels, bias, norm, entropy, tile_lse = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
             bias is not None and ctx.needs_input_grad[3]]
    dh, dw, db = _linear_logprob_backward_op(
        hidden, weight, labels, bias, norm, entropy, tile_lse, g_logp, g_lse, g_entropy,
        *ctx.options, needs,
    )
    return (dh if needs[0] else None, dw if needs[1] else None, None,
            db if needs[2] else None, None, None, None, None, None, None)


torch.library.register_autograd(
    "hypo_fast::linear_logprob", _backward, setup_context=_setup_context
)
torch.library.register_autograd("hypo_fast::linear_logprob_backward", _no_double_backward)


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    token_weights: torch.Tensor | None = None,
    return_entropy: bool = False,
    return_collision: bool = False,
    filter_eps: float | str | None = "auto",
    deterministic: bool = False,
    backend: str | None = None,
) -> LogProbOutput:
    """Per-token log-probs of ``labels`` under the head ``z = softcap(H @ W.T + b) / T``,
    without materialising the ``[N, V]`` logits on the triton backend.

    Shapes: hidden ``[..., d]``, weight ``[V, d]``, bias ``[V]``; labels, seq_ids and
    token_weights shaped ``hidden.shape[:-1]``. Returns a :class:`LogProbOutput` with fp32
    (from the reference and cpu backends fp64 for fp64 inputs) ``logp = z[y] - lse``,
    ``lse = logsumexp(z)``, optional ``entropy`` and ``log_collision = log Σ_v p_v²`` (WPO's
    normaliser; one multiply-add per logit more in the forward), 0 where ``labels ==
    ignore_index``, and with ``seq_ids`` the per-sequence ``seq_sum = Σ logp``,
    ``seq_weighted_sum = Σ w·logp`` and ``seq_count`` over ``num_seqs`` sequences (default
    ``max(seq_ids) + 1``). Every output but ``log_collision`` (which has no gradient) is
    differentiable w.r.t. hidden, weight, bias and token_weights.

    Gradient filtering (triton backend): with ``filter_eps`` a number ε > 0, or ``"auto"``
    (ε = the input dtype's machine epsilon / 32: 2⁻¹² for bf16, 2⁻¹⁵ for fp16, 2⁻²⁸ for fp32, as
    Cut Cross-Entropy), the backward skips — neither recomputes nor multiplies — the
    (row block, vocabulary tile) pairs whose logits-gradient entries provably add up, per row,
    to at most ε times the row's gradient scale ``|g_lse − g_logp| + |g_entropy|`` (bounds from
    per-tile log-sum-exps the forward records; see ``kernels.linear_logprob.filter_tiles``),
    when enough tiles are skipped for the block-sparse path to pay; otherwise, and with
    ``filter_eps=None`` or 0, it is exact. Either way no atomics are used: gradients are
    bit-identical run to run, so ``deterministic`` needs no separate mode.
    """
    _check_filter_eps(filter_eps)
    chosen = resolve_backend(backend, check_tensor("hidden", hidden).device)
    if chosen != "triton":
        return reference.linear_logprob(
            hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
            softcap=softcap, seq_ids=seq_ids, num_seqs=num_seqs, token_weights=token_weights,
            return_entropy=return_entropy, return_collision=return_collision,
        )
    num_seqs = validate_head(
        hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
        softcap=softcap, seq_ids=seq_ids, num_seqs=num_seqs, token_weights=token_weights,
    )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    hidden, weight, bias = _fp32_if_fp64(hidden, weight, bias)
    logp, lse, entropy, log_collision, _, _ = _linear_logprob_op(
        hidden, weight, _saveable(labels), bias, ignore_index, float(temperature),
        float(softcap or 0.0), return_entropy, return_collision,
        _filter_eps(filter_eps, hidden, weight, bias),
    )
    out = LogProbOutput(logp=logp, lse=lse, entropy=entropy if return_entropy else None,
                        log_collision=log_collision if return_collision else None)
    if seq_ids is not None:
        out.seq_sum, out.seq_weighted_sum, out.seq_count = reference.sequence_sums(
            logp, labels != ignore_index, seq_ids, num_seqs, token_weights
        )
    return out


# --------------------------------------------------------------------------------------------
# linear_kl: full-vocabulary KL between a policy head and a frozen reference head (op 2)
# --------------------------------------------------------------------------------------------

k1, k2, k3 = reference.k1, reference.k2, reference.k3


def _kl_heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows):
    """``(policy, ref, indices)``: both heads as the kernels take them, and the rows of both
    hidden views that hold the flat tokens ``rows``. The views read the inputs' memory where both
    map tokens to rows alike (:func:`row_map`; slices such as ``h[:, :-1]`` of both), else
    contiguous copies; ``[V, d]`` weights with unit stride along d, contiguous biases."""
    from .kernels.linear_kl import Head

    maps = [row_map(hidden), row_map(ref_hidden)]
    if maps[0] is None or maps[1] is None or maps[0][1] != maps[1][1]:
        maps = [None, None]
    (h, index), (h_ref, _) = (row_source(t, rows, m)
                              for t, m in zip((hidden, ref_hidden), maps, strict=True))
    return (Head(h, rows_view(weight), _contiguous(bias)),
            Head(h_ref, rows_view(ref_weight), _contiguous(ref_bias)), index)


@torch.library.custom_op("hypo_fast::linear_kl", mutates_args=(), tags=_HOST_SYNCING)
def _linear_kl_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    bias: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    reverse: bool,
    temperature: float,
    softcap: float,
    want_entropy: bool,
    filter_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kl, stats [5, ...], entropy, logp, ref_logp, tile_stats)`` per token, 0 where ``valid``
    is False; absent outputs are empty. ``stats`` is the kernels' ``KLStats.norm``, saved for
    backward; ``tile_stats`` (the per-tile statistics a filtered backward needs, column i for
    valid row i) is empty unless ``filter_eps > 0``."""
    from .kernels.linear_kl import TILE_STATS, kl_forward

    rows = valid.reshape(-1).nonzero().squeeze(1)
    y = labels.reshape(-1).index_select(0, rows) if labels is not None else None
    with _on_device(hidden):
        policy, ref, index = _kl_heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                       rows)
        tile_stats = _tile_stats_buffer("linear_kl", (TILE_STATS,), hidden, weight, valid,
                                        filter_eps)
        st = kl_forward(
            policy, ref, index, y, reverse=reverse, temperature=temperature,
            softcap=softcap or None, want_entropy=want_entropy,
            all_rows=all_rows(policy.hidden, index, rows),
            tile_stats=tile_stats if tile_stats.numel() else None,
        )

    def scatter(values: torch.Tensor | None) -> torch.Tensor:
        if values is None:  # a fresh empty tensor each: outputs must not alias
            return valid.new_empty(0, dtype=torch.float32)
        return _scatter_rows(values, rows, valid.shape)

    stats = torch.stack([scatter(t) for t in st.norm])
    return (scatter(st.kl), stats, scatter(st.entropy), scatter(st.logp), scatter(st.ref_logp),
            tile_stats)


@_linear_kl_op.register_fake
def _(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, valid, labels, reverse,
      temperature, softcap, want_entropy, filter_eps):
    from .kernels.linear_kl import TILE_STATS

    kl = valid.new_empty(valid.shape, dtype=torch.float32)

    def maybe(present: bool) -> torch.Tensor:
        return torch.empty_like(kl) if present else kl.new_empty(0)

    return (kl, kl.new_empty((5, *valid.shape)), maybe(want_entropy), maybe(labels is not None),
            maybe(labels is not None),
            _tile_stats_buffer("linear_kl", (TILE_STATS,), hidden, weight, valid, filter_eps))


@torch.library.custom_op("hypo_fast::linear_kl_backward", mutates_args=(), tags=_HOST_SYNCING)
def _linear_kl_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    bias: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    tile_stats: torch.Tensor,
    g_kl: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    reverse: bool,
    temperature: float,
    softcap: float,
    filter_eps: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy gradients ``(dH, dW, db)`` (empty where not needed) of :func:`_linear_kl_op`."""
    from .kernels.linear_kl import kl_backward

    rows = valid.reshape(-1).nonzero().squeeze(1)

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.reshape(-1).index_select(0, rows).float() if t is not None and t.numel() else None

    with _on_device(hidden):
        policy, ref, index = _kl_heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                       rows)
        dh, dw, db = kl_backward(
            policy, ref, index,
            labels.reshape(-1).index_select(0, rows) if labels is not None else None,
            stats.reshape(5, -1).index_select(1, rows), pick(entropy), pick(g_kl), pick(g_entropy),
            pick(g_logp),
            reverse=reverse, temperature=temperature, softcap=softcap or None,
            need_hidden=needs[0], need_weight=needs[1], need_bias=needs[2],
            all_rows=all_rows(policy.hidden, index, rows),
            tile_stats=tile_stats if tile_stats.numel() else None, filter_eps=filter_eps,
        )
    return _head_grads(hidden, bias, rows, dh, dw, db)


@_linear_kl_backward_op.register_fake
def _(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, valid, labels, stats, entropy,
      tile_stats, g_kl, g_entropy, g_logp, reverse, temperature, softcap, filter_eps, needs):
    # Row-major like the real op's results, whatever the inputs' strides.
    return _fake_head_grads(hidden, weight, bias, needs)


def _kl_setup_context(ctx, inputs, output):
    *tensors, valid, labels, reverse, temperature, softcap, _, filter_eps = inputs
    _, stats, entropy, _, _, tile_stats = output
    ctx.save_for_backward(*tensors, valid, labels, stats, entropy, tile_stats)
    ctx.options = (reverse, temperature, softcap, filter_eps)
    ctx.mark_non_differentiable(tile_stats)
    # Unused outputs then get None, not zeros, and their terms are skipped in the kernel.
    ctx.set_materialize_grads(False)


def _kl_backward(ctx, g_kl, _g_stats, g_entropy, g_logp, _g_ref_logp, _g_tile_stats):
    (hidden, weight, ref_hidden, ref_weight, bias, ref_bias, valid, labels, stats, entropy,
     tile_stats) = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
             bias is not None and ctx.needs_input_grad[4]]
    if not any(needs):
        return (None,) * 13
    dh, dw, db = _linear_kl_backward_op(
        hidden, weight, ref_hidden, ref_weight, bias, ref_bias, valid, labels, stats, entropy,
        tile_stats, g_kl, g_entropy if entropy.numel() else None,
        g_logp if labels is not None else None, *ctx.options, needs,
    )
    return (dh if needs[0] else None, dw if needs[1] else None, None, None,
            db if needs[2] else None) + (None,) * 8


torch.library.register_autograd(
    "hypo_fast::linear_kl", _kl_backward, setup_context=_kl_setup_context
)
torch.library.register_autograd("hypo_fast::linear_kl_backward", _no_double_backward)


def linear_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    direction: str = "reverse",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    token_weights: torch.Tensor | None = None,
    return_entropy: bool = False,
    filter_eps: float | str | None = None,
    backend: str | None = None,
) -> reference.KLOutput:
    """Exact per-token full-vocabulary KL between the policy head ``z = softcap(H @ W.T + b) / T``
    and the frozen reference head ``r = softcap(H_ref @ W_ref.T + b_ref) / T``, without
    materialising either ``[N, V]`` logits tensor on the triton backend.

    Shapes: hidden ``[..., d]``, weight ``[V, d]``, ref_hidden ``[..., d_ref]``, ref_weight
    ``[V, d_ref]``, biases ``[V]``; labels, mask, seq_ids and token_weights shaped
    ``hidden.shape[:-1]``. ``direction="reverse"``: ``KL(π‖π_ref) = Σ_v p_v (log p_v -
    log q_v)``; ``"forward"``: ``KL(π_ref‖π)``. A token counts when ``mask`` is True (default all)
    and its label, if labels are given, is not ``ignore_index``; other tokens give 0 and cost
    nothing.

    Returns a :class:`reference.KLOutput`: fp32 (as :func:`linear_logprob`'s) per-token ``kl``,
    optional policy ``entropy``, ``logp``/``ref_logp`` of the labels when given, and with
    ``seq_ids`` ``seq_kl[s] = Σ w_i·kl_i`` (w = 1 without ``token_weights``) and ``seq_count``
    over ``num_seqs`` sequences. Gradients flow to hidden, weight, bias and token_weights; the
    reference tensors must not require grad (with grad mode on: an error on every backend).

    ``filter_eps`` (triton backend; default None, exact): as :func:`linear_logprob`'s, the
    backward skips the (row block, tile) pairs whose logits gradients provably add up, per row,
    to at most ε·(|g_kl| + |g_entropy| + |g_logp|) (bounds from tile statistics the forward
    then records, 20 bytes per token and 128 vocabulary columns, kept until the backward; see
    ``kernels.linear_kl.filter_tiles``), when enough are skipped to pay. The bounds shrink
    with the heads' distance (each tile's range of z − r), so a policy close to its reference
    skips more, not less.
    """
    _check_filter_eps(filter_eps)
    for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight),
                    ("ref_bias", ref_bias)):
        if torch.is_grad_enabled() and getattr(t, "requires_grad", False):
            raise ValueError(f"{name} requires grad, but the reference head is frozen: pass "
                             f"{name}.detach()")
    chosen = resolve_backend(backend, check_tensor("hidden", hidden).device)
    if chosen != "triton":
        return reference.linear_kl(
            hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias,
            direction=direction, labels=labels, ignore_index=ignore_index, mask=mask,
            temperature=temperature, softcap=softcap, seq_ids=seq_ids, num_seqs=num_seqs,
            token_weights=token_weights, return_entropy=return_entropy,
        )
    check_choice("direction", direction, reference.KL_DIRECTIONS)
    num_seqs, valid = reference.validate_kl_inputs(
        hidden, weight, ref_hidden, ref_weight, bias, ref_bias, labels=labels,
        ignore_index=ignore_index, mask=mask, temperature=temperature, softcap=softcap,
        seq_ids=seq_ids, num_seqs=num_seqs, token_weights=token_weights,
    )
    for prefix, h, w in (("", hidden, weight), ("ref_", ref_hidden, ref_weight)):
        if w.dtype != h.dtype:
            raise TypeError(f"{prefix}weight dtype {w.dtype} must match {prefix}hidden dtype "
                            f"{h.dtype}")
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = _fp32_if_fp64(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    kl, _, entropy, logp, ref_logp, _ = _linear_kl_op(
        hidden, weight, ref_hidden, ref_weight, bias, ref_bias, valid, _saveable(labels),
        direction == "reverse", float(temperature), float(softcap or 0.0), return_entropy,
        _filter_eps(filter_eps, hidden, weight, bias),
    )
    out = reference.KLOutput(kl=kl, entropy=entropy if return_entropy else None)
    if labels is not None:
        out.logp, out.ref_logp = logp, ref_logp
    if seq_ids is not None:
        plain, weighted, out.seq_count = reference.sequence_sums(
            kl, valid, seq_ids, num_seqs, token_weights
        )
        out.seq_kl = plain if weighted is None else weighted
    return out
