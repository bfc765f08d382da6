"""Sequence-level preference objectives: pure functions of per-sequence and per-token statistics.

Notation (DESIGN.md §4, anchors/objectives.md): S(y) = Σ_t log π(y_t|y_<t) is a SUMMED sequence
log-prob, n(y) its token count (clamped ≥ 1), A(y) = S(y)/n(y), ρ(y) = S(y) − S_ref(y),
δ = ρ(y_w) − ρ(y_l), σ the logistic function, sg(·) stop-gradient.

Conventions shared by every function here:

- Inputs are 1-D tensors ``[B]`` (one entry per pair or per sequence) unless stated; counts may be
  integer or float tensors. Math runs in fp32 (fp64 when an input is fp64, so that gradcheck
  works); log σ is only ever ``F.logsigmoid``.
- Each function returns ``(loss, metrics)``: ``loss`` is a scalar, the mean over pairs/sequences;
  ``metrics`` holds detached tensors. Pair losses report ``chosen_rewards``, ``rejected_rewards``
  ``[B]``, ``margins = chosen_rewards − rejected_rewards`` ``[B]``, ``accuracy`` (scalar mean of
  ``margins > 0``), ``chosen_logps``, ``rejected_logps`` ``[B]`` (the log-probs as passed in).
- Bad arguments raise ``TypeError``/``ValueError`` naming the argument: shapes, dtypes and
  options before any math; NaN/inf values once per call, read back in one host sync after the
  math is queued (:func:`hypo_fast._checks.one_sync`), so no result is returned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._checks import (
    check_choice,
    check_finite,
    check_float,
    check_in_range,
    check_index,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
    one_sync,
    raise_flagged,
    segments_not_contiguous,
)
from .reference import compute_dtype, segment_sum

Tensor = torch.Tensor
Metrics = dict[str, Tensor]

DPO_LOSS_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "aot",
    "aot_unpaired",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
KL_ESTIMATORS = ("reinforce", "rloo", "exact")

# label_smoothing ε accepted per loss type: (low, high, high_open). Other loss types need ε = 0.
_SMOOTHING_RANGES = {
    "sigmoid": (0.0, 0.5, False),  # cDPO: ε is a label-flip rate; ε > 0.5 would flip preferences
    "robust": (0.0, 0.5, True),  # divides by 1 − 2ε
    "exo_pair": (0.0, 0.5, False),  # needs ε > 0: ε = 0 means the recommended 1e-3 (TRL v0.27)
    "aot": (0.0, 0.5, False),
    "aot_unpaired": (0.0, 0.5, False),
}
_SORTED = ("aot", "aot_unpaired")  # margins between the batch's sorted statistics
_EXO_DEFAULT_EPS = 1e-3
_LENGTH_NORMALISED = ("ipo", "sigmoid_norm")  # margins of per-token log-probs
_EXP_CLAMP = 80.0  # largest exponent fed to exp() in fp32 (TRL's alpha-divergence clamp)


# ---------------------------------------------------------------------------------------------
# validation and shared pieces


def _check_batch(
    named: dict[str, Tensor | None], counts: dict[str, Tensor | None] | None = None
) -> list[Tensor | None]:
    """Check that the float tensors (and optional count tensors) are 1-D, non-empty, of one shape,
    on one device and finite; return all of them in the compute dtype (counts clamped ≥ 1), in
    order."""
    counts = counts or {}
    shape, first = None, ""
    for name, t in {**named, **counts}.items():
        if t is None:
            continue
        if name in counts:
            check_tensor(name, t, ndim=1)
            _ = check_float(name, t) if t.is_floating_point() else check_index(name, t)
        else:
            check_float(name, t, ndim=1)
        if shape is None:
            if t.numel() == 0:
                raise ValueError(f"{name} is empty: the batch needs at least one element")
            shape, first = tuple(t.shape), name
        else:
            check_shape(name, t, shape, f"the shape of {first}")
    check_same_device({**named, **counts})
    check_finite({**named, **counts})
    dtype = compute_dtype(*named.values())
    out = [None if t is None else t.to(dtype) for t in named.values()]
    out += [None if c is None else c.to(dtype).clamp(min=1.0) for c in counts.values()]
    return out


def _check_scalar_tensor(name: str, t: Tensor, like: Tensor) -> Tensor:
    check_float(name, t, ndim=0)
    check_same_device({"logps": like, name: t})
    check_finite({name: t})
    return t.to(like.dtype)


def _require(name: str, value: Any, why: str) -> None:
    if value is None:
        raise ValueError(f"{name} is required {why}")


def _smoothed_sigmoid_loss(z: Tensor, eps: float) -> Tensor:
    """cDPO-style label-smoothed logistic loss −(1−ε) log σ(z) − ε log σ(−z), per element."""
    loss = -F.logsigmoid(z)
    return loss if eps == 0.0 else (1.0 - eps) * loss - eps * F.logsigmoid(-z)


def _token_mean_nll(
    chosen_logps: Tensor, chosen_counts: Tensor | None, nll: Tensor | None
) -> Tensor:
    """``chosen_nll`` if given, else −Σ_b S(y_w,b) / Σ_b n(y_w,b): the token-mean NLL of the chosen
    completions over the whole batch (Liger/TRL: divide by the batch's chosen token total)."""
    if nll is not None:
        return _check_scalar_tensor("chosen_nll", nll, chosen_logps)
    _require("chosen_counts", chosen_counts, "to compute the chosen NLL when chosen_nll is None")
    return -chosen_logps.sum() / chosen_counts.sum().clamp(min=1.0)


def _pair_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, rejected_logps: Tensor,
    **extra: Tensor,
) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    margins = chosen_rewards - rejected_rewards
    metrics = {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": margins,
        "accuracy": (margins > 0).to(margins.dtype).mean(),
        "chosen_logps": chosen_logps.detach(),
        "rejected_logps": rejected_logps.detach(),
    }
    metrics.update({k: v.detach() for k, v in extra.items()})
    return metrics


