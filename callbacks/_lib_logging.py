"""Logging and files of the LIB callbacks (global rank zero): scalars to every logger, figures to
TensorBoard, analyses to ``<log_dir>/lib/step_<step>.{pt,json}``, and the one-line progress message.

A mixin of :class:`callbacks.lib_analysis.LIBAnalysis`: it reads the callback's ``name``, ``layers``,
``images`` and ``histograms`` and counts failed writes in ``save_errors`` and failed metrics in
``metric_errors``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from callbacks._tensorboard import log_lib_figures, tensorboards
from lib_lightning.core.lib.files import atomic_write_text
from lib_lightning.core.lib.graph import save_graphs
from lib_lightning.core.metrics.summary import short_names
from lib_lightning.runtime import write_or_count

__all__ = ["AnalysisLogging", "PhaseTimes"]


class PhaseTimes:
    """A ``progress`` for :func:`~lib_lightning.core.lib.build_graphs`: seconds per phase, as the
    scalars ``lib/time/<phase>_s`` (a phase is the first word: statistics, jacobians, edges)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        key = f"lib/time/{phase.split(' ')[0]}_s"
        self.seconds[key] = self.seconds.get(key, 0.0) + now - self._last
        self._last = now


class AnalysisLogging:
    """Where the LIB callbacks' results go; a failed write is counted and warned about, never raised."""

    _warned_images = False

    @property
    def _names(self) -> list[str]:
        return short_names([layer.name for layer in self.layers])

    def _report_errors(self, errors: dict[str, str], step: int) -> None:
        """Counts the metrics that failed (``lib/metric_errors``, cumulative, like ``lib/skipped``) and warns."""
        if not errors:
            return
        self.metric_errors += len(errors)
        listed = "; ".join(f"{name}: {message}" for name, message in errors.items())
        rank_zero_warn(f"LIB analysis at step {step}: {len(errors)} metric(s) failed and were skipped ({listed})")

    def _log(self, trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _log_extras(self, trainer, graphs, summary, step: int, figures: bool = True) -> None:
        """Text summary at every analysis; images and histograms (as the callback asks) when ``figures``."""
        writers = tensorboards(trainer)
        if not writers and (self.images or self.histograms) and trainer.loggers and not self._warned_images:
            self._warned_images = True
            rank_zero_warn(
                "LIBAnalysis: no logger can take images or histograms (TensorBoard can); logging scalars only"
            )
        images, histograms = self.images and figures, self.histograms and figures
        log_lib_figures(writers, self._names, graphs, summary, step, images, histograms)

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
        text = json.dumps({"step": step, "metrics": metrics}, indent=1)
        atomic_write_text(os.path.join(folder, f"step_{step:08d}.json"), text)

    def _one_line(self, step: int, metrics: dict[str, float], seconds: float) -> str:
        dims = " ".join(f"{n}={int(metrics[f'lib/{n}/dim_rel'])}" for n in self._names if f"lib/{n}/dim_rel" in metrics)
        q = metrics.get("graph/modularity")
        modularity = f", modularity {q:.3f}" if q is not None else ""
        return f"LIB step {step}: dim_rel {dims}{modularity} ({seconds:.1f} s)"
