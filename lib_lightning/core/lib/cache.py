"""The Jacobian cache: chunks of one section kept between its basis pass and its LIB edges.

The LIB edges of a section need the basis of its input layer, which is built from M′ only after every
chunk's Jacobians have been taken. Chunks kept here (activation and ĝ) are not recomputed for the
edges; past the byte budget they are.
"""

from __future__ import annotations

import torch

__all__ = ["JacobianCache"]


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class JacobianCache:
    """Activations ``(batch, pos_in, d_in)`` and ĝ ``(batch, pos_in, pos_out, k, d_in)`` by chunk index,
    within ``budget_bytes`` (0: keep nothing). A chunk that does not fit is not kept; later, smaller
    chunks may still fit."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._chunks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def put(self, chunk: int, acts: torch.Tensor, g: torch.Tensor) -> bool:
        """Keeps chunk ``chunk`` if it fits in what is left of the budget; returns whether it was kept."""
        if chunk in self._chunks:
            raise KeyError(f"chunk {chunk} is already cached")
        size = _nbytes(g, acts)
        if self.nbytes + size > self.budget_bytes:
            return False
        self._chunks[chunk] = (acts, g)
        self.nbytes += size
        return True

    def pop(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept (acts, ĝ) of ``chunk``, removed from the cache, or ``None`` if it was not kept."""
        kept = self._chunks.pop(chunk, None)
        if kept is not None:
            self.nbytes -= _nbytes(*kept)
        return kept

    def __contains__(self, chunk: int) -> bool:
        return chunk in self._chunks

    def __len__(self) -> int:
        return len(self._chunks)