def _check_label_smoothing(loss_types: tuple[str, ...], eps: float) -> float:
    """ε, checked against the range of each of ``loss_types`` that uses it; ε ≠ 0 needs one."""
    users = [t for t in loss_types if t in _SMOOTHING_RANGES]
    if not users:
        if eps != 0:
            raise ValueError(
                f"label_smoothing must be 0 for loss_type={_named(loss_types)} (it is used by "
                f"{tuple(_SMOOTHING_RANGES)} only), got {eps}"
            )
        return 0.0
    for t in users:
        lo, hi, hi_open = _SMOOTHING_RANGES[t]
        eps = check_in_range("label_smoothing", eps, lo, hi, hi_open=hi_open)
    return eps


def _named(loss_types: tuple[str, ...]) -> str:
    """``loss_types`` as the caller wrote them: one name, or the list."""
    return repr(loss_types[0]) if len(loss_types) == 1 else repr(list(loss_types))


def _check_loss_types(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None
                      ) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``(types, weights)`` of a DPO ``loss_type`` (a name or a non-empty list of names, TRL's
    multi-loss form) and its ``loss_weights`` (default all 1; finite, ≥ 0, one per type)."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss type")
    for t in types:
        if t == "sft":
            raise ValueError("loss_type 'sft' is the NLL term here: pass the NLL (losses: "
                             "compute_nll_loss=True with alpha = its weight)")
        check_choice("loss_type", t, DPO_LOSS_TYPES)
    if len(set(types)) != len(types):
        raise ValueError(f"loss_type lists a type twice: {list(types)}")
    if loss_weights is None:
        return types, (1.0,) * len(types)
    weights = tuple(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights must have one weight per loss_type: got {len(weights)} "
                         f"for {len(types)}")
    return types, tuple(check_in_range("loss_weights", w, 0.0, math.inf) for w in weights)


def _f_scores(rho: Tensor, f_divergence_type: str, alpha: float) -> Tensor:
    """Per-sequence score s = f'(π/π_ref) (up to constants) of the f-divergence (TRL main)."""
    if f_divergence_type == "forward_kl":
        return -torch.exp((-rho).clamp(max=_EXP_CLAMP))
    if f_divergence_type == "js_divergence":
        return F.logsigmoid(rho)
    if f_divergence_type == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        return torch.exp(((alpha - 1.0) * rho).clamp(max=_EXP_CLAMP)) / (alpha - 1.0)
    return rho  # reverse_kl, and alpha_divergence's α → 1 limit


# ---------------------------------------------------------------------------------------------
# DPO family


