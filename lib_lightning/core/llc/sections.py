"""Which parameters lie between consecutive node layers: the sections of a weight-refined LLC.

One forward pass is watched: hooks count the node layers that have produced their activation so far,
and a ``TorchFunctionMode`` records, for each parameter, that count at the first operation that reads
it. A parameter first read after node layer k−1 and before node layer k belongs to section
``<k−1>-><k>``; parameters read before the first node layer join the first section (an embedding feeds
the first node layer) and those read after the last join the last one. This follows the data flow, so
it also places parameters that belong to no leaf module (a positional embedding) and modules defined
out of forward order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["parameter_sections"]


class _FirstUse(TorchFunctionMode):
    """Records ``first[name] = counter()`` the first time an operation reads each watched parameter."""

    def __init__(self, params: dict[int, str], counter: Callable[[], int]) -> None:
        super().__init__()
        self.params, self.counter, self.first = params, counter, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for leaf in tree_flatten((args, kwargs or {}))[0]:
            name = self.params.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if name is not None and name not in self.first:
                self.first[name] = self.counter()
        return func(*args, **(kwargs or {}))


def parameter_sections(
    model: nn.Module, node_modules: Sequence[str], run: Callable[[nn.Module], Any],
    use_input: Sequence[bool] | None = None, names: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """``{"<a>-><b>": [parameter names]}`` for consecutive node layers a, b, in forward order.

    Args:
        model: the module whose trainable parameters are assigned.
        node_modules: module paths of the node layers, in forward order (at least 2).
        run: ``run(model)`` performs one forward pass (no gradients needed).
        use_input: per node layer, whether its activation is the module's input (fires before the module
            runs) rather than its output. Default: outputs.
        names: section endpoint names (default ``node_modules``).

    Returns:
        One entry per section, parameters in ``model.named_parameters()`` order; trainable parameters the
        pass never reads are in no section.

    Raises:
        ValueError: for fewer than 2 node layers, an unknown module (the message lists the available
            ones) or a node layer that never fired.
    """
    if len(node_modules) < 2:
        raise ValueError(f"sections need at least 2 node layers, got {list(node_modules)}")
    use_input = [False] * len(node_modules) if use_input is None else list(use_input)
    names = list(node_modules) if names is None else list(names)
    modules = dict(model.named_modules())
    missing = [m for m in node_modules if m not in modules]
    if missing:
        raise ValueError(f"node layer module(s) {missing} not found; available: {[n for n in modules if n]}")
    fired: list[int] = []
    handles = []
    for index, (path, before) in enumerate(zip(node_modules, use_input)):
        def hook(*_, index=index):
            fired.append(index)
        module = modules[path]
        handles.append(module.register_forward_pre_hook(hook) if before else module.register_forward_hook(hook))
    params = {id(p): k for k, p in model.named_parameters() if p.requires_grad}
    mode = _FirstUse(params, lambda: len(set(fired)))
    try:
        with torch.no_grad(), mode:
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    silent = [node_modules[i] for i in range(len(node_modules)) if i not in fired]
    if silent:
        raise ValueError(f"node layer(s) {silent} did not fire during the forward pass")
    last = len(node_modules) - 1
    sections = {f"{names[k - 1]}->{names[k]}": [] for k in range(1, len(node_modules))}
    keys = list(sections)
    for name in (k for k, p in model.named_parameters() if p.requires_grad and k in mode.first):
        count = mode.first[name]  # node layers fired before the first read
        sections[keys[min(max(count, 1), last) - 1]].append(name)
    return sections
