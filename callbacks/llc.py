"""Log the local learning coefficient (LLC) on the training timeline, beside the LIB curves.

The callback decides when and on which data; :func:`lib_lightning.core.llc.estimate_llc` decides how.
"""

from __future__ import annotations

import math
import time
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from callbacks._llc_args import check_sections, check_splits, val_loader
from callbacks._tensorboard import write_overview
from lib_lightning.core import batch as nested
from lib_lightning.core.llc import SAMPLERS, HealthLimits, default_nbeta, estimate_llc, select_params
from lib_lightning.core.capture import NodeLayer
from lib_lightning.core.llc.health import NUM_FIELDS, estimate_sums, metrics_from_sums
from lib_lightning.core.llc.sections import parameter_sections
from lib_lightning.core.summary import short_names
from lib_lightning.plotting import plot_traces

__all__ = ["LLCCallback"]

_SCHEDULES = ("log", "every")


class LLCCallback(Callback):
    """Estimate the LLC at scheduled steps by SGLD localised at the current weights; log ``llc/*``.

    Logged (global rank zero, at the training step), for the whole model on the training data:
    ``llc/mean``, ``llc/std`` (spread across chains), ``llc/init_loss`` (L(w*)), ``llc/diverged_chains``,
    ``llc/below_init_chains`` and ``llc/failed`` (1 when a chain produced a non-finite loss: mean and std
    are then not logged, training goes on); sampler health: ``llc/acceptance`` (mean MALA acceptance
    probability), ``llc/grad_norm``, ``llc/loc_norm``, ``llc/noise_norm`` (mean norms of the update's
    terms), ``llc/trending_chains`` and ``llc/healthy`` (thresholds:
    :mod:`lib_lightning.core.llc.health`); ``llc/seconds`` (this step's estimates on rank zero). One
    warning per step names the unhealthy estimates. With ``log_traces`` and a TensorBoard logger,
    ``llc/traces`` shows rank zero's chains.

    Refined LLCs log the same quantities under ``llc/<section>/...`` (only the section's parameters are
    sampled, the rest held at w*) and ``llc/<split>/...`` (the whole model with the chains' loss and nβ
    on another data split, e.g. held-out examples).

    Analysis data: the datamodule's ``train_tensors`` / ``val_tensors`` (``(inputs, labels)``, every rank
    the same) when it has them, else the first ``num_batches`` batches of the split's loader. Chain ``c``
    is seeded from ``(seed, step, c)`` (plus a hash of the section or split name); under DDP rank ``r``
    runs chains ``r, r + world, ...`` and the sums are reduced, so the result does not depend on the
    number of processes. The model, its gradients, the optimizer and the global RNG are untouched.

    Override :meth:`forward` and :meth:`loss` for batches other than ``(inputs, labels)`` classification;
    the loss must be a per-example average negative log-likelihood.

    Args:
        schedule: ``"log"``: ``num_points`` log-spaced steps from ``first_step`` to ``max_steps`` (default
            the trainer's); ``"every"``: every ``every_n_steps`` steps.
        num_chains, num_draws, num_burnin, epsilon, gamma, nbeta, batch_size, sampler, mala_every: settings
            of :func:`~lib_lightning.core.llc.estimate_llc`; ``nbeta=None`` is n / log n for the n
            examples of the split.
        sections: ``{name: [parameter names or glob patterns]}``, e.g. ``{"mlp": ["model.mlp_*"]}``: a
            weight-refined estimate per section (on the training split). ``"lib"``: the parameters
            between consecutive node layers of the trainer's LIB callback
            (:func:`~lib_lightning.core.llc.sections.parameter_sections`), named ``<a>-><b>`` as its
            ``edges/<a>-><b>`` tags; resolved at the first estimate.
        splits: data splits for whole-model estimates, from ``("train", "val")``; ``"train"`` is logged as
            ``llc/...``, any other as ``llc/<split>/...``.
        min_acceptance, max_trend: health thresholds (:class:`~lib_lightning.core.llc.HealthLimits`).
        max_examples: use a fixed, seeded subset of this many examples of each split (``None``: all).
        num_batches: batches taken from a loader when the datamodule has no tensors for the split.
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
        sampler: str = "sgld",
        mala_every: int = 10,
        sections: Mapping[str, Sequence[str]] | str | None = None,
        splits: Sequence[str] = ("train",),
        min_acceptance: float = 0.9,
        max_trend: float = 4.0,
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
                                 ("max_examples", max_examples, 1), ("num_batches", num_batches, 1),
                                 ("mala_every", mala_every, 0)):
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {name}={value}")
        for name, value, zero_ok in (("epsilon", epsilon, False), ("gamma", gamma, True), ("nbeta", nbeta, False)):
            if value is not None and not (value >= 0 if zero_ok else value > 0):
                raise ValueError(f"{name} must be {'>= 0' if zero_ok else '> 0'}, got {name}={value}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.limits = HealthLimits(min_acceptance=min_acceptance, max_trend=max_trend)
        self._sections_from_lib = sections == "lib"
        self.sections = {} if self._sections_from_lib else check_sections(sections)
        self.splits = check_splits(splits)
        self.schedule, self.num_points, self.first_step, self.max_steps = schedule, num_points, first_step, max_steps
        self.every_n_steps = every_n_steps
        self.num_chains, self.num_draws, self.num_burnin = num_chains, num_draws, num_burnin
        self.epsilon, self.gamma, self.nbeta, self.batch_size = epsilon, gamma, nbeta, batch_size
        self.sampler, self.mala_every = sampler, mala_every
        self.max_examples, self.num_batches, self.seed, self.log_traces = max_examples, num_batches, seed, log_traces
        self.history: list[tuple[int, float, float]] = []  # whole model, train: (step, mean, std); NaN when failed
        self.refined_history: list[tuple[int, str, float, float]] = []  # (step, section or split, mean, std)
        self.last_step = -1
        self._steps: set[int] = set()
        self._data: dict[str, Any] = {}  # per split: (inputs, labels) or the batches' own structure
        self._n: dict[str, int] = {}

    @property
    def state_key(self) -> str:
        extra = {} if self.sampler == "sgld" else {"sampler": self.sampler}
        return self._generate_state_key(
            schedule=self.schedule, num_points=self.num_points, every_n_steps=self.every_n_steps,
            epsilon=self.epsilon, gamma=self.gamma, nbeta=self.nbeta, seed=self.seed, **extra,
        )

    @property
    def estimates(self) -> list[tuple[str, tuple[str, ...] | None, str]]:
        """The estimates of each scheduled step: ``(name, parameter patterns or None, split)``; name ``""``
        is the whole model on the training data."""
        whole = [("" if split == "train" else split, None, split) for split in self.splits]
        return whole + [(name, patterns, "train") for name, patterns in self.sections.items()]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for _, patterns, _ in self.estimates:  # unknown names list the available ones
            select_params(pl_module, patterns)
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
        start = time.perf_counter()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                sums, local = self.local_sums(trainer, pl_module, step, trainer.global_rank, trainer.world_size)
        finally:
            for module, mode in modes.items():
                module.train(mode)
        seconds = time.perf_counter() - start
        sums = trainer.strategy.reduce(sums.to(pl_module.device).clone(), reduce_op="sum").cpu()
        self._record(trainer, step, sums, local, seconds)

    def local_sums(self, trainer, pl_module, step: int, rank: int, world: int):
        """This rank's chains ``rank, rank + world, ...`` of every estimate at ``step``.

        Returns:
            sums ``(estimates, NUM_FIELDS)`` float64 (:func:`~lib_lightning.core.llc.health.estimate_sums`) (rows in :attr:`estimates` order) and this rank's whole-model
            training estimate (None when it has no chain or that estimate is not scheduled).
        """
        if self._sections_from_lib and not self.sections:
            self.sections = self._lib_sections(trainer, pl_module)
        chains = list(range(rank, self.num_chains, world))
        sums = torch.zeros(len(self.estimates), NUM_FIELDS, dtype=torch.float64)
        local = None
        if not chains:
            return sums, local
        for row, (name, patterns, split) in enumerate(self.estimates):
            data = self._analysis_data(trainer, pl_module, split)
            salt = [zlib.crc32(name.encode())] if name else []
            gens = [torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, step, c, *salt]).generate_state(1)[0]))
                    for c in chains]
            nbeta = self.nbeta if self.nbeta is not None else default_nbeta(self._n[split])
            est = estimate_llc(
                pl_module, data, forward=self.forward, loss_fn=self.loss, params=patterns, sampler=self.sampler,
                num_chains=len(chains), num_draws=self.num_draws, num_burnin=self.num_burnin, epsilon=self.epsilon,
                gamma=self.gamma, nbeta=nbeta, batch_size=self.batch_size, mala_every=self.mala_every, generator=gens,
            )
            if est.failed:
                warnings.warn(f"LLC estimate{_label(name)} at step {step} failed: {est.reason}; training goes on",
                              stacklevel=2)
            sums[row] = estimate_sums(est, self.limits)
            if name == "":
                local = est
        return sums, local

    def _record(self, trainer, step: int, sums: torch.Tensor, local, seconds: float) -> None:
        metrics, unhealthy = {}, []
        for row, (name, _, _) in enumerate(self.estimates):
            values, problems = metrics_from_sums(sums[row], self.limits)
            if name == "":
                self.history.append((step, values.get("mean", math.nan), values.get("std", math.nan)))
            else:
                self.refined_history.append((step, name, values.get("mean", math.nan), values.get("std", math.nan)))
            prefix = f"llc/{name}/" if name else "llc/"
            metrics.update({prefix + k: v for k, v in values.items()})
            if problems:
                unhealthy.append(f"{name or 'whole model'}: {'; '.join(problems)}")
        if trainer.global_rank != 0:
            return
        metrics["llc/seconds"] = seconds
        if unhealthy:
            warnings.warn(f"unhealthy LLC estimate(s) at step {step}: {' | '.join(unhealthy)} "
                          "(thresholds: lib_lightning/core/llc/health.py; run llc-calibrate)", stacklevel=2)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if self.log_traces and local is not None and hasattr(getattr(logger, "experiment", None), "add_figure"):
                logger.experiment.add_figure("llc/traces", plot_traces(local), global_step=step)

    def _lib_sections(self, trainer, pl_module) -> dict[str, tuple[str, ...]]:
        """The parameters between consecutive node layers of the trainer's LIB callback, by name."""
        layers = next((cb.layers for cb in trainer.callbacks if isinstance(getattr(cb, "layers", None), list)
                       and cb.layers and all(isinstance(layer, NodeLayer) for layer in cb.layers)), None)
        if layers is None:
            raise ValueError("sections='lib' needs a LIB analysis callback (callbacks.lib_analysis.LIBAnalysis) in the "
                             "trainer: its node layers define the sections")
        sample = nested.select(self._analysis_data(trainer, pl_module, "train"), slice(0, 8))
        found = parameter_sections(pl_module, [layer.module for layer in layers], lambda m: self.forward(m, sample),
                                   use_input=[layer.use_input for layer in layers],
                                   names=short_names([layer.name for layer in layers]))
        return {name: tuple(params) for name, params in found.items() if params}

    def _analysis_data(self, trainer, pl_module, split: str = "train") -> Any:
        if split in self._data:
            return self._data[split]
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, f"{split}_tensors"):
            data = tuple(getattr(datamodule, f"{split}_tensors"))
        else:
            # Iterating a shuffling loader draws from the global RNG: fork it so training is unaffected.
            loader = trainer.train_dataloader if split == "train" else val_loader(trainer)
            batches = []
            with torch.random.fork_rng(devices=[]):
                for batch in loader:
                    batches.append(batch)
                    if len(batches) == self.num_batches:
                        break
            data = nested.concat(batches)  # batches of any structure (tuples, dicts, BatchEncodings)
        self._n[split] = nested.batch_size(data, what="the LLC data")
        if self.max_examples is not None and self.max_examples < self._n[split]:
            gen = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(self._n[split], generator=gen)[: self.max_examples]
            data = nested.select(data, keep)
        self._data[split] = nested.to_device(data, pl_module.device)
        return self._data[split]

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "refined_history": list(self.refined_history),
                "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state_dict.get("history", [])]
        self.refined_history = [tuple(h) for h in state_dict.get("refined_history", [])]
        self.last_step = state_dict.get("last_step", -1)


def _label(name: str) -> str:
    return f" ({name})" if name else ""
