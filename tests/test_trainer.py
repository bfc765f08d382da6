"""The thin trainer (hypo_fast.trainer) on tiny Hugging Face Llamas: batches from token ids, the
policy + reference + loss module against TRL's computation from the logits (values and every
parameter's gradient), HyPO's online samples scored left-padded against each sample scored
alone, precomputed reference log-probs against the reference model, one optimizer step and an
evaluation through Accelerate, and two DDP processes against one.
"""

from __future__ import annotations

import copy
import functools
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from hf_helpers import IGN, reset_accelerate, tiny_llama, transformers, trl_sequence_logps
from hypothesis import given, settings
from hypothesis import strategies as st

from hypo_fast.losses import FusedLinearDPOLoss, FusedLinearSimPOLoss, HyPOLoss
from hypo_fast.trainer import (
    OnlineSampling,
    PreferenceModel,
    PreferenceTrainer,
    collate_pairs,
    precompute_reference_logps,
    sample_online,
)

accelerate = pytest.importorskip("accelerate")

VOCAB, PAD, EOS, BETA = 96, 0, 1, 0.1


def examples(pairs: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(2, VOCAB, (n,), generator=g).tolist()

    return [{"prompt_ids": ids(2 + i % 3), "chosen_ids": ids(3 + i % 4),
             "rejected_ids": ids(5 - i % 3)} for i in range(pairs)]


def models(dtype=torch.float64, tied=False):
    policy = tiny_llama(tied, dtype)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


# ---------------------------------------------------------------------------------------------
# batches

token_lists = st.lists(st.integers(2, VOCAB - 1), max_size=6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.fixed_dictionaries({"prompt_ids": token_lists, "chosen_ids": token_lists,
                                       "rejected_ids": token_lists}), min_size=1, max_size=4),
       st.one_of(st.none(), st.integers(1, 8)), st.sampled_from(["keep_start", "keep_end"]),
       st.one_of(st.none(), st.integers(1, 5)))
def test_collate_pairs_lays_out_prompt_completion_and_padding(exs, max_length, truncation,
                                                              multiple):
    b = collate_pairs(exs, pad_token_id=PAD, max_length=max_length, truncation=truncation,
                      pad_to_multiple_of=multiple)
    n = len(exs)
    assert b["input_ids"].shape[0] == 2 * n and b["prompt_input_ids"].shape[0] == n
    longest = 0
    for row in range(2 * n):
        ex = exs[row % n]
        prompt, completion = ex["prompt_ids"], ex["chosen_ids" if row < n else "rejected_ids"]
        kept = slice(None, max_length) if truncation == "keep_start" or not max_length else (
            slice(-max_length, None))
        want = (prompt + completion)[kept]
        longest = max(longest, len(want))
        mask = b["attention_mask"][row].bool()
        assert b["input_ids"][row][mask].tolist() == want
        assert not mask[len(want):].any() and (b["input_ids"][row][~mask] == PAD).all()
        labels = b["labels"][row]
        assert labels[: len(want)].tolist() == ([IGN] * len(prompt) + completion)[kept]
        assert (labels[len(want):] == IGN).all()
    assert b["input_ids"].shape[1] == (-(-longest // multiple) * multiple if multiple
                                       else longest)
    if all(ex["prompt_ids"] or ex[k] for ex in exs for k in ("chosen_ids", "rejected_ids")):
        p = collate_pairs(exs, pad_token_id=PAD, max_length=max_length, truncation=truncation,
                          packed=True)
        mask = b["attention_mask"].bool()
        assert p["input_ids"][0].tolist() == b["input_ids"][mask].tolist()
        assert p["labels"][0].tolist() == b["labels"][mask].tolist()
        assert p["position_ids"][0].tolist() == (b["attention_mask"].cumsum(1) - 1)[mask].tolist()
    for i, ex in enumerate(exs):
        pmask = b["prompt_attention_mask"][i].bool()
        assert b["prompt_input_ids"][i][pmask].tolist() == ex["prompt_ids"]
        assert pmask.tolist() == sorted(pmask.tolist())  # left padding


def test_collate_pairs_stacks_per_pair_numbers_and_rejects_bad_examples():
    exs = examples(2)
    b = collate_pairs([{**e, "ref_chosen_logps": -1.0 - i, "ref_rejected_logps": -5.0}
                       for i, e in enumerate(exs)], pad_token_id=PAD)
    assert b["ref_chosen_logps"].tolist() == [-1.0, -2.0]
    aux = [{**e, "chosen_aux_reward": float(i), "rejected_aux_reward": 5.0 + i}
           for i, e in enumerate(exs)]
    assert collate_pairs(aux, pad_token_id=PAD)["aux_rewards"].tolist() == [0, 1, 5, 6]
    chosen_only = [{k: v for k, v in e.items() if k != "rejected_aux_reward"} for e in aux]
    assert collate_pairs(chosen_only, pad_token_id=PAD)["aux_rewards"].tolist() == [0, 1]
    rejected_only = [{k: v for k, v in e.items() if k != "chosen_aux_reward"} for e in aux]
    with pytest.raises(ValueError, match="rejected_aux_reward is given without chosen_aux"):
        collate_pairs(rejected_only, pad_token_id=PAD)
    with pytest.raises(ValueError, match="ref_chosen_logps must be given for every example"):
        collate_pairs([{**exs[0], "ref_chosen_logps": -1.0}, exs[1]], pad_token_id=PAD)
    with pytest.raises(TypeError, match=r"examples\[1\]\['chosen_ids'\]"):
        collate_pairs([exs[0], {**exs[1], "chosen_ids": [1.5]}], pad_token_id=PAD)
    with pytest.raises(ValueError, match="at least one example"):
        collate_pairs([], pad_token_id=PAD)
    with pytest.raises(ValueError, match="max_length"):
        collate_pairs(exs, pad_token_id=PAD, max_length=0)
    with pytest.raises(ValueError, match="truncation must be 'keep_start' or 'keep_end'"):
        collate_pairs(exs, pad_token_id=PAD, truncation="left")
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
        collate_pairs(exs, pad_token_id=PAD, pad_to_multiple_of=0)


# ---------------------------------------------------------------------------------------------
# the module: policy + reference + loss


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_preference_model_dpo_equals_trl(tied):
    policy, reference = models(tied=tied)
    batch = collate_pairs(examples(3), pad_token_id=PAD)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    pol = trl_sequence_logps(policy, ids, mask, labels)
    with torch.no_grad():
        ref = trl_sequence_logps(reference, ids, mask, labels)
    want = -F.logsigmoid(BETA * ((pol[:3] - ref[:3]) - (pol[3:] - ref[3:]))).mean()
    params = list(policy.parameters())
    want_grads = torch.autograd.grad(want, params)

    model = PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference)
    got, metrics = model(**batch)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["chosen_logps"], pol[:3].detach(), rtol=1e-10, atol=0)
    for (name, _), a, b in zip(policy.named_parameters(), got_grads, want_grads, strict=True):
        assert float(b.abs().max()) > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")

    # precomputed reference log-probs in the batch: the reference model is not needed
    pre = PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA))
    got_pre, _ = pre(**batch, ref_chosen_logps=ref[:3], ref_rejected_logps=ref[3:])
    torch.testing.assert_close(got_pre, want, rtol=1e-10, atol=1e-12)


