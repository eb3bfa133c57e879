"""Figures of the LIB analysis: spectra per node layer and the layered interaction graph.

Figures are built on matplotlib's Agg canvas directly (no pyplot), so nothing here touches the global
backend, opens a window or keeps figures alive; :func:`figure_to_array` renders one for TensorBoard.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import networkx as nx
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullFormatter

from lib_lightning.core.llc import LLCCalibration, LLCEstimate
from lib_lightning.core.modularity import Communities
from lib_lightning.core.summary import short_names

__all__ = [
    "figure_to_array",
    "plot_edge_ablation",
    "plot_interaction_graph",
    "plot_calibration",
    "plot_node_ablation",
    "plot_spectra",
    "plot_traces",
]

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


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an ``(H, W, 3)`` uint8 RGB array (``add_image(..., dataformats="HWC")``)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_node_ablation(curves: Mapping[str, Sequence[Any]], tolerance: float) -> Figure:
    """Accuracy (top) and loss (bottom) against features kept, one column per node layer, a line per kind.

    ``curves`` maps a basis kind to its :class:`lib_lightning.core.ablation.NodeAblation` results.
    """

    layers = list(dict.fromkeys(c.layer for kind_curves in curves.values() for c in kind_curves))
    names = dict(zip(layers, short_names(layers)))
    fig = Figure(figsize=(3.4 * len(layers), 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(layers), squeeze=False)
    for kind, kind_curves in curves.items():
        for c in kind_curves:
            col = layers.index(c.layer)
            ks = c.ks.double().clamp_min(0.5)  # k = 0 drawn at 0.5 on the log axis
            axes[0, col].plot(ks, c.accuracy, marker=".", markersize=3, label=kind)
            axes[1, col].plot(ks, c.loss, marker=".", markersize=3, label=kind)
            axes[0, col].axhline(c.baseline_accuracy - tolerance, color="0.5", linewidth=0.6, linestyle=":")
            axes[0, col].set_title(names[c.layer], fontsize="small")
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.legend(fontsize="x-small")
    for ax in axes[1]:
        ax.set_yscale("log")
        ax.set_xlabel("features kept k (constant included)")
    axes[0, 0].set_ylabel("accuracy (held out)")
    axes[1, 0].set_ylabel("loss (held out)")
    return fig


def plot_edge_ablation(results: Mapping[str, Sequence[Any]]) -> Figure:
    """Accuracy against the number of strongest edges kept, one panel per section, a line per kind.

    ``results`` maps a basis kind to its :class:`lib_lightning.core.ablation.EdgeAblation` results.
    """

    sections = list(dict.fromkeys(r.section for rs in results.values() for r in rs))
    fig = Figure(figsize=(3.6 * len(sections), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sections), squeeze=False)[0]
    for kind, rs in results.items():
        for r in rs:
            ax = axes[sections.index(r.section)]
            ks = r.ks.double().clamp_min(0.5)  # k = 0 drawn at 0.5 on the log axis
            line = ax.plot(ks, r.accuracy, marker=".", markersize=4, label=f"{kind}: {r.n_required}")[0]
            ax.axvline(max(r.n_required, 0.5), color=line.get_color(), linewidth=0.8, linestyle="--")
            ax.axhline(r.baseline_accuracy - r.tolerance, color="0.5", linewidth=0.6, linestyle=":")
            a, b = short_names(r.section.split("->"))
            ax.set_title(f"{a} → {b}", fontsize="small")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("edges kept")
        ax.legend(fontsize="x-small", title="edges required", title_fontsize="x-small")
    axes[0].set_ylabel("accuracy (held out)")
    return fig


def plot_calibration(table: LLCCalibration) -> Figure:
    """A figure of a calibration: per nβ, the chain-mean nβ·(L_B − L(w*)) trace for each ε; last, λ̂ vs ε.

    Flagged cells (any diverged, below-init or failed chain) are drawn with an ``x``. Built on
    matplotlib's Agg canvas without pyplot, so it never changes the global backend.
    """
    n_eps, n_beta = table.mean.shape
    flagged = (table.diverged > 0) | (table.below_init > 0) | table.failed  # (E, B)
    healthy = table.llc_traces[~flagged]  # (cells, steps)
    # Values span from below zero to 1e12 and more near instability: symlog axes, capped at the
    # largest unflagged value.
    top = 2.0 * healthy.max().item() if healthy.numel() else None
    fig = Figure(figsize=(3.2 * (n_beta + 1), 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_beta + 1, squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(n_eps)]
    for j in range(n_beta):
        ax = axes[j]
        for i in range(n_eps):
            ax.plot(table.llc_traces[i, j].numpy(), color=colors[i], lw=0.8, label=f"ε={table.epsilons[i]:.2g}")
        ax.axvline(table.num_burnin, color="grey", ls=":", lw=0.8)
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set(title=f"nβ={table.nbetas[j]:.3g}", xlabel="SGLD step", ylabel="nβ·(L_B − L(w*))")
        ax.set_yscale("symlog", linthresh=1.0)
        if top is not None and top > 1.0:
            ax.set_ylim(top=top)
    axes[0].legend(fontsize="small")
    ax = axes[-1]
    for j in range(n_beta):
        eps, mean, std = table.epsilons.numpy(), table.mean[:, j].numpy(), table.std[:, j].numpy()
        ax.errorbar(eps, mean, yerr=std, marker="o", ms=3, capsize=2, label=f"nβ={table.nbetas[j]:.3g}")
        bad = flagged[:, j].numpy()
        ax.plot(eps[bad], mean[bad], "kx", ms=8)
    ax.set(xscale="log", xlabel="ε", ylabel="λ̂ ± std over chains", title="λ̂ (x: flagged)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xticks(table.epsilons.numpy(), [f"{e:.2g}" for e in table.epsilons.tolist()])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize="small")
    return fig


def plot_traces(estimate: LLCEstimate) -> Figure:
    """A figure of each chain's nβ·(L_B(w) − L(w*)) against SGLD step, burn-in marked (Agg canvas, no pyplot)."""
    fig = Figure(figsize=(4.5, 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for c, trace in enumerate(estimate.nbeta * (estimate.loss_traces - estimate.init_loss)):
        flag = " (diverged)" if estimate.diverged[c] else " (below L(w*))" if estimate.below_init[c] else ""
        ax.plot(trace.numpy(), lw=0.8, label=f"chain {c}{flag}")
    ax.axvline(estimate.num_burnin, color="grey", ls=":", lw=0.8)
    ax.axhline(0.0, color="black", lw=0.5)
    title = f"λ̂ = {estimate.mean.item():.4g} ± {estimate.std.item():.2g}"
    ax.set(xlabel="SGLD step", ylabel="nβ·(L_B − L(w*))", title=title)
    ax.legend(fontsize="small")
    return fig
