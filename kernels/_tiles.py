"""Pieces shared by the fused-head kernel families (one family per file beside this one).

A *head* is ``z = softcap(H @ W.T + b) / T``. Every family tiles it the same way: programs own
``[BM, BN]`` logits tiles computed in fp32 by :func:`logits_tile`, are swizzled in groups of
``GROUP_M`` row blocks (:func:`swizzle`) so the H blocks and W tiles in flight stay in L2, and
their backward writes ``dX = ∂loss/∂(H @ W.T + b)`` chunk by chunk for two library GEMMs
(:func:`chunked_head_backward`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# The interpreter has no libdevice: there, these are plain-arithmetic twins.
if INTERPRET:

    @triton.jit
    def expm1_small(x):
        """``e^x - 1`` for |x| ≤ 1/2 by its Taylor series to x⁹/9! (truncation < 1e-9 relative;
        mul/add only)."""
        em1 = x * (1.0 / 9.0) + 1.0
        for i in tl.static_range(7):
            em1 = em1 * x * (1.0 / (8 - i)) + 1.0
        return em1 * x

    @triton.jit
    def fast_log(x):
        """``log x``."""
        return tl.log(x)

    @triton.jit
    def mul_rn(x, y):
        """``x·y`` rounded (numpy fuses nothing)."""
        return x * y

else:

    @triton.jit
    def expm1_small(x):
        """``e^x - 1`` for |x| ≤ 1/2: libdevice's ``expm1f`` (within 1 ulp). One call per
        element keeps a tile's registers free, where the unrolled series holds several whole
        tiles live (spills: ``tests/compile_for_gpu.py``)."""
        return libdevice.expm1(x)

    @triton.jit
    def fast_log(x):
        """``log x`` by libdevice's ``fast_logf`` (the hardware log2, subnormals flushed to 0):
        ``tl.log``'s subnormal handling cost a forward ~220 B of register spills."""
        return libdevice.fast_logf(x)

    @triton.jit
    def mul_rn(x, y):
        """``x·y`` rounded to fp32 (``mul.rn``), never fused into an FMA with what follows: the
        logits a backward recomputes are then the forward's bit for bit, where ``x·y - m``
        contracted to ``fma(x, y, -m)`` in one pass and not the other left the largest logit's
        ``z - m`` at the product's rounding error instead of 0."""
        return libdevice.mul_rn(x, y)


