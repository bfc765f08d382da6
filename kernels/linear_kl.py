"""Fused policy + reference heads: exact per-token full-vocabulary KL, entropy and label log-probs.

Op 2 of DESIGN.md §3 without either N x V logits tensor. Two heads share the vocabulary V:
the policy ``z = softcap(H @ W.T + b) / T`` (H ``[N, d]``) and the frozen reference
``r = softcap(H_ref @ W_ref.T + b_ref) / T`` (H_ref ``[N, d_ref]``, d_ref may differ from d).
With ``p = softmax(z)``, ``q = softmax(r)``, ``Δ = z - r``:

    reverse  KL(p‖q) = E_p[Δ] - (lse_z - lse_r)
    forward  KL(q‖p) = (lse_z - lse_r) - E_q[Δ]
    entropy  H(p)    = lse_z - E_p[z]

Rows are the *valid* tokens only: the launchers receive ``rows`` (int64 indices into both hidden
tensors) so masked tokens cost no FLOPs.

Forward (:func:`kl_forward`): a split-vocabulary kernel like ``linear_logprob``'s. Program
(row block, split) streams its range of vocabulary tiles, computes the z and r tiles in fp32 and
keeps per row the online ``(m_z, s_z = Σ e^{z-m_z}, m_r, s_r, A, B)``. Written naively the KL
is a difference of O(|z|) terms whose fp32 rounding (~1e-6) swamps a small KL (close heads: KL
~ 1e-6 comes out 0.5% wrong in the fp32 spec). So everything is kept against the running
``c = m_z - m_r``, with ``δ = Δ - c = (z - m_z) - (r - m_r)``:

    A = Σ e^{z-m_z}·δ (reverse) or Σ e^{r-m_r}·δ (forward),
    B = s_z - s_r, summed as e^{r-m_r}·expm1(δ) where |δ| < 1/2,
    lse_z - lse_r = c + log1p(B / s_r),

and both are shifted exactly (A by -γ·s, B by an expm1 of γ) when the maxima move c by γ.
Then KL = A/s_z - log1p(B/s_r) (reverse) or log1p(B/s_r) - A/s_r (forward): small terms only.
Optional: the entropy from ``Σ e^{z-m_z}·(z - m_z)`` (``H = log s_z - that / s_z``, no
cancellation for large peaked z) and the label logits ``z[y]``, ``r[y]``. A few torch ops merge
the splits, shifting each split's partials to the global maxima the same way.

Backward (:func:`kl_backward`, policy side only: the reference is frozen): per vocabulary chunk a
kernel recomputes both tiles and writes ``dX = ∂loss/∂(H @ W.T + b)`` from per-row upstream
gradients ``g_kl``, ``g_ent``, ``g_logp``, with ``log p = (z - M_z) - log S_z`` from the
forward's normalisers kept in two parts (M, log S) for accuracy at large |z|:

    dz_j = g_kl·p_j·(δ_j - E_p[δ])            (reverse: p_j(log p_j - log q_j - KL))
         | g_kl·q_j·expm1(log p_j - log q_j)  (forward: g_kl·(p_j - q_j), no cancellation)
         - g_ent·p_j·(log p_j + H) + g_logp·([j = y] - p_j),
    dx_j = dz_j · sech²(x_j/c) / T            (softcap c, from the raw logit x; else dz / T),

then ``chunked_head_backward`` turns dX into dH, dW, db with two library GEMMs per chunk.

GEMM-equivalents (one = N·V·d multiply-adds): forward 2 (policy, reference), backward 4 (policy
and reference recompute, dH, dW); the reference recompute is skipped when ``g_kl`` is None.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._tiles import (
    CHUNK_BYTES,
    block_config,
    chunked_head_backward,
    drop_within_budget,
    expm1_small,
    fast_log,
    grad_grid,
    grad_tile,
    head_constants,
    head_operands,
    head_transform,
    launch,
    log_mass,
    logits_tile,
    merge_splits,
    softcap_with_slope,
    split_vocab,
    store_grad_tile,
    swizzle,
    tma_blocks,
    tma_eligible,
)


class Head(NamedTuple):
    """One linear head: hidden ``[R, d]`` (unit stride along d), weight ``[V, d]``,
    bias ``[V]`` or None."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


class KLStats(NamedTuple):
    """Per valid row, fp32: ``kl [n]``; ``norm [5, n]``, what the backward needs:
    ``(M_z, log S_z, M_r, log S_r, center)`` with ``lse = M + log S`` kept in two parts (so that
    ``log p = (z - M_z) - log S_z`` is as accurate as fp32 allows for large |z|) and ``center``
    the constant the backward subtracts from ``δ = (z - M_z) - (r - M_r)``: ``E_p[δ]`` (reverse)
    or ``log S_z/S_r`` (forward); ``entropy`` of the policy, ``logp``/``ref_logp`` of the labels,
    or None."""

    kl: torch.Tensor
    norm: torch.Tensor
    entropy: torch.Tensor | None
    logp: torch.Tensor | None
    ref_logp: torch.Tensor | None


