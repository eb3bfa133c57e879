"""Is each section a function of one example's node-layer activation and that example's context?

A section F_l from node layer l to l+1 is what the analysis differentiates, one example at a time. It
is only well defined if, for every example x,

    f^{l+1}(x) = F_l(f^l(x), c(x)),

where c(x) is the example's **context**: per-example side inputs that are not content routed through
node layer l, such as attention masks, position or segment ids. Two checks on a few examples:

- **cut**: example i, run with its own context but the layer-l activation of a hybrid example (another
  example's content, example i's context), gives the hybrid's layer-(l+1) activation. A residual
  connection or a second input that bypasses layer l fails it (:class:`CutError`).
- **independence**: changing example 0's layer-l activation leaves every other example's layer-(l+1)
  activation unchanged. A model that mixes the batch dimension (``batch_first=False`` modules fed
  batch-first tensors, BatchNorm in training mode) fails it (:class:`IndependenceError`), even when it
  mixes symmetrically, which the cut check cannot see.

Context inputs are top-level keys (dict inputs, such as HuggingFace ``input_ids``/``attention_mask``)
or indices (tuple inputs) of the model inputs. By default a dict key containing one of
:data:`CONTEXT_NAMES` is context; ``context=()`` holds nothing fixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lib_lightning.core.lib.capture import Forward, capture, check_order, default_forward, run_section, select_examples
from lib_lightning.core.lib.jacobian import batch_size
from lib_lightning.core.lib.nodes import NodeLayer

__all__ = [
    "CONTEXT_NAMES",
    "CutError",
    "IndependenceError",
    "check_batch_dim",
    "check_batch_first",
    "check_cut",
    "check_independence",
    "check_sections",
    "context_keys",
]

CONTEXT_NAMES = ("mask", "position_ids", "token_type_ids", "cache_position")
Context = Sequence[int | str] | None


class CutError(ValueError):
    """Raised when node layer l+1 is not a function of node layer l and the example's context."""


class IndependenceError(ValueError):
    """Raised when a section mixes examples: one example's activation changes another's output."""


def context_keys(inputs: Any, context: Context = None) -> tuple[int | str, ...]:
    """The top-level keys (dict inputs) or indices (tuple/list inputs) of the context inputs.

    ``context=None`` picks the dict keys that contain one of :data:`CONTEXT_NAMES`; a given sequence is
    checked against the inputs.

    Raises:
        ValueError: naming the keys that are not among the inputs, and the available ones.
    """
    if isinstance(inputs, Mapping):
        available = list(inputs.keys())
    elif isinstance(inputs, (tuple, list)):
        available = list(range(len(inputs)))
    else:
        available = []
    if context is None:
        return tuple(k for k in available if isinstance(k, str) and any(n in k for n in CONTEXT_NAMES))
    keys = tuple(context)
    bad = [k for k in keys if k not in available]
    if bad:
        raise ValueError(
            f"context inputs {bad} are not top-level keys or indices of the model inputs "
            f"({type(inputs).__name__}); available: {available}"
        )
    return keys


def _hybrid(inputs: Any, perm: torch.Tensor, keys: tuple[int | str, ...]) -> Any:
    """Example i of the result: the content of example ``perm[i]`` with the context of example i."""
    mixed = select_examples(inputs, perm)
    if not keys:
        return mixed
    if isinstance(mixed, Mapping):
        out = mixed.copy() if hasattr(mixed, "copy") else dict(mixed)
        for k in keys:
            out[k] = inputs[k]
        return out
    items = list(mixed)
    for k in keys:
        items[k] = inputs[k]
    if isinstance(inputs, list):
        return items
    return type(inputs)._make(items) if hasattr(inputs, "_fields") else type(inputs)(items)


def check_cut(
    model: nn.Module,
    layer_in: NodeLayer,
    layer_out: NodeLayer,
    inputs: Any,
    forward: Forward = default_forward,
    n_pairs: int = 4,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    context: Context = None,
) -> None:
    """Checks that ``layer_out`` is a function of ``layer_in`` and the context, on a few pairs of examples.

    Example i is run with its own inputs but ``layer_in``'s activation replaced by that of a hybrid
    example (the content of example i+1 with the context of example i); on a cut, ``layer_out`` then
    equals the hybrid's. Without context inputs the hybrid is example i+1 itself.

    Raises:
        CutError: naming the layers, the first pair of examples that failed and the context held fixed.
    """
    with torch.no_grad():
        (act_in,) = capture(model, [layer_in], inputs, forward)
        batch = act_in.shape[0]
        if batch < 2:
            raise ValueError(f"the cut check needs at least 2 examples in a batch, got {batch}")
        n = min(n_pairs + 1, batch)
        perm = torch.arange(batch)
        perm[:n] = torch.roll(perm[:n], -1)
        keys = context_keys(inputs, context)
        hybrid_in, expected = capture(model, [layer_in, layer_out], _hybrid(inputs, perm, keys), forward)
        swapped = run_section(model, layer_in, layer_out, inputs, lambda act: hybrid_in, forward)
        for i in range(n - 1):
            if not torch.allclose(swapped[i], expected[i], rtol=rtol, atol=atol):
                err = (swapped[i] - expected[i]).abs().max().item()
                held = f"the context inputs {list(keys)} held fixed" if keys else "no context inputs held fixed"
                raise CutError(
                    f"node layers {layer_in.name!r} -> {layer_out.name!r} are not a cut of the network: "
                    f"example {i} run with the {layer_in.name!r} activation of example {i + 1} does not give "
                    f"example {i + 1}'s {layer_out.name!r} activation (max abs difference {err:.3g}; {held}); "
                    "something bypasses the first layer (for example a residual connection) or the "
                    "selected positions drop information the next layer uses. If the examples differ in "
                    "per-example side inputs (masks, position ids), name them as context inputs"
                )


