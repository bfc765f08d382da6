"""Machinery shared by the fused preference losses: input layouts, autocast, reference log-probs,
the NLL and logits-mean metrics, and Liger-Kernel's return tuple.

Notation: B pairs, 2B sequences (chosen ``0..B-1``, rejected ``B..2B-1``), N tokens, hidden size
d, vocabulary V. Per-sequence statistics come from ONE fused op call over all 2B sequences; the
sequence-level math is :mod:`hypo_fast.objectives`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import ops
from .._autocast import autocast_disabled, autocast_dtype
from .._checks import (
    caller_names,
    check_choice,
    check_finite,
    check_float,
    check_in_range,
    check_index,
    check_positive,
    check_same_device,
    check_shape,
    labels_flag,
    not_finite,
    raise_flagged,
    values_checked,
)
from .._layout import row_map, row_source
from ..reference import LogProbOutput, compute_dtype, segment_sum

Tensor = torch.Tensor
Metrics = dict[str, Tensor]

#: The auxiliary outputs of Liger-Kernel's chunked preference losses, in order.
LIGER_AUX_FIELDS = (
    "chosen_logps",
    "rejected_logps",
    "chosen_logits_mean",
    "rejected_logits_mean",
    "nll_loss",
    "chosen_rewards",
    "rejected_rewards",
)


class PreferenceOutput(tuple):
    """Liger-Kernel's auxiliary tuple ``(chosen_logps [B], rejected_logps [B], chosen_logits_mean,
    rejected_logits_mean, nll_loss, chosen_rewards [B], rejected_rewards [B], *extra)``, so that
    ``loss, (c, r, *_) = module(...)`` unpacks as with Liger; ``extra`` is ORPO's
    ``(log_odds_ratio, log_odds_chosen)`` and empty elsewhere. Every metric of the loss (margins,
    accuracy, KL terms, ...) is also in the dict ``metrics``. All values are detached.

    Like a tuple it is built from an iterable of its values, which is how container utilities
    (transformers' ``nested_detach``, ``DataParallel``'s gather) rebuild one: ``metrics`` then
    names Liger's seven fields. A loss builds it with every metric (:meth:`from_metrics`).
    """

    metrics: Metrics

    def __new__(cls, values: Iterable[Tensor] = ()) -> PreferenceOutput:
        out = super().__new__(cls, values)
        out.metrics = dict(zip(LIGER_AUX_FIELDS, out, strict=False))
        return out

    @classmethod
    def from_metrics(cls, metrics: Metrics, extra: tuple[str, ...] = ()) -> PreferenceOutput:
        """Liger's fields, then ``extra``, taken from ``metrics`` (kept whole as ``.metrics``)."""
        out = cls([metrics[k] for k in (*LIGER_AUX_FIELDS, *extra)])
        out.metrics = metrics
        return out


# ---------------------------------------------------------------------------------------------
# inputs


#: What the ops' arguments are called in the losses' calls (error messages name these).
PAIR_NAMES = {"hidden": "_input", "weight": "lin_weight", "bias": "bias", "labels": "target",
              "ref_hidden": "ref_input", "ref_weight": "ref_weight", "ref_bias": "ref_bias"}


