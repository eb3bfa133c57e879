"""Offline analysis of a trained checkpoint: ``python -m lib_lightning analyze --ckpt <ckpt> --out <folder>``.

Loads the model (a Lightning checkpoint, or a plain state dict with ``--config``), builds the LIB and PCA
graphs with the LIB callback's settings, and writes to ``--out``:

- ``graphs.pt``: every basis and edge matrix (:func:`lib_lightning.core.lib.graph.save_graphs`);
- ``metrics.json``: the callback's metrics, node- and edge-ablation results, edges required per section,
  and (modular addition) key frequencies, community purity and progress measures;
- ``spectra.png``, ``graph.png`` (Fourier labels on the nodes for modular addition), ``node_ablation.png``,
  ``edge_ablation.png``; ``fourier.json`` for modular addition; ``timeline.png`` with ``--run``.

Settings come from the ``callbacks.lib_analysis.LIBAnalysis`` entry of the config (``--config``, else the
``config.yaml`` LightningCLI saved beside the checkpoint's run); the main job's settings are the fallback
for the modular-addition task.

The checkpoint and a ``config.yaml`` found beside it are not trusted: they may only name this project's
classes (or those of a package given with ``--trust-code``); a ``--config`` the user names is trusted
(:mod:`lib_lightning.loading`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from typing import Any

import torch
from tqdm.auto import tqdm

from lib_lightning.core.interpret.ablation import node_ablation, smallest_passing
from lib_lightning.core.interpret.edge_ablation import edge_ablation
from lib_lightning.core.lib import batch as nested
from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.files import atomic_write
from lib_lightning.core.lib.graph import save_graphs
from lib_lightning.core.metrics.summary import short_names, spectrum, summarise
from lib_lightning.loading import (
    PROJECT_PACKAGES,
    Trust,
    check_same_model,
    lib_settings,
    load_datamodule,
    load_task,
    read_config,
)
from lib_lightning.data.modadd import modular_addition_pairs
from lib_lightning.models.transformer import ModAddTransformer
from lib_lightning.plotting import (
    plot_edge_ablation,
    plot_interaction_graph,
    plot_node_ablation,
    plot_spectra,
)
from lib_lightning.runtime import oversize_message
from lib_lightning.tasks.modadd.report import fourier_report

__all__ = ["main", "analyze", "parse_args"]

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lib_lightning analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint, or a plain state dict (needs --config)")
    parser.add_argument("--config", help="LightningCLI YAML (default: config.yaml of the checkpoint's run, if any)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", default=None,
                        help="analysis-set size (default: the callback's; 'all': the whole split)")
    parser.add_argument("--eval-size", type=int, default=None,
                        help="held-out examples for the ablations (default: all)")
    parser.add_argument("--eval-batch-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the analysis and evaluation subsets (default: the callback's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="accuracy drop allowed by the ablation thresholds")
    parser.add_argument("--no-ablation", action="store_true", help="skip node and edge ablation")
    parser.add_argument("--no-edge-ablation", action="store_true", help="skip edge ablation only")
    parser.add_argument("--key-threshold", type=float, default=0.1,
                        help="key frequencies have at least this fraction of the strongest frequency's power")
    parser.add_argument("--run", help="a run's log folder: also write timeline.png from its events and lib/*.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--trust-code", action="append", default=[], metavar="PACKAGE",
                        help="also import classes and functions the checkpoint (or the config.yaml beside it) names "
                             "from this package or module (repeatable); this project's own are always trusted")
    args = parser.parse_args(argv)
    if args.size is not None and args.size != "all":
        try:
            args.size = int(args.size)
        except ValueError:
            parser.error(f"--size must be an integer >= 2 or 'all', got {args.size!r}")
        if args.size < 2:
            parser.error(f"--size must be an integer >= 2 or 'all' (the analysis needs two examples), got {args.size}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.eval_size is not None and args.eval_size < 1:
        parser.error(f"--eval-size must be >= 1, got {args.eval_size}")
    return args


# ----------------------------------------------------------------------------- data
def _split_tensors(dm: Any, split: str, batch_inputs) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` of a whole split, from ``<split>_tensors`` or the split's dataloader."""
    if hasattr(dm, f"{split}_tensors"):
        return getattr(dm, f"{split}_tensors")
    dm.setup("fit")
    parts = [(batch_inputs(b), b[1]) for b in getattr(dm, f"{split}_dataloader")()]
    return nested.concat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _subset(n: int, size: int | None, seed: int) -> torch.Tensor:
    if size is None or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


# ----------------------------------------------------------------------------- outputs
def _write_json(path: str, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=lambda x: x.tolist() if isinstance(x, torch.Tensor) else str(x))

    atomic_write(path, write)


