"""What the tests of the fused kernels (test_linear_logprob.py, test_linear_kl.py, test_filter.py)
share: where they run, the dtypes and tolerances, relative errors, input layouts, gradients.

A plain module, not a test file: pytest puts tests/ on ``sys.path`` (rootdir-relative imports,
tests/ has no ``__init__.py``), so the test files ``from kernel_helpers import ...``. conftest.py
has set ``TRITON_INTERPRET`` by the time this is imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, assume, settings

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
CPU = torch.device("cpu")


def on(backend: str) -> torch.device:
    """Where a backend's inputs live: the kernels' DEVICE for triton, the CPU for the others
    (the reference takes any device; the cpu backend is meant for CPU tensors)."""
    return DEVICE if backend == "triton" else CPU


needs_triton = pytest.mark.skipif(
    DEVICE.type == "cpu" and not INTERPRET,
    reason="the triton backend needs a CUDA GPU or TRITON_INTERPRET=1 (see tests/conftest.py)",
)

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
VALUE_TOL = 1e-5
GRAD_TOL = {F32: 1e-5, BF16: 2e-2, F16: 2e-2}
# the property tests' settings but for max_examples: settings(HYP_BASE, max_examples=...)
HYP_BASE = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
INPUTS = ("hidden", "weight", "bias", "token_weights")  # the differentiable inputs of a head
SIZE_EDGES = [1, 2, 31, 32, 33, 63, 64, 65, 127, 129]  # around the interpreter's blocks


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    """‖a − b‖ / ‖b‖ (or / scale) in fp64; the absolute ‖a − b‖ where the denominator is 0."""
    a, b = a.detach().to("cpu", F64), b.detach().to("cpu", F64)
    diff = (a - b).norm().item()
    norm = b.norm().item() if scale is None else scale
    return diff / norm if norm > 0 else diff


def assert_comparable(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Same shape and dtype, and ``got`` finite."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert bool(torch.isfinite(got).all()), f"{name}: not finite"


def representable(g_out: dict, g_ref: dict) -> dict:
    """``g_ref`` without the gradients whose true values exceed the input dtype's range (fp16
    at extreme scales): the spec's, cast to that dtype, are ±inf there and cannot be compared;
    the kernels' may be ±inf too, never NaN. With none left the example is rejected
    (``hypothesis.assume``: outside a property test that raises)."""
    over = {k for k, v in g_ref.items() if v is not None and not bool(torch.isfinite(v).all())}
    for k in over:
        assert not bool(torch.isnan(g_out[k]).any()), f"d{k}: NaN where the gradient overflows"
    kept = {k: v for k, v in g_ref.items() if k not in over}
    if not kept:  # called only then: hypothesis deprecates assume() outside a property test
        assume(False)
    return kept


def assert_rel(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert_comparable(name, got, want)
    err = rel_err(got, want)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


def assert_same_over_chunks(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """A gradient each vocabulary chunk writes whole by one library GEMM (dW) is the same bit for
    bit over any chunking, but for 16-bit GEMMs on CUDA: cuBLAS picks its kernel by the chunk's
    shape and may add split-K partial sums in 16 bits (torch's
    ``allow_bf16_reduced_precision_reduction``), so there it is within the dtype's resolution
    (H200: 2.6e-3 at bf16, ``benchmarks/RESULTS.md`` run 12)."""
    if got.is_cuda and got.dtype in (BF16, F16):
        assert_rel(name, got, want, torch.finfo(got.dtype).eps)
    else:
        assert torch.equal(got, want), name


def kernel_forbidder(module, *launchers: str):
    """``forbid_kernels(monkeypatch)``: make any call of ``module``'s ``launchers`` (the fused
    kernels) fail the test."""

    def forbid_kernels(monkeypatch) -> None:
        def boom(*args, **kwargs):
            raise AssertionError("a fused kernel ran")

        for name in launchers:
            monkeypatch.setattr(module, name, boom)

    return forbid_kernels


def layout(t: torch.Tensor, kind: str, grad: bool = True) -> torch.Tensor:
    """The same values as ``t`` in another memory layout, a view of a fresh leaf (requiring grad
    if ``grad``) on ``t``'s device: ``contig``; ``transposed`` (last dim not unit-stride);
    ``sliced`` (a window of a wider and longer buffer); ``rowstep`` (every other row of a taller
    buffer)."""
    t = t.detach()
    if kind == "contig":
        base, view = t.clone(), lambda b: b
    elif kind == "transposed":
        perm = list(range(t.dim()))[::-1]
        base, view = t.permute(perm).contiguous(), lambda b: b.permute(perm)
    elif kind == "sliced":
        window = tuple(slice(1, 1 + n) for n in t.shape)
        base = torch.zeros([n + 3 for n in t.shape], dtype=t.dtype, device=t.device)
        base[window] = t
        view = lambda b: b[window]  # noqa: E731
    elif kind == "rowstep":
        base = torch.zeros((*t.shape[:-2], 2 * t.shape[-2], t.shape[-1]), dtype=t.dtype,
                           device=t.device)
        base[..., ::2, :] = t
        view = lambda b: b[..., ::2, :]  # noqa: E731
    else:
        raise AssertionError(kind)
    return view(base.requires_grad_(grad))


def combined_loss(out, coefs, names=None) -> torch.Tensor:
    """A random linear combination ``Σ coefs[name] · out.<name>`` of the outputs ``names``
    (default: every one ``coefs`` has) that ``out`` has."""
    names = list(coefs if names is None else names)
    loss = torch.zeros((), device=coefs[names[0]].device)
    for name in names:
        value = getattr(out, name)
        if value is not None:
            loss = loss + (coefs[name] * value).sum()
    return loss


def grads(loss: torch.Tensor, inputs, unused: str = "raise") -> dict[str, torch.Tensor | None]:
    """Gradients of ``loss`` w.r.t. every differentiable input present (``INPUTS``), by name.

    ``unused``: ``"raise"``, every one must get a gradient (and the graph is freed); ``"none"`` or
    ``"zeros"``, the graph is retained and an input the loss does not reach gets None, or zeros
    (as does every input, for ``"zeros"``, when the loss is a constant)."""
    assert unused in ("raise", "none", "zeros"), unused
    names = [k for k in INPUTS if inputs[k] is not None]
    if unused == "zeros" and not loss.requires_grad:
        return {k: torch.zeros_like(inputs[k]) for k in names}
    keep = unused != "raise"
    got = torch.autograd.grad(loss, [inputs[k] for k in names], retain_graph=keep,
                              allow_unused=keep)
    if unused == "zeros":
        got = [torch.zeros_like(inputs[k]) if g is None else g
               for k, g in zip(names, got, strict=True)]
    return dict(zip(names, got, strict=True))


@contextmanager
def tma_loads(on: bool) -> Iterator[None]:
    """Kernels launched inside load through tensor descriptors (``HYPO_FAST_TMA``) or not."""
    old = os.environ.get("HYPO_FAST_TMA")
    os.environ["HYPO_FAST_TMA"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["HYPO_FAST_TMA"]
        else:
            os.environ["HYPO_FAST_TMA"] = old
