"""Hidden states as the kernels read them: rows of a 2-D ``[R, d]`` view with unit stride along
d, addressed by row indices. A layout such as a causal LM's shift ``h[:, :-1]``, which
``reshape`` would copy, is read in place through a view over the same memory."""

from __future__ import annotations

import math

import torch


def rows_view(hidden: torch.Tensor) -> torch.Tensor:
    """``[rows, d]`` view with unit stride along d (what the kernels index), copying if needed."""
    h = hidden.reshape(-1, hidden.shape[-1])
    return h if h.stride(-1) == 1 else h.contiguous()


def row_map(hidden: torch.Tensor) -> tuple[int, tuple[int, ...]] | None:
    """``(step, coefficients)``: token ``(i_0, i_1, ...)`` of ``hidden [..., d]`` is row
    ``Σ_k i_k·c_k`` of a 2-D ``[R, d]`` view with row stride ``step`` over the same memory, every
    token's row starting at a multiple of ``step`` (a slice such as ``h[:, :-1]``, which
    ``reshape`` would copy). None, for a copy, without unit stride along d, with no tokens, or
    where rows would not be 16-byte aligned (the kernels' vectorised loads need that), and under
    ``torch.compile``, whose traced tensors have no address."""
    if torch.compiler.is_compiling():
        return None
    if hidden.dim() < 2 or hidden.numel() == 0 or hidden.stride(-1) != 1:
        return None
    lead = [(n, s) for n, s in zip(hidden.shape[:-1], hidden.stride()[:-1], strict=True)]
    step = math.gcd(*(s for n, s in lead if n > 1)) or hidden.shape[-1]
    if (step * hidden.element_size()) % 16 or hidden.data_ptr() % 16:
        return None
    return step, tuple(s // step if n > 1 else 0 for n, s in lead)


def row_source(hidden: torch.Tensor, rows: torch.Tensor,
                row_map: tuple[int, tuple[int, ...]] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(view [R, d], indices [n])``: the rows the kernels read for the flat tokens ``rows`` of
    ``hidden``, through :func:`row_map`'s view without a copy, or (``row_map`` None) from a
    contiguous copy."""
    if row_map is None or hidden.is_contiguous():  # a copy, or rows are rows already
        return rows_view(hidden), rows
    step, coefs = row_map
    d = hidden.shape[-1]
    span = sum((n - 1) * c for n, c in zip(hidden.shape[:-1], coefs, strict=True)) + 1
    index = sum(i * c for i, c in zip(torch.unravel_index(rows, hidden.shape[:-1]), coefs,
                                      strict=True))
    return hidden.as_strided((span, d), (step, 1)), index


def all_rows(view: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether the kernels' ``index`` (from :func:`row_source`) is every row of ``view`` in
    order, so that ``view`` serves as ``view[index]`` with no gathered copy: the flat tokens
    ``rows`` themselves (increasing, from ``nonzero``), all of them."""
    return index is rows and rows.numel() == view.shape[0]
