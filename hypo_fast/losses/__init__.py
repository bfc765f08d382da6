"""Public preference losses: hidden states and lm_head weight in, ``(loss, metrics)`` out, never
materialising the ``N x V`` logits on the fused backends.

Modules (``torch.nn.Module``; ``loss, aux = module(lin_weight, _input, target, bias, ...)``):

- :class:`FusedLinearDPOLoss`, :class:`FusedLinearSimPOLoss`, :class:`FusedLinearCPOLoss`,
  :class:`FusedLinearORPOLoss` — drop-in replacements for Liger-Kernel's
  ``LigerFusedLinear{DPO,SimPO,CPO,ORPO}Loss`` (swap the import);
- :class:`FusedLinearSparsePOLoss` (token masks, given or learned), :class:`HyPOLoss` (offline
  pairs + online samples), :class:`HPOLoss` (auxiliary rewards), same conventions.

``aux`` is a :class:`PreferenceOutput`: Liger's tuple ``(chosen_logps, rejected_logps,
chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards, ...)``
with every metric by name in ``aux.metrics`` (margins, accuracy, KL terms, ...).

Layouts: padded pairs ``_input [2B, T, d]``, ``target [2B, T]``, chosen rows first (Liger's);
or packed token streams ``_input [N, d]`` / ``[1, N, d]`` with ``seq_ids`` or ``cu_seqlens``
(flash-attention varlen), sequences ``0..B-1`` chosen and ``B..2B-1`` rejected — no padding
tokens, so none are computed.

Functional forms on precomputed sequence log-probs are those of :mod:`hypo_fast.objectives`,
re-exported here: :func:`dpo_loss`, :func:`simpo_loss`, :func:`cpo_loss`, :func:`orpo_loss`,
:func:`sparsepo_loss`, :func:`sparsepo_sequence_sums`, :func:`hypo_kl_term`,
:func:`hpo_aux_term`, :func:`hpo_loss`, :func:`wpo_pair_weights`.

Differences from Liger-Kernel 0.8.5 (``chunked_loss``), where the concept exists in both:

1. Additions: ``ref_chosen_logps``/``ref_rejected_logps`` (precomputed reference log-probs, as
   the module's ``reference_logps(ref_weight, ref_input, target, ref_bias)`` computes them) and
   the packed layout (keyword-only ``forward`` arguments); DPO ``loss_type`` ``"ipo"`` (Liger
   raises NotImplementedError), ``"sigmoid_norm"``, ``"aot"`` and ``"aot_unpaired"``,
   ``f_divergence_type``,
   ``f_alpha_divergence_coef``, ``clip_ref_margin``, ``ld_alpha`` (LD-DPO),
   ``use_weighting`` (WPO) and a list ``loss_type`` with ``loss_weights`` (TRL's multi-loss
   form, e.g. MPO), as TRL's; ``backend=``; SparsePO, HyPO, HPO.
2. DPO ``loss_type="sigmoid"`` with ``label_smoothing`` ε > 0 is cDPO,
   −(1−ε) log σ(z) − ε log σ(−z); Liger silently ignores ε for sigmoid. ``"exo_pair"`` with
   ε = 0 uses ε = 1e-3 (Liger raises).
   Any ``label_smoothing`` ≠ 0 for a DPO type that does not use it raises (Liger ignores it).
3. ``compiled`` and ``chunk_size`` are accepted and ignored: there is no chunking over pairs,
   the fused op streams over the vocabulary, and autograd runs a real backward (Liger computes
   gradients inside forward and rescales them in backward).
4. Token counts are clamped ≥ 1: a sequence (or a chosen half) with no completion token gives
   log-prob 0 with ``average_log_prob`` and NLL 0 instead of Liger's NaN. A batch with no
   completion token at all is no error either: every log-prob is 0 (DPO's loss log 2, as
   Liger's), and the weight and hidden states get gradients of zeros.
5. ``chosen_logits_mean``/``rejected_logits_mean`` follow Liger's definition (mean of the logits
   ``H W^T + b`` over every token of the half, prompt and padding included, and the vocabulary)
   but are computed without logits, as ``h̄·(Σ_v w_v)/V + mean(b)`` in fp32 (h̄ the half's mean
   hidden state, in the input dtype). In the packed layout, "every token" is every token of the
   chosen (rejected) sequences; a half with no token at all (every sequence of it empty) gives
   0, not NaN.
6. All ``aux`` values are detached tensors; Liger's come out of its autograd Function (they
   carry a ``grad_fn`` but no gradient flows through them either).
7. Errors: bad inputs raise ``ValueError``/``TypeError`` naming the argument before any compute
   (odd batch, shapes, dtypes, devices, labels out of range, NaN/inf in any float input,
   missing reference with ``use_ref_model=True`` — where Liger fails inside ``torch.chunk`` —,
   both reference forms at once). Hyperparameters are validated at construction: ``beta`` > 0,
   ``alpha`` ≥ 0 (Liger accepts any value), ``label_smoothing`` in the range its ``loss_type``
   allows.
8. ``ref_weight`` must be given with ``ref_input``. As in Liger, ``ref_input``/``ref_weight``/
   ``ref_bias`` are ignored when ``use_ref_model=False``; precomputed reference log-probs then
   raise.
9. Under ``torch.autocast`` the hidden states, weight and bias (and the reference head) are cast
   to the autocast dtype, as ``F.linear`` would; log-softmax and the loss run in fp32. Outside
   autocast the weight and bias dtypes must equal the input's (Liger's chunks mix them freely).
10. ORPO's log(1 − e^A) uses the stable log1mexp with A clamped ≤ −eps (finite at A = 0, where
    Liger's ``log1p(-exp(A))`` gives −inf).
11. KTO, JSD and GRPO have no counterpart here.
"""

from __future__ import annotations

from ..objectives import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    KL_ESTIMATORS,
    cpo_loss,
    dpo_loss,
    hpo_aux_term,
    hpo_loss,
    hypo_kl_term,
    orpo_loss,
    simpo_loss,
    sparsepo_loss,
    sparsepo_sequence_sums,
    wpo_pair_weights,
)
from ._base import LIGER_AUX_FIELDS, FusedLinearPairLoss, PreferenceOutput, sequence_layout
from .hpo import HPOLoss
from .hypo import HyPOLoss
from .pairs import (
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
)
from .sparsepo import FusedLinearSparsePOLoss

__all__ = [
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "KL_ESTIMATORS",
    "LIGER_AUX_FIELDS",
    "FusedLinearCPOLoss",
    "FusedLinearDPOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearPairLoss",
    "FusedLinearSimPOLoss",
    "FusedLinearSparsePOLoss",
    "HPOLoss",
    "HyPOLoss",
    "PreferenceOutput",
    "cpo_loss",
    "dpo_loss",
    "hpo_aux_term",
    "hpo_loss",
    "hypo_kl_term",
    "orpo_loss",
    "sequence_layout",
    "simpo_loss",
    "sparsepo_loss",
    "sparsepo_sequence_sums",
    "wpo_pair_weights",
]
