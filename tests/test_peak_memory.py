"""The public ops' peak memory, forward + backward, against the accounting that predicts their GPU
peaks (benchmarks/RESULTS.md, "Memory accounting, session 6").

Above the inputs and their gradients, the backward's chunk loop holds the fp32 dH accumulator
(4·d bytes per valid row), the dX chunk and, filtered, the forward's per-tile statistics; the
rounded dH is a gradient, allocated after the chunk is gone. A view of a chunk that outlives the
loop, autograd's zeros for an unused output or a stray copy of a head-sized tensor each break the
bound. Shapes are small (the Triton interpreter), with the chunk budget scaled down so that it
binds, as it does at the benchmarks' 16384 rows. Allocations are followed with the profiler's
CPU memory events, in order.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from hypo_fast.kernels import _tiles
from hypo_fast.kernels import linear_kl as KL
from hypo_fast.kernels import linear_logprob as LP
from hypo_fast.kernels._tiles import launch
from kernel_helpers import BF16, INTERPRET, gen, tma_loads
from torch.profiler import ProfilerActivity, profile

from hypo_fast import ops
from hypo_fast.losses import FusedLinearORPOLoss, HyPOLoss, _base

# On a GPU, benchmarks/gpu_check.py measures these peaks themselves.
pytestmark = pytest.mark.skipif(not INTERPRET, reason="follows CPU allocations: the interpreter")

D, V, BATCH, T = 128, 4096, 2, 32
CHUNK_COLS = 512
# Per-token outputs and indices (logp, lse, the saved log-sum-exp parts, row indices, picked
# upstream gradients): well under this many bytes per token.
PER_TOKEN = 128


def peak_and_end(fn) -> tuple[int, int]:
    """Bytes allocated at the peak and at the end of ``fn()``, counted from its start (what
    earlier tests left in reference cycles is collected first, not while ``fn`` runs)."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    assert events, "the profiler recorded no allocation"
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live


@pytest.fixture
def gpu_like_backward(monkeypatch):
    """A chunk of ``CHUNK_COLS`` columns for ``n`` valid rows, the budget binding as at 16384
    rows, and the two things the interpreter does unlike a GPU undone. The chunk's library
    GEMMs: cuBLAS writes into the given outputs, while the CPU's bf16 GEMMs allocate fp32
    copies of their operands (their values do not matter here; the gradients are tested
    elsewhere). And the interpreter keeps a launch's tensor arguments in a reference cycle, so
    a freed buffer lives on until the cyclic garbage collector runs: it runs after each launch
    here."""

    def collected(kernel, grid, *args, **kwargs):
        launch(kernel, grid, *args, **kwargs)
        gc.collect()

    for module in (_tiles, LP, KL):
        monkeypatch.setattr(module, "launch", collected)

    def budget(n: int) -> int:
        chunk = n * CHUNK_COLS * BF16.itemsize
        monkeypatch.setattr(_tiles, "WORK_BYTES", 4 * n * D + chunk)
        monkeypatch.setattr(_tiles, "MIN_CHUNK_BYTES", chunk)
        return chunk

    monkeypatch.setattr(_tiles, "_chunk_gemms", lambda *args: None)
    return budget


def assert_peak(step, hidden: torch.Tensor | tuple[torch.Tensor, ...], weight: torch.Tensor,
                n: int, held: int) -> None:
    """``step()`` (a forward and backward) peaks, above its inputs and their gradients, at most
    at its chunk loop: the fp32 dH accumulator of the ``n`` valid rows and the ``held`` bytes
    beside it, before the hidden states' gradients exist, plus per-token results; and leaves
    only per-token results beside the gradients."""
    hiddens = hidden if isinstance(hidden, tuple) else (hidden,)
    peak, end = peak_and_end(step)
    d_hidden = sum(h.numel() for h in hiddens) * BF16.itemsize
    grads = d_hidden + weight.numel() * weight.requires_grad * BF16.itemsize
    slack = PER_TOKEN * sum(h.shape[:-1].numel() for h in hiddens)
    assert 0 <= end - grads <= slack, end - grads  # the gradients, and little else
    loop = 4 * n * D + held - d_hidden
    assert peak - grads <= loop + slack, (peak - grads, loop)


