"""Ablations in a basis (LIB_SPEC.md §5, §7): accuracy and loss against the features or edges kept.

Node ablation projects one node layer's activation onto its first k features, f ↦ f C_k C⁺, and runs
the rest of the model. Edge ablation keeps the k strongest edges of one section: for each output feature
i the input features whose edges to i are dropped are zeroed, the result is mapped back with C⁺, the
section is run, and component i is read; the assembled output features are mapped back through
C^{l+1,+} and the rest of the model runs. Both substitute activations with forward hooks on the node
layers' modules (the mechanism of :mod:`lib_lightning.core.capture`), so they work on any model.

Data is a re-iterable sequence of ``(inputs, labels)`` batches; the model's output (via
``forward(model, inputs)``) is a ``(batch, classes)`` tensor of logits. Losses and accuracies are sums
plus counts over the batches, divided at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lib_lightning.core.basis import LayerBasis
from lib_lightning.core.capture import (
    Forward,
    NodeLayer,
    capture,
    default_forward,
    run_section,
    substituted,
)
from lib_lightning.core.graph import InteractionGraph
from lib_lightning.core.modes import analysis_mode, prepare_inputs

__all__ = [
    "Evaluation",
    "NodeAblation",
    "EdgeAblation",
    "substitute",
    "evaluate",
    "ablation_schedule",
    "smallest_passing",
    "node_ablation",
    "edge_mask",
    "edge_ablation",
]

Data = Sequence[tuple[Any, torch.Tensor]]


@dataclass(frozen=True)
class Evaluation:
    """Cross-entropy and accuracy of a model over a dataset, as sums and a count."""

    loss_sum: float
    correct_sum: float
    count: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count

    @property
    def accuracy(self) -> float:
        return self.correct_sum / self.count


@dataclass(frozen=True)
class NodeAblation:
    """One node layer ablated to its first k features, for every k of a schedule.

    Attributes:
        layer: the node layer's name.
        kind: the basis kind (``"lib"``, ``"pca"``, ...).
        ks: ``(n,)`` features kept, the constant direction included, ascending.
        accuracy, loss: ``(n,)`` on the evaluation data at each k.
        baseline_accuracy, baseline_loss: the unablated model.
        d_lib: number of features of the basis (the last k, where the identity is applied).
    """

    layer: str
    kind: str
    ks: torch.Tensor
    accuracy: torch.Tensor
    loss: torch.Tensor
    baseline_accuracy: float
    baseline_loss: float
    d_lib: int


@dataclass(frozen=True)
class EdgeAblation:
    """One section with only its k strongest edges kept, and the fewest edges that keep accuracy.

    Attributes:
        section: ``"<layer_in>-><layer_out>"``.
        kind: the basis kind.
        n_edges: number of rankable edges (edges out of the constant node are always kept, not counted).
        n_required: the fewest strongest edges with accuracy >= ``baseline_accuracy - tolerance`` (by an
            exponential search then bisection; ``n_edges`` when even all edges fall short, see ``reached``).
        reached: whether keeping ``n_required`` edges meets the target.
        tolerance: the accuracy tolerance of the search.
        ks: ``(m,)`` every number of edges evaluated, ascending.
        accuracy, loss: ``(m,)`` at each of ``ks``.
        baseline_accuracy, baseline_loss: the unablated model.
        cutoff: the weight E of the weakest edge kept at ``n_required`` (0 when none is kept): the ε of the
            reference's log weighting for modularity (LIB_SPEC.md §6).
    """

    section: str
    kind: str
    n_edges: int
    n_required: int
    reached: bool
    tolerance: float
    ks: torch.Tensor
    accuracy: torch.Tensor
    loss: torch.Tensor
    baseline_accuracy: float
    baseline_loss: float
    cutoff: float


def substitute(
    model: nn.Module,
    layer: str | NodeLayer,
    fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: Any,
    forward: Forward = default_forward,
) -> Any:
    """Runs the whole model with ``layer``'s activation replaced by ``fn(act)``; returns the model output.

    ``fn`` receives the activation ``(batch, pos, d)`` (positions selected) and returns a tensor of the
    same shape and dtype; returning its argument leaves the forward pass exactly as it was.

    Raises:
        KeyError: for an unknown module name (listing the available ones).
        RuntimeError: if the layer's module does not run, or runs more than once.
    """
    layer = NodeLayer.parse(layer)
    with substituted(model, layer, fn) as done:
        output = forward(model, inputs)
    if not done:
        raise RuntimeError(f"node layer {layer.name!r} was not reached by the forward pass")
    return output


def _evaluation_update(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """``(loss_sum, correct_sum, count)`` of one batch, float64."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"forward(model, inputs) must return (batch, classes) logits, got {shape}")
    logits = logits.to(torch.float64)
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(-1) == labels).sum().to(torch.float64)
    return torch.stack([loss, correct, torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=logits.device)])