def check_independence(
    model: nn.Module,
    layer_in: NodeLayer,
    layer_out: NodeLayer,
    inputs: Any,
    forward: Forward = default_forward,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Checks that changing example 0's ``layer_in`` activation leaves the other examples' ``layer_out``.

    Example 0's activation is moved halfway to example 1's (a point between two real activations).

    Raises:
        IndependenceError: naming the layers and the examples whose output changed.
    """
    with torch.no_grad():
        act_in, act_out = capture(model, [layer_in, layer_out], inputs, forward)
        if act_in.shape[0] < 2:
            raise ValueError(f"the independence check needs at least 2 examples in a batch, got {act_in.shape[0]}")
        changed = act_in.clone()
        changed[0] = (act_in[0] + act_in[1]) / 2
        if torch.equal(changed[0], act_in[0]):
            changed[0] = act_in[0] * 1.5 + 1  # examples 0 and 1 coincide: move away from both
        out = run_section(model, layer_in, layer_out, inputs, lambda act: changed, forward)
        if out.shape != act_out.shape:
            raise IndependenceError(
                f"node layers {layer_in.name!r} -> {layer_out.name!r}: changing one example's activation changed "
                f"the shape of {layer_out.name!r} from {tuple(act_out.shape)} to {tuple(out.shape)}"
            )
        scale = max(1.0, act_out.abs().max().item())
        moved = [i for i in range(1, out.shape[0]) if not torch.allclose(out[i], act_out[i], rtol=rtol, atol=atol * scale)]
        if moved:
            err = (out[1:] - act_out[1:]).abs().max().item()
            raise IndependenceError(
                f"node layers {layer_in.name!r} -> {layer_out.name!r}: the batch dimension is mixed: changing "
                f"example 0's {layer_in.name!r} activation changed the {layer_out.name!r} activation of examples "
                f"{moved[:8]} (max abs difference {err:.3g}), so per-example Jacobians are wrong. Is dim 0 the "
                "batch? nn.TransformerEncoderLayer, nn.MultiheadAttention, nn.LSTM/GRU default to "
                "batch_first=False and read (seq, batch, d): build them with batch_first=True (BatchNorm "
                "in training mode also mixes examples; the analysis runs in eval mode)"
            )


def check_batch_dim(layers: Sequence[NodeLayer], acts: Sequence[torch.Tensor], batch: int) -> None:
    """Raises ``ValueError`` naming the first node layer whose activation ``acts[i]`` does not have ``batch``
    rows in dim 0 (captured activations of inputs holding ``batch`` examples)."""
    for layer, act in zip(layers, acts):
        if act.shape[0] != batch:
            raise ValueError(
                f"node layer {layer.name!r} has {act.shape[0]} rows in dim 0 but the inputs hold {batch} "
                f"examples (activation read as {tuple(act.shape)}): node layers must be batch first, which "
                "for example nn.LSTM's h_n (num_layers, batch, hidden) and batch_first=False outputs are not"
            )


def check_batch_first(model: nn.Module, layers: Sequence[NodeLayer], inputs: Any, forward: Forward = default_forward) -> None:
    """Raises ``ValueError`` unless every node layer's value has the inputs' batch size as its first dim."""
    with torch.no_grad():
        acts = capture(model, layers, inputs, forward)
    check_batch_dim(layers, acts, batch_size(inputs))


def check_sections(
    model: nn.Module,
    layers: Sequence[NodeLayer],
    inputs: Any,
    forward: Forward = default_forward,
    context: Context = None,
) -> None:
    """The order of the node layers, their batch dimension, then for every pair the independence and cut checks.

    Raises:
        ValueError, IndependenceError, CutError: for the first check that fails.
    """
    check_order(model, layers, inputs, forward)
    check_batch_first(model, layers, inputs, forward)
    for layer_in, layer_out in zip(layers[:-1], layers[1:]):
        check_independence(model, layer_in, layer_out, inputs, forward)
        check_cut(model, layer_in, layer_out, inputs, forward, context=context)
