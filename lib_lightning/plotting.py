"""Figures of the LIB analysis: spectra per node layer and the layered interaction graph.

Figures are built on matplotlib's Agg canvas directly (no pyplot), so nothing here touches the global
backend, opens a window or keeps figures alive; :func:`figure_to_array` renders one for TensorBoard.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import networkx as nx
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lib_lightning.core.modularity import Communities

__all__ = ["figure_to_array", "plot_interaction_graph", "plot_spectra"]

_GREY = (0.7, 0.7, 0.7, 1.0)


def plot_spectra(spectra: Mapping[str, Mapping[str, torch.Tensor]], title: str = "") -> Figure:
    """One panel per node layer: each spectrum divided by its maximum against rank, log y axis.

    Args:
        spectra: node layer -> kind (e.g. ``"lib"``, ``"pca"``) -> ``(k,)`` non-negative eigenvalues.
            Each is sorted descending before plotting; zeros cannot be shown on a log axis and are
            left out.
        title: figure title.

    Raises:
        ValueError: for an empty mapping, a non-1-D spectrum or negative entries.
    """
    if not spectra:
        raise ValueError("spectra must map at least one node layer to its spectra")
    fig = Figure(figsize=(3.2 * len(spectra), 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(spectra), squeeze=False)[0]
    for ax, (layer, by_kind) in zip(axes, spectra.items()):
        for kind, values in by_kind.items():
            values = torch.as_tensor(values).detach().to(torch.float64).cpu()
            if values.ndim != 1 or bool((values < 0).any()):
                raise ValueError(f"spectra[{layer!r}][{kind!r}] must be 1-D and non-negative, got shape "
                                 f"{tuple(values.shape)} with min {float(values.min()) if values.numel() else 'n/a'}")
            values = torch.sort(values, descending=True).values
            if values.numel() == 0 or values[0] == 0:
                continue
            rank = np.arange(1, values.numel() + 1)
            shown = (values > 0).numpy()
            ax.plot(rank[shown], (values / values[0]).numpy()[shown], marker=".", markersize=3, label=kind)
        ax.set_yscale("log")
        ax.set_title(layer)
        ax.set_xlabel("rank")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize="small")
    axes[0].set_ylabel("eigenvalue / max")
    if title:
        fig.suptitle(title)
    return fig


def plot_interaction_graph(
    graph: nx.Graph,
    communities: Communities | Mapping[Hashable, int] | None = None,
    layer_order: Sequence[str] | None = None,
    max_nodes_per_layer: int = 40,
    labels: Mapping[Hashable, str] | None = None,
) -> Figure:
    """Features in columns by node layer (left to right), rows by feature index, edges by weight.

    Args:
        graph: an interaction graph (see ``interaction_graph``): nodes with ``layer`` and ``feature``
            attributes (else nodes ``(layer, feature)``), edges with ``weight``.
        communities: a :class:`Communities` or node -> community id; nodes of communities with >= 2
            members get a colour per community, singletons and unassigned nodes grey.
        layer_order: node layers left to right; default by the ``layer_index`` attribute, else first
            appearance.
        max_nodes_per_layer: show the first (most important) features of each layer only; >= 1.
        labels: optional node -> text drawn beside the node.

    Raises:
        ValueError: for ``max_nodes_per_layer < 1`` or a ``layer_order`` naming unknown layers (listing
            the available ones).
    """
    if isinstance(max_nodes_per_layer, bool) or not isinstance(max_nodes_per_layer, int) or max_nodes_per_layer < 1:
        raise ValueError(f"max_nodes_per_layer must be an int >= 1, got {max_nodes_per_layer!r}")
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

    position: dict[Hashable, tuple[float, float]] = {}
    for column, layer in enumerate(layer_order):
        for row, (_, node) in enumerate(sorted(by_layer[layer], key=lambda pair: pair[0])[:max_nodes_per_layer]):
            position[node] = (float(column), -float(row))

    n_rows = max((min(len(by_layer[layer]), max_nodes_per_layer) for layer in layer_order), default=1)
    fig = Figure(figsize=(2.5 + 2.0 * len(layer_order), 1.5 + 0.15 * n_rows))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_axis_off()
    shown = [(u, v, w) for u, v, w in graph.edges(data="weight", default=1.0) if u in position and v in position]
    if shown:
        top = max(w for _, _, w in shown) or 1.0
        segments = [(position[u], position[v]) for u, v, _ in shown]
        widths = [0.2 + 2.8 * w / top for _, _, w in shown]
        ax.add_collection(LineCollection(segments, linewidths=widths, colors="0.35", alpha=0.45, zorder=1))

    nodes = list(position)
    colours = _node_colours(nodes, communities)
    if nodes:
        xy = np.array([position[n] for n in nodes])
        ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=25, edgecolors="black", linewidths=0.3, zorder=2)
        ax.set_ylim(xy[:, 1].min() - 1.0, 1.0)
    for column, layer in enumerate(layer_order):
        ax.text(column, 0.7, layer, ha="center", va="bottom", fontsize="small")
    for node, text in (labels or {}).items():
        if node in position:
            x, y = position[node]
            ax.text(x + 0.06, y, str(text), va="center", fontsize=6, zorder=3)
    ax.set_xlim(-0.5, max(len(layer_order), 1) - 0.5)
    return fig


def _node_colours(nodes: list, communities: Communities | Mapping[Hashable, int] | None) -> list:
    """A distinct colour per community with >= 2 members (counted over the whole graph), grey otherwise."""
    membership = communities.membership if isinstance(communities, Communities) else (communities or {})
    sizes: dict[int, int] = {}
    for community in membership.values():
        sizes[community] = sizes.get(community, 0) + 1
    palette = list(colormaps["tab10"].colors) + list(colormaps["tab20b"].colors)
    out = []
    for node in nodes:
        community = membership.get(node)
        out.append(palette[community % len(palette)] if community is not None and sizes[community] >= 2 else _GREY)
    return out


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an ``(H, W, 3)`` uint8 RGB array (``add_image(..., dataformats="HWC")``)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
