"""Compile every Triton kernel for an sm_90 target without a GPU (run as a script, without
TRITON_INTERPRET): catches what only the GPU compiler rejects (the interpreter accepts more,
e.g. an fp64 dot into an fp32 accumulator), and prints each kernel's resource report from
``ptxas -v`` (registers per thread, spill stores/loads in bytes) at its default blocks.

The kernels as the benchmarks run them (16-bit inputs; no bias, softcap or entropy) must also
stay within a budget of spilled registers, and no kernel may fuse the temperature's product into
an FMA (a backward's recomputed logits would then differ from the forward's).

Arguments get the specialisation Triton's launcher gives a real call at the benchmark shapes:
pointers 16-byte aligned, ``D``/``DR`` and strides multiples of 16. Without it the loads are
not vectorised and the K loops are not software-pipelined, and the report would describe a
kernel that never runs. Exits 1 on any failure.

    python tests/compile_for_gpu.py bf16|fp16|fp32 [--tma]

``--tma``: the head kernels with descriptor loads (``HYPO_FAST_TMA=1``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from hypo_fast.kernels import _tiles
from hypo_fast.kernels import linear_kl as KL
from hypo_fast.kernels import linear_logprob as LP
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on an H100 / H200
FAILED = []


def _aligned(arg: str, kind: str) -> bool:
    return kind.startswith("*") or arg in ("D", "DR") or arg.startswith("stride")


def resources(ptx: str) -> tuple[str, int | None]:
    """``ptxas -v``'s registers and spill bytes of one kernel for sm_90a: (report, bytes of
    spill stores or None)."""
    run = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", "-", "-o", os.devnull],
                         input=ptx, capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
    if regs is None or spill is None:
        return "ptxas report unavailable", None
    return f"{regs[1]} registers, spills {spill[1]} B stored / {spill[2]} B loaded", int(spill[1])


def temperature_fused(ptx: str, fn, types, constexprs) -> list[str]:
    """The instructions of ``ptx`` that fuse the temperature (``inv_temp``) into an FMA: the
    logits must be its rounded product (``_tiles.mul_rn``), the same in every pass. Pointer
    loads only: a tensor descriptor takes several PTX parameters, which hides inv_temp's."""
    if "inv_temp" not in fn.arg_names or any(t.startswith("tensordesc") for t in types.values()):
        return []
    index = [a for a in fn.arg_names if a not in constexprs].index("inv_temp")
    load = re.search(rf"ld\.param\.b32\s+(%r\d+),\s*\[\w+_param_{index}\];", ptx)
    if load is None:
        return ["inv_temp: no parameter load found"]
    return [line.strip() for line in ptx.splitlines()
            if line.strip().startswith("fma") and re.search(rf"{load[1]}\b", line)]


def compile_one(name, fn, types, constexprs, max_spill=None, **options):
    """``types``: the non-constexpr arguments' Triton types (default i32). ``max_spill``: fail
    when ptxas reports more bytes of spill stores."""
    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
    keys = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if signature[a] != "constexpr" and _aligned(a, signature[a])}
    try:
        kernel = triton.compile(ASTSource(fn, signature, constexprs=keys, attrs=attrs),
                                target=TARGET, options=options)
        fused = temperature_fused(kernel.asm["ptx"], fn, types, constexprs)
        if fused:
            raise RuntimeError(f"the temperature fused into an FMA: {fused[0]}")
        report, spilled = resources(kernel.asm["ptx"])
        report += f", {kernel.metadata.shared} B shared"
        if kernel.metadata.shared > SHARED_LIMIT:
            raise RuntimeError(f"{report}: over the {SHARED_LIMIT} B a block may have")
        if max_spill is not None and spilled is not None and spilled > max_spill:
            raise RuntimeError(f"{report}: over the budget of {max_spill} B of spill stores")
        print("ok  ", f"{name:58s}", report)
    except Exception as exc:  # report every kernel, then fail
        FAILED.append(name)
        print("FAIL", name, type(exc).__name__, str(exc)[:800])


