"""The build's first passes: the statistics of every node layer, and the bases known before any Jacobian.

Before any pass, :func:`preflight` runs the order, independence and cut checks and the memory guard on
the first batch alone: it reduces nothing, so a caller running several processes can run it first and
share its failure before any collective. Then two passes over the data: the means (the shift), then the
Gram matrices as sums about them (no cancellation for large means, stats.py). Non-finite activations are
counted in the means' partial sums, so every process learns of them at the same reduction and raises
:class:`NonFiniteActivations` there (none waits in a later collective). Layers that are not node layers
can be read in the Gram pass's forward (``observe``), so that a caller's own per-batch statistics (ReLU
co-firing) cost no forward of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lib_lightning.core.lib.basis import LayerBasis, Whitening, identity_basis, neuron_basis, pca_basis
from lib_lightning.core.lib.batch import batch_size
from lib_lightning.core.lib.capture import Forward, NodeLayer, capture, select_examples
from lib_lightning.core.lib.checks import Context, check_sections
from lib_lightning.core.lib.memory import check_memory, estimate_memory
from lib_lightning.core.lib.modes import prepare_inputs
from lib_lightning.core.lib.stats import ActivationStats, mean_update, shift_of, stats_update

__all__ = ["CHECK_EXAMPLES", "LayerStatistics", "NonFiniteActivations", "Observer", "preflight", "statistics_pass",
           "initial_bases"]

CHECK_EXAMPLES = 16  # examples of the first batch on which the order and cut checks run
Reduce = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[str, int, int], None]
Observer = Callable[[int, list[torch.Tensor]], None]


class NonFiniteActivations(ValueError):
    """NaN or Inf in the activations of a node layer, raised on every process at the same reduction."""


@dataclass(frozen=True)
class LayerStatistics:
    """Reduced statistics of every node layer, the number of examples and each layer's positions."""

    stats: list[ActivationStats]
    n_examples: int
    positions: list[int]


def _mean_sums(
    model: nn.Module, node_layers: list[NodeLayer], batches: Iterable[Any], dtype: torch.dtype | None, forward: Forward
) -> tuple[list[torch.Tensor], str | None]:
    """Per node layer, the partial (Σ f, N P, n_bad) of this process's batches, n_bad its non-finite
    entries (Σ f is then not used), and where this process first saw one (``None``: nowhere)."""
    sums: list[torch.Tensor] | None = None
    first_bad = None
    for b, inputs in enumerate(batches):
        with torch.no_grad():
            acts = capture(model, node_layers, prepare_inputs(inputs, dtype), forward)
        parts = []
        for layer, a in zip(node_layers, acts):
            n_bad = (~torch.isfinite(a)).sum().to(torch.float64).reshape(1)  # (1,)
            if n_bad.item() > 0:  # the sum would be NaN; the count carries the news
                first_bad = first_bad or f"node layer {layer.name!r} contain NaN or Inf (batch {b})"
                part = torch.zeros(a.shape[-1] + 1, dtype=torch.float64, device=a.device)
            else:
                part = mean_update(a)  # (d + 1,)
            parts.append(torch.cat([part, n_bad]))
        sums = parts if sums is None else [s + p for s, p in zip(sums, parts)]
    if sums is None:
        raise ValueError("the analysis dataset is empty: no batch was given")
    return sums, first_bad


def _shifts(node_layers: list[NodeLayer], sums: list[torch.Tensor], first_bad: str | None, reduce: Reduce) -> list:
    """The shift of every node layer from the reduced mean sums; raises on every process alike when
    any process counted a non-finite activation."""
    reduced = [reduce(part) for part in sums]  # (d + 2,) each: Σ f, N P, n_bad
    bad = {layer.name: int(part[-1].item()) for layer, part in zip(node_layers, reduced) if part[-1].item() > 0}
    if bad:
        where = first_bad or f"node layer(s) {list(bad)} contain NaN or Inf on another process"
        raise NonFiniteActivations(f"activations of {where}; non-finite entries per layer, all processes: {bad}")
    return [shift_of(part[:-1]) for part in reduced]


