"""Preference pairs from JSON lines to token ids, as TRL reads and tokenizes them.

A line is one pair in TRL's standard format (``prompt``, ``chosen``, ``rejected``: strings), its
conversational one (lists of ``{"role", "content"}`` messages, rendered by the tokenizer's chat
template) or either with an implicit prompt (no ``prompt``: :func:`extract_prompt`); HPO's
auxiliary rewards ride along as ``chosen_aux_reward``/``rejected_aux_reward``. The token ids
are what :func:`hypo_fast.trainer.collate_pairs` takes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .trainer import AUX_REWARDS

FIELDS = ("prompt", "chosen", "rejected")
CHAT_EXTRAS = ("tools", "chat_template_kwargs")  # per-row options of the chat template


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value)


def extract_prompt(chosen: str | list, rejected: str | list) -> dict[str, str | list]:
    """TRL's ``extract_prompt``, for pairs with an implicit prompt: the longest common prefix
    of ``chosen`` and ``rejected`` (characters, or messages) is the prompt, less a space it ends
    with (which stays with the completions); the rest of each is its completion."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and n and chosen[n - 1] == " ":
        n -= 1
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """The preference pairs of a JSON-lines file (blank lines skipped), in TRL's standard
    format (``prompt``, ``chosen``, ``rejected``: strings) or its conversational one (each a
    list of messages ``{"role": ..., "content": ...}``, with optional ``tools`` and
    ``chat_template_kwargs``); without ``prompt``, the prompt is implicit
    (:func:`extract_prompt`). HPO's auxiliary rewards come as the numbers
    ``chosen_aux_reward`` (and ``rejected_aux_reward``). A bad line raises ``ValueError``
    naming the file and the line."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            if isinstance(row, dict) and "prompt" not in row and all(
                    isinstance(row.get(k), str | list) for k in ("chosen", "rejected")):
                row.update(extract_prompt(row["chosen"], row["rejected"]))
            values = [row.get(k) for k in FIELDS] if isinstance(row, dict) else [None]
            if not (all(isinstance(v, str) for v in values)
                    or all(_is_messages(v) for v in values)):
                raise ValueError(f"{path}:{number}: expected an object whose {', '.join(FIELDS)} "
                                 'are all strings or all lists of {"role", "content"} messages '
                                 "(or no prompt, shared by chosen and rejected: some message)")
            if not isinstance(row.get("chat_template_kwargs", {}), dict):
                raise ValueError(f"{path}:{number}: chat_template_kwargs must be an object")
            for key in AUX_REWARDS:
                value = row.get(key, 0.0)
                if isinstance(value, bool) or not isinstance(value, int | float) or (
                        not math.isfinite(value)):
                    raise ValueError(f"{path}:{number}: {key} must be a finite number")
            rows.append({k: row[k] for k in (*FIELDS, *CHAT_EXTRAS, *AUX_REWARDS) if k in row})
    if not rows:
        raise ValueError(f"{path}: no preference pairs")
    return rows


def tokenize_pair(tokenizer: Any, row: dict[str, Any]) -> dict[str, list[int]] | None:
    """TRL's tokenization of one pair. Standard (strings): the EOS text appended to each
    completion that does not end with it; the prompt, and the prompt + each completion,
    tokenized whole with the tokenizer's own special tokens. Conversational (messages): the
    tokenizer's chat template on the prompt with the generation prompt, and on the prompt's and
    each completion's messages (with the row's ``tools`` and ``chat_template_kwargs``). Each
    completion's ids are those after the prompt's length. ``None`` when the prompt's ids are not
    a prefix of both (a tokenizer or template that merges across the boundary, or adds tokens
    to the prompt alone): such a pair is dropped."""
    if isinstance(row["prompt"], list):
        tools = row.get("tools")
        options = {"tools": json.loads(tools) if isinstance(tools, str) else tools,
                   **row.get("chat_template_kwargs", {})}

        def ids(messages: list[dict[str, Any]], **more: Any) -> list[int]:
            return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                      **options, **more)["input_ids"])

        prompt = ids(row["prompt"], add_generation_prompt=True)
        wholes = [ids(row["prompt"] + row[k]) for k in ("chosen", "rejected")]
    else:
        eos = tokenizer.eos_token
        prompt = tokenizer(row["prompt"])["input_ids"]
        wholes = [tokenizer(row["prompt"] + (row[k] if eos is None or row[k].endswith(eos)
                                             else row[k] + eos))["input_ids"]
                  for k in ("chosen", "rejected")]
    if any(whole[: len(prompt)] != prompt for whole in wholes):
        return None
    return {"prompt_ids": prompt, "chosen_ids": wholes[0][len(prompt):],
            "rejected_ids": wholes[1][len(prompt):]}


def tokenize_pairs(tokenizer: Any, rows: list[dict[str, Any]], max_length: int,
                   truncation: str = "keep_start"
                   ) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """:func:`tokenize_pair` over ``rows``, without the pairs it drops and, when sequences keep
    their start (``truncation``), those whose prompt alone fills ``max_length`` (no completion
    token would be left, as TRL drops them), with the rows' auxiliary rewards; returns the
    pairs and how many were dropped, by reason."""
    if getattr(tokenizer, "chat_template", None) is None and any(
            isinstance(row["prompt"], list) for row in rows):
        raise ValueError("the pairs are conversational (lists of messages) but the tokenizer "
                         "has no chat template")
    pairs, dropped = [], {"prompt not a token prefix": 0, "prompt fills --max-length": 0}
    for row in rows:
        pair = tokenize_pair(tokenizer, row)
        if pair is None:
            dropped["prompt not a token prefix"] += 1
        elif truncation == "keep_start" and len(pair["prompt_ids"]) >= max_length:
            dropped["prompt fills --max-length"] += 1
        else:
            pairs.append({**pair, **{k: row[k] for k in AUX_REWARDS if k in row}})
    return pairs, dropped
