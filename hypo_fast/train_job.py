"""The ``hypo-fast train`` job: preference pairs in a JSON-lines file + a Hugging Face causal LM
directory -> the trained policy, through :class:`hypo_fast.trainer.PreferenceTrainer`.

``--data`` (and ``--eval-data``) hold one pair per line, read and tokenized as TRL does
(:mod:`hypo_fast.preference_data`: text or conversations, explicit or implicit prompts). The
model and its tokenizer load from ``--model`` (the reference from ``--ref-model``, default the
same, or the base of ``--lora-r``'s adapters; with ``--precompute-ref-logps`` it scores the
pairs once and is freed); the policy (or its adapters), its tokenizer, ``metrics.jsonl`` (one
line per batch and per evaluation) and ``--save-every``'s checkpoints are written to
``--output``. On several GPUs: ``accelerate launch [--num_processes N ...] -m hypo_fast.cli
train ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .losses import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    KL_ESTIMATORS,
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
    HPOLoss,
    HyPOLoss,
)
from .preference_data import read_pairs, tokenize_pairs
from .trainer import (
    AUX_REWARDS,
    TRAINER_STATE,
    OnlineSampling,
    PreferenceModel,
    PreferenceTrainer,
    _shards_parameters,
    collate_pairs,
    precompute_reference_logps,
)

LOSSES = ("dpo", "simpo", "cpo", "orpo", "hypo", "hpo")
TRACKERS = ("all", "tensorboard", "wandb", "trackio", "aim", "comet_ml", "mlflow", "clearml",
            "dvclive", "swanlab")  # accelerate.utils.LoggerType
REFERENCE_FREE = ("simpo", "cpo", "orpo")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Options of one loss, None on the command line unless given: given with another loss they are
# an error
LOSS_DEFAULTS = {
    "hypo": {"kl_coef": 0.1, "estimator": "rloo", "online_samples": 2, "max_new_tokens": 64},
    "hpo": {"aux_coef": 1.0, "aux_tau": 1.0, "aux_w_max": 20.0},
}
DPO_FAMILY = ("dpo", "hypo", "hpo")
# Every loss option and the losses that take it (TRL's DPOConfig/CPOConfig names), None on the
# command line unless given: given with another loss it is an error
LOSS_OPTIONS = {
    **{k: (loss,) for loss, defaults in LOSS_DEFAULTS.items() for k in defaults},
    "loss_type": DPO_FAMILY, "loss_weights": DPO_FAMILY, "rpo_alpha": DPO_FAMILY,
    "ld_alpha": DPO_FAMILY, "use_weighting": DPO_FAMILY,
    "ref_model_sync_steps": DPO_FAMILY, "ref_model_mixup_alpha": DPO_FAMILY,
    "f_divergence_type": DPO_FAMILY, "f_alpha_divergence_coef": DPO_FAMILY,
    "discopop_tau": DPO_FAMILY,
    "label_smoothing": (*DPO_FAMILY, "simpo", "cpo"),
    "cpo_alpha": ("simpo", "cpo"), "simpo_gamma": ("simpo",),
}
DESCRIPTION = ("Preference-train a Hugging Face causal LM on the pairs of a JSON-lines file "
               '({"prompt", "chosen", "rejected"} per line: strings, or lists of messages for '
               "the chat template) with a fused loss; the policy, its tokenizer and "
               "metrics.jsonl go to --output. Several GPUs: accelerate launch "
               "-m hypo_fast.cli train ...")


def _takers(key: str, last: str = " or ") -> str:
    """The losses that take option ``key``, listed: "dpo, hypo or hpo"."""
    *others, final = LOSS_OPTIONS[key]
    return ", ".join(others) + last + final if others else final


def _loss_help(key: str, text: str) -> str:
    """``text``, the help of option ``key``, after the losses that take it."""
    return f"{_takers(key, ', ')}: {text}"


def build_loss(args: argparse.Namespace) -> torch.nn.Module:
    """The loss module ``--loss`` names, with the command's hyperparameters (HyPO's and HPO's
    defaults filled in by the argument check)."""
    common: dict[str, Any] = {"beta": args.beta} if args.beta is not None else {}
    if args.label_smoothing is not None:
        common["label_smoothing"] = args.label_smoothing
    if args.loss in DPO_FAMILY:
        types, weights, nll_weight = _loss_types(args)
        common["loss_type"] = types[0] if len(types) == 1 else types
        if weights is not None:
            common["loss_weights"] = weights
        for key in ("f_divergence_type", "f_alpha_divergence_coef", "discopop_tau"):
            if getattr(args, key) is not None:
                common[key] = getattr(args, key)
        if nll_weight is not None:  # + nll_weight·NLL of the chosen completions
            common.update(compute_nll_loss=True, alpha=nll_weight)
        if args.ld_alpha is not None:
            common["ld_alpha"] = args.ld_alpha
        if args.use_weighting:
            common["use_weighting"] = True
    if args.cpo_alpha is not None:  # the NLL's weight; 0: none
        common.update(compute_nll_loss=args.cpo_alpha != 0, alpha=args.cpo_alpha)
    if args.simpo_gamma is not None:
        common["gamma"] = args.simpo_gamma
    if args.loss == "dpo":
        return FusedLinearDPOLoss(**common)
    if args.loss == "hypo":
        return HyPOLoss(**common, kl_coef=args.kl_coef, estimator=args.estimator)
    if args.loss == "hpo":
        return HPOLoss(**common, aux_coef=args.aux_coef, aux_tau=args.aux_tau,
                       aux_w_max=args.aux_w_max)
    return {"simpo": FusedLinearSimPOLoss, "cpo": FusedLinearCPOLoss,
            "orpo": FusedLinearORPOLoss}[args.loss](**common)


def _loss_types(args: argparse.Namespace
                ) -> tuple[list[str], list[float] | None, float | None]:
    """``(types, weights, nll_weight)`` of ``--loss-type`` and ``--loss-weights``, with TRL's
    ``sft`` (the chosen completions' NLL, at its weight) or ``--rpo-alpha`` (the same, TRL's
    older name) as the loss's NLL term (None without one)."""
    types = list(args.loss_type or ["sigmoid"])
    weights = None if args.loss_weights is None else list(args.loss_weights)
    if weights is not None and len(weights) != len(types):
        raise ValueError(f"--loss-weights: one per --loss-type, got {len(weights)} for "
                         f"{len(types)}")
    nll_weight = args.rpo_alpha
    if "sft" in types:
        if args.rpo_alpha is not None:
            raise ValueError("--loss-type sft and --rpo-alpha both add the NLL: give one")
        i = types.index("sft")
        nll_weight = 1.0 if weights is None else weights.pop(i)
        types.pop(i)
        if not types:
            raise ValueError("--loss-type sft needs a preference loss type beside it")
    return types, weights, nll_weight


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's arguments."""
    p.add_argument("--model", required=True, help="Hugging Face model directory (or hub id)")
    p.add_argument("--data", required=True, type=Path,
                   help='JSON lines of {"prompt": ..., "chosen": ..., "rejected": ...}')
    p.add_argument("--output", required=True, type=Path, help="where the policy is saved")
    p.add_argument("--ref-model", default=None, help="reference model (default: --model)")
    p.add_argument("--loss", choices=LOSSES, default="dpo")
    p.add_argument("--loss-type", choices=(*DPO_LOSS_TYPES, "sft"), nargs="+", default=None,
                   metavar="TYPE", help=_loss_help(
                       "loss_type", "the loss type (default sigmoid), or several summed with "
                       "--loss-weights (TRL's multi-loss form; sft: the chosen completions' "
                       f"NLL); one of {', '.join((*DPO_LOSS_TYPES, 'sft'))}"))
    p.add_argument("--loss-weights", type=float, nargs="+", default=None, help=_loss_help(
        "loss_weights", "one weight per --loss-type (default all 1)"))
    p.add_argument("--beta", type=float, default=None, help="default: the loss's own")
    p.add_argument("--label-smoothing", type=float, default=None, help=_loss_help(
        "label_smoothing", "the preference labels' noise (default 0)"))
    p.add_argument("--rpo-alpha", type=float, default=None, help=_loss_help(
        "rpo_alpha", "add this times the chosen completions' NLL (RPO)"))
    p.add_argument("--ld-alpha", type=float, default=None, help=_loss_help(
        "ld_alpha", "LD-DPO's weight of the tokens past the shorter completion's length, in "
        "[0, 1]"))
    p.add_argument("--use-weighting", action="store_true", default=None, help=_loss_help(
        "use_weighting", "WPO's per-pair weights"))
    p.add_argument("--f-divergence-type", default=None, choices=F_DIVERGENCE_TYPES,
                   help=_loss_help("f_divergence_type",
                                   "f-DPO's divergence (default reverse_kl)"))
    p.add_argument("--f-alpha-divergence-coef", type=float, default=None, help=_loss_help(
        "f_alpha_divergence_coef", "f-DPO's alpha-divergence coefficient (default 0.5)"))
    p.add_argument("--discopop-tau", type=float, default=None, help=_loss_help(
        "discopop_tau", "DiscoPOP's temperature (default 0.05)"))
    p.add_argument("--cpo-alpha", type=float, default=None, help=_loss_help(
        "cpo_alpha", "the chosen completions' NLL weight (default 1; 0: none)"))
    p.add_argument("--simpo-gamma", type=float, default=None, help=_loss_help(
        "simpo_gamma", "the target reward margin γ (default 0.5)"))
    p.add_argument("--ref-model-sync-steps", type=int, default=None, metavar="N",
                   help=_loss_help("ref_model_sync_steps", "TR-DPO, every N optimizer steps "
                                   "the reference moves towards the policy (full "
                                   "fine-tuning)"))
    p.add_argument("--ref-model-mixup-alpha", type=float, default=None,
                   help="TR-DPO: ref <- alpha * policy + (1 - alpha) * ref (default 0.6)")
    p.add_argument("--kl-coef", type=float, default=None, help="HyPO's λ (default 0.1)")
    p.add_argument("--estimator", choices=KL_ESTIMATORS, default=None,
                   help="HyPO's KL estimator (default rloo)")
    p.add_argument("--online-samples", type=int, default=None,
                   help="HyPO: samples per prompt (default 2)")
    p.add_argument("--aux-coef", type=float, default=None,
                   help="HPO: weight of the auxiliary-reward term (default 1); the rewards are "
                        "each line's chosen_aux_reward (and rejected_aux_reward)")
    p.add_argument("--aux-tau", type=float, default=None, help="HPO: temperature (default 1)")
    p.add_argument("--aux-w-max", type=float, default=None,
                   help="HPO: largest advantage weight (default 20)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="HyPO: sample length (default 64)")
    p.add_argument("--precompute-ref-logps", action="store_true",
                   help="score the pairs under the reference model once, before training, and "
                        "free it (HyPO keeps it for its online samples)")
    p.add_argument("--eval-data", type=Path, default=None,
                   help="pairs to evaluate on (same format as --data): eval_* numbers in "
                        "metrics.jsonl at the end of each epoch")
    p.add_argument("--eval-every", type=int, default=None,
                   help="also evaluate every this many batches")
    p.add_argument("--save-every", type=int, default=None,
                   help="save a checkpoint to OUTPUT/checkpoint-STEP every this many optimizer "
                        "steps (the policy, a synced reference, the optimizer, scheduler, RNG "
                        "states and counters)")
    p.add_argument("--save-total-limit", type=int, default=None, metavar="K",
                   help="keep only the newest K checkpoints (each older one is deleted once a "
                        "newer one is complete)")
    p.add_argument("--resume-from", type=Path, default=None,
                   help="a checkpoint directory to resume from (same arguments otherwise): the "
                        "interrupted epoch goes on with the batches not yet trained on")
    p.add_argument("--lora-r", type=int, default=0,
                   help="train LoRA adapters of this rank (peft) instead of every weight; the "
                        "reference is then the base model, adapters off, unless --ref-model "
                        "is given; --output gets the adapters (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="LoRA's alpha (default: --lora-r, a scale of 1)")
    p.add_argument("--lora-target-modules", nargs="+", default=["all-linear"],
                   help="the modules LoRA adapts (peft's names; default: every linear layer "
                        "but the output layer)")
    p.add_argument("--merge-lora", action="store_true",
                   help="save the policy with the adapters merged into its weights (a plain "
                        "model directory) instead of the adapters (not under FSDP/ZeRO-3)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW's, on all but biases and norms (TRL's default 0)")
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--adam-epsilon", type=float, default=1e-8)
    p.add_argument("--lr-scheduler", choices=("linear", "cosine", "constant"),
                   default="linear",
                   help="after the warmup: linear decay to 0 over the run (TRL's default), "
                        "cosine decay to 0, or constant")
    p.add_argument("--warmup-steps", type=int, default=0, help="optimizer steps of warmup")
    p.add_argument("--warmup-ratio", type=float, default=None,
                   help="warmup over this fraction of the run's optimizer steps (rounded up)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per process and batch")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps, in place of --epochs (the "
                        "schedule spans them)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="batches per optimizer step (gradient accumulation)")
    p.add_argument("--max-length", type=int, default=1024,
                   help="tokens kept of each prompt + completion (see --truncation-mode)")
    p.add_argument("--truncation-mode", choices=("keep_start", "keep_end"),
                   default="keep_start",
                   help="which tokens of a sequence longer than --max-length are kept: its "
                        "first (pairs whose prompt fills it are dropped) or its last")
    p.add_argument("--pad-to-multiple-of", type=int, default=None,
                   help="pad each batch's length to a multiple of this")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--packed", action="store_true",
                   help="pack each batch's sequences into one row (no padding; attention kept "
                        "within each sequence by transformers, from the positions)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer's activations in the backward instead of "
                        "keeping them (less memory, about one more forward of time)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the weights (and of AdamW's state): bfloat16 halves memory "
                        "but rounds away updates below its resolution (~0.4%% of a weight; "
                        "lr 1e-6 updates are lost): prefer float32 with --mixed-precision bf16")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="Accelerate's autocast (and loss scaling for fp16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-to", nargs="+", default=["none"], metavar="TRACKER",
                   choices=["none", *TRACKERS],
                   help="experiment trackers (Accelerate's, installed separately): each "
                        "metrics.jsonl line goes to them too, at its batch; local ones log "
                        "under --output/runs; 'all': every one installed (default: none)")
    p.add_argument("--run-name", default="hypo_fast", help="the trackers' project/run name")
    p.set_defaults(parser=p)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for key, losses in LOSS_OPTIONS.items():
        if getattr(args, key) is not None and args.loss not in losses:
            parser.error(f"--{key.replace('_', '-')} is an option of --loss {_takers(key)}, "
                         f"but --loss is {args.loss}")
    if args.loss in REFERENCE_FREE and args.ref_model is not None:
        parser.error(f"--loss {args.loss} takes no reference model, but --ref-model is given")
    for defaults in LOSS_DEFAULTS.values():
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    for name in ("online_samples", "max_new_tokens", "batch_size", "epochs", "grad_accum",
                 "max_length", "pad_to_multiple_of", "save_every", "max_steps",
                 "save_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    if args.warmup_ratio is not None:
        if not 0 <= args.warmup_ratio <= 1:
            parser.error("--warmup-ratio must be in [0, 1]")
        if args.warmup_steps:
            parser.error("give --warmup-steps or --warmup-ratio, not both")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error("--lr must be a positive number")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error("--weight-decay must be >= 0")
    for flag, beta in (("--adam-beta1", args.adam_beta1), ("--adam-beta2", args.adam_beta2)):
        if not 0 <= beta < 1:
            parser.error(f"{flag} must be in [0, 1)")
    if not (math.isfinite(args.adam_epsilon) and args.adam_epsilon > 0):
        parser.error("--adam-epsilon must be > 0")
    if not (math.isfinite(args.max_grad_norm) and args.max_grad_norm >= 0):
        parser.error("--max-grad-norm must be >= 0 (0: no clipping)")
    if args.loss == "hypo" and args.estimator == "rloo" and args.online_samples < 2:
        parser.error("--estimator rloo needs --online-samples >= 2 (a baseline from the others)")
    if args.loss in REFERENCE_FREE and args.precompute_ref_logps:
        parser.error(f"--loss {args.loss} takes no reference model: nothing to precompute")
    if args.ref_model_mixup_alpha is not None and args.ref_model_sync_steps is None:
        parser.error("--ref-model-mixup-alpha needs --ref-model-sync-steps")
    if args.ref_model_sync_steps is not None:
        if args.ref_model_sync_steps < 1:
            parser.error("--ref-model-sync-steps must be >= 1")
        if args.ref_model_mixup_alpha is not None and not 0 <= args.ref_model_mixup_alpha <= 1:
            parser.error("--ref-model-mixup-alpha must be in [0, 1]")
        for flag, given in (("--precompute-ref-logps", args.precompute_ref_logps),
                            ("--lora-r", args.lora_r)):
            if given:
                parser.error(f"--ref-model-sync-steps moves the reference model: not with "
                             f"{flag}")
    if args.save_total_limit is not None and args.save_every is None:
        parser.error("--save-total-limit needs --save-every")
    if args.eval_every is not None and (args.eval_data is None or args.eval_every < 1):
        parser.error("--eval-every needs --eval-data and must be >= 1")
    if args.lora_r < 0:
        parser.error("--lora-r must be >= 0 (0: full fine-tuning)")
    if args.lora_r == 0 and (args.lora_alpha is not None or args.merge_lora):
        parser.error(f"{'--lora-alpha' if args.lora_alpha is not None else '--merge-lora'} "
                     "needs --lora-r")
    if args.lora_r:
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("--lora-r needs peft: pip install 'hypo-fast[lora]'")
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    if args.resume_from is not None and not (args.resume_from / TRAINER_STATE).is_file():
        parser.error(f"--resume-from {args.resume_from}: not a checkpoint (no {TRAINER_STATE})")
    _check_trackers(parser, args.report_to)


def _check_trackers(parser: argparse.ArgumentParser, trackers: list[str]) -> None:
    """``--report-to``: "none" alone, and every tracker named installed (Accelerate would
    drop a missing one without a word)."""
    if "none" in trackers and len(trackers) > 1:
        parser.error("--report-to none takes no other tracker")
    if trackers == ["none"]:
        return
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [t for t in trackers if t != "all" and t not in available]
    if missing:
        parser.error(f"--report-to {missing[0]}: not installed (pip install {missing[0]})")
    if "all" in trackers and not available:
        parser.error("--report-to all: no tracker is installed")


def _tracker_config(args: argparse.Namespace) -> dict[str, int | float | str | bool]:
    """The command's arguments as the trackers' run configuration: numbers, strings and
    booleans (what TensorBoard's hyperparameters take), anything else as its text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in vars(args).items() if k != "parser"}


def _launched_processes() -> int:
    """The processes of the launch (``torchrun``, ``accelerate launch``): its ``WORLD_SIZE``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _tokenized(parser: argparse.ArgumentParser, args: argparse.Namespace, tokenizer: Any,
               rows: dict[str, list[dict[str, Any]]], report: bool
               ) -> dict[str, list[dict[str, Any]]]:
    """Each file's rows (by flag) tokenized; the dropped pairs counted on stderr (``report``),
    an error for a file left with none."""
    pairs = {}
    for flag, flag_rows in rows.items():
        if args.loss != "hpo":  # other losses take no auxiliary rewards
            flag_rows = [{k: v for k, v in r.items() if k not in AUX_REWARDS} for r in flag_rows]
        elif not all(AUX_REWARDS[0] in r for r in flag_rows) or len(
                {AUX_REWARDS[1] in r for r in flag_rows}) > 1:
            parser.error(f"{flag}: --loss hpo needs {AUX_REWARDS[0]} on every line (and "
                         f"{AUX_REWARDS[1]} on every line or on none)")
        try:
            pairs[flag], dropped = tokenize_pairs(tokenizer, flag_rows, args.max_length,
                                                  args.truncation_mode)
        except ValueError as e:
            parser.error(f"{flag}: {e}")
        if any(dropped.values()) and report:
            print(f"{flag}: dropped {sum(dropped.values())} of {len(flag_rows)} pairs: " +
                  ", ".join(f"{n} {why}" for why, n in dropped.items() if n), file=sys.stderr)
        if not pairs[flag]:
            parser.error(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: no pair left")
    return pairs


def _models(args: argparse.Namespace, accelerator: Any, loss_fn: torch.nn.Module,
            pairs: dict[str, list[dict[str, Any]]], collate: Any
            ) -> tuple[torch.nn.Module, torch.nn.Module | None, dict[str, list[dict[str, Any]]]]:
    """``(policy, reference or None, pairs)``: the reference loaded first; with
    ``--precompute-ref-logps`` it scores the pairs and is freed before the policy loads (unless
    HyPO's online samples need it); with ``--lora-r`` and no ``--ref-model``, none is kept (the
    policy's base is the reference)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.ref_model is not None:  # before any model loads
        vocab, ref_vocab = (AutoConfig.from_pretrained(m).get_text_config().vocab_size
                            for m in (args.model, args.ref_model))
        if vocab != ref_vocab:
            raise ValueError(f"--ref-model {args.ref_model} has a vocabulary of {ref_vocab}, "
                             f"--model {args.model} one of {vocab}")
    dtype = DTYPES[args.dtype]
    separate = args.loss not in REFERENCE_FREE and (not args.lora_r or args.ref_model is not None)
    reference = None
    if separate or args.precompute_ref_logps:
        reference = AutoModelForCausalLM.from_pretrained(args.ref_model or args.model,
                                                         dtype=dtype)
    if args.precompute_ref_logps:
        reference.to(accelerator.device)
        pairs = {flag: precompute_reference_logps(reference, loss_fn, examples,
                                                  collate=collate, batch_size=args.batch_size,
                                                  accelerator=accelerator)
                 for flag, examples in pairs.items()}
        if args.loss != "hypo" or not separate:
            reference = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        target = args.lora_target_modules
        policy = get_peft_model(policy, LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha or args.lora_r, lora_dropout=0.0,
            target_modules=target[0] if target == ["all-linear"] else target,
            task_type="CAUSAL_LM"))
    return policy, reference, pairs


# transformers' Trainer (TRL's trainers) decays no bias and no normalisation weight
NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def _optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trained parameters as TRL's trainers build it: ``--weight-decay`` on all
    but biases and normalisation weights (by name, and inside ``nn.LayerNorm``), the betas and
    epsilon of ``--adam-*``."""
    norms = {f"{name}.{p}" if name else p for name, m in model.named_modules()
             if isinstance(m, torch.nn.LayerNorm) for p, _ in m.named_parameters(recurse=False)}
    groups: dict[bool, list[torch.nn.Parameter]] = {True: [], False: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[name not in norms and not NO_DECAY.search(name.lower())].append(p)
    return torch.optim.AdamW(
        [{"params": groups[True], "weight_decay": args.weight_decay},
         {"params": groups[False], "weight_decay": 0.0}],
        lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def _steps_per_epoch(args: argparse.Namespace, batches: int, accelerator: Any) -> int:
    """Optimizer steps of an epoch of ``batches`` batches (all processes together)."""
    return math.ceil(math.ceil(batches / accelerator.num_processes) / args.grad_accum)


def _scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, batches: int,
               accelerator: Any) -> Any:
    """``--lr-scheduler`` over the run's optimizer steps (``batches`` per epoch, all processes
    together). Accelerate steps a prepared scheduler once per process at each optimizer step,
    hence the counts times the processes."""
    from transformers import get_scheduler

    steps = args.max_steps or _steps_per_epoch(args, batches, accelerator) * args.epochs
    warmup = args.warmup_steps if args.warmup_ratio is None else (
        math.ceil(args.warmup_ratio * steps))
    name = {"constant": "constant_with_warmup"}.get(args.lr_scheduler, args.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup * accelerator.num_processes,
                         num_training_steps=steps * accelerator.num_processes)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict[str, float]]:
    """Train as the arguments say; returns every step's numbers (also in metrics.jsonl)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from transformers import AutoTokenizer

    _check(parser, args)
    try:
        rows = {"--data": read_pairs(args.data)}
        if args.eval_data is not None:
            rows["--eval-data"] = read_pairs(args.eval_data)
        loss_fn = build_loss(args)
    except ValueError as e:
        parser.error(str(e))
    # the order of an epoch's batches a function of the seed and the epoch: a resumed epoch
    # skips the very batches it trained on
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                  data_seed=args.seed),
        # launched as several processes with no accelerator device: Accelerate's multi-CPU
        # (gloo), which it picks only when told the run is on the CPU
        cpu=_launched_processes() > 1 and not torch.accelerator.is_available(),
        **({} if args.report_to == ["none"] else {
            "log_with": args.report_to, "project_dir": args.output / "runs"}))
    if accelerator.num_processes != _launched_processes():
        parser.error(f"launched as {_launched_processes()} processes but Accelerate runs "
                     f"{accelerator.num_processes}")
    if args.merge_lora and _shards_parameters(accelerator):
        parser.error("--merge-lora merges the whole weights of one process: not under FSDP or "
                     "DeepSpeed ZeRO-3")
    set_seed(args.seed, device_specific=True)  # each process samples its own completions
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    pairs = _tokenized(parser, args, tokenizer, rows, accelerator.is_main_process)

    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_pairs(examples, pad_token_id=pad, max_length=args.max_length,
                             truncation=args.truncation_mode, packed=args.packed,
                             pad_to_multiple_of=args.pad_to_multiple_of)

    try:
        policy, reference, pairs = _models(args, accelerator, loss_fn, pairs, collate)
    except ValueError as e:
        parser.error(str(e))
    loader, eval_loader = (
        torch.utils.data.DataLoader(pairs[flag], batch_size=args.batch_size,
                                    shuffle=flag == "--data", collate_fn=collate)
        if flag in pairs else None for flag in ("--data", "--eval-data"))
    model = PreferenceModel(policy, loss_fn, reference)
    optimizer = _optimizer(args, model)
    online = None
    if args.loss == "hypo":
        online = OnlineSampling(num_samples=args.online_samples,
                                max_new_tokens=args.max_new_tokens,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    sync = {} if args.ref_model_sync_steps is None else {
        "ref_model_sync_steps": args.ref_model_sync_steps,
        "ref_model_mixup_alpha": 0.6 if args.ref_model_mixup_alpha is None else (
            args.ref_model_mixup_alpha)}
    try:
        trainer = PreferenceTrainer(
            model, optimizer, accelerator=accelerator,
            lr_scheduler=_scheduler(args, optimizer, len(loader), accelerator),
            max_grad_norm=args.max_grad_norm or None, online=online, **sync)
    except ValueError as e:
        parser.error(str(e))
    args.output.mkdir(parents=True, exist_ok=True)
    if accelerator.log_with:
        accelerator.init_trackers(args.run_name, config=_tracker_config(args))
    metrics = args.output / "metrics.jsonl"
    kept: list[str] = []
    if args.resume_from is not None:
        trainer.load_checkpoint(args.resume_from)
        if metrics.is_file():  # the lines up to the checkpoint
            kept = [line for line in metrics.read_text().splitlines()
                    if json.loads(line)["batch"] <= trainer.batches]
    with metrics.open("w") if accelerator.is_main_process else (
            contextlib.nullcontext()) as log:
        def prune() -> None:  # every checkpoint but the newest --save-total-limit
            if args.save_total_limit and accelerator.is_main_process:
                saved = sorted((p for p in args.output.glob("checkpoint-*")
                                if p.name.removeprefix("checkpoint-").isdigit()),
                               key=lambda p: int(p.name.removeprefix("checkpoint-")))
                for old in saved[:-args.save_total_limit]:
                    shutil.rmtree(old)

        def write(batch: int, epoch: int, numbers: dict[str, float], prefix: str = "") -> None:
            prune()  # fit saves after this: the newest checkpoint is complete
            named = {prefix + k: v for k, v in numbers.items()}
            accelerator.log({**named, "optimizer_step": trainer.optimizer_steps,
                             "epoch": epoch}, step=batch)
            if log is not None:
                line = json.dumps({"batch": batch, "step": trainer.optimizer_steps,
                                   "epoch": epoch, **named})
                log.write(line + "\n")
                print(line, flush=True)

        if log is not None:
            log.writelines(line + "\n" for line in kept)
        evaluation = {} if eval_loader is None else {
            "eval_loader": eval_loader, "eval_every": args.eval_every,
            "on_eval": lambda *a: write(*a, prefix="eval_")}
        epochs = args.epochs if args.max_steps is None else math.ceil(
            args.max_steps / _steps_per_epoch(args, len(loader), accelerator))
        history = trainer.fit(loader, epochs=epochs, on_step=write, max_steps=args.max_steps,
                              save_every=args.save_every,
                              on_save=lambda step: args.output / f"checkpoint-{step}",
                              **evaluation)
        prune()
    accelerator.wait_for_everyone()
    policy = accelerator.unwrap_model(trainer.model).policy
    if args.merge_lora:  # W + (alpha/r)·BA, as a plain model of the base's class
        policy.merge_and_unload().save_pretrained(
            args.output, is_main_process=accelerator.is_main_process,
            save_function=accelerator.save)
    else:
        state = accelerator.get_state_dict(trainer.model)
        policy.save_pretrained(
            args.output, is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict={k.removeprefix("policy."): v for k, v in state.items()
                        if k.startswith("policy.")})
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output)
    accelerator.end_training()
    return history