# not HyPO under eager attention: transformers' (5.24) makes its left-padded fp64 rows NaN
@pytest.mark.parametrize(("attention", "loss_fn"), [
    (attention, loss_fn) for attention in ("sdpa", "eager")
    for loss_fn in (FusedLinearDPOLoss(beta=BETA), FusedLinearSimPOLoss(compute_nll_loss=True))
] + [("sdpa", HyPOLoss(beta=BETA))], ids=["sdpa-dpo", "sdpa-simpo+nll", "eager-dpo",
                                          "eager-simpo+nll", "sdpa-hypo"])
def test_a_packed_batch_gives_the_padded_batch_loss_and_gradients(attention, loss_fn):
    """Packed: the offline pairs (and HyPO's online samples) without padding, one row."""
    policy, reference = models()
    for m in (policy, reference):
        m.config._attn_implementation = attention
    exs = examples(3)
    padded = collate_pairs(exs, pad_token_id=PAD)
    packed = collate_pairs(exs, pad_token_id=PAD, packed=True)
    if isinstance(loss_fn, HyPOLoss):  # the same samples (left-padded prompts, EOS cut) in both
        torch.manual_seed(0)
        online = sample_online(policy, padded["prompt_input_ids"],
                               padded["prompt_attention_mask"], num_samples=2,
                               max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
        assert not online["online_attention_mask"].all()  # padding to leave out
        padded.update(online)
        packed.update(online)
    assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))
    assert "attention_mask" not in packed
    model = PreferenceModel(policy, loss_fn, reference)
    params = list(policy.parameters())
    want, want_metrics = model(**padded)
    want_grads = torch.autograd.grad(want, params)
    got, got_metrics = model(**packed)
    got_grads = torch.autograd.grad(got, params)
    # eager attention takes its softmax in fp32: the packed row's other summation order in the
    # fp64 scores flips some of its roundings (1e-7); a leak across sequences would be ~1e-2
    tol = {"rtol": 1e-9, "atol": 1e-12} if attention == "sdpa" else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_metrics["chosen_logps"], want_metrics["chosen_logps"], **tol)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **tol)
    with pytest.raises(ValueError, match=r"pass attention_mask .* or position_ids"):
        model(input_ids=packed["input_ids"], labels=packed["labels"])
    with pytest.raises(ValueError, match="a packed batch needs a token in every sequence"):
        collate_pairs([{"prompt_ids": [], "chosen_ids": [], "rejected_ids": [3]}],
                      pad_token_id=PAD, packed=True)


