"""HyPO on hidden states: DPO on offline pairs plus a reverse-KL term on online samples."""

from __future__ import annotations

import math
from typing import Any

from .. import ops
from .._autocast import autocast_dtype
from .._checks import (
    check_choice,
    check_finite,
    check_float,
    check_in_range,
    check_shape,
    raise_flagged,
    segments_not_contiguous,
)
from ..objectives import KL_ESTIMATORS, dpo_loss, hypo_kl_term
from ..reference import segment_sum
from ._base import (
    PAIR_NAMES,
    Head,
    Metrics,
    PairBatch,
    PairStats,
    PreferenceOutput,
    Tensor,
    check_head_inputs,
    sequence_layout,
)
from .pairs import FusedLinearDPOLoss

_ONLINE_NAMES = ("online_input", "online_target", "online_seq_ids", "online_cu_seqlens")


class HyPOLoss(FusedLinearDPOLoss):
    r"""HyPO (Song et al. 2024): DPO on offline pairs + λ·KL(π ‖ π_ref) on online samples::

        loss = dpo_loss(pairs) + kl_coef · hypo_kl_term(online samples) (+ alpha·NLL(y_w))

    The constructor takes every argument of :class:`FusedLinearDPOLoss` (same defaults) plus
    ``kl_coef`` (λ ≥ 0; 0.1 is a placeholder, not a value from the paper) and ``estimator``
    (:func:`hypo_fast.objectives.hypo_kl_term`): ``"reinforce"``, ``"rloo"`` (needs
    ``group_ids [M]``, ≥ 2 samples per prompt) or ``"exact"`` (per-token full-vocabulary reverse
    KL along each sample, one :func:`hypo_fast.ops.linear_kl` call; needs the reference head).

    ``forward`` takes the DPO call for the offline pairs plus the M online samples y ~ π(·|x):
    ``online_input [M, T', d]`` (or packed with ``online_seq_ids``/``online_cu_seqlens``),
    ``online_target`` (ignore_index on prompt and padding), and their reference:
    ``online_ref_input`` (hidden states of the reference model, scored with ``ref_weight``/
    ``ref_bias``) or ``online_ref_logps [M]`` (summed, reinforce/rloo only). The online log-probs
    are always sums (the KL is sequence-level), whatever ``average_log_prob``.
    Metrics add ``dpo_loss``, ``kl_term`` (its value estimates the mean sequence KL) and
    ``online_kl`` ``[M]`` (per-sample KL estimate).
    """

    def __init__(self, *args: Any, kl_coef: float = 0.1, estimator: str = "rloo",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kl_coef = check_in_range("kl_coef", kl_coef, 0.0, math.inf)
        self.estimator = check_choice("estimator", estimator, KL_ESTIMATORS)

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
        online_input: Tensor,
        online_target: Tensor,
        online_ref_input: Tensor | None = None,
        online_ref_logps: Tensor | None = None,
        group_ids: Tensor | None = None,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        seq_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        online_seq_ids: Tensor | None = None,
        online_cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, PreferenceOutput]:
        """Offline pairs as :meth:`FusedLinearDPOLoss.forward`; online samples as above."""
        x = self._prepare(
            lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias,
            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            seq_ids=seq_ids, cu_seqlens=cu_seqlens,
        )
        online = self._prepare_online(x, online_input, online_target, online_ref_input,
                                      online_ref_logps, ref_weight, ref_bias, online_seq_ids,
                                      online_cu_seqlens)
        return self._run(x, online=online, group_ids=group_ids)

    def _prepare_online(
        self, x: PairBatch, hidden: Tensor, target: Tensor, ref_hidden: Tensor | None,
        ref_logps: Tensor | None, ref_weight: Tensor | None, ref_bias: Tensor | None,
        seq_ids: Tensor | None, cu_seqlens: Tensor | None,
    ) -> Head:
        """The online samples under the policy head, with their reference."""
        check_float("online_input", hidden)
        dtype = autocast_dtype(hidden.device)
        hidden = hidden if dtype is None else hidden.to(dtype)
        check_head_inputs(x.weight, hidden, target, x.bias,
                          ("lin_weight", "online_input", "online_target", "bias"))
        ids, num_seqs = sequence_layout(hidden, target, seq_ids, cu_seqlens, _ONLINE_NAMES)
        if self.estimator == "exact" and seq_ids is not None:
            raise_flagged([("estimator='exact' needs each online sample's tokens contiguous in "
                            "online_seq_ids (its KL to come is a suffix sum along the sample)",
                            segments_not_contiguous(ids.reshape(-1), num_seqs))])
        head = Head(hidden, x.weight, x.bias, target, ids, num_seqs,
                    names={**PAIR_NAMES, "hidden": "online_input", "labels": "online_target",
                           "ref_hidden": "online_ref_input"})
        if ref_logps is not None:
            if ref_hidden is not None:
                raise ValueError("pass online_ref_input or online_ref_logps, not both")
            if self.estimator == "exact":
                raise ValueError("estimator='exact' needs the reference head (online_ref_input "
                                 "and ref_weight), not online_ref_logps")
            check_float("online_ref_logps", ref_logps, ndim=1)
            check_shape("online_ref_logps", ref_logps, (num_seqs,), "one per online sample")
            check_finite({"online_ref_logps": ref_logps})
            head.ref_logps = ref_logps.detach()
        elif ref_hidden is None:
            raise ValueError("HyPO's KL term needs the reference of the online samples: pass "
                             "online_ref_input (with ref_weight) or online_ref_logps")
        elif ref_weight is None:
            raise ValueError("online_ref_input is given but ref_weight is None")
        else:
            head.ref_hidden, head.ref_weight, head.ref_bias = self._ref_head(
                ref_hidden, ref_weight, ref_bias, x.weight, tuple(target.shape), dtype,
                ("ref_weight", "online_ref_input", "online_target", "ref_bias"),
            )
        return head

    def _statistics(self, x: PairBatch, *, online: Head,  # type: ignore[override]
                    group_ids: Tensor | None) -> PairStats:
        if self.estimator == "exact":
            s = super()._statistics(x)
            s.extra["online"] = self._exact_kl(online)
            return s
        s, [online_stats] = self._policy_stats(x, online)
        ref = online.ref_logps
        if ref is None:
            ref = self._reference_sums(online).sums
        s.extra["online"] = hypo_kl_term(online_stats.sums, ref, estimator=self.estimator,
                                         group_ids=group_ids)
        return s

    def _exact_kl(self, o: Head) -> tuple[Tensor, Metrics]:
        """:func:`hypo_kl_term` with the exact per-token KL along the online samples."""
        with o.op_names():
            out = ops.linear_kl(
                o.hidden, o.weight, o.ref_hidden, o.ref_weight, bias=o.bias,
                ref_bias=o.ref_bias, direction="reverse", labels=o.target,
                ignore_index=self.ignore_index, backend=self.backend,
            )
        ids, logp = o.seq_ids.reshape(-1), out.logp.reshape(-1)
        return hypo_kl_term(
            segment_sum(logp, ids, o.num_seqs),
            segment_sum(out.ref_logp.reshape(-1).detach(), ids, o.num_seqs),
            estimator="exact", token_kl=out.kl.reshape(-1), token_logps=logp,
            token_seq_ids=ids,
        )

    def _objective(self, s: PairStats, nll: Tensor | None) -> tuple[Tensor, Metrics]:
        args, kwargs = self._dpo_args(s)
        dpo, metrics = dpo_loss(*args, **kwargs)
        term, kl_metrics = s.extra["online"]
        metrics.update(dpo_loss=dpo.detach(), kl_term=term.detach(), online_kl=kl_metrics["kl"])
        return self._add_nll(dpo + self.kl_coef * term, nll), metrics

