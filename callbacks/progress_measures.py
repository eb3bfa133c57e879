"""Grokking progress measures on the training timeline: restricted and excluded loss of modular addition.

The callback decides when; :func:`lib_lightning.tasks.modadd.progress.progress_measures` decides how. The measures
sit on the same step axis as the LIB callback's degeneracy, sparsity and modularity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from callbacks._tensorboard import write_overview, write_text
from lib_lightning.core.lib.capture import NodeLayer, default_forward, resolve_modules
from lib_lightning.data.modadd import modular_addition_pairs
from lib_lightning.runtime import import_callable, num_threads, preserved_rng, starts_fresh
from lib_lightning.tasks.modadd.fourier import embedding_frequency_power, key_frequencies, logit_frequency_power
from lib_lightning.tasks.modadd.progress import progress_measures

__all__ = ["ProgressMeasures"]

SOURCES = ("embedding", "logits")


class ProgressMeasures(Callback):
    """Logs Nanda et al.'s restricted and excluded loss of a modular-addition model every N steps.

    On every one of the p² pairs the logits are split into their key-frequency part K(L) (the terms
    cos(k(a+b)), sin(k(a+b)) of the key frequencies k) and the rest. Logged at the training step (global
    rank zero): ``progress/restricted_loss`` (logits = mean + K(L), on every pair),
    ``progress/excluded_loss`` (logits = L − K(L), on the training pairs), ``progress/loss_all`` and
    ``progress/loss_train`` (unablated, on the same sets) and ``progress/n_key_frequencies``; the key
    frequencies themselves, strongest first, go to a TensorBoard logger as one text entry per step,
    ``progress/key_frequencies``, and into :attr:`history`.

    Key frequencies: fixed with ``key_frequencies`` (for example those of the final model, as Nanda et
    al. do), or found at each analysis from the current model: the frequencies with at least
    ``rel_threshold`` × the largest power of the token embedding (``source="embedding"``) or of the
    logits' a+b terms (``source="logits"``).

    Args:
        every_n_steps: the schedule, >= 1.
        at_start: also measure before the first step.
        key_frequencies: fixed key frequencies in [1, p // 2]; None: found at each analysis.
        source: ``"embedding"`` or ``"logits"``, when the key frequencies are found.
        rel_threshold: key frequencies have at least this fraction of the strongest one's power, in (0, 1].
        embedding: module path of the token embedding (its ``weight[:p]`` rows are the tokens 0 … p−1).
        p: the modulus; default ``pl_module.hparams.p`` or the datamodule's ``p``.
        forward: ``"pkg.module:function"`` called as ``function(pl_module, tokens)`` -> logits; default
            ``pl_module(tokens)``.
        batch_size: pairs per forward pass.
        threads: torch threads during the measurement (default: unchanged).
        name: distinguishes several instances in checkpoints.

    Raises:
        ValueError: for an argument outside its valid range, naming it and the valid choices.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        at_start: bool = True,
        key_frequencies: Sequence[int] | None = None,
        source: str = "embedding",
        rel_threshold: float = 0.1,
        embedding: str = "model.embed",
        p: int | None = None,
        forward: str | Callable | None = None,
        batch_size: int = 4096,
        threads: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if not 0 < rel_threshold <= 1:
            raise ValueError(f"rel_threshold must be in (0, 1], got {rel_threshold}")
        if p is not None and p < 2:
            raise ValueError(f"p must be >= 2, got {p}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        if key_frequencies is not None and not key_frequencies:
            raise ValueError("key_frequencies must name at least one frequency, or be None to find them")
        self.every_n_steps, self.at_start, self.source, self.rel_threshold = every_n_steps, at_start, source, rel_threshold
        self.fixed = None if key_frequencies is None else tuple(int(k) for k in key_frequencies)
        self.embedding, self.p, self.batch_size, self.threads, self.name = embedding, p, batch_size, threads, name
        self.forward = import_callable(forward) or default_forward
        self.history: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            name=self.name, every_n_steps=self.every_n_steps, source=self.source, key_frequencies=self.fixed
        )

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    @property
    def measured_steps(self) -> list[int]:
        return [entry["step"] for entry in self.history]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.p is None:
            hparams = getattr(pl_module, "hparams", {})
            p = hparams.get("p") if hasattr(hparams, "get") else None
            p = p if p is not None else getattr(trainer.datamodule, "p", None)
            if p is None:
                raise ValueError(
                    "ProgressMeasures needs the modulus: give p=, or a module with hparams.p or a datamodule with .p"
                )
            self.p = int(p)
        if self.fixed is not None:
            bad = [k for k in self.fixed if not 1 <= k <= self.p // 2]
            if bad:
                raise ValueError(f"key_frequencies must be in [1, {self.p // 2}] for p={self.p}, got {bad}")
        elif self.source == "embedding":
            resolve_modules(pl_module, [NodeLayer(self.embedding)])  # an unknown name lists the available ones

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        write_overview(trainer, pl_module, self)  # layout and HParams of the run, by the first analysis callback

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and starts_fresh(trainer):
            self._maybe_measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._maybe_measure(trainer, pl_module)

    def _maybe_measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step in self.measured_steps:
            return
        training = {m: m.training for m in pl_module.modules()}
        try:
            pl_module.eval()
            with preserved_rng(), num_threads(self.threads), torch.no_grad():
                metrics, frequencies = self.measure(trainer, pl_module)
        finally:
            for m, flag in training.items():
                m.training = flag
        self.history.append({"step": step, "metrics": metrics, "key_frequencies": list(frequencies)})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        write_text(trainer, "progress/key_frequencies", self._frequency_text(frequencies), step)
        rank_zero_info(
            f"progress step {step}: restricted {metrics.get('progress/restricted_loss', float('nan')):.3g}, "
            f"excluded {metrics.get('progress/excluded_loss', float('nan')):.3g}, key frequencies {list(frequencies)}"
        )

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[dict[str, float], tuple[int, ...]]:
        """The metrics of the current model and the key frequencies used."""
        p = self.p
        tokens, labels = modular_addition_pairs(p)
        tokens = tokens.to(pl_module.device)
        size = self.batch_size
        logits = torch.cat([self.forward(pl_module, tokens[i : i + size]) for i in range(0, p * p, size)])
        logits = logits.detach().cpu().to(torch.float64)  # (p*p, p)
        if self.fixed is not None:
            frequencies = self.fixed
        elif self.source == "embedding":
            weight = dict(pl_module.named_modules())[self.embedding].weight
            frequencies = tuple(key_frequencies(embedding_frequency_power(weight[:p].cpu()), self.rel_threshold))
        else:
            frequencies = tuple(key_frequencies(logit_frequency_power(logits, p), self.rel_threshold))
        datamodule = trainer.datamodule
        train_idx = getattr(datamodule, "train_idx", None)
        train_idx = torch.arange(p * p) if train_idx is None else torch.as_tensor(train_idx).cpu()
        measures = progress_measures(logits, labels, p, frequencies, excluded_index=train_idx) if frequencies else None
        metrics = {"progress/n_key_frequencies": float(len(frequencies))}
        if measures is not None:
            metrics.update({
                "progress/restricted_loss": measures.restricted_loss,
                "progress/excluded_loss": measures.excluded_loss,
                "progress/loss_all": measures.loss_restricted_set,
                "progress/loss_train": measures.loss_excluded_set,
            })
        return metrics, frequencies

    def _frequency_text(self, frequencies: Sequence[int]) -> str:
        """The key frequencies, strongest first, and how they were chosen (a TensorBoard text entry)."""
        if self.fixed is not None:
            how = "fixed by the key_frequencies argument"
        else:
            how = f"{self.source} power >= {self.rel_threshold:g} × the strongest"
        return f"key frequencies ({how}): " + (", ".join(str(k) for k in frequencies) if frequencies else "none")
