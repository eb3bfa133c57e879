"""From interaction graphs to the scalars a researcher follows over training (pure, no Lightning).

``summarise`` turns the graphs of one analysis into a flat dict of namespaced scalars
(``lib/<layer>/...``, ``pca/<layer>/...``, ``edges/<a>-><b>/...``, ``graph/...``) plus the state needed
to measure, at the next analysis, how far the basis and the communities moved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import torch

from lib_lightning.core.basis import LayerBasis
from lib_lightning.core.degeneracy import gradient_degeneracy, gram_rank_deficit, spectrum_stats
from lib_lightning.core.evolution import community_stability, match_features, spectrum_distance, subspace_overlap
from lib_lightning.core.graph import InteractionGraph
from lib_lightning.core.modularity import Communities, find_communities, interaction_graph
from lib_lightning.core.sparsity import edge_sparsity

__all__ = ["SummaryOptions", "Snapshot", "Summary", "summarise", "short_names", "spectrum"]


@dataclass(frozen=True)
class SummaryOptions:
    """Thresholds and switches of :func:`summarise`.

    Attributes:
        abs_threshold, rel_threshold: for the kept-dimension counts (``dim_abs``, ``dim_rel``).
        fractions: edge-weight fractions for the sparsity counts.
        sparsity, modularity, evolution: turn each part on or off.
        weighting, log_cutoff_fraction, method, resolution, seed: modularity settings
            (see :func:`lib_lightning.core.modularity.interaction_graph` and ``find_communities``).
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
    """One analysis: ``metrics`` (tag -> float), the LIB graph's communities and a snapshot."""

    metrics: dict[str, float]
    communities: Communities | None
    graph: nx.Graph | None
    snapshot: Snapshot


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


def summarise(
    graphs: Mapping[str, InteractionGraph], options: SummaryOptions = SummaryOptions(), previous: Snapshot | None = None
) -> Summary:
    """Degeneracy, sparsity, modularity and basis-evolution scalars of one analysis.

    Args:
        graphs: kind -> graph, as returned by :func:`lib_lightning.core.lib.build_graphs`.
        options: thresholds and switches.
        previous: the snapshot of the previous analysis, for the evolution metrics.
    """
    metrics: dict[str, float] = {}
    any_graph = next(iter(graphs.values()))
    names = short_names(any_graph.layer_names)
    for kind, graph in graphs.items():
        for name, layer in zip(names, graph.layers):
            if layer.kind != kind:  # an unrotated final layer, or the PCA-rotated final layer of a LIB graph
                continue
            stats = spectrum_stats(spectrum(layer), abs_threshold=options.abs_threshold, rel_threshold=options.rel_threshold)
            prefix = f"{kind}/{name}"
            metrics[f"{prefix}/dim_abs"] = stats.kept_abs
            metrics[f"{prefix}/dim_rel"] = stats.kept_rel
            metrics[f"{prefix}/participation_ratio"] = stats.participation_ratio
            metrics[f"{prefix}/effective_rank"] = stats.effective_rank
            metrics[f"{prefix}/n90"] = stats.n_90
            metrics[f"{prefix}/n99"] = stats.n_99
            if kind == "lib":
                variances = layer.pca_eigenvalues[1:] if layer.has_constant else layer.pca_eigenvalues
                metrics[f"{prefix}/gram_rank_deficit"] = gram_rank_deficit(variances, options.abs_threshold)
                grad = gradient_degeneracy(variances, spectrum(layer), options.rel_threshold)
                metrics[f"{prefix}/grad_degenerate_rel"] = grad.n

    if options.sparsity:
        for sec in range(len(names) - 1):
            tag = f"edges/{names[sec]}->{names[sec + 1]}"
            for kind, graph in graphs.items():
                constant = (graph.layers[sec + 1].has_constant, graph.layers[sec].has_constant)
                stats = edge_sparsity(graph.edges[sec], exclude_constant=constant, fractions=options.fractions).to_dict()
                for key in ("n_90", "n_99", "frac_90", "frac_99", "gini"):
                    if key in stats:
                        metrics[f"{tag}/{kind}_{key.replace('_', '')}"] = stats[key]
            if "lib" in graphs and "pca" in graphs and metrics.get(f"{tag}/pca_n99"):
                metrics[f"{tag}/lib_pca_ratio_n99"] = metrics[f"{tag}/lib_n99"] / metrics[f"{tag}/pca_n99"]

    communities, nx_graph, membership = None, None, {}
    if options.modularity and "lib" in graphs:
        lib = graphs["lib"]
        edges, keep = _modularity_layers(lib)
        if edges:
            nx_graph = interaction_graph(
                edges, [names[i] for i in keep], weighting=options.weighting,
                log_cutoff_fraction=options.log_cutoff_fraction,
                exclude_constant=[lib.layers[i].has_constant for i in keep],
            )
            communities = find_communities(nx_graph, method=options.method, resolution=options.resolution, seed=options.seed)
            metrics["graph/modularity"] = communities.modularity
            metrics["graph/n_communities"] = communities.n_nonsingleton
            metrics["graph/largest_community"] = communities.sizes[0] if communities.sizes else 0
            metrics["graph/n_edges"] = nx_graph.number_of_edges()
            for i in keep:
                labels = torch.full((lib.layers[i].d_lib,), -1, dtype=torch.long)
                for (layer_name, feature), c in communities.membership.items():
                    if layer_name == names[i]:
                        labels[feature] = c
                membership[names[i]] = labels

    tracked = graphs.get("lib", any_graph)  # the basis whose evolution is followed, logged under its kind
    own = [(n, layer) for n, layer in zip(names, tracked.layers) if layer.kind == tracked.kind]
    snapshot = Snapshot(
        directions={n: layer.directions() for n, layer in own},
        lambdas={n: spectrum(layer) for n, layer in own},
        membership=membership,
        constant={n: layer.has_constant for n, layer in own},
    )
    if options.evolution and previous is not None:
        feature_maps = {}
        for name, dirs in snapshot.directions.items():
            if name not in previous.directions:
                continue
            prev = previous.directions[name]
            # compare the non-constant features (an uncentred layer's feature 0 is a real one)
            start, prev_start = int(snapshot.constant[name]), int(previous.constant.get(name, True))
            k = min(options.overlap_k, dirs.shape[0] - start, prev.shape[0] - prev_start)
            if k > 0:
                metrics[f"{tracked.kind}/{name}/subspace_overlap"] = subspace_overlap(prev[prev_start:], dirs[start:], k)
            metrics[f"{tracked.kind}/{name}/spectrum_change"] = spectrum_distance(previous.lambdas[name], snapshot.lambdas[name])
            feature_maps[name] = match_features(prev, dirs)
        if membership and previous.membership:
            ari = community_stability(_nodes(previous.membership), _nodes(membership), feature_maps)
            if ari == ari:  # NaN when no feature could be matched
                metrics["graph/community_ari"] = ari
    return Summary({k: float(v) for k, v in metrics.items()}, communities, nx_graph, snapshot)
