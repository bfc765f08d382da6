"""Host-side helpers shared by the kernel families (``kernels/_tiles.py``): the split search,
the launcher that fits pipeline stages to the card's shared memory, and the backward's chunk
size and peak memory."""

from __future__ import annotations

import pytest
import torch
from hypo_fast.kernels import _tiles
from hypo_fast.kernels._tiles import best_split, chunked_head_backward, launch
from hypothesis import given
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile
from triton.runtime.errors import OutOfResources


@given(n_row_blocks=st.integers(1, 600), n_tiles=st.integers(1, 2100),
       sms=st.sampled_from([1, 8, 108, 132, 144]))
def test_best_split_covers_the_vocabulary_in_the_fewest_waves_x_tiles(n_row_blocks, n_tiles,
                                                                       sms):
    splits, tiles = best_split(n_row_blocks, n_tiles, sms)
    assert splits * tiles >= n_tiles > (splits - 1) * tiles  # every tile once, no empty split

    def cost(t: int) -> int:
        return -(-n_row_blocks * -(-n_tiles // t) // sms) * t

    work = n_row_blocks * n_tiles
    min_tiles = max(1, min(8, work // (2 * sms), n_tiles))
    assert tiles >= min_tiles
    assert all(cost(tiles) <= cost(t) for t in range(min_tiles, n_tiles + 1))
    if work >= 16 * sms:  # two waves of 8-tile programs: no program gets fewer than 8 tiles
        assert tiles >= min(8, n_tiles)


class _Kernel:
    """Stands for a Triton kernel that runs only at ``fits`` pipeline stages or fewer."""

    def __init__(self, fits: int) -> None:
        self.fits, self.stages = fits, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.stages.append(kwargs["num_stages"])
            if kwargs["num_stages"] > self.fits:
                raise OutOfResources(147456, 101376, "shared memory")

        return run


def test_launch_drops_pipeline_stages_until_the_kernel_fits_and_remembers_it():
    kernel = _Kernel(fits=2)
    launch(kernel, (1,), 0, BM=128, num_warps=8, num_stages=4)
    assert kernel.stages == [4, 3, 2]
    launch(kernel, (1,), 0, BM=128, num_warps=8, num_stages=4)
    assert kernel.stages == [4, 3, 2, 2]  # the fitting count, first time
    launch(kernel, (1,), 0, BM=64, num_warps=8, num_stages=4)  # other constants: tried anew
    assert kernel.stages[4:] == [4, 3, 2]
    launch(kernel, (1,), torch.zeros(1), BM=64, num_warps=8, num_stages=4)  # other dtypes too
    assert kernel.stages[7:] == [4, 3, 2]


def test_launch_raises_when_even_one_stage_does_not_fit():
    kernel = _Kernel(fits=0)
    with pytest.raises(OutOfResources):
        launch(kernel, (1,), num_stages=2)
    assert kernel.stages == [2, 1]


def test_launch_does_not_trade_stages_for_other_resources():
    class Threads(_Kernel):
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.stages.append(kwargs["num_stages"])
                raise OutOfResources(2048, 1024, "threads")

            return run

    kernel = Threads(fits=0)
    with pytest.raises(OutOfResources, match="threads"):
        launch(kernel, (1,), num_stages=3)
    assert kernel.stages == [3]


@pytest.mark.parametrize(("need_hidden", "work_tiles", "chunk_tiles", "expected"), [
    (True, 2, 100, 2),  # what the fp32 dH accumulator leaves: 2 tiles of columns
    (True, 0, 100, 1),  # nothing left: the floor
    (True, 4, 3, 3),  # chunk_bytes below the budget: chunk_bytes (last chunk partial)
    (False, 0, 100, 20),  # no accumulator: chunk_bytes alone (the whole vocabulary here)
])
def test_dx_chunk_shares_a_budget_with_the_dh_accumulator(monkeypatch, need_hidden, work_tiles,
                                                          chunk_tiles, expected):
    n, d, V, bn = 16, 8, 640, 32
    tile_bytes = n * 4 * bn  # one [n, bn] fp32 tile of dX
    monkeypatch.setattr(_tiles, "WORK_BYTES", 4 * n * d + work_tiles * tile_bytes)
    monkeypatch.setattr(_tiles, "MIN_CHUNK_BYTES", tile_bytes)
    widths = []

    def fill(dx, db_part, start, cols):
        widths.append(cols)
        dx[:, :cols] = 1.0

    hidden, weight = torch.randn(n, d, dtype=torch.float64), torch.randn(V, d, dtype=torch.float64)
    dh, dw, _ = chunked_head_backward(
        hidden.float(), weight.float(), torch.arange(n), fill, cfg={"BM": 16, "BN": bn},
        need_hidden=need_hidden, need_weight=True, need_bias=False,
        chunk_bytes=chunk_tiles * tile_bytes)
    width = expected * bn
    assert widths == [min(width, V - start) for start in range(0, V, width)]
    # dX = 1: every row of dW is the column sum of H, every row of dH that of W
    torch.testing.assert_close(dw.double(), hidden.sum(0).expand(V, d), rtol=1e-5, atol=1e-5)
    if need_hidden:
        torch.testing.assert_close(dh.double(), weight.sum(0).expand(n, d), rtol=1e-5, atol=1e-4)
    else:
        assert dh is None


@pytest.mark.parametrize("all_rows", [False, True])
def test_the_dx_chunk_is_freed_before_dh_is_rounded(all_rows):
    """The peak stays that of the chunk loop: when the fp32 dH accumulator is rounded to the
    input dtype (the call's last allocation), only dW and the accumulator are live beside it.
    (A view of the last chunk once outlived the loop: 64-128 MiB more at the benchmarks'
    shapes.) Allocations are followed with the profiler's CPU memory events."""
    n, d, V, bn = 16, 24, 640, 32
    hidden, weight = torch.randn(n, d).bfloat16(), torch.randn(V, d).bfloat16()
    rows = torch.arange(n)

    def fill(dx, db_part, start, cols):
        dx[:, :cols] = 1.0

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        dh, dw, _ = chunked_head_backward(
            hidden, weight, rows, fill, cfg={"BM": 16, "BN": bn}, need_hidden=True,
            need_weight=True, need_bias=False, chunk_bytes=4 * bn * n * 2, all_rows=all_rows)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    deltas = [e.self_cpu_memory_usage for e in events if e.self_cpu_memory_usage]
    last_alloc = max(i for i, b in enumerate(deltas) if b > 0)
    assert deltas[last_alloc] == dh.numel() * 2
    assert sum(deltas[:last_alloc + 1]) == dw.numel() * 2 + n * d * 4 + dh.numel() * 2
    torch.testing.assert_close(dh.float(), weight.float().sum(0).expand(n, d), rtol=1e-2, atol=0.5)