def test_preference_model_reference_free_loss_and_errors():
    policy, reference = models()
    batch = collate_pairs(examples(2), pad_token_id=PAD)
    pol = trl_sequence_logps(policy, batch["input_ids"], batch["attention_mask"],
                             batch["labels"])
    counts = (batch["labels"][:, 1:] != IGN).sum(-1)
    avg = pol / counts
    want = -F.logsigmoid(2.0 * (avg[:2] - avg[2:]) - 0.5).mean()
    got, _ = PreferenceModel(
        policy, FusedLinearSimPOLoss(beta=2.0, gamma=0.5, compute_nll_loss=False))(**batch)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    with pytest.raises(ValueError, match="pass reference= to PreferenceModel"):
        PreferenceModel(policy, FusedLinearDPOLoss())(**batch)
    online = {"online_input_ids": batch["input_ids"], "online_attention_mask":
              batch["attention_mask"], "online_labels": batch["labels"]}
    with pytest.raises(ValueError, match="FusedLinearDPOLoss takes none"):
        PreferenceModel(policy, FusedLinearDPOLoss(), reference)(**batch, **online)
    with pytest.raises(ValueError, match="HyPOLoss needs online samples"):
        PreferenceModel(policy, HyPOLoss(), reference)(**batch)
    with pytest.raises(TypeError, match="reference must be a decoder-only Hugging Face causal"):
        PreferenceModel(policy, FusedLinearDPOLoss(), torch.nn.Linear(2, 2))
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64))
    with pytest.raises(TypeError, match="got BertForMaskedLM"):
        PreferenceModel(bert, FusedLinearDPOLoss())
    granite = transformers.GraniteForCausalLM(transformers.GraniteConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, logits_scaling=8.0))
    with pytest.raises(ValueError, match=r"policy has logits_scaling=8\.0"):
        PreferenceModel(granite, FusedLinearDPOLoss())
    class Scaled(transformers.LlamaForCausalLM):  # a transform no config names
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    scaled = Scaled(tiny_llama(False, torch.float64).config).double()
    with pytest.raises(ValueError, match="policy's logits are not h·Wᵀ"):
        PreferenceModel(scaled, FusedLinearDPOLoss())
    bidirectional = transformers.BertLMHeadModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, is_decoder=False))
    with pytest.raises(ValueError, match="policy"):
        PreferenceModel(bidirectional, FusedLinearDPOLoss())
    capped = tiny_llama(False, torch.float64)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0"):
        PreferenceModel(capped, FusedLinearDPOLoss())
    with pytest.raises(ValueError, match=r"reference's vocabulary \(64\) is not the policy's "
                                         r"\(96\)"):
        PreferenceModel(tiny_llama(False, torch.float64), FusedLinearDPOLoss(),
                        tiny_llama(False, torch.float64, vocab=64))


@pytest.mark.parametrize("loss_fn", [FusedLinearDPOLoss(beta=BETA), HyPOLoss(beta=BETA)],
                         ids=["dpo", "hypo"])
def test_a_peft_policy_without_reference_is_scored_against_its_base_model(loss_fn):
    """LoRA adapters (non-zero) on a policy with no reference: the reference passes run the
    base model (adapters off), as a separate copy of the base would score them, and the
    adapters are back on for the policy's passes."""
    peft = pytest.importorskip("peft")
    base, _ = models()
    reference = copy.deepcopy(base)
    torch.manual_seed(0)
    policy = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False))
    batch = collate_pairs(examples(3), pad_token_id=PAD)
    if isinstance(loss_fn, HyPOLoss):
        batch.update(sample_online(policy, batch["prompt_input_ids"],
                                   batch["prompt_attention_mask"], num_samples=2,
                                   max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD))
    own = PreferenceModel(policy, loss_fn)
    assert own.adapter_reference and not PreferenceModel(policy, loss_fn,
                                                         reference).adapter_reference
    lora = [p for p in policy.parameters() if p.requires_grad]
    results = []
    for model in (own, PreferenceModel(policy, loss_fn, reference)):
        loss, metrics = model(**batch)
        results.append((loss, metrics, torch.autograd.grad(loss, lora)))
    (loss, metrics, grads), (want, want_metrics, want_grads) = results
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for k, v in want_metrics.items():
        torch.testing.assert_close(metrics[k], v, rtol=1e-12, atol=1e-12, msg=k)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert metrics["margins"].abs().min() > 1e-3  # the adapters change the policy's log-probs
    with pytest.raises(ValueError, match="output embedding is wrapped by PEFT"):
        PreferenceModel(peft.get_peft_model(models()[0], peft.LoraConfig(
            r=2, target_modules=["lm_head", "q_proj"])), loss_fn)


def test_gradient_checkpointing_recomputes_the_layers_and_changes_no_gradient():
    policy, reference = models()
    batch = collate_pairs(examples(3), pad_token_id=PAD)
    calls = []
    for layer in policy.model.layers:  # hooks do not run in the recomputation: count forwards
        def counted(*args, forward=layer.mlp.forward, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)

        layer.mlp.forward = counted
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            policy.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference).train()
        calls.clear()  # not the probe's forwards
        loss, _ = model(**batch)
        grads.append(torch.autograd.grad(loss, list(policy.parameters())))
        # each layer once in the forward, and once more in the backward when checkpointed
        assert len(calls) == len(policy.model.layers) * (1 + checkpointing)
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain, rtol=1e-12, atol=1e-14)


def test_reference_stays_frozen_in_eval_mode_and_dropout_is_off():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, attention_dropout=0.5)
    policy = transformers.LlamaForCausalLM(config).double()
    policy.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.5))  # an nn.Dropout too
    batch = collate_pairs(examples(2), pad_token_id=PAD)
    model = PreferenceModel(policy, FusedLinearSimPOLoss(), copy.deepcopy(policy)).train()
    assert model.policy.training and not model.reference.training
    assert not any(p.requires_grad for p in model.reference.parameters())
    assert policy.model.layers[0].self_attn.attention_dropout == 0.0
    assert policy.model.layers[0].mlp.drop.p == 0.0
    torch.testing.assert_close(model(**batch)[0], model(**batch)[0], rtol=0, atol=0)
    kept = PreferenceModel(transformers.LlamaForCausalLM(config).double(),
                           FusedLinearSimPOLoss(), disable_dropout=False).train()
    assert not torch.equal(kept(**batch)[0], kept(**batch)[0])  # the rate did act


