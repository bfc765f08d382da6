"""A thin preference trainer for Hugging Face causal LMs on top of :mod:`hypo_fast.losses`.

- :func:`collate_pairs` turns tokenized ``(prompt, chosen, rejected)`` examples into one padded
  batch, chosen rows first (the losses' layout).
- :class:`PreferenceModel` is the policy, its frozen reference and a loss as one ``nn.Module``:
  ``forward(**batch) -> (loss, metrics)`` runs the decoders to their last hidden states and hands
  them, with the output embedding's weight, to the fused loss; no ``N x V`` logits are made.
- :func:`sample_online` draws HyPO's online samples from the policy (``generate``).
- :func:`precompute_reference_logps` scores the pairs under the reference once, so that it
  need not be kept during training.
- :class:`PreferenceTrainer` runs the optimisation (and :meth:`PreferenceTrainer.evaluate`)
  through 🤗 Accelerate, which owns devices, mixed precision, gradient accumulation and the
  distributed engine (DDP, FSDP, DeepSpeed).

Accelerate is an optional dependency (``pip install hypo-fast[train]``); only
:class:`PreferenceTrainer` needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._checks import check_in_range
from .losses import HyPOLoss

if TYPE_CHECKING:
    from accelerate import Accelerator

# Per-token inputs of a loss, shaped like ``input_ids``: shifted with the labels.
_TOKEN_KEYS = ("token_mask", "kl_mask")
# generate's settings for y ~ π itself, over a default GenerationConfig in place of the model's
# (whose suppressed tokens, minimum lengths, beams, ... would reshape the distribution) and
# over transformers' defaults (top_k=50).
PURE_SAMPLING: dict[str, Any] = {
    "do_sample": True, "num_beams": 1, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
    "typical_p": 1.0, "min_p": None, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "return_dict_in_generate": False,
}
# Logit transforms of Hugging Face configs (softcaps, scales, multipliers) the losses lack.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "logits_soft_cap", "lm_head_multiplier", "output_multiplier")
# The trainer's counters in a checkpoint directory.
TRAINER_STATE = "trainer_state.json"
# Per-example numbers :func:`collate_pairs` stacks into ``[B]`` tensors.
_EXAMPLE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
# Per-example auxiliary rewards (HPO), stacked into ``aux_rewards``.
AUX_REWARDS = ("chosen_aux_reward", "rejected_aux_reward")


def _ids(name: str, value: Any) -> list[int]:
    ids = value.tolist() if isinstance(value, Tensor) else list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"{name} must be a sequence of token ids (ints)")
    return ids


def collate_pairs(
    examples: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int,
    ignore_index: int = -100,
    max_length: int | None = None,
    truncation: str = "keep_start",
    packed: bool = False,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """Tokenized preference pairs -> one batch of ``2B`` sequences, right-padded or packed.

    Each example holds ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (token ids, the
    completions with their EOS if the model should learn to stop) and optionally the scalars
    ``ref_chosen_logps``/``ref_rejected_logps``. Sequence ``i < B`` is ``prompt_i + chosen_i``,
    sequence ``B + i`` is ``prompt_i + rejected_i``; ``max_length`` keeps the first
    ``max_length`` tokens of each (``truncation="keep_start"``, TRL's default) or its last
    (``"keep_end"``).

    Returns ``input_ids [2B, L]`` (``pad_token_id`` after the end; L rounded up to a multiple of
    ``pad_to_multiple_of`` if given), ``attention_mask [2B, L]``
    and ``labels [2B, L]`` (the token ids on completion tokens, ``ignore_index`` on the prompt
    and the padding; not shifted); with ``packed``, the sequences one after the other with no
    padding instead: ``input_ids``, ``position_ids`` (from 0 in each sequence) and ``labels``,
    all ``[1, N]``, which Hugging Face models attend to sequence by sequence. Also
    ``prompt_input_ids``/``prompt_attention_mask [B, Lp]`` (the prompts, left-padded for
    generation) and each optional scalar as a ``[B]`` float tensor; ``chosen_aux_reward``
    (and ``rejected_aux_reward``), HPO's auxiliary rewards, become ``aux_rewards``: ``[2B]``,
    chosen first (``[B]`` with the chosen ones only).
    """
    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if truncation not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation must be 'keep_start' or 'keep_end', got {truncation!r}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    kept = slice(None, max_length) if truncation == "keep_start" or max_length is None else (
        slice(-max_length, None))
    prompts, rows, row_labels = [], [], []
    for key in ("chosen_ids", "rejected_ids"):
        for i, ex in enumerate(examples):
            prompt = _ids(f"examples[{i}]['prompt_ids']", ex["prompt_ids"])
            completion = _ids(f"examples[{i}][{key!r}]", ex[key])
            rows.append((prompt + completion)[kept])
            row_labels.append(([ignore_index] * len(prompt) + completion)[kept])
            if key == "chosen_ids":
                prompts.append(prompt)
    if packed:
        if not all(rows):
            raise ValueError("a packed batch needs a token in every sequence: an example has "
                             "an empty prompt and an empty completion")
        batch = {"input_ids": torch.tensor([t for r in rows for t in r])[None],
                 "position_ids": torch.cat([torch.arange(len(r)) for r in rows])[None],
                 "labels": torch.tensor([t for r in row_labels for t in r])[None]}
    else:
        length = max(len(r) for r in rows)
        if pad_to_multiple_of is not None:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        batch = {"input_ids": torch.full((len(rows), length), pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
                 "labels": torch.full((len(rows), length), ignore_index, dtype=torch.long)}
        for i, (ids, labels) in enumerate(zip(rows, row_labels, strict=True)):
            batch["input_ids"][i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            batch["attention_mask"][i, : len(ids)] = 1
            batch["labels"][i, : len(ids)] = torch.tensor(labels, dtype=torch.long)
    prompt_length = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), prompt_length), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i, p in enumerate(prompts):
        if p:
            prompt_ids[i, -len(p):] = torch.tensor(p, dtype=torch.long)
            prompt_mask[i, -len(p):] = 1
    batch.update(prompt_input_ids=prompt_ids, prompt_attention_mask=prompt_mask)
    for key in (*_EXAMPLE_KEYS, *AUX_REWARDS):
        present = [key in ex for ex in examples]
        if any(present) and not all(present):
            raise ValueError(f"{key} must be given for every example or for none")
        if all(present):
            batch[key] = torch.tensor([float(ex[key]) for ex in examples])
    if AUX_REWARDS[1] in batch and AUX_REWARDS[0] not in batch:
        raise ValueError(f"{AUX_REWARDS[1]} is given without {AUX_REWARDS[0]}")
    if AUX_REWARDS[0] in batch:  # HPO's aux_rewards: [2B] chosen first, or [B]
        batch["aux_rewards"] = torch.cat([batch.pop(k) for k in AUX_REWARDS if k in batch])
    return batch


@torch.no_grad()
def sample_online(
    policy: nn.Module,
    prompt_input_ids: Tensor,
    prompt_attention_mask: Tensor,
    *,
    num_samples: int,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    ignore_index: int = -100,
    **generate_kwargs: Any,
) -> dict[str, Tensor]:
    """``num_samples`` completions per prompt, y ~ π(·|x): ``policy.generate`` with plain
    ancestral sampling (:data:`PURE_SAMPLING`: temperature 1, one beam, no top-k, top-p, typical,
    min-p or repetition rule, and the model's ``generation_config`` set aside for the call, so
    none of its token rules apply), which the KL estimators assume; ``generate_kwargs`` override
    it (and add to it).

    Takes left-padded prompts ``[B, Lp]`` (as :func:`collate_pairs` makes them) and returns the
    ``M = B·num_samples`` online sequences, prompt-major: ``online_input_ids [M, Lp + G]``,
    ``online_attention_mask`` (the prompt's, then the completion up to and including its first
    ``eos_token_id``), ``online_labels`` (the completion's ids, ``ignore_index`` elsewhere) and
    ``group_ids [M]`` (the prompt of each sample, for HyPO's ``rloo``).
    """
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples} and "
                         f"{max_new_tokens}")
    from transformers import GenerationConfig

    saved = getattr(policy, "generation_config", None)
    if saved is not None:
        policy.generation_config = GenerationConfig()
    try:
        sequences = policy.generate(
            input_ids=prompt_input_ids, attention_mask=prompt_attention_mask,
            num_return_sequences=num_samples, max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            **{**PURE_SAMPLING, **generate_kwargs},
        )
    finally:
        if saved is not None:
            policy.generation_config = saved
    completion = sequences[:, prompt_input_ids.shape[1]:]
    keep = torch.ones_like(completion, dtype=torch.bool)
    if eos_token_id is not None:
        eos = (completion == eos_token_id).long()
        keep = (eos.cumsum(1) - eos) == 0  # nothing after the first EOS
    prompt_mask = prompt_attention_mask.repeat_interleave(num_samples, 0)
    return {
        "online_input_ids": sequences,
        "online_attention_mask": torch.cat([prompt_mask, keep.long()], 1),
        "online_labels": torch.cat([torch.full_like(prompt_mask, ignore_index),
                                    completion.masked_fill(~keep, ignore_index)], 1),
        "group_ids": torch.arange(prompt_input_ids.shape[0], device=sequences.device)
        .repeat_interleave(num_samples),
    }


def _disable_dropout(model: nn.Module) -> None:
    """Every ``nn.Dropout`` and every float ``*dropout*`` attribute of a module (attention
    modules keep their rate as a float for ``scaled_dot_product_attention``) set to 0."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for key, value in vars(m).items():
            if "dropout" in key and isinstance(value, float):
                setattr(m, key, 0.0)


def _check_causal_lm(name: str, model: nn.Module | None) -> None:
    """A decoder-only Hugging Face causal LM whose logits are ``h·Wᵀ + b`` of its last hidden
    states, or a clear error."""
    if model is None:
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    causal = set()
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update([names] if isinstance(names, str) else names)
    config = getattr(base, "config", None)
    if (not any(cls.__name__ in causal for cls in type(base).__mro__)
            or getattr(config, "is_encoder_decoder", False)):
        raise TypeError(f"{name} must be a decoder-only Hugging Face causal LM "
                        f"(an AutoModelForCausalLM class), got {type(base).__name__}")
    try:
        text = config.get_text_config(decoder=True)
    except (AttributeError, TypeError, ValueError):  # an older or composite config
        text = config
    for attr in _LOGIT_TRANSFORMS:
        if getattr(text, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"{name} has {attr}={getattr(text, attr)}: the losses take the "
                             f"plain logits h·Wᵀ + b, which it changes")
    head = model.get_output_embeddings()
    if hasattr(head, "base_layer") or hasattr(head, "modules_to_save"):
        raise ValueError(f"{name}'s output embedding is wrapped by PEFT ({type(head).__name__}): "
                         "the losses read its weight as the logits' W; leave the lm_head out of "
                         "the adapters (target_modules, modules_to_save)")
    _probe_logits(name, model)


def _has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (whose adapters can be switched off)."""
    return callable(getattr(model, "disable_adapter", None))


@torch.no_grad()
def _probe_logits(name: str, model: nn.Module) -> None:
    """One forward of four tokens, twice: the model's logits must be ``h·Wᵀ + b`` of its
    decoder's last hidden states (no transform the configs do not name), and causal (changing
    the last token changes no earlier logit). Skipped for parameters on the meta device."""
    param = next(model.parameters(), None)
    if param is None or param.device.type == "meta":
        return
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    ids = torch.arange(4, device=param.device)[None] % vocab
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % vocab
    training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids).logits.float()
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        changed = model(input_ids=other).logits.float()
    finally:
        model.train(training)
    plain = torch.nn.functional.linear(hidden, head.weight, head.bias).float()
    tol = 1e-3 * (1.0 + float(plain.abs().max()))
    if float((logits - plain).abs().max()) > tol:
        raise ValueError(f"{name}'s logits are not h·Wᵀ + b of its decoder's last hidden states "
                         f"(max difference {float((logits - plain).abs().max()):.3g}): the "
                         "losses take the plain logits")
    if float((logits[:, :-1] - changed[:, :-1]).abs().max()) > tol:
        raise ValueError(f"{name} is not causal: a later token changed earlier logits")


def _next_token_targets(labels: Tensor, position_ids: Tensor | None, ignore_index: int
                        ) -> tuple[Tensor, dict[str, Tensor]]:
    """``labels[:, 1:]`` (position t is scored on token t + 1) and the loss's layout arguments:
    none for padded rows; for a packed row (``position_ids``), the labels cut at each
    sequence's end (no label across a boundary) and the sequences' ``cu_seqlens``."""
    target = labels[:, 1:]
    if position_ids is None:
        return target, {}
    target = target.masked_fill(position_ids[:, 1:] == 0, ignore_index)
    starts = (position_ids[0, :-1] == 0).nonzero()[:, 0]
    return target, {"cu_seqlens": torch.cat([starts, starts.new_tensor([target.shape[1]])])}


def _hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
            position_ids: Tensor | None = None) -> Tensor:
    """The decoder's last hidden states but the last, ``[R, L - 1, d]``. Padded rows get their
    positions from the mask; a packed row brings them (and, with no mask and no cache,
    transformers attends within each sequence)."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids,
                               use_cache=False).last_hidden_state[:, :-1]


def _head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _drop_frozen_reference(module: PreferenceModel, state_dict: dict[str, Any], prefix: str,
                           local_metadata: Any) -> None:
    """``state_dict`` post-hook: no ``reference.*`` entries unless ``checkpoint_reference``."""
    if not module.checkpoint_reference:
        for key in [k for k in state_dict if k.startswith(prefix + "reference.")]:
            del state_dict[key]


def _keep_frozen_reference(module: PreferenceModel, state_dict: dict[str, Any], prefix: str,
                           *_: Any) -> None:
    """``load_state_dict`` pre-hook: a state without the reference keeps the live one."""
    if module.reference is not None and not any(
            k.startswith(prefix + "reference.") for k in state_dict):
        state_dict.update({prefix + "reference." + k: v
                           for k, v in module.reference.state_dict().items()})


class PreferenceModel(nn.Module):
    """A causal LM policy, its frozen reference and a :mod:`hypo_fast.losses` module::

        loss, metrics = PreferenceModel(policy, FusedLinearDPOLoss(), reference)(**batch)

    ``forward`` takes a batch of :func:`collate_pairs` (``input_ids``, ``attention_mask``,
    ``labels`` ``[2B, L]``, chosen rows first; ``prompt_*`` keys are ignored), runs
    ``policy.get_decoder()`` to the last hidden states ``h [2B, L, d]`` and calls the loss on
    ``h[:, :-1]`` (a view, read in place), ``labels[:, 1:]`` and the weight and bias of
    ``policy.get_output_embeddings()``; the reference the same way under ``no_grad``, unless the
    batch brings ``ref_chosen_logps``/``ref_rejected_logps``. HyPO's online samples come as
    ``online_input_ids``/``online_attention_mask``/``online_labels`` (:func:`sample_online`);
    ``token_mask``/``kl_mask`` (SparsePO) are shaped like ``input_ids`` and shifted with the
    labels; every other key goes to the loss as it is (``aux_rewards`` for HPO, ``group_ids``).
    Positions come from the attention mask, so left- and right-padded rows both work; a packed
    batch (``collate_pairs(packed=True)``: ``position_ids`` instead of the mask) costs no
    padding, its labels are cut at each sequence's end and its sequences passed to the loss as
    ``cu_seqlens`` (its online samples are packed the same way).

    Being one module, it is what Accelerate (DDP, FSDP) wraps: the output embedding is used
    inside its ``forward``, where FSDP has gathered it. ``disable_dropout`` sets every dropout of
    both models to 0 (``nn.Dropout`` modules, as TRL does by default, and the float rates
    attention modules keep; models that read a rate from their config inside ``forward``,
    such as Falcon or GPT-Neo, keep that one). Models must be decoder-only causal LMs whose
    logits are ``h·Wᵀ + b``: a config with a logit softcap, scale or multiplier (Gemma-2,
    Cohere, Granite, Falcon-H1, ...) is refused, and a forward of four tokens checks the rest
    (the logits against the head on the decoder's output, and causality).
    Its ``state_dict`` leaves out a frozen reference, which never changes (a checkpoint would
    hold the model twice), and ``load_state_dict`` of a state without it keeps the live one;
    ``checkpoint_reference = True`` (set by a TR-DPO :class:`PreferenceTrainer`) includes it.
    A PEFT policy (LoRA, ...) with no ``reference`` has its own base model as the reference:
    the reference passes run the policy with its adapters disabled (TRL's way; no second copy
    of the model). Its lm_head must not be adapted (the losses read its weight).
    Returns the loss and the loss's metrics (a dict of detached tensors).
    """

    def __init__(self, policy: nn.Module, loss_fn: nn.Module, reference: nn.Module | None = None,
                 *, disable_dropout: bool = True) -> None:
        super().__init__()
        _check_causal_lm("policy", policy)
        _check_causal_lm("reference", reference)
        if reference is not None:
            vocab, ref_vocab = (m.get_output_embeddings().weight.shape[0]
                                for m in (policy, reference))
            if vocab != ref_vocab:
                raise ValueError(f"the reference's vocabulary ({ref_vocab}) is not the "
                                 f"policy's ({vocab}): they must share the tokenizer")
        self.policy = policy
        # what Accelerate's FSDP auto-wrap reads to find the decoder layers
        self._no_split_modules = getattr(policy, "_no_split_modules", None)
        self.loss_fn = loss_fn
        self.reference = reference
        self.adapter_reference = reference is None and _has_adapters(policy)
        # the reference never changes unless synced (TR-DPO): checkpoints leave it out
        self.checkpoint_reference = False
        self.register_state_dict_post_hook(_drop_frozen_reference)
        self.register_load_state_dict_pre_hook(_keep_frozen_reference)
        if reference is not None:
            reference.requires_grad_(False).eval()
        if disable_dropout:
            for model in (policy, reference):
                if model is not None:
                    _disable_dropout(model)

    def train(self, mode: bool = True) -> PreferenceModel:
        """The policy and the loss follow ``mode``; the reference stays in eval mode."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def _reference_model(self) -> nn.Module | None:
        return self.reference if self.reference is not None else (
            self.policy if self.adapter_reference else None)

    def _reference_hidden(self, input_ids: Tensor, attention_mask: Tensor | None,
                          position_ids: Tensor | None = None) -> Tensor:
        model = self._reference_model()
        if model is None:
            raise ValueError("this loss needs the reference model's hidden states: pass "
                             "reference= to PreferenceModel (or ref_chosen_logps/"
                             "ref_rejected_logps in the batch for the offline pairs)")
        adapters_off = self.policy.disable_adapter() if model is self.policy else (
            contextlib.nullcontext())
        with torch.no_grad(), adapters_off:
            return _hidden(model, input_ids, attention_mask, position_ids)

    def forward(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, **batch: Tensor
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, metrics)`` of the loss module on the batch (see the class docstring)."""
        if (attention_mask is None) == (position_ids is None):
            raise ValueError("pass attention_mask (a padded batch) or position_ids (a packed "
                             "one), as collate_pairs makes them")
        batch = {k: v for k, v in batch.items() if not k.startswith("prompt_")}
        target, layout = _next_token_targets(labels, position_ids, self.loss_fn.ignore_index)
        batch.update(layout)
        online = {k: batch.pop(f"online_{k}", None)
                  for k in ("input_ids", "attention_mask", "labels")}
        for key in _TOKEN_KEYS:
            if key in batch:
                batch[key] = batch[key][:, 1:]
        has_online = online["input_ids"] is not None
        if isinstance(self.loss_fn, HyPOLoss) != has_online:
            raise ValueError(
                "HyPOLoss needs online samples: online_input_ids, online_attention_mask and "
                "online_labels in the batch (sample_online, or "
                "PreferenceTrainer(online=OnlineSampling()))" if not has_online else
                f"online samples were given but {type(self.loss_fn).__name__} takes none "
                "(HyPOLoss does)")
        weight, bias = _head(self.policy)
        wants_ref = getattr(self.loss_fn, "use_ref_model", True)
        ref: dict[str, Tensor | None] = {}
        reference = self._reference_model()
        if (wants_ref or has_online) and reference is not None:
            ref["ref_weight"], ref["ref_bias"] = _head(reference)
        if wants_ref and "ref_chosen_logps" not in batch and "ref_rejected_logps" not in batch:
            ref["ref_input"] = self._reference_hidden(input_ids, attention_mask, position_ids)
        if has_online:
            ids, mask, online_positions = online["input_ids"], online["attention_mask"], None
            if position_ids is not None:  # a packed batch: its online samples packed too
                keep = mask.bool()
                online_positions = (mask.long().cumsum(-1) - 1)[keep][None]
                ids, mask, online["labels"] = ids[keep][None], None, online["labels"][keep][None]
            batch["online_target"], online_layout = _next_token_targets(
                online["labels"], online_positions, self.loss_fn.ignore_index)
            batch.update({f"online_{k}": v for k, v in online_layout.items()})
            batch["online_input"] = _hidden(self.policy, ids, mask, online_positions)
            batch["online_ref_input"] = self._reference_hidden(ids, mask, online_positions)
        hidden = _hidden(self.policy, input_ids, attention_mask, position_ids)
        loss, aux = self.loss_fn(weight, hidden, target, bias, **ref, **batch)
        return loss, aux.metrics


@torch.no_grad()
def reference_logps(reference: nn.Module, loss_fn: nn.Module, batch: Mapping[str, Tensor]
                    ) -> tuple[Tensor, Tensor]:
    """``(ref_chosen_logps, ref_rejected_logps)``, each ``[B]``: the reference model's sequence
    log-probs of a :func:`collate_pairs` batch (padded or packed, on the model's device) as
    ``loss_fn`` computes them in training (its ``reference_logps``: sums, or means with
    ``average_log_prob``, LD-DPO's weights)."""
    hidden = _hidden(reference, batch["input_ids"], batch.get("attention_mask"),
                     batch.get("position_ids"))
    target, layout = _next_token_targets(batch["labels"], batch.get("position_ids"),
                                         loss_fn.ignore_index)
    weight, bias = _head(reference)
    return loss_fn.reference_logps(weight, hidden, target, bias, **layout)


def precompute_reference_logps(
    reference: nn.Module,
    loss_fn: nn.Module,
    examples: Sequence[Mapping[str, Any]],
    *,
    collate: Callable[[list[Mapping[str, Any]]], dict[str, Tensor]],
    batch_size: int = 8,
    accelerator: Accelerator | None = None,
) -> list[dict[str, Any]]:
    """The examples (tokenized pairs, as :func:`collate_pairs` takes them) with
    ``ref_chosen_logps``/``ref_rejected_logps`` added: :func:`reference_logps` over batches of
    ``batch_size`` made by ``collate``, in eval mode, under the accelerator's autocast (the
    mixed precision training would score them in). The reference can then be dropped:
    :class:`PreferenceModel` without ``reference`` takes the log-probs from the batch (TRL's
    ``precompute_ref_log_probs``).

    The model runs as it is, on its device (``accelerator.device`` if given), not wrapped by
    any engine. With several processes, each scores ``examples[rank::world]`` and the values
    are gathered, so that every process returns them all.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_causal_lm("reference", reference)
    device = next(reference.parameters()).device
    # a tensor's device, not the accelerator's name of it: "cpu", never "cpu:0"
    if accelerator is not None and device != torch.empty(0, device=accelerator.device).device:
        raise ValueError(f"the reference is on {device} but the accelerator's device is "
                         f"{accelerator.device}: move it there first")
    rank, world = ((accelerator.process_index, accelerator.num_processes)
                   if accelerator is not None else (0, 1))
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    training = reference.training
    reference.eval()
    mine, scored = list(range(rank, len(examples), world)), []
    try:
        with autocast:
            for start in range(0, len(mine), batch_size):
                index = mine[start:start + batch_size]
                batch = {k: v.to(device) for k, v in
                         collate([examples[i] for i in index]).items()}
                chosen, rejected = reference_logps(reference, loss_fn, batch)
                scored += zip(index, chosen.tolist(), rejected.tolist(), strict=True)
    finally:
        reference.train(training)
    if world > 1:
        from accelerate.utils import gather_object

        scored = gather_object(scored)
    out = [dict(ex) for ex in examples]
    for i, chosen, rejected in scored:
        out[i].update(ref_chosen_logps=chosen, ref_rejected_logps=rejected)
    return out


@dataclass
class OnlineSampling:
    """How :class:`PreferenceTrainer` draws HyPO's online samples each step
    (:func:`sample_online`): ``num_samples`` per prompt of ``max_new_tokens`` at most, ending at
    ``eos_token_id``; ``generate_kwargs`` go to ``generate`` over :data:`PURE_SAMPLING` (the KL
    estimators assume samples from π itself: change ``temperature``, ``top_p``, ... knowingly)."""

    num_samples: int = 2
    max_new_tokens: int = 64
    eos_token_id: int | None = None
    pad_token_id: int = 0
    generate_kwargs: dict[str, Any] = field(default_factory=dict)


def _shards_parameters(accelerator: Accelerator) -> bool:
    """Whether the engine keeps only a shard of each parameter outside the forward."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return kind == DistributedType.FSDP or (
        kind == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3)


