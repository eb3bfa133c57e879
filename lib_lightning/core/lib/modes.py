"""The model and its inputs as an analysis needs them: eval mode, frozen, in the analysis dtype, and
everything restored exactly afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lib_lightning.core.lib.batch import prepare as _prepare

__all__ = ["analysis_mode", "prepare_inputs"]


@contextlib.contextmanager
def analysis_mode(model: nn.Module, dtype: torch.dtype | None) -> Iterator[nn.Module]:
    """Eval mode, parameters frozen and cast to ``dtype``; everything restored exactly on exit.

    The original parameter and buffer tensors are put back (not copies), so the model, its optimizer
    state and its gradients are untouched.
    """
    training = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    tensors = params + list(model.buffers())
    originals = [t.data for t in tensors]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        if dtype is not None:
            for t in tensors:
                if t.is_floating_point():
                    t.data = t.data.to(dtype)
        yield model
    finally:
        for t, data in zip(tensors, originals):
            t.data = data
        for p, flag in zip(params, requires_grad):
            p.requires_grad_(flag)
        for m, flag in training.items():
            m.training = flag


def prepare_inputs(inputs: Any, dtype: torch.dtype | None) -> Any:
    """Clones inputs (any nesting, see :mod:`lib_lightning.core.lib.batch`) out of inference mode and casts
    floating tensors to the analysis dtype."""
    return _prepare(inputs, dtype)