def heads(seed: int, shift: bool):
    """Hidden states ``[BATCH, T + shift, D]`` and a weight ``[V, D]``, bf16, requiring grad."""
    g = gen(seed)
    hidden = torch.randn(BATCH, T + shift, D, generator=g).to(BF16).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / 8).to(BF16).requires_grad_()
    return hidden, weight


def tile_stats_bytes(kernels, tokens: int, planes: int = 1) -> int:
    """The fp32 per-tile statistics a filtered forward of ``kernels`` records for ``tokens``."""
    return 4 * planes * math.ceil(V / kernels.tile_width(BF16)) * tokens


TMA = pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])


@TMA
@pytest.mark.parametrize("shift", [False, True], ids=["hidden", "hidden[:, :-1]"])
@pytest.mark.parametrize("filter_eps", ["auto", None])
@pytest.mark.parametrize("frozen", [False, True], ids=["", "frozen head"])
def test_log_prob_peak_is_the_chunk_loop(gpu_like_backward, shift, filter_eps, frozen, tma):
    """Log-probs, every token valid: the peak above inputs and gradients is the accumulator,
    the chunk and the filter's per-tile log-sum-exps, less the rounded dH that takes the
    accumulator's place; with a causal LM's ``hidden[:, :-1]``, also the compacted copy of the
    valid rows that dW's GEMMs and the descriptor loads (a Hopper's) read: none with pointer
    loads and a frozen head (LoRA's)."""
    hidden, weight = heads(0, shift)
    weight.requires_grad_(not frozen)
    labels = torch.randint(0, V, (BATCH, T), generator=gen(1))
    n = labels.numel()
    chunk = gpu_like_backward(n)

    def step():
        h = hidden[:, :-1] if shift else hidden
        with tma_loads(tma):
            ops.linear_logprob(h, weight, labels, backend="triton",
                               filter_eps=filter_eps).logp.sum().backward()

    tile_lse = tile_stats_bytes(LP, n) if filter_eps else 0
    copy = 2 * n * D if shift and (tma or not frozen) else 0
    assert_peak(step, hidden, weight, n, chunk + tile_lse + copy)


@TMA
def test_log_prob_peak_with_the_block_sparse_backward(gpu_like_backward, monkeypatch, tma):
    """A head peaked enough for the filter to skip most tiles: the block-sparse kernels replace
    the chunk's GEMMs, reading the hidden rows in place (no compacted copy); the chunk buffer
    and the per-tile log-sum-exps stay."""
    hidden, weight = heads(10, False)
    bias = torch.zeros(V, dtype=BF16)
    bias[:32] = 30.0  # every row's mass on the first tile, as a token-frequency prior puts it
    labels = torch.randint(0, 32, (BATCH, T), generator=gen(11))
    n = labels.numel()
    chunk = gpu_like_backward(n)
    launched = []
    spy = _tiles.launch
    monkeypatch.setattr(_tiles, "launch", lambda kernel, *a, **k: (launched.append(kernel),
                                                                   spy(kernel, *a, **k)))

    def step():
        with tma_loads(tma):
            ops.linear_logprob(hidden, weight, labels, bias,
                               backend="triton").logp.sum().backward()

    assert_peak(step, hidden, weight, n, chunk + tile_stats_bytes(LP, n))
    assert _tiles._sparse_dw_kernel in launched


@TMA
@pytest.mark.parametrize("valid_every", [1, 2])
@pytest.mark.parametrize("filter_eps", [None, "auto"])
def test_kl_peak_is_the_chunk_loop(gpu_like_backward, valid_every, filter_eps, tma):
    """The KL op: the accumulator and the chunk over the valid rows, filtered the forward's
    per-tile statistics and, when some rows are masked, the compacted copy of the valid ones
    (and with descriptor loads that of the reference head's too)."""
    hidden, weight = heads(2, False)
    ref_hidden, ref_weight = (t.detach().clone() for t in heads(3, False))
    mask = (torch.arange(BATCH * T) % valid_every == 0).reshape(BATCH, T)
    n = int(mask.sum())
    chunk = gpu_like_backward(n)

    def step():
        with tma_loads(tma):
            ops.linear_kl(hidden, weight, ref_hidden, ref_weight, mask=mask, backend="triton",
                          filter_eps=filter_eps).kl.sum().backward()

    with tma_loads(tma):  # the interpreter's KL tiles are wider with descriptor loads
        tile_stats = tile_stats_bytes(KL, mask.numel(), KL.TILE_STATS)
    copies = 2 * n * D * (1 + tma) if valid_every > 1 else 0
    assert_peak(step, hidden, weight, n, chunk + copies + (tile_stats if filter_eps else 0))