# ---------------------------------------------------------------------------------------------
# online samples (HyPO)


class ScriptedPolicy(torch.nn.Module):
    """``generate`` returns the prompts followed by fixed completions."""

    def __init__(self, completions: torch.Tensor) -> None:
        super().__init__()
        self.completions = completions

    def generate(self, input_ids, attention_mask, num_return_sequences, **_):
        prompts = input_ids.repeat_interleave(num_return_sequences, 0)
        return torch.cat([prompts, self.completions], 1)


def test_sample_online_keeps_each_completion_up_to_its_first_eos():
    prompts = torch.tensor([[PAD, 5, 6], [7, 8, 9]])
    pmask = (prompts != PAD).long()
    completions = torch.tensor([[3, EOS, 4, EOS], [3, 4, 5, 6], [EOS, 2, 2, 2], [2, 2, 2, EOS]])
    out = sample_online(ScriptedPolicy(completions), prompts, pmask, num_samples=2,
                        max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    assert out["group_ids"].tolist() == [0, 0, 1, 1]
    assert out["online_attention_mask"].tolist() == [
        [0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1]]
    assert out["online_labels"][:, 3:].tolist() == [
        [3, EOS, IGN, IGN], [3, 4, 5, 6], [EOS, IGN, IGN, IGN], [2, 2, 2, EOS]]
    assert (out["online_labels"][:, :3] == IGN).all()
    no_eos = sample_online(ScriptedPolicy(completions), prompts, pmask, num_samples=2,
                           max_new_tokens=4, eos_token_id=None, pad_token_id=PAD)
    assert no_eos["online_labels"][:, 3:].tolist() == completions.tolist()
    with pytest.raises(ValueError, match="num_samples"):
        sample_online(ScriptedPolicy(completions), prompts, pmask, num_samples=0,
                      max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)


def test_sample_online_draws_from_the_policy_itself():
    """The first sampled token's frequencies match π(·|x), whatever the generation config
    says (here top-k 10, temperature 0.5, 4 beams, the 3 likeliest tokens suppressed, ...);
    the model keeps its config."""
    policy = tiny_llama(False, torch.float32)
    with torch.no_grad():
        policy.lm_head.weight.mul_(6.0)  # a spread-out, not uniform, distribution
    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        probs = policy(input_ids=prompt).logits[0, -1].float().softmax(-1)
    config = policy.generation_config
    config.top_k, config.temperature, config.num_beams = 10, 0.5, 4
    config.suppress_tokens = probs.argsort(descending=True)[:3].tolist()
    config.min_new_tokens, config.return_dict_in_generate = 2, True
    n = 4000
    torch.manual_seed(0)
    out = sample_online(policy, prompt, torch.ones_like(prompt), num_samples=n,
                        max_new_tokens=1, eos_token_id=None, pad_token_id=PAD)
    freq = torch.bincount(out["online_input_ids"][:, -1], minlength=VOCAB).float() / n
    outside_top10 = 1 - probs.topk(10).values.sum()
    assert outside_top10 > 0.2
    assert abs(float(freq[probs.argsort(descending=True)[10:]].sum() - outside_top10)) < 0.04
    assert float((freq - probs).abs().sum()) / 2 < 0.1  # total variation
    assert policy.generation_config is config and config.top_k == 10


@pytest.mark.parametrize("estimator", ["rloo", "exact"])
def test_hypo_online_samples_scored_left_padded_equal_each_scored_alone(estimator):
    policy, reference = models()
    batch = collate_pairs(examples(2), pad_token_id=PAD)
    torch.manual_seed(3)
    online = sample_online(policy, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                           num_samples=2, max_new_tokens=5, eos_token_id=EOS,
                           pad_token_id=PAD)
    assert (batch["prompt_attention_mask"] == 0).any()  # some prompts are left-padded
    loss_fn = HyPOLoss(beta=BETA, kl_coef=0.5, estimator=estimator)
    params = list(policy.parameters())
    got, metrics = PreferenceModel(policy, loss_fn, reference)(**batch, **online)
    got_grads = torch.autograd.grad(got, params)

    def alone(model):  # each sample's valid tokens, without padding: packed
        hs, ts, lengths = [], [], []
        for ids, mask, labels in zip(online["online_input_ids"],
                                     online["online_attention_mask"],
                                     online["online_labels"], strict=True):
            keep = mask.bool()
            h = model.model(input_ids=ids[keep][None]).last_hidden_state[0, :-1]
            hs.append(h)
            ts.append(labels[keep][1:])
            lengths.append(h.shape[0])
        cu = torch.tensor([0, *lengths]).cumsum(0)
        return torch.cat(hs), torch.cat(ts), cu

    h, t, cu = alone(policy)
    with torch.no_grad():
        rh, _, _ = alone(reference)
        ref_h = reference.model(**{k: batch[k] for k in ("input_ids", "attention_mask")})
    pairs_h = policy.model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).last_hidden_state
    want, want_metrics = loss_fn(
        policy.lm_head.weight, pairs_h[:, :-1], batch["labels"][:, 1:],
        ref_input=ref_h.last_hidden_state[:, :-1], ref_weight=reference.lm_head.weight,
        online_input=h, online_target=t, online_cu_seqlens=cu, online_ref_input=rh,
        group_ids=online["group_ids"])
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(metrics["online_kl"], want_metrics.metrics["online_kl"], rtol=1e-9,
                               atol=1e-12)
    assert float(metrics["kl_term"].abs()) > 0
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