@dataclass
class Head:
    """One batch of sequences under one lm_head: ``hidden [..., d]``, ``weight [V, d]``, ``bias
    [V]``, ``target`` and ``seq_ids`` shaped ``hidden.shape[:-1]`` with ids in ``[0, num_seqs)``.
    The reference is the frozen head ``ref_hidden``/``ref_weight``/``ref_bias`` (detached), or
    precomputed sequence log-probs ``ref_logps [num_seqs]``, or absent (all None). ``names``:
    the loss's arguments behind these, by the ops' names (:data:`PAIR_NAMES`)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    target: Tensor
    seq_ids: Tensor
    num_seqs: int
    ref_hidden: Tensor | None = None
    ref_weight: Tensor | None = None
    ref_bias: Tensor | None = None
    ref_logps: Tensor | None = None
    weights: Tensor | None = None
    names: dict[str, str] = field(default_factory=lambda: dict(PAIR_NAMES))

    def op_names(self, *, ref: bool = False) -> contextlib.AbstractContextManager:
        """The context in which an op call's errors name this head's arguments as the loss's:
        the policy's, or with ``ref`` the reference's (scored as an op's own ``hidden``)."""
        if not ref:
            return caller_names(**self.names)
        n = self.names
        return caller_names(hidden=n["ref_hidden"], weight=n["ref_weight"], bias=n["ref_bias"],
                            labels=n["labels"])


@dataclass
class PairBatch(Head):
    """A :class:`Head` of 2B sequences (chosen first), with ORPO's ``nll_target``."""

    nll_target: Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.num_seqs // 2


@dataclass
class PairStats:
    """Per-sequence statistics ``[2B]`` of a pair batch: ``sums`` = Σ_t log π (differentiable),
    ``counts`` = valid tokens (unclamped), ``logps`` = the log-probs the loss uses (sums, or
    sums / max(counts, 1) with ``average_log_prob``), ``ref_logps`` likewise for the reference
    (no grad) or None; ``extra`` holds what a particular objective needs besides."""

    sums: Tensor
    counts: Tensor
    logps: Tensor
    ref_logps: Tensor | None
    extra: dict[str, Any] = field(default_factory=dict)

    def halves(self, t: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """``(t[:B], t[B:])`` (None, None for None)."""
        if t is None:
            return None, None
        b = self.sums.shape[0] // 2
        return t[:b], t[b:]


class SeqLogps(NamedTuple):
    """Per-sequence statistics ``[num_seqs]`` of one head's labels: ``sums`` = Σ_t log π,
    ``counts`` = valid tokens, ``weighted`` = Σ_t w_t log π with the head's token weights (the
    same tensor as ``sums`` when it has none), ``log_collision`` = Σ_t log Σ_v π(v)² (no
    gradient; None unless asked for)."""

    sums: Tensor
    counts: Tensor
    weighted: Tensor
    log_collision: Tensor | None = None


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def sequence_layout(
    hidden: Tensor,
    target: Tensor,
    seq_ids: Tensor | None,
    cu_seqlens: Tensor | None,
    names: tuple[str, str, str, str] = ("_input", "target", "seq_ids", "cu_seqlens"),
) -> tuple[Tensor, int]:
    """``(seq_ids, num_seqs)`` for a padded or a packed batch; ``names`` name the four arguments
    in error messages.

    Padded (neither ``seq_ids`` nor ``cu_seqlens``): ``hidden [S, T, d]``, sequence s is row s.
    Packed (flash-attention varlen): ``hidden [N, d]`` or ``[1, N, d]``, and either ``seq_ids``
    (int, shaped like ``target``, values in ``[0, S)``, S = max + 1) or ``cu_seqlens`` (int
    ``[S + 1]``, ``0 = cu[0] ≤ cu[1] ≤ ... ≤ cu[S] = N``: sequence s is tokens ``cu[s]:cu[s+1]``).
    """
    h_name, _, s_name, c_name = names
    tokens = tuple(hidden.shape[:-1])
    if seq_ids is not None and cu_seqlens is not None:
        raise ValueError(f"pass {s_name} or {c_name}, not both")
    if seq_ids is None and cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(
                f"{h_name} must be [num_seqs, T, d] in the padded layout (or pass {s_name} / "
                f"{c_name} for a packed one), got shape {tuple(hidden.shape)}"
            )
        num_seqs, length = tokens
        ids = torch.arange(num_seqs * length, device=hidden.device).reshape(tokens) // length
        return ids, num_seqs
    if hidden.dim() not in (2, 3) or (hidden.dim() == 3 and hidden.shape[0] != 1):
        raise ValueError(
            f"{h_name} must be [N, d] or [1, N, d] in the packed layout, got {tuple(hidden.shape)}"
        )
    n = math.prod(tokens)
    if seq_ids is not None:
        check_index(s_name, seq_ids)
        check_shape(s_name, seq_ids, tokens, f"{h_name}.shape[:-1]")
        check_same_device({h_name: hidden, s_name: seq_ids})
        if torch.compiler.is_compiling():
            raise ValueError(f"under torch.compile pass {c_name}, not {s_name}: the number of "
                             f"sequences, max({s_name}) + 1, must be known to trace the loss")
        lo, hi = torch.aminmax(seq_ids.reshape(-1))
        raise_flagged([(f"{s_name} must be >= 0", lo < 0)])
        return seq_ids, int(hi) + 1
    check_index(c_name, cu_seqlens, ndim=1)
    check_same_device({h_name: hidden, c_name: cu_seqlens})
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{c_name} must hold at least 2 offsets [0, ..., N], got {cu_seqlens}")
    lengths = cu_seqlens.diff()
    raise_flagged([
        (f"{c_name} must start at 0, end at N = {n} ({h_name}'s tokens) and never decrease",
         (cu_seqlens[0] != 0) | (cu_seqlens[-1] != n) | (lengths < 0).any()),
    ])
    num_seqs = lengths.numel()
    ids = torch.repeat_interleave(
        torch.arange(num_seqs, device=hidden.device), lengths, output_size=n
    )
    return ids.reshape(tokens), num_seqs


def check_head_inputs(
    weight: Tensor, hidden: Tensor, target: Tensor | None, bias: Tensor | None,
    names: tuple[str, str, str, str], tokens: tuple[int, ...] | None = None,
) -> None:
    """Kinds, shapes, dtypes and devices of one head's ``(weight, hidden, target, bias)``, named
    by ``names``; ``tokens`` is the token shape ``hidden`` must have (default: target's)."""
    w_name, h_name, t_name, b_name = names
    check_float(w_name, weight, ndim=2)
    check_float(h_name, hidden)
    if hidden.dim() < 2:
        raise ValueError(f"{h_name} must be [..., d], got shape {tuple(hidden.shape)}")
    V, d = weight.shape
    if hidden.shape[-1] != d:
        raise ValueError(f"{h_name} has hidden size {hidden.shape[-1]} but {w_name} is "
                         f"[V, d] = [{V}, {d}]")
    if target is not None:
        check_index(t_name, target)
        check_shape(t_name, target, tuple(hidden.shape[:-1]), f"{h_name}.shape[:-1]")
    if tokens is not None:
        check_shape(h_name, hidden, (*tokens, d), "the tokens of the policy input")
    if bias is not None:
        check_float(b_name, bias)
        check_shape(b_name, bias, (V,), f"[V] with V = {w_name}.shape[0]")
    for name, t in ((w_name, weight), (b_name, bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match {h_name} dtype {hidden.dtype} "
                            "(as in F.linear; under torch.autocast both are cast)")
    check_same_device({h_name: hidden, w_name: weight, b_name: bias, t_name: target})


def check_ref_logps(names: tuple[str, str], values: tuple[Tensor, Tensor], num_pairs: int,
                    hidden: Tensor) -> Tensor:
    """Precomputed reference log-probs, each ``[B]`` on ``hidden``'s device: validated,
    detached, concatenated."""
    for name, t in zip(names, values, strict=True):
        check_float(name, t, ndim=1)
        check_shape(name, t, (num_pairs,), "one value per pair")
        check_same_device({"_input": hidden, name: t})
    check_finite(dict(zip(names, values, strict=True)))
    return torch.cat(values).detach()


# ---------------------------------------------------------------------------------------------
# the base module


class FusedLinearPairLoss(nn.Module):
    """Base of the pair losses: hidden states and lm_head in, ``(loss, PreferenceOutput)`` out.

    Input layout (Liger-Kernel's): ``_input [2B, T, d]`` with the B chosen sequences first and
    the B rejected ones second, ``target [2B, T]`` (``ignore_index`` on prompt and padding),
    ``lin_weight [V, d]``, ``bias [V]``; or the packed layout of :func:`sequence_layout`, where
    sequences ``0..B-1`` are chosen and ``B..2B-1`` rejected. Subclasses implement
    :meth:`_objective` (and may override :meth:`_statistics`).

    ``compiled`` and ``chunk_size`` are accepted for Liger compatibility and ignored: nothing is
    chunked or compiled here, the fused op streams over the vocabulary instead. ``backend``
    (``"triton"``, ``"cpu"``, ``"reference"`` or None for the device default) goes to the ops.
    """

    _extra_aux: tuple[str, ...] = ()
    # whether forward takes ref_chosen_logps/ref_rejected_logps for the reference head
    _takes_ref_logps = True

    def __init__(
        self, *, ignore_index: int, beta: float, alpha: float, compute_nll_loss: bool,
        use_ref_model: bool, average_log_prob: bool, compiled: bool, chunk_size: int,
        backend: str | None,
    ) -> None:
        super().__init__()
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if backend is not None:
            check_choice("backend", backend, ops.BACKENDS)
        self.ignore_index = ignore_index
        self.beta = check_positive("beta", beta)
        self.alpha = check_in_range("alpha", alpha, 0.0, math.inf)
        self.compute_nll_loss = bool(compute_nll_loss)
        self.use_ref_model = bool(use_ref_model)
        self.average_log_prob = bool(average_log_prob)
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.backend = backend

    def extra_repr(self) -> str:
        skip = {"training", "compiled", "chunk_size"}
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if not k.startswith("_") and k not in skip)

    # ----- preparing inputs

    def _prepare(
        self,
        lin_weight: Tensor,
        _input: Tensor,
        target: Tensor,
        bias: Tensor | None = None,
        ref_input: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        *,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        seq_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        nll_target: Tensor | None = None,
        require_ref_head: bool = False,
    ) -> PairBatch:
        """Validate the call's arguments (errors name them), cast to the autocast dtype, resolve
        the layout and the reference. ``require_ref_head``: the loss needs the reference head
        itself (full-vocabulary KL), not only its log-probs."""
        check_float("lin_weight", lin_weight, ndim=2)
        check_float("_input", _input)
        dtype = autocast_dtype(_input.device)
        _input, lin_weight, bias = (_cast(t, dtype) for t in (_input, lin_weight, bias))
        check_head_inputs(lin_weight, _input, target, bias,
                          ("lin_weight", "_input", "target", "bias"))
        ids, num_seqs = sequence_layout(_input, target, seq_ids, cu_seqlens)
        if num_seqs % 2:
            raise ValueError(
                f"the batch holds an odd number of sequences ({num_seqs}): pair losses need B "
                "chosen sequences followed by B rejected ones"
            )
        if nll_target is not None:
            check_index("nll_target", nll_target)
            check_shape("nll_target", nll_target, tuple(target.shape), "target's shape")
            check_same_device({"target": target, "nll_target": nll_target})
        batch = PairBatch(_input, lin_weight, bias, target, ids, num_seqs, nll_target=nll_target)
        precomputed = ref_chosen_logps is not None or ref_rejected_logps is not None
        if not self.use_ref_model:
            if precomputed:
                raise ValueError("ref_chosen_logps / ref_rejected_logps are given but "
                                 "use_ref_model=False")
            return batch  # like Liger, ref_input/ref_weight/ref_bias are then ignored
        if precomputed and ref_input is not None:
            raise ValueError("pass the reference as ref_input/ref_weight/ref_bias or as "
                             "ref_chosen_logps/ref_rejected_logps, not both")
        if require_ref_head and (precomputed or ref_input is None):
            raise ValueError(f"{type(self).__name__} needs the reference head: pass ref_input "
                             "and ref_weight (precomputed log-probs are not enough)")
        if precomputed:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                missing = "ref_chosen_logps" if ref_chosen_logps is None else "ref_rejected_logps"
                raise ValueError(f"{missing} is None but the other reference log-probs are given")
            batch.ref_logps = check_ref_logps(("ref_chosen_logps", "ref_rejected_logps"),
                                              (ref_chosen_logps, ref_rejected_logps),
                                              batch.num_pairs, _input)
            return batch
        if ref_input is None:
            raise ValueError("use_ref_model=True needs the reference: pass ref_input and "
                             "ref_weight (and ref_bias), or ref_chosen_logps and "
                             "ref_rejected_logps")
        if ref_weight is None:
            raise ValueError("ref_input is given but ref_weight is None: pass the reference "
                             "lm_head weight")
        batch.ref_hidden, batch.ref_weight, batch.ref_bias = self._ref_head(
            ref_input, ref_weight, ref_bias, lin_weight, tuple(target.shape), dtype
        )
        return batch

    @staticmethod
    def _ref_head(
        ref_input: Tensor, ref_weight: Tensor, ref_bias: Tensor | None, lin_weight: Tensor,
        tokens: tuple[int, ...], dtype: torch.dtype | None,
        names: tuple[str, str, str, str] = ("ref_weight", "ref_input", "target", "ref_bias"),
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The reference head, validated against the policy's tokens and vocabulary, cast to
        the autocast dtype and detached (it is frozen)."""
        ref_input, ref_weight, ref_bias = (
            None if t is None else _cast(t, dtype).detach() for t in (ref_input, ref_weight,
                                                                       ref_bias)
        )
        check_head_inputs(ref_weight, ref_input, None, ref_bias, names, tokens=tokens)
        if ref_weight.shape[0] != lin_weight.shape[0]:
            raise ValueError(f"{names[0]} has vocabulary {ref_weight.shape[0]} but lin_weight "
                             f"has {lin_weight.shape[0]}")
        check_same_device({"lin_weight": lin_weight, names[1]: ref_input})
        return ref_input, ref_weight, ref_bias

    @torch.no_grad()
    def reference_logps(
        self,
        ref_weight: Tensor,
        ref_input: Tensor,
        target: Tensor,
        ref_bias: Tensor | None = None,
        *,
        seq_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(ref_chosen_logps, ref_rejected_logps)``, each ``[B]`` fp32 (the input's dtype if
        fp64): the reference's sequence log-probs exactly as ``forward`` computes them from
        the reference head — Σ_t log π_ref(y_t), over ``max(n, 1)`` with ``average_log_prob``,
        with the loss's token weights (LD-DPO's ``ld_alpha``) — to pass back to ``forward``
        as precomputed log-probs, so that the reference model need not be kept during
        training (TRL's ``precompute_ref_log_probs``). Inputs are ``forward``'s reference
        arguments, in the same layout (padded ``[2B, T, d]``, chosen rows first, or packed with
        ``seq_ids``/``cu_seqlens``)."""
        if not self.use_ref_model:
            raise ValueError(f"{type(self).__name__} uses no reference model (use_ref_model="
                             "False): there are no reference log-probs to compute")
        if not self._takes_ref_logps:
            raise ValueError(f"{type(self).__name__} needs the reference head in forward: "
                             "precomputed reference log-probs cannot stand in for it")
        x = self._prepare(ref_weight, ref_input, target, ref_bias, ref_input, ref_weight,
                          ref_bias, seq_ids=seq_ids, cu_seqlens=cu_seqlens)
        logps = self._reference_logps(x)
        b = x.num_pairs
        return logps[:b], logps[b:]

    # ----- computing

    def _per_seq(self, sums: Tensor, counts: Tensor) -> Tensor:
        """The sequence log-prob the loss uses: S, or S / max(n, 1) with ``average_log_prob``."""
        return sums / counts.clamp(min=1.0) if self.average_log_prob else sums

    def _reference_sums(self, head: Head) -> SeqLogps:
        """The :class:`SeqLogps` of the head's labels under its frozen reference head (weighted
        with the head's token weights, as the policy's)."""
        with torch.no_grad(), head.op_names(ref=True):
            ref = ops.linear_logprob(
                head.ref_hidden, head.ref_weight, head.target, head.ref_bias,
                ignore_index=self.ignore_index, seq_ids=head.seq_ids, num_seqs=head.num_seqs,
                token_weights=head.weights, backend=self.backend,
            )
        return _seq_logps(ref, head.seq_ids, head.num_seqs)

    def _reference_logps(self, x: PairBatch) -> Tensor | None:
        """``[2B]`` reference log-probs: precomputed, or the reference head under no_grad."""
        if x.ref_logps is not None or x.ref_hidden is None:
            return x.ref_logps
        ref = self._reference_sums(x)
        return self._per_seq(ref.weighted, ref.counts)

    def _statistics(self, x: PairBatch) -> PairStats:
        """Per-sequence policy log-probs (one fused call over the 2B sequences) and reference."""
        return self._policy_stats(x)[0]

    def _policy_stats(self, x: PairBatch, *more: Head) -> tuple[PairStats, list[SeqLogps]]:
        """The pairs' :class:`PairStats` and the :class:`SeqLogps` of each further head of
        ``more`` under the policy's lm_head, from ONE fused call (:func:`joint_logprob`). The
        pairs' log-probs are their weighted sums when ``x.weights`` is set. With
        ``compute_nll_loss`` and ``nll_target`` the NLL's labels on the chosen rows are one head
        more, their statistics in ``extra["nll"]``."""
        heads = [x, *more]
        nll = self.compute_nll_loss and x.nll_target is not None
        if nll:
            labels = torch.where(x.seq_ids < x.num_pairs, x.nll_target, self.ignore_index)
            heads.append(Head(x.hidden, x.weight, x.bias, labels, x.seq_ids, x.num_pairs,
                              names={**x.names, "labels": "nll_target (chosen sequences)"}))
        pairs, *rest = joint_logprob(heads, ignore_index=self.ignore_index, backend=self.backend,
                                     collision=self._wants_collision())
        s = PairStats(pairs.sums, pairs.counts, self._per_seq(pairs.weighted, pairs.counts),
                      self._reference_logps(x))
        if pairs.log_collision is not None:
            s.extra["log_collision"] = pairs.log_collision
        if nll:
            s.extra["nll"] = rest.pop()
        return s, rest

    def _wants_collision(self) -> bool:
        """Whether :meth:`_policy_stats` also sums the pairs' per-token log Σ_v π(v)² (into
        ``extra["log_collision"]``)."""
        return False

    def _nll(self, x: PairBatch, s: PairStats) -> Tensor:
        """Token-mean NLL of the chosen completions over the batch: −Σ_{chosen} S / Σ_{chosen} n
        (Liger: divided by all non-ignored chosen tokens), from ``nll_target`` when given."""
        b = x.num_pairs
        sums, counts = s.extra["nll"][:2] if x.nll_target is not None else (s.sums, s.counts)
        return -sums[:b].sum() / counts[:b].sum().clamp(min=1.0)

    def _objective(self, s: PairStats, nll: Tensor | None) -> tuple[Tensor, Metrics]:
        """``(loss, metrics)`` from the statistics; ``nll`` is None unless compute_nll_loss."""
        raise NotImplementedError

    def _add_nll(self, loss: Tensor, nll: Tensor | None) -> Tensor:
        """``loss + alpha·nll`` (Liger's NLL term), or ``loss`` without compute_nll_loss."""
        return loss if nll is None else loss + self.alpha * nll

    def _run(self, x: PairBatch, **extra: Any) -> tuple[Tensor, PreferenceOutput]:
        """Statistics → objective → Liger's tuple, with autocast off (inputs already cast) and
        the objectives' value checks too (inputs already checked; the statistics are the ops'
        outputs)."""
        with autocast_disabled(x.hidden.device), values_checked():
            stats = self._statistics(x, **extra)
            nll = self._nll(x, stats) if self.compute_nll_loss else None
            loss, metrics = self._objective(stats, nll)
            chosen_mean, rejected_mean = logits_means(x)
        chosen, rejected = stats.halves(stats.logps.detach())
        metrics.update(
            chosen_logps=chosen, rejected_logps=rejected, chosen_logits_mean=chosen_mean,
            rejected_logits_mean=rejected_mean,
            nll_loss=nll.detach() if nll is not None else loss.new_zeros(()).detach(),
        )
        return loss, PreferenceOutput.from_metrics(metrics, self._extra_aux)


def joint_logprob(heads: list[Head], *, ignore_index: int, backend: str | None,
                  collision: bool = False) -> list[SeqLogps]:
    """The :class:`SeqLogps` of each head's labels, all under the first head's weight and bias,
    from ONE :func:`hypo_fast.ops.linear_logprob` call (with their ``log_collision`` when
    ``collision``).

    Two calls with the same weight would each return a ``[V, d]`` dW, both alive while autograd
    adds them (V·d more at the head's backward: 1 GB for a bf16 Llama-3-8B head). Several heads'
    valid tokens are gathered into one ``[n, d]`` tensor instead (n·d; a call with ignored
    tokens gathers its valid rows on Hopper anyway); one head is scored in place.
    """
    first = heads[0]
    if len(heads) == 1:
        with first.op_names():
            out = ops.linear_logprob(first.hidden, first.weight, first.target, first.bias,
                                     ignore_index=ignore_index, seq_ids=first.seq_ids,
                                     num_seqs=first.num_seqs, token_weights=first.weights,
                                     return_collision=collision, backend=backend)
        return [_seq_logps(out, first.seq_ids, first.num_seqs)]
    # the op checks the gathered rows only, the logits means read all (and check_finite is off
    # within a loss's run: values_checked); each head's labels, for errors that name them
    raise_flagged([(f"{name} contains NaN or inf", not_finite(h)) for name, h in
                   {head.names["hidden"]: head.hidden for head in heads}.items()]
                  + [labels_flag(head.names["labels"], head.target, first.weight.shape[0],
                                 ignore_index) for head in heads])
    weighted = any(head.weights is not None for head in heads)
    weights_dtype = compute_dtype(first.hidden)
    hidden, labels, seq_ids, weights, sizes = [], [], [], [], []
    for head in heads:
        rows, target, ids, tokens = valid_tokens(head, ignore_index)
        hidden.append(rows)
        labels.append(target)
        seq_ids.append(ids + sum(sizes))
        sizes.append(head.num_seqs)
        if weighted:
            weights.append(torch.ones_like(target, dtype=weights_dtype) if head.weights is None
                           else head.weights.reshape(-1)[tokens].to(weights_dtype))
    names = {k: " / ".join(dict.fromkeys(h.names[k] for h in heads)) for k in first.names}
    with caller_names(**names):
        out = ops.linear_logprob(
            torch.cat(hidden), first.weight, torch.cat(labels), first.bias,
            ignore_index=ignore_index, seq_ids=torch.cat(seq_ids), num_seqs=sum(sizes),
            token_weights=torch.cat(weights) if weighted else None, return_collision=collision,
            backend=backend,
        )
    whole = _seq_logps(out, torch.cat(seq_ids), sum(sizes))
    parts = [[None] * len(sizes) if t is None else t.split(sizes) for t in whole]
    return [SeqLogps(*stats) for stats in zip(*parts, strict=True)]


def _seq_logps(out: LogProbOutput, seq_ids: Tensor, num_seqs: int) -> SeqLogps:
    """The :class:`SeqLogps` of an op's output (weighted: its ``seq_weighted_sum`` when the
    call had token weights; log_collision: the per-token ones summed, when it returned them)."""
    weighted = out.seq_sum if out.seq_weighted_sum is None else out.seq_weighted_sum
    collision = (None if out.log_collision is None
                 else segment_sum(out.log_collision, seq_ids, num_seqs))
    return SeqLogps(out.seq_sum, out.seq_count, weighted, collision)


def valid_tokens(head: Head, ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(hidden [n, d], labels [n], seq_ids [n], tokens [n])`` of the head's tokens whose label
    is not ``ignore_index`` (``tokens``: their flat indices), the hidden rows read in place
    (:func:`row_source`) and gathered. Without such a token, its first token, as sequence 0 with
    its label ignored (it adds 0), so that the hidden states still get a gradient, of zeros (a
    data-parallel reducer expects one). Under ``torch.compile``, whose graphs need shapes known
    before the data, every token, an ignored one as sequence 0 (a head may number only its
    scored sequences)."""
    target = head.target.reshape(-1)
    ids = head.seq_ids.reshape(-1)
    if torch.compiler.is_compiling():
        tokens = torch.arange(target.numel(), device=target.device)
        ids = torch.where(target != ignore_index, ids, 0)
    else:
        tokens = (target != ignore_index).nonzero().squeeze(1)
    if tokens.numel() == 0:
        tokens = tokens.new_zeros(1)
        ids = torch.zeros_like(ids)
    view, index = row_source(head.hidden, tokens, row_map(head.hidden))
    return view.index_select(0, index), target[tokens], ids[tokens], tokens


@torch.no_grad()
def logits_means(x: Head) -> tuple[Tensor, Tensor]:
    """Mean logit over (tokens × vocabulary) of the chosen and of the rejected sequences, every
    token counted (prompt and padding too), as Liger reports it — without the logits:

        mean = (h̄ · Σ_v w_v + Σ_v b_v) / V,   h̄ = the half's mean hidden state

    One ``[2, N] @ [N, d]`` product (weights 1/n) and one column sum of W; fp32 except that h̄
    is in the input dtype (bf16: a relative error ~4e-3 on this metric). A mean, not a sum, so
    that fp16 does not overflow (a sum of 8192 hidden states of 8 does).
    """
    chosen = x.seq_ids.reshape(-1) < x.num_seqs // 2
    per_token = torch.stack([chosen, ~chosen]).float()
    n = per_token.sum(1)
    per_token = (per_token / n.clamp(min=1.0)[:, None]).to(x.hidden.dtype)
    # the hidden states' rows read in place (a shifted view would otherwise be copied)
    tokens = torch.arange(chosen.numel(), device=chosen.device)
    h, index = row_source(x.hidden, tokens, row_map(x.hidden))
    halves = per_token.new_zeros(2, h.shape[0]).index_add_(1, index, per_token)
    total = (halves @ h).float() @ x.weight.sum(0, dtype=torch.float32)
    if x.bias is not None:
        total = total + (n > 0) * x.bias.sum(dtype=torch.float32)
    means = total / x.weight.shape[0]
    return means[0], means[1]