def preflight(
    model: nn.Module,
    node_layers: list[NodeLayer],
    first: Any,
    *,
    n_batches: int,
    dtype: torch.dtype | None,
    forward: Forward,
    check_cuts: bool,
    context_inputs: Context,
    memory_budget_bytes: int | None,
    memory_sizes: dict[str, Any],
) -> None:
    """The checks of the first batch ``first``, on its first :data:`CHECK_EXAMPLES` examples: order,
    independence and cuts (``check_cuts``), and the memory guard (``MemoryBudgetError``) from the shapes
    of its activations, the batch size being ``first``'s. Runs the model on those few examples only and
    reduces nothing; call it inside :func:`~lib_lightning.core.lib.modes.analysis_mode`.

    ``memory_sizes``: the keyword arguments of :func:`~lib_lightning.core.lib.memory.estimate_memory`
    that do not come from the first batch (chunk size, cache, sources, whether LIB is built).
    """
    if not check_cuts and memory_budget_bytes is None:
        return
    inputs = prepare_inputs(first, dtype)
    few = select_examples(inputs, slice(0, CHECK_EXAMPLES))
    if check_cuts:
        check_sections(model, node_layers, few, forward, context_inputs)
    if memory_budget_bytes is None:
        return
    with torch.no_grad():
        acts = capture(model, node_layers, few, forward)
    batch = batch_size(inputs)
    estimate = estimate_memory(
        [layer.name for layer in node_layers], [(batch, *a.shape[1:]) for a in acts], itemsize=acts[0].element_size(),
        n_examples=batch * n_batches or None, **memory_sizes,
    )  # fmt: skip
    check_memory(estimate, memory_budget_bytes)


def statistics_pass(
    model: nn.Module,
    node_layers: list[NodeLayer],
    batches: Iterable[Any],
    *,
    dtype: torch.dtype | None,
    forward: Forward,
    reduce: Reduce,
    report: Progress,
    observe: Sequence[NodeLayer] = (),
    observer: Observer | None = None,
) -> LayerStatistics:
    """The reduced statistics of every node layer (two passes: means, then Gram matrices about them).

    ``observer(b, acts)``, if given, is called in the second pass with the activations ``(batch, pos, d)``
    of the layers ``observe`` on this process's batch ``b``, read in the same forward as the node layers.

    Raises:
        NonFiniteActivations: on every process, when any process saw NaN or Inf in a node layer.
    """
    shifts = _shifts(node_layers, *_mean_sums(model, node_layers, batches, dtype, forward), reduce)
    n_batches = len(batches) if hasattr(batches, "__len__") else 0
    n_layers = len(node_layers)
    read = list(node_layers) + list(observe) if observer is not None else list(node_layers)
    stats: list[ActivationStats | None] = [None] * n_layers
    n_examples, positions = 0, []
    for b, inputs in enumerate(batches):
        with torch.no_grad():
            captured = capture(model, read, prepare_inputs(inputs, dtype), forward)
        acts = captured[:n_layers]
        for i, a in enumerate(acts):
            part = stats_update(a, shifts[i])
            stats[i] = part if stats[i] is None else stats[i] + part
        if observer is not None:
            observer(b, captured[n_layers:])
        n_examples += acts[0].shape[0]
        positions = [a.shape[1] for a in acts]
        report("statistics", b + 1, n_batches)
    stats = [s.reduce(reduce) for s in stats]
    device = stats[0].count.device
    n_examples = int(reduce(torch.tensor(float(n_examples), dtype=torch.float64, device=device)).item())
    return LayerStatistics(stats, n_examples, positions)


def initial_bases(
    kinds: Sequence[str],
    names: list[str],
    stats: list[ActivationStats],
    whitenings: list[Whitening],
    rotate_final: bool,
) -> dict[str, list[LayerBasis | None]]:
    """Per kind, the bases known before any Jacobian: the final layer's (its PCA basis with
    ``rotate_final``, else the identity; always the identity for neurons), and every PCA and neuron basis.
    The LIB bases of the other layers stay ``None`` until their section's Jacobian pass."""
    last = len(names) - 1
    final = (
        pca_basis(names[last], whitenings[last])
        if rotate_final
        else identity_basis(names[last], stats[last], whitenings[last].all_eigenvalues)
    )
    bases: dict[str, list[LayerBasis | None]] = {}
    for kind in kinds:
        bases[kind] = [None] * len(names)
        if kind == "neuron":
            bases[kind][last] = identity_basis(names[last], stats[last], whitenings[last].all_eigenvalues)
        else:
            bases[kind][last] = final
        for i in range(last):
            if kind == "pca":
                bases[kind][i] = pca_basis(names[i], whitenings[i])
            elif kind == "neuron":
                bases[kind][i] = neuron_basis(names[i], stats[i])
    return bases
