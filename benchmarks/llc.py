"""LLC estimate cost and spread on the modular-addition transformer (p = 113, the main job's model).

    .venv/bin/python benchmarks/llc.py [--threads 1] [--train-steps 300 | --ckpt PATH] [--figure PATH]

The model is trained briefly (``--train-steps`` full-batch AdamW steps with the main job's settings:
by 300 steps it has memorised the training set and not generalised), or read from a ``ModularAddition``
checkpoint (``--ckpt``, e.g. the main job's ``last.ckpt`` after grokking). Prints, as markdown tables:

1. seconds per SGLD step against minibatch size, and for L(w*) on the 3,830 training pairs;
2. a calibration sweep over ε and nβ at the callback's γ (figure saved to ``--figure``);
3. the spread across chains against chains and draws, from one long run sliced afterwards;
4. seconds per estimate at ``LLCCallback``'s defaults (median of ``--repeats``).
Timings are medians on ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from callbacks.llc import LLCCallback
from lib_lightning.core.llc import calibrate, default_nbeta, estimate_llc
from lib_lightning.plotting import plot_calibration
from lib_lightning.data.modadd import ModularAdditionDataModule
from lib_lightning.models.transformer import ModAddTransformer

DEFAULTS = {k: v.default for k, v in inspect.signature(LLCCallback).parameters.items()}
SGLD = {k: DEFAULTS[k] for k in ("num_chains", "num_draws", "num_burnin", "epsilon", "gamma", "batch_size")}


def load_or_train(ckpt: Path | None, steps: int) -> tuple[ModAddTransformer, tuple, tuple]:
    """The model of a ``ModularAddition`` checkpoint, else one trained ``steps`` steps; train and val data."""
    torch.manual_seed(0)
    dm = ModularAdditionDataModule(p=113, train_fraction=0.3, seed=0)
    model = ModAddTransformer(113)
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        return model.eval(), dm.train_tensors, dm.val_tensors
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1.0, betas=(0.9, 0.98))
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    tokens, labels = dm.train_tensors
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(tokens), labels).backward()
        optimizer.step()
        warmup.step()
    return model.eval(), dm.train_tensors, dm.val_tensors


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--ckpt", type=Path, default=None, help="analyse this ModularAddition checkpoint instead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--figure", type=Path, default=Path("checkpoints/llc_calibration.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    model, data, (val_tokens, val_labels) = load_or_train(args.ckpt, args.train_steps)
    with torch.no_grad():
        train_loss = F.cross_entropy(model(data[0]), data[1]).item()
        val_acc = (model(val_tokens).argmax(-1) == val_labels).float().mean().item()
    n = data[1].shape[0]
    elapsed = time.perf_counter() - start
    source = f"checkpoint {args.ckpt}" if args.ckpt else f"trained {args.train_steps} steps in {elapsed:.0f} s"
    print(f"model: {source}; train loss {train_loss:.2e}, "
          f"val acc {val_acc:.3f}; n = {n}, default nβ = n/log n = {default_nbeta(n):.1f}; threads {args.threads}")
    print(f"callback defaults: {SGLD}\n")

    print("| batch size | s / SGLD step |\n|---|---|")
    for batch_size in (64, 128, 256, 512):
        def one_step_run(b=batch_size):
            return estimate_llc(model, data, num_chains=1, num_draws=10, num_burnin=0, batch_size=b, epsilon=1e-5)
        seconds, _ = timed(one_step_run, args.repeats)
        print(f"| {batch_size} | {seconds / 10:.4f} |")
    seconds, _ = timed(lambda: estimate_llc(model, data, num_chains=1, num_draws=1, num_burnin=0), args.repeats)
    print(f"| L(w*) on all {n} (plus one step at 256) | {seconds:.4f} |\n")

    epsilons, nbetas = (2.5e-5, 5e-5, 1e-4, 2e-4), [f * default_nbeta(n) for f in (0.5, 1.0, 2.0)]
    sweep = {**SGLD, "num_chains": 2}
    del sweep["epsilon"]
    table = calibrate(model, data, epsilons, nbetas, generator=torch.Generator().manual_seed(0), **sweep)
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    plot_calibration(table).savefig(args.figure, dpi=120)
    print(f"calibration (2 chains, γ={SGLD['gamma']}; figure: {args.figure}); cells: λ̂ ± std [flags: d diverged, "
          "b below L(w*), f failed]\n")
    print("| ε \\ nβ | " + " | ".join(f"{b:.0f}" for b in nbetas) + " |\n" + "|---" * (len(nbetas) + 1) + "|")
    for i, eps in enumerate(epsilons):
        cells = []
        for j in range(len(nbetas)):
            flags = "".join(flag for flag, on in (("d", table.diverged[i, j] > 0), ("b", table.below_init[i, j] > 0),
                                                  ("f", table.failed[i, j])) if on)
            cells.append(f"{table.mean[i, j]:.0f} ± {table.std[i, j]:.0f} {flags}".strip())
        print(f"| {eps:.1e} | " + " | ".join(cells) + " |")

    max_chains, max_draws, burnin = 8, 4 * SGLD["num_draws"], SGLD["num_burnin"]
    step_seconds, _ = timed(lambda: estimate_llc(model, data, num_chains=1, num_draws=20, num_burnin=0,
                                                 batch_size=SGLD["batch_size"], epsilon=1e-5), args.repeats)
    step_seconds /= 20
    long = estimate_llc(model, data, **{**SGLD, "num_chains": max_chains, "num_draws": max_draws},
                        generator=[torch.Generator().manual_seed(1000 + c) for c in range(max_chains)])
    print(f"\nspread across chains (one run of {max_chains} chains × {burnin} burn-in + {max_draws} draws, sliced; "
          f"cost = chains × steps × {step_seconds:.4f} s)\n")
    print("| chains | draws | λ̂ | std | std / λ̂ | s / estimate |\n|---|---|---|---|---|---|")
    kept = long.loss_traces[:, burnin:]
    for chains in (2, 4, 8):
        for draws in (max_draws // 8, max_draws // 4, max_draws // 2, max_draws):
            llcs = long.nbeta * (kept[:chains, :draws].mean(dim=1) - long.init_loss)
            mean, std = llcs.mean().item(), llcs.std().item()
            cost = chains * (burnin + draws) * step_seconds
            print(f"| {chains} | {draws} | {mean:.1f} | {std:.1f} | {std / mean:.3f} | {cost:.2f} |")

    seconds, est = timed(lambda: estimate_llc(model, data, **SGLD), args.repeats)
    print(f"\ndefaults: {seconds:.2f} s per estimate (median of {args.repeats}); λ̂ = {est.mean:.1f} ± "
          f"{est.std:.1f}, diverged {int(est.diverged.sum())}, below L(w*) {int(est.below_init.sum())}")


if __name__ == "__main__":
    main()
