"""torch.autocast, seen from ops that choose their own precision."""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype torch.autocast would run a matmul in on ``device``, or None outside autocast."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device``: matmuls run in their operands' dtype. (In a
    graph, where torch 2.11's dynamo cannot trace the availability check, autocast is taken to
    exist on the inputs' device.)"""
    if torch.compiler.is_compiling() or torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
