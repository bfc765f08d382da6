"""The executable spec: naive PyTorch versions of every op, materialising the logits.

Everything here is differentiable with plain autograd and computes in fp32 (fp64 when an input is
fp64), whatever the input dtype. The fused backends are tested against these functions, values and
gradients. Shapes: hidden ``[..., d]``, weight ``[V, d]``, bias ``[V]``, per-token tensors (labels,
seq_ids, token_weights, mask) shaped ``hidden.shape[:-1]``; per-token outputs are shaped like the
labels, per-sequence outputs are ``[S]``.

Logits: ``z = softcap(H @ W.T + b) / temperature`` with ``softcap(x) = c * tanh(x / c)``
(Gemma-2 final-logit soft-capping) when ``softcap=c`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._autocast import autocast_disabled
from ._checks import (
    check_choice,
    check_finite,
    check_float,
    check_same_device,
    raise_flagged,
    validate_head,
)

KL_DIRECTIONS = ("reverse", "forward")


@dataclass
class LogProbOutput:
    """Per-token and per-sequence statistics of one head.

    ``logp``, ``lse`` (and ``entropy``, ``log_collision``) are per token, shaped like the
    labels, 0 on ignored rows. ``log_collision = log Σ_v p_v²`` (the log-probability that two
    draws agree; WPO's normaliser) carries no gradient. When ``seq_ids`` was given: ``seq_sum[s]
    = Σ_{i in s} logp_i``, ``seq_weighted_sum[s] = Σ_{i in s} w_i·logp_i`` (only with
    ``token_weights``) and ``seq_count[s]`` = number of valid tokens of sequence s (float, not
    clamped).
    """

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None = None
    log_collision: torch.Tensor | None = None
    seq_sum: torch.Tensor | None = None
    seq_weighted_sum: torch.Tensor | None = None
    seq_count: torch.Tensor | None = None


@dataclass
class KLOutput:
    """Per-token full-vocabulary KL between a policy and a reference head.

    ``kl`` is per token, 0 on masked rows. With ``seq_ids``: ``seq_kl[s] = Σ_{i in s} w_i·kl_i``
    (w = 1 without ``token_weights``) and ``seq_count``. With labels: ``logp`` and ``ref_logp`` of
    the labels under both heads. ``entropy`` is the policy's.
    """

    kl: torch.Tensor
    seq_kl: torch.Tensor | None = None
    seq_count: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any tensor is fp64, else fp32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def linear_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``z = softcap(H @ W.T + b) / temperature`` in ``dtype`` (default fp32, fp64 for fp64
    inputs): ``[..., V]``, under torch.autocast too."""
    dtype = dtype or compute_dtype(hidden, weight, bias)
    with autocast_disabled(hidden.device):
        z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if softcap is not None:
        z = soft_cap(z, softcap)
    return z / temperature


def soft_cap(x: torch.Tensor, c: float) -> torch.Tensor:
    """``c·tanh(u)``, ``u = x/c``: ``torch.tanh`` where |u| < 1, and ``c·s·(1 − 2e/(1 + e))``
    beyond, with s = ±1 the sign of u and ``e = e^{−2|u|}``. Autograd differentiates the second
    form to ``4e/(1 + e)² = sech²(u)`` from e itself, exact where tanh saturates, where
    ``torch.tanh``'s backward, ``1 − tanh²``, cancels to 0 (from |u| ≈ 9 in fp32, 19 in fp64);
    the first keeps small values exact (no ``1 − e`` there). Both branches have finite
    gradients, so ``torch.where`` passes no NaN."""
    u = x / c
    e = torch.exp(-2.0 * u.abs())
    s = torch.where(u < 0, -1.0, 1.0).to(x.dtype)
    return c * torch.where(u.abs() < 1.0, torch.tanh(u), s * (1.0 - 2.0 * e / (1.0 + e)))


def logprob_from_logits(z: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(logp, lse)``: ``lse = logsumexp(z)``, ``logp = z[y] - lse``; 0 where ignored."""
    valid = labels != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    target = z.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.where(valid, target - lse, zero), torch.where(valid, lse, zero)


@torch.no_grad()
def log_collision_from_logits(z: torch.Tensor) -> torch.Tensor:
    """``log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z)`` per row, without gradient."""
    return torch.logsumexp(2.0 * z, dim=-1) - 2.0 * torch.logsumexp(z, dim=-1)


def entropy_from_logits(z: torch.Tensor) -> torch.Tensor:
    """``H = -Σ_v p_v log p_v = lse - Σ_v p_v z_v`` per row."""
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_from_logits(z: torch.Tensor, r: torch.Tensor, direction: str = "reverse") -> torch.Tensor:
    """Per-row KL between ``p = softmax(z)`` (policy) and ``q = softmax(r)`` (reference).

    reverse: ``KL(p‖q) = Σ_v p_v (log p_v - log q_v)``; forward: ``KL(q‖p)``.
    """
    check_choice("direction", direction, KL_DIRECTIONS)
    logp, logq = torch.log_softmax(z, dim=-1), torch.log_softmax(r, dim=-1)
    if direction == "forward":
        logp, logq = logq, logp
    return (logp.exp() * (logp - logq)).sum(-1)


def segment_sum(values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """``out[s] = Σ_{i: seq_ids_i = s} values_i`` over flattened tokens: ``[num_seqs]``. The
    same bits run to run on CUDA too: an accumulating ``index_put`` sorts the indices, where
    ``index_add`` would add with atomics in whatever order the threads arrive."""
    out = torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    return out.index_put((seq_ids.reshape(-1).long(),), values.reshape(-1), accumulate=True)


def sequence_sums(
    values: torch.Tensor,
    valid: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(plain sums, weighted sums or None, counts) of per-token ``values`` by sequence."""
    plain = segment_sum(values, seq_ids, num_seqs)
    weighted = None
    if token_weights is not None:
        weighted = segment_sum(values * token_weights.to(values.dtype), seq_ids, num_seqs)
    return plain, weighted, segment_sum(valid.to(values.dtype), seq_ids, num_seqs)


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
) -> LogProbOutput:
    """Per-token log-prob of the label, logsumexp and (optionally) entropy and log collision
    probability of one head.

    ``logp_i = z_i[y_i] - lse_i``, ``lse_i = log Σ_v exp(z_iv)``, ``entropy_i = -Σ_v p_iv log
    p_iv``, ``log_collision_i = log Σ_v p_iv²`` (no gradient) for rows with ``y_i !=
    ignore_index`` (0 otherwise), plus per-sequence sums by ``seq_ids`` (``num_seqs`` defaults
    to ``max(seq_ids) + 1``).
    """
    num_seqs = validate_head(
        hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
        softcap=softcap, seq_ids=seq_ids, num_seqs=num_seqs, token_weights=token_weights,
    )
    z = linear_logits(hidden, weight, bias, temperature=temperature, softcap=softcap)
    logp, lse = logprob_from_logits(z, labels, ignore_index)
    valid = labels != ignore_index
    out = LogProbOutput(logp=logp, lse=lse)
    if return_entropy:
        out.entropy = torch.where(valid, entropy_from_logits(z), 0.0)
    if return_collision:
        out.log_collision = torch.where(valid, log_collision_from_logits(z), 0.0)
    if seq_ids is not None:
        out.seq_sum, out.seq_weighted_sum, out.seq_count = sequence_sums(
            logp, valid, seq_ids, num_seqs, token_weights
        )
    return out


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
) -> KLOutput:
    """Exact per-token KL between the policy head (H, W, b) and the frozen reference head
    (H_ref, W_ref, b_ref: no gradient reaches it), both with the same temperature and softcap,
    computed in fp64 if any of the six tensors is fp64, else fp32.

    ``reverse``: ``KL(π‖π_ref) = Σ_v p_v (log p_v - log q_v)``; ``forward``: ``KL(π_ref‖π)``.
    A row counts when ``mask`` is True (default: all) and, if labels are given, its label is not
    ``ignore_index``; other rows give 0. With labels, ``logp``/``ref_logp`` are returned too.
    """
    check_choice("direction", direction, KL_DIRECTIONS)
    num_seqs, valid = validate_kl_inputs(
        hidden, weight, ref_hidden, ref_weight, bias, ref_bias, labels=labels,
        ignore_index=ignore_index, mask=mask, temperature=temperature, softcap=softcap,
        seq_ids=seq_ids, num_seqs=num_seqs, token_weights=token_weights,
    )
    dtype = compute_dtype(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    z = linear_logits(hidden, weight, bias, temperature=temperature, softcap=softcap, dtype=dtype)
    r = linear_logits(ref_hidden, ref_weight, ref_bias, temperature=temperature,
                      softcap=softcap, dtype=dtype).detach()
    kl = torch.where(valid, kl_from_logits(z, r, direction), 0.0)
    out = KLOutput(kl=kl)
    if return_entropy:
        out.entropy = torch.where(valid, entropy_from_logits(z), 0.0)
    if labels is not None:
        out.logp, _ = logprob_from_logits(z, labels, ignore_index)
        out.ref_logp, _ = logprob_from_logits(r, labels, ignore_index)
        out.logp = torch.where(valid, out.logp, 0.0)
        out.ref_logp = torch.where(valid, out.ref_logp, 0.0)
    if seq_ids is not None:
        plain, weighted, out.seq_count = sequence_sums(kl, valid, seq_ids, num_seqs, token_weights)
        out.seq_kl = plain if weighted is None else weighted
    return out


def validate_kl_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor, bias: torch.Tensor | None, ref_bias: torch.Tensor | None, *,
    labels: torch.Tensor | None, ignore_index: int, mask: torch.Tensor | None,
    temperature: float, softcap: float | None, seq_ids: torch.Tensor | None,
    num_seqs: int | None, token_weights: torch.Tensor | None,
) -> tuple[int | None, torch.Tensor]:
    """Checks both heads (as :func:`validate_head`, the reference's vocabulary and device those
    of the policy); returns ``(num_seqs, valid_mask)``."""
    check_float("ref_hidden", ref_hidden)
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"ref_hidden must have the token shape of hidden, {tuple(hidden.shape[:-1])}, "
            f"got {tuple(ref_hidden.shape[:-1])}"
        )
    flags: list[tuple[str, torch.Tensor]] = []
    num_seqs = validate_head(
        hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
        softcap=softcap, seq_ids=seq_ids, num_seqs=num_seqs, token_weights=token_weights,
        mask=mask, pending=flags,
    )
    validate_head(
        ref_hidden, ref_weight, labels, ref_bias, ignore_index=ignore_index,
        temperature=temperature, softcap=softcap, prefix="ref_",
        vocab=weight.shape[0], device=hidden.device, pending=flags,
    )
    raise_flagged(flags)
    return num_seqs, kl_rows(hidden, labels, ignore_index, mask)


