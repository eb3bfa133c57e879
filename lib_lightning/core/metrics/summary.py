"""From interaction graphs to the scalars a researcher follows over training (pure, no Lightning).

``summarise`` turns the graphs of one analysis into a flat dict of namespaced scalars
(``lib/<layer>/...``, ``pca/<layer>/...``, ``edges/<a>-><b>/...``, ``graph/...``) plus the state needed
to measure, at the next analysis, how far the basis and the communities moved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import torch

from lib_lightning.core.lib.basis import LayerBasis
from lib_lightning.core.lib.graph import InteractionGraph
from lib_lightning.core.metrics.degeneracy import gradient_degeneracy, gram_rank_deficit, spectrum_stats
from lib_lightning.core.metrics.evolution import community_stability, match_features, spectrum_distance, subspace_overlap
from lib_lightning.core.metrics.modularity import Communities, find_communities, interaction_graph
from lib_lightning.core.metrics.sparsity import edge_sparsity

__all__ = ["SummaryOptions", "Snapshot", "Summary", "summarise", "short_names", "spectrum"]


@dataclass(frozen=True)
class SummaryOptions:
    """Thresholds and switches of :func:`summarise`.

    Attributes:
        abs_threshold, rel_threshold: for the kept-dimension counts (``dim_abs``, ``dim_rel``).
        fractions: edge-weight fractions for the sparsity counts.
        sparsity, modularity, evolution: turn each part on or off.
        weighting, log_cutoff_fraction, method, resolution, seed: modularity settings
            (see :func:`lib_lightning.core.metrics.modularity.interaction_graph` and ``find_communities``).
        overlap_k: number of leading features whose subspace overlap is tracked.
    """

    abs_threshold: float = 1e-10
    rel_threshold: float = 1e-3
    fractions: tuple[float, ...] = (0.9, 0.99)
    sparsity: bool = True
    modularity: bool = True
    evolution: bool = True
    weighting: str = "log"
    log_cutoff_fraction: float = 0.99
    method: str = "louvain"
    resolution: float = 1.0
    seed: int = 0
    overlap_k: int = 10


@dataclass(frozen=True)
class Snapshot:
    """What the next analysis compares against: feature directions, Λ spectra and communities.

    ``constant[name]`` says whether feature 0 of that layer is the constant direction (absent: true,
    as every snapshot written before the flag existed was centred).
    """

    directions: dict[str, torch.Tensor]
    lambdas: dict[str, torch.Tensor]
    membership: dict[str, torch.Tensor] = field(default_factory=dict)
    constant: dict[str, bool] = field(default_factory=dict)

    def to_state(self) -> dict:
        return {"directions": self.directions, "lambdas": self.lambdas, "membership": self.membership,
                "constant": self.constant}

    @classmethod
    def from_state(cls, state: Mapping) -> Snapshot:
        return cls(dict(state["directions"]), dict(state["lambdas"]), dict(state.get("membership", {})),
                   dict(state.get("constant", {})))


@dataclass(frozen=True)
class Summary:
    """One analysis: ``metrics`` (tag -> float), the LIB graph's communities, a snapshot, and ``errors``
    (metric name -> message) of the metrics skipped by a non-strict :func:`summarise`."""

    metrics: dict[str, float]
    communities: Communities | None
    graph: nx.Graph | None
    snapshot: Snapshot
    errors: dict[str, str] = field(default_factory=dict)


def short_names(names: Sequence[str]) -> list[str]:
    """Node-layer names without their common dotted prefix (``model.hook_resid_pre`` -> ``hook_resid_pre``)."""
    if len(names) < 2:
        return list(names)
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [".".join(p[common:]) for p in parts]


def spectrum(layer: LayerBasis) -> torch.Tensor:
    """A layer's Λ (or PCA variances) without the constant direction."""
    return layer.lambdas[1:] if layer.has_constant else layer.lambdas


def _modularity_layers(graph: InteractionGraph) -> tuple[list[torch.Tensor], list[int]]:
    """Edges and layer indices of the modularity graph: every layer but an unrotated final one (the
    logits, the spec's output node layer), centred or not."""
    keep = [i for i, layer in enumerate(graph.layers) if layer.kind != "identity"]
    edges = [graph.edges[i] for i in keep if i + 1 in keep]
    return edges, keep


