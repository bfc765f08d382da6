"""``fast_interpreter``: on the installed triton it applies (without it the suite took twice as
long and overran CI's time), and interpreted kernels that call helpers compute as before."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from kernel_helpers import INTERPRET

pytestmark = pytest.mark.skipif(not INTERPRET, reason="the Triton interpreter only")


@triton.jit
def _row_sum(x_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)  # triton.language.standard: a helper of tl.core
    offs = tl.arange(0, BLOCK)
    return tl.sum(acc + tl.load(x_ptr + offs, mask=offs < n, other=0.0), axis=0)


@triton.jit
def _sums_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    tl.store(out_ptr + row, _row_sum(x_ptr + row * n, n, BLOCK) * 2.0)


def test_the_repeated_patching_is_skipped_on_this_triton():
    from triton.runtime import interpreter

    assert interpreter._patch_lang.__qualname__.startswith("install.")


def test_kernels_calling_helpers_compute_as_before():
    x = torch.randn(5, 37)
    for _ in range(2):  # a second launch patches afresh
        out = torch.empty(5)
        _sums_kernel[(5,)](x, out, 37, BLOCK=64)
        torch.testing.assert_close(out, 2 * x.sum(1))