def kl_rows(hidden: torch.Tensor, labels: torch.Tensor | None, ignore_index: int,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Bool ``hidden.shape[:-1]``: the rows whose KL counts (label not ignored, mask True)."""
    valid = torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
    if labels is not None:
        valid = valid & (labels != ignore_index)
    if mask is not None:
        valid = valid & mask
    return valid


def _log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``log π(y) − log π_ref(y)`` of two float tensors of one shape (no broadcasting: a
    mismatch is a bug), on one device, free of NaN/inf (checked with a host sync)."""
    check_float("logp", logp)
    check_float("ref_logp", ref_logp)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp must have one shape, got {tuple(logp.shape)} and "
                         f"{tuple(ref_logp.shape)}")
    check_same_device({"logp": logp, "ref_logp": ref_logp})
    check_finite({"logp": logp, "ref_logp": ref_logp})
    return logp - ref_logp


def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π(y) - log π_ref(y): unbiased for KL(π‖π_ref) with y ~ π (Schulman 2020)."""
    return _log_ratio(logp, ref_logp)


def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π(y) - log π_ref(y))²: biased, low variance; its gradient is ∇KL(π‖π_ref)."""
    return 0.5 * _log_ratio(logp, ref_logp) ** 2


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = π_ref(y)/π(y): unbiased for KL(π‖π_ref), ≥ 0. Exact, not
    clamped (verl and OpenRLHF clamp): inf where log r exceeds the dtype's exp range (88 in
    fp32)."""
    log_r = -_log_ratio(logp, ref_logp)
    return torch.expm1(log_r) - log_r