def evaluate(run: Callable[[Any], Any], data: Data) -> Evaluation:
    """Cross-entropy and accuracy of ``run(inputs)`` (logits) against the labels of every batch.

    Raises:
        ValueError: for empty data or outputs that are not ``(batch, classes)``.
    """
    total = None
    for inputs, labels in data:
        part = _evaluation_update(run(inputs), labels)
        total = part if total is None else total + part
    if total is None or total[2] == 0:
        raise ValueError("the evaluation data is empty: no batch was given")
    loss_sum, correct_sum, count = total.tolist()
    return Evaluation(loss_sum, correct_sum, int(count))


def ablation_schedule(n: int, dense_up_to: int = 10, base: float = 1.05) -> list[int]:
    """Numbers of features to keep: every k <= ``dense_up_to``, then ⌈dense_up_to·baseʲ⌉ (j >= 1), then n.

    Args:
        n: number of features of the basis (k = n is always included).
        dense_up_to: every k up to this is tested (LIB_SPEC.md §7: 10).
        base: growth factor above ``dense_up_to`` (LIB_SPEC.md §7: 1.05); > 1.

    Raises:
        ValueError: for ``n < 0``, ``dense_up_to < 0`` or ``base <= 1``.
    """
    if n < 0 or dense_up_to < 0:
        raise ValueError(f"n and dense_up_to must be >= 0, got n={n}, dense_up_to={dense_up_to}")
    if not base > 1:
        raise ValueError(f"base must be > 1, got {base}")
    ks = set(range(min(n, dense_up_to) + 1))
    j = 1
    while (k := math.ceil(max(dense_up_to, 1) * base**j)) < n:
        ks.add(k)
        j += 1
    ks.add(n)
    return sorted(ks)


def smallest_passing(ks: torch.Tensor, accuracy: torch.Tensor, target: float) -> int | None:
    """The smallest tested k from which accuracy >= ``target`` at every larger tested k too (None if never).

    Requiring the criterion to keep holding makes the answer robust to an accidental pass below the
    point where the curve settles.
    """
    passing = (accuracy >= target).tolist()
    answer = None
    for k, ok in zip(reversed(ks.tolist()), reversed(passing)):
        if not ok:
            break
        answer = int(k)
    return answer


