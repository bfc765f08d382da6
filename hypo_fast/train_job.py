"""The ``hypo-fast train`` job: preference pairs in a JSON-lines file + a Hugging Face causal LM
directory -> the trained policy, through :class:`hypo_fast.trainer.PreferenceTrainer`.

Each line of ``--data`` is TRL's standard preference format, ``{"prompt": str, "chosen": str,
"rejected": str}``, tokenized as TRL does (:func:`tokenize_pair`). The model and its tokenizer
load from ``--model`` (the reference from ``--ref-model``, default the same); the policy, its
tokenizer and ``metrics.jsonl`` (one line per batch) are written to ``--output``. On several GPUs:
``accelerate launch [--num_processes N ...] -m hypo_fast.cli train ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from .losses import (
    DPO_LOSS_TYPES,
    KL_ESTIMATORS,
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
    HyPOLoss,
)
from .trainer import OnlineSampling, PreferenceModel, PreferenceTrainer, collate_pairs

LOSSES = ("dpo", "simpo", "cpo", "orpo", "hypo")
REFERENCE_FREE = ("simpo", "cpo", "orpo")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# HyPO's options, None on the command line unless given: given with another loss they are an error
HYPO_DEFAULTS = {"kl_coef": 0.1, "estimator": "rloo", "online_samples": 2, "max_new_tokens": 64}
FIELDS = ("prompt", "chosen", "rejected")
DESCRIPTION = ("Preference-train a Hugging Face causal LM on the pairs of a JSON-lines file "
               '({"prompt", "chosen", "rejected"} per line) with a fused loss; the policy, its '
               "tokenizer and metrics.jsonl go to --output. Several GPUs: accelerate launch "
               "-m hypo_fast.cli train ...")


def read_pairs(path: Path) -> list[dict[str, str]]:
    """The ``{"prompt", "chosen", "rejected"}`` rows of a JSON-lines file (blank lines skipped);
    a bad line raises ``ValueError`` naming the file and the line."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str)
                                                    for k in FIELDS):
                raise ValueError(f"{path}:{number}: expected an object with the strings "
                                 f"{', '.join(FIELDS)}")
            rows.append({k: row[k] for k in FIELDS})
    if not rows:
        raise ValueError(f"{path}: no preference pairs")
    return rows


