"""Wall time of the main job (configs/modadd.yaml) with all its analysis callbacks, with the LIB callback
only, and without them, side by side; and the LIB callback's own seconds as a fraction of the training time.

Each run is its own subprocess (fresh interpreter, outputs in a temporary folder); runs alternate
between the variants so that drifts in machine load hit all alike. Inside each run the LIB callback's
hooks are timed (every second it holds the training loop: analyses, skips, the overview at fit start),
so its fraction of the training time (the run's wall time less those seconds) is measured in the same
run, free of the run-to-run noise of the wall-time ratios. ``--code DIR`` adds the same variants run on
the code in DIR (e.g. ``git worktree add /tmp/old main``), alternating with this tree's.

    python benchmarks/callback_overhead.py --repeats 3
    python benchmarks/callback_overhead.py --repeats 2 --variants "LIB only" --threads 1 --code /tmp/old

``--phases CKPT`` instead times the parts of single analyses of the config's LIB callback on a trained
checkpoint (no training), alternating between this tree and ``--code``; ``--analyses`` per run (4; 9 gives
two more with figures, as the callback draws them at every ``figures_every``-th):

    python benchmarks/callback_overhead.py --phases checkpoints/modadd/version_0/checkpoints/last.ckpt \
        --repeats 5 --threads 1 --code /tmp/old
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
ANALYSIS_CALLBACKS = ("callbacks.lib_analysis.LIBAnalysis", "callbacks.llc.LLCCallback", "callbacks.progress_measures.ProgressMeasures")
VARIANTS = {"with callbacks": ANALYSIS_CALLBACKS, "LIB only": ANALYSIS_CALLBACKS[:1], "without callbacks": ()}


def _time_lib_hooks(seconds: list[float]) -> None:
    """Adds the wall time of every hook of the LIB callback that can do work to ``seconds[0]``."""
    from callbacks.lib_analysis import LIBAnalysis

    def timed(hook):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                seconds[0] += time.perf_counter() - start
        return wrapper

    for name in ("setup", "on_fit_start", "on_train_start", "on_train_batch_end", "on_train_epoch_end"):
        setattr(LIBAnalysis, name, timed(getattr(LIBAnalysis, name)))


def _child(config: str, out: str, threads: int | None) -> None:
    import lightning as L

    from lib_lightning.cli import main

    first_099: list[int] = []
    lib_seconds = [0.0]
    _time_lib_hooks(lib_seconds)

    class ValAcc(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            acc = trainer.callback_metrics.get("val/acc")
            if acc is not None and acc >= 0.99 and not first_099:
                first_099.append(trainer.global_step)

    start = time.perf_counter()
    args = ["--config", config, "--trainer.enable_progress_bar", "false"]
    cli = main(args + (["--threads", str(threads)] if threads else []), run=False)
    cli.trainer.callbacks.append(ValAcc())
    cli.trainer.fit(cli.model, cli.datamodule)
    wall = time.perf_counter() - start
    timing: dict[str, float] = {}
    per_analysis: list[float] = []
    for cb in cli.trainer.callbacks:
        for entry in getattr(cb, "history", []):
            if not isinstance(entry, dict) or "metrics" not in entry:  # LIBAnalysis entries only
                continue
            per_analysis.append(entry.get("seconds", 0.0))
            for key, value in entry.get("metrics", {}).items():
                if key.startswith("lib/time/"):
                    timing[key] = timing.get(key, 0.0) + value
    timing["total_s"] = sum(per_analysis)
    result = {"wall_s": wall, "lib_s": lib_seconds[0], "steps": cli.trainer.global_step, "analyses": len(per_analysis),
              "per_analysis_s": per_analysis, "timing": timing, "first_val_acc_099": first_099[0] if first_099 else None,
              "final_val_acc": float(cli.trainer.callback_metrics.get("val/acc", float("nan")))}
    Path(out).write_text(json.dumps(result))


# The parts of an analysis, timed by wrapping them: (module, owner or None for a module function, name).
_PARTS = (("callbacks._analysis_set", "AnalysisSet", "_finite"), ("callbacks._analysis_set", None, "check_build"),
          ("callbacks.lib_analysis", None, "build_graphs"), ("callbacks.lib_analysis", None, "summarise"),
          ("callbacks.lib_analysis", "LIBAnalysis", "_relu_metrics"), ("callbacks._lib_logging", "AnalysisLogging", "_save"),
          ("callbacks._lib_logging", "AnalysisLogging", "_log_extras"), ("lib_lightning.plotting", None, "plot_spectra"),
          ("lib_lightning.plotting", None, "plot_interaction_graph"), ("lib_lightning.plotting", None, "figure_to_array"))


def _phases_child(config_path: str, ckpt: str, out: str, analyses: int) -> None:
    """Seconds of each part of ``analyses`` analyses of the config's LIB callback on the checkpoint's model
    (the first one runs the structural checks and the figures; later ones as in the middle of a run)."""
    import importlib

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    config = yaml.safe_load(Path(config_path).read_text())
    if config.get("keep_freed_mb") is not None:  # as the CLI does for the main job
        from lib_lightning.runtime import keep_freed_memory

        keep_freed_memory(config["keep_freed_mb"])
    (spec,) = [c for c in config["trainer"]["callbacks"] if c["class_path"] == ANALYSIS_CALLBACKS[0]]
    seconds: dict[str, float] = {}
    for module_name, owner, name in _PARTS:
        module = importlib.import_module(module_name)
        holder = getattr(module, owner) if owner else module
        if not hasattr(holder, name):
            continue
        def timed(fn, key=name):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
            return wrapper
        setattr(holder, name, timed(getattr(holder, name)))
    from callbacks.lib_analysis import LIBAnalysis

    def class_of(path: str):
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    task = class_of(config["model"]["class_path"]).load_from_checkpoint(ckpt, map_location="cpu")
    dm = class_of(config["data"]["class_path"])(**config["data"]["init_args"])
    dm.setup("fit")
    cb = LIBAnalysis(**spec["init_args"])
    cb._inputs = dm.analysis_inputs(cb.split, cb.size, cb.seed)
    tmp = tempfile.mkdtemp()
    trainer = L.Trainer(logger=TensorBoardLogger(tmp), default_root_dir=tmp, enable_progress_bar=False, max_steps=1)
    trainer.strategy.connect(task)
    rows = []
    for i in range(analyses):
        seconds.clear()
        start = time.perf_counter()
        cb._maybe_analyse(trainer, task)
        total = time.perf_counter() - start
        metrics = cb.history[-1]["metrics"]
        phases = {k: v for k, v in metrics.items() if k.startswith("lib/time/")}
        logged = {k: v for k, v in metrics.items() if not k.startswith("lib/time/")}
        rows.append({"analysis": i, "figures": i % cb.figures_every == 0, "total": total, **seconds, **phases,
                     "logged": logged})
        cb.history[-1]["step"] = -1 - i  # so that step 0 is analysed again (the guard against repeats)
    Path(out).write_text(json.dumps(rows))


def _config_path(args, code_dir: str) -> Path:
    """``--config``, or the code's own ``configs/modadd.yaml`` (as README command 1 runs that code)."""
    return Path(args.config) if args.config else Path(code_dir) / "configs" / "modadd.yaml"


