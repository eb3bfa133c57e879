"""The rows of a section's Jacobian, taken as vector-Jacobian products (:mod:`lib_lightning.core.lib.jacobian`).

A :class:`Rows` plan gives the cotangent of each row: an output neuron or a feature of the next layer's
basis at one output position (:class:`FeatureRows`), a stochastic source's signed sum over positions
(:class:`SourceRows`), or given directions (:class:`GivenRows`). :func:`row_grads` takes a block of rows,
one VJP per row or several through one vmapped call (``vjp_rows``).
"""

from __future__ import annotations

import math

import torch

from lib_lightning.core.lib.basis import LayerBasis

__all__ = ["Rows", "FeatureRows", "SourceRows", "GivenRows", "jacobian_rows", "row_grads"]


class Rows:
    """The cotangents of one VJP sweep over a section output ``(batch, pos_out, d_out)``: ``n_rows`` of
    them, row r by :meth:`row` (``(pos_out, d_out)`` for every example alike, or ``(batch, pos_out,
    d_out)``), laid out as ``layout`` (the shape the rows take in the result)."""

    n_rows: int
    layout: tuple[int, ...]

    def row(self, r: int) -> torch.Tensor:
        raise NotImplementedError


class FeatureRows(Rows):
    """One row per (output position t, output coordinate i): cotangent ``cot[:, i]`` at position t."""

    def __init__(self, cot: torch.Tensor, out: torch.Tensor) -> None:
        _, pos_out, d_out = out.shape
        self.cot, self.k = cot, cot.shape[1]  # (d_out, k)
        self.n_rows, self.layout = pos_out * self.k, (pos_out, self.k)
        self.grad_out = torch.zeros(pos_out, d_out, dtype=out.dtype, device=out.device)

    def row(self, r: int) -> torch.Tensor:
        t, i = divmod(r, self.k)
        self.grad_out.zero_()
        self.grad_out[t] = self.cot[:, i]
        return self.grad_out


class SourceRows(Rows):
    """One row per (stochastic source r, output coordinate i): Σ_t φ_{x,r,t} cot[:, i] / √R at every t."""

    def __init__(self, cot: torch.Tensor, signs: torch.Tensor, out: torch.Tensor) -> None:
        batch, pos_out, _ = out.shape
        if signs.dim() != 3 or signs.shape[0] != batch or signs.shape[2] != pos_out:
            raise ValueError(
                f"signs of shape {tuple(signs.shape)} do not match (batch, n_sources, pos_out) = "
                f"({batch}, n_sources, {pos_out})"
            )
        n_sources = signs.shape[1]
        self.phi = signs.to(device=out.device, dtype=out.dtype) / math.sqrt(n_sources)  # (batch, R, pos_out)
        self.cot, self.k = cot, cot.shape[1]
        self.n_rows, self.layout = n_sources * self.k, (n_sources, self.k)

    def row(self, r: int) -> torch.Tensor:
        return self.phi[:, r // self.k, :, None] * self.cot[:, r % self.k]  # (batch, pos_out, d_out)


class GivenRows(Rows):
    """The given cotangents ``(n, pos_out, d_out)``, shared by every example."""

    def __init__(self, cotangents: torch.Tensor, out: torch.Tensor) -> None:
        self.cot = cotangents.to(device=out.device, dtype=out.dtype)
        if self.cot.shape[1:] != out.shape[1:]:
            raise ValueError(
                f"cotangents of shape {tuple(self.cot.shape)} do not match the section's output {tuple(out.shape)}"
            )
        self.n_rows, self.layout = self.cot.shape[0], (self.cot.shape[0],)

    def row(self, r: int) -> torch.Tensor:
        return self.cot[r]


def jacobian_rows(out: torch.Tensor, out_basis: LayerBasis | None, signs: torch.Tensor | None) -> Rows:
    """The rows of J̄: output neurons, or the features of ``out_basis``; per position, or per source."""
    if out_basis is None:
        cot = torch.eye(out.shape[2], dtype=out.dtype, device=out.device)
    else:
        cot = out_basis.basis[: out.shape[2]].to(device=out.device, dtype=out.dtype)  # (d_out, k)
    return FeatureRows(cot, out) if signs is None else SourceRows(cot, signs, out)


def row_grads(out: torch.Tensor, leaf: torch.Tensor, plan: Rows, first: int, last: int, retain: bool,
               per_call: int):
    """Rows ``first:last`` of ``plan`` as VJPs of ``out`` w.r.t. ``leaf``: ``(batch, pos_in, rows, d_in)``, or
    None where ``out`` does not depend on ``leaf``; several rows go through one vmapped call (``per_call``:
    the setting that asked for them, named if they run out of memory)."""
    if last - first == 1:
        (grad,) = torch.autograd.grad(out, leaf, plan.row(first).expand(out.shape), retain_graph=retain,
                                      allow_unused=True)
        return None if grad is None else grad.unsqueeze(2)
    # row() may refill one buffer: each row is copied (at its own size) before the next is asked for
    cot = torch.stack([plan.row(r).clone().expand(out.shape) for r in range(first, last)])
    try:
        (grad,) = torch.autograd.grad(out, leaf, cot, retain_graph=retain, allow_unused=True, is_grads_batched=True)
    except torch.OutOfMemoryError as err:
        raise torch.OutOfMemoryError(
            f"out of memory taking {last - first} Jacobian rows in one autograd call (vjp_rows={per_call}) on a "
            f"chunk of {out.shape[0]} examples: set vjp_rows lower (1 takes one row at a time, the least "
            f"memory) or chunk_size lower"
        ) from err
    return None if grad is None else grad.permute(1, 2, 0, 3)
