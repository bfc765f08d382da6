"""Public fused ops and their backend dispatch (the only module that knows backends exist).

Backends: ``triton`` (the kernels in :mod:`hypo_fast.kernels`, registered as ``torch.library``
custom ops with fake implementations so ``torch.compile`` traces them), ``reference`` (the
naive spec, :mod:`hypo_fast.reference`) and ``cpu`` (the C++ backend; until it lands, CPU
tensors are served by the reference). Default: CUDA tensors → triton, others → cpu. The
``backend=`` argument, then the ``HYPO_FAST_BACKEND`` environment variable, override it;
``triton`` on CPU tensors runs the kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch

from . import reference
from ._checks import check_choice, validate_head
from .reference import LogProbOutput

BACKENDS = ("triton", "cpu", "reference")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend a call runs on: ``backend``, else ``$HYPO_FAST_BACKEND``, else by device."""
    chosen = backend or os.environ.get("HYPO_FAST_BACKEND") or None
    if chosen is None:
        return "triton" if device.type == "cuda" else "cpu"
    check_choice("backend", chosen, BACKENDS)
    return chosen


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)


def _rows_view(hidden: torch.Tensor) -> torch.Tensor:
    h = hidden.reshape(-1, hidden.shape[-1])
    return h if h.stride(-1) == 1 else h.contiguous()


@torch.library.custom_op("hypo_fast::linear_logprob", mutates_args=())
def _linear_logprob_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels.linear_logprob import logprob_forward

    rows = _valid_rows(labels, ignore_index)
    flat = labels.reshape(-1)
    logp_c, lse_c, ent_c = logprob_forward(
        _rows_view(hidden), weight, bias, flat.index_select(0, rows), rows,
        temperature=temperature, softcap=softcap or None, want_entropy=want_entropy,
    )

    def scatter(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        return out.index_copy_(0, rows, values).reshape(labels.shape)

    entropy = scatter(ent_c) if want_entropy else labels.new_empty(0, dtype=torch.float32)
    return scatter(logp_c), scatter(lse_c), entropy


@_linear_logprob_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, temperature, softcap, want_entropy):
    out = labels.new_empty(labels.shape, dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out) if want_entropy else out.new_empty(0)


@torch.library.custom_op("hypo_fast::linear_logprob_backward", mutates_args=())
def _linear_logprob_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor,
    g_lse: torch.Tensor,
    g_entropy: torch.Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels.linear_logprob import logprob_backward

    rows = _valid_rows(labels, ignore_index)

    def pick(t: torch.Tensor) -> torch.Tensor | None:
        return t.reshape(-1).index_select(0, rows).float() if t.numel() else None

    h2 = _rows_view(hidden)
    dh, dw, db = logprob_backward(
        h2, weight, bias, labels.reshape(-1).index_select(0, rows), rows, pick(lse),
        pick(entropy), pick(g_logp), pick(g_lse), pick(g_entropy),
        temperature=temperature, softcap=softcap or None,
        need_hidden=needs[0], need_weight=needs[1], need_bias=needs[2],
    )
    empty = hidden.new_empty(0)
    return (
        dh.reshape(hidden.shape) if dh is not None else empty,
        dw if dw is not None else empty,
        db.to(bias.dtype) if db is not None and bias is not None else empty,
    )


@_linear_logprob_backward_op.register_fake
def _(hidden, weight, labels, bias, lse, entropy, g_logp, g_lse, g_entropy, ignore_index,
      temperature, softcap, needs):
    empty = hidden.new_empty(0)
    return (
        torch.empty_like(hidden) if needs[0] else empty,
        torch.empty_like(weight) if needs[1] else empty,
        torch.empty_like(bias) if needs[2] and bias is not None else empty,
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, temperature, softcap, _ = inputs
    _, lse, entropy = output
    ctx.save_for_backward(hidden, weight, labels, bias, lse, entropy)
    ctx.options = (ignore_index, temperature, softcap)


def _backward(ctx, g_logp, g_lse, g_entropy):
    hidden, weight, labels, bias, lse, entropy = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
             bias is not None and ctx.needs_input_grad[3]]
    dh, dw, db = _linear_logprob_backward_op(
        hidden, weight, labels, bias, lse, entropy, g_logp, g_lse,
        g_entropy if entropy.numel() else entropy, *ctx.options, needs,
    )
    return (dh if needs[0] else None, dw if needs[1] else None, None,
            db if needs[2] else None, None, None, None, None)


torch.library.register_autograd(
    "hypo_fast::linear_logprob", _backward, setup_context=_setup_context
)


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
    filter_eps: float | str | None = "auto",
    deterministic: bool = False,
    backend: str | None = None,
) -> LogProbOutput:
    """Per-token log-probs of ``labels`` under the head ``z = softcap(H @ W.T + b) / T``,
    without materialising the ``[N, V]`` logits on the triton backend.

    Shapes: hidden ``[..., d]``, weight ``[V, d]``, bias ``[V]``; labels, seq_ids and
    token_weights shaped ``hidden.shape[:-1]``. Returns a :class:`LogProbOutput` with fp32
    ``logp = z[y] - lse``, ``lse = logsumexp(z)``, optional ``entropy`` (0 where
    ``labels == ignore_index``), and with ``seq_ids`` the per-sequence ``seq_sum = Σ logp``,
    ``seq_weighted_sum = Σ w·logp`` and ``seq_count`` over ``num_seqs`` sequences (default
    ``max(seq_ids) + 1``). Every output is differentiable w.r.t. hidden, weight, bias and
    token_weights.

    ``filter_eps`` and ``deterministic`` are accepted for the planned filtered backward: the
    current triton backward computes every tile (exact) and uses no atomics, so it is already
    bit-identical run to run.
    """
    if filter_eps not in ("auto", None) and not isinstance(filter_eps, float):
        raise ValueError(f"filter_eps must be 'auto', None or a float, got {filter_eps!r}")
    chosen = resolve_backend(backend, hidden.device)
    if chosen != "triton":
        return reference.linear_logprob(
            hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
            softcap=softcap, seq_ids=seq_ids, num_seqs=num_seqs, token_weights=token_weights,
            return_entropy=return_entropy,
        )
    if not torch.compiler.is_compiling():
        num_seqs = validate_head(
            hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
            softcap=softcap, seq_ids=seq_ids, num_seqs=num_seqs, token_weights=token_weights,
        )
        if weight.dtype != hidden.dtype:
            raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    elif seq_ids is not None and num_seqs is None:
        raise ValueError("num_seqs must be given with seq_ids under torch.compile")
    logp, lse, entropy = _linear_logprob_op(
        hidden, weight, labels, bias, ignore_index, float(temperature), float(softcap or 0.0),
        return_entropy,
    )
    out = LogProbOutput(logp=logp, lse=lse, entropy=entropy if return_entropy else None)
    if seq_ids is not None:
        out.seq_sum, out.seq_weighted_sum, out.seq_count = reference.sequence_sums(
            logp, labels != ignore_index, seq_ids, num_seqs, token_weights
        )
    return out
