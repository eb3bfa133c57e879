"""The interaction graph of LIB features and its communities (LIB_SPEC.md §6).

Nodes are the non-constant features of every node layer; an undirected edge joins features of
consecutive layers with a weight derived from the squared edges E. Communities come from networkx's
Louvain method; the score is Newman's weighted modularity at resolution 1, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import networkx as nx
import torch

from lib_lightning.core.metrics.sparsity import n_to_hold_sorted, sorted_descending
from lib_lightning.core.validation import check_fraction, check_weights

__all__ = ["Communities", "METHODS", "WEIGHTINGS", "find_communities", "interaction_graph", "log_cutoff",
           "newman_modularity"]

WEIGHTINGS = ("log", "sqrt", "normalized")
METHODS = ("louvain", "leiden")


def log_cutoff(edges: torch.Tensor, fraction: float) -> float:
    """ε for the log weighting: the smallest edge among the strongest edges holding ``fraction`` of ΣE.

    A threshold-free stand-in for the reference's ε_l, the smallest edge kept by an accuracy-bisected
    edge ablation (LIB_SPEC.md §5-6), which needs held-out evaluations this module does not run.

    Args:
        edges: non-negative edge weights of one section, any shape (constant node already dropped).
        fraction: in (0, 1].

    Returns:
        ε, or 0.0 if the section has no weight.
    """
    check_fraction(fraction)
    descending = sorted_descending(check_weights(edges.reshape(-1), "edges", ndim=1))  # one sort for n and ε
    (n,) = n_to_hold_sorted(descending, (fraction,))
    return float(descending[n - 1]) if n else 0.0


def interaction_graph(
    edges: Sequence[torch.Tensor],
    layer_names: Sequence[str],
    *,
    weighting: str = "log",
    log_cutoff_fraction: float = 0.99,
    cutoffs: Sequence[float] | None = None,
    exclude_constant: bool | Sequence[bool] = True,
) -> nx.Graph:
    """An undirected weighted graph of features joined by their interaction strength.

    Weights per section l (E = edges[l] without the constant node):
    ``"log"``: w = max(0, log10(E/ε_l)), edges with w = 0 left out; ``"sqrt"``: w = √E, exact zeros left
    out; ``"normalized"``: w = E/ΣE, exact zeros left out.

    Args:
        edges: ``L`` tensors, ``edges[l]`` of shape ``(k_{l+1}, k_l)``: rows are layer l+1's features,
            columns layer l's; index 0 is the constant direction.
        layer_names: ``L + 1`` distinct node-layer names.
        weighting: one of :data:`WEIGHTINGS`.
        log_cutoff_fraction: for ``"log"``, ε_l = :func:`log_cutoff` of the section at this fraction.
        cutoffs: for ``"log"``, ``L`` explicit positive ε_l (e.g. from an ablation) overriding
            ``log_cutoff_fraction``.
        exclude_constant: leave out feature 0 and every edge touching it: of every layer (``True``), or
            per layer (``L + 1`` bools, e.g. each ``LayerBasis.has_constant``: an uncentred layer's
            feature 0 is a real feature).

    Returns:
        A ``networkx.Graph`` with nodes ``(layer_name, feature_index)`` (every non-constant feature, edge
        or not) carrying ``layer``, ``layer_index`` and ``feature``; edges carrying ``weight`` and the raw
        edge value ``raw``. ``graph.graph`` holds ``weighting`` and, for ``"log"``, ``cutoffs``.

    Raises:
        ValueError: for an unknown weighting (listing the choices), a wrong number of names or cutoffs,
            duplicate names, non-2-D or negative edges, or consecutive shapes that disagree (naming the
            layers).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    edges, layer_names = list(edges), list(layer_names)
    if len(layer_names) != len(edges) + 1:
        raise ValueError(
            f"need one more layer name than edge matrices, got {len(layer_names)} names for {len(edges)} sections"
        )
    if len(set(layer_names)) != len(layer_names):
        raise ValueError(f"layer_names must be distinct, got {layer_names}")
    if weighting == "log" and cutoffs is None:
        check_fraction(log_cutoff_fraction)
    if cutoffs is not None:
        cutoffs = [float(c) for c in cutoffs]
        if len(cutoffs) != len(edges) or not all(c > 0 for c in cutoffs):
            raise ValueError(f"cutoffs must be {len(edges)} positive numbers, one per section, got {cutoffs}")
    sizes = _layer_sizes(edges, layer_names)
    firsts = _first_features(exclude_constant, layer_names)

    graph = nx.Graph(weighting=weighting)
    for index, (name, size) in enumerate(zip(layer_names, sizes)):
        attributes = ({"layer": name, "layer_index": index, "feature": f} for f in range(firsts[index], size))
        graph.add_nodes_from(((name, a["feature"]), a) for a in attributes)
    used_cutoffs = []
    for index, section in enumerate(edges):
        first_in, first_out = firsts[index], firsts[index + 1]
        raw = section.detach().to(torch.float64).cpu()[first_out:, first_in:]  # (k_out - first_out, k_in - first_in)
        if weighting == "log":
            eps = cutoffs[index] if cutoffs is not None else log_cutoff(raw, log_cutoff_fraction)
            used_cutoffs.append(eps)
            weight = torch.log10(raw / eps).clamp(min=0) if eps > 0 else torch.zeros_like(raw)
        elif weighting == "sqrt":
            weight = raw.sqrt()
        else:
            total = raw.sum()
            weight = raw / total if total > 0 else torch.zeros_like(raw)
        out_name, in_name = layer_names[index + 1], layer_names[index]
        for i, j in torch.nonzero(weight > 0).tolist():
            graph.add_edge(
                (in_name, j + first_in), (out_name, i + first_out), weight=float(weight[i, j]), raw=float(raw[i, j])
            )
    if weighting == "log":
        graph.graph["cutoffs"] = tuple(used_cutoffs)
    return graph


