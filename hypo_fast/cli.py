"""The ``hypo-fast`` command.

``hypo-fast quickstart`` runs one DPO step (forward + backward) on random hidden states at a
realistic shape: per-sequence summed log-probs of the policy and reference heads, then
:func:`hypo_fast.objectives.dpo_loss`. It prints the loss, the accuracy, the shape, the wall time
and the peak memory of the log-prob path of the chosen backend (``--backend``: ``auto`` = triton
for CUDA tensors, the reference on the CPU).

``hypo-fast train`` preference-trains a Hugging Face causal LM (:mod:`hypo_fast.train_job`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch

from . import train_job
from .objectives import dpo_loss
from .ops import BACKENDS, linear_logprob, resolve_backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BETA = 0.1
REF_NOISE = 0.05  # reference head = policy head + REF_NOISE x (its scale) x N(0, 1/d) noise
TARGET_ENTROPY = 3.0  # nats per completion token, capped at log(V)/2 for small vocabularies


@dataclass
class QuickstartInputs:
    hidden: torch.Tensor  # [2P, L, d]: sequences 0..P-1 chosen, P..2P-1 rejected
    weight: torch.Tensor  # [V, d] policy head
    ref_weight: torch.Tensor  # [V, d] reference head
    labels: torch.Tensor  # [2P, L], first L // 2 tokens of each sequence = -100 (prompt)
    seq_ids: torch.Tensor  # [2P, L]
    pairs: int
    logit_scale: float
    mean_entropy: float  # of the policy over the completion tokens, nats


def _entropy(z: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(z, -1)
    return -(logp.exp() * logp).sum(-1)


def build_inputs(pairs: int, seq_len: int, d: int, vocab: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 seed: int = 0) -> QuickstartInputs:
    """Random hidden states and heads whose softmax looks like a trained LM's: the logit scale is
    bisected so the mean entropy is about TARGET_ENTROPY nats, and the completion labels are
    sampled from the policy. Generated on the CPU (same numbers on every device)."""
    g = torch.Generator().manual_seed(seed)
    n_seq, prompt = 2 * pairs, seq_len // 2
    hidden = torch.randn(n_seq, seq_len, d, generator=g)
    w0 = torch.randn(vocab, d, generator=g) / math.sqrt(d)  # unit-variance logits
    completion = hidden[:, prompt:].reshape(-1, d)

    target = min(TARGET_ENTROPY, 0.5 * math.log(vocab))
    z0 = completion[:32] @ w0.T
    lo, hi = 0.0, 64.0  # entropy falls as the logit scale grows
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _entropy(mid * z0).mean() > target else (lo, mid)
    scale = 0.5 * (lo + hi)
    weight = w0.mul_(scale)
    ref_weight = weight + (REF_NOISE * scale / math.sqrt(d)) * torch.randn(
        vocab, d, generator=g)

    labels = torch.full((n_seq, seq_len), -100, dtype=torch.long)
    sampled, ent_sum = [], 0.0
    for rows in completion.split(256):  # chunks keep the set-up peak memory small
        logp = torch.log_softmax(rows @ weight.T, -1)
        p = logp.exp()
        ent_sum -= float((p * logp).sum())
        sampled.append(torch.multinomial(p, 1, generator=g)[:, 0])
    if completion.shape[0]:
        labels[:, prompt:] = torch.cat(sampled).reshape(n_seq, seq_len - prompt)
    seq_ids = torch.arange(n_seq)[:, None].expand(n_seq, seq_len).contiguous()
    return QuickstartInputs(
        hidden=hidden.to(device, dtype), weight=weight.to(device, dtype),
        ref_weight=ref_weight.to(device, dtype), labels=labels.to(device),
        seq_ids=seq_ids.to(device), pairs=pairs, logit_scale=scale,
        mean_entropy=ent_sum / max(completion.shape[0], 1),
    )


def _max_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _device(args: argparse.Namespace) -> torch.device:
    """``--device``, by default the GPU when torch sees one."""
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def run_quickstart(args: argparse.Namespace) -> dict:
    """One DPO forward + backward on :func:`build_inputs`: loss, accuracy, wall time and peak
    memory (CUDA's allocator peak, or the process's RSS high-water mark on the CPU)."""
    device = _device(args)
    inp = build_inputs(args.pairs, args.seq_len, args.hidden, args.vocab,
                       dtype=DTYPES[args.dtype], device=device, seed=args.seed)
    backend = resolve_backend(None if args.backend == "auto" else args.backend, device)

    def logprob(h, w, labels, **kwargs):
        return linear_logprob(h, w, labels, backend=backend, **kwargs)

    hidden = inp.hidden.requires_grad_()
    weight = inp.weight.requires_grad_()
    n_seq, P = 2 * inp.pairs, inp.pairs
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device)
    else:
        mem0 = _max_rss_bytes()

    t0 = time.perf_counter()
    pol = logprob(hidden, weight, inp.labels, seq_ids=inp.seq_ids, num_seqs=n_seq)
    with torch.no_grad():
        ref = logprob(inp.hidden.detach(), inp.ref_weight, inp.labels, seq_ids=inp.seq_ids,
                      num_seqs=n_seq)
    loss, metrics = dpo_loss(pol.seq_sum[:P], pol.seq_sum[P:], ref.seq_sum[:P],
                             ref.seq_sum[P:], beta=BETA)
    loss.backward()
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0

    if cuda:
        peak, peak_label = torch.cuda.max_memory_allocated(device) - mem0, "CUDA memory"
    else:
        rss1 = _max_rss_bytes()
        peak = None if mem0 is None else rss1 - mem0
        peak_label = "RSS (ru_maxrss high-water mark, CPU)"
    return dict(
        loss=float(loss.detach()), accuracy=float(metrics["accuracy"]), wall_s=wall,
        backend=backend,
        peak_bytes=peak, peak_label=peak_label, device=str(device), inputs=inp,
        grad_norms=(float(hidden.grad.norm()), float(weight.grad.norm())),
    )


def _print_quickstart(args: argparse.Namespace, r: dict) -> None:
    inp, L = r["inputs"], args.seq_len
    n_seq = 2 * args.pairs
    print(f"hypo-fast quickstart: DPO (sigmoid, beta={BETA}), backend={r['backend']}, "
          f"device={r['device']}, dtype={args.dtype}")
    print(f"shape: {args.pairs} pairs x 2 x {L} tokens ({L // 2} prompt, ignored) = "
          f"N={n_seq * L} tokens, d={args.hidden}, V={args.vocab}")
    print(f"policy mean entropy over completion tokens: {inp.mean_entropy:.3f} nats "
          f"(logit scale {inp.logit_scale:.3f}, log V = {math.log(args.vocab):.2f})")
    print(f"loss: {r['loss']:.10g}")
    print(f"accuracy: {r['accuracy']:.4g}")
    print(f"grad norms: |dL/dH| = {r['grad_norms'][0]:.4g}, |dL/dW| = {r['grad_norms'][1]:.4g}")
    print(f"wall time (policy fwd+bwd, reference fwd, loss): {r['wall_s']:.3f} s")
    peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f} MiB"
    print(f"peak {r['peak_label']} increase during that path: {peak}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``hypo-fast`` command line: ``quickstart`` and ``train``."""
    parser = argparse.ArgumentParser(prog="hypo-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="one DPO forward+backward on random hidden states")
    q.add_argument("--pairs", type=_positive_int, default=2, help="preference pairs")
    q.add_argument("--seq-len", type=_positive_int, default=512,
                   help="tokens per sequence; the first half is prompt (ignored)")
    q.add_argument("--hidden", type=_positive_int, default=1024, help="hidden size d")
    q.add_argument("--vocab", type=_positive_int, default=32000, help="vocabulary size V")
    q.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    q.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="auto: triton for CUDA tensors, else the CPU path (the reference)")
    train_job.add_arguments(sub.add_parser(
        "train", help="preference-train a Hugging Face causal LM on a JSON-lines file",
        description=train_job.DESCRIPTION))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hypo-fast``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "quickstart":
        if args.vocab < 2:
            parser.error("--vocab must be at least 2")
        try:
            device = _device(args)
        except RuntimeError as e:  # not a device name torch knows
            parser.error(f"--device {args.device}: {e}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA device")
        if args.backend != "auto":
            try:
                resolve_backend(args.backend, device)
            except ValueError as e:
                parser.error(f"--backend {args.backend}: {e}")
        _print_quickstart(args, run_quickstart(args))
    elif args.command == "train":
        train_job.run(args.parser, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
