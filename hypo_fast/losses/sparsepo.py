"""SparsePO on hidden states: token-masked rewards and full-vocabulary KL from one fused pass."""

from __future__ import annotations

import torch

from .. import ops
from .._checks import check_finite, check_float, check_same_device, check_shape
from ..objectives import sparsepo_loss, sparsepo_sequence_sums
from ..reference import segment_sum
from ._base import FusedLinearPairLoss, Metrics, PairBatch, PairStats, PreferenceOutput, Tensor


class FusedLinearSparsePOLoss(FusedLinearPairLoss):
    r"""SparsePO (Christopoulou et al. 2024; :func:`hypo_fast.objectives.sparsepo_loss`).

    Per completion token t of a sequence: ℓ_t = log π(y_t|·), ℓ^ref_t, and KL_t = KL(π_ref ‖ π)
    over the full vocabulary (forward direction); masks m^u (reward) and m^d (KL), 0 on ignored
    tokens. Per sequence R = Σ_t m^u_t(ℓ_t − ℓ^ref_t), K = Σ_t m^d_t KL_t; per pair::

        loss = mean_b[−log σ(β((R_w − R_l) − (K_l − K_w))) + l1_u(‖m^u_w‖₁ + ‖m^u_l‖₁)
                      + l1_d(‖m^d_w‖₁ + ‖m^d_l‖₁)] (+ alpha·NLL(y_w) with compute_nll_loss)

    All of ℓ, ℓ^ref and KL come from ONE :func:`hypo_fast.ops.linear_kl` call with labels, so the
    reference head (``ref_input``, ``ref_weight``, ``ref_bias``) is required.

    Masks (``forward`` arguments, float, shaped like ``target``): given (e.g. from reference
    activations, detached) or learned (the output of a mask network: gradients flow into them).
    ``token_mask`` is the common mask; ``kl_mask`` a separate KL mask (HEBO's
    ``rw_kl_independent``). ``mask_on_reward``/``mask_on_kl`` switch masking of each term: m^u =
    token_mask if mask_on_reward else 1; m^d = (kl_mask, else token_mask) if mask_on_kl else 1;
    absent masks are 1. A mask that no term uses raises. As in HEBO, l1_u (l1_d) applies only
    with mask_on_reward (mask_on_kl), and a common mask (both on, no ``kl_mask``), counted in
    both terms, has both halved. Rewards β·R; ``chosen_logps`` are S.
    """

    _takes_ref_logps = False

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.8,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        chunk_size: int = 1,
        *,
        mask_on_reward: bool = True,
        mask_on_kl: bool = True,
        l1_u: float = 0.0,
        l1_d: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            ignore_index=ignore_index, beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss,
            use_ref_model=True, average_log_prob=False, compiled=compiled, chunk_size=chunk_size,
            backend=backend,
        )
        self.mask_on_reward = bool(mask_on_reward)
        self.mask_on_kl = bool(mask_on_kl)
        self.l1_u, self.l1_d = l1_u, l1_d
        one = torch.ones(1)
        sparsepo_loss(one, one, one, one, one, one, one, one, beta=self.beta, l1_u=l1_u, l1_d=l1_d)

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
        token_mask: Tensor | None = None,
        kl_mask: Tensor | None = None,
        seq_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, PreferenceOutput]:
        """Liger's DPO call (``_input [2B, T, d]`` chosen rows first, ...) with the reference
        head required, plus the masks ``token_mask``/``kl_mask`` shaped like ``target``."""
        x = self._prepare(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias,
                          seq_ids=seq_ids, cu_seqlens=cu_seqlens, require_ref_head=True)
        reward_weights, kl_weights = self._mask_weights(x, token_mask, kl_mask)
        return self._run(x, reward_weights=reward_weights, kl_weights=kl_weights,
                         l1=self._l1_weights(common=kl_mask is None))

    def _l1_weights(self, common: bool) -> tuple[float, float]:
        """HEBO's penalty weights ``(λ_u, λ_d)``: 0 for a term without its mask, both halved
        for a common mask."""
        half = 0.5 if common and self.mask_on_reward and self.mask_on_kl else 1.0
        return (half * self.l1_u if self.mask_on_reward else 0.0,
                half * self.l1_d if self.mask_on_kl else 0.0)

    def _mask_weights(
        self, x: PairBatch, token_mask: Tensor | None, kl_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Flattened per-token ``(m^u, m^d)``, zero on ignored tokens."""
        uses_token = self.mask_on_reward or (self.mask_on_kl and kl_mask is None)
        for name, mask, used in (("token_mask", token_mask, uses_token),
                                 ("kl_mask", kl_mask, self.mask_on_kl)):
            if mask is None:
                continue
            if not used:
                raise ValueError(f"{name} is given but no term uses it (mask_on_reward="
                                 f"{self.mask_on_reward}, mask_on_kl={self.mask_on_kl})")
            check_float(name, mask)
            check_shape(name, mask, tuple(x.target.shape), "target's shape")
            check_same_device({"target": x.target, name: mask})
        check_finite({"token_mask": token_mask, "kl_mask": kl_mask})
        valid = (x.target != self.ignore_index).reshape(-1).float()
        reward = token_mask if self.mask_on_reward else None
        kl = (kl_mask if kl_mask is not None else token_mask) if self.mask_on_kl else None
        return tuple(valid if m is None else valid * m.reshape(-1) for m in (reward, kl))

    def _statistics(self, x: PairBatch, *, reward_weights: Tensor,  # type: ignore[override]
                    kl_weights: Tensor, l1: tuple[float, float]) -> PairStats:
        with x.op_names():
            out = ops.linear_kl(
                x.hidden, x.weight, x.ref_hidden, x.ref_weight, bias=x.bias,
                ref_bias=x.ref_bias, direction="forward", labels=x.target,
                ignore_index=self.ignore_index, backend=self.backend,
            )
        ids, n = x.seq_ids.reshape(-1), x.num_seqs
        logp, ref_logp = out.logp.reshape(-1), out.ref_logp.reshape(-1).detach()
        sums = segment_sum(logp, ids, n)
        counts = segment_sum((x.target != self.ignore_index).reshape(-1).float(), ids, n)
        parts = sparsepo_sequence_sums(logp - ref_logp, out.kl.reshape(-1), ids, n,
                                       reward_weights=reward_weights, kl_weights=kl_weights)
        return PairStats(sums, counts, sums, segment_sum(ref_logp, ids, n),
                         extra={"sparsepo": parts, "l1": l1})

    def _objective(self, s: PairStats, nll: Tensor | None) -> tuple[Tensor, Metrics]:
        rewards, kls, norm_u, norm_d = (s.halves(t) for t in s.extra["sparsepo"])
        l1_u, l1_d = s.extra["l1"]
        loss, metrics = sparsepo_loss(*rewards, *kls, *norm_u, *norm_d, beta=self.beta,
                                      l1_u=l1_u, l1_d=l1_d)
        return self._add_nll(loss, nll), metrics
