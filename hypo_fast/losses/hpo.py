"""HPO on hidden states: DPO plus an advantage-weighted likelihood term on auxiliary rewards."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import (
    check_finite,
    check_float,
    check_in_range,
    check_positive,
    check_same_device,
)
from ..objectives import hpo_loss
from ._base import Metrics, PairBatch, PairStats, PreferenceOutput, Tensor
from .pairs import FusedLinearDPOLoss


class HPOLoss(FusedLinearDPOLoss):
    r"""HPO (Badrinath et al. 2024; :func:`hypo_fast.objectives.hpo_loss`)::

        loss = dpo_loss(pairs) + aux_coef · (−mean_s w_s·S(y_s)) (+ alpha·NLL(y_w))
        w_s = sg(min(exp((R_aux,s − b_s)/aux_tau), aux_w_max))

    The constructor takes every argument of :class:`FusedLinearDPOLoss` (same defaults; there
    ``alpha`` is Liger's NLL weight, hence ``aux_coef`` here) plus ``aux_coef`` ≥ 0, ``aux_tau``
    > 0 and ``aux_w_max`` > 0. ``forward`` takes the DPO call plus ``aux_rewards``: ``[2B]`` (one
    per sequence, chosen first) or ``[B]`` (the chosen completions only), and ``aux_baseline``
    b: None (batch mean of the rewards), a number, or a tensor (0-d or shaped like
    ``aux_rewards``, e.g. a value head V(x)). S is the policy's log-prob in the loss convention
    (sum, or mean with ``average_log_prob``; LD-weighted with ``ld_alpha``). Metrics add
    ``dpo_loss``, ``aux_loss``, ``aux_weights`` and ``aux_advantages``.
    """

    def __init__(self, *args: Any, aux_coef: float = 1.0, aux_tau: float = 1.0,
                 aux_w_max: float = 20.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aux_coef = check_in_range("aux_coef", aux_coef, 0.0, math.inf)
        self.aux_tau = check_positive("aux_tau", aux_tau)
        self.aux_w_max = check_positive("aux_w_max", aux_w_max)

    def forward(  # type: ignore[override]
        self,
        lin_weight: Tensor,
        _input: Tensor,
        target: Tensor,
        bias: Tensor | None = None,
        ref_input: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        *,
        aux_rewards: Tensor,
        aux_baseline: Tensor | float | None = None,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        seq_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, PreferenceOutput]:
        """As :meth:`FusedLinearDPOLoss.forward`, plus ``aux_rewards`` and ``aux_baseline``."""
        x = self._prepare(
            lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias,
            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            seq_ids=seq_ids, cu_seqlens=cu_seqlens,
        )
        check_float("aux_rewards", aux_rewards, ndim=1)
        if aux_rewards.shape[0] not in (x.num_seqs, x.num_pairs):
            raise ValueError(
                f"aux_rewards must have shape ({x.num_seqs},) (one per sequence, chosen first) "
                f"or ({x.num_pairs},) (chosen only), got {tuple(aux_rewards.shape)}"
            )
        check_same_device({"_input": x.hidden, "aux_rewards": aux_rewards})
        check_finite({"aux_rewards": aux_rewards, "aux_baseline": aux_baseline
                      if isinstance(aux_baseline, torch.Tensor) else None})
        return self._run(x, aux_rewards=aux_rewards, aux_baseline=aux_baseline)

    def _statistics(self, x: PairBatch, *, aux_rewards: Tensor,  # type: ignore[override]
                    aux_baseline: Tensor | float | None) -> PairStats:
        s = super()._statistics(x)
        s.extra.update(aux_rewards=aux_rewards, aux_baseline=aux_baseline)
        return s

    def _objective(self, s: PairStats, nll: Tensor | None) -> tuple[Tensor, Metrics]:
        args, kwargs = self._dpo_args(s)
        rewards = s.extra["aux_rewards"]
        loss, metrics = hpo_loss(
            *args, s.logps[: rewards.shape[0]], rewards, alpha=self.aux_coef,
            aux_baseline=s.extra["aux_baseline"], tau=self.aux_tau, w_max=self.aux_w_max,
            **kwargs,
        )
        return self._add_nll(loss, nll), metrics
