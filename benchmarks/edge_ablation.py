"""Edge ablation of the modular-addition transformer: one section run per distinct mask against masks
stacked along the batch dimension (``edge_ablation(..., max_rows=1)`` against the default budget).

Node layers after the embeddings (3 positions), after attention, after the MLP and the logits (last
position); float64; LIB and PCA graphs built on ``--n-graph`` examples; the ablation data are
``--n-data`` other examples labelled with the model's own predictions (baseline accuracy 1, so that the
search has something to keep). Both paths run on the same graphs and data, alternating within each
repeat; the script checks that they give the same edges required and accuracies, and reports the
largest loss difference.

    python benchmarks/edge_ablation.py --repeats 3 --threads 1
    python benchmarks/edge_ablation.py --ckpt checkpoints/modadd/version_0/checkpoints/last.ckpt
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


def main() -> None:
    from lib_lightning.core.interpret.edge_ablation import edge_ablation
    from lib_lightning.core.lib import build_graphs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-graph", type=int, default=1000, help="examples the graphs are built on")
    parser.add_argument("--n-data", type=int, default=256, help="held-out examples of the ablation")
    parser.add_argument("--batch", type=int, default=256, help="examples per batch of the ablation data")
    parser.add_argument("--sections", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-rows", type=int, default=2048, help="the stacked path's budget (examples x masks)")
    parser.add_argument("--ckpt", default=None, help="a Lightning checkpoint of the main job (default: untrained)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, graph_tokens, tokens = _model_and_data(args.n_graph, args.n_data, args.ckpt)
    graphs = build_graphs(model.double(), LAYERS, [graph_tokens], kinds=("lib", "pca"))
    with torch.no_grad():
        labels = model(tokens).argmax(-1)
    data = [(tokens[i:i + args.batch], labels[i:i + args.batch]) for i in range(0, len(tokens), args.batch)]

    print("| graph | section | edges | required (old, new) | same accuracies | max loss diff | old s (runs) "
          "| new s (runs) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for kind, graph in graphs.items():
        for sec in args.sections:
            old_times, new_times = [], []
            for _ in range(args.repeats):
                t_old, old = _timed(lambda: edge_ablation(model, graph, sec, data, max_rows=1))
                t_new, new = _timed(lambda: edge_ablation(model, graph, sec, data, max_rows=args.max_rows))
                old_times.append(t_old)
                new_times.append(t_new)
            same = torch.equal(old.ks, new.ks) and torch.equal(old.accuracy, new.accuracy)
            diff = (old.loss - new.loss).abs().max().item() if torch.equal(old.ks, new.ks) else float("nan")
            ratio = statistics.median(old_times) / statistics.median(new_times)
            ratios.append(ratio)
            runs = lambda ts: f"{statistics.median(ts):.2f} ({', '.join(f'{t:.2f}' for t in ts)})"
            print(f"| {kind} | {old.section} | {old.n_edges} | {old.n_required}, {new.n_required} | {same} "
                  f"| {diff:.1e} | {runs(old_times)} | {runs(new_times)} | {ratio:.1f}x |", flush=True)
    print(f"median ratio over graphs and sections: {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
