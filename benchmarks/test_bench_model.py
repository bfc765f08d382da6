"""pytest-benchmark: a DPO step on a Hugging Face Llama, the whole model (``pytest benchmarks
--benchmark-only``; after test_bench_dpo.py, so a lease short of time cuts this group first).

- ``naive``: TRL's way, ``model(...).logits`` (the model's dtype), fp32 log-softmax, gather;
- ``hypo_fast``: :class:`hypo_fast.trainer.PreferenceModel` with ``FusedLinearDPOLoss``
  (decoder to the last hidden states, then the fused head).

Both run the policy forward + backward (every parameter's gradient) and the reference forward
under ``no_grad``, on the same model and tokens. On CUDA: a 2-layer Llama with d 2048 and
Llama-3's vocabulary (128256; the head is ~60% of the parameters, as in a 1B model), bf16,
4 pairs x 1024 tokens, half prompt; on the CPU a small one. Compare the rows of one run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from baselines import logprob_of_logits
from test_bench_dpo import CUDA, DEVICE, run

from hypo_fast.losses import FusedLinearDPOLoss
from hypo_fast.objectives import dpo_loss
from hypo_fast.trainer import PreferenceModel

transformers = pytest.importorskip("transformers")

DTYPE = torch.bfloat16 if CUDA else torch.float32
PAIRS, SEQ, D, V, LAYERS = (4, 1024, 2048, 128256, 2) if CUDA else (2, 128, 64, 8000, 2)


@pytest.fixture(scope="module")
def setup():
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=4 * D, num_hidden_layers=LAYERS,
        num_attention_heads=max(D // 128, 1), num_key_value_heads=max(D // 512, 1),
        max_position_embeddings=SEQ, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(config).to(DEVICE, DTYPE)
    reference = copy.deepcopy(policy).requires_grad_(False)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ids = torch.randint(0, V, (2 * PAIRS, SEQ), generator=g, device=DEVICE)
    ids[PAIRS:, : SEQ // 2] = ids[:PAIRS, : SEQ // 2]  # shared prompts
    labels = ids.clone()
    labels[:, : SEQ // 2] = -100
    return policy, reference, ids, torch.ones_like(ids), labels


def naive_step(policy, reference, ids, mask, labels):
    def seq_logps(model):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        return logprob_of_logits(logits.float(), labels[:, 1:]).sum(-1)

    pol = seq_logps(policy)
    with torch.no_grad():
        ref = seq_logps(reference)
    return dpo_loss(pol[:PAIRS], pol[PAIRS:], ref[:PAIRS], ref[PAIRS:])[0]


@pytest.mark.parametrize("path", ["naive", "hypo_fast"])
def test_model_dpo_step(benchmark, setup, path):
    policy, reference, ids, mask, labels = setup
    benchmark.group = (f"Llama DPO step, {LAYERS} layers d={D} V={V}, {2 * PAIRS}x{SEQ} "
                       f"{str(DTYPE)[6:]} {DEVICE}")
    params = [p for p in policy.parameters() if p.requires_grad]
    fused = PreferenceModel(policy, FusedLinearDPOLoss(beta=0.1), reference)

    def step():
        if path == "naive":
            loss = naive_step(policy, reference, ids, mask, labels)
        else:
            loss = fused(input_ids=ids, attention_mask=mask, labels=labels)[0]
        return torch.autograd.grad(loss, params)

    run(benchmark, step)
