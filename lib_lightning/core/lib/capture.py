"""Node layers on any ``nn.Module``: capture activations with hooks, substitute them, check their order.

A node layer (:mod:`lib_lightning.core.lib.nodes`) is a value of a named module of a model the library
does not own, read as an activation ``(batch, pos, d)``. The section F_l from node layer l to l+1 is
evaluated by running the model with layer l's activation substituted (forward hook) and stopping once
layer l+1 has been captured. Captured activations are copies and substituted values are fresh tensors,
so in-place operations after a hook point (``nn.ReLU(inplace=True)``) can overwrite neither.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lib_lightning.core.lib.batch import select as _select
from lib_lightning.core.lib.nodes import NodeLayer, register_hook

__all__ = [
    "NodeLayer",
    "Forward",
    "default_forward",
    "resolve_modules",
    "capture",
    "run_section",
    "select_examples",
    "substituted",
    "check_order",
]

Forward = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, inputs: Any) -> Any:
    """Runs ``model(inputs)``; pass another callable for models with other signatures."""
    return model(inputs)


class _StopForward(BaseException):
    """Stops a forward pass once the last node layer is read; a ``BaseException`` so that a model's own
    ``try: ... except Exception`` does not swallow it."""


def resolve_modules(model: nn.Module, layers: Sequence[NodeLayer]) -> list[nn.Module]:
    """The module of each node layer; an unknown name lists the available ones."""
    modules = dict(model.named_modules())
    missing = [layer.module for layer in layers if layer.module not in modules]
    if missing:
        available = ", ".join(repr(n) for n in modules if n)
        raise KeyError(f"unknown module name(s) {missing}; available modules: {available}")
    return [modules[layer.module] for layer in layers]


@contextlib.contextmanager
def _hooks(registrations) -> Iterator[None]:
    handles = []
    try:
        for module, layer, fn in registrations:
            handles.append(register_hook(module, layer, fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture(
    model: nn.Module, layers: Sequence[NodeLayer], inputs: Any, forward: Forward = default_forward
) -> list[torch.Tensor]:
    """Activations ``(batch, pos, d)`` of every node layer for one batch (the forward stops after the last).

    Raises:
        RuntimeError: if a node layer's module is not called, or called more than once, in the forward.
    """
    modules = resolve_modules(model, layers)
    found: dict[int, torch.Tensor] = {}
    last = len(layers) - 1

    def make(i: int):
        def fn(value):
            if i in found:
                raise RuntimeError(f"module of node layer {layers[i].name!r} ran twice in one forward pass")
            acts = layers[i].to_acts(value)
            if len(found) == len(layers) - 1 and i == last:
                found[i] = acts
                raise _StopForward  # nothing runs after the last layer: no copy needed
            found[i] = acts.clone()  # the model may write into its value in place later
            return None

        return fn

    with _hooks([(m, layer, make(i)) for i, (m, layer) in enumerate(zip(modules, layers))]):
        try:
            forward(model, inputs)
        except _StopForward:
            pass
    missing = [layers[i].name for i in range(len(layers)) if i not in found]
    if missing:
        raise RuntimeError(f"node layer(s) {missing} were not reached by the forward pass")
    return [found[i] for i in range(len(layers))]


@contextlib.contextmanager
def substituted(model: nn.Module, layer: NodeLayer, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[list[bool]]:
    """While active, ``layer``'s activation is replaced by ``fn(act)`` in every forward pass.

    ``fn`` receives the activation ``(batch, pos, d)`` (positions selected) and returns its replacement
    of the same shape. Yields a list that holds one entry once the layer has been substituted; a second
    substitution in the same forward pass raises ``RuntimeError``.
    """
    (module,) = resolve_modules(model, [layer])
    done: list[bool] = []

    def replace(value):
        if done:
            raise RuntimeError(f"module of node layer {layer.name!r} ran twice in one forward pass")
        done.append(True)
        # A fresh tensor: an in-place operation downstream may neither modify fn's result (for example
        # a leaf that requires grad) nor be refused by autograd for writing into a leaf or its view.
        return layer.from_acts(value, fn(layer.to_acts(value))).clone()

    with _hooks([(module, layer, replace)]):
        yield done


def select_examples(inputs: Any, index: slice | torch.Tensor) -> Any:
    """The examples ``index`` (a slice or index tensor over the batch dimension) of model inputs: a
    tensor, or a nesting of tuples/lists/dicts/mappings (see :mod:`lib_lightning.core.lib.batch`)."""
    return _select(inputs, index)


def run_section(
    model: nn.Module,
    layer_in: NodeLayer,
    layer_out: NodeLayer,
    inputs: Any,
    substitute: Callable[[torch.Tensor], torch.Tensor],
    forward: Forward = default_forward,
) -> torch.Tensor:
    """Runs the model on ``inputs`` with ``layer_in``'s activation replaced by ``substitute(act)``.

    Returns ``layer_out``'s activation ``(batch, pos, d)`` (the forward stops there). ``substitute``
    receives the captured activation ``(batch, pos, d)`` and returns its replacement of the same shape
    (for example a leaf that requires grad, scaled by alpha).
    """
    (module_out,) = resolve_modules(model, [layer_out])
    result: list[torch.Tensor] = []

    def read(value):
        result.append(layer_out.to_acts(value))
        raise _StopForward

    with substituted(model, layer_in, substitute) as done, _hooks([(module_out, layer_out, read)]):
        try:
            forward(model, inputs)
        except _StopForward:
            pass
    if not done:
        raise RuntimeError(f"node layer {layer_in.name!r} was not reached by the forward pass")
    if not result:
        raise RuntimeError(f"node layer {layer_out.name!r} was not reached after {layer_in.name!r}")
    return result[0]


def check_order(model: nn.Module, layers: Sequence[NodeLayer], inputs: Any, forward: Forward = default_forward) -> None:
    """Raises ``ValueError`` unless the node layers' modules run in the given order, once each."""
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"node layers must be distinct, got {names}")
    modules = resolve_modules(model, layers)
    order: list[int] = []

    def make(i: int):
        def fn(value):
            order.append(i)

        return fn

    with _hooks([(m, layer, make(i)) for i, (m, layer) in enumerate(zip(modules, layers))]):
        forward(model, inputs)
    runs = {names[i]: order.count(i) for i in range(len(layers))}
    if any(count != 1 for count in runs.values()):
        raise ValueError(f"each node layer's module must run exactly once per forward pass; run counts: {runs}")
    if order != list(range(len(layers))):
        ran = [names[i] for i in order]
        raise ValueError(f"node layers are out of order: given {names}, but the forward pass runs {ran}")


def __getattr__(name: str) -> Any:
    # The cut check moved to checks.py beside the independence check; old imports keep working.
    if name in ("CutError", "check_cut"):
        from lib_lightning.core.lib import checks

        return getattr(checks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
