"""Host-side tiling arithmetic shared by the kernel families (``kernels/_tiles.py``)."""

from __future__ import annotations

from hypo_fast.kernels._tiles import best_split
from hypothesis import given
from hypothesis import strategies as st


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
