"""LIB analysis during training: bases, edges, degeneracy, sparsity, modularity and basis evolution.

A thin callback: it decides when, builds a fixed analysis set, asks ``lib_lightning.core`` to compute,
reduces across processes, and logs (rank zero only). Attach it to any LightningModule by naming its
modules (paths relative to the LightningModule, as in ``pl_module.named_modules()``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks._tensorboard import log_lib_figures, tensorboards, write_overview
from lib_lightning.core.lib import batch as nested
from lib_lightning.core.lib.capture import NodeLayer, capture, default_forward, resolve_modules
from lib_lightning.core.metrics.coactivation import relu_coactivation
from lib_lightning.core.lib.files import atomic_write_text
from lib_lightning.core.lib.integration import integration_rule
from lib_lightning.core.lib.graph import save_graphs
from lib_lightning.core.lib import KINDS, build_graphs
from lib_lightning.core.lib.memory import MEMORY_BUDGET
from lib_lightning.core.lib.modes import analysis_mode
from lib_lightning.core.metrics.summary import Snapshot, SummaryOptions, short_names, summarise
from lib_lightning.runtime import (
    default_batch_inputs,
    import_callable,
    num_threads,
    oversize_message,
    preserved_rng,
    starts_fresh,
    write_or_count,
)

__all__ = ["LIBAnalysis"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_SPLITS = ("train", "val", "test")


class LIBAnalysis(Callback):
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
        dtype: ``"float64"`` (exact) or ``"float32"`` (about 2× faster Jacobians; sums stay float64).
        chunk_size, cache_mb: Jacobian chunk size and cache budget (memory bounds).
        memory_budget_mb: refuse an analysis whose estimated memory (from the first batch's shapes)
            exceeds this many MiB, with the estimate and the ways out (``None``: no limit; default 8 GiB).
        context_inputs: keys (dict inputs) or indices (tuple inputs) of per-example side inputs that
            the cut check holds fixed per example; default: keys containing ``mask``, ``position_ids``,
            ``token_type_ids`` or ``cache_position`` (see :func:`lib_lightning.core.lib.build_graphs`).
        threads: torch threads during the analysis (default: unchanged).
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
        dtype: str = "float64",
        chunk_size: int = 256,
        cache_mb: int = 512,
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
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"unknown basis kind(s) {bad or list(kinds)}; valid choices: {KINDS}")
        schedules = {"every_n_steps": every_n_steps, "every_n_epochs": every_n_epochs, "log_steps": log_steps}
        given = {k: v for k, v in schedules.items() if v is not None}
        if len(given) != 1:
            raise ValueError(f"give exactly one of every_n_steps, every_n_epochs, log_steps; got {given or 'none'}")
        (self.schedule, self.every), = given.items()
        if self.every < 1:
            raise ValueError(f"{self.schedule} must be >= 1, got {self.every}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if size < 2:
            raise ValueError(f"size must be >= 2 (the analysis needs at least two examples), got {size}")
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the cut check compares examples of a batch), got {batch_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        if memory_budget_mb is not None and memory_budget_mb < 1:
            raise ValueError(f"memory_budget_mb must be >= 1 or None, got {memory_budget_mb}")
        if position_sources is not None and position_sources < 1:
            raise ValueError(f"position_sources must be None or >= 1, got {position_sources}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
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
            position_sources=position_sources, seed=seed, chunk_size=chunk_size, cache_bytes=cache_mb << 20, dtype=_DTYPES[dtype],
            memory_budget_bytes=None if memory_budget_mb is None else memory_budget_mb << 20,
            context_inputs=None if context_inputs is None else tuple(context_inputs),
        )
        self.relu_layers = [NodeLayer.parse(layer) for layer in relu_layers]
        self.images, self.histograms, self.save = images, histograms, save
        self.threads, self.name = threads, name
        # state that survives a resume
        self.history: list[dict[str, Any]] = []
        self.snapshot: Snapshot | None = None
        self.skipped = 0
        self.save_errors = 0
        self.metric_errors = 0
        self._planned: list[int] = []
        self._inputs: Any = None  # the analysis set, on CPU
        self._drawn = False  # whether it was drawn from a dataloader (then it is kept in checkpoints)
        self._warned_images = self._warned_state = False

    # ----------------------------------------------------------------- identity, state, schedule
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
        if self._drawn and self._inputs is not None:  # a set drawn from a shuffling loader is not reproducible
            try:
                state["inputs"] = nested.to_state(self._inputs)
            except NotImplementedError as err:
                if not self._warned_state:
                    self._warned_state = True
                    rank_zero_warn(
                        f"LIBAnalysis: the analysis set is not saved in the checkpoint ({err}); a resumed run draws it again"
                    )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        snapshot = state_dict.get("snapshot")
        self.snapshot = Snapshot.from_state(snapshot) if snapshot else None
        self.skipped = int(state_dict.get("skipped", 0))
        self.save_errors = int(state_dict.get("save_errors", 0))
        if state_dict.get("inputs") is not None:
            self._inputs, self._drawn = nested.from_state(state_dict["inputs"]), True
        self.metric_errors = int(state_dict.get("metric_errors", 0))

    @property
    def analysed_steps(self) -> list[int]:
        return [entry["step"] for entry in self.history]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        resolve_modules(pl_module, self.layers + self.relu_layers)  # unknown names list the available ones

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        write_overview(trainer, pl_module, self)  # layout and HParams of the run, by the first analysis callback

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule == "log_steps":
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
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

    # ----------------------------------------------------------------- the analysis
    def analysis_inputs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        """The fixed analysis set (model inputs, on CPU), drawn once.

        A datamodule with ``analysis_inputs(split, size, seed)`` provides it; otherwise the first ``size``
        examples of the split's dataloader are taken, and kept in the checkpoint so that a resumed run
        analyses the same examples. Model inputs may be a tensor or a nesting of tuples, lists, dicts
        and mappings (see :mod:`lib_lightning.core.lib.batch`), batch first.
        """
        if self._inputs is not None:
            return self._inputs
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        if hasattr(source, "analysis_inputs"):
            inputs = source.analysis_inputs(self.split, self.size, self.seed)
            n = nested.batch_size(inputs, what=f"analysis_inputs({self.split!r}, {self.size}, {self.seed})")
        else:
            inputs, n = self._draw(trainer, source)
            self._drawn = True
        if n < 2:
            raise ValueError(f"the analysis set has {n} example(s); need at least 2 ({self.split} split)")
        if n < self.size:
            message = oversize_message(self.size, n, f"the {self.split} split")
            rank_zero_warn(f"{type(self).__name__}: {message}")
        self._inputs = inputs
        return inputs

    def _draw(self, trainer: L.Trainer, source: Any) -> tuple[Any, int]:
        """The first ``size`` examples of the split's dataloader, and their number.

        Under DDP every rank takes rank zero's (each rank's loader may shuffle or shard differently, and
        the shards must partition one set), and every rank raises when rank zero could not draw them.
        """
        error: Exception | None = None
        try:
            drawn: Any = self._first_examples(self._loader(trainer, source))
        except Exception as err:
            if trainer.world_size == 1:
                raise
            drawn, error = f"{type(err).__name__}: {err}", err
        if trainer.world_size > 1:
            drawn = trainer.strategy.broadcast(drawn, src=0)
            if isinstance(drawn, str):
                if error is not None:  # this rank failed too: its own error says most
                    raise error
                raise RuntimeError(f"rank 0 could not draw the analysis set: {drawn}")
        return drawn

    def _first_examples(self, loader: Any) -> tuple[Any, int]:
        """The first ``size`` examples of ``loader`` (on CPU) and their number."""
        parts, n = [], 0
        for batch in loader:
            x = self.batch_inputs(batch)
            n += nested.batch_size(x, what=f"batch_inputs(batch) of {self.split} batch {len(parts)}")
            parts.append(x)
            if n >= self.size:
                break
        if not parts:
            raise ValueError(f"the {self.split} dataloader is empty: no analysis set")
        n = min(n, self.size)
        return nested.to_device(nested.select(nested.concat(parts), slice(0, n)), "cpu"), n

    def _loader(self, trainer: L.Trainer, source: Any) -> Any:
        """The split's dataloader: the datamodule's, else the one the trainer was given."""
        if trainer.datamodule is not None:
            return getattr(trainer.datamodule, f"{self.split}_dataloader")()
        given = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders, "test": trainer.test_dataloaders}
        loader = given[self.split]
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            raise ValueError(
                f"no {self.split} dataloader to draw the analysis set from; use a datamodule, or split='train'"
            )
        return loader

    def _shard(self, trainer: L.Trainer, inputs: Any, device: torch.device) -> tuple[list, torch.Tensor]:
        """This rank's examples (rank::world_size, no padding) in batches on ``device``, and their global indices.

        Raises:
            ValueError: on every rank alike (the check needs only the set's size and the world size) when
                some rank would get fewer than 2 examples: the cut check needs two per rank.
        """
        n, world = nested.batch_size(inputs), trainer.world_size
        if n < 2 * world:
            raise ValueError(
                f"the analysis set has {n} examples for {world} processes: every process needs at least 2 "
                f"(its shard is every {world}th example); raise size to >= {2 * world} or use fewer processes"
            )
        index = torch.arange(n)[trainer.global_rank :: world]
        shard = nested.to_device(nested.select(inputs, index), device)
        return nested.split(shard, self.batch_size), index

    def _reduce(self, trainer: L.Trainer) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if trainer.world_size == 1:
            return None
        return lambda t: trainer.strategy.reduce(t.clone(), reduce_op="sum")

    def _maybe_analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step in self.analysed_steps:
            return
        # Eval mode for every analysis forward (NaN check and co-firing too): BatchNorm statistics and
        # dropout masks must not change, so that training follows the same trajectory with the callback.
        with preserved_rng(), num_threads(self.threads), torch.inference_mode(False), torch.enable_grad(), \
                analysis_mode(pl_module, None):
            self._analyse(trainer, pl_module, step)

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, reduce) -> tuple[list, torch.Tensor, bool]:
        """This rank's batches, their global indices, and whether every rank's activations are finite.

        Whatever fails here on one rank (an empty loader, a shard too small, a forward that raises) is
        made known to every rank by the first collective, so that all of them raise and none waits.
        """
        error, batches, index, finite = None, [], torch.zeros(0, dtype=torch.long), True
        try:
            inputs = self.analysis_inputs(trainer, pl_module)
            batches, index = self._shard(trainer, inputs, pl_module.device)
            finite = self._finite(pl_module, batches)
        except Exception as err:
            if trainer.world_size == 1:
                raise
            error = err
        flags = reduce(torch.tensor([error is not None, not finite], dtype=torch.float64, device=pl_module.device))
        if error is not None:
            raise error
        if flags[0].item() > 0:
            raise RuntimeError("the LIB analysis failed on another process before its first collective; see its error")
        return batches, index, flags[1].item() == 0

    def _analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        start = time.perf_counter()
        folder = self._folder(trainer)  # trainer.log_dir broadcasts: every rank must ask
        reduce = self._reduce(trainer) or (lambda t: t)
        # Every rank learns whether any rank saw a NaN (or failed) before the analysis' collectives start.
        batches, index, finite = self._prepare(trainer, pl_module, reduce)
        if not finite:
            self.skipped += 1
            rank_zero_warn(f"LIB analysis at step {step} skipped: NaN or Inf in the activations of {self._names}")
            self._log(trainer, {"lib/skipped": float(self.skipped)}, step)
            return
        phases: dict[str, float] = {}
        clock = [time.perf_counter()]

        def progress(phase: str, done: int, total: int) -> None:
            now = time.perf_counter()
            key = f"lib/time/{phase.split(' ')[0]}_s"
            phases[key] = phases.get(key, 0.0) + now - clock[0]
            clock[0] = now

        graphs = build_graphs(
            pl_module, self.layers, batches, forward=self.forward, reduce=reduce, progress=progress,
            **self.build_kwargs,
        )
        built = time.perf_counter()
        summary = summarise(graphs, self.options, self.snapshot, strict=False)  # a metric never aborts training
        metrics = dict(summary.metrics)
        self._report_errors(summary.errors, step)
        metrics.update(self._relu_metrics(pl_module, batches, index, reduce))
        summarised = time.perf_counter()
        metrics["lib/skipped"] = float(self.skipped)
        metrics["lib/metric_errors"] = float(self.metric_errors)
        metrics["lib/time/build_s"] = built - start
        metrics.update(phases)
        metrics["lib/time/summary_s"] = summarised - built
        self.snapshot = summary.snapshot
        self.history.append({"step": step, "metrics": metrics})
        if trainer.is_global_zero:
            if self.save:
                self._write(lambda: self._save(folder, graphs, metrics, step), f"the LIB analysis of step {step}")
            metrics["lib/save_errors"] = float(self.save_errors)
            self._log(trainer, metrics, step)
            self._write(lambda: self._log_extras(trainer, graphs, summary, step), f"the LIB figures of step {step}")
        self.history[-1]["seconds"] = time.perf_counter() - start
        rank_zero_info(self._one_line(step, metrics, self.history[-1]["seconds"]))

    def _report_errors(self, errors: dict[str, str], step: int) -> None:
        """Counts the metrics that failed (``lib/metric_errors``, cumulative, like ``lib/skipped``) and warns."""
        if not errors:
            return
        self.metric_errors += len(errors)
        listed = "; ".join(f"{name}: {message}" for name, message in errors.items())
        rank_zero_warn(f"LIB analysis at step {step}: {len(errors)} metric(s) failed and were skipped ({listed})")

    @property
    def _names(self) -> list[str]:
        return short_names([layer.name for layer in self.layers])

    def _finite(self, pl_module: L.LightningModule, batches: list) -> bool:
        with torch.no_grad():
            for b, inputs in enumerate(batches):
                try:
                    acts = capture(pl_module, self.layers, inputs, self.forward)
                except Exception as err:
                    if b == 0:
                        err.add_note(
                            f"LIBAnalysis called forward(pl_module, inputs) with inputs {nested.describe(inputs)} "
                            "(from batch_inputs(batch)); give forward= and batch_inputs= that fit the module"
                        )
                    raise
                self._check_batch_first(acts, nested.batch_size(inputs))
                if not all(torch.isfinite(a.sum()) for a in acts):
                    return False
        return True

    def _check_batch_first(self, acts: list[torch.Tensor], batch: int) -> None:
        """Raises ``ValueError`` naming a node layer whose activation's first dimension is not the batch."""
        for layer, a in zip(self.layers, acts):
            if a.shape[0] != batch:
                raise ValueError(
                    f"node layer {layer.name!r} has an activation of shape {tuple(a.shape)} (batch, pos, d) for "
                    f"inputs of batch size {batch}: its first dimension must be the batch (a module with "
                    "batch_first=False puts the sequence first)"
                )

    def _relu_metrics(self, pl_module, batches, index, reduce) -> dict[str, float]:
        if not self.relu_layers:
            return {}
        groups = relu_coactivation(pl_module, self.relu_layers, batches, index, self.seed, self.forward, reduce)
        names = short_names([layer.name for layer in self.relu_layers])
        keys = ("n_dead", "n_always", "n_groups", "n_redundant", "largest_group")
        return {f"relu/{name}/{key}": float(getattr(g, key)) for name, g in zip(names, groups) for key in keys}

    # ----------------------------------------------------------------- logging and files (rank zero)
    def _log(self, trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _log_extras(self, trainer, graphs, summary, step: int) -> None:
        writers = tensorboards(trainer)
        if not writers and (self.images or self.histograms) and trainer.loggers and not self._warned_images:
            self._warned_images = True
            rank_zero_warn("LIBAnalysis: no logger can take images or histograms (TensorBoard can); logging scalars only")
        log_lib_figures(writers, self._names, graphs, summary, step, self.images, self.histograms)

    def _write(self, write: Callable[[], None], what: str) -> None:
        """Runs a file write of the analysis; a failure (full disk) is counted in ``save_errors``, not raised."""
        def warn(message: str) -> None:
            rank_zero_warn(f"{type(self).__name__}: {message}")

        self.save_errors = write_or_count(write, what, self.save_errors, warn)

    def _folder(self, trainer: L.Trainer) -> str:
        root = trainer.log_dir or trainer.default_root_dir
        return os.path.join(root, "lib" if self.name is None else f"lib_{self.name}")

    def _save(self, folder: str, graphs, metrics: dict[str, float], step: int) -> None:
        os.makedirs(folder, exist_ok=True)
        save_graphs(graphs, os.path.join(folder, f"step_{step:08d}.pt"))
        atomic_write_text(os.path.join(folder, f"step_{step:08d}.json"), json.dumps({"step": step, "metrics": metrics}, indent=1))

    def _one_line(self, step: int, metrics: dict[str, float], seconds: float) -> str:
        dims = " ".join(f"{n}={int(metrics.get(f'lib/{n}/dim_rel', -1))}" for n in self._names if f"lib/{n}/dim_rel" in metrics)
        q = metrics.get("graph/modularity")
        return f"LIB step {step}: dim_rel {dims}" + (f", modularity {q:.3f}" if q is not None else "") + f" ({seconds:.1f} s)"
