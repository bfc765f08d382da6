"""One-call GPU check of the compiled kernels: correctness against the reference, then timings.

    python benchmarks/gpu_check.py [--quick] [--sweep] [--only SECTION,...]

Sections (each guarded, so one failure does not lose the rest of a lease):
1. correctness of the compiled Triton kernels against ``hypo_fast.reference`` on odd small shapes
   and on a Llama-3-8B head (values and gradients, fp32 exact and bf16);
2. the card's bf16 matmul rate, measured as ``torch.matmul`` of the head's own shape;
3. per shape: forward and forward+backward ms, peak memory above the inputs, for ours, the naive
   TRL path (bf16 logits, fp32 log-softmax) and the three bare cuBLAS GEMMs (logits, dH, dW),
   with each one's fraction of the measured matmul rate (ours counts 1 GEMM-equivalent forward,
   4 forward+backward);
   then the same for the KL op, the filtered backwards of both ops, the losses on CUDA, a
   profile of the public forward, and its overhead (wall, host and device-busy time; the
   slowest host functions);
4. with ``--sweep``: forward and backward block configurations at the largest shape, with
   pointer and descriptor (TMA) loads, for both kernel families.
``--only``: just the named sections (the names the log prints, e.g. ``kl-timings,kl-sweep``;
naming a sweep implies ``--sweep``) and the matmul rate, for a short lease.
Untagged entries take the library's default loads (descriptors on Hopper); "tma" and "no-tma"
force descriptor or pointer loads (``HYPO_FAST_TMA``), checked for correctness and timed beside
the default.

``--dry`` (with ``TRITON_INTERPRET=1``): every section on the CPU, with the kernels interpreted,
a small head (d 64, V 1000) and 256 tokens: what the tests run so that a GPU lease is not spent
on a broken script. Its numbers mean nothing.
Writes ``gpu_check.json`` and ``gpu_check.md`` under ``$OUT`` when set; prints the table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import HEADS, naive_logprob, realistic_inputs
from hypo_fast.kernels import _tiles
from hypo_fast.kernels import linear_kl as kkl
from hypo_fast.kernels import linear_logprob as klp

from hypo_fast import ops, reference
from hypo_fast._checks import validate_head

DRY = "--dry" in sys.argv  # module-wide: the device and shapes below
DEV = "cpu" if DRY else "cuda"
LLAMA = (64, 1000) if DRY else HEADS["llama3-8b"]  # (d, V) of the head measured
RESULTS: dict = {"checks": [], "timings": [], "sweep": [], "errors": []}
SECTIONS: list[str] = []  # every guarded section's name
ONLY: set[str] = set()  # --only: the sections to run (empty: all)
ROUNDS = 1  # --rounds: timings of the public KL forward per GROUP_M


def tokens(n: int) -> int:
    """``n`` tokens, 256 in a dry run."""
    return min(n, 256) if DRY else n


def free_cache() -> None:
    """Between measurements: the allocator's cached blocks go back (a no-op on the CPU)."""
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def save() -> None:
    """Write what has been measured so far under $OUT (a lease can end mid-run)."""
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))
        Path(out, "gpu_check.md").write_text(markdown() + "\n")


def guarded(name):
    SECTIONS.append(name)

    def wrap(fn):
        def run(*args, **kwargs):
            if ONLY and name not in ONLY | {"matmul-rate"}:
                return None
            t0 = time.time()
            try:
                return fn(*args, **kwargs)
            except Exception:
                RESULTS["errors"].append({"section": name, "trace": traceback.format_exc()})
                print(f"[{name}] FAILED\n{traceback.format_exc()}", flush=True)
            finally:  # a failed section leaves neither its load mode nor unsaved results
                use_tma(None)
                print(f"[{name}] {time.time() - t0:.1f} s", flush=True)
                save()
        return run
    return wrap


_TMA_SETTING = os.environ.get("HYPO_FAST_TMA")  # the caller's, restored by use_tma(None)


def use_tma(on: bool | None) -> str:
    """Select descriptor loads (on), pointer loads (off) or the caller's setting (None: the
    library's default, descriptors on Hopper, unless HYPO_FAST_TMA was set) for the kernels
    launched next; the tag for the tables."""
    if on is None:
        if _TMA_SETTING is None:
            os.environ.pop("HYPO_FAST_TMA", None)
        else:
            os.environ["HYPO_FAST_TMA"] = _TMA_SETTING
        return ""
    os.environ["HYPO_FAST_TMA"] = "1" if on else "0"
    return " tma" if on else " no-tma"


def check_case(name, n, d, v, dtype, *, bias=False, softcap=None, temperature=1.0,
               entropy=False, seed=0, tma=None):
    name += use_tma(tma)
    g = torch.Generator(device=DEV).manual_seed(seed)
    h = (torch.randn(n, d, generator=g, device=DEV)).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, device=DEV) * 2.0 / d**0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g, device=DEV).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=g, device=DEV)
    y[torch.rand(n, generator=g, device=DEV) < 0.3] = -100
    seq = torch.arange(n, device=DEV) // max(1, n // 7)
    params = [h, w] + ([b] if bias else [])
    kw = dict(temperature=temperature, softcap=softcap, seq_ids=seq, return_entropy=entropy,
              return_collision=entropy)
    ours = ops.linear_logprob(h, w, y, b, backend="triton", **kw)
    ref = reference.linear_logprob(h, w, y, b, **kw)
    coef = torch.randn(4, n, generator=g, device=DEV)

    def loss(o):
        total = (o.logp * coef[0]).sum() + (o.lse * coef[1]).sum() + o.seq_sum.sum()
        return total + ((o.entropy * coef[2]).sum() if entropy else 0.0)

    g_ours = torch.autograd.grad(loss(ours), params)
    g_ref = torch.autograd.grad(loss(ref), params)
    row = {
        "case": name, "N": n, "d": d, "V": v, "dtype": str(dtype).split(".")[-1],
        "bias": bias, "softcap": softcap, "T": temperature, "entropy": entropy,
        "logp": rel(ours.logp, ref.logp), "lse": rel(ours.lse, ref.lse),
        "seq_sum": rel(ours.seq_sum, ref.seq_sum),
        "entropy_err": rel(ours.entropy, ref.entropy) if entropy else None,
        "collision_err": rel(ours.log_collision, ref.log_collision) if entropy else None,
        "dH": rel(g_ours[0], g_ref[0]), "dW": rel(g_ours[1], g_ref[1]),
        "db": rel(g_ours[2], g_ref[2]) if bias else None,
        "finite": bool(torch.isfinite(ours.logp).all() and all(torch.isfinite(x).all()
                                                                for x in g_ours)),
    }
    use_tma(None)
    RESULTS["checks"].append(row)
    print(json.dumps(row), flush=True)


