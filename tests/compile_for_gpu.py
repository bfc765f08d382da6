"""Compile every Triton kernel for an sm_90 target without a GPU (run as a script, without
TRITON_INTERPRET): catches what only the GPU compiler rejects (the interpreter accepts more,
e.g. an fp64 dot into an fp32 accumulator). Prints one line per kernel; exits 1 on any failure.

    python tests/compile_for_gpu.py bf16|fp16|fp32
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from hypo_fast.kernels import _tiles
from hypo_fast.kernels import linear_kl as KL
from hypo_fast.kernels import linear_logprob as LP
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
FAILED = []


def compile_one(name, fn, types, constexprs, **options):
    """``types``: the non-constexpr arguments' Triton types (default i32)."""
    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
    keys = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    try:
        triton.compile(ASTSource(fn, signature, constexprs=keys), target=TARGET, options=options)
        print("ok  ", name)
    except Exception as exc:  # report every kernel, then fail
        FAILED.append(name)
        print("FAIL", name, type(exc).__name__, str(exc)[:800])


def main(dtype: str) -> int:
    ptr, f32, i64 = f"*{dtype}", "*fp32", "*i64"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]

    def blocks(cfg):  # the defaults the launchers use: constexprs, then launch options
        cfg = dict(cfg)
        return cfg, {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}

    fwd, launch = blocks(_tiles.block_config("forward", torch_dtype))
    bwd, bwd_launch = blocks(_tiles.block_config("backward", torch_dtype))
    dots = {"CAST_F32": False, "PRECISION": "ieee"}
    heads = {"HAS_BIAS": True, "HAS_SOFTCAP": True, **dots}
    compile_one(f"linear_logprob forward {dtype}", LP._forward_kernel,
                {"H": ptr, "W": ptr, "B": ptr, "Y": i64, "ROWS": i64, "M_OUT": f32, "S_OUT": f32,
                 "A_OUT": f32, "T_OUT": f32, "TMAX": f32, "inv_temp": "fp32", "softcap": "fp32"},
                {**heads, **fwd, "WANT_ENTROPY": True, "WANT_TILE_MAX": True}, **launch)
    for sparse in (False, True):
        compile_one(f"linear_logprob grad sparse={sparse} {dtype}", LP._grad_logits_kernel,
                    {"H": ptr, "W": ptr, "B": ptr, "Y": i64, "ROWS": i64, "LSE": f32, "ENT": f32,
                     "G_LOGP": f32, "G_LSE": f32, "G_ENT": f32, "DX": ptr, "DB_PART": f32,
                     "PAIRS": "*i32", "inv_temp": "fp32", "softcap": "fp32"},
                    {**heads, **bwd, "BN": LP.tile_width(torch_dtype) if sparse else bwd["BN"],
                     "HAS_G_LSE": True, "HAS_G_ENT": True, "WANT_DB": True, "SPARSE": sparse},
                    **bwd_launch)
    sparse_blocks = {"BM": bwd["BM"], "BN": LP.tile_width(torch_dtype), "BD": _tiles.SPARSE_BD,
                     **dots}
    compile_one(f"sparse dW {dtype}", _tiles._sparse_dw_kernel,
                {"DX": ptr, "H": ptr, "ROWS": i64, "DW": ptr, "TILE_PTR": "*i32",
                 "TILE_RB": "*i32"}, sparse_blocks)
    compile_one(f"sparse dH {dtype}", _tiles._sparse_dh_kernel,
                {"DX": ptr, "W": ptr, "DH": f32, "SEG_PTR": "*i32", "SEG_LEN": "*i32",
                 "ROW_TILE": "*i32"}, sparse_blocks)
    ref = {"HAS_REF_BIAS": True, "REF_CAST_F32": False, "REF_PRECISION": "ieee", **heads}
    kl_fwd, kl_launch = blocks(KL.two_head_config("forward", torch_dtype))
    kl_bwd, kl_bwd_launch = blocks(KL.two_head_config("backward", torch_dtype))
    kl_heads = {"H": ptr, "W": ptr, "B": ptr, "HR": ptr, "WR": ptr, "BR": ptr, "Y": i64,
                "ROWS": i64, "inv_temp": "fp32", "softcap": "fp32"}
    compile_one(f"linear_kl forward {dtype}", KL._forward_kernel, {**kl_heads, "OUT": f32},
                {**ref, **kl_fwd, "REVERSE": True, "WANT_ENTROPY": True, "HAS_LABELS": True},
                **kl_launch)
    for reverse in (True, False):
        compile_one(f"linear_kl grad reverse={reverse} {dtype}", KL._grad_logits_kernel,
                    {**kl_heads, "NORM": f32, "ENT": f32, "G_KL": f32, "G_ENT": f32,
                     "G_LOGP": f32, "DX": ptr, "DB_PART": f32},
                    {**ref, **kl_bwd, "REVERSE": reverse, "HAS_G_KL": True, "HAS_G_ENT": True,
                     "HAS_G_LOGP": True, "WANT_DB": True}, **kl_bwd_launch)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
