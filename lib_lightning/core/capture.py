"""Node layers on any ``nn.Module``: capture activations with hooks, substitute them, check cuts.

A node layer is a named module of a model the library does not own (its output, or optionally its
input), with an optional selection of sequence positions. Activations are normalised to
``(batch, pos, d)``: a 2-D output ``(batch, d)`` has one position, a 3-D output is ``(batch, pos, d)``,
and anything with more dimensions (e.g. a conv feature map ``(batch, C, H, W)``) is flattened to one
position of ``d = C*H*W``. The section F_l from node layer l to l+1 is evaluated by running the model
with layer l's activation substituted (forward hook) and stopping once layer l+1 has been captured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lib_lightning.core.batch import select as _select

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
    "check_cut",
    "CutError",
]

Forward = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, inputs: Any) -> Any:
    """Runs ``model(inputs)``; pass another callable for models with other signatures."""
    return model(inputs)


@dataclass(frozen=True)
class NodeLayer:
    """A node layer: the output (or input) of the module at ``module``, at some positions.

    Args:
        module: dotted module path, as in ``model.named_modules()`` (e.g. ``"model.hook_resid_mid"``).
        positions: indices into dim 1 of a 3-D activation ``(batch, pos, d)``; ``None`` keeps all.
        use_input: capture the module's first positional input instead of its output.
    """

    module: str
    positions: tuple[int, ...] | None = None
    use_input: bool = False

    def __post_init__(self) -> None:
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
            if not self.positions:
                raise ValueError(f"node layer {self.module!r}: positions must be non-empty or None")

    @property
    def name(self) -> str:
        """A readable, unique name: ``module``, ``module[in]``, ``module@-1``."""
        name = self.module + ("[in]" if self.use_input else "")
        if self.positions is not None:
            name += "@" + ",".join(str(p) for p in self.positions)
        return name

    @classmethod
    def parse(cls, spec: str | NodeLayer) -> NodeLayer:
        """``"mod"``, ``"mod@-1"``, ``"mod@0,1"``, ``"mod[in]"``, ``"mod[in]@-1"`` -> NodeLayer."""
        if isinstance(spec, NodeLayer):
            return spec
        module, _, pos = spec.partition("@")
        use_input = module.endswith("[in]")
        module = module.removesuffix("[in]")
        positions = tuple(int(p) for p in pos.split(",")) if pos else None
        return cls(module, positions, use_input)


class CutError(ValueError):
    """Raised when node layer l+1 is not a function of node layer l alone."""


class _StopForward(Exception):
    pass


def resolve_modules(model: nn.Module, layers: Sequence[NodeLayer]) -> list[nn.Module]:
    """The module of each node layer; an unknown name lists the available ones."""
    modules = dict(model.named_modules())
    missing = [layer.module for layer in layers if layer.module not in modules]
    if missing:
        available = ", ".join(repr(n) for n in modules if n)
        raise KeyError(f"unknown module name(s) {missing}; available modules: {available}")
    return [modules[layer.module] for layer in layers]


def _normalise(layer: NodeLayer, value: Any) -> torch.Tensor:
    """Module output or input -> activation ``(batch, pos, d)`` (positions selected)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"node layer {layer.name!r} produced {type(value).__name__}, expected a tensor")
    if not value.is_floating_point():
        raise TypeError(f"node layer {layer.name!r} has non-floating activations of dtype {value.dtype}")
    if value.ndim < 2:
        raise ValueError(f"node layer {layer.name!r} has activation shape {tuple(value.shape)}; need (batch, ...)")
    if layer.positions is None:
        if value.ndim == 3:
            return value
        return value.reshape(value.shape[0], 1, -1)
    if value.ndim != 3:
        raise ValueError(f"node layer {layer.name!r}: positions need a (batch, pos, d) activation, got {tuple(value.shape)}")
    n_pos = value.shape[1]
    bad = [p for p in layer.positions if not -n_pos <= p < n_pos]
    if bad:
        raise IndexError(f"node layer {layer.name!r}: positions {bad} out of range for {n_pos} positions")
    return value[:, list(layer.positions)]


def _denormalise(layer: NodeLayer, original: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_normalise`: put ``act (batch, pos, d)`` back into the module's value."""
    if layer.positions is None:
        return act.reshape(original.shape)
    out = original.clone()
    out[:, list(layer.positions)] = act
    return out


def _register(module: nn.Module, layer: NodeLayer, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Registers ``fn(value) -> replacement or None`` on the module's input or output."""
    if layer.use_input:

        def pre_hook(mod, args):
            new = fn(args[0])
            return None if new is None else (new, *args[1:])

        return module.register_forward_pre_hook(pre_hook)

    def hook(mod, args, output):
        return fn(output)

    return module.register_forward_hook(hook)


@contextlib.contextmanager
def _hooks(registrations) -> Iterator[None]:
    handles = []
    try:
        for module, layer, fn in registrations:
            handles.append(_register(module, layer, fn))
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
            found[i] = _normalise(layers[i], value)
            if len(found) == len(layers) and i == last:
                raise _StopForward
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
        return _denormalise(layer, value, fn(_normalise(layer, value)))

    with _hooks([(module, layer, replace)]):
        yield done


def select_examples(inputs: Any, index: slice | torch.Tensor) -> Any:
    """The examples ``index`` (a slice or index tensor over the batch dimension) of model inputs: a
    tensor, or a nesting of tuples/lists/dicts/mappings (see :mod:`lib_lightning.core.batch`)."""
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
        result.append(_normalise(layer_out, value))
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


def check_cut(
    model: nn.Module,
    layer_in: NodeLayer,
    layer_out: NodeLayer,
    inputs: Any,
    forward: Forward = default_forward,
    n_pairs: int = 4,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Checks that ``layer_out`` is a function of ``layer_in`` alone, on a few pairs of examples.

    Runs example i with ``layer_in``'s activation replaced by that of example i+1; on a cut,
    ``layer_out`` then equals example i+1's activation.

    Raises:
        CutError: naming the layers and the first pair of examples that failed.
    """
    with torch.no_grad():
        act_in, act_out = capture(model, [layer_in, layer_out], inputs, forward)
        batch = act_in.shape[0]
        if batch < 2:
            raise ValueError(f"the cut check needs at least 2 examples in a batch, got {batch}")
        n = min(n_pairs + 1, batch)
        perm = torch.arange(batch)
        perm[:n] = torch.roll(perm[:n], -1)
        swapped = run_section(model, layer_in, layer_out, inputs, lambda act: act_in[perm], forward)
        expected = act_out[perm]
        for i in range(n - 1):
            if not torch.allclose(swapped[i], expected[i], rtol=rtol, atol=atol):
                err = (swapped[i] - expected[i]).abs().max().item()
                raise CutError(
                    f"node layers {layer_in.name!r} -> {layer_out.name!r} are not a cut of the network: "
                    f"example {i} run with the {layer_in.name!r} activation of example {i + 1} does not give "
                    f"example {i + 1}'s {layer_out.name!r} activation (max abs difference {err:.3g}); "
                    "something bypasses the first layer (for example a residual connection) or the "
                    "selected positions drop information the next layer uses"
                )