@triton.jit
def logits_tile(
    H, W, B, rows, row_mask, row0, offs_n, col_mask, col0, D, stride_h, stride_w, inv_temp,
    softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, CAST_F32: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr,
):
    """``z = softcap(H[rows] @ W[offs_n].T + b) / T`` for one [BM, BN] tile, fp32.

    With ``TMA``, H and W are tensor descriptors (blocks ``[BM, BK]`` and ``[BN, BK]``) over the
    valid rows, compacted, and the weight: the tile is rows ``row0..`` by columns ``col0..``,
    zero-filled past either edge, and the copy engine computes the addresses. Otherwise H and W
    are pointers, gathered through ``rows`` and ``offs_n``.
    """
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if TMA:
        for k in range(0, tl.cdiv(D, BK)):
            h, w = tma_blocks(H, W, row0, col0, k, CAST_F32, BK)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    else:
        offs_k = tl.arange(0, BK)
        h_ptrs = H + rows[:, None] * stride_h + offs_k[None, :]
        w_ptrs = W + offs_n[:, None] * stride_w + offs_k[None, :]
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
    return head_transform(acc, B, offs_n, col_mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def tma_blocks(H, W, row0, col0, k, CAST_F32: tl.constexpr, BK: tl.constexpr):
    """The k-th d-blocks ``H[row0.., k·BK..]`` and ``W[col0.., k·BK..]`` through descriptors
    (zero past the edges), cast to fp32 with ``CAST_F32``."""
    h = H.load([row0, k * BK])
    w = W.load([col0, k * BK])
    if CAST_F32:
        h = h.to(tl.float32)
        w = w.to(tl.float32)
    return h, w


@triton.jit
def head_transform(acc, B, offs_n, col_mask, inv_temp, softcap, HAS_BIAS: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr):
    """``softcap(acc + b) / T`` of a tile of products ``acc = H @ W.T``."""
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap_tanh(acc, softcap)
    return mul_rn(acc, inv_temp)


@triton.jit
def _tanh_parts(x, softcap):
    """``(e, r)`` with ``e = e^{-2|x|/c}`` and ``r = 1/(1 + e)``: ``tanh(|x|/c) = (1 - e)·r``
    and ``sech²(x/c) = 4e·r²``. e never overflows, and both are exact in the limits."""
    e = tl.exp(-2.0 * tl.abs(x) / softcap)
    return e, 1.0 / (1.0 + e)


@triton.jit
def softcap_tanh(x, softcap):
    """``c·tanh(x/c)``."""
    e, r = _tanh_parts(x, softcap)
    t = (1.0 - e) * r
    return tl.where(x < 0, -t, t) * softcap


@triton.jit
def softcap_with_slope(x, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    """``(z, ∂z/∂x)`` of ``z = c·tanh(x/c) / T`` from the raw logit ``x``: z bit for bit as the
    forward computes it, and the slope ``sech²(x/c) / T = 4e/(1+e)² / T`` from the same
    ``e = e^{-2|x|/c}`` (:func:`_tanh_parts`), accurate where tanh saturates (``1 - tanh²``
    would cancel to 0). Without a softcap: ``(x / T, 1 / T)``."""
    if HAS_SOFTCAP:
        z = mul_rn(softcap_tanh(x, softcap), inv_temp)
        e, r = _tanh_parts(x, softcap)
        slope = 4.0 * e * r * r * inv_temp
    else:
        z = mul_rn(x, inv_temp)
        slope = tl.zeros_like(x) + inv_temp
    return z, slope


@triton.jit
def swizzle(pid, n_row_blocks, n_cols, GROUP_M: tl.constexpr):
    """Map a linear program id to (row block, column) so that GROUP_M row blocks share columns."""
    per_group = GROUP_M * n_cols
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(n_row_blocks - first, GROUP_M)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def grad_tile(PAIRS, col_start, N, n_cols, SPARSE: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, GROUP_M: tl.constexpr):
    """The (row block, chunk-local column tile) of a dX program: the kept pair ``PAIRS`` names
    (``SPARSE``, a filtered backward; see :func:`grad_grid`), else the swizzled dense one."""
    if SPARSE:
        rb = tl.load(PAIRS + 2 * tl.program_id(0))
        ct = tl.load(PAIRS + 2 * tl.program_id(0) + 1) - col_start // BN
    else:
        rb, ct = swizzle(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(n_cols, BN), GROUP_M)
    return rb, ct


@triton.jit
def store_grad_tile(
    DX, DB_PART, dx, rb, offs_m, row_mask, local_n, col_mask, n_cols, stride_dx, stride_db,
    WANT_DB: tl.constexpr,
):
    """Store one ``[BM, BN]`` tile of dX (input dtype) and, with ``WANT_DB``, its column sums."""
    dx = tl.where(row_mask[:, None] & col_mask[None, :], dx, 0.0)
    dx_ptrs = DX + offs_m.to(tl.int64)[:, None] * stride_dx + local_n[None, :]
    tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
    if WANT_DB:
        tl.store(DB_PART + rb.to(tl.int64) * stride_db + local_n, tl.sum(dx, axis=0),
                 mask=local_n < n_cols)


def block_config(kind: str, dtype: torch.dtype) -> dict:
    """Block sizes and launch options (kernel keyword arguments) for ``forward``/``backward``.
    ``TMA``: load through tensor descriptors (:func:`head_operands`), see :func:`tma_default`.
    ``FLATTEN`` (forwards): the compiler fuses the vocabulary-tile loop with the K loop, so the
    next tile's loads overlap this tile's softmax. The launchers apply it with descriptor loads
    only, whatever a config asks (H100, bf16, log-prob forward kernel, runs 4-8: 12.08-12.41 ms
    flattened against 12.46-12.61 ms; with pointer loads it lost, 16.77 vs 16.16 ms on an H200
    in run 2, and spills: fp32 3 KB)."""
    tma = tma_default()
    if INTERPRET:
        return {"BM": 32, "BN": 64, "BK": 32, "GROUP_M": 4, "TMA": tma,
                **({"FLATTEN": tma} if kind == "forward" else {}), "num_warps": 4,
                "num_stages": 1}
    wide = dtype == torch.float32
    if kind == "forward":
        return {"BM": 128, "BN": 128 if wide else 256, "BK": 32 if wide else 64, "GROUP_M": 16,
                "TMA": tma, "FLATTEN": tma, "num_warps": 8, "num_stages": 3}
    return {"BM": 128, "BN": 128 if wide else 256, "BK": 32 if wide else 64,
            "GROUP_M": 8 if wide else 16, "TMA": tma, "num_warps": 8, "num_stages": 3}


def tma_default() -> bool:
    """Descriptor loads: ``HYPO_FAST_TMA=1`` or ``0`` forces them on or off; otherwise on for a
    data-centre Hopper or Blackwell current CUDA device (H100, bf16, 8192 of 16384 tokens valid,
    Llama-3 head: forward kernel 16.4 -> 12.5 ms, backward 41.1 -> 38.9 ms;
    benchmarks/RESULTS.md, run 4), off in the interpreter and on other cards (the consumer
    Blackwell parts, sm_12x, have half the shared memory the pipelined blocks take)."""
    forced = os.environ.get("HYPO_FAST_TMA")
    if forced in ("0", "1"):
        return forced == "1"
    return (not INTERPRET and torch.cuda.is_available()
            and _datacenter_tma(torch.cuda.current_device()))


@functools.cache
def _datacenter_tma(device: int) -> bool:
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def tma_eligible(weight: torch.Tensor, rows: torch.Tensor, cfg: dict) -> bool:
    """Whether ``cfg`` asks for descriptor loads and they can serve this head: some rows, 16-bit
    inputs (fp32 runs FMA dots, which compile to far more spills through descriptors), and a
    weight the copy engine can read: unit stride along d, a 16-byte aligned base and row
    stride, and 16-byte rows (also those of the compacted hidden states)."""
    size = weight.element_size()
    return (bool(cfg.get("TMA")) and rows.numel() > 0 and size == 2 and weight.stride(1) == 1
            and weight.data_ptr() % 16 == 0 and weight.stride(0) * size % 16 == 0
            and weight.shape[1] * size % 16 == 0)


def head_operands(
    hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cfg: dict,
    all_rows: bool = False,
) -> tuple[object, object, bool]:
    """``(H, W, tma)``, the operands a kernel's ``logits_tile`` reads: descriptors over
    ``hidden[rows]`` (a compacted ``[n, d]`` copy, or hidden itself when ``all_rows``: rows is
    every row in order) and ``weight`` when :func:`tma_eligible`, ``tma`` True; otherwise
    ``hidden`` and ``weight`` themselves, gathered through ``rows``."""
    if all_rows and rows.numel() != hidden.shape[0]:
        raise ValueError(f"all_rows: rows must be every row of hidden in order, got "
                         f"{rows.numel()} of {hidden.shape[0]}")
    if not tma_eligible(weight, rows, cfg):
        return hidden, weight, False
    return (TensorDescriptor.from_tensor(gather_rows(hidden, rows, all_rows),
                                         [cfg["BM"], cfg["BK"]]),
            TensorDescriptor.from_tensor(weight, [cfg["BN"], cfg["BK"]]), True)


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor, all_rows: bool) -> torch.Tensor:
    """``hidden[rows]`` as a contiguous ``[n, d]`` tensor with a 16-byte aligned base (what a
    descriptor needs): hidden itself when ``all_rows`` (rows is every row in order) and it is
    both, else a gathered copy (e.g. one row of a wider buffer: contiguous, yet its base may
    sit mid-way through 16 bytes)."""
    if all_rows and hidden.is_contiguous() and hidden.data_ptr() % 16 == 0:
        return hidden
    return hidden.index_select(0, rows)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting (ieee unless tf32 is allowed)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def head_constants(dtype: torch.dtype, temperature: float, softcap: float | None) -> dict:
    """The kernel arguments that describe the head's transform and the dot precision."""
    return {
        "HAS_SOFTCAP": softcap is not None,
        # Triton's interpreter computes bf16 dots wrong (DESIGN.md §6): cast to fp32 there.
        "CAST_F32": INTERPRET and dtype == torch.bfloat16,
        "PRECISION": dot_precision(dtype),
        "inv_temp": 1.0 / temperature,
        "softcap": softcap if softcap is not None else 1.0,
    }


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_vocab(n_row_blocks: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """``(splits, tiles_per_split)`` for a split-vocabulary forward over ``n_row_blocks`` x
    ``n_tiles`` tiles: on CUDA :func:`best_split` for the device's multiprocessor count; in the
    interpreter enough splits for 8 programs."""
    if device.type != "cuda":
        splits = min(n_tiles, max(1, _ceil_div(8, n_row_blocks)))
        tiles = _ceil_div(n_tiles, splits)
        return _ceil_div(n_tiles, tiles), tiles
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return best_split(n_row_blocks, n_tiles, sms)


@functools.lru_cache(maxsize=4096)
def best_split(n_row_blocks: int, n_tiles: int, sms: int) -> tuple[int, int]:
    """The split count minimising ``waves x tiles_per_split`` (the time if one program per
    multiprocessor runs at a time; the fewest tiles per split among equals), with up to 8
    tiles per program where there is work enough (at least two waves), so per-program
    prologues and partials stay negligible. Host integers throughout: with ``triton.cdiv``
    (microseconds a call) this search took 2.4 ms of host time per forward at V = 128256."""
    min_tiles = max(1, min(8, n_row_blocks * n_tiles // (2 * sms), n_tiles))
    best = None
    for tiles in range(min_tiles, n_tiles + 1):
        splits = _ceil_div(n_tiles, tiles)
        cost = _ceil_div(n_row_blocks * splits, sms) * tiles
        if best is None or cost < best[0]:
            best = (cost, splits, tiles)
    return best[1], best[2]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def merge_splits(
    m: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M, S, w)`` of split partials ``m, s [splits, n]``: ``M = max_k m_k``,
    ``w_k = e^{m_k - M}`` and ``S = Σ_k w_k s_k``, so ``lse = M + log S``."""
    m_max = m.max(dim=0).values
    w = torch.exp(m - m_max)
    return m_max, (s * w).sum(dim=0), w


def mm_accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 ``acc``, low-precision ``a``/``b`` read once."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with as many of ``kwargs["num_stages"]`` pipeline
    stages as the current device's shared memory holds: the default blocks take ~147 KB at 3
    stages, which data-centre cards have (A100 164 KB, H100 227 KB) and others (sm_86/89/120:
    ~99 KB) do not. The stage count that fits is remembered per kernel, device, argument dtypes
    and constants."""
    device = -1 if INTERPRET or not torch.cuda.is_available() else torch.cuda.current_device()
    dtypes = tuple(getattr(a, "dtype", None) or getattr(getattr(a, "base", None), "dtype", None)
                   for a in args)  # tensors and tensor descriptors
    key = (kernel, device, dtypes, *sorted((k, v) for k, v in kwargs.items()
                                           if (k.isupper() or k.startswith("num_"))
                                           and isinstance(v, (bool, int, str))))
    stages = _FITTING_STAGES.get(key, kwargs.get("num_stages", 3))
    while True:
        try:
            kernel[grid](*args, **{**kwargs, "num_stages": stages})
        except OutOfResources as exc:
            if stages <= 1 or "shared memory" not in str(exc):
                raise
            stages -= 1
            continue
        _FITTING_STAGES[key] = stages
        return


_FITTING_STAGES: dict[tuple, int] = {}


SPARSE_BD = 64  # the d-block of the block-sparse dH/dW kernels
# their launch options: with 4 warps ptxas spills ~1 KB per thread of the [BN, BD] fp32
# accumulator and the dX tile (16-bit inputs); with 8 none (tests/compile_for_gpu.py)
SPARSE_LAUNCH = {"num_warps": 8, "num_stages": 3}
# The dX chunk buffer of a backward. 256 MiB ran as fast as 1 GiB, 64 MiB 16% slower (H200, run
# 2); 128 MiB ran 9-16% slower than 192 MiB (H100, 8192 valid rows, runs 7-8). The peaks measured
# up to run 9 (383 MiB above inputs and grads at 8192 valid rows, 512 at 16384) also held a view
# of the last chunk past the loop and autograd's zeros for the forward's tile_lse; neither is
# there any more (benchmarks/RESULTS.md, "Memory accounting, session 6").
CHUNK_BYTES = 192 << 20
# The chunk and the fp32 dH accumulator (4·d bytes per row) share WORK_BYTES, the chunk taking
# at least MIN_CHUNK_BYTES: at 16384 valid rows the accumulator alone is 256 MiB; the peak above
# inputs and grads is then predicted at 287 MiB (351 with a 192 MiB chunk), 415 MiB with a causal
# LM's shifted hidden states (their compacted copy): 1.3% and 1.8% of the naive path's.
WORK_BYTES = 320 << 20
MIN_CHUNK_BYTES = 128 << 20


@triton.jit
def _sparse_dw_kernel(
    DX, H, ROWS, DW, TILE_PTR, TILE_RB, n, D, tile0, stride_dx, stride_h, stride_dw, V,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    """``dW[tile, d block] = Σ_{kept row blocks rb} dX[rb, tile]ᵀ @ H[rows of rb, d block]``."""
    t_local = tl.program_id(0)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_mask = offs_d < D
    local_n = t_local * BN + tl.arange(0, BN)
    offs_n = (tile0 + t_local).to(tl.int64) * BN + tl.arange(0, BN)
    start = tl.load(TILE_PTR + tile0 + t_local)
    end = tl.load(TILE_PTR + tile0 + t_local + 1)
    acc = tl.zeros((BN, BD), dtype=tl.float32)
    for k in range(start, end):
        offs_m = tl.load(TILE_RB + k) * BM + tl.arange(0, BM)
        m_mask = offs_m < n
        rows = tl.load(ROWS + offs_m, mask=m_mask, other=0)
        dx = tl.load(DX + offs_m.to(tl.int64)[:, None] * stride_dx + local_n[None, :],
                     mask=m_mask[:, None] & (offs_n < V)[None, :], other=0.0)
        h = tl.load(H + rows[:, None] * stride_h + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if CAST_F32:
            dx = dx.to(tl.float32)
            h = h.to(tl.float32)
        acc = tl.dot(tl.trans(dx), h, acc, input_precision=PRECISION)
    tl.store(DW + offs_n[:, None] * stride_dw + offs_d[None, :], acc.to(DW.dtype.element_ty),
             mask=(offs_n < V)[:, None] & d_mask[None, :])


@triton.jit
def _sparse_dh_kernel(
    DX, W, DH, SEG_PTR, SEG_LEN, ROW_TILE, n, D, tile0, stride_dx, stride_w, stride_dh,
    stride_seg, V,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    """``dH[rows of rb, d block] += Σ_{kept tiles t of the chunk} dX[rb, t] @ W[t, d block]``,
    fp32, each output block owned by one program (no atomics)."""
    rb = tl.program_id(0)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_mask = offs_d < D
    offs_m = rb * BM + tl.arange(0, BM)
    m_mask = offs_m < n
    start = tl.load(SEG_PTR + rb * stride_seg)
    count = tl.load(SEG_LEN + rb * stride_seg)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for k in range(start, start + count):
        t = tl.load(ROW_TILE + k)
        local_n = (t - tile0) * BN + tl.arange(0, BN)
        offs_n = t.to(tl.int64) * BN + tl.arange(0, BN)
        # Columns past V were never written: mask them, or garbage · 0 could give NaN.
        dx = tl.load(DX + offs_m.to(tl.int64)[:, None] * stride_dx + local_n[None, :],
                     mask=m_mask[:, None] & (offs_n < V)[None, :], other=0.0)
        w = tl.load(W + offs_n[:, None] * stride_w + offs_d[None, :],
                    mask=(offs_n < V)[:, None] & d_mask[None, :], other=0.0)
        if CAST_F32:
            dx = dx.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dx, w, acc, input_precision=PRECISION)
    ptrs = DH + offs_m.to(tl.int64)[:, None] * stride_dh + offs_d[None, :]
    mask = m_mask[:, None] & d_mask[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


def log_mass(tile_lse: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """An upper bound on ``log P = tile_lse − lse``, the log of a tile's softmax mass: both are
    fp32 roundings of O(|lse|) values, so 2⁻²¹·(|tile_lse| + |lse|) (4 ulps) is added; floored at
    -1e4 where the mass underflowed (-inf), so that P = 0 and P·log P stays 0."""
    slack = tile_lse.abs().nan_to_num_(posinf=0.0).add_(lse.abs()).mul_(2.0**-21)
    log_m = tile_lse - lse
    return log_m.add_(slack).clamp_min_(-1.0e4)


def grad_grid(n: int, cols: int, cfg: dict, pairs: torch.Tensor | None) -> tuple[int]:
    """A dX kernel's grid over one chunk of ``cols`` columns: one program per (row block, column
    tile), or per kept pair of ``pairs [k, 2]``."""
    if pairs is None:
        return (triton.cdiv(n, cfg["BM"]) * triton.cdiv(cols, cfg["BN"]),)
    return (pairs.shape[0],)


def drop_within_budget(
    rate: torch.Tensor, budget: torch.Tensor, label_tiles: torch.Tensor | None, block_m: int
) -> torch.Tensor:
    """``keep [cdiv(n, block_m), n_tiles]`` bool from ``rate [n_tiles, n]``, a bound on what each
    (tile, row) carries: each row drops its tiles in increasing order of rate while their sum
    stays within ``budget [n]`` (less 1e-5 of it: the fp32 running sum's rounding), never its
    ``label_tiles [n]`` tile (None: none); a row block keeps the union of its rows' tiles. A row
    whose budget or bounds are not finite (a NaN or inf upstream gradient) drops nothing.
    ``rate`` is the caller's scratch: its label entries are overwritten. Beside it, the sort's
    values and int64 indices are the [n_tiles, n] buffers this takes (three rates' worth)."""
    n_tiles, n = rate.shape
    if label_tiles is not None:
        rate[label_tiles.long(), torch.arange(n, device=rate.device)] = math.inf
    ordered, order = rate.sort(dim=0)
    budget = torch.where(torch.isfinite(budget), budget, 0.0)
    dropped = ordered.cumsum_(dim=0) <= budget * (1.0 - 1.0e-5)  # NaN sums are kept
    del ordered
    keep = torch.empty_like(dropped).scatter_(0, order, ~dropped)
    n_rb = triton.cdiv(n, block_m)
    padded = torch.zeros((n_tiles, n_rb * block_m), dtype=torch.bool, device=keep.device)
    padded[:, :n] = keep
    return padded.view(n_tiles, n_rb, block_m).any(dim=2).T.contiguous()


class TileSet:
    """The kept ``(row block, vocabulary tile)`` pairs of a filtered backward, indexed both ways.

    ``keep [n_rb, n_tiles]`` bool. ``by_tile``: pairs sorted by tile, ``tile_ptr [n_tiles + 1]``
    (on the host too, to cut them into chunks); ``by_rb``: the tiles of each row block in order,
    with ``seg_ptr``/``seg_len [n_rb, n_chunks]`` the segment of each row block in each chunk.
    """

    def __init__(self, keep: torch.Tensor, tiles_per_chunk: int) -> None:
        n_rb, n_tiles = keep.shape
        self.pairs = keep.T.nonzero().flip(1).to(torch.int32).contiguous()  # sorted by tile
        self.pair_rb = self.pairs[:, 0].contiguous()
        counts = keep.sum(0)
        self.tile_ptr = torch.zeros(n_tiles + 1, dtype=torch.int32, device=keep.device)
        self.tile_ptr[1:] = counts.cumsum(0)
        self.tile_ptr_host = self.tile_ptr.tolist()
        self.row_tile = keep.nonzero()[:, 1].to(torch.int32)  # tiles, sorted by row block
        n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
        padded = torch.zeros((n_rb, n_chunks * tiles_per_chunk), dtype=torch.int32,
                             device=keep.device)
        padded[:, :n_tiles] = keep
        self.seg_len = padded.view(n_rb, n_chunks, tiles_per_chunk).sum(2, dtype=torch.int32)
        flat = self.seg_len.reshape(-1).cumsum(0, dtype=torch.int32) - self.seg_len.reshape(-1)
        self.seg_ptr = flat.view(n_rb, n_chunks).contiguous()


def _chunk_gemms(dx: torch.Tensor, h_rows: torch.Tensor | None, weight: torch.Tensor,
                 dw: torch.Tensor | None, dh_acc: torch.Tensor | None) -> None:
    """One chunk's library GEMMs: ``dw = dxᵀ @ h_rows`` (when dw is given) and ``dh_acc += dx @
    weight`` (when dh_acc is)."""
    if dw is not None:
        torch.mm(dx.T, h_rows, out=dw)
    if dh_acc is not None:
        mm_accumulate(dh_acc, dx, weight)


def chunked_head_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    fill: Callable[..., None],
    *,
    cfg: dict,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    chunk_bytes: int,
    keep: torch.Tensor | None = None,
    max_fraction: float = 1.0,
    compact: torch.Tensor | None = None,
    all_rows: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dH [n, d], dW [V, d], db [V] fp32)`` of one head, None where not needed (dH of the
    rows ``rows``, in their order).

    For each vocabulary chunk ``[start, start + cols)``, ``fill(dx, db_part, start, cols)``
    writes ``dX[:, :cols]`` (``[n, chunk]``, input dtype) and, when ``need_bias``, the per-row-block
    column sums ``db_part [cdiv(n, BM), chunk]`` (fp32); then ``dW[chunk] = dXᵀ @ H[rows]``
    (complete, no accumulation) and ``dH[rows] += dX @ W[chunk]`` in fp32. No atomics: results
    are bit-identical run to run. ``chunk_bytes`` bounds the dX buffer, and so does what the fp32
    dH accumulator leaves of ``WORK_BYTES`` (but not below ``MIN_CHUNK_BYTES``).

    With ``keep [cdiv(n, BM), cdiv(V, BN)]`` (a filtered backward) and at most ``max_fraction``
    of it True, only the kept ``[BM, BN]`` tiles exist: ``fill(dx, db_part, start, cols, pairs)``
    writes just the tiles in ``pairs [k, 2]`` (row block, tile) and two block-sparse kernels
    replace the library GEMMs, skipping the others. ``compact``: ``hidden[rows]`` if the caller
    already made it; ``all_rows``: rows is every row in order (:func:`gather_rows`).
    """
    n, (V, D) = rows.numel(), weight.shape
    dtype, device = hidden.dtype, hidden.device
    bm, bn = cfg["BM"], cfg["BN"]
    if need_hidden:
        chunk_bytes = min(chunk_bytes, max(MIN_CHUNK_BYTES, WORK_BYTES - 4 * n * D))
    chunk = max(1, chunk_bytes // max(1, n * dtype.itemsize) // bn) * bn
    chunk = min(chunk, triton.cdiv(V, bn) * bn)
    sparse = keep is not None and float(keep.float().mean()) <= max_fraction
    tiles = TileSet(keep, chunk // bn) if sparse else None
    h_rows = None
    if need_weight and not sparse:
        h_rows = compact if compact is not None else gather_rows(hidden, rows, all_rows)
    dh_acc = torch.zeros((n, D), dtype=torch.float32, device=device) if need_hidden else None
    dw = torch.empty_like(weight) if need_weight else None
    db = torch.empty(V, dtype=torch.float32, device=device) if need_bias else None
    dx = torch.empty((n, chunk), dtype=dtype, device=device)
    db_part = torch.empty((triton.cdiv(n, bm) if need_bias else 1, chunk),
                          dtype=torch.float32, device=device)
    dots = head_constants(dtype, 1.0, None)
    consts = {"CAST_F32": dots["CAST_F32"], "PRECISION": dots["PRECISION"], "BM": bm, "BN": bn,
              "BD": SPARSE_BD}
    for chunk_index, start in enumerate(range(0, V, chunk)):
        cols = min(chunk, V - start)
        if not sparse:
            fill(dx, db_part, start, cols)
            _chunk_gemms(dx[:, :cols], h_rows, weight[start:start + cols],
                         dw[start:start + cols] if need_weight else None, dh_acc)
        else:
            tile0, n_tiles = start // bn, triton.cdiv(cols, bn)
            lo, hi = tiles.tile_ptr_host[tile0], tiles.tile_ptr_host[tile0 + n_tiles]
            if need_bias:
                db_part.zero_()
            if hi > lo:
                fill(dx, db_part, start, cols, tiles.pairs[lo:hi])
            d_blocks = triton.cdiv(D, consts["BD"])
            if need_weight:
                launch(
                    _sparse_dw_kernel, (n_tiles, d_blocks),
                    dx, hidden, rows, dw, tiles.tile_ptr, tiles.pair_rb, n, D, tile0,
                    dx.stride(0), hidden.stride(0), dw.stride(0), V, **consts, **SPARSE_LAUNCH)
            if need_hidden:
                launch(
                    _sparse_dh_kernel, (triton.cdiv(n, bm), d_blocks),
                    dx, weight, dh_acc, tiles.seg_ptr[:, chunk_index],
                    tiles.seg_len[:, chunk_index], tiles.row_tile, n, D, tile0, dx.stride(0),
                    weight.stride(0), dh_acc.stride(0), tiles.seg_ptr.stride(0), V, **consts,
                    **SPARSE_LAUNCH)
        if need_bias:
            db[start:start + cols] = db_part[:, :cols].sum(dim=0)
    # The chunk buffers go before dH is rounded (no view of them outlives the loop body): the
    # peak stays that of the loop.
    del dx, db_part, h_rows, tiles
    return dh_acc.to(dtype) if need_hidden else None, dw, db
