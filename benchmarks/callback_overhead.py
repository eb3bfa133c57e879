"""Wall time of the main job (configs/modadd.yaml) with all its analysis callbacks, with the LIB callback
only, and without them, side by side.

Each run is its own subprocess (fresh interpreter, outputs in a temporary folder); runs alternate
between the two variants so that drifts in machine load hit both alike. Prints the median wall times,
their ratio, the number of analyses and where the callbacks' time goes, and the step at which val/acc
first reached 0.99.

    python benchmarks/callback_overhead.py --repeats 3
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


def _child(config: str, out: str, threads: int | None) -> None:
    import lightning as L

    from lib_lightning.cli import main

    first_099: list[int] = []

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
    analyses = 0
    for cb in cli.trainer.callbacks:
        for entry in getattr(cb, "history", []):
            if not isinstance(entry, dict) or "metrics" not in entry:  # LIBAnalysis entries only
                continue
            analyses += 1
            for key, value in entry.get("metrics", {}).items():
                if key.startswith("lib/time/"):
                    timing[key] = timing.get(key, 0.0) + value
            timing["total_s"] = timing.get("total_s", 0.0) + entry.get("seconds", 0.0)
    result = {"wall_s": wall, "analyses": analyses, "timing": timing, "first_val_acc_099": first_099[0] if first_099 else None,
              "final_val_acc": float(cli.trainer.callback_metrics.get("val/acc", float("nan")))}
    Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "modadd.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each run (default: torch's)")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "OUT"))
    args = parser.parse_args()
    if args.child:
        _child(*args.child, args.threads)
        return
    config = yaml.safe_load(Path(args.config).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        variants = {}
        keep = {"with callbacks": ANALYSIS_CALLBACKS, "LIB only": ANALYSIS_CALLBACKS[:1], "without callbacks": ()}
        for name, kept in keep.items():
            cfg = json.loads(json.dumps(config))
            cfg["trainer"]["callbacks"] = [
                c for c in cfg["trainer"].get("callbacks", []) if c["class_path"] not in ANALYSIS_CALLBACKS or c["class_path"] in kept
            ]
            path = Path(tmp) / f"{name.replace(' ', '_')}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            variants[name] = path
        results: dict[str, list[dict]] = {name: [] for name in variants}
        for r in range(args.repeats):
            for name, path in variants.items():
                out = Path(tmp) / f"out_{r}_{name.replace(' ', '_')}.json"
                workdir = Path(tmp) / f"run_{r}_{name.replace(' ', '_')}"
                workdir.mkdir()
                threads = ["--threads", str(args.threads)] if args.threads else []
                subprocess.run([sys.executable, __file__, "--child", str(path), str(out), *threads], cwd=workdir, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                results[name].append(json.loads(out.read_text()))
    print(f"config={args.config} repeats={args.repeats} threads={args.threads} load={os.getloadavg()}")
    walls = {name: statistics.median(x["wall_s"] for x in runs) for name, runs in results.items()}
    print("\n| variant | median wall s | runs (s) | analyses | first step val/acc >= 0.99 |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        times = ", ".join(f"{x['wall_s']:.1f}" for x in runs)
        steps = ", ".join(str(x["first_val_acc_099"]) for x in runs)
        print(f"| {name} | {walls[name]:.1f} | {times} | {runs[0]['analyses']} | {steps} |")
    for name in ("with callbacks", "LIB only"):
        print(f"overhead ({name}): {walls[name] / walls['without callbacks'] - 1:+.1%}")
    timing = results["with callbacks"][-1]["timing"]
    print("callback time in the last run with callbacks (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()))


if __name__ == "__main__":
    main()