# ---------------------------------------------------------------------------------------------
# the trainer (Accelerate)


def test_trainer_step_is_one_optimizer_step_on_the_loss_gradient():
    policy, reference = models()
    batch = collate_pairs(examples(2), pad_token_id=PAD)
    before = copy.deepcopy(policy)
    loss, _ = PreferenceModel(before, FusedLinearDPOLoss(beta=BETA),
                              copy.deepcopy(reference))(**batch)
    grads = torch.autograd.grad(loss, list(before.parameters()))

    lr = 0.5
    trainer = PreferenceTrainer(
        PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference),
        torch.optim.SGD(policy.parameters(), lr=lr),
        accelerator=accelerate.Accelerator(cpu=True))
    numbers = trainer.step(batch)
    assert numbers["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)  # fp32 logging
    assert {"chosen_rewards", "rejected_rewards", "accuracy"} <= numbers.keys()
    for (name, p), p0, g in zip(policy.named_parameters(), before.parameters(), grads,
                                strict=True):
        torch.testing.assert_close(p.detach(), p0.detach() - lr * g, rtol=1e-10, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_gradient_accumulation_over_two_halves_takes_the_step_of_the_whole_batch():
    exs = examples(4)
    params = {}
    for accumulate, batches in ((1, [exs]), (2, [exs[:2], exs[2:]])):
        reset_accelerate()
        policy, reference = models()
        trainer = PreferenceTrainer(
            PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference),
            torch.optim.SGD(policy.parameters(), lr=0.5), max_grad_norm=0.05,
            accelerator=accelerate.Accelerator(cpu=True,
                                               gradient_accumulation_steps=accumulate))
        loader = torch.utils.data.DataLoader(
            batches, batch_size=None, collate_fn=lambda e: collate_pairs(e, pad_token_id=PAD))
        trainer.fit(loader)
        params[accumulate] = policy.state_dict()
    start = models()[0].state_dict()
    for name, value in params[1].items():
        assert not torch.equal(value, start[name]) or name.endswith("inv_freq"), name
        torch.testing.assert_close(params[2][name], value, rtol=1e-10, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_a_short_last_accumulation_window_takes_a_full_step():
    """One batch with two accumulation steps: the step of that batch alone (Accelerate would
    halve it)."""
    batch = collate_pairs(examples(2), pad_token_id=PAD)
    params = {}
    for accumulate in (1, 2):
        reset_accelerate()
        policy, reference = models()
        trainer = PreferenceTrainer(
            PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference),
            torch.optim.SGD(policy.parameters(), lr=0.5),
            accelerator=accelerate.Accelerator(cpu=True,
                                               gradient_accumulation_steps=accumulate))
        trainer.fit(torch.utils.data.DataLoader([batch], batch_size=None))
        assert trainer.optimizer_steps == 1
        params[accumulate] = policy.state_dict()
    for name, value in params[1].items():
        torch.testing.assert_close(params[2][name], value, rtol=1e-10, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_trainer_fit_lowers_the_loss_and_validates_its_arguments():
    policy, reference = models(dtype=torch.float32)
    exs = examples(4)
    loader = torch.utils.data.DataLoader(exs, batch_size=2, collate_fn=lambda e: collate_pairs(
        e, pad_token_id=PAD))
    model = PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference)
    trainer = PreferenceTrainer(model, torch.optim.Adam(policy.parameters(), lr=1e-2),
                                accelerator=accelerate.Accelerator(cpu=True), max_grad_norm=1.0)
    history = trainer.fit(loader, epochs=5)
    assert len(history) == 10
    assert history[-1]["loss"] < history[1]["loss"] - 0.1
    with pytest.raises(ValueError, match="online sampling is for HyPOLoss"):
        PreferenceTrainer(model, torch.optim.SGD(policy.parameters(), lr=1.0),
                          online=OnlineSampling())
    with pytest.raises(ValueError, match="max_grad_norm"):
        PreferenceTrainer(model, torch.optim.SGD(policy.parameters(), lr=1.0), max_grad_norm=0)
    with pytest.raises(ValueError, match="save_every must be >= 1"):
        trainer.fit(loader, save_every=0, on_save=str)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        trainer.fit(loader, max_steps=0)
    with pytest.raises(ValueError, match="save_every needs on_save"):
        trainer.fit(loader, save_every=2)
    with pytest.raises(FileNotFoundError, match=r"not a checkpoint .* \(no trainer_state.json\)"):
        trainer.load_checkpoint(os.devnull)


def _resumable_run(checkpoint=None, save_dir=None, sync=None):
    """Three epochs of DPO on 7 pairs (4 batches an epoch, the last of one pair; windows of 2
    batches), shuffled by the epoch, AdamW and a linear schedule, the reference synced every
    ``sync`` steps if given; from ``checkpoint`` if given, saving at every optimizer step into
    ``save_dir`` if given. Returns (the trainer, its numbers)."""
    reset_accelerate()
    policy, reference = models(tied=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    config = accelerate.utils.DataLoaderConfiguration(use_seedable_sampler=True, data_seed=3)
    trainer = PreferenceTrainer(
        PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference), optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=6),
        accelerator=accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2,
                                           dataloader_config=config),
        ref_model_sync_steps=sync)
    if checkpoint is not None:
        trainer.load_checkpoint(checkpoint)
    loader = torch.utils.data.DataLoader(examples(7), batch_size=2, shuffle=True,
                                         collate_fn=_collate)
    saving = {} if save_dir is None else {"save_every": 1, "on_save": lambda n: save_dir / str(n)}
    return trainer, trainer.fit(loader, epochs=3, **saving)


