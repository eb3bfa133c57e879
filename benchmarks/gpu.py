"""Issue 16 target 5: the LIB build and one training-callback analysis on a GPU, with the Jacobian rows
taken one VJP per row (``vjp_rows=1``, the CPU default) or several per autograd call through vmap.

Three measurements, each a median over ``--repeats`` runs after one warm-up, on ``--device``:

1. the exact float64 build of ``lib_build.py`` (``ours-recon``: n = 3,830, chunks of 256, edges at the
   reconstruction) for each ``--rows``; the largest relative difference of Λ and edges against rows = 1;
2. the training callback's build (configs/modadd.yaml: lib + pca, 400 pairs, float32, one chunk);
3. one whole analysis of the LIB callback (``LIBAnalysis._maybe_analyse`` on the checkpoint's task, the
   config's settings, later analyses: no checks, no figures) for each ``--rows``.

    python benchmarks/gpu.py --device cuda --ckpt checkpoints/modadd/version_0/checkpoints/last.ckpt
    python benchmarks/gpu.py --device cpu --n 400 --repeats 1 --rows 1 8 --ckpt ...   # a quick check here
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from callback_build import CALLBACK_BUILD, largest_difference  # noqa: E402
from lib_build import LAYERS, _model_and_data  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int):
    fn()  # warm-up: kernels, allocator, caches
    times, result = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def _builds(args, title: str, n: int, options: dict, dtype: torch.dtype) -> None:
    from lib_lightning.core.lib import build_graphs

    model, tokens = _model_and_data(n, args.ckpt)
    model, tokens = model.to(args.device), tokens.to(args.device)
    print(f"\n{title} (n = {n}, {dtype}, {options})\n\n| vjp_rows | median s | runs (s) | max rel. diff. Λ / edges vs rows = 1 | LIB dims |")
    print("|---|---|---|---|---|")
    reference = None
    for rows in args.rows:
        def run():
            return build_graphs(model, LAYERS, [tokens], dtype=dtype, vjp_rows=rows, **options)["lib"]
        try:
            median, times, graphs = _timed(run, args.device, args.repeats)
        except Exception:  # one setting that fails (memory) must not hide the others
            print(f"| {rows} | failed | {traceback.format_exc(limit=2).splitlines()[-1]} | |")
            continue
        reference = reference or graphs
        lam, edge = largest_difference(graphs, reference)
        print(f"| {rows} | {median:.3f} | {', '.join(f'{t:.3f}' for t in times)} | {lam:.1e} / {edge:.1e} | {graphs.dims} |",
              flush=True)


def _analyses(args) -> None:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks.lib_analysis import LIBAnalysis

    config = yaml.safe_load((ROOT / "configs" / "modadd.yaml").read_text())
    (spec,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("LIBAnalysis")]

    def class_of(path: str):
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    # built from the config and given the checkpoint's weights: load_from_checkpoint would re-instantiate
    # through LightningCLI's saved instantiator, which needs jsonargparse
    task = class_of(config["model"]["class_path"])(**config["model"]["init_args"])
    task.load_state_dict(torch.load(args.ckpt, map_location="cpu", weights_only=True)["state_dict"])
    dm = class_of(config["data"]["class_path"])(**config["data"]["init_args"])
    dm.setup("fit")
    tmp = tempfile.mkdtemp()
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    trainer = L.Trainer(logger=TensorBoardLogger(tmp), default_root_dir=tmp, enable_progress_bar=False,
                        max_steps=1, accelerator=accelerator, devices=1)
    trainer.strategy.connect(task)
    task.to(args.device)
    print("\none analysis of the LIB callback (configs/modadd.yaml, a later analysis: no checks, no figures)\n")
    print("| vjp_rows | median s | runs (s) | of which build s (median) |")
    print("|---|---|---|---|")
    for rows in args.rows:
        cb = LIBAnalysis(**{**spec["init_args"], "vjp_rows": rows, "figures_every": 10**6})
        cb._inputs = dm.analysis_inputs(cb.split, cb.size, cb.seed)
        counter = iter(range(10**6))

        def run():
            cb._maybe_analyse(trainer, task)
            cb.history[-1]["step"] = -1 - next(counter)  # so that step 0 is analysed again
            return cb.history[-1]["metrics"]["lib/time/build_s"]

        cb._maybe_analyse(trainer, task)  # the first analysis: checks and figures, not timed
        cb.history[-1]["step"] = -10**7
        median, times, _ = _timed(run, args.device, args.repeats)
        builds = [entry["metrics"]["lib/time/build_s"] for entry in cb.history[-args.repeats:]]
        print(f"| {rows} | {median:.3f} | {', '.join(f'{t:.3f}' for t in times)} | {statistics.median(builds):.3f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--n", type=int, default=3830, help="examples of the exact build")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--parts", nargs="+", default=["exact", "callback-build", "analysis"],
                        choices=["exact", "callback-build", "analysis"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {args.device} ({name}); torch {torch.__version__}; ckpt {args.ckpt}")
    exact = dict(kinds=("lib",), chunk_size=256, cache_bytes=2 << 30, edge_point="reconstruction")
    parts = {
        "exact": lambda: _builds(args, "exact LIB build (lib_build.py ours-recon)", args.n, exact, torch.float64),
        "callback-build": lambda: _builds(args, "the training callback's build", 400, dict(CALLBACK_BUILD), torch.float32),
        "analysis": lambda: _analyses(args),
    }
    for part in args.parts:
        try:  # a part that fails must not hide the others' numbers
            parts[part]()
        except Exception:
            print(f"\n{part} failed:\n{traceback.format_exc()}", flush=True)


if __name__ == "__main__":
    main()