@one_sync
def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_counts: Tensor | None = None,
    rejected_counts: Tensor | None = None,
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    clip_ref_margin: bool = False,
    pair_weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    r"""DPO and its TRL variants on summed sequence log-probs ``[B]`` (Rafailov et al. 2023; TRL
    ``DPOTrainer._compute_loss``).

    Without a reference (both ``ref_*`` None) the reference log-probs are 0 (reference-free DPO).
    Scores s = f(ρ) per ``f_divergence_type`` (TRL main): reverse_kl s = ρ; forward_kl s = −e^{−ρ};
    js_divergence s = log σ(ρ); alpha_divergence s = e^{(α−1)ρ}/(α−1) (α = 1 falls back to ρ).
    Exponents are clamped ≤ 80. δ = s_w − s_l, z = βδ, z_w = βs_w, z_l = βs_l, ε = label_smoothing.

    ============  ====================================================================  ==========
    loss_type     per-pair loss                                                         ε range
    ============  ====================================================================  ==========
    sigmoid       −(1−ε) log σ(z) − ε log σ(−z)   (cDPO; ε = 0 is plain DPO)           [0, 0.5]
    robust        [−(1−ε) log σ(z) + ε log σ(−z)] / (1 − 2ε)   (Chowdhury et al.)      [0, 0.5)
    hinge         max(0, 1 − z)   (SLiC)
    ipo           (δ̄ − 1/(2β))²,  δ̄ = s_w/n_w − s_l/n_l   (TRL's length normalisation)
    exo_pair      q_w(log q_w − log(1−ε)) + q_l(log q_l − log ε), q_w = σ(z), q_l = σ(−z)  [0, 0.5]
    nca_pair      −log σ(z_w) − ½ log σ(−z_w) − ½ log σ(−z_l)
    bco_pair      −log σ(z_w) − log σ(−z_l)   (TRL main: no running reward shift)
    sppo_hard     (s_w − 1/(2β))² + (s_l + 1/(2β))²
    apo_zero      1 − σ(βρ_w) + σ(βρ_l)   (the log-ratios ρ, whatever the scores: TRL main)
    apo_down      σ(βρ_w) + 1 − σ(z)
    discopop      (1 − m)(−log σ(z)) + m·e^{−z},  m = σ(z/τ)   (LRML, τ = discopop_tau)
    sigmoid_norm  −log σ(β δ̄)
    aot           −(1−ε) log σ(βd) − ε log σ(−βd),  d = sort(S_w − S_l) − sort(Δref)      [0, 0.5]
                  (AOT, Melnyk et al.; Δref = S^ref_w − S^ref_l, sorted over the batch)
    aot_unpaired  as aot,  d = sort(ρ_w) − sort(ρ_l)                                       [0, 0.5]
    ============  ====================================================================  ==========

    aot and aot_unpaired (as TRL) take the log-probs and log-ratios as they are (no f-divergence
    score, no clipped margin) and couple the pairs of a batch: pair_weights cannot apply to them.

    ``loss_type`` may also be a list (TRL's multi-loss form, e.g. MPO's ``["sigmoid",
    "bco_pair"]`` — TRL's ``"sft"`` entry is the losses' NLL term): the per-pair loss is then
    Σ_k w_k·loss_k with ``loss_weights`` w (default all 1), and the metrics add each type's mean
    ``loss_<type>`` (before ``loss_weights`` and ``pair_weights``).

    For exo_pair, ε = 0 is read as the recommended 1e-3 (as TRL v0.27 did); ε ≠ 0 needs a type
    that uses it, within the range of each such type of the list. ipo and sigmoid_norm need
    ``chosen_counts`` and ``rejected_counts`` (completion token counts, clamped ≥ 1). discopop
    evaluates m·e^{−z} as exp(log σ(z/τ) − z), which cannot overflow for τ ≤ 1 (the exponent is
    clamped ≤ 80 otherwise).

    ``clip_ref_margin=True`` (reverse_kl only) replaces the pairwise margin by
    δ = Δθ − max(0, Δref), Δθ = S_w − S_l, Δref = S^ref_w − S^ref_l (each divided by its count
    first for ipo/sigmoid_norm): a reference that already prefers y_w is not credited to the policy,
    one that prefers y_l is ignored. Only the margin δ changes; losses that also use the
    individual scores (nca_pair, bco_pair, sppo_hard) or log-ratios (apo_zero, apo_down) keep
    s_w, s_l = ρ.

    ``pair_weights`` ``[B]`` (e.g. WPO's, :func:`wpo_pair_weights`) multiply the per-pair losses
    before the mean, as TRL's ``use_weighting``; they are reported as the metric
    ``pair_weights``.

    Metrics: rewards β·ρ (TRL), margins, accuracy, chosen/rejected logps. Returns the mean loss.
    """
    beta = check_positive("beta", beta)
    types, weights = _check_loss_types(loss_type, loss_weights)
    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCE_TYPES)
    eps = _check_label_smoothing(types, label_smoothing)
    alpha = check_in_range("f_alpha_divergence_coef", f_alpha_divergence_coef, -math.inf, math.inf)
    tau = check_positive("discopop_tau", discopop_tau)
    if clip_ref_margin and f_divergence_type != "reverse_kl":
        raise ValueError("clip_ref_margin=True needs f_divergence_type='reverse_kl'")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        missing = "ref_chosen_logps" if ref_chosen_logps is None else "ref_rejected_logps"
        raise ValueError(f"{missing} is None but the other reference log-probs are given")
    pw, pl, rw, rl, pair_w, nw, nl = _check_batch(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
            "pair_weights": pair_weights,
        },
        {"chosen_counts": chosen_counts, "rejected_counts": rejected_counts},
    )
    if clip_ref_margin and set(types) & set(_SORTED):
        raise ValueError("clip_ref_margin=True does not apply to the aot loss types")
    if pair_w is not None and set(types) & set(_SORTED):
        raise ValueError("pair_weights cannot weigh the aot loss types: they sort the batch, so "
                         "a loss no longer belongs to one pair")
    for t in types:
        if t in _LENGTH_NORMALISED:
            why = f"for loss_type={t!r} (length-normalised margin)"
            _require("chosen_counts", nw, why)
            _require("rejected_counts", nl, why)
    if rw is None:
        rw = rl = torch.zeros_like(pw)
    rho_w, rho_l = pw - rw, pl - rl
    s_w = _f_scores(rho_w, f_divergence_type, alpha)
    s_l = _f_scores(rho_l, f_divergence_type, alpha)

    def margin(t: str) -> Tensor:
        """δ of loss type t: of the scores, or of the clipped log-probs; per token for ipo and
        sigmoid_norm; of the sorted margins or log-ratios for aot and aot_unpaired."""
        if t == "aot":
            return torch.sort(pw - pl).values - torch.sort(rw - rl).values
        if t == "aot_unpaired":
            return torch.sort(rho_w).values - torch.sort(rho_l).values
        inv_w, inv_l = (1.0 / nw, 1.0 / nl) if t in _LENGTH_NORMALISED else (1.0, 1.0)
        if clip_ref_margin:
            return (pw * inv_w - pl * inv_l) - torch.relu(rw * inv_w - rl * inv_l)
        return s_w * inv_w - s_l * inv_l

    per_type = {t: _pair_losses(t, margin(t), s_w, s_l, rho_w, rho_l, beta=beta,
                                eps=eps if t in _SMOOTHING_RANGES else 0.0, tau=tau)
                for t in types}
    losses = sum(w * per_type[t] for t, w in zip(types, weights, strict=True))
    extra = {} if pair_w is None else {"pair_weights": pair_w}
    if len(types) > 1:
        extra.update({f"loss_{t}": v.mean() for t, v in per_type.items()})
    metrics = _pair_metrics(beta * rho_w, beta * rho_l, policy_chosen_logps, policy_rejected_logps,
                            **extra)
    if pair_w is not None:
        losses = losses * pair_w
    return losses.mean(), metrics


