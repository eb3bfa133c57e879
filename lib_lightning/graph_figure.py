"""The layered interaction-graph figure: features in columns by node layer, grouped by community.

One function serves ``analyze`` (``graph.png``) and the LIB callback's TensorBoard image. Built on
matplotlib's Agg canvas directly (no pyplot), as every figure of :mod:`lib_lightning.plotting`.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import networkx as nx
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lib_lightning.core.metrics.modularity import Communities

__all__ = ["plot_interaction_graph"]

_GREY = (0.7, 0.7, 0.7, 1.0)


def plot_interaction_graph(
    graph: nx.Graph,
    communities: Communities | Mapping[Hashable, int] | None = None,
    layer_order: Sequence[str] | None = None,
    max_nodes_per_layer: int = 40,
    labels: Mapping[Hashable, str] | None = None,
    min_weight: float = 0.0,
    community_labels: Mapping[int, str] | None = None,
    title: str = "",
) -> Figure:
    """Features in columns by node layer (left to right), grouped by community, edges by weight.

    Only features that carry an edge of weight above ``min_weight`` are drawn, at most
    ``max_nodes_per_layer`` per layer (the lowest feature indices: the most important in a LIB or PCA
    basis); lines below each column count the rest. Within a column, features are ordered by community
    (largest community first, each block separated by a gap, then features in no community), and by
    feature index inside a community. Nodes and the edges inside a community take its colour, weak edges
    fade, and a legend names the communities.

    Args:
        graph: an interaction graph (see ``interaction_graph``): nodes with ``layer`` and ``feature``
            attributes (else nodes ``(layer, feature)``), edges with ``weight``.
        communities: a :class:`Communities` or node -> community id (a lower id for a larger community);
            communities with >= 2 members get a colour, singletons and unassigned nodes grey.
        layer_order: node layers left to right; default by the ``layer_index`` attribute, else first
            appearance.
        max_nodes_per_layer: draw at most this many features per layer; >= 1.
        labels: optional node -> text drawn beside the node.
        min_weight: the plotted threshold: edges of weight <= ``min_weight`` are not drawn.
        community_labels: optional community id -> legend text (default: its size).
        title: figure title.

    Raises:
        ValueError: for ``max_nodes_per_layer < 1``, a negative ``min_weight`` or a ``layer_order``
            naming unknown layers (listing the available ones).
    """
    if isinstance(max_nodes_per_layer, bool) or not isinstance(max_nodes_per_layer, int) or max_nodes_per_layer < 1:
        raise ValueError(f"max_nodes_per_layer must be an int >= 1, got {max_nodes_per_layer!r}")
    if not min_weight >= 0:
        raise ValueError(f"min_weight must be >= 0, got {min_weight!r}")
    by_layer, layer_order = _layers(graph, layer_order)
    membership = communities.membership if isinstance(communities, Communities) else dict(communities or {})
    grouped = _grouped(membership)
    edges = [(u, v, w) for u, v, w in graph.edges(data="weight", default=1.0) if w > min_weight]
    carrying = {n for u, v, _ in edges for n in (u, v)}
    position, notes = {}, {}
    for column, layer in enumerate(layer_order):
        with_edges = [node for _, node in sorted(by_layer[layer], key=lambda pair: pair[0]) if node in carrying]
        shown = with_edges[:max_nodes_per_layer]  # the most important (lowest-index) features that carry edges
        shown.sort(key=lambda node: grouped.get(membership.get(node), len(grouped)))  # stable: feature order kept
        notes[layer] = _hidden_note(len(with_edges) - len(shown), len(by_layer[layer]) - len(with_edges),
                                    max_nodes_per_layer, min_weight)
        y, block = 0.0, None
        for node in shown:
            key = grouped.get(membership.get(node))
            if block is not None and key != block:
                y -= 0.8  # a gap between community blocks
            block = key
            position[node] = (float(column), y)
            y -= 1.0
    ys = [y for _, y in position.values()] or [0.0]
    fig = Figure(figsize=(2.5 + 2.2 * len(layer_order), 2.2 + 0.15 * (1.0 - min(ys))), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_axis_off()
    _draw_edges(ax, [(u, v, w) for u, v, w in edges if u in position and v in position], position, membership, grouped)
    nodes = list(position)
    if nodes:
        xy = np.array([position[n] for n in nodes])
        ax.scatter(xy[:, 0], xy[:, 1], c=_node_colours(nodes, membership), s=25, edgecolors="black", linewidths=0.3, zorder=2)
    bottom = min(ys) - 1.0
    for column, layer in enumerate(layer_order):
        ax.text(column, 0.7, layer, ha="center", va="bottom", fontsize="small")
        if notes[layer]:
            ax.text(column, bottom, notes[layer], ha="center", va="top", fontsize="x-small", color="0.4")
    for node, text in (labels or {}).items():
        if node in position:
            x, y = position[node]
            ax.text(x + 0.06, y, str(text), va="center", fontsize=6, zorder=3)
    ax.set_xlim(-0.5, max(len(layer_order), 1) - 0.5)
    ax.set_ylim(bottom - 1.6, 1.6)
    _community_legend(fig, membership, grouped, community_labels)
    if title:
        fig.suptitle(title)
    return fig


def _layers(graph: nx.Graph, layer_order: Sequence[str] | None) -> tuple[dict[str, list], list[str]]:
    """Layer -> [(feature, node)] and the layers left to right (checked against the graph)."""
    by_layer: dict[str, list[tuple[int, Hashable]]] = {}
    layer_index: dict[str, float] = {}
    for node, data in graph.nodes(data=True):
        layer = data.get("layer", node[0] if isinstance(node, tuple) else str(node))
        feature = data.get("feature", node[1] if isinstance(node, tuple) and len(node) > 1 else 0)
        by_layer.setdefault(layer, []).append((feature, node))
        layer_index.setdefault(layer, data.get("layer_index", len(layer_index)))
    if layer_order is None:
        layer_order = sorted(by_layer, key=lambda name: layer_index[name])
    unknown = [name for name in layer_order if name not in by_layer]
    if unknown:
        raise ValueError(f"layer_order names unknown layers {unknown}; the graph has {list(by_layer)}")
    return by_layer, list(layer_order)


def _hidden_note(cut: int, edgeless: int, cap: int, min_weight: float) -> str:
    """The line under a column: features with edges beyond the cap, and features without a drawn edge."""
    lines = [f"+ {cut} more with edges (first {cap} drawn)"] if cut else []
    if edgeless:
        lines.append(f"+ {edgeless} without edges" + (f" > {min_weight:g}" if min_weight > 0 else ""))
    return "\n".join(lines)


def _grouped(membership: Mapping[Hashable, int]) -> dict[int, int]:
    """Community id -> its rank among the communities of >= 2 members (largest first, ties: lower id)."""
    sizes: dict[int, int] = {}
    for community in membership.values():
        sizes[community] = sizes.get(community, 0) + 1
    ranked = sorted((c for c, n in sizes.items() if n >= 2), key=lambda c: (-sizes[c], c))
    return {c: rank for rank, c in enumerate(ranked)}


def _draw_edges(ax, edges: list, position: dict, membership: Mapping, grouped: Mapping[int, int]) -> None:
    """Edges by weight: inside a community in its colour, between communities grey."""
    if not edges:
        return
    edges = sorted(edges, key=lambda edge: edge[2])  # strongest drawn last, on top
    top = max(w for _, _, w in edges) or 1.0
    palette = _palette()
    colours = []
    for u, v, w in edges:  # weak edges fade, so that a dense graph still shows its strong ones
        cu, cv = membership.get(u), membership.get(v)
        rgb = palette[cu % len(palette)] if cu == cv and cu in grouped else (0.35, 0.35, 0.35)
        colours.append((*rgb[:3], 0.08 + 0.6 * w / top))
    segments = [(position[u], position[v]) for u, v, _ in edges]
    widths = [0.2 + 2.8 * w / top for _, _, w in edges]
    ax.add_collection(LineCollection(segments, linewidths=widths, colors=colours, zorder=1))


def _community_legend(fig: Figure, membership: Mapping, grouped: Mapping[int, int], names: Mapping[int, str] | None) -> None:
    """A legend below the figure: each community's colour and its label (default: its size)."""
    if not grouped:
        return
    sizes: dict[int, int] = {}
    for community in membership.values():
        sizes[community] = sizes.get(community, 0) + 1
    palette = _palette()
    handles = [
        Line2D([], [], marker="o", linestyle="", color=palette[c % len(palette)],
               label=(names or {}).get(c, f"community {rank + 1}: {sizes[c]} features"))
        for c, rank in sorted(grouped.items(), key=lambda item: item[1])
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize="small",
               frameon=False, title="communities (grey: in none)")


def _palette() -> list:
    return list(colormaps["tab10"].colors) + list(colormaps["tab20b"].colors)


def _node_colours(nodes: list, membership: Mapping[Hashable, int]) -> list:
    """A distinct colour per community with >= 2 members (counted over the whole graph), grey otherwise."""
    grouped = _grouped(membership)
    palette = _palette()
    return [palette[membership[n] % len(palette)] if membership.get(n) in grouped else _GREY for n in nodes]