def _write_figure(path: str, fig) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# ----------------------------------------------------------------------------- the analysis
_EDGE_FIELDS = ("n_edges", "n_required", "reached", "ks", "accuracy", "loss", "baseline_accuracy", "cutoff")


def _node_results(curves, names: list[str], graph, tolerance: float) -> dict[str, Any]:
    """Node-ablation curves by short layer name, with the features each layer requires."""
    out = {}
    for c in curves:
        out[names[graph.layer_names.index(c.layer)]] = {
            "ks": c.ks, "accuracy": c.accuracy, "loss": c.loss, "baseline_accuracy": c.baseline_accuracy,
            "baseline_loss": c.baseline_loss,
            "features_required": smallest_passing(c.ks, c.accuracy, c.baseline_accuracy - tolerance),
        }
    return out


def _load(args: argparse.Namespace) -> dict[str, Any]:
    """The run to analyse: task, datamodule and callback settings (trusted classes only, checked to
    describe the same model), the analysis batches and the held-out evaluation data."""
    # No early makedirs: every output goes through atomic_write, which creates --out with its first file,
    # so a run that fails while loading leaves no empty folder behind.
    config, config_path = read_config(args.ckpt, args.config)
    trust = Trust(PROJECT_PACKAGES + tuple(args.trust_code))
    if args.config is not None:  # the user named this config: its classes are theirs to trust
        trust = trust.with_config(config)
    source = f"config {config_path!r}" + ("" if args.config is not None else " (found beside the checkpoint)")
    task, state = load_task(args.ckpt, config, trust, source)
    dm = load_datamodule(config, state, task, trust, source)
    check_same_model(task, dm, args.ckpt, source if config.get("data") else "the checkpoint's datamodule")
    dm.prepare_data()  # fake data is written, missing data downloaded (or a message says where to put it)
    cb = lib_settings(config, task, trust, source)
    seed = cb.seed if args.seed is None else args.seed
    size = None if args.size == "all" else (cb.size if args.size is None else args.size)
    if size is not None and hasattr(dm, "analysis_inputs"):
        inputs = dm.analysis_inputs(cb.split, size, seed)  # the very set the callback analysed
    else:
        inputs, _ = _split_tensors(dm, cb.split, cb.batch_inputs)
        inputs = nested.select(inputs, _subset(nested.batch_size(inputs), size, seed))
    n_inputs = nested.batch_size(inputs)
    if size is not None and size > n_inputs:
        warnings.warn(oversize_message(size, n_inputs, f"the {cb.split} split"), stacklevel=3)
    val_x, val_y = _split_tensors(dm, "val", cb.batch_inputs)
    index = _subset(len(val_y), args.eval_size, seed)
    val_x, val_y = nested.select(val_x, index), val_y[index]
    data = list(zip(nested.split(val_x, args.eval_batch_size), val_y.split(args.eval_batch_size)))
    return dict(task=task, state=state, dm=dm, cb=cb, seed=seed, config_path=config_path, n_inputs=n_inputs,
                batches=nested.split(inputs, cb.batch_size), data=data, eval_size=len(val_y))


def _edge_ablations(task, cb, graphs, data, args, dtype, names: list[str], result: dict[str, Any], bar) -> dict:
    """Edge ablation of every section of every graph kind (the longest phase: ``bar`` names the section);
    adds its results to ``result``."""
    edges: dict[str, list] = {}
    for kind, g in graphs.items():
        edges[kind] = []
        for sec in range(len(g.edges)):
            bar.set_postfix_str(f"{kind} section {sec}")
            edges[kind].append(edge_ablation(task, g, sec, data, forward=cb.forward, tolerance=args.tolerance, dtype=dtype))
    sections = [f"{a}->{b}" for a, b in zip(names[:-1], names[1:])]
    result["edge_ablation"] = {
        kind: {sec: {k: getattr(r, k) for k in _EDGE_FIELDS} for sec, r in zip(sections, rs)}
        for kind, rs in edges.items()
    }
    result["edges_required"] = {
        sec: {kind: rs[i].n_required for kind, rs in edges.items()} for i, sec in enumerate(sections)
    }
    return edges


