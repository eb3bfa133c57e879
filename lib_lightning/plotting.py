"""Figures of the LIB analysis: spectra, ablation curves, LLC traces; the interaction graph (from graph_figure).

Figures are built on matplotlib's Agg canvas directly (no pyplot), so nothing here touches the global
backend, opens a window or keeps figures alive; :func:`figure_to_array` renders one for TensorBoard.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib import rcParams
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, NullLocator

from lib_lightning.core.llc import LLCCalibration, LLCEstimate
from lib_lightning.core.summary import short_names
from lib_lightning.graph_figure import plot_interaction_graph  # re-exported: analyze and the callbacks use it here

__all__ = [
    "figure_to_array",
    "plot_edge_ablation",
    "plot_interaction_graph",
    "plot_calibration",
    "plot_node_ablation",
    "plot_spectra",
    "plot_traces",
]

_PANEL_HEIGHT = 1.95  # inches: a spectra panel without its labels and titles


def plot_spectra(spectra: Mapping[str, Mapping[str, torch.Tensor]], title: str = "") -> Figure:
    """One panel per node layer: each spectrum divided by its maximum against rank, log y axis.

    The margins are set from measured text sizes rather than by constrained layout, and the y axis is
    labelled in plain decades (``1e-4``) rather than mathtext: together half the drawing time of the
    LIB callback's figure. Titles wider than their room are wrapped.

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
    fig = Figure(figsize=(3.2 * len(spectra), 3.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(spectra), squeeze=False)[0]
    lowest = []  # per panel, the smallest ratio drawn: how many decades its y axis spans
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
            ratio = (values / values[0]).numpy()[shown]
            ax.plot(rank[shown], ratio, marker=".", markersize=3, label=kind)
        ax.set_yscale("log")
        lowest.append(min((float(line.get_ydata().min()) for line in ax.lines), default=1.0))
        ax.set_xlabel("rank")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        if ax.lines:
            ax.legend(fontsize="small")
    axes[0].set_ylabel("eigenvalue / max")
    decades = [_plain_decades(ax, low) for ax, low in zip(axes, lowest)]
    widest = [f"1e-{d + 1}" if d else r"$\mathdefault{8\times10^{-1}}$" for d in decades]  # a digit to spare
    _fixed_layout(fig, axes, list(spectra), title, widest)
    return fig


def _plain_decades(ax: Any, lowest: float) -> int:
    """Decade tick labels as plain text (``1e-4``, no mathtext) and no minor ticks on a panel whose
    smallest ratio is ``lowest``; returns the whole decades below 1 it spans.

    Under one decade matplotlib's own labels stay: they label the minor ticks, the only ones in view.
    Over more, the minor ticks (8 a decade, unlabelled, about 30 a panel when the spectra span 12 decades
    in mid-training) are left out: rendering the LIB callback's spectra at step 500 took 0.10 instead of 0.13 s.
    """
    decades = int(np.floor(-np.log10(lowest))) if lowest > 0 else 0
    if decades >= 1:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"1e{round(np.log10(y)):d}"))
        ax.yaxis.set_minor_locator(NullLocator())
    return decades


def _fixed_layout(fig: Figure, axes: Sequence[Any], names: list[str], title: str, y_ticks: list[str]) -> None:
    """Panel titles, figure title and margins from the measured sizes of the texts around the panels.

    Constrained layout measures every tick label of every panel at each drawing (0.1 s of the LIB
    callback's 0.25 s figure); the sizes that matter are known before drawing: the widest y tick label
    (``y_ticks``, one per panel), a line of x tick labels and axis labels, and the titles, wrapped to their
    room. The figure grows by the titles' height so that the panels keep theirs.
    """
    renderer = fig.canvas.get_renderer()
    width = fig.get_size_inches()[0]
    inch, pt, edge = fig.dpi, 1.0 / 72.0, 0.06  # edge: white border around everything, inches

    def size(text: str, key: str) -> tuple[float, float]:
        return _text_inches(renderer, text, rcParams[key], inch)

    tick_w = max(size(tick, "ytick.labelsize")[0] for tick in y_ticks)
    def tick_room(axis: str) -> float:  # a tick and its pad, in inches
        return (rcParams[f"{axis}tick.major.size"] + rcParams[f"{axis}tick.major.pad"]) * pt

    ticks = tick_w + tick_room("y")
    label = size("lp", "axes.labelsize")[1] + rcParams["axes.labelpad"] * pt
    left = edge + label + ticks
    right = edge + size("00", "xtick.labelsize")[0]  # half the last rank's label may stick out
    gap = ticks + 0.15
    bottom = edge + label + size("lp", "xtick.labelsize")[1] + tick_room("x")
    panel = (width - left - right - gap * (len(axes) - 1)) / len(axes)
    title_h = 0.0
    for ax, name in zip(axes, names):
        # y=1.0: no automatic placement, which measures every tick label
        ax.set_title(_wrapped(renderer, name, rcParams["axes.titlesize"], panel, inch), y=1.0)
        title_h = max(title_h, ax.title.get_window_extent(renderer).height / inch)
    top = edge + title_h + rcParams["axes.titlepad"] * pt
    if title:
        sup = fig.suptitle(_wrapped(renderer, title, rcParams["figure.titlesize"], width - 2 * edge, inch), va="top")
        top += sup.get_window_extent(renderer).height / inch + 0.08
    height = _PANEL_HEIGHT + top + bottom
    fig.set_size_inches(width, height)
    if title:
        sup.set_y(1.0 - edge / height)
    fig.subplots_adjust(left=left / width, right=1.0 - right / width, bottom=bottom / height,
                        top=1.0 - top / height, wspace=gap / panel)


def _text_inches(renderer: Any, text: str, size: Any, inch: float) -> tuple[float, float]:
    """Width and height of one line of text (mathtext if it starts with ``$``) at a font size, in inches."""
    w, h, _ = renderer.get_text_width_height_descent(text, FontProperties(size=size), ismath=text.startswith("$"))
    return w / inch, h / inch


def _wrapped(renderer: Any, text: str, size: Any, room: float, inch: float) -> str:
    """``text`` broken into lines no wider than ``room`` inches: at spaces, and inside a word too long alone."""
    def fits(line: str) -> bool:
        return _text_inches(renderer, line, size, inch)[0] <= room

    lines: list[str] = []
    for word in text.split(" "):
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while len(word) > 1 and not fits(word):  # a word too long for a line of its own is cut
            cut = max(n for n in range(1, len(word)) if n == 1 or fits(word[:n]))
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return "\n".join(lines)


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

    Flagged cells (any problem in ``table.problems``: a failed, diverged, below-init or trending chain,
    or a low MALA acceptance) are drawn with an ``x``. Built on
    matplotlib's Agg canvas without pyplot, so it never changes the global backend.
    """
    n_eps, n_beta = table.mean.shape
    flagged = torch.tensor([[bool(cell) for cell in row] for row in table.problems])  # (E, B)
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
