"""Host-side helpers shared by the kernel families (``kernels/_tiles.py``): the split search
and the launcher that fits pipeline stages to the card's shared memory."""

from __future__ import annotations

import pytest
import torch
from hypo_fast.kernels._tiles import best_split, launch
from hypothesis import given
from hypothesis import strategies as st
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
