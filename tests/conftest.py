"""Test-session setup.

Without a CUDA GPU the Triton kernels run under Triton's interpreter, which is switched on by the
``TRITON_INTERPRET`` environment variable and read when triton is imported (and when
``hypo_fast.kernels`` reads it to pick its interpreter block sizes). So it is set here, before
anything imports triton or hypo_fast: ``import torch`` alone does not import triton.
"""

from __future__ import annotations

import os

import fast_interpreter
import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    fast_interpreter.install()

# CI draws the same examples on every run (a red CI must mean a change broke something); local
# runs keep drawing new ones, which is how the edge cases get found.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")



@pytest.fixture
def fresh_accelerate():
    """Accelerate's process-wide state forgotten before and after the test (it is a singleton:
    one test's settings would otherwise carry into the next)."""
    from hf_helpers import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()