def main(dtype: str, tma: bool) -> int:
    ptr, f32, i64 = f"*{dtype}", "*fp32", "*i64"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]

    os.environ["HYPO_FAST_TMA"] = "1" if tma else "0"  # the defaults of such a device

    def blocks(cfg):  # the launchers' defaults: constexprs, then launch options
        cfg = dict(cfg)
        return cfg, {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}

    def operands(cfg, h="H", w="W"):  # what logits_tile reads: descriptors or pointers
        if not tma:
            return {h: ptr, w: ptr}
        return {h: f"tensordesc<{dtype}[{cfg['BM']},{cfg['BK']}]>",
                w: f"tensordesc<{dtype}[{cfg['BN']},{cfg['BK']}]>"}

    tag = f"{dtype}{' tma' if tma else ''}"
    fwd, launch = blocks(_tiles.block_config("forward", torch_dtype))
    bwd, bwd_launch = blocks(_tiles.block_config("backward", torch_dtype))
    softcapped, _ = blocks(LP.backward_config(torch_dtype, 30.0))
    dots = {"CAST_F32": False, "PRECISION": "ieee"}
    heads = {"HAS_BIAS": True, "HAS_SOFTCAP": True, **dots}
    lp_fwd_args = {**operands(fwd), "B": ptr, "Y": i64, "ROWS": i64, "M_OUT": f32,
                   "S_OUT": f32, "A_OUT": f32, "Q_OUT": f32, "T_OUT": f32, "TLSE": f32,
                   "inv_temp": "fp32", "softcap": "fp32"}
    compile_one(f"linear_logprob forward {tag}", LP._forward_kernel, lp_fwd_args,
                {**heads, **fwd, "WANT_ENTROPY": True, "WANT_COLLISION": True,
                 "WANT_TILE_LSE": True}, **launch)
    grad_args = {"B": ptr, "Y": i64, "ROWS": i64, "NORM": f32, "ENT": f32, "G_LOGP": f32,
                 "G_LSE": f32, "G_ENT": f32, "DX": ptr, "DB_PART": f32, "PAIRS": "*i32",
                 "inv_temp": "fp32", "softcap": "fp32"}
    for sparse in (False, True):  # every option, so a softcap: its blocks, filtered or not
        compile_one(f"linear_logprob grad sparse={sparse} {tag}", LP._grad_logits_kernel,
                    {**operands(softcapped), **grad_args},
                    {**heads, **softcapped, "HAS_G_LSE": True, "HAS_G_ENT": True,
                     "WANT_DB": True, "SPARSE": sparse}, **bwd_launch)
    sparse_budget = {"max_spill": 256 if dtype != "fp32" else None, **_tiles.SPARSE_LAUNCH}
    # the forward's tile width, and a softcap's narrower dX tiles
    for bn in sorted({LP.tile_width(torch_dtype), softcapped["BN"]}):
        sparse_blocks = {"BM": bwd["BM"], "BN": bn, "BD": _tiles.SPARSE_BD, **dots}
        compile_one(f"sparse dW {dtype} BN={bn}", _tiles._sparse_dw_kernel,
                    {"DX": ptr, "H": ptr, "ROWS": i64, "DW": ptr, "TILE_PTR": "*i32",
                     "TILE_RB": "*i32"}, sparse_blocks, **sparse_budget)
        compile_one(f"sparse dH {dtype} BN={bn}", _tiles._sparse_dh_kernel,
                    {"DX": ptr, "W": ptr, "DH": f32, "SEG_PTR": "*i32", "SEG_LEN": "*i32",
                     "ROW_TILE": "*i32"}, sparse_blocks, **sparse_budget)
    ref = {"HAS_REF_BIAS": True, "REF_CAST_F32": False, "REF_PRECISION": "ieee", **heads}
    kl_fwd, kl_launch = blocks(KL.two_head_config("forward", torch_dtype))
    kl_bwd, kl_bwd_launch = blocks(KL.two_head_config("backward", torch_dtype))

    def kl_heads(cfg):
        return {**operands(cfg), **operands(cfg, "HR", "WR"), "B": ptr, "BR": ptr, "Y": i64,
                "ROWS": i64, "inv_temp": "fp32", "softcap": "fp32"}

    kl_fwd_args = {**kl_heads(kl_fwd), "OUT": f32, "TSTAT": f32}
    kl_grad_args = {**kl_heads(kl_bwd), "NORM": f32, "ENT": f32, "G_KL": f32, "G_ENT": f32,
                    "G_LOGP": f32, "DX": ptr, "DB_PART": f32, "PAIRS": "*i32"}
    compile_one(f"linear_kl forward {tag}", KL._forward_kernel, kl_fwd_args,
                {**ref, **kl_fwd, "REVERSE": True, "WANT_ENTROPY": True,
                 "HAS_LABELS": True, "WANT_TILE_STATS": True}, **kl_launch)
    for reverse, sparse in ((True, False), (False, False), (True, True)):
        compile_one(f"linear_kl grad reverse={reverse} sparse={sparse} {tag}",
                    KL._grad_logits_kernel, kl_grad_args,
                    {**ref, **kl_bwd, "REVERSE": reverse, "HAS_G_KL": True,
                     "HAS_G_ENT": True, "HAS_G_LOGP": True, "WANT_DB": True, "SPARSE": sparse},
                    **kl_bwd_launch)
    if tma:  # what else the sweep runs with descriptors: the one-loop dX
        compile_one(f"linear_kl grad one loop {tag}", KL._grad_logits_kernel, kl_grad_args,
                    {**ref, **kl_bwd, "FUSE_K": True, "REVERSE": True, "HAS_G_KL": True,
                     "HAS_G_ENT": True, "HAS_G_LOGP": True, "WANT_DB": True, "SPARSE": False},
                    **{**kl_bwd_launch, "num_stages": 3})  # 4 take 262 KB: `launch` drops one

    # As benchmarked (no bias, softcap or entropy): register spills here cost measured time
    # (the KL forward's 1.7 KB came with 51% of the matmul rate), so 16-bit inputs, the fast
    # path, have a budget. fp32 runs true-fp32 FMA dots, far from the matmul rate anyway.
    plain = {"HAS_BIAS": False, "HAS_SOFTCAP": False, **dots}
    budget = {"max_spill": 256 if dtype != "fp32" else None}
    compile_one(f"linear_logprob forward {tag} as benchmarked", LP._forward_kernel, lp_fwd_args,
                {**plain, **fwd, "WANT_ENTROPY": False, "WANT_COLLISION": False,
                 "WANT_TILE_LSE": True}, **budget, **launch)
    for sparse in (False, True):  # dense, and filtered (the forward's tile width)
        grad = {**bwd, "BN": LP.tile_width(torch_dtype)} if sparse else bwd
        compile_one(f"linear_logprob grad sparse={sparse} {tag} as benchmarked",
                    LP._grad_logits_kernel, {**operands(grad), **grad_args},
                    {**plain, **grad, "HAS_G_LSE": False, "HAS_G_ENT": False, "WANT_DB": False,
                     "SPARSE": sparse}, **budget, **bwd_launch)
    plain_ref = {**plain, "HAS_REF_BIAS": False, "REF_CAST_F32": False, "REF_PRECISION": "ieee"}
    compile_one(f"linear_kl forward {tag} as benchmarked", KL._forward_kernel, kl_fwd_args,
                {**plain_ref, **kl_fwd, "REVERSE": True, "WANT_ENTROPY": False,
                 "HAS_LABELS": True, "WANT_TILE_STATS": False}, **budget, **kl_launch)
    compile_one(f"linear_kl grad {tag} as benchmarked", KL._grad_logits_kernel, kl_grad_args,
                {**plain_ref, **kl_bwd, "REVERSE": True, "HAS_G_KL": True,
                 "HAS_G_ENT": False, "HAS_G_LOGP": False, "WANT_DB": False, "SPARSE": False},
                **budget, **kl_bwd_launch)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], "--tma" in sys.argv[2:]))
