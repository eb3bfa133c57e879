"""Refined LLCs across training beside each section's LIB dimension and edge count, over several runs.

    python -m lib_lightning.llc_timeline --runs checkpoints/w13/seed0 checkpoints/w13/seed1 --out llc.png

Reads each run's scalars (:func:`lib_lightning.timeline.read_scalars`: TensorBoard events and the LIB
callback's ``lib/step_*.json``), draws one figure (λ̂ per section, λ̂ per data split, LIB dimension of
each section's output layer, edges holding 99 % of the section's interaction weight, validation
accuracy; one line per run, the mean over runs bold; LIB dimension is that of the section's input node
layer: the directions the section reads) and prints a markdown table of the values at the
LLC steps and the step at which each quantity is halfway through its change.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lib_lightning.timeline import Series, read_scalars

__all__ = ["MODADD_SECTIONS", "halfway_step", "plot_refined_llc", "refined_series", "main"]

# section name in LLCCallback's ``sections`` -> (input node layer, output node layer) of the LIB callback
MODADD_SECTIONS = {
    "embed_attn": ("hook_resid_pre", "hook_resid_mid"),
    "mlp": ("hook_resid_mid", "hook_resid_post"),
    "unembed": ("hook_resid_post", "hook_logits"),
}


def refined_series(scalars: Mapping[str, Series], sections: Mapping[str, tuple[str, str]]) -> dict[str, Series]:
    """The tags the figure needs, renamed: ``llc/<section>``, ``llc/whole``, ``llc/<split>``, ``dim/<section>``,
    ``edges/<section>``, ``val/acc``; missing tags are left out.

    Training-data estimates with a chain below L(w*) are dropped (w* is no local minimum there, as
    mid-transition, and λ̂ is not defined); on held-out data that is the expected state, so they stay.
    """
    wanted = {"llc/whole": "llc/", "llc/val": "llc/val/", "val/acc": "val/acc"}
    for name, (src, dst) in sections.items():
        wanted[f"llc/{name}"] = f"llc/{name}/"
        wanted[f"dim/{name}"] = f"lib/{src}/dim_rel"  # what the section reads (a final identity layer has none)
        wanted[f"edges/{name}"] = f"edges/{src}->{dst}/lib_n99"
    out = {}
    for key, tag in wanted.items():
        if not tag.endswith("/"):
            if tag in scalars:
                out[key] = scalars[tag]
            continue
        if tag + "mean" not in scalars:
            continue
        below = dict(zip(*scalars.get(tag + "below_init_chains", ([], []))))
        keep = key == "llc/val"
        steps, values = scalars[tag + "mean"]
        pairs = [(s, v) for s, v in zip(steps, values) if keep or below.get(s, 0) == 0]
        out[key] = ([s for s, _ in pairs], [v for _, v in pairs])
    return out


def halfway_step(series: Series, start: int = 0) -> int | None:
    """The first step at which a series has covered half of its change from its extreme to its final value.

    Only steps ≥ ``start`` count; the extreme is the value furthest from the final one; None for a flat
    or single-point series.
    """
    steps, values = zip(*[(s, v) for s, v in zip(*series) if s >= start]) if series[0] else ((), ())
    if len(values) < 2:
        return None
    final = values[-1]
    extreme_at = max(range(len(values)), key=lambda i: abs(values[i] - final))
    extreme = values[extreme_at]
    if extreme == final:
        return None
    middle = (extreme + final) / 2
    for step, value in zip(steps[extreme_at:], values[extreme_at:]):
        if (value - middle) * (extreme - middle) <= 0:
            return step
    return None


_PANELS = (
    ("λ̂ per section (train)", lambda k: k.startswith("llc/") and k not in ("llc/val",), True),
    ("λ̂ per split (whole model)", lambda k: k in ("llc/whole", "llc/val"), False),
    ("LIB dimension of the section's input", lambda k: k.startswith("dim/"), False),
    ("edges holding 99 % of E", lambda k: k.startswith("edges/"), True),
    ("validation accuracy", lambda k: k == "val/acc", False),
)


def plot_refined_llc(runs: Sequence[Mapping[str, Series]], title: str = "", align: bool = False) -> Figure:
    """Five panels against the training step, one colour per section or split; thin lines are runs,
    the thick line their mean at the steps all runs share.

    With ``align``, each run's steps are shifted by the step at which its validation accuracy is
    halfway to its final value (grokking at 0); runs are then told apart by line style, without a mean.
    """
    fig = Figure(figsize=(7.0, 10.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(_PANELS), 1, sharex=True)
    keys = sorted({k for run in runs for k in run})
    shifts = [(halfway_step(run["val/acc"]) or 0) if align and "val/acc" in run else 0 for run in runs]
    styles = ("-", "--", ":", "-.")
    colours = {}
    for ax, (label, selects, log_y) in zip(axes, _PANELS):
        for key in (k for k in keys if selects(k)):
            name = key.split("/", 1)[1] if key != "val/acc" else "val/acc"
            colour = colours.setdefault(name, f"C{len(colours) % 10}")
            for r, (run, shift) in enumerate(zip(runs, shifts)):
                if key in run:
                    steps = [step - shift for step in run[key][0]]
                    style = dict(ls=styles[r % len(styles)], lw=1.2, marker=".", ms=3) if align else dict(lw=0.6, alpha=0.5)
                    ax.plot(steps, run[key][1], color=colour, label=name if align and r == 0 else None, **style)
            if not align:
                steps, mean = _mean_over_runs([run[key] for run in runs if key in run])
                ax.plot(steps, mean, color=colour, lw=1.8, marker=".", ms=4, label=name)
        if log_y:
            ax.set_yscale("log")
        elif label.startswith("λ̂ per split"):
            ax.set_yscale("symlog", linthresh=10.0)
            ax.axhline(0.0, color="black", lw=0.5)
        if align:
            ax.axvline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_ylabel(label, fontsize="small")
        ax.legend(fontsize="x-small", ncol=4)
    axes[-1].set_xlabel("training step − step of half validation accuracy" if align else "training step")
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def _mean_over_runs(series: Sequence[Series]) -> Series:
    common = sorted(set.intersection(*(set(s[0]) for s in series)))
    lookup = [dict(zip(*s)) for s in series]
    return common, [statistics.fmean(d[step] for d in lookup) for step in common]


def _value_at(series: Series, step: int) -> float | None:
    """The value logged at ``step``, else the last one before it within 10 steps (validation runs at
    steps ending in 9), else None."""
    before = [(s, v) for s, v in zip(*series) if step - 10 < s <= step]
    return before[-1][1] if before else None


def summary_table(runs: Sequence[Mapping[str, Series]]) -> str:
    """Markdown: per quantity, mean (min–max over runs) at each LLC step, and the halfway steps per run
    (from the first LLC step on, so that every quantity is measured over the same stretch)."""
    keys = sorted({k for run in runs for k in run})
    llc_steps = sorted(set.union(*(set(run["llc/val"][0]) | set(run["llc/whole"][0]) for run in runs if "llc/val" in run)))
    lines = ["| quantity | " + " | ".join(str(s) for s in llc_steps) + " | halfway step per run |",
             "|---|" + "---|" * (len(llc_steps) + 1)]
    for key in keys:
        cells = []
        for step in llc_steps:
            values = [_value_at(run[key], step) for run in runs if key in run]
            values = [v for v in values if v is not None and math.isfinite(v)]
            cells.append(f"{statistics.fmean(values):.4g} ({min(values):.3g}–{max(values):.3g})" if values else "–")
        halfway = [halfway_step(run[key], start=llc_steps[0]) if key in run else None for run in runs]
        lines.append(f"| {key} | " + " | ".join(cells) + " | " + ", ".join(str(h) for h in halfway) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m lib_lightning.llc_timeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run folders (TensorBoard events, lib/step_*.json)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default="")
    parser.add_argument("--dpi", type=int, default=80)
    parser.add_argument("--align", action="store_true", help="shift each run to its grokking step (half val/acc)")
    args = parser.parse_args(argv)
    runs = [refined_series(read_scalars(run), MODADD_SECTIONS) for run in args.runs]
    plot_refined_llc(runs, args.title, align=args.align).savefig(args.out, format="png", dpi=args.dpi)
    table = summary_table(runs)
    print(table)
    return table


if __name__ == "__main__":
    main()
