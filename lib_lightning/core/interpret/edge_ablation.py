"""Edge ablation in a basis (LIB_SPEC.md §5, §7): accuracy and loss against the edges kept.

Keeps the k strongest edges of one section: for each output feature i the input features whose edges
to i are dropped are zeroed, the result is mapped back with C⁺, the section is run, and component i is
read; the assembled output features are mapped back through C^{l+1,+} and the rest of the model runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lib_lightning.core.interpret.ablation import (
    Data, Evaluation, check_data, evaluate, evaluate_logits, substitute,
)
from lib_lightning.core.interpret.edge_columns import ColumnCache, affine_columns, new_columns
from lib_lightning.core.interpret.sections import (
    AffineMap, Section, identity, layer_features, probe_masks, section_mode, stacking_holds,
)
from lib_lightning.core.lib.basis import LayerBasis
from lib_lightning.core.lib.capture import Forward, NodeLayer, capture, default_forward
from lib_lightning.core.lib.graph import InteractionGraph
from lib_lightning.core.lib.modes import analysis_mode, prepare_inputs

__all__ = ["EdgeAblation", "edge_mask", "edge_ablation"]


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



def _candidates(edges: torch.Tensor, skip_constant_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the rankable edges, strongest first (ties by position, row-major)."""
    k_out, k_in = edges.shape
    first_column = 1 if skip_constant_input else 0
    values = edges[:, first_column:].reshape(-1)  # (k_out * (k_in - first_column),)
    order = torch.sort(values, descending=True, stable=True).indices
    return order // (k_in - first_column), order % (k_in - first_column) + first_column


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
    return _ranked_mask(edges, rows, cols, k, skip_constant_input)


def _ranked_mask(edges: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k: int,
                 skip_constant_input: bool) -> torch.Tensor:
    """:func:`edge_mask` from the ranking ``rows, cols`` of :func:`_candidates` (sorted once per search)."""
    mask = torch.zeros(edges.shape, dtype=torch.bool, device=edges.device)
    mask[rows[:k], cols[:k]] = True
    if skip_constant_input:
        mask[:, 0] = True
    return mask


def _section_features(section: Section, stacked: bool, basis_in, basis_out, inputs, feats_in, masks):
    """``(c, batch, pos_out, k_out)``: the section's output features with the input features masked by
    each of the ``(c, k_in)`` masks; c > 1 masks run as one stacked forward where ``stacked``."""
    c, (batch, pos_in, k_in) = masks.shape[0], feats_in.shape
    masked = (feats_in.unsqueeze(0) * masks[:, None, None, :]).reshape(c * batch, pos_in, k_in)
    acts = basis_in.reconstruct(masked)  # (c * batch, pos_in, d_in)
    out = section.run(inputs, acts, c, stacked)
    if out.shape[0] != c * batch:
        raise RuntimeError(f"stacked section returned {out.shape[0]} rows, expected {c} x {batch}")
    feats_out = basis_out.transform(out)  # (c * batch, pos_out, k_out)
    return feats_out.reshape(c, batch, *feats_out.shape[1:])


