"""Inputs and competitor paths shared by the benchmarks (DESIGN.md §5).

``naive_logprob`` is what TRL does: logits by the head's own matmul in the input dtype, then an
fp32 log-softmax and a gather; the N x V logits live in memory. ``realistic_inputs`` scales the
head so the softmax looks like a trained LM's (a few nats of entropy), and reports that entropy.
"""

from __future__ import annotations

import torch

HEADS = {
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "gemma2-2b": (2304, 256000),
}


def naive_logprob(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  ignore_index: int = -100) -> torch.Tensor:
    """Per-token ``log softmax(H @ W.T)[y]`` (fp32, 0 where ignored), TRL's way."""
    return logprob_of_logits(torch.nn.functional.linear(hidden, weight).float(), labels,
                             ignore_index)


def logprob_of_logits(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
                      ) -> torch.Tensor:
    """Per-token ``log softmax(logits)[y]`` (0 where ignored)."""
    valid = labels != ignore_index
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)


def mean_entropy(hidden: torch.Tensor, weight: torch.Tensor, rows: int = 256) -> float:
    """Mean per-token entropy (nats) of the head's softmax over the first ``rows`` rows."""
    z = hidden[:rows].float() @ weight.float().T
    logp = torch.log_softmax(z, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def realistic_inputs(
    n: int, d: int, v: int, dtype: torch.dtype, device: str, *, target_entropy: float = 3.0,
    prompt_fraction: float = 0.5, zipf: float = 0.0, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(hidden [n, d], weight [v, d], labels [n], entropy)`` with the weight scaled so the mean
    entropy is near ``target_entropy``, labels drawn from the head's own softmax (so the label
    is usually a likely token, as for a trained model), and a leading ``prompt_fraction`` of
    every 512-token sequence ignored (of the one sequence when ``n < 512``).

    ``zipf > 0`` adds a token-frequency prior ``-zipf·log(1 + j)`` to every logit (through a
    constant hidden coordinate, so the head stays bias-free): low token ids are frequent, as in
    BPE vocabularies whose early merges are the common tokens. That shared structure is what
    gradient filtering exploits; without it the likely tokens of different rows scatter over
    the whole vocabulary.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, device=device, dtype=torch.float32)
    base = torch.randn(v, d, generator=g, device=device, dtype=torch.float32) / d**0.5
    prior = -zipf * torch.log1p(torch.arange(v, device=device, dtype=torch.float32))
    if zipf > 0:
        hidden[:, 0] = 1.0

    def head(scale: float) -> torch.Tensor:
        w = base * scale
        if zipf > 0:
            w[:, 0] = prior
        return w

    lo, hi = 0.01, 50.0
    for _ in range(24):
        scale = (lo * hi) ** 0.5
        if mean_entropy(hidden, head(scale)) > target_entropy:
            lo = scale
        else:
            hi = scale
    weight = head(scale).to(dtype)
    hidden = hidden.to(dtype)
    labels = torch.empty(n, dtype=torch.long, device=device)
    for start in range(0, n, 4096):
        z = hidden[start:start + 4096].float() @ weight.float().T
        labels[start:start + 4096] = torch.multinomial(torch.softmax(z, -1), 1, generator=g)[:, 0]
    seq = min(n, 512)  # one shorter sequence when n < 512 (a dry run)
    position = torch.arange(n, device=device) % seq
    labels[position < int(seq * prompt_fraction)] = -100
    return hidden, weight, labels, mean_entropy(hidden, weight)
