"""The LIB callback's ReLU co-firing counts (:mod:`callbacks.lib_analysis`), read in its build's statistics pass."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lib_lightning.core.lib import batch as nested
from lib_lightning.core.lib.capture import NodeLayer
from lib_lightning.core.metrics.coactivation import CoactivationSums
from lib_lightning.core.metrics.summary import short_names

__all__ = ["Cofiring"]


class Cofiring:
    """The ReLU co-firing counts of the callback's ``relu_layers``, summed batch by batch as the build's
    statistics pass reads them (no forward of their own), then reduced across ranks."""

    def __init__(self, layers: Sequence[NodeLayer], batches: list, index: torch.Tensor, seed: int) -> None:
        self.layers, self.index, self.sums = layers, index, CoactivationSums(len(layers), seed)
        self.offsets = np.cumsum([0] + [nested.batch_size(b) for b in batches]).tolist()  # batch b: offsets[b:b+2]

    def update(self, b: int, acts: list[torch.Tensor]) -> None:
        self.sums.update(acts, self.index[self.offsets[b] : self.offsets[b + 1]])

    def metrics(self, device: torch.device, reduce) -> dict[str, float]:
        if not self.layers:
            return {}
        groups = self.sums.groups(device, reduce)
        names = short_names([layer.name for layer in self.layers])
        keys = ("n_dead", "n_always", "n_groups", "n_redundant", "largest_group")
        return {f"relu/{name}/{key}": float(getattr(g, key)) for name, g in zip(names, groups) for key in keys}
