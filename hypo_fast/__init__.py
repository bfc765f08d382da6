"""hypo_fast: fused lm_head + log-softmax kernels and preference losses without N x V logits."""

__version__ = "0.1.0"
