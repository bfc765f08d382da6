"""What the tests on Hugging Face causal LMs (test_hf_models.py, test_trainer.py) share: tiny
Llamas built from a config (nothing is downloaded) and TRL's way of computing sequence
log-probs, from the full logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

IGN = -100


def tiny_llama(tied: bool, dtype: torch.dtype, vocab: int = 96, seed: int = 0
               ) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype)


def trl_sequence_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    """TRL's way: full logits, log-softmax in fp32 (or the model's fp64), gather the next
    token, sum per sequence. Positions from the mask, as ``generate`` makes them."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    target = labels[:, 1:]
    logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return (logp * (target != IGN)).sum(-1)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state, so the next ``Accelerator`` is built afresh (it
    is a singleton: one test's settings would otherwise carry into the next)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