def _first_features(exclude_constant: bool | Sequence[bool], layer_names: list[str]) -> list[int]:
    """Index of each layer's first graph node: 1 where feature 0 is a constant left out, else 0."""
    if isinstance(exclude_constant, bool):
        return [int(exclude_constant)] * len(layer_names)
    flags = list(exclude_constant)
    if len(flags) != len(layer_names) or not all(isinstance(f, bool) for f in flags):
        raise ValueError(f"exclude_constant must be a bool or {len(layer_names)} bools (one per layer), got {flags}")
    return [int(f) for f in flags]


def _layer_sizes(edges: list[torch.Tensor], layer_names: list[str]) -> list[int]:
    """Feature counts per node layer, checking that consecutive edge matrices agree."""
    for index, section in enumerate(edges):
        check_weights(section, f"edges[{index}] ({layer_names[index]} -> {layer_names[index + 1]})", ndim=2)
    sizes = [edges[0].shape[1], *(section.shape[0] for section in edges)] if edges else []
    for index in range(1, len(edges)):
        if edges[index].shape[1] != edges[index - 1].shape[0]:
            raise ValueError(
                f"node layer {layer_names[index]!r} has {edges[index - 1].shape[0]} features as the output of "
                f"edges[{index - 1}] ({layer_names[index - 1]} -> {layer_names[index]}, shape "
                f"{tuple(edges[index - 1].shape)}) but {edges[index].shape[1]} as the input of edges[{index}] "
                f"({layer_names[index]} -> {layer_names[index + 1]}, shape {tuple(edges[index].shape)})"
            )
    return sizes


@dataclass(frozen=True)
class Communities:
    """A partition of the interaction graph.

    Attributes:
        modularity: Newman's weighted modularity Q at resolution 1 (0 for a graph without edges).
        communities: the communities as frozensets of nodes, largest first (ties: earliest node first).
        sizes: ``(n_communities,)`` their sizes.
        n_nonsingleton: communities with at least two nodes.
        membership: node -> index into ``communities``.
    """

    modularity: float
    communities: tuple[frozenset, ...]
    sizes: tuple[int, ...]
    n_nonsingleton: int
    membership: dict[Hashable, int]

    def to_dict(self) -> dict:
        """Scalars plus ``sizes`` and the communities as lists of nodes (tuples become lists)."""
        return {
            "modularity": self.modularity,
            "n_communities": len(self.communities),
            "n_nonsingleton": self.n_nonsingleton,
            "sizes": list(self.sizes),
            "communities": [
                [list(node) if isinstance(node, tuple) else node for node in _in_graph_order(c, self.membership)]
                for c in self.communities
            ],
        }


