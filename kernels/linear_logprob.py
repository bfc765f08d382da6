"""Fused lm_head + log-softmax: per-token log-prob of the label, logsumexp, entropy and
log collision probability.

Op 1 of DESIGN.md §3 without the N x V logits. Rows are the *valid* tokens only: the launcher
receives ``rows`` (int64 indices into ``hidden``) so ignored tokens cost no FLOPs.

Forward (:func:`logprob_forward`): a split-vocabulary kernel. Program (row block, split) streams
its contiguous range of vocabulary tiles, computes ``x = H_rows @ W_tile.T (+ b)`` in fp32,
``z = softcap(x) / T`` and keeps an online ``(m, s = Σ e^{z-m}, a = Σ e^{z-m}·(z-m), q = Σ
e^{2(z-m)}, z[y])`` per row (``a`` is shifted by ``(m_old - m_new)·s_old`` when the max moves); a
few torch ops merge the splits: ``lse = M + log S``, ``S = Σ_k s_k e^{m_k-M}``, the entropy in
the relative form ``log S - Σ_k e^{m_k-M}(a_k + (m_k - M)·s_k) / S``, which does not cancel on
peaked rows (unlike ``lse - E_p[z]``), and ``log Σ_v p_v² = log Σ_k q_k e^{2(m_k-M)} - 2 log S``
(each term ≥ 0 and the largest logit's is 1: no underflow to log 0). Programs are swizzled in
groups of ``GROUP_M`` row blocks x all splits so that the H blocks and W tiles in flight stay
in L2.

Backward (:func:`logprob_backward`): per vocabulary chunk, a kernel recomputes the logits tile by
tile and writes ``dX = ∂loss/∂x`` in the input dtype (fp32 math), with
``log p_j = (z_j - M) - log S`` from the forward's normaliser kept in two parts (``lse = M +
log S`` rounds to the ulp of M: at |z| ~ 500 that alone is 3e-5 in every log p),

    dz_j = g_logp·[j = y] + p_j·(g_lse - g_logp - g_ent·(log p_j + entropy)),
    dx_j = dz_j · sech²(x_j/c) / T            (softcap c; without it dx = dz / T),

with ``sech²(u) = 4e/(1+e)², e = e^{-2|u|}`` from the raw logit (accurate where tanh saturates),

then two library GEMMs finish the chunk: ``dW[chunk] = dXᵀ @ H`` (complete over all rows, no
accumulation across chunks) and ``dH += dX @ W[chunk]`` into an fp32 accumulator. No atomics:
the result is bit-identical run to run. 4 GEMM-equivalents in all (forward, recompute, dH, dW).

Filtered backward: the forward can also record every row's log-sum-exp per vocabulary tile
(``tile_lse``, i.e. each tile's softmax mass). From it and the upstream gradients,
:func:`filter_tiles` bounds each (row block, tile) of dX and drops the smallest ones while
their total stays within ``filter_eps`` times each row's gradient scale (an L1 budget per
row); the kept tiles alone
are recomputed and fed to two block-sparse kernels (``_tiles.chunked_head_backward``), so a
tile that is skipped costs nothing at all:
``1 + 3f`` GEMM-equivalents for a kept fraction f.
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
    fast_log,
    grad_grid,
    grad_tile,
    head_constants,
    head_operands,
    launch,
    log_mass,
    logits_tile,
    merge_splits,
    softcap_with_slope,
    split_vocab,
    store_grad_tile,
    swizzle,
)


@triton.jit
def _forward_kernel(
    H, W, B, Y, ROWS, M_OUT, S_OUT, A_OUT, Q_OUT, T_OUT, TLSE,
    N, V, D, stride_h, stride_w, stride_tlse, n_splits, tiles_per_split, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_ENTROPY: tl.constexpr,
    WANT_COLLISION: tl.constexpr, WANT_TILE_LSE: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    rb, split = swizzle(tl.program_id(0), tl.cdiv(N, BM), n_splits, GROUP_M)
    offs_m = rb * BM + tl.arange(0, BM)
    row_mask = offs_m < N
    rows = tl.load(ROWS + offs_m, mask=row_mask, other=0)
    labels = tl.load(Y + offs_m, mask=row_mask, other=-1).to(tl.int32)
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    s_i = tl.zeros((BM,), tl.float32)
    a_i = tl.zeros((BM,), tl.float32)
    q_i = tl.zeros((BM,), tl.float32)
    t_i = tl.zeros((BM,), tl.float32)
    first_tile = split * tiles_per_split
    tlse_ptrs = TLSE + first_tile.to(tl.int64) * stride_tlse + offs_m  # advanced tile by tile
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(V, BN))
    cols = tl.arange(0, BN)
    # FLATTEN: the compiler fuses this loop with the K loop inside, one pipeline for both
    for tile in tl.range(first_tile, last_tile, flatten=FLATTEN):
        offs_n = cols.to(tl.int64) + tile * BN
        col_mask = cols < V - tile * BN
        z = logits_tile(H, W, B, rows, row_mask, rb * BM, offs_n, col_mask, tile * BN, D,
                         stride_h, stride_w, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, CAST_F32,
                         PRECISION, TMA, BM, BN, BK)
        # The label's logit first, then z is -1e30 off the vocabulary (finite: p is 0 there,
        # and so is p·z_c; every tile has a column in the vocabulary).
        t_i += tl.sum(tl.where(cols[None, :] == (labels - tile * BN)[:, None], z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        scale = tl.exp(m_i - m_new)
        z_c = z - m_new[:, None]
        p = tl.exp(z_c)
        if WANT_ENTROPY:
            shift = tl.where(s_i > 0, (m_i - m_new) * s_i, 0.0)
            a_i = (a_i + shift) * scale + tl.sum(p * z_c, axis=1)
        if WANT_COLLISION:
            q_i = q_i * (scale * scale) + tl.sum(p * p, axis=1)
        tile_sum = tl.sum(p, axis=1)
        s_i = s_i * scale + tile_sum
        m_i = m_new
        if WANT_TILE_LSE:  # log Σ_{j in tile} e^{z_j}; -inf if it underflows against m_i
            tl.store(tlse_ptrs, m_i + fast_log(tile_sum), mask=row_mask)
            tlse_ptrs += stride_tlse
    out = split.to(tl.int64) * N + offs_m
    tl.store(M_OUT + out, m_i, mask=row_mask)
    tl.store(S_OUT + out, s_i, mask=row_mask)
    tl.store(T_OUT + out, t_i, mask=row_mask)
    if WANT_ENTROPY:
        tl.store(A_OUT + out, a_i, mask=row_mask)
    if WANT_COLLISION:
        tl.store(Q_OUT + out, q_i, mask=row_mask)


@triton.jit
def _grad_logits_kernel(
    H, W, B, Y, ROWS, NORM, ENT, G_LOGP, G_LSE, G_ENT, DX, DB_PART, PAIRS,
    N, V, D, col_start, n_cols, stride_h, stride_w, stride_norm, stride_dx, stride_db, inv_temp,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G_LSE: tl.constexpr,
    HAS_G_ENT: tl.constexpr, WANT_DB: tl.constexpr, CAST_F32: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr, SPARSE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    rb, ct = grad_tile(PAIRS, col_start, N, n_cols, SPARSE, BM, BN, GROUP_M)
    offs_m = rb * BM + tl.arange(0, BM)
    row_mask = offs_m < N
    local_n = ct * BN + tl.arange(0, BN)
    offs_n = col_start + local_n.to(tl.int64)
    col_mask = (local_n < n_cols) & (offs_n < V)
    rows = tl.load(ROWS + offs_m, mask=row_mask, other=0)
    x = logits_tile(H, W, B, rows, row_mask, rb * BM, offs_n, col_mask, col_start + ct * BN, D,
                     stride_h, stride_w, 1.0, softcap, HAS_BIAS, False, CAST_F32, PRECISION, TMA,
                     BM, BN, BK)
    z, slope = softcap_with_slope(x, inv_temp, softcap, HAS_SOFTCAP)
    labels = tl.load(Y + offs_m, mask=row_mask, other=-1).to(tl.int64)
    m = tl.load(NORM + offs_m, mask=row_mask, other=0.0)
    log_s = tl.load(NORM + stride_norm + offs_m, mask=row_mask, other=0.0)
    g_logp = tl.load(G_LOGP + offs_m, mask=row_mask, other=0.0)
    log_p = (z - m[:, None]) - log_s[:, None]
    p = tl.exp(log_p)
    coef = -g_logp[:, None]
    if HAS_G_LSE:
        coef += tl.load(G_LSE + offs_m, mask=row_mask, other=0.0)[:, None]
    if HAS_G_ENT:
        ent = tl.load(ENT + offs_m, mask=row_mask, other=0.0)
        g_ent = tl.load(G_ENT + offs_m, mask=row_mask, other=0.0)
        coef -= g_ent[:, None] * (log_p + ent[:, None])
    dz = p * coef + tl.where(offs_n[None, :] == labels[:, None], g_logp[:, None], 0.0)
    store_grad_tile(DX, DB_PART, dz * slope, rb, offs_m, row_mask, local_n, col_mask, n_cols,
                    stride_dx, stride_db, WANT_DB)


def backward_config(dtype: torch.dtype, softcap: float | None) -> dict:
    """The dX kernel's blocks: :func:`block_config`'s, at most 128 columns wide with a softcap,
    whose value and slope tiles spill ~2 KB of registers per thread at 128 x 256 (none at
    128 x 128; ``tests/compile_for_gpu.py``). A filtered backward keeps or drops the forward's
    :func:`tile_width` tiles whole, computing each kept one as several of these narrower ones
    (the block-sparse dX kernel at 256 columns with a softcap: 3 KB of spills)."""
    cfg = block_config("backward", dtype)
    return {**cfg, "BN": min(cfg["BN"], 128)} if softcap is not None else cfg


def tile_width(dtype: torch.dtype) -> int:
    """Vocabulary width of the tiles whose per-row log-sum-exps the forward records for
    filtering."""
    return block_config("forward", dtype)["BN"]


class Forward(NamedTuple):
    """Per valid row, fp32 ``[n]``: ``logp``, ``lse``, ``entropy`` (None unless wanted),
    ``norm [2, n]``, the log-sum-exp in two parts ``(M, log S)`` (``lse = M + log S``, M the row's
    largest logit) that the backward takes, and ``log_collision = log Σ_v p_v²`` (None unless
    wanted)."""

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    norm: torch.Tensor
    log_collision: torch.Tensor | None = None


def logprob_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    want_entropy: bool = False,
    want_collision: bool = False,
    tile_lse: torch.Tensor | None = None,
    config: dict | None = None,
    all_rows: bool = False,
) -> Forward:
    """Per valid row ``logp``, ``lse``, ``entropy``, the backward's ``norm`` and
    ``log_collision`` (a :class:`Forward`). ``config``: the
    blocks (default :func:`block_config`), and ``FLATTEN`` to let Triton fuse the tile and K
    loops (with descriptor loads only: with pointer loads it is slower and spills).

    hidden ``[R, d]`` (rows with unit stride), weight ``[V, d]``, bias ``[V]``, labels ``[n]``
    (the labels of the valid rows, in ``[0, V)``), rows ``[n]`` int64 indices into hidden.
    ``tile_lse [cdiv(V, tile_width), ≥ n]`` (fp32, optional) receives ``log Σ_j e^{z_ij}`` over
    each vocabulary tile for every valid row i (in column i): what a filtered backward needs.
    ``all_rows``: rows is every row of hidden in order (hidden then serves as ``hidden[rows]``,
    no gathered copy).
    """
    n, (V, D) = rows.numel(), weight.shape
    if n == 0:  # reachable under torch.compile, which skips the validation
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return Forward(empty, empty, empty if want_entropy else None, empty.view(2, 0),
                       empty if want_collision else None)
    cfg = config or block_config("forward", hidden.dtype)
    if tile_lse is not None and (
            cfg["BN"] != tile_width(hidden.dtype) or tile_lse.stride(1) != 1
            or tile_lse.shape[0] < triton.cdiv(V, cfg["BN"]) or tile_lse.shape[1] < n):
        raise ValueError("tile_lse needs [cdiv(V, tile_width()), >= n] with unit stride along "
                         "rows, and tiles of tile_width() columns")
    h_arg, w_arg, tma = head_operands(hidden, weight, rows, cfg, all_rows)
    n_row_blocks, n_tiles = triton.cdiv(n, cfg["BM"]), triton.cdiv(V, cfg["BN"])
    splits, tiles_per_split = split_vocab(n_row_blocks, n_tiles, hidden.device)
    part = torch.empty((3 + want_entropy + want_collision, splits, n), dtype=torch.float32,
                       device=hidden.device)
    m, s, t, *more = part
    a = more.pop(0) if want_entropy else t
    q = more.pop(0) if want_collision else t
    launch(
        _forward_kernel, (n_row_blocks * splits,),
        h_arg, w_arg, bias if bias is not None else hidden, labels, rows, m, s, a, q, t,
        tile_lse if tile_lse is not None else m,
        n, V, D, hidden.stride(0), weight.stride(0),
        tile_lse.stride(0) if tile_lse is not None else 0, splits, tiles_per_split,
        HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy, WANT_COLLISION=want_collision,
        WANT_TILE_LSE=tile_lse is not None,
        **head_constants(hidden.dtype, temperature, softcap),
        **{**cfg, "TMA": tma, "FLATTEN": bool(cfg.get("FLATTEN")) and tma},
    )
    m_max, s_tot, w = merge_splits(m, s)
    norm = torch.stack((m_max, torch.log(s_tot)))
    logp = (t.sum(dim=0) - norm[0]) - norm[1]
    entropy = (norm[1] - ((a + (m - m_max) * s) * w).sum(dim=0) / s_tot
               if want_entropy else None)
    collision = (torch.log((q * w * w).sum(dim=0)) - 2.0 * norm[1]) if want_collision else None
    return Forward(logp, norm[0] + norm[1], entropy, norm, collision)


def filter_tiles(
    tile_lse: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    g_logp: torch.Tensor,
    g_lse: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    eps: float,
    block_m: int,
    tile_w: int,
) -> torch.Tensor:
    """``keep [cdiv(n, block_m), n_tiles]`` bool: the (row block, tile) pairs a filtered backward
    computes. For row i and tile t, with the tile's softmax mass ``P = Σ_{j in t} p_ij =
    e^{tile_lse − lse}``, ``a = |g_lse − g_logp|`` and ``b = |g_ent|``, the non-label columns
    have

        dz_ij = p_ij·(g_lse − g_logp − g_ent·(log p_ij + H_i)),
        Σ_{j in t} |dz_ij| ≤ r_it = P·(a + b·(H_i − log P + log tile_w)),

    as ``−Σ_{j in t} p_ij log p_ij = P·(−log P + H_t)`` with the entropy H_t ≤ log tile_w of the
    tile's own normalised distribution. Each row drops its tiles in increasing order of r for as
    long as their r add up to at most ``eps·(a + b)``, never the tile of its label; a row block
    keeps the union of its rows' kept tiles. So for every row
    ``Σ_{dropped j} |dz_ij| ≤ eps·(a_i + b_i)`` — the L1 norm of what is dropped, relative to the
    row's gradient scale (a per-entry threshold instead lets many same-sign leftovers add up
    along a shared direction of W: 13% error in dH on a head with a token-frequency prior) —
    and hence ``‖ΔdH_i‖_∞ ≤ eps·(a_i + b_i)/T · max_j ‖W_j‖_∞``. Tiles no row block keeps leave
    their rows of dW and db exactly 0.
    """
    n = labels.numel()
    log_p = log_mass(tile_lse[:, :n], lse[None, :])
    a = (g_lse - g_logp).abs() if g_lse is not None else g_logp.abs()
    b = g_entropy.abs() if g_entropy is not None else torch.zeros_like(a)
    h = entropy if entropy is not None and g_entropy is not None else 0.0
    # r = P·(a + b·(h − log P + log W)) in place: the [n_tiles, n] buffers are the filter's memory
    rate = (h - log_p).add_(math.log(tile_w)).mul_(b).add_(a).mul_(log_p.exp_())
    del log_p
    return drop_within_budget(rate, eps * (a + b), labels // tile_w, block_m)


def logprob_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor,
    norm: torch.Tensor,
    entropy: torch.Tensor | None,
    g_logp: torch.Tensor,
    g_lse: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = False,
    tile_lse: torch.Tensor | None = None,
    filter_eps: float = 0.0,
    max_fraction: float = 0.25,
    chunk_bytes: int = CHUNK_BYTES,
    config: dict | None = None,
    all_rows: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dH [n, d], dW [V, d], db [V])`` (None where not needed; dH of the valid rows,
    in the order of ``rows``) from per-valid-row upstream gradients ``g_logp``, ``g_lse``,
    ``g_entropy`` (fp32 ``[n]``; None = zero), with the forward's ``norm [2, n]`` and
    ``entropy [n]`` (:class:`Forward`). ``chunk_bytes`` bounds the dX chunk buffer;
    ``all_rows`` as for :func:`logprob_forward`.
    With ``tile_lse`` (the forward's) and ``filter_eps > 0``, the tiles :func:`filter_tiles`
    rejects are neither recomputed nor multiplied: what is dropped from each row of dX stays
    within an L1 budget of ``filter_eps`` times the row's gradient scale (see there), so
    ``‖ΔdH_i‖_∞ ≤ filter_eps·(a_i + b_i)/T · max_j ‖W_j‖_∞``. When more than
    ``max_fraction`` of the tiles survive, the dense (exact) path runs instead: the block-sparse
    products only pay when most tiles are skipped (0.25 until the sparse kernels are timed on a
    GPU: even at half the library GEMMs' rate they then win).
    """
    cfg = config or backward_config(hidden.dtype, softcap)
    n, (V, D) = rows.numel(), weight.shape
    if norm.shape != (2, n) or norm.dtype != torch.float32:
        raise ValueError(f"norm must be the forward's fp32 [2, n] = [2, {n}] (M, log S), got "
                         f"{norm.dtype} {tuple(norm.shape)}")
    norm = norm if norm.stride(1) == 1 else norm.contiguous()
    constants = head_constants(hidden.dtype, temperature, softcap)
    zero = norm  # any fp32 tensor: the kernel never reads a pointer whose HAS_* flag is off
    keep = None
    if tile_lse is not None and filter_eps > 0:
        width = tile_width(hidden.dtype)
        ratio, rest = divmod(width, cfg["BN"])
        if rest:
            raise ValueError(f"a filtered backward needs dX tiles of a width dividing "
                             f"tile_width() = {width}, got BN = {cfg['BN']}")
        keep = filter_tiles(tile_lse, labels, norm[0] + norm[1], entropy, g_logp, g_lse,
                            g_entropy, filter_eps, cfg["BM"], width)
        # narrower dX tiles (a softcap's): every part of a kept tile is kept
        keep = keep.repeat_interleave(ratio, dim=1)[:, :triton.cdiv(V, cfg["BN"])]
    h_arg, w_arg, tma = head_operands(hidden, weight, rows, cfg, all_rows)

    def fill(dx: torch.Tensor, db_part: torch.Tensor, start: int, cols: int,
             pairs: torch.Tensor | None = None) -> None:
        launch(
            _grad_logits_kernel, grad_grid(n, cols, cfg, pairs),
            h_arg, w_arg, bias if bias is not None else hidden, labels, rows, norm,
            entropy if entropy is not None else zero, g_logp,
            g_lse if g_lse is not None else zero, g_entropy if g_entropy is not None else zero,
            dx, db_part, pairs if pairs is not None else rows,
            n, V, D, start, cols, hidden.stride(0), weight.stride(0), norm.stride(0),
            dx.stride(0), db_part.stride(0),
            HAS_BIAS=bias is not None, HAS_G_LSE=g_lse is not None,
            HAS_G_ENT=g_entropy is not None, WANT_DB=need_bias, SPARSE=pairs is not None,
            **constants, **{**cfg, "TMA": tma},
        )

    return chunked_head_backward(
        hidden, weight, rows, fill, cfg=cfg, need_hidden=need_hidden, need_weight=need_weight,
        need_bias=need_bias, chunk_bytes=chunk_bytes, keep=keep, max_fraction=max_fraction,
        compact=h_arg.base if tma else None, all_rows=all_rows,
    )