# mid-epoch, an epoch's end; TR-DPO's synced reference (steps 2, 4, 6) restored too
@pytest.mark.parametrize(("step", "batches", "sync"), [(3, 6, None), (4, 8, None), (3, 6, 2)])
def test_a_run_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run(tmp_path, step, batches,
                                                                       sync):
    whole, numbers = _resumable_run(save_dir=tmp_path, sync=sync)
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(n) for n in range(1, 7)]
    resumed, rest = _resumable_run(checkpoint=tmp_path / str(step), sync=sync)
    assert resumed.batches == whole.batches == 12 and resumed.optimizer_steps == 6
    assert len(rest) == 12 - batches
    for a, b in zip(numbers[batches:], rest, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-12, abs=1e-15), k
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters(),
                            strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_reference_sync_moves_the_reference_towards_the_policy_every_tau_steps():
    """TR-DPO: after every 2nd optimizer step θ_ref ← α·θ + (1 − α)·θ_ref, and only then."""
    policy, reference = models()
    start = copy.deepcopy(reference)
    trainer = PreferenceTrainer(
        PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference),
        torch.optim.SGD(policy.parameters(), lr=0.5), accelerator=accelerate.Accelerator(cpu=True),
        ref_model_sync_steps=2, ref_model_mixup_alpha=0.25)
    batch = collate_pairs(examples(2), pad_token_id=PAD)

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))

    trainer.step(batch)
    assert same(reference, start)
    trainer.step(batch)
    moved = dict(policy.named_parameters())
    for (name, r), r0 in zip(reference.named_parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(r, r0 + 0.25 * (moved[name] - r0), rtol=1e-12, atol=1e-14,
                                   msg=name)
        assert not r.requires_grad, name
    synced = copy.deepcopy(reference)
    trainer.step(batch)
    assert same(reference, synced) and not same(reference, start)


def test_checkpoints_leave_out_a_frozen_reference_and_keep_a_synced_one(tmp_path):
    """A frozen reference never changes: the model's state (and so a checkpoint) leaves it out,
    and loading a state without it keeps the live one. TR-DPO's synced reference is saved."""
    from safetensors.torch import load_file

    keys = {}
    for sync in (None, 2):
        reset_accelerate()
        policy, reference = models()
        trainer = PreferenceTrainer(
            PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference),
            torch.optim.SGD(policy.parameters(), lr=0.5),
            accelerator=accelerate.Accelerator(cpu=True), ref_model_sync_steps=sync)
        trainer.step(collate_pairs(examples(2), pad_token_id=PAD))
        trainer.save_checkpoint(tmp_path / str(sync))
        keys[sync] = set(load_file(tmp_path / str(sync) / "model.safetensors"))
    policy_keys = {"policy." + k for k in policy.state_dict()}
    assert keys[None] == policy_keys
    assert keys[2] == policy_keys | {"reference." + k for k in reference.state_dict()}

    def fresh():
        policy, reference = models()
        return PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference)

    model = fresh()
    state = model.state_dict()
    assert not any(k.startswith("reference.") for k in state)
    other = fresh()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    live = copy.deepcopy(other.reference)
    other.load_state_dict(state)  # strict: the reference's keys are filled from the live one
    assert all(torch.equal(a, b) for a, b in zip(other.policy.parameters(),
                                                 model.policy.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(other.reference.parameters(),
                                                 live.parameters(), strict=True))


def test_reference_sync_checks_its_arguments_and_the_reference():
    policy, reference = models()
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    dpo = PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference)
    other = PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA),  # tied: no lm_head.weight
                            tiny_llama(True, torch.float64, vocab=VOCAB))
    for model, kwargs, message in [
        (dpo, {"ref_model_sync_steps": 0}, "ref_model_sync_steps must be an int >= 1"),
        (dpo, {"ref_model_sync_steps": 2, "ref_model_mixup_alpha": 1.5},
         r"ref_model_mixup_alpha must be in \[0.0, 1.0\]"),
        (PreferenceModel(policy, FusedLinearSimPOLoss()), {"ref_model_sync_steps": 2},
         "needs a reference model of its own"),
        (other, {"ref_model_sync_steps": 2}, "match the policy's by name and shape; they differ "
                                            "at lm_head.weight"),
    ]:
        with pytest.raises(ValueError, match=message):
            PreferenceTrainer(model, optimizer, accelerator=accelerate.Accelerator(cpu=True),
                              **kwargs)


