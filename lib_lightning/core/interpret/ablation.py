"""Ablations in a basis (LIB_SPEC.md §5, §7): accuracy and loss against the features or edges kept
(the sums behind them: :mod:`lib_lightning.core.interpret.evaluation`, re-exported here).

Node ablation projects one node layer's activation onto its first k features, f ↦ f C_k C⁺, and runs
the rest of the model; edge ablation is in :mod:`lib_lightning.core.interpret.edge_ablation`. Both substitute
activations with forward hooks on the node layers' modules (the mechanism of
:mod:`lib_lightning.core.lib.capture`), so they work on any model.

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
from torch import nn

from lib_lightning.core.interpret.evaluation import (
    Data, Evaluation, copy_updates, evaluate, evaluate_logits, evaluation_update,
)
from lib_lightning.core.interpret.sections import (
    Section, identity, layer_features, probe_masks, row_plan, running_products, section_mode,
)
from lib_lightning.core.lib import batch as nested
from lib_lightning.core.lib.basis import LayerBasis
from lib_lightning.core.lib.capture import Forward, NodeLayer, default_forward, substituted
from lib_lightning.core.lib.graph import InteractionGraph
from lib_lightning.core.lib.modes import analysis_mode, prepare_inputs

__all__ = [
    "Evaluation",
    "NodeAblation",
    "substitute",
    "evaluate",
    "evaluate_logits",
    "evaluation_update",
    "copy_updates",
    "ablation_schedule",
    "smallest_passing",
    "node_ablation",
    "check_data",
    "Data",
]


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


def check_data(data: Data) -> Data:
    """``data`` itself, or a TypeError if it is a one-shot iterator (the ablations pass over it many times)."""
    if iter(data) is data:
        raise TypeError("data must be re-iterable (a list of (inputs, labels) batches), not a one-shot iterator")
    return data


def _projections(feats: torch.Tensor, directions: torch.Tensor, ks: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``(c * e, pos, d)`` in ``dtype``: copy j is f C_{k_j} C⁺ of ``feats`` ``(e, pos, d_lib)``, computed in
    the features' precision from ``directions`` ``(d_lib, d)`` (rows of C⁺, constant coordinate dropped)
    as one running sum over the ascending ``ks`` (:func:`running_products`), and rounded once to the dtype
    the model runs in. The same sums as one product per k up to the rounding of the features' precision
    (float64), which the rounding to a float32 model's dtype does not see in practice."""
    e, pos, d_lib = feats.shape
    d = directions.shape[1]
    acts = torch.empty(len(ks), e * pos, d, dtype=dtype, device=feats.device)
    start = torch.zeros(e * pos, d, dtype=torch.promote_types(feats.dtype, directions.dtype), device=feats.device)
    for j, running in enumerate(running_products(feats.reshape(e * pos, d_lib), directions, ks, start)):
        acts[j].copy_(running)
    return acts.view(-1, pos, d)  # (c * e, pos, d)


def _node_sums(section: Section, basis: LayerBasis, inputs: Any, labels: torch.Tensor, feats: torch.Tensor,
               ks: list[int], stacked: bool, affine, max_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """One batch: ``(len(ks), 3)`` ``(loss_sum, correct_sum, count)`` with the layer projected onto its first
    k features, for each k < d_lib of ``ks``; several ks share one forward of the rest of the model where
    ``stacked`` (the projections made in the features' precision, handed over in ``dtype``)."""
    if affine is not None:
        return torch.stack([evaluation_update(out, labels) for out in affine.prefixes(feats, ks)])
    batch = feats.shape[0]
    examples, copies = row_plan(batch, len(ks), max_rows) if stacked else (batch, 1)
    directions = basis.directions()  # (d_lib, d)
    sums = torch.zeros(len(ks), 3, dtype=torch.float64)
    for first in range(0, batch, examples):
        part = inputs if examples >= batch else nested.select(inputs, slice(first, first + examples))
        f, y = feats[first:first + examples], labels[first:first + examples]  # (e, pos, d_lib), (e,)
        for start in range(0, len(ks), copies):
            chunk = ks[start:start + copies]
            logits = section.run(part, _projections(f, directions, chunk, dtype), len(chunk), stacked)
            sums[start:start + len(chunk)] += copy_updates(logits, y, len(chunk)).to(sums.device)  # (c, 3)
    return sums


def _node_curve(section: Section, basis: LayerBasis, data: Data, schedule: list[int], baseline: Evaluation,
                max_rows: int) -> list[Evaluation]:
    """Evaluations at each k of ``schedule``: the layer captured once per batch, the rest of the model run
    on several ks at once (an affine rest: one contraction per k); k = d_lib is the unablated model."""
    feats, dtype = layer_features(section, basis, data)
    stacked, affine = section_mode(section, basis, data[0][0], feats[0], identity, probe_masks(basis.d_lib), max_rows)
    ks = [k for k in schedule if k < basis.d_lib]
    total = torch.zeros(len(ks), 3, dtype=torch.float64)
    for (inputs, labels), f in zip(data, feats):
        total += _node_sums(section, basis, inputs, labels, f, ks, stacked, affine, max_rows, dtype).to(total.device)
    evals = {k: Evaluation.from_sums(t) for k, t in zip(ks, total)}
    return [evals.get(k, baseline) for k in schedule]


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
    max_rows: int = 2048,
    reuse: bool = True,
) -> list[NodeAblation]:
    """Accuracy and loss with each node layer projected onto its first k features (LIB_SPEC.md §7).

    f ↦ f C_k C⁺ on one node layer at a time, the rest of the model unchanged; k counts the constant
    direction where feature 0 is one (centred: k = 1 keeps only the mean activation), and k = d_lib
    applies the identity, not C C⁺.

    Args:
        model: the model the graph was built on; eval mode, frozen and cast to ``dtype`` meanwhile, then
            restored exactly.
        graph: bases of the node layers (its layer names are the module names to hook).
        data: ``(inputs, labels)`` batches, held out from the data the graph was built on.
        layers: indices of the node layers to ablate; default every layer but an unrotated output layer,
            centred or not.
        ks: numbers of features to keep (clipped to each layer's d_lib, ``d_lib`` always added); default
            :func:`ablation_schedule` with ``dense_up_to`` and ``base``.
        dtype: precision of the evaluation.
        max_rows: memory budget, examples x ks per forward of the rest of the model, >= 1; 1 runs each k
            on whole batches, one forward each, without the affine path.
        reuse: False runs the whole model once per k and batch (the path before, kept as the
            reference). True captures the layer once per batch, runs several ks stacked along the batch
            dimension from there (a probe on the first batch checks that this agrees with one forward per
            k, falling back otherwise), and where the rest of the model is affine in the layer's features
            evaluates every k as one contraction. Results agree to float rounding.

    Returns:
        One :class:`NodeAblation` per ablated layer.

    Raises:
        ValueError: for layer indices out of range, negative ks or empty data.
    """
    data = check_data(data)
    n_layers = len(graph.layers)
    if layers is None:
        layers = [i for i, layer in enumerate(graph.layers) if layer.kind != "identity"]
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for {n_layers} node layers {graph.layer_names}")
    if ks is not None and any(k < 0 for k in ks):
        raise ValueError(f"ks must be >= 0, got {list(ks)}")
    if not (isinstance(max_rows, int) and max_rows >= 1):
        raise ValueError(f"max_rows must be an int >= 1 (examples x ks per forward), got {max_rows!r}")
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
            if reuse:
                evals = _node_curve(Section(model, forward, layer, None), basis, data, schedule, baseline, max_rows)
            else:
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