def _edge_run(section: Section, stacked: bool, basis_in: LayerBasis, basis_out: LayerBasis, mask: torch.Tensor,
              max_rows: int):
    """inputs -> logits with the section's edges outside ``mask`` ablated, every k on its own (the path of
    ``reuse=False``): output features with the same kept inputs share a mask, and up to
    ``max_rows // batch`` masks share one forward of the section."""
    groups, inverse = torch.unique(mask, dim=0, return_inverse=True)  # (g, k_in), (k_out,)
    members = [torch.nonzero(inverse == g).squeeze(1) for g in range(groups.shape[0])]
    model, forward = section.model, section.forward

    def run(inputs: Any) -> Any:
        (act_in,) = capture(model, [section.layer_in], inputs, forward)  # (batch, pos_in, d_in)
        feats_in = basis_in.transform(act_in)  # (batch, pos_in, k_in)
        per_forward = max(1, max_rows // act_in.shape[0]) if stacked else 1
        feats_out = None
        for start in range(0, groups.shape[0], per_forward):
            chunk = groups[start:start + per_forward]
            out = _section_features(section, stacked, basis_in, basis_out, inputs, feats_in, chunk)
            if feats_out is None:
                feats_out = torch.zeros_like(out[0])  # (batch, pos_out, k_out)
            for j in range(chunk.shape[0]):
                rows = members[start + j]
                feats_out[..., rows] = out[j][..., rows]
        act_out = basis_out.reconstruct(feats_out)  # (batch, pos_out, d_out)
        return substitute(model, section.layer_out, lambda act: act_out.to(act.dtype), inputs, forward)

    return run


def _evaluate_features(section: Section, basis_out: LayerBasis, data: Data, feats_out: Sequence[torch.Tensor],
                       rest: AffineMap | None):
    """Accuracy and loss with ``section.layer_out``'s activation replaced by each batch's ``feats_out``
    (``rest``: the rest of the model as an affine map of those features, then no forward runs)."""
    def logits(inputs: Any, feats: torch.Tensor) -> Any:
        if rest is not None:
            return rest(feats)
        act_out = basis_out.reconstruct(feats)  # (batch, pos_out, d_out)
        return substitute(section.model, section.layer_out, lambda act: act_out.to(act.dtype), inputs, section.forward)

    return evaluate_logits((logits(inputs, feats), labels) for (inputs, labels), feats in zip(data, feats_out))


def _reuse_evaluator(section: Section, basis_in: LayerBasis, basis_out: LayerBasis, data: Data, max_rows: int):
    """``(at, cache)``: ``at(mask)`` evaluates the model with the edges outside ``mask`` ablated, running
    only the rows of the mask that ``cache`` lacks (none for an affine section)."""
    feats_in, dtype = layer_features(section, basis_in, data)
    first = data[0][0]
    stacked, affine = section_mode(section, basis_in, first, feats_in[0], basis_out.transform,
                                   probe_masks(basis_in.d_lib), max_rows)
    rest = Section(section.model, section.forward, section.layer_out, None)  # node layer l+1 -> the logits
    (act_out,) = capture(section.model, [section.layer_out], first, section.forward)
    feats_out = basis_out.transform(act_out)  # (batch, pos_out, k_out)
    _, rest_affine = section_mode(rest, basis_out, first, feats_out, identity, probe_masks(basis_out.d_lib), max_rows)
    batches = [(x, f) for (x, _), f in zip(data, feats_in)]
    sizes = [f.shape[0] for f in feats_in]
    cache = ColumnCache()

    def at(mask: torch.Tensor) -> Evaluation:
        if affine is not None:
            feats_out = [affine_columns(affine, f, mask) for f in feats_in]
        else:
            new_columns(section, stacked, basis_in, basis_out, batches, mask, cache, max_rows, dtype)
            feats_out = cache.columns(mask).split(sizes)
        return _evaluate_features(section, basis_out, data, feats_out, rest_affine)

    return at, cache


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
    max_rows: int = 2048,
    reuse: bool = True,
) -> EdgeAblation:
    """The fewest strongest edges of one section that keep accuracy within ``tolerance`` (LIB_SPEC.md §5).

    Edges are ranked by E; edges out of the constant node are always kept and not counted. With the k
    strongest kept, output feature i of node layer l+1 is read from the section run on
    (f̂ ⊙ m_i) C⁺, where m_i zeroes the input features whose edges to i are dropped; the assembled output
    features are mapped back through C^{l+1,+} and the rest of the model runs. The search evaluates
    k = 0, 1, 2, 4, ... until the accuracy reaches ``baseline - tolerance``, then bisects between the
    last two; it assumes accuracy grows with k.

    Node layer l is captured once. Row i's mask is fixed by how many of row i's edges are kept, so each
    output feature is computed once per such count and reused by later steps of the search
    (:mod:`lib_lightning.core.interpret.edge_columns`); the masks of one step share forwards of at most
    ``max_rows`` rows (examples x masks; layer l's value repeated once per mask along the batch). A probe
    on the first batch checks that sharing agrees with one forward per mask, falling back otherwise, and
    whether the section is affine in its input features (then every step is one contraction, no forward).

    Args:
        model: the model the graph was built on (eval mode, frozen, cast to ``dtype`` meanwhile).
        graph: bases and edges of every node layer.
        section: index l of the section from node layer l to l+1.
        data: held-out ``(inputs, labels)`` batches.
        tolerance: accuracy drop allowed, >= 0 (the reference: 0.001).
        ks: further numbers of edges to evaluate for the curve (clipped to the number of edges).
        dtype: precision of the evaluation.
        max_rows: memory budget, examples x masks per forward of the section, >= 1; 1 runs each distinct
            mask on its own, on whole batches, without the affine path. Results agree to float rounding
            (a stacked matmul or the affine contraction may sum in another order).
        reuse: False evaluates every k on its own, capturing layer l per k and running every distinct mask
            of that k (the path before the reuse, kept as the reference).

    Raises:
        ValueError: for a section out of range, a negative tolerance, ``max_rows`` < 1 or empty data.
    """
    data = check_data(data)
    if not 0 <= section < len(graph.edges):
        last = len(graph.edges) - 1
        raise ValueError(f"section must be in [0, {last}] for node layers {graph.layer_names}, got {section}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if not (isinstance(max_rows, int) and max_rows >= 1):
        raise ValueError(f"max_rows must be an int >= 1 (examples x masks per forward), got {max_rows!r}")
    basis_in, basis_out = graph.layers[section], graph.layers[section + 1]
    edges = graph.edges[section]
    skip = basis_in.has_constant
    n_edges = edges.shape[0] * (edges.shape[1] - (1 if skip else 0))
    part = Section(model, forward, NodeLayer.parse(basis_in.name), NodeLayer.parse(basis_out.name))
    data = [(prepare_inputs(inputs, dtype), labels) for inputs, labels in data]
    if not data:
        raise ValueError("the evaluation data is empty: no batch was given")
    results: dict[int, Evaluation] = {}
    rows, cols = _candidates(edges, skip)  # the ranking, sorted once

    def mask_at(k: int) -> torch.Tensor:
        return _ranked_mask(edges, rows, cols, k, skip)

    with torch.no_grad(), analysis_mode(model, dtype):
        baseline = evaluate(lambda inputs: forward(model, inputs), data)
        target = baseline.accuracy - tolerance
        if reuse:
            evaluate_mask, cache = _reuse_evaluator(part, basis_in, basis_out, data, max_rows)
        else:
            cache = None
            probe = torch.stack([mask_at(n_edges)[0], mask_at(0)[0]])  # all, constant
            (act,) = capture(model, [part.layer_in], data[0][0], forward)
            masked = basis_in.transform(act).unsqueeze(0) * probe[:, None, None, :]
            stacked = max_rows > 1 and stacking_holds(part, data[0][0], basis_in.reconstruct(masked), act.shape[0])

            def evaluate_mask(mask: torch.Tensor) -> Evaluation:
                return evaluate(_edge_run(part, stacked, basis_in, basis_out, mask, max_rows), data)

        def at(k: int) -> Evaluation:
            if k not in results:
                results[k] = evaluate_mask(mask_at(k))
            return results[k]

        lo, hi = -1, 0  # at(lo) fails (-1: nothing evaluated yet), at(hi) is the candidate
        while hi < n_edges and at(hi).accuracy < target:
            lo, hi = hi, min(n_edges, max(1, 2 * hi))
            if cache is not None:  # later steps lie above lo
                cache.keep_between(mask_at(max(lo, 0)), mask_at(n_edges))
        reached = at(hi).accuracy >= target
        if reached:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if at(mid).accuracy >= target:
                    hi = mid
                else:
                    lo = mid
                if cache is not None:  # later steps lie between lo and hi
                    cache.keep_between(mask_at(max(lo, 0)), mask_at(hi))
        for k in ks:
            at(min(max(int(k), 0), n_edges))
    cutoff = float(edges[rows[hi - 1], cols[hi - 1]]) if hi > 0 else 0.0
    order = sorted(results)
    return EdgeAblation(
        f"{basis_in.name}->{basis_out.name}", graph.kind, n_edges, hi, bool(reached), float(tolerance),
        torch.tensor(order), torch.tensor([results[k].accuracy for k in order], dtype=torch.float64),
        torch.tensor([results[k].loss for k in order], dtype=torch.float64),
        baseline.accuracy, baseline.loss, cutoff,
    )
