"""Fused lm_head + log-softmax: per-token log-prob of the label, logsumexp and entropy.

Op 1 of DESIGN.md §3 without the N x V logits. Rows are the *valid* tokens only: the launcher
receives ``rows`` (int64 indices into ``hidden``) so ignored tokens cost no FLOPs.

Forward (:func:`logprob_forward`): a split-vocabulary kernel. Program (row block, split) streams
its contiguous range of vocabulary tiles, computes ``x = H_rows @ W_tile.T (+ b)`` in fp32,
``z = softcap(x) / T`` and keeps an online ``(m, s = Σ e^{z-m}, a = Σ e^{z-m}·z, z[y])`` per row;
a few torch ops merge the splits: ``lse = M + log Σ_k s_k e^{m_k-M}``,
``entropy = lse - Σ_k a_k e^{m_k-M} / Σ_k s_k e^{m_k-M}``. Programs are swizzled in groups of
``GROUP_M`` row blocks x all splits so that the H blocks and W tiles in flight stay in L2.

Backward (:func:`logprob_backward`): per vocabulary chunk, a kernel recomputes the logits tile by
tile and writes ``dX = ∂loss/∂x`` in the input dtype (fp32 math),

    dz_j = g_logp·[j = y] + p_j·(g_lse - g_logp - g_ent·(z_j - lse + entropy)),
    dx_j = dz_j · (1 - (z_j·T/c)²) / T        (softcap c; without it dx = dz / T),

then two library GEMMs finish the chunk: ``dW[chunk] = dXᵀ @ H`` (complete over all rows, no
accumulation across chunks) and ``dH += dX @ W[chunk]`` into an fp32 accumulator. No atomics:
the result is bit-identical run to run. 4 GEMM-equivalents in all (forward, recompute, dH, dW).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logits_tile(
    H, W, B, rows, row_mask, offs_n, col_mask, D, stride_h, stride_w, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, CAST_F32: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """``z = softcap(H[rows] @ W[offs_n].T + b) / T`` for one [BM, BN] tile, fp32."""
    offs_k = tl.arange(0, BK)
    h_ptrs = H + rows[:, None] * stride_h + offs_k[None, :]
    w_ptrs = W + offs_n[:, None] * stride_w + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BK)):
        k_mask = offs_k < D - k * BK
        h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if CAST_F32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
        h_ptrs += BK
        w_ptrs += BK
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        # tanh(u) = 1 - 2 / (e^{2u} + 1): exact limits ±1 when e^{2u} under/overflows.
        acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0))
    return acc * inv_temp


@triton.jit
def _swizzle(pid, n_row_blocks, n_cols, GROUP_M: tl.constexpr):
    """Map a linear program id to (row block, column) so that GROUP_M row blocks share columns."""
    per_group = GROUP_M * n_cols
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(n_row_blocks - first, GROUP_M)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def _forward_kernel(
    H, W, B, Y, ROWS, M_OUT, S_OUT, A_OUT, T_OUT,
    N, V, D, stride_h, stride_w, n_splits, tiles_per_split, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_ENTROPY: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    rb, split = _swizzle(tl.program_id(0), tl.cdiv(N, BM), n_splits, GROUP_M)
    offs_m = rb * BM + tl.arange(0, BM)
    row_mask = offs_m < N
    rows = tl.load(ROWS + offs_m, mask=row_mask, other=0)
    labels = tl.load(Y + offs_m, mask=row_mask, other=-1).to(tl.int64)
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    s_i = tl.zeros((BM,), tl.float32)
    a_i = tl.zeros((BM,), tl.float32)
    t_i = tl.zeros((BM,), tl.float32)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(V, BN))
    for tile in range(first_tile, last_tile):
        offs_n = tl.arange(0, BN).to(tl.int64) + tile * BN
        col_mask = offs_n < V
        z = _logits_tile(H, W, B, rows, row_mask, offs_n, col_mask, D, stride_h, stride_w,
                         inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, CAST_F32, PRECISION, BM, BN, BK)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        scale = tl.exp(m_i - m_new)
        p = tl.exp(z - m_new[:, None])
        s_i = s_i * scale + tl.sum(p, axis=1)
        if WANT_ENTROPY:
            a_i = a_i * scale + tl.sum(p * tl.where(col_mask[None, :], z, 0.0), axis=1)
        t_i += tl.sum(tl.where(offs_n[None, :] == labels[:, None], z, 0.0), axis=1)
        m_i = m_new
    out = split.to(tl.int64) * N + offs_m
    tl.store(M_OUT + out, m_i, mask=row_mask)
    tl.store(S_OUT + out, s_i, mask=row_mask)
    tl.store(T_OUT + out, t_i, mask=row_mask)
    if WANT_ENTROPY:
        tl.store(A_OUT + out, a_i, mask=row_mask)


@triton.jit
def _grad_logits_kernel(
    H, W, B, Y, ROWS, LSE, ENT, G_LOGP, G_LSE, G_ENT, DX, DB_PART,
    N, V, D, col_start, n_cols, stride_h, stride_w, stride_dx, stride_db, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G_LSE: tl.constexpr,
    HAS_G_ENT: tl.constexpr, WANT_DB: tl.constexpr, CAST_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    rb, ct = _swizzle(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(n_cols, BN), GROUP_M)
    offs_m = rb * BM + tl.arange(0, BM)
    row_mask = offs_m < N
    local_n = ct * BN + tl.arange(0, BN)
    offs_n = col_start + local_n.to(tl.int64)
    col_mask = (local_n < n_cols) & (offs_n < V)
    rows = tl.load(ROWS + offs_m, mask=row_mask, other=0)
    z = _logits_tile(H, W, B, rows, row_mask, offs_n, col_mask, D, stride_h, stride_w,
                     inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, CAST_F32, PRECISION, BM, BN, BK)
    labels = tl.load(Y + offs_m, mask=row_mask, other=-1).to(tl.int64)
    lse = tl.load(LSE + offs_m, mask=row_mask, other=0.0)
    g_logp = tl.load(G_LOGP + offs_m, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    coef = -g_logp[:, None]
    if HAS_G_LSE:
        coef += tl.load(G_LSE + offs_m, mask=row_mask, other=0.0)[:, None]
    if HAS_G_ENT:
        ent = tl.load(ENT + offs_m, mask=row_mask, other=0.0)
        g_ent = tl.load(G_ENT + offs_m, mask=row_mask, other=0.0)
        coef -= g_ent[:, None] * (z - lse[:, None] + ent[:, None])
    dz = p * coef + tl.where(offs_n[None, :] == labels[:, None], g_logp[:, None], 0.0)
    if HAS_SOFTCAP:
        t = z / (inv_temp * softcap)
        dz = dz * (1.0 - t * t)
    dx = dz * inv_temp
    dx = tl.where(row_mask[:, None] & col_mask[None, :], dx, 0.0)
    dx_ptrs = DX + offs_m.to(tl.int64)[:, None] * stride_dx + local_n[None, :]
    tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
    if WANT_DB:
        tl.store(DB_PART + rb.to(tl.int64) * stride_db + local_n, tl.sum(dx, axis=0),
                 mask=local_n < n_cols)


def _config(kind: str, dtype: torch.dtype) -> dict:
    if _INTERPRET:
        return {"BM": 32, "BN": 64, "BK": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    wide = dtype == torch.float32
    if kind == "forward":
        return {"BM": 128, "BN": 128 if wide else 256, "BK": 32 if wide else 64, "GROUP_M": 16,
                "num_warps": 8, "num_stages": 3}
    return {"BM": 128, "BN": 128, "BK": 32 if wide else 64, "GROUP_M": 8,
            "num_warps": 8, "num_stages": 3}


def _launch_options(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("num_warps", "num_stages")}


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting (ieee unless tf32 is allowed)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _common(hidden: torch.Tensor, weight: torch.Tensor, temperature: float,
            softcap: float | None) -> dict:
    return {
        "HAS_SOFTCAP": softcap is not None,
        "CAST_F32": _INTERPRET and hidden.dtype == torch.bfloat16,
        "PRECISION": _precision(hidden.dtype),
        "inv_temp": 1.0 / temperature,
        "softcap": softcap if softcap is not None else 1.0,
    }


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    return 4 * _num_sms(device.index or 0) if device.type == "cuda" else 8


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
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per valid row ``(logp, lse, entropy or None)``, fp32, each ``[n]``.

    hidden ``[N_all, d]`` (rows with unit stride), weight ``[V, d]``, bias ``[V]``, labels ``[n]``
    (the labels of the valid rows, in ``[0, V)``), rows ``[n]`` int64 indices into hidden.
    """
    n, (V, D) = rows.numel(), weight.shape
    cfg = config or _config("forward", hidden.dtype)
    n_row_blocks, n_tiles = triton.cdiv(n, cfg["BM"]), triton.cdiv(V, cfg["BN"])
    splits = min(n_tiles, max(1, triton.cdiv(_target_programs(hidden.device), n_row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    part = torch.empty((4 if want_entropy else 3, splits, n), dtype=torch.float32,
                       device=hidden.device)
    m, s, t = part[0], part[1], part[2]
    a = part[3] if want_entropy else t
    _forward_kernel[(n_row_blocks * splits,)](
        hidden, weight, bias if bias is not None else hidden, labels, rows, m, s, a, t,
        n, V, D, hidden.stride(0), weight.stride(0), splits, tiles_per_split,
        HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"],
        **_common(hidden, weight, temperature, softcap), **_launch_options(cfg),
    )
    m_max = m.max(dim=0).values
    w = torch.exp(m - m_max)
    s_tot = (s * w).sum(dim=0)
    lse = m_max + torch.log(s_tot)
    logp = t.sum(dim=0) - lse
    entropy = lse - (a * w).sum(dim=0) / s_tot if want_entropy else None
    return logp, lse, entropy


def _mm_accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 ``acc``, low-precision ``a``/``b`` read once."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def logprob_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor,
    lse: torch.Tensor,
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
    chunk_bytes: int = 256 << 20,
    config: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dH [N_all, d], dW [V, d], db [V])`` (None where not needed) from per-valid-row
    upstream gradients ``g_logp``, ``g_lse``, ``g_entropy`` (fp32 ``[n]``; None = zero).

    Rows of dH that are not in ``rows`` are zero. ``chunk_bytes`` bounds the dX chunk buffer.
    """
    n, (V, D) = rows.numel(), weight.shape
    cfg = config or _config("backward", hidden.dtype)
    dtype = hidden.dtype
    h_rows = hidden.index_select(0, rows) if need_weight else None
    dh_acc = torch.zeros((n, D), dtype=torch.float32, device=hidden.device) if need_hidden else None
    dw = torch.empty_like(weight) if need_weight else None
    db = torch.empty(V, dtype=torch.float32, device=hidden.device) if need_bias else None
    chunk = max(cfg["BN"], chunk_bytes // max(1, n * dtype.itemsize) // cfg["BN"] * cfg["BN"])
    chunk = min(chunk, triton.cdiv(V, cfg["BN"]) * cfg["BN"])
    dx = torch.empty((n, chunk), dtype=dtype, device=hidden.device)
    n_row_blocks = triton.cdiv(n, cfg["BM"])
    db_part = (torch.empty((n_row_blocks, chunk), dtype=torch.float32, device=hidden.device)
               if need_bias else lse)
    common = _common(hidden, weight, temperature, softcap)
    for start in range(0, V, chunk):
        cols = min(chunk, V - start)
        grid = (n_row_blocks * triton.cdiv(cols, cfg["BN"]),)
        _grad_logits_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, labels, rows, lse,
            entropy if entropy is not None else lse, g_logp,
            g_lse if g_lse is not None else lse, g_entropy if g_entropy is not None else lse,
            dx, db_part, n, V, D, start, cols, hidden.stride(0), weight.stride(0), dx.stride(0),
            db_part.stride(0),
            HAS_BIAS=bias is not None, HAS_G_LSE=g_lse is not None,
            HAS_G_ENT=g_entropy is not None, WANT_DB=need_bias,
            BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"],
            **common, **_launch_options(cfg),
        )
        dx_c = dx[:, :cols]
        if need_weight:
            torch.mm(dx_c.T, h_rows, out=dw[start:start + cols])
        if need_hidden:
            _mm_accumulate(dh_acc, dx_c, weight[start:start + cols])
        if need_bias:
            db[start:start + cols] = db_part[:, :cols].sum(dim=0)
    dh = None
    if need_hidden:
        dh = torch.zeros_like(hidden)
        dh.index_copy_(0, rows, dh_acc.to(dtype))
    return dh, dw, db
