"""LIB analysis during training: bases, edges, degeneracy, sparsity, modularity and basis evolution.

A thin callback: it decides when, builds a fixed analysis set (``_analysis_set.py``), asks
``lib_lightning.core`` to compute, reduces across processes, and logs (rank zero only,
``_lib_logging.py``). Attach it to any LightningModule by naming its modules (paths relative to the
LightningModule, as in ``pl_module.named_modules()``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks._analysis_set import AnalysisSet
from callbacks._cofiring import Cofiring
from callbacks._lib_logging import AnalysisLogging, PhaseTimes
from callbacks._tensorboard import write_overview
from lib_lightning.core.lib import KINDS, build_graphs
from lib_lightning.core.lib.capture import NodeLayer, default_forward, resolve_modules
from lib_lightning.core.lib.integration import integration_rule
from lib_lightning.core.lib.memory import MEMORY_BUDGET
from lib_lightning.core.lib.modes import analysis_mode
from lib_lightning.core.lib.passes import NonFiniteActivations
from lib_lightning.core.metrics.summary import Snapshot, SummaryOptions, summarise
from lib_lightning.core.validation import check_at_least, check_choice, check_choices
from lib_lightning.runtime import default_batch_inputs, import_callable, num_threads, preserved_rng, starts_fresh

__all__ = ["LIBAnalysis"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_SPLITS = ("train", "val", "test")


class LIBAnalysis(AnalysisSet, AnalysisLogging, Callback):
    """Builds LIB (and PCA / neuron baselines) on a fixed analysis set on a schedule and logs what it finds.

    Args:
        layers: node layers in forward order: module paths relative to the LightningModule, optionally
            ``"path@-1"`` for positions or ``"path[in]"`` for the module's input.
        kinds: basis kinds, any of ``"lib"``, ``"pca"``, ``"neuron"``.
        every_n_steps / every_n_epochs / log_steps: the schedule; give exactly one. ``log_steps=n`` spreads
            n analyses log-uniformly over the run's steps (dense early).
        at_start: also analyse before the first step (step 0).
        split: ``"train"``, ``"val"`` or ``"test"``: where the analysis set comes from.
        size: number of examples in the analysis set (a fixed subset, drawn once).
        seed: seed of the subset.
        batch_size: examples per forward pass of the analysis.
        forward: ``"pkg.module:function"`` called as ``function(pl_module, inputs)``; default
            ``pl_module(inputs)``.
        batch_inputs: ``"pkg.module:function"`` mapping a dataloader batch to model inputs; default the
            first element of a tuple batch.
        rule, n_intervals, center, rotate_final, abs_threshold, rel_threshold, edge_point,
            position_sources: see :func:`lib_lightning.core.lib.build_graphs` (thresholds there truncate
            the bases; position sources, seeded by ``seed``, make sections with many output positions
            affordable).
        dim_abs_threshold, dim_rel_threshold: thresholds of the logged kept-dimension counts.
        sparsity, modularity, evolution: turn each part of the metrics on or off.
        weighting, resolution: modularity graph weighting (``"log"``, ``"sqrt"``, ``"normalized"``) and
            Louvain resolution.
        relu_layers: modules whose outputs are ReLU activations, for the co-firing degeneracy counts.
        images, histograms, save: TensorBoard figures, log-Lambda histograms, and analyses on disk (a write
            that fails, e.g. on a full disk, is warned about once, counted in ``lib/save_errors`` and skipped).
        figures_every: draw the images and histograms at the first analysis and then every this many
            analyses (scalars, text and files at every one): drawing them is about a third of an
            analysis of the main job that draws them (README).
        dtype: ``"float64"`` (exact) or ``"float32"`` (about 2× faster Jacobians; sums stay float64).
        chunk_size, cache_mb: Jacobian chunk size and cache budget (memory bounds).
        vjp_rows: Jacobian rows per autograd call (``build_graphs``'s); ``None``: 1 on CPU (the fastest
            there), 8 on CUDA (batched through vmap: 2.1x per analysis of the main job on an H200,
            benchmarks/README.md "On a GPU"; each row batched multiplies the backward's memory).
        memory_budget_mb: refuse an analysis whose estimated memory (from the first batch's shapes)
            exceeds this many MiB, with the estimate and the ways out (``None``: no limit; default 8 GiB).
        context_inputs: keys (dict inputs) or indices (tuple inputs) of per-example side inputs that
            the cut check holds fixed per example; default: keys containing ``mask``, ``position_ids``,
            ``token_type_ids`` or ``cache_position`` (see :func:`lib_lightning.core.lib.build_graphs`).
        threads: torch threads during the analysis (default: unchanged). Its large temporaries are
            page-faulted in again at every analysis unless the process keeps freed memory
            (:func:`lib_lightning.runtime.keep_freed_memory`, 10-15 % of the main job's builds).
        name: distinguishes several instances in checkpoints (default: derived from the arguments).

    Raises:
        ValueError: for any argument outside its valid range, naming it and the valid choices.
    """

    def __init__(
        self,
        layers: Sequence[str],
        kinds: Sequence[str] = ("lib", "pca"),
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        log_steps: int | None = None,
        at_start: bool = True,
        split: str = "train",
        size: int = 1000,
        seed: int = 0,
        batch_size: int = 1024,
        forward: str | Callable | None = None,
        batch_inputs: str | Callable | None = None,
        rule: str = "gradient",
        n_intervals: int = 0,
        center: bool = True,
        rotate_final: bool = False,
        abs_threshold: float = 1e-12,
        rel_threshold: float = 0.0,
        edge_point: str = "activation",
        position_sources: int | None = None,
        dim_abs_threshold: float = 1e-10,
        dim_rel_threshold: float = 1e-3,
        sparsity: bool = True,
        modularity: bool = True,
        evolution: bool = True,
        weighting: str = "log",
        resolution: float = 1.0,
        relu_layers: Sequence[str] = (),
        images: bool = True,
        histograms: bool = True,
        save: bool = True,
        figures_every: int = 4,
        dtype: str = "float64",
        chunk_size: int = 256,
        cache_mb: int = 512,
        vjp_rows: int | None = None,
        memory_budget_mb: int | None = MEMORY_BUDGET >> 20,
        context_inputs: Sequence[str | int] | None = None,
        threads: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.layers = [NodeLayer.parse(layer) for layer in layers]
        if len(self.layers) < 2:
            raise ValueError(f"layers needs at least 2 node layers, got {list(layers)}")
        self.kinds = tuple(kinds)
        check_choices("basis kind(s)", self.kinds, KINDS)
        schedules = {"every_n_steps": every_n_steps, "every_n_epochs": every_n_epochs, "log_steps": log_steps}
        given = {k: v for k, v in schedules.items() if v is not None}
        if len(given) != 1:
            raise ValueError(f"give exactly one of every_n_steps, every_n_epochs, log_steps; got {given or 'none'}")
        ((self.schedule, self.every),) = given.items()
        check_at_least(self.schedule, self.every, 1)
        check_choice("split", split, _SPLITS)
        check_at_least("size", size, 2, why="the analysis needs at least two examples")
        check_at_least("batch_size", batch_size, 2, why="the cut check compares examples of a batch")
        check_at_least("chunk_size", chunk_size, 1)
        check_at_least("vjp_rows", vjp_rows, 1, optional=True)
        check_at_least("figures_every", figures_every, 1)
        check_at_least("cache_mb", cache_mb, 0)
        check_at_least("memory_budget_mb", memory_budget_mb, 1, optional=True)
        check_at_least("position_sources", position_sources, 1, optional=True)
        check_choice("dtype", dtype, tuple(_DTYPES))
        check_at_least("threads", threads, 1, optional=True)
        integration_rule(rule, n_intervals)  # validates the rule
        self.options = SummaryOptions(
            abs_threshold=dim_abs_threshold, rel_threshold=dim_rel_threshold, sparsity=sparsity,
            modularity=modularity, evolution=evolution, weighting=weighting, resolution=resolution,
        )
        self.at_start, self.split, self.size, self.seed, self.batch_size = at_start, split, size, seed, batch_size
        self.forward = import_callable(forward) or default_forward
        self.batch_inputs = import_callable(batch_inputs) or default_batch_inputs
        self.build_kwargs = dict(
            kinds=self.kinds, rule=rule, n_intervals=n_intervals, center=center, rotate_final=rotate_final,
            abs_threshold=abs_threshold, rel_threshold=rel_threshold, edge_point=edge_point,
            position_sources=position_sources, seed=seed, chunk_size=chunk_size, cache_bytes=cache_mb << 20,
            vjp_rows=vjp_rows,
            dtype=_DTYPES[dtype],
            memory_budget_bytes=None if memory_budget_mb is None else memory_budget_mb << 20,
            context_inputs=None if context_inputs is None else tuple(context_inputs),
        )
        self.relu_layers = [NodeLayer.parse(layer) for layer in relu_layers]
        self.images, self.histograms, self.save, self.figures_every = images, histograms, save, figures_every
        self.threads, self.name = threads, name
        # state that survives a resume
        self.history: list[dict[str, Any]] = []
        self.snapshot: Snapshot | None = None
        self.skipped = 0
        self.save_errors = 0
        self.metric_errors = 0
        self._planned: list[int] = []
        self._inputs: Any = None  # the analysis set, on CPU (AnalysisSet)
        self._drawn = False  # whether it was drawn from a dataloader (then it is kept in checkpoints)
        self._warned_images = self._warned_state = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            name=self.name, layers=[layer.name for layer in self.layers], kinds=list(self.kinds),
            schedule=f"{self.schedule}={self.every}", split=self.split, size=self.size, seed=self.seed,
        )

    def state_dict(self) -> dict[str, Any]:
        state = {
            "history": self.history,
            "snapshot": self.snapshot.to_state() if self.snapshot is not None else None,
            "skipped": self.skipped,
            "save_errors": self.save_errors,
            "metric_errors": self.metric_errors,
        }
        state.update(self._set_state())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        snapshot = state_dict.get("snapshot")
        self.snapshot = Snapshot.from_state(snapshot) if snapshot else None
        self.skipped = int(state_dict.get("skipped", 0))
        self.save_errors = int(state_dict.get("save_errors", 0))
        self._load_set_state(state_dict)
        self.metric_errors = int(state_dict.get("metric_errors", 0))

    @property
    def analysed_steps(self) -> list[int]:
        return [entry["step"] for entry in self.history]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        resolve_modules(pl_module, self.layers + self.relu_layers)  # unknown names list the available ones
        self._checked = False  # a new fit (or a resumed one) runs the structural checks again

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        write_overview(trainer, pl_module, self)  # layout and HParams of the run, by the first analysis callback

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule == "log_steps":
            total = trainer.max_steps
            if not (total and total > 0):
                total = trainer.estimated_stepping_batches
            if not math.isfinite(total) or total < 1:
                raise ValueError("log_steps needs a finite run length: set trainer.max_steps or max_epochs")
            steps = np.unique(np.round(np.geomspace(1, int(total), self.every)).astype(int))
            self._planned = [int(s) for s in steps]
        if self.at_start and starts_fresh(trainer):
            self._maybe_analyse(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = (self.schedule == "every_n_steps" and step % self.every == 0) or (
            self.schedule == "log_steps" and step in self._planned
        )
        if due:
            self._maybe_analyse(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule == "every_n_epochs" and (trainer.current_epoch + 1) % self.every == 0:
            self._maybe_analyse(trainer, pl_module)

    def _reduce(self, trainer: L.Trainer) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if trainer.world_size == 1:
            return None
        return lambda t: trainer.strategy.reduce(t.clone(), reduce_op="sum")

    def _maybe_analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step in self.analysed_steps:
            return
        # Eval mode for every analysis forward (structural checks too): BatchNorm statistics and
        # dropout masks must not change, so that training follows the same trajectory with the callback.
        with preserved_rng(), num_threads(self.threads), torch.inference_mode(False), torch.enable_grad(), \
                analysis_mode(pl_module, None):
            self._analyse(trainer, pl_module, step)

    def _analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        start = time.perf_counter()
        folder = self._folder(trainer)  # trainer.log_dir broadcasts: every rank must ask
        reduce = self._reduce(trainer) or (lambda t: t)
        # Every rank learns whether any rank failed before the analysis' collectives start, and whether
        # any rank saw a NaN: the structural checks' first batch here, any batch in the statistics pass.
        batches, index, finite = self._prepare(trainer, pl_module, reduce)
        phases = PhaseTimes()
        cofiring = Cofiring(self.relu_layers, batches, index, self.seed)
        graphs = self._build(pl_module, batches, reduce, phases, cofiring) if finite else None
        if graphs is None:
            self.skipped += 1
            rank_zero_warn(f"LIB analysis at step {step} skipped: NaN or Inf in the activations of {self._names}")
            self._log(trainer, {"lib/skipped": float(self.skipped)}, step)
            return
        built = time.perf_counter()
        summary = summarise(graphs, self.options, self.snapshot, strict=False)  # a metric never aborts training
        metrics = dict(summary.metrics)
        self._report_errors(summary.errors, step)
        metrics.update(cofiring.metrics(pl_module.device, reduce))
        summarised = time.perf_counter()
        metrics["lib/skipped"] = float(self.skipped)
        metrics["lib/metric_errors"] = float(self.metric_errors)
        metrics["lib/time/build_s"] = built - start
        metrics.update(phases.seconds)
        metrics["lib/time/summary_s"] = summarised - built
        self.snapshot = summary.snapshot
        figures = len(self.history) % self.figures_every == 0  # the first analysis, then every k-th
        self.history.append({"step": step, "metrics": metrics})
        if trainer.is_global_zero:
            if self.save:
                self._write(lambda: self._save(folder, graphs, metrics, step), f"the LIB analysis of step {step}")
            metrics["lib/save_errors"] = float(self.save_errors)
            self._log(trainer, metrics, step)
            self._write(lambda: self._log_extras(trainer, graphs, summary, step, figures), f"the LIB figures of step {step}")
        self.history[-1]["seconds"] = time.perf_counter() - start
        rank_zero_info(self._one_line(step, metrics, self.history[-1]["seconds"]))

    def _build(self, pl_module, batches, reduce, phases, cofiring) -> dict | None:
        """The graphs, or None when some rank's activations are not finite (every rank learns it at the
        same reduction of the statistics pass, which raises alike on all of them)."""
        try:
            return build_graphs(
                pl_module, self.layers, batches, forward=self.forward, reduce=reduce, progress=phases,
                observe=self.relu_layers, observer=cofiring.update if self.relu_layers else None,
                **{**self.build_kwargs, "check_cuts": False, "memory_budget_bytes": None},  # checked in _prepare
            )  # fmt: skip
        except NonFiniteActivations:
            return None
