"""Drop-in replacements for Liger-Kernel's fused linear DPO, SimPO, CPO and ORPO losses.

Each module: ``loss, aux = module(lin_weight, _input, target, bias, ...)`` with the chosen
sequences in the first half of the batch; ``aux`` is a :class:`PreferenceOutput` (Liger's tuple,
plus ``aux.metrics``). The math is :mod:`hypo_fast.objectives`; the per-sequence log-probs come
from one :func:`hypo_fast.ops.linear_logprob` call over the 2B sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._checks import check_in_range
from ..objectives import cpo_loss, dpo_loss, orpo_loss, simpo_loss, wpo_pair_weights
from ..reference import compute_dtype
from ._base import FusedLinearPairLoss, Metrics, PairBatch, PairStats, PreferenceOutput, Tensor


def _ones() -> Tensor:
    """A one-element batch to validate hyperparameters at construction (by evaluating the
    objective once), so that a bad value raises where the module is built."""
    return torch.ones(1)


class FusedLinearDPOLoss(FusedLinearPairLoss):
    r"""DPO and its TRL variants (``loss_type``: every type of :data:`objectives.DPO_LOSS_TYPES`,
    or a list of them combined with ``loss_weights`` as TRL's multi-loss form) on hidden states,
    with label smoothing, f-divergence scores and the clipped reference margin of
    :func:`hypo_fast.objectives.dpo_loss`::

        loss = dpo_loss(S_w, S_l, S^ref_w, S^ref_l, ...) + alpha · NLL(y_w)

    (the NLL term only with ``compute_nll_loss``). S = Σ_t log π(y_t | ·) over the non-ignored
    tokens of a sequence, or its mean with ``average_log_prob``. Constructor arguments and
    defaults, positional order, call and return tuple are Liger's ``LigerFusedLinearDPOLoss``;
    the keyword-only ones are additions. TRL's MPO, ``loss_type=["sigmoid", "bco_pair", "sft"]``
    with ``loss_weights=[0.8, 0.2, 1.0]``, is ``loss_type=["sigmoid", "bco_pair"]``,
    ``loss_weights=[0.8, 0.2]``, ``compute_nll_loss=True``, ``alpha=1.0`` here.

    ``ld_alpha`` = α (LD-DPO, TRL's ``DPOConfig.ld_alpha``; None = off) discounts the verbose
    part of the log-probs: with l_p = min(n(y_w), n(y_l)) the pair's public length,

        S(y) = Σ_{first l_p valid tokens of y} log π + α · Σ_{later valid tokens} log π

    (then divided by n(y) with ``average_log_prob``), under the policy and the reference head
    alike, as TRL does since it moved the weighting into its loss (before, TRL weighted the
    policy only). Precomputed reference log-probs must be weighted so already; the NLL term is
    not reweighted. α in [0, 1] (as TRL); α = 1 is DPO.

    ``use_weighting=True`` (WPO, TRL's ``DPOConfig.use_weighting``) multiplies each pair's loss
    by :func:`hypo_fast.objectives.wpo_pair_weights` of the policy's log-probs (plain sums,
    whatever ``ld_alpha`` and ``average_log_prob``), no gradient through the weights; the fused
    forward adds the per-token log Σ_v π(v)² for them. The NLL term is not weighted. Metric
    ``pair_weights``.

    ``forward`` also takes ``ref_chosen_logps``/``ref_rejected_logps`` ``[B]`` (precomputed
    reference log-probs in the same convention as the policy's: sums, or means with
    ``average_log_prob``) instead of ``ref_input``/``ref_weight``/``ref_bias``, and ``seq_ids``
    or ``cu_seqlens`` for a packed batch (see :func:`sequence_layout`).
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str | Sequence[str] = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        *,
        loss_weights: Sequence[float] | None = None,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        clip_ref_margin: bool = False,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            ignore_index=ignore_index, beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss,
            use_ref_model=use_ref_model, average_log_prob=average_log_prob, compiled=compiled,
            chunk_size=chunk_size, backend=backend,
        )
        self.ld_alpha = None if ld_alpha is None else check_in_range("ld_alpha", ld_alpha, 0.0,
                                                                     1.0)
        self.use_weighting = bool(use_weighting)
        self.loss_type = loss_type if isinstance(loss_type, str) else list(loss_type)
        self.loss_weights = None if loss_weights is None else list(loss_weights)
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau
        self.f_divergence_type = f_divergence_type
        self.f_alpha_divergence_coef = f_alpha_divergence_coef
        self.clip_ref_margin = clip_ref_margin
        one = _ones()
        dpo_loss(-one, -one, -one, -one, chosen_counts=one, rejected_counts=one,
                 pair_weights=one if self.use_weighting else None, **self._dpo_options())

    def _dpo_options(self) -> dict[str, Any]:
        return dict(
            beta=self.beta, loss_type=self.loss_type, loss_weights=self.loss_weights,
            label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            clip_ref_margin=self.clip_ref_margin,
        )

    def _dpo_args(self, s: PairStats) -> tuple[list[Tensor | None], dict[str, Any]]:
        """Positional ``(pw, pl, rw, rl)`` and keyword arguments of :func:`dpo_loss`. Token counts
        are 1 with ``average_log_prob`` (the log-probs are already means), so ipo/sigmoid_norm
        normalise exactly once."""
        counts = torch.ones_like(s.counts) if self.average_log_prob else s.counts
        nw, nl = s.halves(counts)
        kwargs = dict(chosen_counts=nw, rejected_counts=nl, **self._dpo_options())
        if self.use_weighting:
            kwargs["pair_weights"] = wpo_pair_weights(
                *s.halves(s.sums), *s.halves(s.extra["log_collision"]), *s.halves(s.counts))
        return [*s.halves(s.logps), *s.halves(s.ref_logps)], kwargs

    def _wants_collision(self) -> bool:
        return self.use_weighting

    def _objective(self, s: PairStats, nll: Tensor | None) -> tuple[Tensor, Metrics]:
        args, kwargs = self._dpo_args(s)
        loss, metrics = dpo_loss(*args, **kwargs)
        return self._add_nll(loss, nll), metrics

    def forward(
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
    ) -> tuple[Tensor, PreferenceOutput]:
        """``lin_weight [V, d]``, ``_input [2B, T, d]`` (chosen rows first), ``target [2B, T]``,
        ``bias [V]``; reference ``ref_input [2B, T, d_ref]``, ``ref_weight [V, d_ref]``,
        ``ref_bias [V]`` or ``ref_chosen_logps``/``ref_rejected_logps [B]``. Returns the scalar
        loss and Liger's 7-tuple."""
        x = self._prepare(
            lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias,
            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            seq_ids=seq_ids, cu_seqlens=cu_seqlens,
        )
        return self._run(x)

    def _prepare(self, *args: Any, **kwargs: Any) -> PairBatch:
        """The validated batch, with LD-DPO's token weights (:func:`ld_token_weights`) when
        ``ld_alpha`` is set."""
        x = super()._prepare(*args, **kwargs)
        if self.ld_alpha is not None:
            x.weights = ld_token_weights(x.target != self.ignore_index, x.seq_ids, x.num_pairs,
                                         self.ld_alpha, dtype=compute_dtype(x.hidden))
        return x


@torch.no_grad()
def ld_token_weights(valid: Tensor, seq_ids: Tensor, num_pairs: int, alpha: float,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """LD-DPO's token weights in ``dtype``, shaped like ``valid``: 1 on the first l_p valid
    tokens of a sequence, α on its later valid tokens, 0 on the others, where l_p =
    min(n(y_w), n(y_l)) is the valid-token count of the shorter sequence of its pair (sequence s
    and s ± B). A token's rank is its position among its sequence's valid tokens in storage
    order. ``seq_ids`` in ``[0, 2·num_pairs)``, shaped like ``valid``; no host
    synchronisation."""
    valid_flat = valid.reshape(-1)
    ids = seq_ids.reshape(-1).long()
    counts = torch.zeros(2 * num_pairs, dtype=torch.long, device=ids.device)
    counts = counts.index_add(0, ids, valid_flat.long())
    order = torch.sort(ids, stable=True).indices
    # 1-based rank among the sequence's valid tokens: valid tokens up to here, less those of
    # the sequences sorted before it
    before = counts.cumsum(0) - counts
    ranked = valid_flat[order].long().cumsum(0) - before[ids[order]]
    rank = torch.empty_like(ranked).scatter_(0, order, ranked)
    public = torch.minimum(counts[:num_pairs], counts[num_pairs:]).repeat(2)
    alphas = torch.full(ids.shape, alpha, dtype=dtype, device=ids.device)
    weights = torch.where(rank <= public[ids], 1.0, alphas)
    return torch.where(valid_flat, weights, 0.0).reshape(valid.shape)


class _ReferenceFreePairLoss(FusedLinearPairLoss):
    """SimPO, CPO and ORPO: no reference model, Liger's ``(lin_weight, _input, target, bias)``
    call (ORPO adds ``nll_target``), optionally packed."""

    def forward(
        self,
        lin_weight: Tensor,
        _input: Tensor,
        target: Tensor,
        bias: Tensor | None = None,
        *,
        seq_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, PreferenceOutput]:
        """``lin_weight [V, d]``, ``_input [2B, T, d]`` (chosen rows first), ``target [2B, T]``,
        ``bias [V]``; or a packed batch with ``seq_ids``/``cu_seqlens``."""
        x = self._prepare(lin_weight, _input, target, bias, seq_ids=seq_ids,
                          cu_seqlens=cu_seqlens)
        return self._run(x)


class FusedLinearSimPOLoss(_ReferenceFreePairLoss):
    r"""SimPO (:func:`hypo_fast.objectives.simpo_loss`) on hidden states, Liger's
    ``LigerFusedLinearSimPOLoss`` arguments and defaults::

        loss = mean_b[−(1−ε) log σ(z) − ε log σ(−z)] + alpha·NLL(y_w),  z = β(A_w − A_l) − γ

    A = S / max(n, 1) (length-averaged, always); γ absolute; NLL only with compute_nll_loss.
    Rewards β·A.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            ignore_index=ignore_index, beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss,
            use_ref_model=False, average_log_prob=True, compiled=compiled,
            chunk_size=chunk_size, backend=backend,
        )
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        one = _ones()
        simpo_loss(-one, -one, one, one, beta=self.beta, gamma=gamma,
                   label_smoothing=label_smoothing)

    def _objective(self, s: PairStats, nll: Tensor | None) -> tuple[Tensor, Metrics]:
        return simpo_loss(
            *s.halves(s.sums), *s.halves(s.counts), beta=self.beta, gamma=self.gamma,
            label_smoothing=self.label_smoothing,
            sft_weight=self.alpha if nll is not None else 0.0, chosen_nll=nll,
        )


class FusedLinearCPOLoss(_ReferenceFreePairLoss):
    r"""CPO (:func:`hypo_fast.objectives.cpo_loss`) on hidden states, Liger's
    ``LigerFusedLinearCPOLoss`` arguments and defaults::

        loss = mean_b[−(1−ε) log σ(β(S_w − S_l)) − ε log σ(−β(S_w − S_l))] + alpha·NLL(y_w)

    S summed (or averaged with ``average_log_prob``); NLL only with compute_nll_loss. Rewards β·S.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            ignore_index=ignore_index, beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss,
            use_ref_model=False, average_log_prob=average_log_prob, compiled=compiled,
            chunk_size=chunk_size, backend=backend,
        )
        self.label_smoothing = label_smoothing
        one = _ones()
        cpo_loss(-one, -one, beta=self.beta, label_smoothing=label_smoothing, alpha=0.0)

    def _objective(self, s: PairStats, nll: Tensor | None) -> tuple[Tensor, Metrics]:
        return cpo_loss(
            *s.halves(s.logps), nll, beta=self.beta, label_smoothing=self.label_smoothing,
            alpha=self.alpha if nll is not None else 0.0,
        )


class FusedLinearORPOLoss(_ReferenceFreePairLoss):
    r"""ORPO (:func:`hypo_fast.objectives.orpo_loss`) on hidden states, Liger's
    ``LigerFusedLinearORPOLoss`` arguments, defaults and call (with ``nll_target``)::

        loss = NLL(y_w) − β · mean_b log σ(log odds(y_w) − log odds(y_l)),  A = S / max(n, 1)

    NLL(y_w) is 0 unless compute_nll_loss, and is taken on ``nll_target`` when given (the
    chosen rows' valid tokens scored a second time, in the same fused call as the pairs).
    ``aux`` ends with Liger's ``log_odds_ratio`` (mean log σ) and ``log_odds_chosen`` (mean
    log-odds difference).
    """

    _extra_aux = ("log_odds_ratio", "log_odds_chosen")

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        chunk_size: int = 1,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            ignore_index=ignore_index, beta=beta, alpha=1.0, compute_nll_loss=compute_nll_loss,
            use_ref_model=False, average_log_prob=True, compiled=compiled,
            chunk_size=chunk_size, backend=backend,
        )

    def _objective(self, s: PairStats, nll: Tensor | None) -> tuple[Tensor, Metrics]:
        if nll is None:
            nll = s.sums.new_zeros(())
        return orpo_loss(*s.halves(s.sums), *s.halves(s.counts), beta=self.beta, chosen_nll=nll)

    def forward(  # type: ignore[override]
        self,
        lin_weight: Tensor,
        _input: Tensor,
        target: Tensor,
        bias: Tensor | None = None,
        nll_target: Tensor | None = None,
        *,
        seq_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, PreferenceOutput]:
        """As the other reference-free losses, plus ``nll_target`` (shaped like ``target``):
        the labels of the NLL term on the chosen rows (default: ``target``)."""
        x = self._prepare(lin_weight, _input, target, bias, seq_ids=seq_ids,
                          cu_seqlens=cu_seqlens, nll_target=nll_target)
        return self._run(x)