def test_trainer_hypo_step_samples_online_completions():
    policy, reference = models()
    batch = collate_pairs(examples(2), pad_token_id=PAD)
    trainer = PreferenceTrainer(
        PreferenceModel(policy, HyPOLoss(beta=BETA, kl_coef=1.0), reference),
        torch.optim.SGD(policy.parameters(), lr=0.1),
        accelerator=accelerate.Accelerator(cpu=True),
        online=OnlineSampling(num_samples=3, max_new_tokens=4, eos_token_id=EOS,
                              pad_token_id=PAD))
    before = [p.detach().clone() for p in policy.parameters()]
    with pytest.raises(ValueError, match=r"\['prompt_attention_mask', 'prompt_input_ids'\] "
                                         "missing"):
        trainer.step({k: v for k, v in batch.items() if not k.startswith("prompt_")})
    torch.manual_seed(0)
    numbers = trainer.step(batch)
    assert {"kl_term", "online_kl", "dpo_loss"} <= numbers.keys()
    assert numbers["loss"] == pytest.approx(numbers["dpo_loss"] + numbers["kl_term"], rel=1e-6)
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.parameters(), strict=True))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("options", [{}, {"average_log_prob": True, "ld_alpha": 0.5}])
def test_precomputed_reference_logps_give_the_loss_with_the_reference_model(packed, options):
    policy, reference = models()
    loss_fn = FusedLinearDPOLoss(beta=BETA, **options)
    exs = examples(5)
    collate = functools.partial(collate_pairs, pad_token_id=PAD, packed=packed)
    reference.train()  # precompute scores in eval mode and gives the mode back
    scored = precompute_reference_logps(reference, loss_fn, exs, collate=collate, batch_size=2)
    assert reference.training and [{k: e[k] for k in exs[0]} for e in scored] == exs
    batch = collate_pairs(exs, pad_token_id=PAD)
    with torch.no_grad():  # TRL's computation, from the reference's logits
        want = trl_sequence_logps(reference, batch["input_ids"], batch["attention_mask"],
                                  batch["labels"])
    got = torch.tensor([[e["ref_chosen_logps"] for e in scored],
                        [e["ref_rejected_logps"] for e in scored]], dtype=torch.float64)
    if not options:
        torch.testing.assert_close(got.reshape(-1), want.float().double(), rtol=1e-6,
                                   atol=1e-6)
    with_ref = PreferenceModel(policy, loss_fn, reference)
    without = PreferenceModel(copy.deepcopy(policy), loss_fn)
    loss, metrics = with_ref(**collate(exs))
    loss2, metrics2 = without(**collate(scored))
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-7)  # the logps pass fp32
    for k, v in metrics.items():
        torch.testing.assert_close(metrics2[k], v, rtol=1e-5, atol=1e-6, msg=k)
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    grads2 = torch.autograd.grad(loss2, list(without.policy.parameters()))
    for g, g2 in zip(grads, grads2, strict=True):
        torch.testing.assert_close(g2, g, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="uses no reference model"):
        precompute_reference_logps(reference, FusedLinearSimPOLoss(), exs, collate=collate)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        precompute_reference_logps(reference, loss_fn, exs, collate=collate, batch_size=0)
    with pytest.raises(ValueError, match="the reference is on meta but the accelerator's device"):
        precompute_reference_logps(reference.to("meta"), loss_fn, exs, collate=collate,
                                   accelerator=accelerate.Accelerator(cpu=True))


def test_evaluate_averages_over_every_pair_and_fit_evaluates_as_asked():
    policy, reference = models()
    trainer = PreferenceTrainer(PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference),
                                torch.optim.SGD(policy.parameters(), lr=0.1),
                                accelerator=accelerate.Accelerator(cpu=True))
    exs = examples(5)
    loader = torch.utils.data.DataLoader(
        exs, batch_size=2, collate_fn=functools.partial(collate_pairs, pad_token_id=PAD))
    before = [p.detach().clone() for p in policy.parameters()]
    numbers = trainer.evaluate(loader)  # batches of 2, 2 and 1 pairs
    assert all(torch.equal(a, p) for a, p in zip(before, policy.parameters(), strict=True))
    assert all(p.grad is None for p in policy.parameters())
    with torch.no_grad():
        loss, metrics = trainer.model(**collate_pairs(exs, pad_token_id=PAD))  # all 5 at once
    want = {"loss": loss, **{k: v for k, v in metrics.items() if "logits_mean" not in k}}
    for k, v in want.items():
        assert numbers[k] == pytest.approx(float(v.mean()), rel=1e-9, abs=1e-12), k
    evals = []
    trainer.fit(loader, epochs=2, eval_loader=loader, eval_every=2,
                on_eval=lambda batch, epoch, n: evals.append((batch, epoch)))
    assert evals == [(2, 0), (3, 0), (4, 1), (6, 1)]  # every 2nd batch, and each epoch's end
    evals.clear()  # max_steps 8: two more batches, then the stop, evaluated once (eval_every 2)
    history = trainer.fit(loader, epochs=9, eval_loader=loader, eval_every=2, max_steps=8,
                          on_eval=lambda batch, epoch, n: evals.append((batch, epoch)))
    assert len(history) == 2 and trainer.optimizer_steps == 8
    assert evals == [(8, 0)]
    assert trainer.fit(loader, max_steps=8) == [] and trainer.optimizer_steps == 8
    with pytest.raises(ValueError, match="eval_every must be >= 1"):
        trainer.fit(loader, eval_loader=loader, eval_every=0)
    with pytest.raises(ValueError, match="eval_every and on_eval need eval_loader"):
        trainer.fit(loader, eval_every=2)
    with pytest.raises(ValueError, match="at least one batch"):
        trainer.evaluate([])


_collate = functools.partial(collate_pairs, pad_token_id=PAD)


def _eval_loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(examples(5), batch_size=1, collate_fn=_collate)