def _projection(basis: LayerBasis, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """f ↦ f C_k C⁺ (C_k: C with the columns after the first k zeroed); the identity at k = d_lib."""
    if k == basis.d_lib:
        return lambda act: act
    proj = basis.basis[:, :k] @ basis.basis_pinv[:k]  # (d + 1, d + 1)

    def project(act: torch.Tensor) -> torch.Tensor:
        aug = torch.cat([act.to(proj.dtype), torch.ones_like(act[..., :1], dtype=proj.dtype)], dim=-1)
        return (aug @ proj)[..., :-1].to(act.dtype)

    return project


def _check_data(data: Data) -> Data:
    if iter(data) is data:
        raise TypeError("data must be re-iterable (a list of (inputs, labels) batches), not a one-shot iterator")
    return data


def node_ablation(
    model: nn.Module,
    graph: InteractionGraph,
    data: Data,
    *,
    forward: Forward = default_forward,
    layers: Sequence[int] | None = None,
    ks: Sequence[int] | None = None,
    dense_up_to: int = 10,
    base: float = 1.05,
    dtype: torch.dtype | None = torch.float64,
) -> list[NodeAblation]:
    """Accuracy and loss with each node layer projected onto its first k features (LIB_SPEC.md §7).

    f ↦ f C_k C⁺ on one node layer at a time, the rest of the model unchanged; k counts the constant
    direction (k = 1 keeps only the mean activation), and k = d_lib applies the identity, not C C⁺.

    Args:
        model: the model the graph was built on; eval mode, frozen and cast to ``dtype`` meanwhile, then
            restored exactly.
        graph: bases of the node layers (its layer names are the module names to hook).
        data: ``(inputs, labels)`` batches, held out from the data the graph was built on.
        layers: indices of the node layers to ablate; default every layer with a constant direction
            (an unrotated output layer is left out).
        ks: numbers of features to keep (clipped to each layer's d_lib, ``d_lib`` always added); default
            :func:`ablation_schedule` with ``dense_up_to`` and ``base``.
        dtype: precision of the evaluation.

    Returns:
        One :class:`NodeAblation` per ablated layer.

    Raises:
        ValueError: for layer indices out of range, negative ks or empty data.
    """
    data = _check_data(data)
    n_layers = len(graph.layers)
    if layers is None:
        layers = [i for i, layer in enumerate(graph.layers) if layer.has_constant]
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for {n_layers} node layers {graph.layer_names}")
    if ks is not None and any(k < 0 for k in ks):
        raise ValueError(f"ks must be >= 0, got {list(ks)}")
    data = [(prepare_inputs(inputs, dtype), labels) for inputs, labels in data]
    results = []
    with torch.no_grad(), analysis_mode(model, dtype):
        baseline = evaluate(lambda inputs: forward(model, inputs), data)
        for i in layers:
            basis = graph.layers[i]
            schedule = ablation_schedule(basis.d_lib, dense_up_to, base) if ks is None else sorted(
                {min(int(k), basis.d_lib) for k in ks} | {basis.d_lib}
            )
            layer = NodeLayer.parse(basis.name)
            evals = []
            for k in schedule:
                project = _projection(basis, k)
                evals.append(evaluate(lambda inputs: substitute(model, layer, project, inputs, forward), data))
            results.append(
                NodeAblation(
                    basis.name, graph.kind, torch.tensor(schedule),
                    torch.tensor([e.accuracy for e in evals], dtype=torch.float64),
                    torch.tensor([e.loss for e in evals], dtype=torch.float64),
                    baseline.accuracy, baseline.loss, basis.d_lib,
                )
            )
    return results


def _candidates(edges: torch.Tensor, skip_constant_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the rankable edges, strongest first (ties by position, row-major)."""
    k_out, k_in = edges.shape
    first = 1 if skip_constant_input else 0
    values = edges[:, first:].reshape(-1)  # (k_out * (k_in - first),)
    order = torch.sort(values, descending=True, stable=True).indices
    return order // (k_in - first), order % (k_in - first) + first


def edge_mask(edges: torch.Tensor, k: int, skip_constant_input: bool = True) -> torch.Tensor:
    """``(k_out, k_in)`` bool: the k strongest edges by E, plus every edge out of the constant node.

    Args:
        edges: ``(k_out, k_in)`` non-negative edge weights E, rows = output features.
        k: number of rankable edges to keep, in [0, number of rankable edges].
        skip_constant_input: input feature 0 is the constant direction: its edges are always kept and
            not counted.

    Raises:
        ValueError: for a non-2-D edge matrix or k out of range.
    """
    if edges.ndim != 2:
        raise ValueError(f"edges must be (k_out, k_in), got shape {tuple(edges.shape)}")
    rows, cols = _candidates(edges, skip_constant_input)
    if not 0 <= k <= rows.numel():
        raise ValueError(f"k must be in [0, {rows.numel()}] (the rankable edges), got {k}")
    mask = torch.zeros(edges.shape, dtype=torch.bool, device=edges.device)
    mask[rows[:k], cols[:k]] = True
    if skip_constant_input:
        mask[:, 0] = True
    return mask


def _edge_run(model, forward, layer_in, layer_out, basis_in: LayerBasis, basis_out: LayerBasis, mask: torch.Tensor):
    """inputs -> logits with the section's edges outside ``mask`` ablated."""
    groups, inverse = torch.unique(mask, dim=0, return_inverse=True)  # (g, k_in), (k_out,)

    def run(inputs: Any) -> Any:
        (act_in,) = capture(model, [layer_in], inputs, forward)  # (batch, pos_in, d_in)
        feats_in = basis_in.transform(act_in)  # (batch, pos_in, k_in)
        feats_out = None
        for g in range(groups.shape[0]):
            rows = torch.nonzero(inverse == g).squeeze(1)
            masked = basis_in.reconstruct(feats_in * groups[g]).to(act_in.dtype)  # (batch, pos_in, d_in)
            out = basis_out.transform(run_section(model, layer_in, layer_out, inputs, lambda _: masked, forward))
            if feats_out is None:
                feats_out = torch.zeros_like(out)  # (batch, pos_out, k_out)
            feats_out[..., rows] = out[..., rows]
        act_out = basis_out.reconstruct(feats_out)  # (batch, pos_out, d_out)
        return substitute(model, layer_out, lambda act: act_out.to(act.dtype), inputs, forward)

    return run


def edge_ablation(
    model: nn.Module,
    graph: InteractionGraph,
    section: int,
    data: Data,
    *,
    forward: Forward = default_forward,
    tolerance: float = 1e-3,
    ks: Sequence[int] = (),
    dtype: torch.dtype | None = torch.float64,
) -> EdgeAblation:
    """The fewest strongest edges of one section that keep accuracy within ``tolerance`` (LIB_SPEC.md §5).

    Edges are ranked by E; edges out of the constant node are always kept and not counted. With the k
    strongest kept, output feature i of node layer l+1 is read from the section run on
    (f̂ ⊙ m_i) C⁺, where m_i zeroes the input features whose edges to i are dropped; output features with
    the same mask share one run. The assembled output features are mapped back through C^{l+1,+} and the
    rest of the model runs. The search evaluates k = 0, 1, 2, 4, ... until the accuracy reaches
    ``baseline - tolerance``, then bisects between the last two; it assumes accuracy grows with k.

    Args:
        model: the model the graph was built on (eval mode, frozen, cast to ``dtype`` meanwhile).
        graph: bases and edges of every node layer.
        section: index l of the section from node layer l to l+1.
        data: held-out ``(inputs, labels)`` batches.
        tolerance: accuracy drop allowed, >= 0 (the reference: 0.001).
        ks: further numbers of edges to evaluate for the curve (clipped to the number of edges).
        dtype: precision of the evaluation.

    Raises:
        ValueError: for a section out of range, a negative tolerance or empty data.
    """
    data = _check_data(data)
    if not 0 <= section < len(graph.edges):
        last = len(graph.edges) - 1
        raise ValueError(f"section must be in [0, {last}] for node layers {graph.layer_names}, got {section}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    basis_in, basis_out = graph.layers[section], graph.layers[section + 1]
    edges = graph.edges[section]
    skip = basis_in.has_constant
    n_edges = edges.shape[0] * (edges.shape[1] - (1 if skip else 0))
    layer_in, layer_out = NodeLayer.parse(basis_in.name), NodeLayer.parse(basis_out.name)
    data = [(prepare_inputs(inputs, dtype), labels) for inputs, labels in data]
    results: dict[int, Evaluation] = {}
    with torch.no_grad(), analysis_mode(model, dtype):
        baseline = evaluate(lambda inputs: forward(model, inputs), data)
        target = baseline.accuracy - tolerance

        def at(k: int) -> Evaluation:
            if k not in results:
                mask = edge_mask(edges, k, skip)
                results[k] = evaluate(_edge_run(model, forward, layer_in, layer_out, basis_in, basis_out, mask), data)
            return results[k]

        lo, hi = -1, 0  # at(lo) fails (-1: nothing evaluated yet), at(hi) is the candidate
        while hi < n_edges and at(hi).accuracy < target:
            lo, hi = hi, min(n_edges, max(1, 2 * hi))
        reached = at(hi).accuracy >= target
        if reached:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if at(mid).accuracy >= target:
                    hi = mid
                else:
                    lo = mid
        for k in ks:
            at(min(max(int(k), 0), n_edges))
    rows, cols = _candidates(edges, skip)
    cutoff = float(edges[rows[hi - 1], cols[hi - 1]]) if hi > 0 else 0.0
    order = sorted(results)
    return EdgeAblation(
        f"{basis_in.name}->{basis_out.name}", graph.kind, n_edges, hi, bool(reached), float(tolerance),
        torch.tensor(order), torch.tensor([results[k].accuracy for k in order], dtype=torch.float64),
        torch.tensor([results[k].loss for k in order], dtype=torch.float64),
        baseline.accuracy, baseline.loss, cutoff,
    )