@guarded("correctness")
def correctness(quick: bool):
    check_case("odd-small", 300, 128, 1000, torch.float32)
    check_case("odd-small-opts", 333, 96, 999, torch.float32, bias=True, softcap=30.0,
               temperature=0.7, entropy=True)
    check_case("odd-small-bf16", 300, 128, 1000, torch.bfloat16, bias=True, entropy=True)
    check_case("odd-small-fp16", 257, 64, 777, torch.float16, softcap=10.0)
    d, v = LLAMA
    check_case("llama3-head-fp32", tokens(1024 if quick else 2048), d, v, torch.float32,
               entropy=True)
    check_case("llama3-head-bf16", tokens(1024 if quick else 4096), d, v, torch.bfloat16,
               entropy=True)
    check_case("llama3-head-bf16-softcap", tokens(1024), d, v, torch.bfloat16, softcap=30.0,
               bias=True,
               entropy=True)
    check_case("odd-small-bf16-opts", 333, 96, 999, torch.bfloat16, bias=True, softcap=30.0,
               temperature=0.7, entropy=True, tma=True)
    check_case("llama3-head-bf16", tokens(1024 if quick else 4096), d, v, torch.bfloat16,
               entropy=True, tma=False)


def check_kl_case(name, n, d, d_ref, v, dtype, *, direction="reverse", bias=False,
                  softcap=None, temperature=1.0, seed=0, tma=None):
    name += use_tma(tma)
    g = torch.Generator(device=DEV).manual_seed(seed)
    h = torch.randn(n, d, generator=g, device=DEV).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, device=DEV) * 2.0 / d**0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g, device=DEV).to(dtype).requires_grad_() if bias else None
    hr = torch.randn(n, d_ref, generator=g, device=DEV).to(dtype)
    wr = (torch.randn(v, d_ref, generator=g, device=DEV) * 2.0 / d_ref**0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g, device=DEV)
    y[torch.rand(n, generator=g, device=DEV) < 0.3] = -100
    params = [h, w] + ([b] if bias else [])
    kw = dict(bias=b, direction=direction, labels=y, temperature=temperature, softcap=softcap,
              return_entropy=True)
    ours = ops.linear_kl(h, w, hr, wr, backend="triton", **kw)
    ref = reference.linear_kl(h, w, hr, wr, **kw)
    coef = torch.randn(3, n, generator=g, device=DEV)

    def loss(o):
        return ((o.kl * coef[0]).sum() + (o.entropy * coef[1]).sum()
                + (o.logp * coef[2]).sum())

    g_ours = torch.autograd.grad(loss(ours), params)
    g_ref = torch.autograd.grad(loss(ref), params)
    row = {"case": name, "N": n, "d": d, "V": v, "dtype": str(dtype).split(".")[-1],
           "bias": bias, "softcap": softcap, "T": temperature, "entropy": True,
           "logp": rel(ours.logp, ref.logp), "lse": rel(ours.kl, ref.kl),
           "entropy_err": rel(ours.entropy, ref.entropy),
           "dH": rel(g_ours[0], g_ref[0]), "dW": rel(g_ours[1], g_ref[1]),
           "db": rel(g_ours[2], g_ref[2]) if bias else None}
    use_tma(None)
    RESULTS["checks"].append(row)
    print(json.dumps(row), flush=True)


@guarded("kl-correctness")
def kl_correctness(quick: bool):
    check_kl_case("kl-rev-odd", 300, 128, 96, 1000, torch.float32, bias=True, softcap=20.0)
    check_kl_case("kl-fwd-odd", 257, 64, 128, 777, torch.float32, direction="forward",
                  temperature=0.8)
    check_kl_case("kl-rev-bf16", 300, 128, 128, 1000, torch.bfloat16)
    d, v = LLAMA
    n = tokens(1024 if quick else 2048)
    check_kl_case("kl-rev-llama3-bf16", n, d, d, v, torch.bfloat16)
    check_kl_case("kl-fwd-llama3-bf16", n, d, d, v, torch.bfloat16, direction="forward")
    check_kl_case("kl-rev-bf16-opts", 300, 128, 128, 1000, torch.bfloat16, bias=True,
                  softcap=20.0, tma=True)
    check_kl_case("kl-fwd-llama3-bf16", n, d, d, v, torch.bfloat16, direction="forward",
                  tma=False)


