"""Calibrate the LLC sampler on a checkpoint: ``python -m lib_lightning llc-calibrate --ckpt <ckpt> --out <folder>``.

Sweeps the step size ε and the inverse temperature nβ with the same random numbers per cell
(:func:`lib_lightning.core.llc.calibrate`), and writes to ``--out``:

- ``calibration.png``: the chain-mean loss traces per (ε, nβ) and λ̂ against ε (flagged cells: x);
- ``calibration.csv``: one row per cell: λ̂, its spread, MALA acceptance, trend, flagged chains, problems;
- ``recommendation.yaml``: the ``LLCCallback`` settings to paste into a config.

It prints the table and the recommended setting with its reason: the largest ε whose chains, and those
of every smaller ε, are healthy (no failed, diverged, below-init or trending chain; MALA acceptance at
least ``--min-acceptance``). Defaults of the sampler settings come from the ``callbacks.llc.LLCCallback``
entry of the run's config when it has one, else the callback's defaults.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from lib_lightning.core.files import atomic_write, atomic_write_text
from lib_lightning.core.llc import SAMPLERS, HealthLimits, calibrate, default_nbeta, recommend
from lib_lightning.loading import load_datamodule, load_task, read_config
from lib_lightning.plotting import plot_calibration

__all__ = ["llc_calibrate", "main", "parse_args"]

SETTINGS = ("num_chains", "num_burnin", "num_draws", "gamma", "batch_size", "sampler", "mala_every", "max_examples",
            "seed")
DEFAULTS = dict(num_chains=4, num_burnin=50, num_draws=100, epsilon=5e-5, gamma=1000.0, batch_size=128,
                sampler="sgld", mala_every=10, max_examples=None, seed=0)  # LLCCallback's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lib_lightning llc-calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint, or a plain state dict (needs --config)")
    parser.add_argument("--config", help="LightningCLI YAML (default: config.yaml of the checkpoint's run, if any)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--epsilons", type=float, nargs="+", help="step sizes (default: the config's ε × 1/4 .. 4)")
    parser.add_argument("--nbetas", type=float, nargs="+", help="inverse temperatures (default: n/log n × 1/2, 1, 2)")
    parser.add_argument("--split", choices=("train", "val"), default="train", help="data the chains' loss uses")
    parser.add_argument("--params", nargs="+", help="sample only these parameter names or glob patterns")
    for name in ("num_chains", "num_burnin", "num_draws", "batch_size", "mala_every", "max_examples", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    parser.add_argument("--gamma", type=float, default=None)
    parser.add_argument("--sampler", choices=SAMPLERS, default=None)
    parser.add_argument("--min-acceptance", type=float, default=HealthLimits.min_acceptance)
    parser.add_argument("--max-trend", type=float, default=HealthLimits.max_trend)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    for name in ("epsilons", "nbetas"):
        values = getattr(args, name)
        if values is not None and not all(v > 0 and math.isfinite(v) for v in values):
            parser.error(f"--{name} must all be > 0 and finite, got {values}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def callback_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The sampler settings of the config's ``LLCCallback`` entry over the callback's defaults."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(entry, dict) and str(entry.get("class_path", "")).endswith("LLCCallback"):
            given = entry.get("init_args") or {}
            return {**DEFAULTS, **{k: given[k] for k in DEFAULTS if k in given}, "nbeta": given.get("nbeta")}
    return {**DEFAULTS, "nbeta": None}


def _split_tensors(dm: Any, split: str) -> tuple[torch.Tensor, ...]:
    if hasattr(dm, f"{split}_tensors"):
        return tuple(getattr(dm, f"{split}_tensors"))
    dm.setup("fit")
    batches = [tuple(b) for b in getattr(dm, f"{split}_dataloader")()]
    return tuple(torch.cat(parts) for parts in zip(*batches))


def _table_rows(table, settings: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for i, eps in enumerate(table.epsilons.tolist()):
        for j, nbeta in enumerate(table.nbetas.tolist()):
            rows.append({
                "epsilon": eps, "nbeta": nbeta, "llc_mean": table.mean[i, j].item(), "llc_std": table.std[i, j].item(),
                "acceptance": table.acceptance[i, j].item(), "max_abs_trend": table.trend[i, j].item(),
                "diverged": table.diverged[i, j].item(), "below_init": table.below_init[i, j].item(),
                "failed": bool(table.failed[i, j]), "healthy": not table.problems[i][j],
                "problems": "; ".join(table.problems[i][j]), "sampler": settings["sampler"],
            })
    return rows


def _yaml_float(x: float, digits: int = 3) -> str:
    """``x`` as a float YAML 1.1 reads back as one (``5.0e-05``, not the string ``5e-05``)."""
    mantissa, _, exponent = f"{x:.{digits}g}".partition("e")
    mantissa = mantissa if "." in mantissa else mantissa + ".0"
    return mantissa + ("e" + exponent if exponent else "")


def _yaml_snippet(settings: dict[str, Any], epsilon: float, nbeta: float) -> str:
    lines = ["    - class_path: callbacks.llc.LLCCallback", "      init_args:"]
    for key in ("num_chains", "num_burnin", "num_draws"):
        lines.append(f"        {key}: {settings[key]}")
    lines += [f"        epsilon: {_yaml_float(epsilon)}", f"        gamma: {_yaml_float(settings['gamma'])}",
              f"        nbeta: {_yaml_float(nbeta, digits=6)}",
              f"        batch_size: {settings['batch_size']}", f"        sampler: {settings['sampler']}"]
    return "\n".join(lines) + "\n"


def llc_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sweep and write the outputs; returns the rows, the recommendation and the YAML snippet."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config, _ = read_config(args.ckpt, args.config)
    task, state = load_task(args.ckpt, config)
    data = _split_tensors(load_datamodule(config, state, task), args.split)
    settings = callback_settings(config)
    settings.update({k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None})
    n = data[0].shape[0]
    if settings["max_examples"] is not None and settings["max_examples"] < n:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(settings["seed"]))[: settings["max_examples"]]
        data = tuple(t[keep] for t in data)
    nbeta0 = settings["nbeta"] or default_nbeta(n)
    epsilons = args.epsilons or [settings["epsilon"] * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)]
    nbetas = args.nbetas or [nbeta0 / 2, nbeta0, nbeta0 * 2]
    limits = HealthLimits(min_acceptance=args.min_acceptance, max_trend=args.max_trend)
    table = calibrate(
        task, data, epsilons, nbetas, forward=lambda call, batch: call(batch[0]),
        loss_fn=lambda out, batch: F.cross_entropy(out, batch[-1]), params=args.params, limits=limits,
        generator=torch.Generator().manual_seed(settings["seed"]),
        **{k: settings[k] for k in ("num_chains", "num_burnin", "num_draws", "gamma", "batch_size", "sampler",
                                    "mala_every")},
    )
    choice = recommend(table, nbeta=nbeta0 if any(math.isclose(b, nbeta0) for b in nbetas) else None)
    rows = _table_rows(table, settings)
    snippet = _yaml_snippet(settings, choice.epsilon, choice.nbeta) if math.isfinite(choice.epsilon) else ""
    _write_outputs(args.out, table, rows, snippet)
    return {"rows": rows, "recommendation": choice, "yaml": snippet}


def _write_outputs(out: str, table, rows: list[dict[str, Any]], snippet: str) -> None:
    os.makedirs(out, exist_ok=True)

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(os.path.join(out, "calibration.csv"), write_csv)
    fig = plot_calibration(table)
    atomic_write(os.path.join(out, "calibration.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    if snippet:
        atomic_write_text(os.path.join(out, "recommendation.yaml"), snippet)


def _print_report(result: dict[str, Any]) -> None:
    print("| epsilon | nbeta | llc | acceptance | max abs trend | healthy | problems |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['epsilon']:.3g} | {r['nbeta']:.4g} | {r['llc_mean']:.4g} ± {r['llc_std']:.2g} | "
              f"{r['acceptance']:.3f} | {r['max_abs_trend']:.2f} | {'yes' if r['healthy'] else 'no'} | {r['problems']} |")
    choice = result["recommendation"]
    print(f"\nRecommended: {choice.reason}")
    if result["yaml"]:
        print(f"λ̂ there: {choice.mean:.4g} ± {choice.std:.2g}. Paste into the config's callbacks:\n\n{result['yaml']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m lib_lightning llc-calibrate``."""
    result = llc_calibrate(parse_args(argv))
    _print_report(result)
    return result
