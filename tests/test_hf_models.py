"""The drop-in use on a Hugging Face causal LM: a DPO step from the decoder's last hidden states
(shifted in place, ``h[:, :-1]``) and the model's own ``lm_head``, against the way TRL computes it
from ``model(...).logits``: the same loss and the same gradient on every parameter of the model,
with tied and untied embeddings, right padding and prompts ignored.

The models are tiny Llamas built from a config (nothing is downloaded).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from hf_helpers import IGN, tiny_llama, trl_sequence_logps
from kernel_helpers import DEVICE

from hypo_fast.losses import FusedLinearDPOLoss

BETA = 0.1
VOCAB, PAIRS, LENGTH, PROMPT = 96, 2, 12, 5


def dpo_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` ``[2P, L]``: P chosen then P rejected
    sequences sharing prompts, right-padded to L; labels ignore the prompt and the padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2 * PAIRS, LENGTH), generator=g)
    ids[PAIRS:, :PROMPT] = ids[:PAIRS, :PROMPT]
    lengths = torch.tensor([LENGTH, LENGTH - 3, LENGTH - 1, LENGTH - 4])
    mask = torch.arange(LENGTH)[None, :] < lengths[:, None]
    labels = torch.where(mask, ids, IGN)
    labels[:, :PROMPT] = IGN
    return ids, mask.long(), labels


def trl_dpo_loss(policy, reference, ids, mask, labels) -> torch.Tensor:
    """TRL's DPO loss from the sequence log-probs of the logits."""
    pol = trl_sequence_logps(policy, ids, mask, labels)
    with torch.no_grad():
        ref = trl_sequence_logps(reference, ids, mask, labels)
    margin = (pol[:PAIRS] - ref[:PAIRS]) - (pol[PAIRS:] - ref[PAIRS:])
    return -F.logsigmoid(BETA * margin).mean()


def fused_dpo_loss(policy, reference, ids, mask, labels, backend) -> torch.Tensor:
    hidden = policy.model(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        ref_hidden = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
    loss, _ = FusedLinearDPOLoss(beta=BETA, backend=backend)(
        policy.lm_head.weight, hidden[:, :-1], labels[:, 1:],
        ref_input=ref_hidden[:, :-1], ref_weight=reference.lm_head.weight,
    )
    return loss


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("backend", [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(
        not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
        reason="the triton backend needs a CUDA GPU or TRITON_INTERPRET=1")),
])
def test_dpo_step_on_a_causal_lm_equals_trl(tied, backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    device = DEVICE if backend == "triton" else torch.device("cpu")
    policy = tiny_llama(tied, dtype)
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy, reference = policy.to(device), reference.to(device)
    ids, mask, labels = (t.to(device) for t in dpo_batch())
    params = [p for p in policy.parameters() if p.requires_grad]
    assert len(params) == len(list(policy.named_parameters()))

    want = trl_dpo_loss(policy, reference, ids, mask, labels)
    want_grads = torch.autograd.grad(want, params)
    got = fused_dpo_loss(policy, reference, ids, mask, labels, backend)
    got_grads = torch.autograd.grad(got, params)

    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4,
                                                                         "atol": 1e-6}
    torch.testing.assert_close(got, want.to(got.dtype), **tol)
    assert abs(float(want.detach()) - float(-F.logsigmoid(torch.zeros(())))) > 1e-4  # heads differ
    names = [n for n, _ in policy.named_parameters()]
    for name, a, b in zip(names, got_grads, want_grads, strict=True):
        assert float(b.abs().max()) > 0, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")