def _pair_losses(loss_type: str, delta: Tensor, s_w: Tensor, s_l: Tensor, rho_w: Tensor,
                 rho_l: Tensor, *, beta: float, eps: float, tau: float) -> Tensor:
    """Per-pair losses ``[B]`` of one DPO loss type (the table of :func:`dpo_loss`)."""
    z, z_w, z_l = beta * delta, beta * s_w, beta * s_l
    if loss_type in ("sigmoid", "sigmoid_norm", "aot", "aot_unpaired"):
        return _smoothed_sigmoid_loss(z, eps)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        eps = eps or _EXO_DEFAULT_EPS
        lq_w, lq_l = F.logsigmoid(z), F.logsigmoid(-z)
        return lq_w.exp() * (lq_w - math.log1p(-eps)) + lq_l.exp() * (lq_l - math.log(eps))
    if loss_type == "nca_pair":
        return -F.logsigmoid(z_w) - 0.5 * F.logsigmoid(-z_w) - 0.5 * F.logsigmoid(-z_l)
    if loss_type == "bco_pair":
        return -F.logsigmoid(z_w) - F.logsigmoid(-z_l)
    if loss_type == "sppo_hard":
        return (s_w - 0.5 / beta) ** 2 + (s_l + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * rho_w) + torch.sigmoid(beta * rho_l)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * rho_w) + 1 - torch.sigmoid(z)
    # discopop
    weighted_exp = torch.exp((F.logsigmoid(z / tau) - z).clamp(max=_EXP_CLAMP))
    return torch.sigmoid(-z / tau) * -F.logsigmoid(z) + weighted_exp


@one_sync
@torch.no_grad()
def wpo_pair_weights(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_log_collision: Tensor,
    rejected_log_collision: Tensor,
    chosen_counts: Tensor | None,
    rejected_counts: Tensor | None,
) -> Tensor:
    r"""WPO's pair weights (Zhou et al. 2024, eq. 2; TRL's ``use_weighting``), ``[B]``, without
    gradient::

        w = exp(m(y_w) + m(y_l)),  m(y) = (1/n) Σ_t (log π(y_t) − log Σ_v π(v)²)

    from the summed log-probs S = Σ_t log π(y_t), the summed per-token log collision
    probabilities C = Σ_t log Σ_v π(v)² (:func:`hypo_fast.ops.linear_logprob`'s
    ``log_collision``) and the token counts n (clamped ≥ 1) of each response: m is large where
    the policy puts more mass on the response's tokens than on a typical draw of its own. As
    log π(y_t) − log Σ_v π(v)² ≤ log V, w ≤ V² stays finite. TRL does not clamp w (v0.27 clamped
    it ≤ 1).
    """
    sw, sl, cw, cl, nw, nl = _check_batch(
        {
            "chosen_logps": chosen_logps,
            "rejected_logps": rejected_logps,
            "chosen_log_collision": chosen_log_collision,
            "rejected_log_collision": rejected_log_collision,
        },
        {"chosen_counts": chosen_counts, "rejected_counts": rejected_counts},
    )
    _require("chosen_counts", nw, "(WPO averages over tokens)")
    _require("rejected_counts", nl, "(WPO averages over tokens)")
    return torch.exp((sw - cw) / nw + (sl - cl) / nl)


