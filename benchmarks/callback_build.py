"""The training callback's build (configs/modadd.yaml: kinds lib and pca, 400 training pairs, float32
Jacobians, one chunk), run through ``lib_build.py --callback-setting``:

    python benchmarks/lib_build.py --callback-setting --repeats 5   # affine probe off and on, alternating
    git worktree add /tmp/old main && python benchmarks/lib_build.py --callback-setting --old-tree /tmp/old \
        --repeats 5 --ckpt $PWD/checkpoints/modadd/version_0/checkpoints/last.ckpt   # main's code vs this tree's
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from lib_build import LAYERS, _model_and_data, run_ours


def largest_difference(graph, reference) -> tuple[float, float]:
    """The largest relative difference of Λ (of each layer's largest) and of the edges (of each section's
    largest) between two interaction graphs of one kind."""
    lam = max(((a.lambdas - b.lambdas).abs().max() / b.lambdas.abs().max()).item()
              for a, b in zip(graph.layers, reference.layers))
    edge = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(graph.edges, reference.edges))
    return lam, edge


CALLBACK_BUILD = dict(kinds=("lib", "pca"), chunk_size=512, cache_bytes=512 << 20, check_cuts=False,
                      memory_budget_bytes=None)  # configs/modadd.yaml's LIB callback (its checks run beforehand)


def probe_on_off(args) -> None:
    """The training callback's build (configs/modadd.yaml: kinds lib and pca, 400 training pairs, float32
    Jacobians, one chunk of all 400 (chunk_size 512), a 512 MB cache, checks done beforehand), new and old alternating in one
    process; prints medians and the largest relative difference of Λ and edges between the two."""
    torch.set_num_threads(args.threads)
    model, tokens = _model_and_data(400, args.ckpt)
    times: dict[bool, list[float]] = {True: [], False: []}
    phases: dict[bool, dict[str, float]] = {}
    graphs: dict[bool, object] = {}
    for _ in range(args.repeats):
        for probe in (True, False):
            start = time.perf_counter()
            graphs[probe], phases[probe] = run_ours(model, tokens, dtype=torch.float32, affine_probe=probe,
                                                    **CALLBACK_BUILD)
            times[probe].append(time.perf_counter() - start)
    lam, edge = largest_difference(graphs[True], graphs[False])
    print(f"threads={args.threads} load={os.getloadavg()} ckpt={args.ckpt}")
    for probe, name in ((False, "old (affine_probe=False)"), (True, "new")):
        runs = ", ".join(f"{t:.2f}" for t in times[probe])
        split = ", ".join(f"{k} {v:.2f}" for k, v in phases[probe].items())
        print(f"{name}: median {statistics.median(times[probe]):.2f} s (runs {runs}); phases of the last run: {split}")
    print(f"old / new: {statistics.median(times[False]) / statistics.median(times[True]):.2f}x; dims "
          f"{graphs[True].dims} vs {graphs[False].dims}; max rel. difference Λ {lam:.1e}, edges {edge:.1e} (of the largest)")


def child(args) -> None:
    """One process: a warm-up build in the callback's setting, then a timed one; saves the graphs. The
    code built is whichever ``lib_lightning`` PYTHONPATH gives (the parent checks which)."""
    import pickle

    import lib_lightning
    from lib_lightning.core.lib import build_graphs

    torch.set_num_threads(args.threads)
    model, tokens = _model_and_data(400, args.ckpt)
    dtype = getattr(torch, args.dtype)
    build_graphs(model, LAYERS, [tokens], dtype=dtype, **CALLBACK_BUILD)
    start = time.perf_counter()
    graphs = build_graphs(model, LAYERS, [tokens], dtype=dtype, **CALLBACK_BUILD)
    wall = time.perf_counter() - start
    with open(args.save, "wb") as f:
        pickle.dump(graphs, f)
    print(json.dumps({"wall_s": wall, "code": lib_lightning.__file__}))


CONTINUOUS = ("participation_ratio", "effective_rank", "gini", "modularity")  # every other logged metric counts


def _compare_graphs(paths: dict[str, str]) -> None:
    """Λ and edge differences between the saved builds, and every metric summarise() logs from them."""
    import pickle

    from float32_error import _relative_errors

    from lib_lightning.core.metrics.summary import SummaryOptions, summarise

    graphs = {}
    for name, path in paths.items():
        with open(path, "rb") as f:
            graphs[name] = pickle.load(f)
    metrics = {name: summarise(g, SummaryOptions()).metrics for name, g in graphs.items()}
    for a, b in (("float64", "old"), ("float64", "new"), ("old", "new")):
        for kind in ("lib", "pca"):
            errs = [_relative_errors(graphs[a][kind], graphs[b][kind], floor) for floor in (1e-4, 1e-8)]
            same = graphs[a][kind].dims == graphs[b][kind].dims
            print(f"{b} vs {a}, {kind}: dims {'equal' if same else 'DIFFER'} {graphs[b][kind].dims}; max rel. difference"
                  f" Λ {errs[0][0]:.1e} (above 1e-4 of the largest) / {errs[1][0]:.1e} (above 1e-8), edges {errs[0][1]:.1e}"
                  f" / {errs[1][1]:.1e} (of the section's largest, between those features)")
        ma, mb = metrics[a], metrics[b]
        diff = {k: abs(ma[k] - mb[k]) / max(abs(ma[k]), abs(mb[k]), 1e-300) for k in ma if ma[k] != mb[k]}
        worst = max(diff, key=diff.get) if diff else None
        print(f"  logged metrics {b} vs {a}: {len(ma)} compared, {len(ma) - len(diff)} bit-identical"
              + (f", largest relative difference {diff[worst]:.1e} ({worst})" if worst else ""))
        counts = [k for k in diff if not k.endswith(CONTINUOUS)]
        print(f"  counts (or ratios of counts) that differ: {counts or 'none'}")


def against_tree(args) -> None:
    """Main's code (a worktree at ``--old-tree``) against this tree's, alternating one child process each."""
    tmp = os.environ.get("TMPDIR", "/tmp")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"old": os.path.abspath(args.old_tree), "new": here}

    def child(name: str, dtype: str = "float32") -> float:
        tree = trees[name]
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib_build.py"), "--callback-child",
               "--dtype", dtype, "--threads", str(args.threads), "--save", f"{tmp}/callback_{name}_{dtype}.pkl"]
        cmd += ["--ckpt", args.ckpt] if args.ckpt else []
        env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(args.threads)}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tree, env=env).stdout
        result = json.loads(out.strip().splitlines()[-1])
        if not result["code"].startswith(tree + os.sep):
            raise RuntimeError(f"the {name} child imported lib_lightning from {result['code']}, not from {tree}")
        return result["wall_s"]

    print(f"threads={args.threads} load before={os.getloadavg()} ckpt={args.ckpt} old tree={trees['old']}")
    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.repeats):  # alternating, the order swapped every repeat
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            times[name].append(child(name))
    print(f"load after={os.getloadavg()}")
    for name in ("old", "new"):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name}: median {statistics.median(times[name]):.2f} s per build (runs {runs})")
    print(f"old / new: {statistics.median(times['old']) / statistics.median(times['new']):.2f}x")
    child("new", "float64")
    _compare_graphs({"float64": f"{tmp}/callback_new_float64.pkl", "old": f"{tmp}/callback_old_float32.pkl",
                              "new": f"{tmp}/callback_new_float32.pkl"})
