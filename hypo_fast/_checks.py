"""Argument validation shared by the reference, the ops and the objectives.

Every check raises before any kernel runs and names the offending argument: ``TypeError`` for a
wrong kind of value (dtype, type), ``ValueError`` for a wrong value (shape, range, device, NaN).
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t: object, *, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def check_float(name: str, t: object, *, ndim: int | None = None) -> torch.Tensor:
    t = check_tensor(name, t, ndim=ndim)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def check_index(name: str, t: object, *, ndim: int | None = None) -> torch.Tensor:
    t = check_tensor(name, t, ndim=ndim)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got dtype {t.dtype}")
    return t


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], what: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{extra}, got {tuple(t.shape)}")


def check_same_device(pairs: dict[str, torch.Tensor | None]) -> None:
    named = [(k, v) for k, v in pairs.items() if v is not None]
    if not named:
        return
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_in_range(
    name: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if not math.isfinite(value) or below or above:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value}")
    return float(value)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def raise_flagged(flags: list[tuple[str, torch.Tensor]]) -> None:
    """Raise ``ValueError(message)`` for the first 0-d bool tensor that is True.

    The flags are computed on the inputs' device and read back with one host synchronisation.
    """
    if not flags:
        return
    bad = torch.stack([f for _, f in flags]).cpu()
    for (message, _), is_bad in zip(flags, bad.tolist(), strict=False):
        if is_bad:
            raise ValueError(message)


def _not_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool: t holds a NaN or ±inf. One read of t through a reduction, whatever its strides,
    no t-sized temporary (min/max propagate NaN and keep ±inf)."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    t = t.detach()
    # aminmax copies a strided tensor to reduce it (a causal LM's shifted hidden states)
    lo, hi = torch.aminmax(t) if t.is_contiguous() else (torch.amin(t), torch.amax(t))
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def validate_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    token_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    prefix: str = "",
    vocab: int | None = None,
    device: torch.device | None = None,
    pending: list[tuple[str, torch.Tensor]] | None = None,
) -> int | None:
    """Validate one linear head and its per-token inputs; return ``num_seqs`` (resolved from
    ``seq_ids`` when not given, None without ``seq_ids``). The value checks run on the inputs'
    device and are read back with one synchronisation (:func:`raise_flagged`), or, given a
    ``pending`` list, appended to it for the caller to read with other heads' in one.

    Shapes: ``hidden [..., d]``, ``weight [V, d]``, ``bias [V]``; labels, seq_ids,
    token_weights and mask shaped ``hidden.shape[:-1]``. Values: labels in ``[0, V)`` or equal
    to ``ignore_index``, at least one label not ignored, seq_ids in ``[0, num_seqs)``, no NaN/inf
    in any float input. ``prefix`` names the reference head's tensors ("ref_") in messages.
    """
    h, w, b = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    check_float(h, hidden)
    if hidden.dim() < 2:
        raise ValueError(f"{h} must be [..., d] with at least 2 dims, got {tuple(hidden.shape)}")
    check_float(w, weight, ndim=2)
    check_index("labels", labels)
    V, d = weight.shape
    if V == 0 or d == 0:
        raise ValueError(f"{w} must be [V, d] with V >= 1 and d >= 1, got {tuple(weight.shape)}")
    if hidden.shape[-1] != d:
        raise ValueError(f"{h} has hidden size {hidden.shape[-1]} but {w} is [V, d] = [{V}, {d}]")
    if vocab is not None and vocab != V:
        raise ValueError(f"{w} has vocabulary {V} but weight has {vocab}; the heads must match")
    tokens = tuple(hidden.shape[:-1])
    check_shape("labels", labels, tokens, f"{h}.shape[:-1]")
    if labels.numel() == 0:
        raise ValueError("labels is empty: nothing to compute")
    if bias is not None:
        check_float(b, bias)
        check_shape(b, bias, (V,), f"[V] with V = {w}.shape[0]")
    if token_weights is not None:
        if seq_ids is None:
            raise ValueError("token_weights weight the per-sequence sums: pass seq_ids with them")
        check_float("token_weights", token_weights)
        check_shape("token_weights", token_weights, tokens, f"{h}.shape[:-1]")
    if mask is not None:
        check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        check_shape("mask", mask, tokens, f"{h}.shape[:-1]")
    if seq_ids is not None:
        check_index("seq_ids", seq_ids)
        check_shape("seq_ids", seq_ids, tokens, f"{h}.shape[:-1]")
    check_positive("temperature", temperature)
    if softcap is not None:
        check_positive("softcap", softcap)
    check_same_device({h: hidden, w: weight, b: bias, "labels": labels, "seq_ids": seq_ids,
                       "token_weights": token_weights, "mask": mask})
    if device is not None and hidden.device != device:
        raise ValueError(f"{h} is on {hidden.device} but hidden is on {device}")

    valid = labels != ignore_index
    flags = [
        (f"labels must be in [0, {V}) or equal ignore_index={ignore_index}",
         (valid & ((labels < 0) | (labels >= V))).any()),
        (f"every label equals ignore_index={ignore_index}"
         + (" or is masked out by mask" if mask is not None else "") + ": nothing to compute",
         ~(valid if mask is None else valid & mask).any()),
        (f"{h} contains NaN or inf", _not_finite(hidden)),
        (f"{w} contains NaN or inf", _not_finite(weight)),
    ]
    if bias is not None:
        flags.append((f"{b} contains NaN or inf", _not_finite(bias)))
    if token_weights is not None:
        flags.append(("token_weights contains NaN or inf", _not_finite(token_weights)))
    if seq_ids is not None:
        if num_seqs is None:
            num_seqs = int(seq_ids.max()) + 1
        if not isinstance(num_seqs, int) or num_seqs < 1:
            raise ValueError(f"num_seqs must be a positive int, got {num_seqs!r}")
        flags.append((f"seq_ids must be in [0, num_seqs={num_seqs})",
                      ((seq_ids < 0) | (seq_ids >= num_seqs)).any()))
    if pending is None:
        raise_flagged(flags)
    else:
        pending.extend(flags)
    return num_seqs
