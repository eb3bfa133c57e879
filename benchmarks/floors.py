"""The floors under issue 16's speed targets: how long the work that no reorganisation removes takes.

Each mode runs the real code path with timers around the one operation it cannot avoid, and prints the
best ratio any implementation could reach if everything else cost nothing:

- ``ablation``: ``analyze`` on a checkpoint (one thread); the time inside ``Section.run`` (the model's real
  forwards of a section, or of the rest of the model after a node layer) per ablation phase. With the
  same search (the same ks) every distinct (row, kept count) of a nonlinear section needs one such run on
  every held-out example. ``--code DIR`` also runs ``analyze`` on the code in DIR (e.g. main before issue
  16), one after the other, for the old phase times; the node phase also times its loss and accuracy
  reductions of the logits (one per evaluated row, in float64), which every implementation needs too.
  ``--free-linear model.attn.q,model.attn.k,model.attn.v,model.mlp_in`` times the new code as if those
  ``nn.Linear`` layers' outputs cost nothing in its stacked forwards (zeros; wrong numbers, timing only): the
  ceiling of any scheme that makes them without computing them.
- ``build``: the exact float64 LIB build of ``lib_build.py`` (``ours-recon``) and its reference, alternating;
  the time inside ``torch.autograd.grad`` (one VJP per kept feature and chunk, the affine sections
  already at one example per chunk) and the edges phase (every example's attributions, matrix products).

    python benchmarks/floors.py ablation --ckpt checkpoints/modadd/version_0/checkpoints/last.ckpt --code /tmp/old
    python benchmarks/floors.py ablation --nodes-only --repeats 3 --ckpt ... --code /tmp/old   # the node phase alone
    python benchmarks/floors.py ablation --nodes-only --repeats 3 --ckpt ... --code /tmp/old --free-linear NAMES
    python benchmarks/floors.py build --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class Timer:
    """Seconds spent inside wrapped callables, by the label current when they ran."""

    def __init__(self) -> None:
        self.label, self.seconds = "other", {}

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[self.label] = self.seconds.get(self.label, 0.0) + time.perf_counter() - start
        return timed

    def labelled(self, label: str, fn):
        def run(*args, **kwargs):
            self.label = label
            try:
                return fn(*args, **kwargs)
            finally:
                self.label = "other"
        return run


def _analyze_child(ckpt: str, out: str, result: str, *extra: str) -> None:
    """``analyze`` with ``Section.run`` timed per ablation phase (this tree's code), and the node ablation's
    loss and accuracy reductions of the logits (``copy_updates``, ``evaluation_update``)."""
    from lib_lightning import analyze
    from lib_lightning.core.interpret import ablation, sections

    timer, reductions = Timer(), Timer()
    sections.Section.run = timer.wrap(sections.Section.run)
    for name in ("copy_updates", "evaluation_update"):
        setattr(ablation, name, reductions.wrap(getattr(ablation, name)))
    for name in ("node_ablation", "edge_ablation"):
        phase = name.replace("_", " ")
        setattr(analyze, name, reductions.labelled(phase, timer.labelled(phase, getattr(analyze, name))))
    free = [name for name in os.environ.get("FLOORS_FREE_LINEAR", "").split(",") if name]
    if free:
        _free_linear(analyze, sections, free)
    metrics = analyze.main(["--ckpt", ckpt, "--out", out, "--threads", "1", "--no-progress", *extra])
    Path(result).write_text(json.dumps({"timings": metrics["timings_s"], "forwards": timer.seconds,
                                        "reductions": reductions.seconds}))


def _free_linear(analyze, sections, names: list[str], min_rows: int = 1000) -> None:
    """A ceiling, for timing only (the numbers it computes are wrong): the named ``nn.Linear`` modules return
    zeros of their output's shape, without computing, inside the stacked forwards of at least ``min_rows``
    rows (above every probe's), so the node phase costs what it would if those layers' outputs were free.
    Any scheme that produces them another way (from running sums over the ks, say) costs at least this."""
    on = {"rows": 0}
    stacked = sections.Section._stacked

    def counted(self, inputs, acts, c):
        on["rows"] = acts.shape[0]
        try:
            return stacked(self, inputs, acts, c)
        finally:
            on["rows"] = 0

    sections.Section._stacked = counted
    node_ablation = analyze.node_ablation

    def patched(task, *args, **kwargs):
        for name in names:
            module = task.get_submodule(name)
            if "forward" in module.__dict__:  # patched at an earlier call (the LIB graph's, then PCA's)
                continue
            own = module.forward

            def forward(x, module=module, own=own):
                return x.new_zeros(*x.shape[:-1], module.out_features) if on["rows"] >= min_rows else own(x)

            module.forward = forward
        return node_ablation(task, *args, **kwargs)

    analyze.node_ablation = patched


def _ablation(args) -> None:
    ckpt = str(Path(args.ckpt).resolve())
    runs: dict[str, list[dict]] = {"new": [], "old": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for code in (["old"] if args.code else []) + ["new"]:
                out, result = Path(tmp) / f"{code}{r}", Path(tmp) / f"{code}{r}.json"
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
                       "PYTHONPATH": str(ROOT) if code == "new" else args.code,
                       "FLOORS_FREE_LINEAR": args.free_linear if code == "new" else ""}
                extra = ["--no-edge-ablation"] if args.nodes_only else []
                if code == "new":
                    cmd = [sys.executable, __file__, "ablation-child", ckpt, str(out), str(result), *extra]
                else:  # the old code as a user runs it: no timers inside
                    cmd = [sys.executable, "-m", "lib_lightning", "analyze", "--ckpt", ckpt, "--out", str(out),
                           "--threads", "1", "--no-progress", *extra]
                subprocess.run(cmd, cwd=args.code if code == "old" else ROOT, env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if code == "new":
                    runs[code].append(json.loads(result.read_text()))
                else:
                    runs[code].append({"timings": json.loads((out / "metrics.json").read_text())["timings_s"]})
                print(f"{code} run {r}: {runs[code][-1]} load {os.getloadavg()}", flush=True)
    print(f"\nanalyze --threads 1 on {args.ckpt}, medians of {args.repeats} (load {os.getloadavg()})\n")
    if args.free_linear:
        print(f"new: with {args.free_linear} free in the stacked forwards (a timing ceiling; its numbers are wrong)\n")
    print("| phase | old s | new s | ratio | new: in Section.run s | floor ratio (old / Section.run) "
          "| new: loss and accuracy reductions s | old / (Section.run + reductions) |")
    print("|---|---|---|---|---|---|---|---|")
    for phase in ("node ablation",) + (() if args.nodes_only else ("edge ablation",)):
        new = statistics.median(x["timings"][phase] for x in runs["new"])
        floor = statistics.median(x["forwards"].get(phase, 0.0) for x in runs["new"])
        reduce = statistics.median(x["reductions"].get(phase, 0.0) for x in runs["new"])
        old = statistics.median(x["timings"][phase] for x in runs["old"]) if runs["old"] else float("nan")
        print(f"| {phase} | {old:.1f} | {new:.1f} | {old / new:.1f}x | {floor:.1f} | {old / floor:.1f}x | {reduce:.1f} "
              f"| {old / (floor + reduce):.1f}x |")


def _build(args) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from lib_build import _model_and_data, run_ours, run_reference

    from lib_lightning.core.lib import build as build_module

    torch.set_num_threads(args.threads)
    model, tokens = _model_and_data(args.n, args.ckpt)
    vjp, passes = Timer(), Timer()  # VJP seconds by the pass they ran in; each pass's own seconds
    grad = torch.autograd.grad
    torch.autograd.grad = vjp.wrap(grad)
    for name in ("jacobian_pass", "edges_pass"):
        timed = passes.labelled(name, passes.wrap(getattr(build_module, name)))
        setattr(build_module, name, vjp.labelled(name, timed))
    times: dict[str, list[float]] = {"reference": [], "ours-recon": []}
    vjps, products = [], []
    for _ in range(args.repeats):
        for name in times:
            vjp.seconds.clear()
            passes.seconds.clear()
            start = time.perf_counter()
            if name == "reference":
                run_reference(model, tokens)
            else:
                run_ours(model, tokens, chunk_size=256, cache_bytes=2 << 30, edge_point="reconstruction")
                vjps.append(sum(vjp.seconds.values()))
                products.append(passes.seconds.get("edges_pass", 0.0) - vjp.seconds.get("edges_pass", 0.0))
            times[name].append(time.perf_counter() - start)
    torch.autograd.grad = grad
    ref, ours = statistics.median(times["reference"]), statistics.median(times["ours-recon"])
    v, e = statistics.median(vjps), statistics.median(products)
    print(f"n={args.n} ckpt={args.ckpt} threads={args.threads} repeats={args.repeats} load={os.getloadavg()}")
    print(f"reference {ref:.1f} s (runs {', '.join(f'{t:.1f}' for t in times['reference'])}); ours-recon {ours:.1f} s "
          f"(runs {', '.join(f'{t:.1f}' for t in times['ours-recon'])}): {ref / ours:.2f}x")
    print(f"ours-recon inside torch.autograd.grad: {v:.1f} s ({v / ours:.0%} of the build); floor ratio "
          f"reference / VJPs {ref / v:.2f}x")
    print(f"edges pass less its VJPs (every example's attributions ĝ C⁺ᵀ f̂, squared and summed): {e:.1f} s; "
          f"floor ratio reference / (VJPs + edges) {ref / (v + e):.2f}x")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "ablation-child":
        _analyze_child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    ablation = sub.add_parser("ablation")
    ablation.add_argument("--ckpt", required=True)
    ablation.add_argument("--code", default=None, help="a tree with the old code, run alternating with this one")
    ablation.add_argument("--repeats", type=int, default=1)
    ablation.add_argument("--nodes-only", action="store_true", help="analyze --no-edge-ablation: the node phase alone")
    ablation.add_argument("--free-linear", default="", metavar="NAMES",
                          help="comma-separated nn.Linear modules whose outputs cost nothing in the new code's stacked "
                               "forwards (a timing ceiling only: its numbers are wrong)")
    build = sub.add_parser("build")
    build.add_argument("--ckpt", default=None)
    build.add_argument("--n", type=int, default=3830)
    build.add_argument("--threads", type=int, default=1)
    build.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _ablation(args) if args.mode == "ablation" else _build(args)


if __name__ == "__main__":
    main()