@one_sync
def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_counts: Tensor,
    rejected_counts: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    chosen_nll: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    r"""SimPO (Meng, Xia, Chen 2024) on summed log-probs ``[B]`` and token counts ``[B]``.

    A = S / max(n, 1), z = β(A_w − A_l) − γ with γ ABSOLUTE (TRL ``simpo_gamma``/Liger convention;
    the official repo's ``gamma_beta_ratio`` r corresponds to γ = β·r)::

        L = mean_b[ −(1−ε) log σ(z) − ε log σ(−z) ] + sft_weight · NLL(y_w)

    NLL(y_w) is ``chosen_nll`` (a 0-d tensor) or, when None, the token-mean NLL over the batch's
    chosen tokens −Σ_b S_w / Σ_b n_w; it is only evaluated when ``sft_weight > 0``.
    ε ∈ [0, 0.5]. Metrics: rewards β·A (as TRL CPOTrainer), plus ``nll`` when the SFT term is on.
    """
    beta = check_positive("beta", beta)
    gamma = check_in_range("gamma", gamma, -math.inf, math.inf)
    eps = check_in_range("label_smoothing", label_smoothing, 0.0, 0.5)
    sft_weight = check_in_range("sft_weight", sft_weight, 0.0, math.inf)
    sw, sl, nw, nl = _check_batch(
        {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps},
        {"chosen_counts": chosen_counts, "rejected_counts": rejected_counts},
    )
    _require("chosen_counts", nw, "by SimPO (length-averaged log-probs)")
    _require("rejected_counts", nl, "by SimPO (length-averaged log-probs)")
    a_w, a_l = sw / nw, sl / nl
    loss = _smoothed_sigmoid_loss(beta * (a_w - a_l) - gamma, eps).mean()
    extra = {}
    if sft_weight > 0:
        nll = _token_mean_nll(sw, chosen_counts.to(sw.dtype), chosen_nll)
        loss = loss + sft_weight * nll
        extra["nll"] = nll
    return loss, _pair_metrics(beta * a_w, beta * a_l, chosen_logps, rejected_logps, **extra)


