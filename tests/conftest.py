"""Test-session setup.

Without a CUDA GPU the Triton kernels run under Triton's interpreter, which is switched on by the
``TRITON_INTERPRET`` environment variable and read when triton is imported (and when
``hypo_fast.kernels`` reads it to pick its interpreter block sizes). So it is set here, before
anything imports triton or hypo_fast: ``import torch`` alone does not import triton.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