def tokenize_pair(tokenizer: Any, row: dict[str, str]) -> dict[str, list[int]] | None:
    """TRL's tokenization of one pair: the EOS text appended to each completion that does not
    end with it; the prompt, and the prompt + each completion, tokenized whole with the
    tokenizer's own special tokens; each completion's ids are those after the prompt's length.
    ``None`` when the prompt's ids are not a prefix of both (a tokenizer that merges across the
    boundary or adds special tokens at the end): such a pair is dropped."""
    eos = tokenizer.eos_token

    def ids(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    prompt = ids(row["prompt"])
    out = {"prompt_ids": prompt}
    for key in ("chosen", "rejected"):
        completion = row[key] if eos is None or row[key].endswith(eos) else row[key] + eos
        whole = ids(row["prompt"] + completion)
        if whole[: len(prompt)] != prompt:
            return None
        out[f"{key}_ids"] = whole[len(prompt):]
    return out


def tokenize_pairs(tokenizer: Any, rows: list[dict[str, str]], max_length: int
                   ) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """:func:`tokenize_pair` over ``rows``, without the pairs it drops and those whose prompt
    alone fills ``max_length`` (no completion token would be left, as TRL drops them); returns
    the pairs and how many were dropped, by reason."""
    pairs, dropped = [], {"prompt not a token prefix": 0, "prompt fills --max-length": 0}
    for row in rows:
        pair = tokenize_pair(tokenizer, row)
        if pair is None:
            dropped["prompt not a token prefix"] += 1
        elif len(pair["prompt_ids"]) >= max_length:
            dropped["prompt fills --max-length"] += 1
        else:
            pairs.append(pair)
    return pairs, dropped


def build_loss(args: argparse.Namespace) -> torch.nn.Module:
    """The loss module ``--loss`` names, with the command's hyperparameters (HyPO's defaults
    filled in by the argument check)."""
    common: dict[str, Any] = {"beta": args.beta} if args.beta is not None else {}
    if args.loss in ("dpo", "hypo"):
        common["loss_type"] = args.loss_type
    if args.loss == "dpo":
        return FusedLinearDPOLoss(**common)
    if args.loss == "hypo":
        return HyPOLoss(**common, kl_coef=args.kl_coef, estimator=args.estimator)
    return {"simpo": FusedLinearSimPOLoss, "cpo": FusedLinearCPOLoss,
            "orpo": FusedLinearORPOLoss}[args.loss](**common)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's arguments."""
    p.add_argument("--model", required=True, help="Hugging Face model directory (or hub id)")
    p.add_argument("--data", required=True, type=Path,
                   help='JSON lines of {"prompt": ..., "chosen": ..., "rejected": ...}')
    p.add_argument("--output", required=True, type=Path, help="where the policy is saved")
    p.add_argument("--ref-model", default=None, help="reference model (default: --model)")
    p.add_argument("--loss", choices=LOSSES, default="dpo")
    p.add_argument("--loss-type", choices=DPO_LOSS_TYPES, default="sigmoid",
                   help="DPO-family loss type (dpo, hypo)")
    p.add_argument("--beta", type=float, default=None, help="default: the loss's own")
    p.add_argument("--kl-coef", type=float, default=None, help="HyPO's λ (default 0.1)")
    p.add_argument("--estimator", choices=KL_ESTIMATORS, default=None,
                   help="HyPO's KL estimator (default rloo)")
    p.add_argument("--online-samples", type=int, default=None,
                   help="HyPO: samples per prompt (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="HyPO: sample length (default 64)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--lr-scheduler", choices=("linear", "constant"), default="linear",
                   help="after --warmup-steps: linear decay to 0 over the run (TRL's default) "
                        "or constant")
    p.add_argument("--warmup-steps", type=int, default=0, help="optimizer steps of warmup")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per process and batch")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1,
                   help="batches per optimizer step (gradient accumulation)")
    p.add_argument("--max-length", type=int, default=1024,
                   help="tokens kept of each prompt + completion (pairs whose prompt fills it "
                        "are dropped)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--packed", action="store_true",
                   help="pack each batch's sequences into one row (no padding; attention kept "
                        "within each sequence by transformers, from the positions)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the weights (and of AdamW's state): bfloat16 halves memory "
                        "but rounds away updates below its resolution (~0.4%% of a weight; "
                        "lr 1e-6 updates are lost): prefer float32 with --mixed-precision bf16")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="Accelerate's autocast (and loss scaling for fp16)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(parser=p)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    hypo_given = [k for k in HYPO_DEFAULTS if getattr(args, k) is not None]
    if args.loss != "hypo" and hypo_given:
        parser.error(f"--{hypo_given[0].replace('_', '-')} is a HyPO option, but --loss is "
                     f"{args.loss}")
    if args.loss in REFERENCE_FREE and args.ref_model is not None:
        parser.error(f"--loss {args.loss} takes no reference model, but --ref-model is given")
    for key, value in HYPO_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("online_samples", "max_new_tokens", "batch_size", "epochs", "grad_accum",
                 "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error("--lr must be a positive number")
    if not (math.isfinite(args.max_grad_norm) and args.max_grad_norm >= 0):
        parser.error("--max-grad-norm must be >= 0 (0: no clipping)")
    if args.loss == "hypo" and args.estimator == "rloo" and args.online_samples < 2:
        parser.error("--estimator rloo needs --online-samples >= 2 (a baseline from the others)")
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict[str, float]]:
    """Train as the arguments say; returns every step's numbers (also in metrics.jsonl)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    _check(parser, args)
    try:
        rows = read_pairs(args.data)
        loss_fn = build_loss(args)
    except ValueError as e:
        parser.error(str(e))
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.grad_accum)
    set_seed(args.seed, device_specific=True)  # each process samples its own completions
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    pairs, dropped = tokenize_pairs(tokenizer, rows, args.max_length)
    if any(dropped.values()) and accelerator.is_main_process:
        print(f"dropped {sum(dropped.values())} of {len(rows)} pairs: " + ", ".join(
            f"{n} {why}" for why, n in dropped.items() if n), file=sys.stderr)
    if not pairs:
        parser.error(f"--data {args.data}: no pair left to train on")
    loader = torch.utils.data.DataLoader(
        pairs, batch_size=args.batch_size, shuffle=True,
        collate_fn=lambda ex: collate_pairs(ex, pad_token_id=pad, max_length=args.max_length,
                                            packed=args.packed))

    dtype = DTYPES[args.dtype]
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    reference = None
    if args.loss not in REFERENCE_FREE:
        reference = AutoModelForCausalLM.from_pretrained(args.ref_model or args.model,
                                                         dtype=dtype)
    model = PreferenceModel(policy, loss_fn, reference)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lr)
    # Accelerate steps a prepared scheduler once per process at each optimizer step.
    batches = math.ceil(len(loader) / accelerator.num_processes)
    steps = math.ceil(batches / args.grad_accum) * args.epochs
    name = {"constant": "constant_with_warmup"}.get(args.lr_scheduler, args.lr_scheduler)
    scheduler = get_scheduler(name, optimizer,
                              num_warmup_steps=args.warmup_steps * accelerator.num_processes,
                              num_training_steps=steps * accelerator.num_processes)
    online = None
    if args.loss == "hypo":
        online = OnlineSampling(num_samples=args.online_samples,
                                max_new_tokens=args.max_new_tokens,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    trainer = PreferenceTrainer(model, optimizer, accelerator=accelerator,
                                lr_scheduler=scheduler, max_grad_norm=args.max_grad_norm or None,
                                online=online)
    args.output.mkdir(parents=True, exist_ok=True)
    with (args.output / "metrics.jsonl").open("w") if accelerator.is_main_process else (
            contextlib.nullcontext()) as log:
        def on_step(batch: int, epoch: int, numbers: dict[str, float]) -> None:
            if log is not None:
                line = json.dumps({"batch": batch, "step": trainer.optimizer_steps,
                                   "epoch": epoch, **numbers})
                log.write(line + "\n")
                print(line, flush=True)

        history = trainer.fit(loader, epochs=args.epochs, on_step=on_step)
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(trainer.model)
    accelerator.unwrap_model(trainer.model).policy.save_pretrained(
        args.output, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
        state_dict={k.removeprefix("policy."): v for k, v in state.items()
                    if k.startswith("policy.")})
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output)
    return history