def naive_kl(h, w, hr, wr):
    """KL(π‖π_ref) per token the naive way: both logits tensors, fp32 log-softmax."""
    logp = torch.log_softmax(torch.nn.functional.linear(h, w).float(), dim=-1)
    with torch.no_grad():
        logq = torch.log_softmax(torch.nn.functional.linear(hr, wr).float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@guarded("kl-timings")
def kl_timings(n, d, v, dtype, head, rate, tma=None):
    head += use_tma(tma)
    h, w, _, ent = realistic_inputs(n, d, v, dtype, DEV, prompt_fraction=0.0)
    hr = (h.float() + 0.1 * torch.randn_like(h, dtype=torch.float32)).to(dtype)
    wr = (w.float() * (1 + 0.05 * torch.randn_like(w, dtype=torch.float32))).to(dtype)
    h.requires_grad_()
    w.requires_grad_()
    flop = 2 * n * d * v
    go = torch.randn(n, device=DEV)

    def ours_fwd():
        with torch.no_grad():
            return ops.linear_kl(h, w, hr, wr, backend="triton").kl

    def ours_fb():
        return torch.autograd.grad(ops.linear_kl(h, w, hr, wr, backend="triton").kl, (h, w), go)

    def naive_fwd():
        with torch.no_grad():
            return naive_kl(h, w, hr, wr)

    def naive_fb():
        return torch.autograd.grad(naive_kl(h, w, hr, wr), (h, w), go)

    row = {"head": head + " KL", "N": n, "N_valid": n, "d": d, "V": v,
           "dtype": str(dtype).split(".")[-1], "entropy": ent,
           "grads_mib": (h.numel() * h.element_size() + w.numel() * w.element_size()) / 2**20,
           "validate_ms": bench(lambda: reference.validate_kl_inputs(
               h, w, hr, wr, None, None, labels=None, ignore_index=-100, mask=None,
               temperature=1.0, softcap=None, seq_ids=None, num_seqs=None,
               token_weights=None))}
    for name, fn, gemm_eq in [("ours_fwd", ours_fwd, 2), ("ours_fwdbwd", ours_fb, 6),
                              ("naive_fwd", naive_fwd, 2), ("naive_fwdbwd", naive_fb, 4)]:
        row[name + "_ms"] = bench(fn)
        row[name + "_frac"] = gemm_eq * flop / row[name + "_ms"] / 1e9 / rate if rate else None
        row[name + "_peak_mib"] = peak_extra(fn)
        free_cache()
    row["cublas_3gemm_ms"] = float("nan")
    row["cublas_3gemm_frac"] = None
    if tma is None:  # issue 4's forward target, on these inputs
        kl_public_forward_by_group("KL public forward, kl-timings inputs", h, w, hr, wr)
    use_tma(None)
    RESULTS["timings"].append(row)
    print(json.dumps(row), flush=True)


def bench(fn, rep_ms=200, min_samples=5):
    """Median ms of ``fn`` over at least ``rep_ms`` of calls and ``min_samples`` calls (do_bench
    alone times one call of a path slower than rep_ms)."""
    t0 = time.perf_counter()
    fn()
    if DEV != "cuda":  # a dry run: one call
        return 1e3 * (time.perf_counter() - t0)
    torch.cuda.synchronize()  # the first call compiles
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once_ms = 1e3 * (time.perf_counter() - t0)
    return do_bench(fn, warmup=25, rep=max(rep_ms, min_samples * once_ms), return_mode="median")


def peak_extra(fn):
    if DEV != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


@guarded("matmul-rate")
def matmul_rate(n, d, v):
    a = torch.randn(n, d, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(v, d, device=DEV, dtype=torch.bfloat16)
    ms = bench(lambda: torch.matmul(a, b.T))
    tflops = 2 * n * d * v / ms / 1e9
    RESULTS["matmul"] = {"N": n, "d": d, "V": v, "ms": ms, "tflops": tflops}
    print(f"bf16 matmul {n}x{d}x{v}: {ms:.3f} ms = {tflops:.0f} TFLOP/s", flush=True)
    return tflops


@guarded("timings")
def timings(n, d, v, dtype, head, rate, tma=None, prompt_fraction=0.5):
    head += use_tma(tma)
    h, w, y, ent = realistic_inputs(n, d, v, dtype, DEV, prompt_fraction=prompt_fraction)
    n_valid = int((y != -100).sum())
    h.requires_grad_()
    w.requires_grad_()
    go = torch.randn(n, device=DEV)

    def ours_fwd():
        with torch.no_grad():
            return ops.linear_logprob(h, w, y, backend="triton").logp

    def ours_fb():
        out = ops.linear_logprob(h, w, y, backend="triton").logp
        return torch.autograd.grad(out, (h, w), go)

    def naive_fwd():
        with torch.no_grad():
            return naive_logprob(h, w, y)

    def naive_fb():
        return torch.autograd.grad(naive_logprob(h, w, y), (h, w), go)

    # a causal LM's shift: the same tokens as h[:, :-1] of a [n/t, t + 1, d] buffer (a view
    # that reshape would copy; the op reads it in place), t = 512 or, in a dry run, every token
    t = min(n, 512)
    buf = torch.zeros(n // t, t + 1, d, device=DEV, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        buf[:, :-1] = h.view(n // t, t, d)
    shifted, y_shifted = buf[:, :-1], y.view(n // t, t)

    def ours_fb_shifted():
        out = ops.linear_logprob(shifted, w, y_shifted, backend="triton").logp
        return torch.autograd.grad(out, (shifted, w), go.view_as(out))

    hv = h.detach()[y != -100].contiguous()
    dz = torch.randn(n_valid, v, device=DEV, dtype=dtype)

    def gemms():
        z = hv @ w.detach().T
        return z, dz @ w.detach(), dz.T @ hv

    row = {"head": head, "N": n, "N_valid": n_valid, "d": d, "V": v,
           "dtype": str(dtype).split(".")[-1], "entropy": ent,
           "grads_mib": (h.numel() * h.element_size() + w.numel() * w.element_size()) / 2**20,
           "validate_ms": bench(lambda: validate_head(h, w, y, None, ignore_index=-100,
                                                      temperature=1.0, softcap=None))}
    # GEMM-equivalents each path performs, over the rows it multiplies: ours and the bare GEMMs
    # the valid tokens only, naive every token
    for name, fn, gemm_eq, rows in [("ours_fwd", ours_fwd, 1, n_valid),
                                    ("ours_fwdbwd", ours_fb, 4, n_valid),
                                    ("ours_shifted_fwdbwd", ours_fb_shifted, 4, n_valid),
                                    ("naive_fwd", naive_fwd, 1, n),
                                    ("naive_fwdbwd", naive_fb, 3, n),
                                    ("cublas_3gemm", gemms, 3, n_valid)]:
        ms = bench(fn)
        row[name + "_ms"] = ms
        row[name + "_frac"] = gemm_eq * 2 * rows * d * v / ms / 1e9 / rate if rate else None
        if name != "cublas_3gemm":
            row[name + "_peak_mib"] = peak_extra(fn)
        free_cache()
    if prompt_fraction == 0.0:  # issue 3's shape: what the chunk's budget costs and saves
        with unbudgeted_chunk():
            row["ours_unbudgeted_fwdbwd_ms"] = bench(ours_fb)
            row["ours_unbudgeted_fwdbwd_peak_mib"] = peak_extra(ours_fb)
        free_cache()
    use_tma(None)
    RESULTS["timings"].append(row)
    print(json.dumps(row), flush=True)


@guarded("profile")
def profile_forward(n, d, v):
    """Where the public forward's time goes beyond the kernel: a torch.profiler table of one
    ``ops.linear_logprob`` call (no grad) and of one forward+backward."""
    from torch.profiler import ProfilerActivity, profile

    h, w, y, _ = realistic_inputs(n, d, v, torch.bfloat16, DEV)
    w.requires_grad_()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    for _ in range(2):  # warm-up: compilation, allocator
        ops.linear_logprob(h, w, y, backend="triton").logp.sum().backward()
    tables = {}
    for name, fn in [
        ("forward", lambda: ops.linear_logprob(h, w, y, backend="triton").logp.detach()),
        ("forward+backward",
         lambda: ops.linear_logprob(h, w, y, backend="triton").logp.sum().backward()),
    ]:
        if DEV == "cuda":  # no empty_cache: the profile then matches a training step's
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            fn()
            if DEV == "cuda":
                torch.cuda.synchronize()
        tables[name] = prof.key_averages().table(
            sort_by="cuda_time_total" if DEV == "cuda" else "cpu_time_total", row_limit=14)
        print(f"--- profile: {name}\n{tables[name]}", flush=True)
    RESULTS["profile"] = tables


@guarded("overhead")
def overhead(n, d, v):
    """Where each public call's time goes beyond its kernels (forwards without grad, the
    log-prob forward with WPO's log Σp² too, and the log-prob op's forward+backward): the wall
    time of one call between two device
    synchronisations, the host's time until the call returns (it waits inside for the
    validation's and the row compaction's synchronisations), the device's busy time (the
    profiler's kernel times), and the host functions that take longest (cProfile)."""
    import cProfile
    import io
    import pstats
    import statistics

    from torch.profiler import ProfilerActivity, profile

    h, w, y, _ = realistic_inputs(n, d, v, torch.bfloat16, DEV)
    m = n // 2
    hr = (h[:m].float() * 1.01).to(h.dtype)
    wr = (w.float() * 0.99).to(w.dtype)
    hg, wg = h.detach().requires_grad_(), w.detach().requires_grad_()
    go = torch.randn(n, device=DEV)
    calls = {  # name: (call, with grad)
        "linear_logprob": (lambda: ops.linear_logprob(h, w, y, backend="triton").logp, False),
        "linear_logprob + log_collision (WPO)": (lambda: ops.linear_logprob(
            h, w, y, backend="triton", return_collision=True).log_collision, False),
        "linear_kl": (lambda: ops.linear_kl(h[:m], w, hr, wr, backend="triton").kl, False),
        "linear_logprob fwd+bwd": (lambda: torch.autograd.grad(
            ops.linear_logprob(hg, wg, y, backend="triton").logp, (hg, wg), go), True),
    }
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    calls_profiled = 1 if DRY else 10
    RESULTS["overhead"] = []
    for name, (fn, grad) in calls.items():
        with torch.set_grad_enabled(grad):
            fn()  # compilation
            walls, hosts = [], []
            for _ in range(1 if DRY else 15):
                sync()
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                sync()
                walls.append(1e3 * (time.perf_counter() - t0))
                hosts.append(1e3 * (t1 - t0))
            busy = float("nan")
            if DEV == "cuda":
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn()
                    sync()
                busy = sum(getattr(e, "self_device_time_total", 0.0)
                           for e in prof.key_averages()) / 1e3
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(calls_profiled):
                fn()
            sync()
            profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        row = {"op": name, "wall_ms": statistics.median(walls),
               "host_ms": statistics.median(hosts), "device_busy_ms": busy}
        RESULTS["overhead"].append(row)
        print(json.dumps(row), flush=True)
        print(f"--- host functions, {calls_profiled} calls of {name}, by own time\n"
              f"{text.getvalue()}", flush=True)


@guarded("losses")
def losses_check():
    """Every ``hypo_fast.losses`` module on CUDA: the triton backend against the reference
    backend on the same inputs (loss, aux outputs, gradients), fp32 and under bf16 autocast;
    and whether two triton runs agree bit for bit (no atomics anywhere, sequence sums
    included)."""
    from hypo_fast import losses as L

    g = torch.Generator(device=DEV).manual_seed(0)
    b_, t_, d, v = (2, 32, 64, 1000) if DRY else (4, 64, 256, 1000)

    def rnd(*shape, k=1.0):
        return torch.randn(*shape, generator=g, device=DEV) * k

    h, w, bias = rnd(2 * b_, t_, d), rnd(v, d, k=2 / d**0.5), rnd(v, k=0.5)
    y = torch.randint(0, v, (2 * b_, t_), device=DEV, generator=g)
    y[:, : t_ // 2] = -100
    ref_h, ref_w, ref_b = rnd(2 * b_, t_, d), rnd(v, d, k=2 / d**0.5), rnd(v, k=0.5)
    online, online_ref = rnd(4, t_, d), rnd(4, t_, d)
    mask = torch.rand(2 * b_, t_, device=DEV, generator=g)
    groups = torch.tensor([0, 0, 1, 1], device=DEV)
    cases = {
        "dpo": (lambda be: L.FusedLinearDPOLoss(compute_nll_loss=True, backend=be), {}, False),
        "dpo-ipo-autocast": (lambda be: L.FusedLinearDPOLoss(loss_type="ipo", backend=be), {},
                             True),
        "dpo-ld-wpo": (lambda be: L.FusedLinearDPOLoss(ld_alpha=0.5, use_weighting=True,
                                                       backend=be), {}, False),
        "simpo-autocast": (lambda be: L.FusedLinearSimPOLoss(backend=be), None, True),
        "orpo": (lambda be: L.FusedLinearORPOLoss(backend=be), None, False),
        "cpo-autocast": (lambda be: L.FusedLinearCPOLoss(label_smoothing=0.1, backend=be), None,
                         True),
        "hpo": (lambda be: L.HPOLoss(backend=be),
                {"aux_rewards": rnd(2 * b_), "aux_baseline": 0.1}, False),
        "sparsepo": (lambda be: L.FusedLinearSparsePOLoss(l1_u=0.01, backend=be),
                     {"token_mask": mask}, False),
        "hypo-exact": (lambda be: L.HyPOLoss(estimator="exact", backend=be),
                       {"online_input": online, "online_target": y[:4],
                        "online_ref_input": online_ref}, False),
        "hypo-rloo-autocast": (lambda be: L.HyPOLoss(backend=be),
                               {"online_input": online, "online_target": y[:4],
                                "online_ref_input": online_ref, "group_ids": groups}, True),
    }
    for name, (make, extra, autocast) in cases.items():
        results = []
        for backend in ("triton", "triton", "reference"):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
                if extra is None:  # reference-free pair losses
                    loss, aux = make(backend)(ww, hh, y, bias)
                else:
                    loss, aux = make(backend)(ww, hh, y, bias, ref_h, ref_w, ref_b, **extra)
            results.append((loss, aux, torch.autograd.grad(loss, (hh, ww))))
        (l1, a1, g1), (l0, a0, g0), (l2, a2, g2) = results
        row = {"case": name, "loss": rel(l1, l2),
               "aux": max(rel(x, y_) for x, y_ in zip(a1, a2, strict=True) if y_.norm() > 0),
               "dH": rel(g1[0], g2[0]), "dW": rel(g1[1], g2[1]),
               "repeat_identical": all(torch.equal(x, y_) for x, y_ in
                                       zip((l1, *a1, *g1), (l0, *a0, *g0), strict=True))}
        RESULTS.setdefault("losses", []).append(row)
        print(json.dumps(row), flush=True)


@guarded("filtered")
def filtered_timings(n, d, v, zipf, rate, prompt_fraction=0.5):
    """Forward+backward with ``filter_eps="auto"`` against the exact backward on inputs with a
    token-frequency prior (``baselines.realistic_inputs(zipf=...)``): the kept tile fraction,
    the time, the gradients' distance from exact, and the bare cuBLAS GEMMs on the same shape."""
    h, w, y, ent = realistic_inputs(n, d, v, torch.bfloat16, DEV, zipf=zipf,
                                    prompt_fraction=prompt_fraction)
    rows = (y != -100).nonzero().squeeze(1)
    labels = y[rows]
    n_valid = rows.numel()
    g = torch.randn(n, device=DEV)
    tile_lse = torch.empty(triton.cdiv(v, klp.tile_width(h.dtype)), n, device=DEV)
    lse = klp.logprob_forward(h, w, None, labels, rows, tile_lse=tile_lse).lse
    bm = klp.block_config("backward", h.dtype)["BM"]
    keep = klp.filter_tiles(tile_lse, labels, lse, None, g[rows], None, None,
                            torch.finfo(h.dtype).eps / 32, bm, klp.tile_width(h.dtype))
    h.requires_grad_()
    w.requires_grad_()

    def step(filter_eps):
        out = ops.linear_logprob(h, w, y, backend="triton", filter_eps=filter_eps).logp
        return torch.autograd.grad(out, (h, w), g)

    exact, filtered = step(None), step("auto")
    hv = h.detach()[rows].contiguous()
    dz = torch.randn(n_valid, v, device=DEV, dtype=h.dtype)
    row = {"zipf": zipf, "N": n, "N_valid": n_valid, "entropy": ent,
           "kept_fraction": float(keep.float().mean()),
           "exact_ms": bench(lambda: step(None)), "filtered_ms": bench(lambda: step("auto")),
           "cublas_3gemm_ms": bench(lambda: (hv @ w.detach().T, dz @ w.detach(), dz.T @ hv)),
           "dH_vs_exact": rel(filtered[0], exact[0]), "dW_vs_exact": rel(filtered[1], exact[1])}
    row["filtered_frac"] = 4 * 2 * n_valid * d * v / row["filtered_ms"] / 1e9 / rate
    RESULTS.setdefault("filtered", []).append(row)
    print(json.dumps(row), flush=True)


@guarded("kl-filtered")
def kl_filtered(n, d, v, zipf, direction, distance=None):
    """``linear_kl(filter_eps=ε)`` (ε = bf16's eps / 32) against its exact backward, every token
    valid, a policy head with a token-frequency prior and as reference either a copy of it
    perturbed by ``distance`` (relative; HyPO's and SparsePO's case) or, with None, an
    independently drawn head: the kept tile fraction, forward+backward ms, and the gradients'
    distance from exact (the compiled block-sparse KL dX kernel)."""
    dtype = torch.bfloat16
    h, w, _, ent = realistic_inputs(n, d, v, dtype, DEV, zipf=zipf, prompt_fraction=0.0)
    if distance is None:
        hr, wr, _, _ = realistic_inputs(n, d, v, dtype, DEV, zipf=zipf, prompt_fraction=0.0,
                                        seed=1)
    else:
        hr = (h.float() * (1 + distance * torch.randn_like(h, dtype=torch.float32))).to(dtype)
        wr = (w.float() * (1 + distance * torch.randn_like(w, dtype=torch.float32))).to(dtype)
    reverse = direction == "reverse"
    eps = torch.finfo(dtype).eps / 32
    rows = torch.arange(n, device=DEV)
    g = torch.randn(n, device=DEV)
    stats = torch.zeros(kkl.TILE_STATS, triton.cdiv(v, kkl.tile_width(dtype)), n, device=DEV)
    norm = kkl.kl_forward(kkl.Head(h, w, None), kkl.Head(hr, wr, None), rows, reverse=reverse,
                          tile_stats=stats).norm
    keep = kkl.filter_tiles(stats, norm, None, None, g, None, None, reverse, eps,
                            kkl.two_head_config("backward", dtype)["BM"], kkl.tile_width(dtype))
    h.requires_grad_()
    w.requires_grad_()

    def step(filter_eps):
        out = ops.linear_kl(h, w, hr, wr, direction=direction, filter_eps=filter_eps,
                            backend="triton").kl
        return torch.autograd.grad(out, (h, w), g)

    exact, filtered = step(None), step(eps)
    row = {"direction": direction, "reference": "independent" if distance is None
           else f"{distance:g} away", "zipf": zipf, "N": n, "entropy": ent,
           "kept_fraction": float(keep.float().mean()),
           "exact_ms": bench(lambda: step(None)), "filtered_ms": bench(lambda: step(eps)),
           "dH_vs_exact": rel(filtered[0], exact[0]), "dW_vs_exact": rel(filtered[1], exact[1])}
    RESULTS.setdefault("kl_filtered", []).append(row)
    print(json.dumps(row), flush=True)


@guarded("sweep")
def sweep(n, d, v):
    h, w, y, _ = realistic_inputs(n, d, v, torch.bfloat16, DEV)
    rows = (y != -100).nonzero().squeeze(1)
    labels = y[rows]
    norm = klp.logprob_forward(h, w, None, labels, rows).norm
    g = torch.randn_like(norm[0])

    def run_kind(kind, cfg, chunk_bytes=_tiles.CHUNK_BYTES):
        if kind == "forward":
            return klp.logprob_forward(h, w, None, labels, rows, config=cfg)
        return klp.logprob_backward(h, w, None, labels, rows, norm, None, g, None, None,
                                    config=cfg, chunk_bytes=chunk_bytes)

    for bm, bn, bk, gm, warps, stages, tma in [
            (128, 256, 64, 16, 8, 3, False), (128, 256, 64, 16, 8, 3, True),
            (128, 256, 64, 16, 8, 4, True), (128, 128, 64, 16, 8, 4, True),
            (128, 256, 64, 8, 8, 3, True), (128, 256, 64, 32, 8, 3, True)]:
        cfg = {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": gm, "TMA": tma, "num_warps": warps,
               "num_stages": stages}
        for kind in ("forward", "backward"):
            record(kind, cfg, lambda kind=kind, cfg=cfg: run_kind(kind, cfg))
    # the tile and K loops fused by the compiler
    cfg = {**klp.block_config("forward", torch.bfloat16), "FLATTEN": True}
    record("forward flattened", cfg, lambda cfg=cfg: run_kind("forward", cfg))
    for bn in (256, 128):  # a softcap's extra tile: 128 x 256 spills (backward_config: 128)
        cfg = {**klp.block_config("backward", torch.bfloat16), "BN": bn}
        record("backward softcap", cfg, lambda cfg=cfg: klp.logprob_backward(
            h, w, None, labels, rows, norm, None, g, None, None, softcap=30.0, config=cfg))
    with unbudgeted_chunk():
        for mib in (128, 256, 1024):
            record(f"backward chunk {mib} MiB", klp.block_config("backward", torch.bfloat16),
                   lambda mib=mib: run_kind("backward", None, mib << 20))


@contextlib.contextmanager
def unbudgeted_chunk():
    """The backward's dX chunk as ``chunk_bytes`` gives it (by default ``CHUNK_BYTES``), whatever
    the fp32 dH accumulator takes of ``WORK_BYTES``."""
    work = _tiles.WORK_BYTES
    _tiles.WORK_BYTES = 1 << 40
    try:
        yield
    finally:
        _tiles.WORK_BYTES = work


@guarded("kl-sweep")
def kl_sweep(n, d, v):
    """The KL kernels at N = n/2, all valid: the policy head against a perturbed copy."""
    h, w, _, _ = realistic_inputs(n, d, v, torch.bfloat16, DEV)
    n_kl = n // 2
    policy = kkl.Head(h[:n_kl], w, None)
    ref = kkl.Head((h[:n_kl].float() * 1.01).to(h.dtype), (w.float() * 0.99).to(w.dtype), None)
    kl_rows = torch.arange(n_kl, device=DEV)
    stats = kkl.kl_forward(policy, ref, kl_rows)
    g_kl = torch.randn(n_kl, device=DEV)

    def run_kl(kind, cfg):
        if kind == "forward":
            return kkl.kl_forward(policy, ref, kl_rows, config=cfg)
        return kkl.kl_backward(policy, ref, kl_rows, None, stats.norm, None, g_kl, None, None,
                               config=cfg)

    for bm, bn, bk, gm, warps, stages, tma, fuse in [
            (128, 128, 64, 16, 8, 3, False, False), (128, 128, 64, 16, 8, 4, True, False),
            (128, 128, 64, 16, 8, 3, True, True), (128, 128, 64, 8, 8, 3, True, True),
            (128, 128, 64, 4, 8, 3, True, True), (128, 128, 32, 8, 8, 6, True, True),
            (128, 128, 64, 32, 8, 4, True, False)]:
        cfg = {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": gm, "TMA": tma, "FUSE_K": fuse,
               "num_warps": warps, "num_stages": stages}
        for kind in ("forward", "backward"):
            record(f"KL {kind}{' fused' if fuse else ''}", cfg,
                   lambda kind=kind, cfg=cfg: run_kl(kind, cfg))
    # Gemma-2's softcap: the dX kernel that spills most since the temperature's rounded product
    capped = kkl.kl_forward(policy, ref, kl_rows, softcap=30.0)
    record("KL backward softcap", kkl.two_head_config("backward", torch.bfloat16),
           lambda: kkl.kl_backward(policy, ref, kl_rows, None, capped.norm, None, g_kl, None,
                                   None, softcap=30.0))
    kl_public_forward_by_group("KL public forward", policy.hidden, w, ref.hidden, ref.weight)


def kl_public_forward_by_group(label, h, w, hr, wr):
    """The public KL forward (its validation included) at each GROUP_M of its forward kernel,
    on the same inputs, ``--rounds`` times round-robin (a configuration's slow regime shows as
    an outlier among its rounds, not as a drift between configurations): sweep entries
    ``label``."""
    default = kkl.two_head_config
    for gm in (2, 4, 8, 16, 32) * ROUNDS:
        kkl.two_head_config = lambda kind, dtype, gm=gm: {
            **default(kind, dtype), **({"GROUP_M": gm} if kind == "forward" else {})}
        try:
            with torch.no_grad():
                record(label, kkl.two_head_config("forward", h.dtype),
                       lambda: ops.linear_kl(h, w, hr, wr, backend="triton").kl)
        finally:
            kkl.two_head_config = default


def record(kind, cfg, fn):
    try:
        entry = {"kind": kind, **cfg, "ms": bench(fn)}
    except Exception as exc:  # out of shared memory etc.
        if DRY:  # the interpreter has no such limits: a failure here is the script's
            raise
        entry = {"kind": kind, **cfg, "error": type(exc).__name__ + ": " + str(exc)[:200]}
    RESULTS["sweep"].append(entry)
    print(json.dumps(entry), flush=True)


def fastest_configs(sweep: list[dict]) -> list[str]:
    """One line per kernel family and pass: the sweep's fastest entry."""
    best: dict[str, dict] = {}
    for entry in sweep:
        group = entry["kind"].replace(" fused", "").replace(" flattened", "").split(" chunk")[0]
        if "ms" in entry and (group not in best or entry["ms"] < best[group]["ms"]):
            best[group] = entry
    return [f"fastest {group}: {e['kind']} {e['BM']}x{e['BN']}x{e['BK']} GROUP_M {e['GROUP_M']} "
            f"TMA {e.get('TMA', False)} warps {e['num_warps']} stages {e['num_stages']}: "
            f"{e['ms']:.2f} ms" for group, e in best.items()]


def table(header: list[str], rows) -> list[str]:
    """Markdown lines of a table: a blank line, the header, the rule, a line per row of cells."""
    return ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def markdown() -> str:
    lines = []
    env = RESULTS["env"]
    lines.append(f"device: {env['device']} · torch {env['torch']} · triton {env['triton']} · "
                 f"date {env['date']}")
    if "matmul" in RESULTS:
        m = RESULTS["matmul"]
        lines.append(f"measured bf16 matmul ({m['N']}x{m['d']}x{m['V']}): {m['ms']:.2f} ms = "
                     f"{m['tflops']:.0f} TFLOP/s")
    e = lambda x: "-" if x is None else f"{x:.1e}"  # noqa: E731
    lines += table(
        ["case", "N", "d", "V", "dtype", "logp", "lse (kl)", "entropy", "log Σp²", "dH", "dW",
         "db"],
        ([c["case"], c["N"], c["d"], c["V"], c["dtype"], e(c["logp"]), e(c["lse"]),
          e(c["entropy_err"]), e(c.get("collision_err")), e(c["dH"]), e(c["dW"]), e(c["db"])]
         for c in RESULTS["checks"]))
    rows = []
    for t in RESULTS["timings"]:
        shape = [t["head"], f"{t['N']} ({t['N_valid']})", t["dtype"]]
        for path in ("ours", "naive"):
            peak = t[path + "_fwdbwd_peak_mib"]
            rows.append([*shape, f"{t['entropy']:.2f}", path, f"{t[path + '_fwd_ms']:.2f}",
                         f"{t[path + '_fwdbwd_ms']:.2f}",
                         f"{100 * (t[path + '_fwd_frac'] or 0):.0f}",
                         f"{100 * (t[path + '_fwdbwd_frac'] or 0):.0f}", f"{peak:.0f}",
                         f"{peak - t['grads_mib']:.0f}"])
        rows.append([*shape, "", "input validation", f"{t['validate_ms']:.2f}", "", "", "", "",
                     ""])
        if "ours_unbudgeted_fwdbwd_ms" in t:
            peak = t["ours_unbudgeted_fwdbwd_peak_mib"]
            rows.append([*shape, "", f"ours, dX chunk {_tiles.CHUNK_BYTES >> 20} MiB (no budget)",
                         "", f"{t['ours_unbudgeted_fwdbwd_ms']:.2f}", "", "", f"{peak:.0f}",
                         f"{peak - t['grads_mib']:.0f}"])
        if t["cublas_3gemm_frac"] is None:
            continue
        shifted = t["ours_shifted_fwdbwd_peak_mib"]
        rows += [[*shape, "", "cuBLAS logits+dH+dW", "", f"{t['cublas_3gemm_ms']:.2f}", "",
                  f"{100 * (t['cublas_3gemm_frac'] or 0):.0f}", "", ""],
                 [*shape, "", "ours, hidden h[:, :-1]", "", f"{t['ours_shifted_fwdbwd_ms']:.2f}",
                  "", "", f"{shifted:.0f}", f"{shifted - t['grads_mib']:.0f}"]]
    lines += table(["head", "N (valid)", "dtype", "entropy", "path", "fwd ms", "fwd+bwd ms",
                    "fwd % mm", "fwd+bwd % mm", "peak fwd+bwd MiB", "peak − grads MiB"], rows)
    if RESULTS.get("losses"):
        lines += table(["losses: triton vs reference", "loss", "aux", "dH", "dW",
                        "triton twice: bitwise"],
                       ([c["case"], *(e(c[k]) for k in ("loss", "aux", "dH", "dW")),
                         "yes" if c["repeat_identical"] else "NO"] for c in RESULTS["losses"]))
    if RESULTS.get("overhead"):
        lines += table(["public call", "wall ms", "host until return ms", "device busy ms"],
                       ([o["op"], *(f"{o[k]:.2f}" for k in ("wall_ms", "host_ms",
                                                             "device_busy_ms"))]
                        for o in RESULTS["overhead"]))
    filter_cells = lambda f: [f"{f['kept_fraction']:.2f}", f"{f['exact_ms']:.2f}",  # noqa: E731
                              f"{f['filtered_ms']:.2f}"]
    if RESULTS.get("filtered"):
        lines += table(["zipf", "N (valid)", "entropy", "kept tiles", "exact fwd+bwd ms",
                        "filtered fwd+bwd ms", "cuBLAS 3 GEMMs ms", "dH vs exact", "dW vs exact"],
                       ([f["zipf"], f"{f['N']} ({f['N_valid']})", f"{f['entropy']:.2f}",
                         *filter_cells(f), f"{f['cublas_3gemm_ms']:.2f}",
                         e(f["dH_vs_exact"]), e(f["dW_vs_exact"])] for f in RESULTS["filtered"]))
    if RESULTS.get("kl_filtered"):
        lines += table(["KL filtered", "reference", "zipf", "N", "entropy", "kept tiles",
                        "exact fwd+bwd ms", "filtered fwd+bwd ms", "dH vs exact", "dW vs exact"],
                       ([f["direction"], f["reference"], f["zipf"], f["N"], f"{f['entropy']:.2f}",
                         *filter_cells(f), e(f["dH_vs_exact"]), e(f["dW_vs_exact"])]
                        for f in RESULTS["kl_filtered"]))
    if RESULTS["sweep"]:
        lines += table(["kind", "BM", "BN", "BK", "GROUP_M", "TMA", "warps", "stages", "ms"],
                       ([w["kind"], w["BM"], w["BN"], w["BK"], w["GROUP_M"], w.get("TMA", False),
                         w["num_warps"], w["num_stages"],
                         f"{w['ms']:.2f}" if "ms" in w else w["error"][:60]]
                        for w in RESULTS["sweep"]))
        lines += ["", *fastest_configs(RESULTS["sweep"])]
    if RESULTS["errors"]:
        lines += ["", "errors in: " + ", ".join(e["section"] for e in RESULTS["errors"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smaller correctness shapes; time only 16384 tokens, bf16")
    p.add_argument("--sweep", action="store_true", help="also sweep block configurations")
    p.add_argument("--only", default="", metavar="SECTION,...",
                   help="run only these sections (and the matmul rate)")
    p.add_argument("--rounds", type=int, default=1, metavar="R",
                   help="time the public KL forward at each GROUP_M R times, round-robin")
    p.add_argument("--dry", action="store_true",
                   help="every section on the CPU, interpreted, at small shapes (a test)")
    args = p.parse_args(argv)
    ONLY.update(filter(None, (name.strip() for name in args.only.split(","))))
    if ONLY - set(SECTIONS):
        p.error(f"--only: no section {', '.join(sorted(ONLY - set(SECTIONS)))}; the sections: "
                + ", ".join(SECTIONS))
    args.sweep |= bool(ONLY & {"sweep", "kl-sweep"})
    if args.rounds < 1:
        p.error(f"--rounds: expected at least 1, got {args.rounds}")
    global ROUNDS
    ROUNDS = args.rounds
    if args.dry != DRY or (os.environ.get("TRITON_INTERPRET") == "1") != DRY:
        p.error("--dry runs as a script with TRITON_INTERPRET=1 in the environment, and only "
                "--dry runs with it")
    device = "CPU, dry run" if DRY else torch.cuda.get_device_name()
    RESULTS["env"] = {"device": device, "torch": torch.__version__,
                      "triton": triton.__version__, "python": platform.python_version(),
                      "date": time.strftime("%Y-%m-%d")}
    correctness(args.quick)
    d, v = LLAMA
    sizes = [16384] if args.quick or DRY else [4096, 16384]
    sizes = [tokens(n) for n in sizes]
    rate = matmul_rate(sizes[-1] // 2, d, v)
    for n in sizes:
        timings(n, d, v, torch.bfloat16, "llama3-8b", rate)
    timings(sizes[-1], d, v, torch.bfloat16, "llama3-8b", rate, tma=False)
    # issue 3's target shape: every token valid
    timings(sizes[-1], d, v, torch.bfloat16, "llama3-8b all valid", rate, prompt_fraction=0.0)
    if not args.quick:
        timings(tokens(4096), d, v, torch.float32, "llama3-8b", rate)
    kl_correctness(args.quick)
    for tma in (None, False):
        kl_timings(tokens(8192), d, v, torch.bfloat16, "llama3-8b", rate, tma=tma)
    for zipf in (1.5, 2.0):
        filtered_timings(sizes[-1], d, v, zipf, rate)
    filtered_timings(sizes[-1], d, v, 2.0, rate, prompt_fraction=0.0)  # issue 3's shape
    for direction, distance in (("reverse", 0.01), ("forward", 0.01), ("reverse", None)):
        kl_filtered(tokens(8192), d, v, 2.0, direction, distance)
    losses_check()
    profile_forward(sizes[-1], d, v)
    overhead(sizes[-1], d, v)
    if args.sweep:
        sweep(sizes[-1], d, v)
        kl_sweep(sizes[-1], d, v)
    save()
    print("\n" + markdown())
    return 1 if RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
