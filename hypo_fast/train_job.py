"""The ``hypo-fast train`` job: preference pairs in a JSON-lines file + a Hugging Face causal LM
directory -> the trained policy, through :class:`hypo_fast.trainer.PreferenceTrainer`.

Each line of ``--data`` is TRL's standard preference format, ``{"prompt": str, "chosen": str,
"rejected": str}``, tokenized as TRL does: no special tokens, the BOS (if the tokenizer has one)
before the prompt, the EOS after each completion. The model and its tokenizer load from
``--model`` (the reference from ``--ref-model``, default the same); the policy, its tokenizer
and ``metrics.jsonl`` (one line per step) are written to ``--output``. On several GPUs:
``accelerate launch [--num_processes N ...] -m hypo_fast.cli train ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


def tokenize_pair(tokenizer: Any, row: dict[str, str]) -> dict[str, list[int]]:
    """TRL's tokenization of one pair: BOS + prompt, completion + EOS, no other special token."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids(row["prompt"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and prompt[:1] != [bos]:
        prompt = [bos, *prompt]
    tail = [] if eos is None else [eos]
    return {"prompt_ids": prompt, "chosen_ids": ids(row["chosen"]) + tail,
            "rejected_ids": ids(row["rejected"]) + tail}


def build_loss(args: argparse.Namespace) -> torch.nn.Module:
    """The loss module ``--loss`` names, with the command's hyperparameters."""
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
    p.add_argument("--kl-coef", type=float, default=0.1, help="HyPO's λ")
    p.add_argument("--estimator", choices=KL_ESTIMATORS, default="rloo", help="HyPO's KL")
    p.add_argument("--online-samples", type=int, default=2, help="HyPO: samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="HyPO: sample length")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per process and step")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-length", type=int, default=1024,
                   help="tokens kept of each prompt + completion")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype the models are loaded in")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--seed", type=int, default=0)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("online_samples", "max_new_tokens", "batch_size", "epochs", "grad_accum",
                 "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("lr", "max_grad_norm"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            parser.error(f"--{name.replace('_', '-')} must be a positive number")
    if args.loss == "hypo" and args.estimator == "rloo" and args.online_samples < 2:
        parser.error("--estimator rloo needs --online-samples >= 2 (a baseline from the others)")
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict[str, float]]:
    """Train as the arguments say; returns every step's numbers (also in metrics.jsonl)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check(parser, args)
    try:
        rows = read_pairs(args.data)
        loss_fn = build_loss(args)
    except ValueError as e:
        parser.error(str(e))
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.grad_accum)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    dtype = DTYPES[args.dtype]
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    reference = None
    if args.loss not in REFERENCE_FREE:
        reference = AutoModelForCausalLM.from_pretrained(args.ref_model or args.model,
                                                         dtype=dtype)
    model = PreferenceModel(policy, loss_fn, reference)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lr)
    online = None
    if args.loss == "hypo":
        online = OnlineSampling(num_samples=args.online_samples,
                                max_new_tokens=args.max_new_tokens,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    trainer = PreferenceTrainer(model, optimizer, accelerator=accelerator,
                                max_grad_norm=args.max_grad_norm, online=online)
    loader = torch.utils.data.DataLoader(
        [tokenize_pair(tokenizer, r) for r in rows], batch_size=args.batch_size, shuffle=True,
        collate_fn=lambda ex: collate_pairs(ex, pad_token_id=pad, max_length=args.max_length))
    args.output.mkdir(parents=True, exist_ok=True)
    with (args.output / "metrics.jsonl").open("w") if accelerator.is_main_process else (
            contextlib.nullcontext()) as log:
        def on_step(step: int, epoch: int, numbers: dict[str, float]) -> None:
            if log is not None:
                line = json.dumps({"step": step, "epoch": epoch, **numbers})
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