def _ddp_step(rank: int, world_size: int, port: int, pairs: int, out_path: str) -> None:
    """One SGD step of DPO in process ``rank``, on its share of the pairs; rank 0 saves the
    policy."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), GLOO_SOCKET_IFNAME="lo")
    accelerator = accelerate.Accelerator(cpu=True)
    assert accelerator.num_processes == world_size and accelerator.process_index == rank
    share = pairs // world_size
    policy, reference = models()
    trainer = PreferenceTrainer(
        PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference),
        torch.optim.SGD(policy.parameters(), lr=0.5), accelerator=accelerator)
    trainer.step(collate_pairs(examples(pairs)[rank * share:(rank + 1) * share],
                               pad_token_id=PAD))
    # 5 pairs, one per process and batch: the last batch has one pair for two processes
    numbers = trainer.evaluate(_eval_loader())
    scored = precompute_reference_logps(reference, FusedLinearDPOLoss(), examples(5),
                                        collate=_collate, batch_size=1, accelerator=accelerator)
    if rank == 0:
        torch.save({"policy": policy.state_dict(), "eval": numbers, "scored": scored}, out_path)
    accelerator.wait_for_everyone()  # neither tears gloo down while the other still talks
    accelerator.end_training()


def _fsdp_grads(rank: int, world_size: int, port: int, pairs: int, tied: bool,
                out_path: str, shard_head: bool = False) -> None:
    """DPO's gradients in process ``rank`` of a PreferenceModel under FSDP2 (``fully_shard`` on
    each decoder layer, then on the whole module, as Accelerate's transformer wrap does; with
    ``shard_head`` on the output embedding on its own too), on its share of the pairs; rank 0
    saves the gathered gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    policy, reference = models(tied=tied)
    model = PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference)
    for unit in [*policy.model.layers, *([policy.lm_head] if shard_head else [])]:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    share = pairs // world_size
    loss, _ = model(**collate_pairs(examples(pairs)[rank * share:(rank + 1) * share],
                                    pad_token_id=PAD))
    loss.backward()  # FSDP averages the processes' gradients
    grads = {name: p.grad.full_tensor() for name, p in policy.named_parameters()}
    state = model.state_dict()  # sharded; the frozen reference left out here too
    model.load_state_dict(state)
    assert state and not any(k.startswith("reference.") for k in state)
    if rank == 0:
        torch.save(grads, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fsdp2_sharded_model_gets_the_gradients_of_the_whole_batch(tmp_path, tied):
    """Under FSDP2 (2 CPU processes, gloo) the losses read the output embedding inside the
    module's forward, where FSDP has gathered it: the averaged gradients of two processes'
    halves are those of the whole batch on one unsharded model, tied embeddings included."""
    pairs = 4
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(
        _fsdp_grads, args=(2, port, pairs, tied, str(tmp_path / "fsdp.pt")), nprocs=2,
        start_method="spawn")
    sharded = torch.load(tmp_path / "fsdp.pt")
    policy, reference = models(tied=tied)
    model = PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference)
    loss, _ = model(**collate_pairs(examples(pairs), pad_token_id=PAD))
    loss.backward()
    for name, p in policy.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(sharded[name], p.grad, rtol=1e-10, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_fsdp2_output_embedding_sharded_on_its_own_is_a_clear_error(tmp_path):
    """Its own FSDP unit gathers the output embedding only for its own forward, which the
    fused losses do not call: they would get the shard, and say so."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(torch.multiprocessing.ProcessRaisedException,
                       match=r"lin_weight is a DTensor \(sharded by FSDP2"):
        torch.multiprocessing.start_processes(
            _fsdp_grads, args=(2, port, 4, False, str(tmp_path / "fsdp.pt"), True), nprocs=2,
            start_method="spawn")


def test_two_ddp_processes_step_evaluate_and_score_as_one_on_the_whole_data(tmp_path):
    pairs = 4
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawned, not forked: a fork of a process whose OpenMP threads ran can hang
    torch.multiprocessing.start_processes(
        _ddp_step, args=(2, port, pairs, str(tmp_path / "ddp.pt")), nprocs=2,
        start_method="spawn")
    ddp = torch.load(tmp_path / "ddp.pt")
    ddp_eval, ddp_scored, ddp = ddp["eval"], ddp["scored"], ddp["policy"]
    policy, reference = models()
    trainer = PreferenceTrainer(
        PreferenceModel(policy, FusedLinearDPOLoss(beta=BETA), reference),
        torch.optim.SGD(policy.parameters(), lr=0.5),
        accelerator=accelerate.Accelerator(cpu=True))
    trainer.step(collate_pairs(examples(pairs), pad_token_id=PAD))
    start = models()[0].state_dict()
    for name, value in policy.state_dict().items():
        assert not torch.equal(value, start[name]) or name.endswith("inv_freq"), name
        torch.testing.assert_close(ddp[name], value, rtol=1e-10, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # evaluation: every pair counted once (the duplicate that fills the last batch dropped)
    one = trainer.evaluate(_eval_loader())
    assert ddp_eval.keys() == one.keys()
    for k, v in one.items():
        assert ddp_eval[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    # precomputed reference log-probs: each process scored its share, every one came back
    assert ddp_scored == precompute_reference_logps(reference, FusedLinearDPOLoss(),
                                                    examples(5), collate=_collate, batch_size=1)
