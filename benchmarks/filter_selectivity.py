"""How much of the backward gradient filtering skips, on the CPU (no GPU, no kernels).

    python benchmarks/filter_selectivity.py [--rows 1024] [--d 256]

For the synthetic heads of ``baselines.realistic_inputs`` (a Llama-3-8B vocabulary, a
token-frequency prior of strength ``zipf``), computes the exact logits, every row's per-tile
log-sum-exp and maximum, and prints the fraction of (128-row block, 256-column tile) pairs that
a bf16 backward computes (ε = 2⁻¹², ``filter_eps="auto"``):

- ours: ``kernels.linear_logprob.filter_tiles`` (an L1 budget per row, provable);
- per-entry: Cut Cross-Entropy's rule, a tile skipped when every |softmax − onehot| in it is
  below ε, before the upstream gradient scales it (no bound on the sum of what it drops).

The fraction is what the filtered backward's cost scales with (1 + 3f GEMM-equivalents); d only
sets the cost of building the inputs, not the logits' distribution.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import HEADS, realistic_inputs
from hypo_fast.kernels import linear_logprob as klp

BLOCK_M, TILE_W, EPS = 128, 256, 2.0**-12


def kept_fractions(n: int, d: int, zipf: float, entropy: float) -> tuple[float, float, float]:
    """``(mean entropy, ours, per-entry)`` for one synthetic head, upstream gradients N(0, 1)."""
    v = HEADS["llama3-8b"][1]
    h, w, y, ent = realistic_inputs(n, d, v, torch.float32, "cpu", target_entropy=entropy,
                                    zipf=zipf, prompt_fraction=0.0)
    z = h @ w.T
    lse = torch.logsumexp(z, -1)
    n_tiles = triton.cdiv(v, TILE_W)
    tiles = torch.nn.functional.pad(z, (0, n_tiles * TILE_W - v), value=-1.0e30)
    tiles = tiles.view(n, n_tiles, TILE_W)
    g = torch.randn(n, generator=torch.Generator().manual_seed(1))
    ours = klp.filter_tiles(torch.logsumexp(tiles, -1).T.contiguous(), y, lse,
                            None, g, None, None, EPS, BLOCK_M, TILE_W)
    entry = (tiles.max(-1).values - lse[:, None]).exp() >= EPS
    entry[torch.arange(n), y // TILE_W] = True
    per_entry = entry.view(n // BLOCK_M, BLOCK_M, n_tiles).any(1)
    return ent, float(ours.float().mean()), float(per_entry.float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--d", type=int, default=256)
    args = p.parse_args()
    print("| zipf | target entropy | mean entropy | kept: ours | kept: per-entry |")
    print("|---|---|---|---|---|")
    for zipf in (0.0, 1.0, 1.5, 2.0):
        for entropy in (3.0, 1.5):
            ent, ours, entry = kept_fractions(args.rows, args.d, zipf, entropy)
            print(f"| {zipf} | {entropy} | {ent:.2f} | {ours:.3f} | {entry:.3f} |", flush=True)


if __name__ == "__main__":
    main()
