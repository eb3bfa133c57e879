"""Edge and node ablation of the modular-addition transformer: the path before (every k on its own,
``reuse=False``, the budget ``max_rows=2048`` of main before issue 16's second round) against the default
(layer l captured once, row masks reused across the search, masks stacked over slices of the batch,
affine sections and an affine rest of the model as contractions).

Node layers after the embeddings (3 positions), after attention, after the MLP and the logits (last
position); float64; LIB and PCA graphs built on ``--n-graph`` examples; the ablation data are
``--n-data`` other examples labelled with the model's own predictions (baseline accuracy 1, so that the
search has something to keep). Both paths run on the same graphs and data, alternating within each
repeat; the script checks that they give the same edges (features) required and accuracies, and
reports the largest relative loss difference.

    python benchmarks/edge_ablation.py --repeats 3 --threads 1
    python benchmarks/edge_ablation.py --ckpt checkpoints/modadd/version_0/checkpoints/last.ckpt
    python benchmarks/edge_ablation.py --node --repeats 3            # node ablation, every layer
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

LAYERS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_logits"]


def _model_and_data(n_graph: int, n_data: int, ckpt: str | None):
    """The model of ``lib_build.py`` (seeded, or the checkpoint's) and two disjoint sets of its pairs."""
    from lib_build import _model_and_data as model_and_tokens  # this folder is on sys.path as the script's

    model, tokens = model_and_tokens(n_graph + n_data, ckpt)
    return model, tokens[:n_graph], tokens[n_graph:]


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _runs(times: list[float]) -> str:
    return f"{statistics.median(times):.2f} ({', '.join(f'{t:.2f}' for t in times)})"


def ratio(medians: tuple[float, float]) -> float:
    return medians[0] / medians[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / a.abs().clamp_min(1e-300)).max().item()


HEADER = "| graph | {what} | {size} | required (old, new) | same accuracies | max rel. loss diff | old s (runs) " \
         "| new s (runs) | ratio |\n|---|---|---|---|---|---|---|---|---|"


def _side_by_side(cases, repeats: int) -> list[tuple[float, float]]:
    """Times ``(label, old(), new(), describe(old, new))`` cases, old then new within each repeat; prints a
    table row per case and returns the median times."""
    medians = []
    for label, run_old, run_new, describe in cases:
        old_times, new_times = [], []
        for _ in range(repeats):
            t_old, old = _timed(run_old)
            t_new, new = _timed(run_new)
            old_times.append(t_old)
            new_times.append(t_new)
        medians.append((statistics.median(old_times), statistics.median(new_times)))
        same = torch.equal(old.ks, new.ks) and torch.equal(old.accuracy, new.accuracy)
        diff = _rel(old.loss, new.loss) if torch.equal(old.ks, new.ks) else float("nan")
        print(f"| {label} | {describe(old, new)} | {same} | {diff:.1e} | {_runs(old_times)} | {_runs(new_times)} "
              f"| {ratio(medians[-1]):.1f}x |", flush=True)
    return medians


def _edges(model, graphs, data, args) -> list[tuple[float, float]]:
    from lib_lightning.core.interpret.edge_ablation import edge_ablation

    def case(kind, graph, sec):
        def run(**kw):
            return lambda: edge_ablation(model, graph, sec, data, dtype=args.dtype, **kw)

        def describe(old, new):
            return f"{old.section} | {old.n_edges} | {old.n_required}, {new.n_required}"

        return kind, run(max_rows=2048, reuse=False), run(), describe

    print(HEADER.format(what="section", size="edges"))
    return _side_by_side([case(k, g, sec) for k, g in graphs.items() for sec in args.sections], args.repeats)


def _nodes(model, graphs, data, args) -> list[tuple[float, float]]:
    from lib_lightning.core.interpret.ablation import node_ablation, smallest_passing

    def case(kind, graph, layer):
        def run(**kw):
            return lambda: node_ablation(model, graph, data, layers=[layer], dtype=args.dtype, **kw)[0]

        def describe(old, new):
            required = [smallest_passing(c.ks, c.accuracy, c.baseline_accuracy - 1e-3) for c in (old, new)]
            return f"{old.layer} | {len(old.ks)} | {required[0]}, {required[1]}"

        return kind, run(reuse=False), run(), describe

    print(HEADER.format(what="layer", size="ks"))
    layers = range(len(LAYERS) - 1)  # the logits are not ablated
    return _side_by_side([case(k, g, layer) for k, g in graphs.items() for layer in layers], args.repeats)


def main() -> None:
    from lib_lightning.core.lib import build_graphs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-graph", type=int, default=1000, help="examples the graphs are built on")
    parser.add_argument("--n-data", type=int, default=256, help="held-out examples of the ablation")
    parser.add_argument("--batch", type=int, default=256, help="examples per batch of the ablation data")
    parser.add_argument("--sections", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--node", action="store_true", help="node ablation (every layer) instead of edge ablation")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                        help="precision of the evaluation (the main job's analysis: float32)")
    parser.add_argument("--ckpt", default=None, help="a Lightning checkpoint of the main job (default: untrained)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.dtype = getattr(torch, args.dtype)

    model, graph_tokens, tokens = _model_and_data(args.n_graph, args.n_data, args.ckpt)
    graphs = build_graphs(model.double(), LAYERS, [graph_tokens], kinds=("lib", "pca"))
    with torch.no_grad():
        labels = model(tokens).argmax(-1)
    data = [(tokens[i:i + args.batch], labels[i:i + args.batch]) for i in range(0, len(tokens), args.batch)]
    medians = (_nodes if args.node else _edges)(model, graphs, data, args)
    old, new = sum(m[0] for m in medians), sum(m[1] for m in medians)
    print(f"total of the medians: old {old:.2f} s, new {new:.2f} s, {old / new:.1f}x; "
          f"median ratio {statistics.median(o / n for o, n in medians):.1f}x")


if __name__ == "__main__":
    main()
