"""Runtime helpers shared by the callbacks: callables named in YAML, and blocks that leave the
training run's RNG state and thread count as they found them."""

from __future__ import annotations

import contextlib
import importlib
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["import_callable", "default_batch_inputs", "preserved_rng", "num_threads"]


def import_callable(path: str | Callable | None) -> Callable | None:
    """``"package.module:function"`` -> the function (callables and None pass through)."""
    if path is None or callable(path):
        return path
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"expected an import path 'package.module:function', got {path!r}")
    return getattr(importlib.import_module(module), name)


def default_batch_inputs(batch: Any) -> Any:
    """The model inputs of a batch: its first element for ``(inputs, labels)`` tuples."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@contextlib.contextmanager
def preserved_rng() -> Any:
    """Restores the torch, numpy and Python RNG states: the analysis must not change training."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py)
    np.random.set_state(np_state)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Any:
    """Runs the block with ``threads`` torch threads (unchanged if None), then restores the count."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