@one_sync
def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_nll: Tensor | None = None,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    chosen_counts: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    r"""CPO (Xu et al. 2024; TRL ``CPOTrainer.cpo_loss``, loss_type="sigmoid") on SUMMED log-probs::

        L = mean_b[ −(1−ε) log σ(β(S_w − S_l)) − ε log σ(−β(S_w − S_l)) ] + α · NLL(y_w)

    No reference model. NLL(y_w) is ``chosen_nll`` (0-d) or −Σ_b S_w / Σ_b n_w from
    ``chosen_counts``; it is skipped when α = 0. ε ∈ [0, 0.5], α ≥ 0.
    Metrics: rewards β·S, plus ``nll`` when α > 0.
    """
    beta = check_positive("beta", beta)
    alpha = check_in_range("alpha", alpha, 0.0, math.inf)
    eps = check_in_range("label_smoothing", label_smoothing, 0.0, 0.5)
    sw, sl, _ = _check_batch(
        {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps},
        {"chosen_counts": chosen_counts},
    )
    loss = _smoothed_sigmoid_loss(beta * (sw - sl), eps).mean()
    extra = {}
    if alpha > 0:
        counts = None if chosen_counts is None else chosen_counts.to(sw.dtype)
        nll = _token_mean_nll(sw, counts, chosen_nll)
        loss = loss + alpha * nll
        extra["nll"] = nll
    return loss, _pair_metrics(beta * sw, beta * sl, chosen_logps, rejected_logps, **extra)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, branching at −ln 2 (Mächler 2012)."""
    return torch.where(
        x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))
    )


@one_sync
def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_counts: Tensor,
    rejected_counts: Tensor,
    *,
    beta: float = 0.1,
    chosen_nll: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    r"""ORPO (Hong et al. 2024; TRL ``ORPOTrainer.odds_ratio_loss``) on summed log-probs ``[B]``.

    A = S / max(n, 1), log odds(y) = A − log(1 − e^A), o = log odds(y_w) − log odds(y_l)::

        L = NLL(y_w) − β · mean_b log σ(o)

    log(1 − e^A) uses the stable log1mexp branching at −ln 2, with A clamped ≤ −eps(dtype) so that
    A = 0 (every token certain) stays finite. NLL(y_w) is ``chosen_nll`` (0-d) or the batch's
    token-mean −Σ_b S_w / Σ_b n_w. β plays ORPO's λ (TRL ``beta`` = 0.1).
    Metrics: rewards β·A (TRL), ``log_odds_ratio`` = mean log σ(o), ``log_odds_chosen`` = mean o,
    ``nll``.
    """
    beta = check_positive("beta", beta)
    sw, sl, nw, nl = _check_batch(
        {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps},
        {"chosen_counts": chosen_counts, "rejected_counts": rejected_counts},
    )
    _require("chosen_counts", nw, "by ORPO (length-averaged log-probs)")
    _require("rejected_counts", nl, "by ORPO (length-averaged log-probs)")
    top = -torch.finfo(sw.dtype).eps
    a_w, a_l = (sw / nw).clamp(max=top), (sl / nl).clamp(max=top)
    log_odds = (a_w - a_l) - (_log1mexp(a_w) - _log1mexp(a_l))
    ratio = F.logsigmoid(log_odds)
    nll = _token_mean_nll(sw, chosen_counts.to(sw.dtype), chosen_nll)
    loss = nll - beta * ratio.mean()
    metrics = _pair_metrics(
        beta * a_w, beta * a_l, chosen_logps, rejected_logps,
        log_odds_ratio=ratio.mean(), log_odds_chosen=log_odds.mean(), nll=nll,
    )
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# SparsePO


@one_sync
def sparsepo_loss(
    chosen_reward_sums: Tensor,
    rejected_reward_sums: Tensor,
    chosen_kl_sums: Tensor,
    rejected_kl_sums: Tensor,
    chosen_mask_l1: Tensor | None = None,
    rejected_mask_l1: Tensor | None = None,
    chosen_kl_mask_l1: Tensor | None = None,
    rejected_kl_mask_l1: Tensor | None = None,
    *,
    beta: float = 0.8,
    l1_u: float = 0.0,
    l1_d: float = 0.0,
) -> tuple[Tensor, Metrics]:
    r"""SparsePO (Christopoulou et al. 2024; HEBO ``SparsePO/ SparseTrainer``), per pair ``[B]``.

    Inputs (sums over the completion tokens of y_w, resp. y_l; see :func:`sparsepo_sequence_sums`):
    ``*_reward_sums`` = Σ_t m^u_t (ℓ_t − ℓ^ref_t); ``*_kl_sums`` = Σ_t m^d_t KL_t with
    KL_t = KL(π_ref ‖ π_θ) at position t (full vocabulary, forward direction);
    ``*_mask_l1`` = ‖m^u‖₁, ``*_kl_mask_l1`` = ‖m^d‖₁ of each sequence (needed only when
    ``l1_u`` resp. ``l1_d`` > 0; for a common mask pass the same tensors twice and, as HEBO,
    halve both λ: the mask is penalised once per term). With
    u = R_w − R_l and d = Σ m^d_w κ_w − Σ m^d_l κ_l, κ = −KL, i.e. d = K_l − K_w::

        L = mean_b[ −log σ(β(u − d)) + λ_u(‖m^u_w‖₁ + ‖m^u_l‖₁) + λ_d(‖m^d_w‖₁ + ‖m^d_l‖₁) ]

    No length normalisation. Metrics: rewards β·R_w, β·R_l, margins, accuracy, ``chosen_kl``,
    ``rejected_kl`` (the KL sums), ``logits`` = β(u − d); no ``*_logps`` (none are passed).
    """
    beta = check_positive("beta", beta)
    l1_u = check_in_range("l1_u", l1_u, 0.0, math.inf)
    l1_d = check_in_range("l1_d", l1_d, 0.0, math.inf)
    rw, rl, k_w, k_l, muw, mul, mdw, mdl = _check_batch(
        {
            "chosen_reward_sums": chosen_reward_sums,
            "rejected_reward_sums": rejected_reward_sums,
            "chosen_kl_sums": chosen_kl_sums,
            "rejected_kl_sums": rejected_kl_sums,
            "chosen_mask_l1": chosen_mask_l1,
            "rejected_mask_l1": rejected_mask_l1,
            "chosen_kl_mask_l1": chosen_kl_mask_l1,
            "rejected_kl_mask_l1": rejected_kl_mask_l1,
        }
    )
    logits = beta * ((rw - rl) - (k_l - k_w))
    losses = -F.logsigmoid(logits)
    for lam_name, lam, (name_w, m_w), (name_l, m_l) in (
        ("l1_u", l1_u, ("chosen_mask_l1", muw), ("rejected_mask_l1", mul)),
        ("l1_d", l1_d, ("chosen_kl_mask_l1", mdw), ("rejected_kl_mask_l1", mdl)),
    ):
        if lam > 0:
            _require(name_w, m_w, f"when {lam_name} > 0")
            _require(name_l, m_l, f"when {lam_name} > 0")
            losses = losses + lam * (m_w + m_l)
    metrics = _pair_metrics(beta * rw, beta * rl, chosen_reward_sums, rejected_reward_sums)
    del metrics["chosen_logps"], metrics["rejected_logps"]
    metrics.update(chosen_kl=k_w.detach(), rejected_kl=k_l.detach(), logits=logits.detach())
    return losses.mean(), metrics


@one_sync
def sparsepo_sequence_sums(
    token_logratios: Tensor,
    token_kl: Tensor,
    seq_ids: Tensor,
    num_seqs: int,
    *,
    reward_weights: Tensor | None = None,
    kl_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Per-sequence SparsePO sums from flattened completion tokens ``[N]``.

    ``token_logratios`` = ℓ_t − ℓ^ref_t, ``token_kl`` = KL_t(π_ref ‖ π_θ), ``seq_ids`` ∈ [0, S),
    masks m^u = ``reward_weights``, m^d = ``kl_weights`` (all ones when None; gradients flow into
    them). Returns ``[S]`` tensors (R_s, K_s, ‖m^u‖₁_s, ‖m^d‖₁_s)::

        R_s = Σ_{t∈s} m^u_t (ℓ_t − ℓ^ref_t),  K_s = Σ_{t∈s} m^d_t KL_t,  ‖m‖₁_s = Σ_{t∈s} |m_t|
    """
    lr, kl, mu, md = _check_batch(
        {
            "token_logratios": token_logratios,
            "token_kl": token_kl,
            "reward_weights": reward_weights,
            "kl_weights": kl_weights,
        }
    )
    num_seqs = _check_seq_ids("seq_ids", seq_ids, lr, num_seqs)
    mu = torch.ones_like(lr) if mu is None else mu
    md = torch.ones_like(lr) if md is None else md
    return (
        segment_sum(mu * lr, seq_ids, num_seqs),
        segment_sum(md * kl, seq_ids, num_seqs),
        segment_sum(mu.abs(), seq_ids, num_seqs),
        segment_sum(md.abs(), seq_ids, num_seqs),
    )


