"""The result of an analysis: bases of every node layer and the edges between them, saved as plain tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from lib_lightning.core.lib.basis import LayerBasis
from lib_lightning.core.lib.files import atomic_write

__all__ = ["InteractionGraph", "save_graphs", "load_graphs"]


@dataclass(frozen=True)
class InteractionGraph:
    """Bases of every node layer and the edges between adjacent layers, for one basis kind.

    Attributes:
        kind: ``"lib"``, ``"pca"`` or ``"neuron"``.
        layers: one :class:`LayerBasis` per node layer, input side first.
        edges: ``edges[l]`` of shape ``(d_lib[l+1], d_lib[l])``, rows = output features (spec §4).
        n_examples: number of examples the sums ran over.
    """

    kind: str
    layers: tuple[LayerBasis, ...]
    edges: tuple[torch.Tensor, ...]
    n_examples: int

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def dims(self) -> list[int]:
        return [layer.d_lib for layer in self.layers]

    def to_state(self) -> dict[str, Any]:
        """Plain tensors, strings and numbers only (``torch.load(weights_only=True)`` reads it)."""
        return {
            "kind": self.kind,
            "n_examples": self.n_examples,
            "layers": [
                {f: getattr(layer, f) for f in ("name", "kind", "basis", "basis_pinv", "lambdas", "pca_eigenvalues", "has_constant")}
                for layer in self.layers
            ],
            "edges": list(self.edges),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> InteractionGraph:
        layers = tuple(LayerBasis(**layer) for layer in state["layers"])
        return cls(state["kind"], layers, tuple(state["edges"]), int(state["n_examples"]))


def save_graphs(graphs: dict[str, InteractionGraph], path: str | os.PathLike) -> None:
    """Writes graphs atomically (temporary file in the same folder, then rename)."""
    atomic_write(path, lambda tmp: torch.save({kind: g.to_state() for kind, g in graphs.items()}, tmp))


def load_graphs(path: str | os.PathLike) -> dict[str, InteractionGraph]:
    """Reads graphs written by :func:`save_graphs` without unpickling arbitrary objects."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {kind: InteractionGraph.from_state(s) for kind, s in state.items()}