def _nodes(membership: Mapping[str, torch.Tensor]) -> dict[tuple[str, int], int]:
    """Per-layer community labels (-1: not in the graph) -> node -> community."""
    return {(name, f): int(c) for name, labels in membership.items() for f, c in enumerate(labels.tolist()) if c >= 0}


class _Guard:
    """Runs each metric on its own: strict, an error propagates; otherwise it is recorded under the
    metric's name and the other metrics go on (a metric must never abort training)."""

    def __init__(self, strict: bool) -> None:
        self.strict, self.errors = strict, {}

    def __call__(self, name: str, compute: Callable[[], None]) -> None:
        if self.strict:
            compute()
            return
        try:
            compute()
        except Exception as err:  # noqa: BLE001 -- recorded with its type and message, reported by the caller
            self.errors[name] = f"{type(err).__name__}: {err}"


def _layer_metrics(kind: str, name: str, layer: LayerBasis, options: SummaryOptions) -> dict[str, float]:
    """Spectrum summaries of one layer; for LIB also the rank deficit and the gradient degeneracy."""
    stats = spectrum_stats(spectrum(layer), abs_threshold=options.abs_threshold, rel_threshold=options.rel_threshold)
    prefix = f"{kind}/{name}"
    out = {
        f"{prefix}/dim_abs": stats.kept_abs, f"{prefix}/dim_rel": stats.kept_rel,
        f"{prefix}/participation_ratio": stats.participation_ratio, f"{prefix}/effective_rank": stats.effective_rank,
        f"{prefix}/n90": stats.n_90, f"{prefix}/n99": stats.n_99,
    }
    if kind == "lib":
        variances = layer.pca_eigenvalues[1:] if layer.has_constant else layer.pca_eigenvalues
        out[f"{prefix}/gram_rank_deficit"] = gram_rank_deficit(variances, options.abs_threshold)
        out[f"{prefix}/grad_degenerate_rel"] = gradient_degeneracy(variances, spectrum(layer), options.rel_threshold).n
    return out


def _sparsity_metrics(
    tag: str, kind: str, graph: InteractionGraph, sec: int, options: SummaryOptions
) -> dict[str, float]:
    """Edge concentration of one section, leaving out the constant row and column where there is one."""
    constant = (graph.layers[sec + 1].has_constant, graph.layers[sec].has_constant)
    stats = edge_sparsity(graph.edges[sec], exclude_constant=constant, fractions=options.fractions).to_dict()
    keys = ("n_90", "n_99", "frac_90", "frac_99", "gini")
    return {f"{tag}/{kind}_{key.replace('_', '')}": stats[key] for key in keys if key in stats}


def _communities(lib: InteractionGraph, names: list[str], options: SummaryOptions):
    """The modularity graph of the LIB features, its communities, their scalars and per-layer labels."""
    edges, keep = _modularity_layers(lib)
    if not edges:
        return None, None, {}, {}
    nx_graph = interaction_graph(
        edges, [names[i] for i in keep], weighting=options.weighting, log_cutoff_fraction=options.log_cutoff_fraction,
        exclude_constant=[lib.layers[i].has_constant for i in keep],
    )
    communities = find_communities(nx_graph, method=options.method, resolution=options.resolution, seed=options.seed)
    metrics = {
        "graph/modularity": communities.modularity, "graph/n_communities": communities.n_nonsingleton,
        "graph/largest_community": communities.sizes[0] if communities.sizes else 0,
        "graph/n_edges": nx_graph.number_of_edges(),
    }
    membership = {}
    for i in keep:
        labels = torch.full((lib.layers[i].d_lib,), -1, dtype=torch.long)
        for (layer_name, feature), c in communities.membership.items():
            if layer_name == names[i]:
                labels[feature] = c
        membership[names[i]] = labels
    return communities, nx_graph, metrics, membership


def _snapshot(tracked: InteractionGraph, names: list[str], membership: dict[str, torch.Tensor]) -> Snapshot:
    own = [(n, layer) for n, layer in zip(names, tracked.layers) if layer.kind == tracked.kind]
    return Snapshot(
        directions={n: layer.directions() for n, layer in own},
        lambdas={n: spectrum(layer) for n, layer in own},
        membership=membership,
        constant={n: layer.has_constant for n, layer in own},
    )


