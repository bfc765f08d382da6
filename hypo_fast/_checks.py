"""Argument validation shared by the reference, the ops and the objectives.

Every check raises before any kernel runs and names the offending argument: ``TypeError`` for a
wrong kind of value (dtype, type), ``ValueError`` for a wrong value (shape, range, device, NaN).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TypeVar

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
F = TypeVar("F", bound=Callable)
T = TypeVar("T")


_CALLER_NAMES: ContextVar[dict[str, str] | None] = ContextVar("hypo_fast_caller_names",
                                                              default=None)


@contextlib.contextmanager
def _setting(var: ContextVar[T], value: T) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def caller_names(**names: str) -> contextlib.AbstractContextManager[None]:
    """Within the context, :func:`validate_head`'s messages name an op's arguments (``hidden``,
    ``weight``, ``bias``, ``labels``, ``ref_hidden``, ...) as the caller's: a loss passes its
    ``ref_input`` as an op's ``hidden``, and an error should say ``ref_input``. Nothing under
    ``torch.compile``, which checks nothing."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _setting(_CALLER_NAMES, {**(_CALLER_NAMES.get() or {}), **names})


_VALUES_CHECKED: ContextVar[bool] = ContextVar("hypo_fast_values_checked", default=False)


def values_checked() -> contextlib.AbstractContextManager[None]:
    """Within the context :func:`check_finite` checks nothing: the caller checked the values
    already. A loss checks its inputs before any kernel, so that the objectives it calls do not
    wait for the queued kernels (a host synchronisation) to look at their outputs."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _setting(_VALUES_CHECKED, True)


def _called(name: str) -> str:
    return (_CALLER_NAMES.get() or {}).get(name, name)


def segments_not_contiguous(ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """0-d bool: some sequence of the per-token ids ``[N]`` (values in [0, num_seqs)) has its
    tokens in more than one run."""
    runs = (ids[1:] != ids[:-1]).sum() + 1
    distinct = torch.zeros(num_seqs, dtype=torch.bool, device=ids.device)
    distinct = distinct.index_fill(0, ids.long().clamp(0, num_seqs - 1), True).sum()
    return runs != distinct


def check_tensor(name: str, t: object, *, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if _is_dtensor(t):
        raise TypeError(
            f"{name} is a DTensor (sharded by FSDP2 or tensor parallelism): the fused ops need "
            "the whole tensor. Under FSDP, call them inside the forward of the module FSDP "
            "wraps it in, where it is gathered (a PreferenceModel: wrap the decoder layers and "
            "the whole model, not the output embedding on its own)")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


@functools.cache
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_dtensor(t: torch.Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


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


_PENDING: ContextVar[list[tuple[str, torch.Tensor]] | None] = ContextVar(
    "hypo_fast_pending_checks", default=None)


def one_sync(fn: F) -> F:
    """Decorate a public function so that the :func:`check_finite` calls made while it runs
    (its callees' included) are read back together, with one host synchronisation, when it
    returns: its value is then discarded if an input held a NaN or inf."""

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if torch.compiler.is_compiling() or _PENDING.get() is not None:
            return fn(*args, **kwargs)
        flags: list[tuple[str, torch.Tensor]] = []
        token = _PENDING.set(flags)
        try:
            out = fn(*args, **kwargs)
        finally:
            _PENDING.reset(token)
        raise_flagged(flags)
        return out

    return checked  # type: ignore[return-value]


def check_finite(named: dict[str, torch.Tensor | None]) -> None:
    """``ValueError`` naming the first float tensor that holds a NaN or ±inf, with one host
    synchronisation, or at the end of the :func:`one_sync` function it runs in (none under
    ``torch.compile``, where nothing is checked in a graph, nor within
    :func:`values_checked`)."""
    if torch.compiler.is_compiling() or _VALUES_CHECKED.get():
        return
    flags = [(f"{name} contains NaN or inf", not_finite(t)) for name, t in named.items()
             if t is not None and t.is_floating_point()]
    pending = _PENDING.get()
    if pending is None:
        raise_flagged(flags)
    else:
        pending.extend(flags)


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

    The flags are computed on the inputs' device and read back with one host synchronisation
    (none under ``torch.compile``, where nothing is checked in a graph).
    """
    if not flags or torch.compiler.is_compiling():
        return
    bad = torch.stack([f for _, f in flags]).cpu()
    for (message, _), is_bad in zip(flags, bad.tolist(), strict=False):
        if is_bad:
            raise ValueError(message)


def labels_flag(name: str, labels: torch.Tensor, vocab: int, ignore_index: int
                ) -> tuple[str, torch.Tensor]:
    """``(message, 0-d bool)`` for :func:`raise_flagged`: a label outside ``[0, vocab)`` that is
    not ``ignore_index``."""
    return (f"{name} must be in [0, {vocab}) or equal ignore_index={ignore_index}",
            ((labels != ignore_index) & ((labels < 0) | (labels >= vocab))).any())


def not_finite(t: torch.Tensor) -> torch.Tensor:
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
    labels: torch.Tensor | None,
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
    token_weights and mask shaped ``hidden.shape[:-1]``, at least one token. Values: labels in
    ``[0, V)`` or equal to ``ignore_index``, seq_ids in ``[0, num_seqs)``, no NaN/inf in any
    float input. No row need count (every label ignored, or every row masked: the ops return
    zeros). Under ``torch.compile`` nothing is checked (``num_seqs`` must then be
    given with ``seq_ids``). ``prefix`` names the reference head's tensors ("ref_") in messages,
    and :func:`caller_names` the caller's names for them.
    """
    if torch.compiler.is_compiling():  # no host synchronisation in a graph: nothing checked
        if seq_ids is not None and num_seqs is None:
            raise ValueError("num_seqs must be given with seq_ids under torch.compile")
        return num_seqs
    h, w, b = (_called(prefix + name) for name in ("hidden", "weight", "bias"))
    lb, si, tw, mk = (_called(name) for name in ("labels", "seq_ids", "token_weights", "mask"))
    check_float(h, hidden)
    if hidden.dim() < 2:
        raise ValueError(f"{h} must be [..., d] with at least 2 dims, got {tuple(hidden.shape)}")
    check_float(w, weight, ndim=2)
    if labels is not None:
        check_index(lb, labels)
    V, d = weight.shape
    if V == 0 or d == 0:
        raise ValueError(f"{w} must be [V, d] with V >= 1 and d >= 1, got {tuple(weight.shape)}")
    if hidden.shape[-1] != d:
        raise ValueError(f"{h} has hidden size {hidden.shape[-1]} but {w} is [V, d] = [{V}, {d}]")
    if vocab is not None and vocab != V:
        raise ValueError(f"{w} has vocabulary {V} but {_called('weight')} has {vocab}; the "
                         "heads must match")
    tokens = tuple(hidden.shape[:-1])
    if labels is not None:
        check_shape(lb, labels, tokens, f"{h}.shape[:-1]")
    if math.prod(tokens) == 0:
        raise ValueError(f"{h} has no token (shape {tuple(hidden.shape)}): nothing to compute")
    if bias is not None:
        check_float(b, bias)
        check_shape(b, bias, (V,), f"[V] with V = {w}.shape[0]")
    if seq_ids is None and num_seqs is not None:
        raise ValueError(f"num_seqs={num_seqs!r} counts the sequences of {si}: pass {si} with it")
    if token_weights is not None:
        if seq_ids is None:
            raise ValueError(f"{tw} weight the per-sequence sums: pass {si} with them")
        check_float(tw, token_weights)
        check_shape(tw, token_weights, tokens, f"{h}.shape[:-1]")
    if mask is not None:
        check_tensor(mk, mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"{mk} must be a bool tensor, got dtype {mask.dtype}")
        check_shape(mk, mask, tokens, f"{h}.shape[:-1]")
    if seq_ids is not None:
        check_index(si, seq_ids)
        check_shape(si, seq_ids, tokens, f"{h}.shape[:-1]")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_positive("temperature", temperature)
    if softcap is not None:
        check_positive("softcap", softcap)
    check_same_device({h: hidden, w: weight, b: bias, lb: labels, si: seq_ids,
                       tw: token_weights, mk: mask})
    if device is not None and hidden.device != device:
        raise ValueError(f"{h} is on {hidden.device} but {_called('hidden')} is on {device}")

    flags = []
    if labels is not None:
        flags.append(labels_flag(lb, labels, V, ignore_index))
    flags += [(f"{h} contains NaN or inf", not_finite(hidden)),
              (f"{w} contains NaN or inf", not_finite(weight))]
    if bias is not None:
        flags.append((f"{b} contains NaN or inf", not_finite(bias)))
    if token_weights is not None:
        flags.append((f"{tw} contains NaN or inf", not_finite(token_weights)))
    if seq_ids is not None:
        if num_seqs is None:  # negative ids fail the range check below
            num_seqs = max(int(seq_ids.max()) + 1, 1)
        if not isinstance(num_seqs, int) or num_seqs < 1:
            raise ValueError(f"num_seqs must be a positive int, got {num_seqs!r}")
        flags.append((f"{si} must be in [0, num_seqs={num_seqs})",
                      ((seq_ids < 0) | (seq_ids >= num_seqs)).any()))
    if pending is None:
        raise_flagged(flags)
    else:
        pending.extend(flags)
    return num_seqs
