"""Log the local learning coefficient (LLC) on the training timeline, beside the LIB curves.

The callback decides when and on which data; :func:`lib_lightning.core.llc.estimate_llc` decides how.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from callbacks._tensorboard import write_overview
from lib_lightning.core import batch as nested
from lib_lightning.core.llc import default_nbeta, estimate_llc
from lib_lightning.plotting import plot_traces

__all__ = ["LLCCallback"]

_SCHEDULES = ("log", "every")
# Per-rank sums reduced across ranks: chains, Σλ̂, Σλ̂², diverged, below L(w*), non-finite, Σ L(w*)
_COUNT, _SUM, _SQ_SUM, _DIVERGED, _BELOW, _FAILED, _INIT_SUM = range(7)


class LLCCallback(Callback):
    """Estimate the LLC at scheduled steps by SGLD localised at the current weights; log ``llc/*``.

    Logged (global rank zero, at the training step): ``llc/mean``, ``llc/std`` (spread across chains),
    ``llc/init_loss`` (L(w*)), ``llc/diverged_chains``, ``llc/below_init_chains`` and ``llc/failed``
    (1 when a chain produced a non-finite loss: mean and std are then not logged, training goes on). With
    ``log_traces`` and a TensorBoard logger, ``llc/traces`` shows rank zero's chains.

    Analysis data: the datamodule's ``train_tensors`` (``(inputs, labels)``, every rank the same) when it
    has them, else the first ``num_batches`` batches of the training loader. Chain ``c`` is seeded from
    ``(seed, step, c)``; under DDP rank ``r`` runs chains ``r, r + world, ...`` and the sums are reduced,
    so the result does not depend on the number of processes. The model, its gradients, the optimizer
    and the global RNG are untouched.

    Override :meth:`forward` and :meth:`loss` for batches other than ``(inputs, labels)`` classification;
    the loss must be a per-example average negative log-likelihood.

    Args:
        schedule: ``"log"``: ``num_points`` log-spaced steps from ``first_step`` to ``max_steps`` (default
            the trainer's); ``"every"``: every ``every_n_steps`` steps.
        num_chains, num_draws, num_burnin, epsilon, gamma, nbeta, batch_size: SGLD settings of
            :func:`~lib_lightning.core.llc.estimate_llc`; ``nbeta=None`` is n / log n for the n training
            examples.
        max_examples: use a fixed, seeded subset of this many training examples (``None``: all).
        num_batches: batches taken from the training loader when the datamodule has no ``train_tensors``.
        seed: seed of the chains and of the subset.
        log_traces: add a figure of the chains' loss traces to a TensorBoard logger.
    """

    def __init__(
        self,
        schedule: str = "log",
        num_points: int = 8,
        first_step: int = 100,
        max_steps: int | None = None,
        every_n_steps: int | None = None,
        num_chains: int = 4,
        num_draws: int = 100,
        num_burnin: int = 50,
        epsilon: float = 5e-5,
        gamma: float = 1000.0,
        nbeta: float | None = None,
        batch_size: int | None = 128,
        max_examples: int | None = None,
        num_batches: int = 4,
        seed: int = 0,
        log_traces: bool = True,
    ) -> None:
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
        if schedule == "every" and (every_n_steps is None or every_n_steps < 1):
            raise ValueError(f"schedule='every' needs every_n_steps >= 1, got every_n_steps={every_n_steps}")
        if schedule == "log" and max_steps is not None and max_steps < first_step:
            raise ValueError(f"max_steps must be >= first_step={first_step}, got max_steps={max_steps}")
        for name, value, low in (("num_points", num_points, 1), ("first_step", first_step, 1),
                                 ("num_chains", num_chains, 1), ("num_draws", num_draws, 1),
                                 ("num_burnin", num_burnin, 0), ("batch_size", batch_size, 1),
                                 ("max_examples", max_examples, 1), ("num_batches", num_batches, 1)):
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {name}={value}")
        for name, value, zero_ok in (("epsilon", epsilon, False), ("gamma", gamma, True), ("nbeta", nbeta, False)):
            if value is not None and not (value >= 0 if zero_ok else value > 0):
                raise ValueError(f"{name} must be {'>= 0' if zero_ok else '> 0'}, got {name}={value}")
        self.schedule, self.num_points, self.first_step, self.max_steps = schedule, num_points, first_step, max_steps
        self.every_n_steps = every_n_steps
        self.num_chains, self.num_draws, self.num_burnin = num_chains, num_draws, num_burnin
        self.epsilon, self.gamma, self.nbeta, self.batch_size = epsilon, gamma, nbeta, batch_size
        self.max_examples, self.num_batches, self.seed, self.log_traces = max_examples, num_batches, seed, log_traces
        self.history: list[tuple[int, float, float]] = []  # (step, mean, std); NaN when failed
        self.last_step = -1
        self._steps: set[int] = set()
        self._data: Any = None  # the LLC data: (inputs, labels) or the batches' own structure
        self._n_train = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            schedule=self.schedule, num_points=self.num_points, every_n_steps=self.every_n_steps,
            epsilon=self.epsilon, gamma=self.gamma, nbeta=self.nbeta, seed=self.seed,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.schedule != "log":
            return
        last = self.max_steps or (trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches)
        last = max(int(last), self.first_step)
        grid = np.geomspace(self.first_step, last, self.num_points)
        self._steps = {int(round(s)) for s in grid}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        write_overview(trainer, pl_module, self)  # layout and HParams of the run, by the first analysis callback

    def is_scheduled(self, step: int) -> bool:
        if self.schedule == "every":
            return step % self.every_n_steps == 0
        return step in self._steps

    def forward(self, model, batch):
        """Model output for a batch; ``model`` runs the LightningModule at a chain's weights."""
        return model(batch[0])

    def loss(self, output: torch.Tensor, batch) -> torch.Tensor:
        """Per-example average negative log-likelihood (cross-entropy against ``batch[-1]``)."""
        return F.cross_entropy(output, batch[-1])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step <= self.last_step or not self.is_scheduled(step):
            return
        self.last_step = step
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                sums, local = self.local_sums(trainer, pl_module, step, trainer.global_rank, trainer.world_size)
        finally:
            for module, mode in modes.items():
                module.train(mode)
        sums = trainer.strategy.reduce(sums.to(pl_module.device).clone(), reduce_op="sum").cpu()
        self._record(trainer, step, sums, local)

    def local_sums(self, trainer, pl_module, step: int, rank: int, world: int):
        """This rank's chains ``rank, rank + world, ...`` at ``step``: their sums ``(7,)`` float64 and estimate."""
        data = self._analysis_data(trainer, pl_module)
        chains = list(range(rank, self.num_chains, world))
        sums = torch.zeros(7, dtype=torch.float64)
        if not chains:
            return sums, None
        gens = [torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, step, c]).generate_state(1)[0]))
                for c in chains]
        nbeta = self.nbeta if self.nbeta is not None else default_nbeta(self._n_train)
        est = estimate_llc(
            pl_module, data, forward=self.forward, loss_fn=self.loss, num_chains=len(chains),
            num_draws=self.num_draws, num_burnin=self.num_burnin, epsilon=self.epsilon, gamma=self.gamma,
            nbeta=nbeta, batch_size=self.batch_size, generator=gens,
        )
        if est.failed:
            warnings.warn(f"LLC estimate at step {step} failed: {est.reason}; training goes on", stacklevel=2)
        llcs = est.chain_llcs
        sums[_COUNT] = len(chains)
        sums[_SUM], sums[_SQ_SUM] = llcs.sum(), (llcs**2).sum()
        sums[_DIVERGED], sums[_BELOW] = est.diverged.sum(), est.below_init.sum()
        sums[_FAILED] = (~torch.isfinite(est.loss_traces).all(dim=1)).sum()
        sums[_INIT_SUM] = est.init_loss * len(chains)
        return sums, est

    def _record(self, trainer, step: int, sums: torch.Tensor, local) -> None:
        count = sums[_COUNT].item()
        failed = sums[_FAILED].item() > 0
        mean = sums[_SUM].item() / count
        var = (sums[_SQ_SUM].item() - count * mean**2) / (count - 1) if count > 1 else math.nan
        std = math.sqrt(max(var, 0.0)) if not math.isnan(var) else math.nan
        mean, std = (math.nan, math.nan) if failed else (mean, std)
        self.history.append((step, mean, std))
        if trainer.global_rank != 0:
            return
        metrics = {
            "llc/init_loss": sums[_INIT_SUM].item() / count,
            "llc/diverged_chains": sums[_DIVERGED].item(),
            "llc/below_init_chains": sums[_BELOW].item(),
            "llc/failed": float(failed),
        }
        if not failed:
            metrics.update({"llc/mean": mean, "llc/std": std})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if self.log_traces and local is not None and hasattr(getattr(logger, "experiment", None), "add_figure"):
                logger.experiment.add_figure("llc/traces", plot_traces(local), global_step=step)

    def _analysis_data(self, trainer, pl_module) -> Any:
        if self._data is not None:
            return self._data
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "train_tensors"):
            data = tuple(datamodule.train_tensors)
        else:
            # Iterating a shuffling loader draws from the global RNG: fork it so training is unaffected.
            batches = []
            with torch.random.fork_rng(devices=[]):
                for batch in trainer.train_dataloader:
                    batches.append(batch)
                    if len(batches) == self.num_batches:
                        break
            data = nested.concat(batches)  # batches of any structure (tuples, dicts, BatchEncodings)
        self._n_train = nested.batch_size(data, what="the LLC data")
        if self.max_examples is not None and self.max_examples < self._n_train:
            gen = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(self._n_train, generator=gen)[: self.max_examples]
            data = nested.select(data, keep)
        self._data = nested.to_device(data, pl_module.device)
        return self._data

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state_dict.get("history", [])]
        self.last_step = state_dict.get("last_step", -1)