def find_communities(
    graph: nx.Graph, *, method: str = "louvain", resolution: float = 1.0, seed: int = 0
) -> Communities:
    """Cluster the graph and score the partition.

    Q = Σ_c [W_in(c)/W − (vol(c)/2W)²] (:func:`newman_modularity`: networkx's ``modularity`` with
    ``weight="weight"``, γ = 1, whatever ``resolution`` the clustering used, summed in the graph's order).

    Args:
        graph: an undirected graph with ``weight`` edge attributes (see :func:`interaction_graph`).
        method: ``"louvain"`` (networkx's ``louvain_communities``) or ``"leiden"`` (networkx's
            ``leiden_communities``, which needs a backend that implements it; plain networkx has none).
        resolution: γ > 0 for the clustering; higher gives more, smaller communities.
        seed: seed of the clustering's node order.

    Returns:
        :class:`Communities`. A graph without edges gives Q = 0 and every node in its own community.

    Raises:
        ValueError: for an unknown method or a non-positive resolution.
        RuntimeError: for ``"leiden"`` when no installed networkx backend implements it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not resolution > 0:
        raise ValueError(f"resolution must be > 0, got {resolution}")
    if graph.is_directed():
        raise ValueError("graph must be undirected (networkx.Graph)")
    if graph.number_of_edges() == 0:
        parts = [frozenset([node]) for node in graph.nodes]
        q = 0.0
    else:
        if method == "louvain":
            parts = nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
        else:
            try:
                parts = nx.community.leiden_communities(graph, weight="weight", resolution=resolution, seed=seed)
            except NotImplementedError as err:
                raise RuntimeError(
                    f"method='leiden' needs a networkx backend implementing leiden_communities; networkx "
                    f"{nx.__version__} alone has none ({err}). Use method='louvain', or install such a backend."
                ) from err
        q = newman_modularity(graph, parts)
    position = {node: i for i, node in enumerate(graph.nodes)}
    ordered = sorted((frozenset(p) for p in parts), key=lambda c: (-len(c), min(position[n] for n in c)))
    index_of = {node: index for index, c in enumerate(ordered) for node in c}
    membership = {node: index_of[node] for node in graph.nodes}  # graph order: reproducible iteration
    return Communities(
        modularity=q,
        communities=tuple(ordered),
        sizes=tuple(len(c) for c in ordered),
        n_nonsingleton=sum(len(c) >= 2 for c in ordered),
        membership=membership,
    )


def newman_modularity(graph: nx.Graph, parts) -> float:
    """Q = Σ_c [W_in(c)/W − (vol(c)/2W)²] of a partition ``parts`` (sets of nodes) of an undirected graph
    with ``weight`` edge attributes (default 1): networkx's ``modularity(graph, parts, weight="weight",
    resolution=1)``, summed over the edges in the graph's own order. networkx sums each community over a
    set of its nodes, whose order follows the hash of the node names (a tuple holding a string here), so
    its last bits changed with PYTHONHASHSEED from one process to the next; these do not (tested against
    networkx to 1e-12 and across hash seeds). A self-loop counts once in W_in(c) and twice in vol(c), as
    in networkx."""
    community = {node: c for c, part in enumerate(parts) for node in part}
    inside, volume, total = [0.0] * len(parts), [0.0] * len(parts), 0.0
    for u, v, w in graph.edges(data="weight", default=1):
        cu, cv = community[u], community[v]
        total += w
        volume[cu] += w
        volume[cv] += w
        if cu == cv:
            inside[cu] += w
    if total == 0:
        return 0.0
    return sum(w_in / total - (vol / (2 * total)) ** 2 for w_in, vol in zip(inside, volume))


def _in_graph_order(community: frozenset, membership: dict) -> list:
    """A community's nodes in graph order (``membership``'s order), not the hash order of a frozenset."""
    return [node for node in membership if node in community]