@triton.jit
def _exp_diff(a, b, x):
    """``a - b`` for ``a = b·e^x`` without cancellation: ``b·expm1(x)`` for |x| < 1/2 (the GPU's
    plain exp and log are approximations), and ``a - b`` otherwise (at most ~2.5x the rounding
    of a or b)."""
    return tl.where(tl.abs(x) < 0.5, b * expm1_small(tl.minimum(tl.maximum(x, -0.5), 0.5)),
                    a - b)


@triton.jit
def _both_products(H, W, HR, WR, row0, col0, D, CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
                   REF_CAST_F32: tl.constexpr, REF_PRECISION: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr):
    """``(H @ W.T, H_ref @ W_ref.T)`` for one [BM, BN] tile in a single loop over d = d_ref,
    through descriptors: one software pipeline for both heads, not one per head."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ref_acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BK)):
        h, w = tma_blocks(H, W, row0, col0, k, CAST_F32, BK)
        hr, wr = tma_blocks(HR, WR, row0, col0, k, REF_CAST_F32, BK)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
        ref_acc = tl.dot(hr, tl.trans(wr), ref_acc, input_precision=REF_PRECISION)
    return acc, ref_acc


@triton.jit
def _label_and_max(x, hit, col_mask, m, t, HAS_LABELS: tl.constexpr):
    """One head's logits tile ``x``: the label's logit added to ``t``, then ``x`` with -1e30 off
    the vocabulary (finite: e^{x - m} is 0 there, and so is every product with it) and the new
    running row max (from ``m``; every tile has a column in the vocabulary)."""
    if HAS_LABELS:
        t += tl.sum(tl.where(hit, x, 0.0), axis=1)
    x = tl.where(col_mask[None, :], x, -1.0e30)
    return x, tl.maximum(m, tl.max(x, axis=1)), t


@triton.jit
def _forward_kernel(
    H, W, B, D, stride_h, stride_w, HR, WR, BR, DR, stride_hr, stride_wr,
    Y, ROWS, OUT, TSTAT, N, V, stride_out, stride_ts, stride_tp, n_splits, tiles_per_split,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    REVERSE: tl.constexpr, WANT_ENTROPY: tl.constexpr, HAS_LABELS: tl.constexpr,
    WANT_TILE_STATS: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
    REF_CAST_F32: tl.constexpr, REF_PRECISION: tl.constexpr, TMA: tl.constexpr,
    FUSE_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    rb, split = swizzle(tl.program_id(0), tl.cdiv(N, BM), n_splits, GROUP_M)
    offs_m = rb * BM + tl.arange(0, BM)
    row_mask = offs_m < N
    # Padding rows repeat the last row (finite, consistent statistics) and are never stored.
    own = tl.minimum(offs_m, N - 1)
    live = own < N
    rows = tl.load(ROWS + own)
    if HAS_LABELS:
        labels = tl.load(Y + own).to(tl.int32)
    # A finite "no tile yet" max: every shift below is then 0·finite, never inf - inf.
    m_z = tl.full((BM,), -3.0e38, tl.float32)
    m_r = tl.full((BM,), -3.0e38, tl.float32)
    s_z = tl.zeros((BM,), tl.float32)
    s_r = tl.zeros((BM,), tl.float32)
    a_i = tl.zeros((BM,), tl.float32)
    b_i = tl.zeros((BM,), tl.float32)
    ent = tl.zeros((BM,), tl.float32)
    t_z = tl.zeros((BM,), tl.float32)
    t_r = tl.zeros((BM,), tl.float32)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(V, BN))
    cols = tl.arange(0, BN)
    stat_ptrs = TSTAT + first_tile.to(tl.int64) * stride_ts + offs_m  # advanced tile by tile
    # Each tile's own work follows its product, so that few [BM, BN] tensors are live at once
    # (at 128 x 128 the two logits tiles alone take half the registers).
    for tile in range(first_tile, last_tile):
        offs_n = cols.to(tl.int64) + tile * BN
        col_mask = cols < V - tile * BN
        hit = cols[None, :] == (labels - tile * BN)[:, None] if HAS_LABELS else None
        if FUSE_K:  # descriptors, d = d_ref
            z, r = _both_products(H, W, HR, WR, rb * BM, tile * BN, D, CAST_F32, PRECISION,
                                  REF_CAST_F32, REF_PRECISION, BM, BN, BK)
            z = head_transform(z, B, offs_n, col_mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
        else:
            z = logits_tile(H, W, B, rows, live, rb * BM, offs_n, col_mask, tile * BN, D,
                             stride_h, stride_w, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP,
                             CAST_F32, PRECISION, TMA, BM, BN, BK)
        # Off the vocabulary z and r are -1e30: e_z = e_r = 0, and δ is finite there.
        z, m_z_new, t_z = _label_and_max(z, hit, col_mask, m_z, t_z, HAS_LABELS)
        if FUSE_K:
            r = head_transform(r, BR, offs_n, col_mask, inv_temp, softcap, HAS_REF_BIAS,
                               HAS_SOFTCAP)
        else:
            r = logits_tile(HR, WR, BR, rows, live, rb * BM, offs_n, col_mask, tile * BN, DR,
                             stride_hr, stride_wr, inv_temp, softcap, HAS_REF_BIAS, HAS_SOFTCAP,
                             REF_CAST_F32, REF_PRECISION, TMA, BM, BN, BK)
        r, m_r_new, t_r = _label_and_max(r, hit, col_mask, m_r, t_r, HAS_LABELS)
        if WANT_TILE_STATS:  # here, so that z and r die before the exponentials
            r_min = tl.min(tl.where(col_mask[None, :], r, 3.0e38), axis=1)
            d_min = tl.min(tl.where(col_mask[None, :], z - r, 3.0e38), axis=1)
            d_max = tl.max(tl.where(col_mask[None, :], z - r, -3.0e38), axis=1)
        scale_z = tl.exp(m_z - m_z_new)
        scale_r = tl.exp(m_r - m_r_new)
        z_c = z - m_z_new[:, None]
        r_c = r - m_r_new[:, None]
        e_z = tl.exp(z_c)
        e_r = tl.exp(r_c)
        # δ = Δ - c with c = m_z - m_r; γ = how much c moved. a, b are kept against c.
        delta = z_c - r_c
        gamma = (m_z_new - m_z) - (m_r_new - m_r)
        b_i = (scale_z * b_i + _exp_diff(scale_z, scale_r, -gamma) * s_r
               + tl.sum(_exp_diff(e_z, e_r, delta), axis=1))
        if REVERSE:
            a_i = scale_z * (a_i - gamma * s_z) + tl.sum(e_z * delta, axis=1)
        else:
            a_i = scale_r * (a_i - gamma * s_r) + tl.sum(e_r * delta, axis=1)
        if WANT_ENTROPY:
            ent = (scale_z * (ent + (m_z - m_z_new) * s_z)
                   + tl.sum(e_z * z_c, axis=1))
        sum_z = tl.sum(e_z, axis=1)
        sum_r = tl.sum(e_r, axis=1)
        if WANT_TILE_STATS:  # per tile: log-sum-exp of z and of r, least r, range of z - r
            plane = stat_ptrs  # advanced one plane at a time: k·stride could wrap in int32
            tl.store(plane, m_z_new + fast_log(sum_z), mask=row_mask)
            plane += stride_tp
            tl.store(plane, m_r_new + fast_log(sum_r), mask=row_mask)
            plane += stride_tp
            tl.store(plane, r_min, mask=row_mask)
            plane += stride_tp
            tl.store(plane, d_min, mask=row_mask)
            plane += stride_tp
            tl.store(plane, d_max, mask=row_mask)
            stat_ptrs += stride_ts
        s_z = s_z * scale_z + sum_z
        s_r = s_r * scale_r + sum_r
        m_z, m_r = m_z_new, m_r_new
    out = OUT + split.to(tl.int64) * N + offs_m
    tl.store(out, m_z, mask=row_mask)
    tl.store(out + stride_out, s_z, mask=row_mask)
    tl.store(out + 2 * stride_out, m_r, mask=row_mask)
    tl.store(out + 3 * stride_out, s_r, mask=row_mask)
    tl.store(out + 4 * stride_out, a_i, mask=row_mask)
    tl.store(out + 5 * stride_out, b_i, mask=row_mask)
    if WANT_ENTROPY:
        tl.store(out + 6 * stride_out, ent, mask=row_mask)
    if HAS_LABELS:
        tl.store(out + 7 * stride_out, t_z, mask=row_mask)
        tl.store(out + 8 * stride_out, t_r, mask=row_mask)


@triton.jit
def _grad_logits_kernel(
    H, W, B, D, stride_h, stride_w, HR, WR, BR, DR, stride_hr, stride_wr,
    Y, ROWS, NORM, ENT, G_KL, G_ENT, G_LOGP, DX, DB_PART, PAIRS,
    N, V, col_start, n_cols, stride_norm, stride_dx, stride_db, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    REVERSE: tl.constexpr, HAS_G_KL: tl.constexpr, HAS_G_ENT: tl.constexpr,
    HAS_G_LOGP: tl.constexpr, WANT_DB: tl.constexpr, SPARSE: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
    REF_CAST_F32: tl.constexpr, REF_PRECISION: tl.constexpr, TMA: tl.constexpr,
    FUSE_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    rb, ct = grad_tile(PAIRS, col_start, N, n_cols, SPARSE, BM, BN, GROUP_M)
    offs_m = rb * BM + tl.arange(0, BM)
    row_mask = offs_m < N
    local_n = ct * BN + tl.arange(0, BN)
    offs_n = col_start + local_n.to(tl.int64)
    col_mask = (local_n < n_cols) & (offs_n < V)
    # Padding rows repeat the last row (finite, consistent statistics) and are never stored.
    own = tl.minimum(offs_m, N - 1)
    live = own < N
    rows = tl.load(ROWS + own)
    col0 = col_start + ct * BN
    if FUSE_K:  # descriptors, d = d_ref, and r is needed (HAS_G_KL)
        x, r = _both_products(H, W, HR, WR, rb * BM, col0, D, CAST_F32, PRECISION, REF_CAST_F32,
                              REF_PRECISION, BM, BN, BK)
        x = head_transform(x, B, offs_n, col_mask, 1.0, softcap, HAS_BIAS, False)
        r = head_transform(r, BR, offs_n, col_mask, inv_temp, softcap, HAS_REF_BIAS, HAS_SOFTCAP)
    else:
        x = logits_tile(H, W, B, rows, live, rb * BM, offs_n, col_mask, col0, D, stride_h,
                         stride_w, 1.0, softcap, HAS_BIAS, False, CAST_F32, PRECISION, TMA, BM,
                         BN, BK)
    z, slope = softcap_with_slope(x, inv_temp, softcap, HAS_SOFTCAP)
    # Off the vocabulary z is finite but meaningless: p = 0 there, and every term stays finite.
    z_c = tl.where(col_mask[None, :], z - tl.load(NORM + own)[:, None], -1.0e30)
    log_p = z_c - tl.load(NORM + stride_norm + own)[:, None]
    p = tl.exp(log_p)
    dz = tl.zeros_like(z)
    if HAS_G_KL:
        if not FUSE_K:
            r = logits_tile(HR, WR, BR, rows, live, rb * BM, offs_n, col_mask, col0, DR,
                             stride_hr, stride_wr, inv_temp, softcap, HAS_REF_BIAS, HAS_SOFTCAP,
                             REF_CAST_F32, REF_PRECISION, TMA, BM, BN, BK)
        g_kl = tl.load(G_KL + own)[:, None]
        r_c = tl.where(col_mask[None, :], r - tl.load(NORM + 2 * stride_norm + own)[:, None],
                       -1.0e30)
        # reverse: δ - E_p[δ] = log p - log q - KL; forward: δ - log S_z/S_r = log p - log q
        d = (z_c - r_c) - tl.load(NORM + 4 * stride_norm + own)[:, None]
        if REVERSE:
            dz = g_kl * p * d
        else:
            q = tl.exp(r_c - tl.load(NORM + 3 * stride_norm + own)[:, None])
            dz = g_kl * _exp_diff(p, q, d)
    if HAS_G_ENT:
        ent = tl.load(ENT + own)
        g_ent = tl.load(G_ENT + own)
        dz -= g_ent[:, None] * p * (log_p + ent[:, None])
    if HAS_G_LOGP:
        label_col = tl.load(Y + own).to(tl.int32) - col0  # the label's column in the tile
        g_logp = tl.load(G_LOGP + own)[:, None]
        hit = tl.arange(0, BN)[None, :] == label_col[:, None]
        dz += g_logp * (tl.where(hit, 1.0, 0.0) - p)
    store_grad_tile(DX, DB_PART, dz * slope, rb, offs_m, row_mask, local_n, col_mask, n_cols,
                    stride_dx, stride_db, WANT_DB)


def _kernel_heads(
    policy: Head, ref: Head, rows: torch.Tensor, cfg: dict, need_ref: bool = True,
    all_rows: bool = False,
) -> tuple[tuple, dict]:
    """Both heads' kernel arguments ``(H, W, b, d, stride_h, stride_w)`` and the blocks with
    ``TMA`` set to whether the heads the kernel reads load through descriptors (all or none)
    and ``FUSE_K`` to whether one loop computes both products (asked for, descriptors, and heads
    alike). Without ``need_ref`` (a backward with no KL gradient never reads the reference) the
    reference goes as it is: no compacted copy, no one-loop products."""
    read = (policy, ref) if need_ref else (policy,)
    tma = all(tma_eligible(head.weight, rows, cfg) for head in read)
    # one loop needs the same d, and the same dtype (an fp32 reference's tiles would double its
    # shared memory past the limit)
    alike = (policy.weight.shape[1] == ref.weight.shape[1]
             and policy.weight.dtype == ref.weight.dtype)
    cfg = {**cfg, "TMA": tma, "FUSE_K": bool(cfg.get("FUSE_K")) and tma and alike and need_ref}
    args: tuple = ()
    for head, is_read in ((policy, True), (ref, need_ref)):
        h, w = (head_operands(head.hidden, head.weight, rows, cfg, all_rows)[:2] if is_read
                else (head.hidden, head.weight))
        args += (h, w, head.bias if head.bias is not None else head.hidden, head.weight.shape[1],
                 head.hidden.stride(0), head.weight.stride(0))
    return args, cfg


def _constants(policy: Head, ref: Head, temperature: float, softcap: float | None) -> dict:
    consts = head_constants(policy.hidden.dtype, temperature, softcap)
    ref_consts = head_constants(ref.hidden.dtype, temperature, softcap)
    return {**consts, "REF_CAST_F32": ref_consts["CAST_F32"],
            "REF_PRECISION": ref_consts["PRECISION"],
            "HAS_BIAS": policy.bias is not None, "HAS_REF_BIAS": ref.bias is not None}


TILE_STATS = 5  # statistics the forward records per (tile, row) for a filtered backward


def tile_width(dtype: torch.dtype) -> int:
    """Vocabulary width of the tiles whose statistics the forward records for filtering."""
    return two_head_config("forward", dtype)["BN"]


def filter_tiles(
    tile_stats: torch.Tensor,
    norm: torch.Tensor,
    labels: torch.Tensor | None,
    entropy: torch.Tensor | None,
    g_kl: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    reverse: bool,
    eps: float,
    block_m: int,
    tile_w: int,
) -> torch.Tensor:
    """``keep [cdiv(n, block_m), n_tiles]``: the (row block, tile) pairs a filtered backward
    computes, as ``linear_logprob.filter_tiles`` does for one head. For row i and tile t, with
    the tile masses ``P = Σ_t p_j``, ``Q = Σ_t q_j`` (from the forward's tile log-sum-exps),
    ``ℓ = lse_r − min_t r`` (so ``|log q_j| ≤ ℓ`` in the tile) and ``[lo, hi]`` the range of
    ``x_j = log p_j − log q_j = (z_j − r_j) − (lse_z − lse_r)`` over the tile (from its least
    and greatest z − r), the non-label columns carry

        Σ_t |dz_j| ≤ |g_kl|·K + |g_ent|·P·(H − log P + log W) + |g_logp|·P,
        forward (dz = p − q = p·(1 − e^{−x}) = q·(e^x − 1)):
            K = min(P + Q, P·max(|e^{−lo} − 1|, |e^{−hi} − 1|), Q·max(|e^{lo} − 1|, |e^{hi} − 1|)),
        reverse (dz = p·(x − KL)): K = P·min(−log P + log W + ℓ + |KL|, max(|lo|, |hi|) + |KL|),

    with ``−Σ_t p log p ≤ P·(−log P + log W)`` (W = tile width). The second bound of each pair
    shrinks with the heads' distance (``|x| ≤ max(|lo|, |hi|)``), the first serves far heads.
    Each row drops its smallest tiles while their bounds add up to at most
    ``eps·(|g_kl| + |g_ent| + |g_logp|)``, never the label's tile; so
    ``‖ΔdH_i‖_∞ ≤ eps·(|g_kl| + |g_ent| + |g_logp|)/T · max_j ‖W_j‖_∞``.
    """
    n = norm.shape[1]
    zero = torch.zeros(n, dtype=torch.float32, device=norm.device)
    c, b, a = (g.abs() if g is not None else zero for g in (g_kl, g_entropy, g_logp))
    lse_z, lse_r = norm[0] + norm[1], norm[2] + norm[3]
    log_w = math.log(tile_w)
    # The [n_tiles, n] fp32 buffers are this function's memory: each is built in place and
    # dropped once used, so that at most five (forward KL: seven) are live beside tile_stats.
    d_min, d_max = tile_stats[3, :, :n], tile_stats[4, :, :n]
    # fp32 roundings of O(|z|, |r|, |lse|) values: 8 ulps of each
    slack = _abs_max(d_min, d_max).add_(lse_z.abs()).add_(lse_r.abs()).mul_(2.0**-20)
    shift = lse_z - lse_r
    lo, hi = (d_min - shift).sub_(slack), (d_max - shift).add_(slack)
    del slack
    log_p = _unflushed(log_mass(tile_stats[0, :, :n], lse_z), log_w, norm[1])
    if reverse:  # |KL| = |E_p[δ] − log S_z/S_r|, over-estimated by the sum of both
        kl = norm[4].abs() + (norm[1] - norm[3]).abs()
        far = _abs_max(lo, hi).add_(kl)
        del lo, hi
        r_min = tile_stats[2, :, :n]
        # ≥ |log q| in t
        log_q_max = (lse_r - r_min).add_(r_min.abs().add_(lse_r.abs()).mul_(2.0**-21))
        near = (log_w - log_p).add_(log_q_max).add_(kl)
        del log_q_max
        p = log_p.exp()
        k = torch.minimum(near, far, out=near).mul_(p)
        del far
    else:  # |p − q| = p·|e^{−x} − 1| = q·|e^x − 1|, in logs (either mass can underflow)
        log_q = _unflushed(log_mass(tile_stats[1, :, :n], lse_r), log_w, norm[3])
        by_p = _log_abs_expm1(-lo)
        torch.maximum(by_p, _log_abs_expm1(-hi), out=by_p).add_(log_p)
        by_q = _log_abs_expm1(lo)
        del lo
        torch.maximum(by_q, _log_abs_expm1(hi), out=by_q).add_(log_q)
        del hi
        torch.minimum(by_p, by_q, out=by_p).exp_()
        del by_q
        p = log_p.exp()
        k = torch.minimum(log_q.exp_().add_(p), by_p, out=log_q)
        del by_p
    h = entropy if entropy is not None and g_entropy is not None else 0.0
    # rate = c·k + b·p·(h − log P + log W) + a·p
    entropy_term = (h - log_p).add_(log_w)
    del log_p
    entropy_term.mul_(b * p)
    rate = k.mul_(c).add_(entropy_term)
    del entropy_term
    rate.add_(p.mul_(a))
    del p
    label_tiles = labels // tile_w if labels is not None else None
    return drop_within_budget(rate, eps * (a + b + c), label_tiles, block_m)


def _abs_max(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max(|x|, |y|)`` in one new buffer."""
    out = x.abs()
    return torch.maximum(out, y.abs(), out=out)


def _unflushed(log_m: torch.Tensor, log_w: float, log_s: torch.Tensor) -> torch.Tensor:
    """``log_m``, a tile's log-mass from the forward, raised by what its sum can have lost: each
    term ``e^{z − m}`` below 2⁻¹²⁶ flushes to 0 against the running max m ≤ max z, so the W
    terms lost weigh at most ``W·2⁻¹²⁶·e^{max z − lse} = W·2⁻¹²⁶/S`` (``log_s = log S``).
    Negligible beside any mass, but not once multiplied by a ratio q/p of e^100."""
    return torch.logaddexp(log_m, log_w - log_s + _LOG_FLUSH)


_LOG_FLUSH = math.log(2.0**-126)  # fp32's least normal: exp() results below it flush to 0


def _log_abs_expm1(y: torch.Tensor) -> torch.Tensor:
    """An upper bound on ``log|e^y − 1|`` (``y`` itself beyond 20, where e^y would overflow)."""
    out = y.clamp(max=20).expm1_().abs_().log_()
    return torch.where(y > 20, y, out, out=out)


def two_head_config(kind: str, dtype: torch.dtype) -> dict:
    """``linear_logprob``'s blocks with BN capped at 128: a program holds two fp32 ``[BM, BN]``
    logits tiles here, and at 128 x 256 (16-bit inputs) they spill registers (forward, H200,
    bf16, N=4096, d=4096, V=128256: 69 ms at 128 x 256, 25 ms at 128 x 128). With descriptor
    loads (H100, bf16, N=8192, d=4096, V=128256, runs 4-5): the forward computes both products
    in one K loop (``FUSE_K``, where d = d_ref: 35.9 -> 31.0 ms), the backward pipelines 4
    stages (59.8 -> 52.2 ms). The forward's programs go in groups of 4 row blocks, the fastest
    in run 9's sweep (two trees: 30.2-30.3 ms, against 31.1-31.4 with 16 and 37.4-37.6 with 8;
    8 swept 29.8-30.5 ms in runs 5, 6 and 8, 35.9 in run 7). On an H200 (run 11, 4 rounds of
    the public forward) 8 and 16 were 1.5-2% faster than 4, within the rounds' spread."""
    cfg = block_config(kind, dtype)
    # not linear_logprob's flattened tile and K loops: 29.9 -> 40.8 ms (H100, run 8)
    cfg.pop("FLATTEN", None)
    if not (cfg["TMA"] and dtype != torch.float32):
        return {**cfg, "BN": min(cfg["BN"], 128), "FUSE_K": False}
    if kind == "forward":
        return {**cfg, "BN": 128, "FUSE_K": True, "GROUP_M": 4}
    return {**cfg, "BN": 128, "FUSE_K": False, "num_stages": 4}


def kl_forward(
    policy: Head,
    ref: Head,
    rows: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    reverse: bool = True,
    temperature: float = 1.0,
    softcap: float | None = None,
    want_entropy: bool = False,
    config: dict | None = None,
    all_rows: bool = False,
    tile_stats: torch.Tensor | None = None,
) -> KLStats:
    """Per valid row statistics of the two heads (:class:`KLStats`), fp32 ``[n]``.

    ``rows [n]`` int64 indices into both hidden tensors (``all_rows``: every row in order, so
    the hidden tensors serve as ``hidden[rows]`` without gathered copies); ``labels [n]`` (the
    valid rows' labels, in ``[0, V)``) or None for no ``logp``/``ref_logp``. KL is clamped at 0
    (it is ≥ 0 exactly; only rounding makes it negative). ``tile_stats [TILE_STATS,
    cdiv(V, tile_width()), ≥ n]`` (fp32, optional) receives, per vocabulary tile and valid row
    (column i), the tile's log-sum-exp of z, of r, its least r, and the least and greatest
    z − r: what a filtered backward needs.
    """
    n, V = rows.numel(), policy.weight.shape[0]
    dev = policy.hidden.device
    if n == 0:
        zero = torch.zeros(0, dtype=torch.float32, device=dev)
        has_labels = labels is not None
        return KLStats(zero, zero.new_zeros(5, 0), zero if want_entropy else None,
                       zero if has_labels else None, zero if has_labels else None)
    cfg = config or two_head_config("forward", policy.hidden.dtype)
    n_row_blocks, n_tiles = triton.cdiv(n, cfg["BM"]), triton.cdiv(V, cfg["BN"])
    if tile_stats is not None and (
            cfg["BN"] != tile_width(policy.hidden.dtype) or tile_stats.shape[0] != TILE_STATS
            or tile_stats.shape[1] < n_tiles or tile_stats.shape[2] < n
            or tile_stats.stride(2) != 1):
        raise ValueError(f"tile_stats needs [{TILE_STATS}, cdiv(V, tile_width()), >= n] with "
                         "unit stride along rows, and tiles of tile_width() columns")
    splits, tiles_per_split = split_vocab(n_row_blocks, n_tiles, dev)
    part = torch.empty((9, splits, n), dtype=torch.float32, device=dev)
    heads, cfg = _kernel_heads(policy, ref, rows, cfg, all_rows=all_rows)
    stats = tile_stats if tile_stats is not None else part
    launch(
        _forward_kernel, (n_row_blocks * splits,),
        *heads, labels if labels is not None else rows, rows,
        part, stats, n, V, part.stride(0), stats.stride(1), stats.stride(0), splits,
        tiles_per_split, REVERSE=reverse, WANT_ENTROPY=want_entropy,
        HAS_LABELS=labels is not None, WANT_TILE_STATS=tile_stats is not None,
        **_constants(policy, ref, temperature, softcap), **cfg,
    )
    m_z, s_z, m_r, s_r, a, b, ent, t_z, t_r = part
    max_z, sum_z, w_z = merge_splits(m_z, s_z)
    max_r, sum_r, w_r = merge_splits(m_r, s_r)
    log_sum_z, log_sum_r = torch.log(sum_z), torch.log(sum_r)
    # Shift each split's a, b from its c_k = m_z,k - m_r,k to c = M_z - M_r, then
    # S_z - S_r = Σ_k w_z,k b_k + (w_z,k - w_r,k) s_r,k with w_z,k - w_r,k = w_r,k·expm1(-γ_k).
    gamma = (max_z - m_z) - (max_r - m_r)
    w_diff = torch.where(gamma.abs() < 1, w_r * torch.expm1(-gamma), w_z - w_r)
    ratio = (w_z * b + w_diff * s_r).sum(dim=0) / sum_r  # S_z / S_r - 1
    # log S_z/S_r = lse_z - lse_r - c, accurate both for close heads and far ones
    log_ratio = torch.where(ratio.abs() < 0.5, torch.log1p(ratio), log_sum_z - log_sum_r)
    if reverse:  # KL = E_p[δ] - log S_z/S_r
        mean = (w_z * (a - gamma * s_z)).sum(dim=0) / sum_z
        kl = mean - log_ratio
    else:  # KL = log S_z/S_r - E_q[δ]
        mean = (w_r * (a - gamma * s_r)).sum(dim=0) / sum_r
        kl = log_ratio - mean
    norm = torch.stack([max_z, log_sum_z, max_r, log_sum_r, mean if reverse else log_ratio])
    # H = log S - E[z - M], the split partials Σ e^{z-m_k}·(z - m_k) shifted to M
    entropy = None
    if want_entropy:
        entropy = log_sum_z - (w_z * (ent + s_z * (m_z - max_z))).sum(dim=0) / sum_z
    logp = ref_logp = None
    if labels is not None:
        logp = (t_z.sum(dim=0) - max_z) - log_sum_z
        ref_logp = (t_r.sum(dim=0) - max_r) - log_sum_r
    return KLStats(kl.clamp_min(0.0), norm, entropy, logp, ref_logp)


def kl_backward(
    policy: Head,
    ref: Head,
    rows: torch.Tensor,
    labels: torch.Tensor | None,
    norm: torch.Tensor,
    entropy: torch.Tensor | None,
    g_kl: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    *,
    reverse: bool = True,
    temperature: float = 1.0,
    softcap: float | None = None,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    config: dict | None = None,
    all_rows: bool = False,
    tile_stats: torch.Tensor | None = None,
    filter_eps: float = 0.0,
    max_fraction: float = 0.25,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Policy gradients ``(dH [n, d], dW [V, d], db [V] fp32)`` (None where not needed; dH of
    the valid rows, in the order of ``rows``) from
    per-valid-row upstream gradients ``g_kl``, ``g_entropy``, ``g_logp`` (fp32 ``[n]``; None =
    zero) and the forward's :class:`KLStats` fields ``norm [5, n]`` (unit stride along n) and
    ``entropy`` (read only with ``g_entropy``).

    ``chunk_bytes`` bounds the dX chunk buffer; ``all_rows`` as for :func:`kl_forward`. With the
    forward's ``tile_stats`` and ``filter_eps > 0``, the (row block, tile) pairs
    :func:`filter_tiles` rejects are neither recomputed nor multiplied (its docstring bounds
    what that drops), when at most ``max_fraction`` of them survive; else the exact path runs.
    """
    h, w = policy.hidden, policy.weight
    n, V = rows.numel(), w.shape[0]
    if n == 0 or (g_kl is None and g_entropy is None and g_logp is None):
        dev = h.device
        return (h.new_zeros(n, h.shape[1]) if need_hidden else None,
                torch.zeros_like(w) if need_weight else None,
                torch.zeros(V, dtype=torch.float32, device=dev) if need_bias else None)
    if g_logp is not None and labels is None:
        raise ValueError("g_logp needs the labels")
    cfg = config or two_head_config("backward", h.dtype)
    constants = _constants(policy, ref, temperature, softcap)
    heads, cfg = _kernel_heads(policy, ref, rows, cfg, need_ref=g_kl is not None,
                               all_rows=all_rows)
    keep = None
    if tile_stats is not None and filter_eps > 0:
        width = tile_width(h.dtype)
        if cfg["BN"] != width:
            raise ValueError(f"a filtered backward needs dX tiles of tile_width() = {width} "
                             f"columns, got BN = {cfg['BN']}")
        keep = filter_tiles(tile_stats, norm, labels, entropy, g_kl, g_entropy, g_logp, reverse,
                            filter_eps, cfg["BM"], width)
    # Any fp32 tensor stands in for an absent one: the kernel never reads it (HAS_* flag off).
    grads = [t if t is not None else norm for t in (g_kl, g_entropy, g_logp)]

    def fill(dx: torch.Tensor, db_part: torch.Tensor, start: int, cols: int,
             pairs: torch.Tensor | None = None) -> None:
        launch(
            _grad_logits_kernel, grad_grid(n, cols, cfg, pairs),
            *heads, labels if labels is not None else rows, rows,
            norm, entropy if entropy is not None else norm, *grads,
            dx, db_part, pairs if pairs is not None else rows, n, V, start, cols,
            norm.stride(0), dx.stride(0), db_part.stride(0),
            REVERSE=reverse, HAS_G_KL=g_kl is not None, HAS_G_ENT=g_entropy is not None,
            HAS_G_LOGP=g_logp is not None, WANT_DB=need_bias, SPARSE=pairs is not None,
            **constants, **cfg,
        )

    return chunked_head_backward(
        h, w, rows, fill, cfg=cfg, need_hidden=need_hidden, need_weight=need_weight,
        need_bias=need_bias, chunk_bytes=chunk_bytes, keep=keep, max_fraction=max_fraction,
        compact=heads[0].base if cfg["TMA"] else None, all_rows=all_rows,
    )