@pytest.mark.parametrize("loss", ["hypo rloo", "orpo nll_target"])
def test_second_label_set_shares_one_chunk_loop(gpu_like_backward, monkeypatch, loss):
    """A loss that scores two label sets under the policy's head, HyPO (rloo: its offline pairs
    and online samples) or ORPO with ``nll_target`` (the pairs and the NLL's labels on the chosen
    rows), does it in one call over their valid tokens, gathered: one dW, one loop over all n
    rows, plus the gathered rows. (Two calls had both dWs alive while autograd added them.)
    The logits-mean metric is stubbed: on the CPU ATen sums bf16 into fp32 through an fp32
    copy of W, on CUDA in place."""
    zero = torch.zeros(())
    monkeypatch.setattr(_base, "logits_means", lambda x: (zero, zero))
    hidden, weight = heads(6, False)
    online, _ = heads(7, False)
    ref_hidden, ref_weight = (t.detach().clone() for t in heads(8, False))
    target, second = torch.randint(0, V, (2, BATCH, T), generator=gen(9))
    target[:, : T // 2] = second[:, : T // 3] = -100
    if loss == "hypo rloo":
        inputs, n_second = (hidden, online), int((second != -100).sum())

        def run():
            return HyPOLoss(backend="triton")(
                weight, hidden, target, ref_input=ref_hidden, ref_weight=ref_weight,
                online_input=online, online_target=second, online_ref_input=ref_hidden,
                group_ids=torch.tensor([0, 0]))
    else:
        inputs, n_second = hidden, int((second[: BATCH // 2] != -100).sum())

        def run():
            return FusedLinearORPOLoss(backend="triton")(weight, hidden, target, None, second)
    n = int((target != -100).sum()) + n_second
    chunk = gpu_like_backward(n)
    assert_peak(lambda: run()[0].backward(), inputs, weight, n,
                chunk + tile_stats_bytes(LP, n) + 2 * n * D)


def test_log_prob_filter_takes_four_rates_of_memory():
    """The filter's choice (before the backward's loop, and its peak with a frozen head when the
    vocabulary is large beside d) takes the bounds ``r [n_tiles, n]`` fp32 and their sort's
    values and int64 indices: four r's worth, plus bool masks (it took seven before its
    arithmetic went in place)."""
    tiles, n = 200, 512
    g = gen(4)
    lse = torch.randn(n, generator=g) + 10
    tile_lse = lse + torch.randn(tiles, n, generator=g) * 4 - 5
    labels = torch.randint(0, tiles * 64, (n,), generator=g)
    entropy, g_logp, g_entropy = torch.rand(n, generator=g), *torch.randn(2, n, generator=g)
    peak, _ = peak_and_end(lambda: LP.filter_tiles(tile_lse, labels, lse, entropy, g_logp, None,
                                                   g_entropy, 2.0**-12, 16, 64))
    rate = tiles * n * 4
    assert peak <= 4 * rate + 2 * tiles * n, peak / rate


@pytest.mark.parametrize(("reverse", "buffers"), [(True, 5), (False, 7)])
def test_kl_filter_memory(reverse, buffers):
    """The KL filter's choice: at most five [n_tiles, n] fp32 buffers at once (forward KL, with
    both masses' bounds: seven), plus bool masks; it took 13 and 15 before its arithmetic went
    in place."""
    tiles, n = 200, 512
    g = gen(5)
    stats = torch.randn(KL.TILE_STATS, tiles, n, generator=g) * 3 + 5
    norm = torch.randn(5, n, generator=g).abs() + 1
    labels = torch.randint(0, tiles * 128, (n,), generator=g)
    entropy, g_kl, g_entropy, g_logp = torch.rand(n, generator=g), *torch.randn(3, n, generator=g)
    peak, _ = peak_and_end(lambda: KL.filter_tiles(stats, norm, labels, entropy, g_kl, g_entropy,
                                                   g_logp, reverse, 1e-2, 16, 128))
    rate = tiles * n * 4
    assert peak <= buffers * rate + 2 * tiles * n, peak / rate