def _check_reference_sync(model: PreferenceModel, steps: int, alpha: float) -> None:
    """TR-DPO's arguments, and a reference whose parameters match the policy's."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"ref_model_sync_steps must be an int >= 1 or None, got {steps!r}")
    check_in_range("ref_model_mixup_alpha", alpha, 0.0, 1.0)
    if model.reference is None:
        raise ValueError("ref_model_sync_steps needs a reference model of its own (a PEFT "
                         "policy's base, or none, cannot move towards the policy)")
    ref = {n: p.shape for n, p in model.reference.named_parameters()}
    pol = {n: p.shape for n, p in model.policy.named_parameters()}
    if ref != pol:
        diff = sorted(set(ref.items()) ^ set(pol.items()))
        raise ValueError("ref_model_sync_steps needs the reference's parameters to match the "
                         f"policy's by name and shape; they differ at {diff[0][0]}")


class PreferenceTrainer:
    """Optimises a :class:`PreferenceModel` through 🤗 Accelerate::

        trainer = PreferenceTrainer(PreferenceModel(policy, loss_fn, reference), optimizer)
        history = trainer.fit(loader)  # loader yields collate_pairs batches

    ``accelerator`` (default ``Accelerator()``) decides the devices, the mixed precision, the
    gradient accumulation and the distributed engine (launch with ``accelerate launch``); the
    model and the optimizer (and ``lr_scheduler``) go through ``accelerator.prepare``.
    ``max_grad_norm`` clips the gradient norm before each optimizer step. With ``online`` and a
    :class:`HyPOLoss`, each step first samples the online completions of the batch's prompts
    from the current policy. With ``ref_model_sync_steps`` τ (TR-DPO, TRL's
    ``sync_ref_model``), every τ optimizer steps the reference moves towards the policy,
    ``θ_ref ← α·θ + (1 − α)·θ_ref`` with α = ``ref_model_mixup_alpha`` (its parameters must
    match the policy's by name and shape). Each step returns the loss and the metrics' means
    over the batch and the processes, as floats.
    """

    def __init__(self, model: PreferenceModel, optimizer: torch.optim.Optimizer, *,
                 accelerator: Accelerator | None = None, lr_scheduler: Any = None,
                 max_grad_norm: float | None = None, online: OnlineSampling | None = None,
                 ref_model_sync_steps: int | None = None, ref_model_mixup_alpha: float = 0.6
                 ) -> None:
        try:
            from accelerate import Accelerator
        except ImportError as e:  # pragma: no cover - accelerate is in the dev extra
            raise ImportError("PreferenceTrainer needs accelerate: "
                              "pip install 'hypo-fast[train]'") from e
        if online is not None and not isinstance(model.loss_fn, HyPOLoss):
            raise ValueError("online sampling is for HyPOLoss, got "
                             f"{type(model.loss_fn).__name__}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if ref_model_sync_steps is not None:
            _check_reference_sync(model, ref_model_sync_steps, ref_model_mixup_alpha)
            model.checkpoint_reference = True  # a synced reference is part of the state
        self.accelerator = accelerator if accelerator is not None else Accelerator()
        if online is not None and _shards_parameters(self.accelerator):
            raise ValueError("online sampling calls the policy's generate outside the wrapped "
                             "forward: not under FSDP or DeepSpeed ZeRO-3 (DDP, ZeRO-1/2 work)")
        prepared = self.accelerator.prepare(
            model, optimizer, *([lr_scheduler] if lr_scheduler is not None else []))
        self.model, self.optimizer = prepared[0], prepared[1]
        self.lr_scheduler = prepared[2] if lr_scheduler is not None else None
        self.max_grad_norm = max_grad_norm
        self.online = online
        self.ref_model_sync_steps = ref_model_sync_steps
        self.ref_model_mixup_alpha = ref_model_mixup_alpha
        self.batches = 0  # batches trained on
        self.optimizer_steps = 0  # optimizer steps taken (batches / accumulation)
        self._resume_at = 0  # batches the next fit skips (load_checkpoint)

    def _model_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The batch on the accelerator's device, with its online samples when sampling."""
        batch = {k: v.to(self.accelerator.device) if isinstance(v, Tensor) else v
                 for k, v in batch.items()}
        if self.online is not None:
            batch.update(self._online_batch(batch))
        return batch

    def _online_batch(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        o = self.online
        assert o is not None
        missing = {"prompt_input_ids", "prompt_attention_mask"} - batch.keys()
        if missing:
            raise ValueError(f"online sampling needs the batch's prompts: {sorted(missing)} "
                             "missing (collate_pairs makes them)")
        model = self.accelerator.unwrap_model(self.model)
        return sample_online(
            model.policy, batch["prompt_input_ids"], batch["prompt_attention_mask"],
            num_samples=o.num_samples, max_new_tokens=o.max_new_tokens,
            eos_token_id=o.eos_token_id, pad_token_id=o.pad_token_id,
            ignore_index=model.loss_fn.ignore_index, **o.generate_kwargs,
        )

    def step(self, batch: Mapping[str, Tensor], *, window: int | None = None
             ) -> dict[str, float]:
        """One forward, backward and (at the end of an accumulation) optimizer step. Accelerate
        divides each batch's loss by the accumulation steps; ``window``, the number of batches
        this step's accumulation actually holds (fewer at the end of an epoch), rescales it, so
        that every optimizer step follows the mean loss of its batches. The numbers returned
        include the ``lr`` the step used."""
        batch = self._model_inputs(batch)
        self.model.train()
        accumulation = self.accelerator.gradient_accumulation_steps
        scale = accumulation / window if window else 1.0
        lr = torch.tensor(float(self.optimizer.param_groups[0]["lr"]),
                          device=self.accelerator.device)
        with self.accelerator.accumulate(self.model):
            loss, metrics = self.model(**batch)
            self.accelerator.backward(loss * scale)
            if self.max_grad_norm is not None and self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            if self.accelerator.sync_gradients and not self.optimizer.step_was_skipped:
                self.optimizer_steps += 1
                if self.ref_model_sync_steps and (
                        self.optimizer_steps % self.ref_model_sync_steps == 0):
                    self._sync_reference()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.optimizer.zero_grad()
        self.batches += 1
        values = {"loss": loss.detach(), **metrics, "lr": lr}
        means = torch.stack([v.detach().float().mean() for v in values.values()])
        means = self.accelerator.reduce(means, reduction="mean")
        return dict(zip(values, means.tolist(), strict=True))

    @torch.no_grad()
    def _sync_reference(self) -> None:
        """TR-DPO's update of the reference: ``θ_ref ← α·θ + (1 − α)·θ_ref``."""
        model = self.accelerator.unwrap_model(self.model)
        policy = dict(model.policy.named_parameters())
        for name, ref in model.reference.named_parameters():
            ref.lerp_(policy[name].detach(), self.ref_model_mixup_alpha)

    def _prepared(self, loader: Iterable[Mapping[str, Tensor]]
                  ) -> Iterable[Mapping[str, Tensor]]:
        """A ``DataLoader`` through ``accelerator.prepare`` (once: a prepared one is kept)."""
        from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

        if isinstance(loader, torch.utils.data.DataLoader) and not isinstance(
                loader, DataLoaderShard | DataLoaderDispatcher):
            return self.accelerator.prepare(loader)
        return loader

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Mapping[str, Tensor]]) -> dict[str, float]:
        """The loss and the metrics over ``loader`` (prepared as in :meth:`fit`), without
        gradients and in eval mode: means over its pairs, those of every process, each pair
        counted once (a metric with one value per pair is averaged over the pairs; a batch's
        scalar counts once per pair of the batch). With ``online``, the online samples are
        drawn as in training."""
        self.model.eval()
        totals: Tensor | None = None
        names: list[str] = []
        for batch in self._prepared(loader):
            loss, metrics = self.model(**self._model_inputs(batch))
            pairs = metrics["chosen_logps"].numel()  # padded or packed
            values = {"loss": loss, **metrics}
            names = list(values)
            rows = torch.stack([v.detach().double().reshape(-1) if v.numel() == pairs else
                                v.detach().double().mean().expand(pairs)
                                for v in values.values()], 1)  # fp64: sums over a dataset
            rows = self.accelerator.gather_for_metrics(rows)
            total = torch.cat([rows.sum(0), rows.new_tensor([rows.shape[0]])])
            totals = total if totals is None else totals + total
        if totals is None:
            raise ValueError("evaluate needs at least one batch")
        means = (totals[:-1] / totals[-1]).tolist()
        return dict(zip(names, means, strict=True))

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """What a resumed run needs, to the directory ``path``, from every process (at the end
        of an accumulation window, as :meth:`fit` saves): Accelerate's state (the policy, the
        reference only when synced (TR-DPO: a frozen one is the model it was built with), the
        optimizer, the lr scheduler, the accumulation step and the RNG states) and the
        trainer's counters (``trainer_state.json``)."""
        self.accelerator.save_state(str(path))
        if self.accelerator.is_main_process:
            counters = {"batches": self.batches, "optimizer_steps": self.optimizer_steps}
            (Path(path) / TRAINER_STATE).write_text(json.dumps(counters) + "\n")
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore a :meth:`save_checkpoint` directory (into the same kind of model, optimizer,
        scheduler and accelerator); the next :meth:`fit` resumes where it was saved."""
        state = Path(path) / TRAINER_STATE
        if not state.is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint of "
                                    f"PreferenceTrainer.save_checkpoint (no {TRAINER_STATE})")
        self.accelerator.load_state(str(path))
        counters = json.loads(state.read_text())
        self.batches = self._resume_at = counters["batches"]
        self.optimizer_steps = counters["optimizer_steps"]

    def fit(self, loader: Iterable[Mapping[str, Tensor]], *, epochs: int = 1,
            on_step: Callable[[int, int, dict[str, float]], None] | None = None,
            eval_loader: Iterable[Mapping[str, Tensor]] | None = None,
            eval_every: int | None = None,
            on_eval: Callable[[int, int, dict[str, float]], None] | None = None,
            save_every: int | None = None,
            on_save: Callable[[int], str | os.PathLike[str]] | None = None,
            max_steps: int | None = None,
            ) -> list[dict[str, float]]:
        """:meth:`step` over ``loader`` (prepared by the accelerator when it is a
        ``DataLoader``) ``epochs`` times; ``on_step(batch, epoch, numbers)`` after each batch
        (``batch`` counts the batches trained on, from 1). A loader with a length gets its
        last, shorter accumulation window of each epoch rescaled (:meth:`step`'s ``window``).

        With ``eval_loader``, :meth:`evaluate` runs at the end of each epoch and every
        ``eval_every`` batches, and its numbers go to ``on_eval(batch, epoch, numbers)``. With
        ``save_every``, every ``save_every`` optimizer steps a checkpoint is saved
        (:meth:`save_checkpoint`) to the directory ``on_save(optimizer_steps)`` names. With
        ``max_steps``, the run stops at that many optimizer steps (evaluated then, as at an
        epoch's end), whatever ``epochs``.

        After :meth:`load_checkpoint`, the run resumes: ``epochs`` counts the run's epochs in
        all, and the interrupted epoch goes on past the batches already trained on (the
        same batches only if the loader's order is a function of the epoch, as with
        Accelerate's ``use_seedable_sampler``, or unshuffled). Returns this call's numbers."""
        for name, every in (("eval_every", eval_every), ("save_every", save_every),
                            ("max_steps", max_steps)):
            if every is not None and every < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {every}")
        if save_every is not None and on_save is None:
            raise ValueError("save_every needs on_save (the directory of each checkpoint)")
        if eval_loader is None and (eval_every is not None or on_eval is not None):
            raise ValueError("eval_every and on_eval need eval_loader")
        if max_steps is not None and self.optimizer_steps >= max_steps:
            return []  # a run resumed at its last step
        loader = self._prepared(loader)
        if eval_loader is not None:
            eval_loader = self._prepared(eval_loader)
        accumulation = self.accelerator.gradient_accumulation_steps
        length = len(loader) if hasattr(loader, "__len__") else None
        tail = length % accumulation if length is not None else 0
        if self._resume_at and not length:
            raise ValueError("resuming needs a loader with a length (to find the epoch)")
        first, skip = divmod(self._resume_at, length) if self._resume_at else (0, 0)
        self._resume_at = 0
        history: list[dict[str, float]] = []

        def evaluate(epoch: int) -> None:
            numbers = self.evaluate(eval_loader)
            if on_eval is not None:
                on_eval(self.batches, epoch, numbers)

        for epoch in range(first, epochs):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            batches = self.accelerator.skip_first_batches(loader, skip) if skip else loader
            for i, batch in enumerate(batches, start=skip):
                window = tail if tail and i >= length - tail else None
                steps = self.optimizer_steps
                history.append(self.step(batch, window=window))
                if on_step is not None:
                    on_step(self.batches, epoch, history[-1])
                last = length is not None and i == length - 1
                stop = max_steps is not None and self.optimizer_steps >= max_steps
                if eval_loader is not None and eval_every and not last and not stop and (
                        self.batches % eval_every == 0):
                    evaluate(epoch)
                if save_every and self.optimizer_steps > steps and (
                        self.optimizer_steps % save_every == 0):
                    self.save_checkpoint(on_save(self.optimizer_steps))
                if stop:
                    if eval_loader is not None:
                        evaluate(epoch)
                    return history
            skip = 0
            if eval_loader is not None:
                evaluate(epoch)
        return history