def _figures(args, graphs, summary, names: list[str], labels, nodes: dict, edges: dict, result: dict) -> None:
    """Spectra, interaction graph, ablation curves and (with ``--run``) the training timeline, as PNGs."""
    spectra = {name: {k: spectrum(g.layers[i]) for k, g in graphs.items()} for i, name in enumerate(names)
               if graphs["lib"].layers[i].kind != "identity"} if "lib" in graphs else {}
    if spectra:
        _write_figure(os.path.join(args.out, "spectra.png"), plot_spectra(spectra, title="Λ (LIB) and variances (PCA)"))
    if summary.graph is not None and summary.graph.number_of_edges():
        named = (result.get("fourier") or {}).get("communities") or []
        community_names = {
            c["community"]: f"k = {c['frequency']}, purity {c['purity']:.2f} ({c['size']} features)" for c in named
        }
        title = "LIB interaction graph (communities: dominant Fourier frequency)" if community_names else ""
        fig = plot_interaction_graph(summary.graph, summary.communities, labels=labels,
                                     community_labels=community_names, title=title)
        _write_figure(os.path.join(args.out, "graph.png"), fig)
    if nodes:
        _write_figure(os.path.join(args.out, "node_ablation.png"), plot_node_ablation(nodes, args.tolerance))
    if edges:
        _write_figure(os.path.join(args.out, "edge_ablation.png"), plot_edge_ablation(edges))
    if args.run:
        from lib_lightning.timeline import plot_timeline, read_scalars

        title = os.path.basename(os.path.normpath(args.run))
        _write_figure(os.path.join(args.out, "timeline.png"), plot_timeline(read_scalars(args.run), title=title))


def analyze(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every phase and writes the outputs; returns the content of ``metrics.json``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ablate = not args.no_ablation
    phases = ["load", "graphs", "summary", *(["node ablation", "edge ablation"] if ablate else []), "fourier", "figures"]
    bar = tqdm(total=len(phases), disable=args.no_progress, desc="analyze")
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def done(phase: str) -> None:
        now = time.perf_counter()
        timings[phase] = now - clock[0]
        clock[0] = now
        bar.update(1)
        bar.set_postfix_str(f"{phase} {timings[phase]:.0f}s")

    bar.set_description("analyze: load")
    run = _load(args)
    task, dm, cb, seed, data = run["task"], run["dm"], run["cb"], run["seed"], run["data"]
    done("load")

    bar.set_description("analyze: graphs")
    graphs = build_graphs(task, cb.layers, run["batches"], forward=cb.forward, **cb.build_kwargs)
    save_graphs(graphs, os.path.join(args.out, "graphs.pt"))
    done("graphs")
    bar.set_description("analyze: summary")
    summary = summarise(graphs, cb.options)
    done("summary")

    settings = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cb.build_kwargs.items()}
    result: dict[str, Any] = {
        "checkpoint": os.path.abspath(args.ckpt), "config": run["config_path"], "step": run["state"].get("global_step"),
        "settings": {"layers": [layer.name for layer in cb.layers], "split": cb.split, "size": run["n_inputs"],
                     "seed": seed, "eval_size": run["eval_size"], "tolerance": args.tolerance, **settings},
        "metrics": summary.metrics,
    }  # fmt: skip
    names = short_names(next(iter(graphs.values())).layer_names)
    dtype = cb.build_kwargs.get("dtype", torch.float64)  # the precision the graphs were built in
    nodes, edges = {}, {}
    if ablate:
        bar.set_description("analyze: node ablation")
        nodes = {kind: node_ablation(task, g, data, forward=cb.forward, dtype=dtype) for kind, g in graphs.items()}
        result["node_ablation"] = {
            kind: _node_results(curves, names, graphs[kind], args.tolerance) for kind, curves in nodes.items()
        }
        done("node ablation")
        if not args.no_edge_ablation:
            bar.set_description("analyze: edge ablation")
            edges = _edge_ablations(task, cb, graphs, data, args, dtype, names, result, bar)
        done("edge ablation")

    labels = None
    if isinstance(getattr(task, "model", None), ModAddTransformer) and "lib" in graphs:
        bar.set_description("analyze: fourier")
        keep = [i for i, layer in enumerate(graphs["lib"].layers) if layer.has_constant]
        cutoffs = [edges["lib"][i].cutoff for i in keep[:-1]] if "lib" in edges else None
        train_idx = torch.as_tensor(getattr(dm, "train_idx", torch.arange(task.model.p**2)))
        fourier = fourier_report(
            task, cb.forward, graphs, summary, modular_addition_pairs(task.model.p), train_idx,
            args.key_threshold, cutoffs, seed=cb.options.seed,
        )  # fmt: skip
        labels = fourier.pop("_labels")
        _write_json(os.path.join(args.out, "fourier.json"), fourier)
        keys = ("key_frequencies", "communities", "modularity", "communities_ablation_cutoffs",
                "modularity_ablation_cutoffs", "progress")
        result["fourier"] = {k: fourier.get(k) for k in keys}
    done("fourier")

    bar.set_description("analyze: figures")
    _figures(args, graphs, summary, names, labels, nodes, edges, result)
    done("figures")
    bar.close()
    result["timings_s"] = timings
    _write_json(os.path.join(args.out, "metrics.json"), result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m lib_lightning analyze``."""
    return analyze(parse_args(argv))
