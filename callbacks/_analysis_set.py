"""The analysis set of the LIB callbacks: drawn once, sharded by rank, checked before the first analysis.

A mixin of :class:`callbacks.lib_analysis.LIBAnalysis` (and so of :class:`callbacks.ablation.Ablation`):
it reads the callback's ``split``, ``size``, ``seed``, ``batch_size``, ``batch_inputs``, ``layers`` and
``forward``, and keeps the set in ``_inputs`` (``_drawn``: whether it came from a dataloader, and so
belongs in the checkpoint).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lib_lightning.core.lib import batch as nested
from lib_lightning.core.lib import check_build
from lib_lightning.core.lib.capture import capture
from lib_lightning.core.lib.checks import check_batch_dim
from lib_lightning.runtime import oversize_message

__all__ = ["AnalysisSet"]


class AnalysisSet:
    """Selection of the fixed analysis set: from the datamodule's ``analysis_inputs`` or the first
    examples of the split's dataloader, one shard per rank, and the structural checks of the first analysis."""

    _inputs: Any = None  # the analysis set, on CPU
    _drawn = False  # whether it was drawn from a dataloader (then it is kept in checkpoints)
    _warned_state = False
    _checked = False  # whether the structural checks passed in this fit (not saved: a resume checks again)

    def _set_state(self) -> dict[str, Any]:
        """The set for the checkpoint when it was drawn from a dataloader (a shuffling loader does not
        draw it again alike); a set that cannot be saved is warned about once and drawn again on resume."""
        if not (self._drawn and self._inputs is not None):
            return {}
        try:
            return {"inputs": nested.to_state(self._inputs)}
        except NotImplementedError as err:
            if not self._warned_state:
                self._warned_state = True
                rank_zero_warn(
                    f"{type(self).__name__}: the analysis set is not saved in the checkpoint ({err}); "
                    "a resumed run draws it again"
                )
            return {}

    def _load_set_state(self, state: dict[str, Any]) -> None:
        if state.get("inputs") is not None:
            self._inputs, self._drawn = nested.from_state(state["inputs"]), True

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

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, reduce) -> tuple[list, torch.Tensor, bool]:
        """This rank's batches, their global indices, and whether the structural checks found every rank's
        first batch finite (later NaN or Inf is found by the build's statistics pass, on every rank alike).

        The structural checks (the forward on the first batch and its batch dimension, the build's order,
        independence and cut checks and its memory guard) run at the first analysis of each fit, resumed or
        not, until one passes: they depend on the model's modules and the fixed set's shapes, which do not
        change between analyses. Whatever fails here on one rank (an empty loader, a shard too small, a
        forward that raises, a failed check) is made known to every rank by the first collective, so that
        all of them raise and none waits.
        """
        error, batches, index, finite = None, [], torch.zeros(0, dtype=torch.long), True
        try:
            inputs = self.analysis_inputs(trainer, pl_module)
            batches, index = self._shard(trainer, inputs, pl_module.device)
            if not self._checked:
                finite = self._finite(pl_module, batches[:1])
                if finite:  # the build's own checks, before its first collective (it then skips them)
                    check_build(pl_module, self.layers, batches, forward=self.forward, **self.build_kwargs)
        except Exception as err:
            if trainer.world_size == 1:
                raise
            error = err
        flags = reduce(torch.tensor([error is not None, not finite], dtype=torch.float64, device=pl_module.device))
        if error is not None:
            raise error
        if flags[0].item() > 0:
            raise RuntimeError("the LIB analysis failed on another process before its first collective; see its error")
        finite = flags[1].item() == 0
        self._checked = self._checked or finite  # alike on every rank: the flags are reduced
        return batches, index, finite

    def _finite(self, pl_module: L.LightningModule, batches: list) -> bool:
        """Whether the node layers' activations on ``batches`` are finite; a forward that fails on the
        first batch is explained (inputs and the arguments that fit them), a wrong batch dimension named."""
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
                check_batch_dim(self.layers, acts, nested.batch_size(inputs))
                if not all(torch.isfinite(a.sum()) for a in acts):
                    return False
        return True
