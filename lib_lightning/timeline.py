"""One figure of a run's timeline: LIB dimension, interaction sparsity, modularity, progress measures, accuracy.

Scalars come from the run's TensorBoard event files and from the LIB callback's ``lib/step_*.json``
files (which hold every LIB metric even when no TensorBoard logger was attached).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["Series", "read_scalars", "plot_timeline"]

Series = tuple[list[int], list[float]]


def _event_scalars(run_dir: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    files = glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)
    folders = sorted({os.path.dirname(p) for p in files})
    for folder in folders:
        acc = EventAccumulator(folder, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series = out.setdefault(tag, {})
            for event in acc.Scalars(tag):
                series[int(event.step)] = float(event.value)  # a resumed run's later value wins
    return out


def read_scalars(run_dir: str | os.PathLike) -> dict[str, Series]:
    """Every scalar of a run: tag -> (steps, values), steps ascending.

    Reads TensorBoard event files anywhere under ``run_dir`` and every ``lib*/step_*.json`` written by the
    LIB callback (their values fill in tags the events lack).

    Raises:
        FileNotFoundError: if ``run_dir`` does not exist or holds neither kind of file.
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder {run_dir!r} does not exist")
    scalars = _event_scalars(run_dir)
    files = sorted(glob.glob(os.path.join(run_dir, "**", "lib*", "step_*.json"), recursive=True))
    for path in files:
        with open(path) as f:
            entry = json.load(f)
        step = int(entry["step"])
        for tag, value in entry.get("metrics", {}).items():
            scalars.setdefault(tag, {}).setdefault(step, float(value))
    if not scalars and not files:
        raise FileNotFoundError(f"no TensorBoard events or lib/step_*.json files under {run_dir!r}")
    return {tag: (sorted(series), [series[s] for s in sorted(series)]) for tag, series in scalars.items()}


_PANELS = (
    ("LIB dimension (Λ > 1e-3 max)", r"^(lib|pca)/([^/]+)/dim_rel$", False),
    ("edges holding 99 % of E", r"^edges/(.+)/(lib|pca)_n99$", True),
    ("modularity Q", r"^graph/(modularity)$", False),
    ("loss", r"^(progress/restricted_loss|progress/excluded_loss|val/loss|train/loss)$", True),
    ("accuracy", r"^(val/acc|train/acc)$", False),
)


def plot_timeline(scalars: Mapping[str, Series], title: str = "") -> Figure:
    """Five panels against the training step: LIB (and PCA, dashed) dimension per layer, edges holding
    99 % of the weight per section, modularity, restricted / excluded / validation loss, accuracy.

    A panel whose tags are missing says so instead of failing.
    """
    fig = Figure(figsize=(8.0, 12.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(_PANELS), 1, sharex=True)
    for ax, (label, pattern, log_y) in zip(axes, _PANELS):
        regex = re.compile(pattern)
        shown = 0
        colours: dict[str, str] = {}  # one colour per layer or section, LIB solid and PCA dashed
        for tag in sorted(scalars):
            if not regex.match(tag):
                continue
            steps, values = scalars[tag]
            if not steps:
                continue
            dashed = tag.startswith("pca/") or tag.endswith("pca_n99")
            entity = tag.replace("pca/", "lib/", 1).replace("pca_n99", "lib_n99")
            colour = colours.setdefault(entity, f"C{len(colours) % 10}")
            ax.plot(steps, values, marker=".", markersize=3, linestyle="--" if dashed else "-", color=colour, label=tag)
            shown += 1
        if shown:
            if log_y and all(v > 0 for tag in scalars if regex.match(tag) for v in scalars[tag][1]):
                ax.set_yscale("log")
            ax.legend(fontsize="x-small", ncol=2)
        else:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(label, fontsize="small")
    axes[-1].set_xlabel("training step")
    if title:
        fig.suptitle(title)
    return fig