def _check_seq_ids(
    name: str, ids: Tensor, like: Tensor, num_seqs: int, *, contiguous: bool = False
) -> int:
    """Check a per-token sequence index ``[N]`` with values in [0, num_seqs) (and, if asked,
    each sequence's tokens contiguous); one host synchronisation."""
    check_index(name, ids, ndim=1)
    check_shape(name, ids, tuple(like.shape), "one entry per token")
    check_same_device({"tokens": like, name: ids})
    if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs < 1:
        raise ValueError(f"num_seqs must be an int >= 1, got {num_seqs!r}")
    flags = [(f"{name} must lie in [0, {num_seqs})", (ids.min() < 0) | (ids.max() >= num_seqs))]
    if contiguous:
        flags.append((f"{name}: each sequence's tokens must be contiguous",
                      segments_not_contiguous(ids, num_seqs)))
    raise_flagged(flags)
    return num_seqs


# ---------------------------------------------------------------------------------------------
# HyPO: sequence-level reverse KL on online samples


@one_sync
def hypo_kl_term(
    seq_logps: Tensor,
    ref_seq_logps: Tensor,
    *,
    estimator: str = "rloo",
    group_ids: Tensor | None = None,
    token_kl: Tensor | None = None,
    token_logps: Tensor | None = None,
    token_seq_ids: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    r"""HyPO's KL regulariser (Song et al. 2024) on online samples y_s ~ π_θ(·|x_s), ``[B]``.

    The returned term's GRADIENT is an unbiased estimate of ∇_θ mean_x KL(π_θ(·|x) ‖ π_ref(·|x)),
    KL = E_{y~π}[S(y) − S_ref(y)] (sequence level); its VALUE is the matching unbiased estimate of
    the KL itself (score-function parts are written as sg(c)·(ℓ − sg(ℓ)), which is 0 in value).
    λ is not applied here: the caller multiplies. With r_s = S_s − S^ref_s:

    - ``reinforce``: ∇ = mean_s sg(r_s)·∇S_s  (the gradient of mean_s sg(r_s)·S_s, i.e. of the
      sequence-level k2 loss); value mean_s r_s.
    - ``rloo``: k ≥ 2 samples per prompt share a ``group_ids`` entry (int ``[B]``);
      b_s = mean of r over the other samples of the group;  ∇ = mean_s sg(r_s − b_s)·∇S_s
      (unbiased: b_s does not depend on y_s); value mean_s r_s.
    - ``exact``: per-token full-vocabulary reverse KL ``token_kl`` KL_t = KL(π‖π_ref)(·|y_<t)
      ``[N]`` and ``token_logps`` ℓ_t = log π(y_t|y_<t) ``[N]``, both differentiable,
      ``token_seq_ids`` ``[N]`` in [0, B), each sequence's tokens contiguous and in time order::

          loss_s = Σ_t KL_t + Σ_t sg(Σ_{t'>t} KL_t')·(ℓ_t − sg(ℓ_t)),   term = mean_s loss_s

      E[Σ_t KL_t] is the sequence KL (chain rule), and its gradient is E[Σ_t ∇KL_t] plus the
      score-function term for the KL still to come; the value Σ_t KL_t is a Rao-Blackwellised,
      lower-variance estimate than r_s. ``seq_logps``/``ref_seq_logps`` give B and a metric only.

    Metrics: ``kl`` — per-sequence KL estimate ``[B]`` (r_s, or Σ_t KL_t for exact);
    ``log_ratio`` r_s; ``advantages`` (the score coefficients, reinforce/rloo).
    """
    check_choice("estimator", estimator, KL_ESTIMATORS)
    s, s_ref = _check_batch({"seq_logps": seq_logps, "ref_seq_logps": ref_seq_logps})
    log_ratio = (s - s_ref).detach()
    if estimator == "exact":
        seq_kl, score = _exact_kl_parts(token_kl, token_logps, token_seq_ids, s)
        term = (seq_kl + score).mean()
        return term, {"kl": seq_kl.detach(), "log_ratio": log_ratio}
    adv = log_ratio if estimator == "reinforce" else log_ratio - _loo_baseline(log_ratio, group_ids)
    term = log_ratio.mean() + (adv * (s - s.detach())).mean()
    return term, {"kl": log_ratio, "log_ratio": log_ratio, "advantages": adv}


def _loo_baseline(values: Tensor, group_ids: Tensor | None) -> Tensor:
    """b_s = (Σ_{j in group(s)} v_j − v_s) / (k_s − 1), every group of size k_s ≥ 2."""
    _require("group_ids", group_ids, "by estimator='rloo'")
    check_index("group_ids", group_ids, ndim=1)
    check_shape("group_ids", group_ids, tuple(values.shape), "one id per sequence")
    check_same_device({"seq_logps": values, "group_ids": group_ids})
    _, inverse, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    raise_flagged(
        [("group_ids: rloo needs at least 2 samples in every group, found a group of 1",
          sizes.min() < 2)]
    )
    sums = segment_sum(values, inverse, sizes.numel())
    k = sizes[inverse].to(values.dtype)
    return (sums[inverse] - values) / (k - 1)


def _exact_kl_parts(
    token_kl: Tensor | None, token_logps: Tensor | None, token_seq_ids: Tensor | None, s: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-sequence (Σ_t KL_t, Σ_t sg(future KL_t)·(ℓ_t − sg ℓ_t)), both ``[B]``."""
    for name, t in (("token_kl", token_kl), ("token_logps", token_logps),
                    ("token_seq_ids", token_seq_ids)):
        _require(name, t, "by estimator='exact'")
    kl, lp = _check_batch({"token_kl": token_kl, "token_logps": token_logps})
    check_same_device({"seq_logps": s, "token_kl": kl})
    num_seqs = _check_seq_ids("token_seq_ids", token_seq_ids, kl, s.numel(), contiguous=True)
    ids = token_seq_ids.long()
    kl_d = kl.detach().double()  # the future-KL weights carry no gradient; fp64 keeps them exact
    after = kl_d.flip(0).cumsum(0).flip(0) - kl_d  # Σ over all later tokens of the batch
    pos = torch.arange(ids.numel(), device=ids.device)
    last = torch.zeros(num_seqs, dtype=torch.long, device=ids.device)
    last = last.scatter_reduce(0, ids, pos, "amax", include_self=False)
    future = (after - after[last][ids]).to(lp.dtype)  # later tokens of the same sequence only
    score = segment_sum(future * (lp - lp.detach()), ids, num_seqs)
    return segment_sum(kl, ids, num_seqs), score


# ---------------------------------------------------------------------------------------------
# HPO


@one_sync
def hpo_aux_term(
    seq_logps: Tensor,
    aux_rewards: Tensor,
    *,
    baseline: Tensor | float | None = None,
    tau: float = 1.0,
    w_max: float = 20.0,
) -> tuple[Tensor, Metrics]:
    r"""HPO's auxiliary-reward term (Badrinath et al. 2024), AWR-style weighted likelihood.

    With A_s = R_aux,s − b (b = ``baseline``: a number, a 0-d or ``[B]`` tensor such as a value
    head V(x_s), or by default the batch mean of R_aux) and w_s = sg(min(e^{A_s/τ}, w_max))::

        term = −mean_s w_s · S(y_s)

    computed as e^{min(A/τ, log w_max)}, which cannot overflow. λ/α is applied by the caller
    (see :func:`hpo_loss`). Metrics: ``weights`` w ``[B]``, ``advantages`` A ``[B]``.
    """
    tau = check_positive("tau", tau)
    w_max = check_positive("w_max", w_max)
    s, r = _check_batch({"seq_logps": seq_logps, "aux_rewards": aux_rewards})
    r = r.detach()
    if baseline is None:
        b = r.mean()
    elif isinstance(baseline, torch.Tensor):
        check_float("baseline", baseline)
        check_finite({"baseline": baseline})
        if baseline.dim() != 0:
            check_shape("baseline", baseline, tuple(r.shape), "a number per sequence, or 0-d")
        check_same_device({"seq_logps": s, "baseline": baseline})
        b = baseline.detach().to(r.dtype)
    else:
        b = check_in_range("baseline", baseline, -math.inf, math.inf)
    adv = r - b
    w = torch.exp((adv / tau).clamp(max=math.log(w_max)))
    return -(w * s).mean(), {"weights": w, "advantages": adv}


@one_sync
def hpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    aux_seq_logps: Tensor,
    aux_rewards: Tensor,
    *,
    alpha: float = 1.0,
    aux_baseline: Tensor | float | None = None,
    tau: float = 1.0,
    w_max: float = 20.0,
    **dpo_kwargs: Any,
) -> tuple[Tensor, Metrics]:
    r"""HPO: ``dpo_loss(...) + α · hpo_aux_term(aux_seq_logps, aux_rewards, ...)``::

        L = ℓ_DPO + α·(−mean_s w_s S(y_s)),  w_s = sg(min(e^{(R_aux,s − b)/τ}, w_max))

    ``dpo_kwargs`` go to :func:`dpo_loss` (beta, loss_type, ...). The aux sequences may be the
    chosen and/or rejected completions (their summed log-probs, ``[M]``). Metrics: those of
    :func:`dpo_loss`, plus ``dpo_loss``, ``aux_loss``, ``aux_weights``, ``aux_advantages``.
    """
    alpha = check_in_range("alpha", alpha, 0.0, math.inf)
    dpo, metrics = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        **dpo_kwargs,
    )
    aux, aux_metrics = hpo_aux_term(
        aux_seq_logps, aux_rewards, baseline=aux_baseline, tau=tau, w_max=w_max
    )
    metrics.update(
        dpo_loss=dpo.detach(),
        aux_loss=aux.detach(),
        aux_weights=aux_metrics["weights"],
        aux_advantages=aux_metrics["advantages"],
    )
    return dpo + alpha * aux, metrics