def _evolution_metrics(
    kind: str, name: str, now: Snapshot, previous: Snapshot, options: SummaryOptions
) -> dict[str, float]:
    """Subspace overlap of the top non-constant features and the spectrum change of one layer."""
    dirs, prev = now.directions[name], previous.directions[name]
    # compare the non-constant features (an uncentred layer's feature 0 is a real one)
    start, prev_start = int(now.constant[name]), int(previous.constant.get(name, True))
    k = min(options.overlap_k, dirs.shape[0] - start, prev.shape[0] - prev_start)
    out = {f"{kind}/{name}/spectrum_change": spectrum_distance(previous.lambdas[name], now.lambdas[name])}
    if k > 0:
        out[f"{kind}/{name}/subspace_overlap"] = subspace_overlap(prev[prev_start:], dirs[start:], k)
    return out


def summarise(
    graphs: Mapping[str, InteractionGraph],
    options: SummaryOptions = SummaryOptions(),
    previous: Snapshot | None = None,
    *,
    strict: bool = True,
) -> Summary:
    """Degeneracy, sparsity, modularity and basis-evolution scalars of one analysis.

    Args:
        graphs: kind -> graph, as returned by :func:`lib_lightning.core.lib.build_graphs`.
        options: thresholds and switches.
        previous: the snapshot of the previous analysis, for the evolution metrics.
        strict: raise on the first failing metric; if false, skip it and record ``Summary.errors`` (metric
            name -> message), the others are still computed (what a training callback wants).
    """
    metrics: dict[str, float] = {}
    guard = _Guard(strict)
    any_graph = next(iter(graphs.values()))
    names = short_names(any_graph.layer_names)
    for kind, graph in graphs.items():
        for name, layer in zip(names, graph.layers):
            if layer.kind == kind:  # not an unrotated final layer, nor the PCA-rotated final layer of a LIB graph
                guard(f"{kind}/{name}", lambda: metrics.update(_layer_metrics(kind, name, layer, options)))

    if options.sparsity:
        for sec in range(len(names) - 1):
            tag = f"edges/{names[sec]}->{names[sec + 1]}"
            for kind, graph in graphs.items():
                guard(f"{tag}/{kind}", lambda: metrics.update(_sparsity_metrics(tag, kind, graph, sec, options)))
            if "lib" in graphs and "pca" in graphs and metrics.get(f"{tag}/pca_n99") and f"{tag}/lib_n99" in metrics:
                metrics[f"{tag}/lib_pca_ratio_n99"] = metrics[f"{tag}/lib_n99"] / metrics[f"{tag}/pca_n99"]

    found: list = [None, None, {}]  # communities, networkx graph, membership
    if options.modularity and "lib" in graphs:

        def modularity() -> None:
            communities, nx_graph, scalars, membership = _communities(graphs["lib"], names, options)
            found[:] = [communities, nx_graph, membership]
            metrics.update(scalars)

        guard("graph/modularity", modularity)
    communities, nx_graph, membership = found

    tracked = graphs.get("lib", any_graph)  # the basis whose evolution is followed, logged under its kind
    snapshot = _snapshot(tracked, names, membership)
    if options.evolution and previous is not None:
        feature_maps = {}

        def evolve(name: str) -> None:
            metrics.update(_evolution_metrics(tracked.kind, name, snapshot, previous, options))
            feature_maps[name] = match_features(previous.directions[name], snapshot.directions[name])

        for name in snapshot.directions:
            if name in previous.directions:
                guard(f"{tracked.kind}/{name}/evolution", lambda: evolve(name))
        if membership and previous.membership:

            def stability() -> None:
                ari = community_stability(_nodes(previous.membership), _nodes(membership), feature_maps)
                if ari == ari:  # NaN when no feature could be matched
                    metrics["graph/community_ari"] = ari

            guard("graph/community_ari", stability)
    return Summary({k: float(v) for k, v in metrics.items()}, communities, nx_graph, snapshot, guard.errors)