def _phases(args, codes: dict[str, str]) -> None:
    ckpt = str(Path(args.phases).resolve())  # the children run in a temporary folder
    results: dict[str, list[list[dict]]] = {code: [] for code in codes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for code, code_dir in codes.items():
                out = Path(tmp) / f"phases_{r}_{len(results[code])}_{abs(hash(code))}.json"
                threads = ["--threads", str(args.threads)] if args.threads else []
                env = {**os.environ, "PYTHONPATH": code_dir, "PYTHONHASHSEED": "0"}
                subprocess.run([sys.executable, __file__, "--phases", ckpt, "--phases-child",
                                str(_config_path(args, code_dir)), str(out),
                                "--analyses", str(args.analyses), *threads], cwd=tmp, check=True, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                results[code].append(json.loads(Path(out).read_text()))
    _compare_logged(results)
    print(f"phases of one analysis: config={args.config} ckpt={args.phases} repeats={args.repeats} "
          f"({args.analyses} analyses each) threads={args.threads} code={codes} load={os.getloadavg()}")
    groups = (("first analysis (checks, figures)", lambda rows: rows[:1]),
              ("later analyses with figures", lambda rows: [row for row in rows[1:] if row.get("figures")]),
              ("later analyses without figures", lambda rows: [row for row in rows[1:] if not row.get("figures", False)]))
    for which, pick in groups:
        if not any(pick(rows) for runs in results.values() for rows in runs):
            continue
        print(f"\n{which}: median seconds over runs and analyses\n")
        print("| part | " + " | ".join(codes) + " |")
        print("|---|" + "---|" * len(codes))
        keys = list(dict.fromkeys(k for runs in results.values() for rows in runs for row in pick(rows) for k in row))
        for key in (k for k in keys if k not in ("analysis", "figures", "logged")):
            cells = []
            for runs in results.values():
                values = [row.get(key, 0.0) for rows in runs for row in pick(rows)]
                cells.append(f"{statistics.median(values):.3f}")
            print(f"| {key} | " + " | ".join(cells) + " |")


def _compare_logged(results: dict[str, list[list[dict]]]) -> None:
    """Whether every code logged the same metrics (all but the times) in each analysis of its first run.

    The children run with one PYTHONHASHSEED: graph/modularity's last bits depended on it before
    ``newman_modularity`` (networkx sums over sets of node names), and an old code compared may still."""
    (first, reference), *others = [(code, runs[0]) for code, runs in results.items()]
    for code, rows in others:
        for a, b in zip(reference, rows):
            x, y = a["logged"], b["logged"]
            differ = [(k, x[k], y[k]) for k in x if k in y and x[k] != y[k] and not (x[k] != x[k] and y[k] != y[k])]
            print(f"analysis {a['analysis']}: {len(x)} logged metrics, same names: {x.keys() == y.keys()}, "
                  f"values that differ between {first.strip()} and {code.strip()}: {differ or 'none'}")


def _configs(config: dict, names: list[str], max_steps: int | None, folder: Path) -> dict[str, Path]:
    """One YAML per variant: the main job's config with only that variant's analysis callbacks."""
    paths = {}
    for name in names:
        cfg = json.loads(json.dumps(config))
        kept = VARIANTS[name]
        cfg["trainer"]["callbacks"] = [
            c for c in cfg["trainer"].get("callbacks", []) if c["class_path"] not in ANALYSIS_CALLBACKS or c["class_path"] in kept
        ]
        if max_steps is not None:
            cfg["trainer"]["max_steps"] = max_steps
        paths[name] = folder / f"{name.replace(' ', '_')}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
    return paths


def _report(results: dict[str, list[dict]]) -> None:
    walls = {name: statistics.median(x["wall_s"] for x in runs) for name, runs in results.items()}
    print("\n| variant | median wall s | runs (s) | analyses | first step val/acc >= 0.99 |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        times = ", ".join(f"{x['wall_s']:.1f}" for x in runs)
        steps = ", ".join(str(x["first_val_acc_099"]) for x in runs)
        print(f"| {name} | {walls[name]:.1f} | {times} | {runs[0]['analyses']} | {steps} |")
    for code in sorted({name.split("] ")[0] + "] " for name in results}):
        base = walls.get(f"{code}without callbacks")
        for kind in ("with callbacks", "LIB only"):
            if base and f"{code}{kind}" in walls:
                print(f"overhead ({code}{kind}): {walls[f'{code}{kind}'] / base - 1:+.1%}")
    print("\n| variant | LIB callback s (runs) | training s = wall - LIB (runs) | LIB / training | "
          "median s per analysis | training s per analysis interval |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        if not runs[0]["analyses"]:
            continue
        lib = [x["lib_s"] for x in runs]
        train = [x["wall_s"] - x["lib_s"] for x in runs]
        fraction = statistics.median(a / b for a, b in zip(lib, train))
        per = statistics.median(s for x in runs for s in x["per_analysis_s"])
        interval = statistics.median(t / x["steps"] for t, x in zip(train, runs)) * 125
        print(f"| {name} | {', '.join(f'{a:.1f}' for a in lib)} | {', '.join(f'{b:.1f}' for b in train)} | "
              f"{fraction:.1%} | {per:.2f} | {interval:.1f} (125 steps) |")
    for name, runs in results.items():
        if runs[-1]["analyses"]:
            timing = runs[-1]["timing"]
            print(f"{name}, last run, summed over its analyses (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="the main job's config (default: each code's own configs/modadd.yaml)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each run (default: torch's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max-steps", type=int, default=None, help="trainer.max_steps (default: the config's)")
    parser.add_argument("--code", default=None, help="also run every variant on the code in this folder (OLD)")
    parser.add_argument("--phases", default=None, metavar="CKPT", help="time the parts of single analyses on CKPT")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "OUT"))
    parser.add_argument("--phases-child", nargs=2, metavar=("CONFIG", "OUT"))
    parser.add_argument("--analyses", type=int, default=4, help="with --phases: analyses per run (figures at every "
                        "figures_every-th, from the first)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        _child(*args.child, args.threads)
        return
    if args.phases_child:
        _phases_child(args.phases_child[0], args.phases, args.phases_child[1], analyses=args.analyses)
        return
    codes = {"[this tree] ": str(ROOT)} | ({"[--code] ": str(Path(args.code).resolve())} if args.code else {})
    if args.phases:
        _phases(args, codes)
        return
    with tempfile.TemporaryDirectory() as tmp:
        variants = {}  # per code, from its config (_config_path)
        for i, (code, code_dir) in enumerate(codes.items()):
            config = yaml.safe_load(_config_path(args, code_dir).read_text())
            (Path(tmp) / str(i)).mkdir()
            variants[code] = _configs(config, args.variants, args.max_steps, Path(tmp) / str(i))
        results: dict[str, list[dict]] = {code + name: [] for name in args.variants for code in codes}
        for r in range(args.repeats):
            for name in args.variants:
                for code, code_dir in codes.items():
                    path, label = variants[code][name], code + name
                    tag = f"{r}_{len(results[label])}_{abs(hash(label))}"
                    out, workdir = Path(tmp) / f"out_{tag}.json", Path(tmp) / f"run_{tag}"
                    workdir.mkdir()
                    threads = ["--threads", str(args.threads)] if args.threads else []
                    env = {**os.environ, "PYTHONPATH": code_dir}
                    subprocess.run([sys.executable, __file__, "--child", str(path), str(out), *threads], cwd=workdir,
                                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    results[label].append(json.loads(out.read_text()))
                    print(f"done {label} run {r}: {results[label][-1]['wall_s']:.1f} s, load {os.getloadavg()}", flush=True)
    print(f"config={args.config} max_steps={args.max_steps} repeats={args.repeats} threads={args.threads} "
          f"code={codes} load={os.getloadavg()}")
    _report(results)


if __name__ == "__main__":
    main()
