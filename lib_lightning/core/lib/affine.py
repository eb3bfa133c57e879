"""Chunks whose section has one Jacobian for every example: taken at one example instead of all of them.

An affine section (the unembedding; any chain of Linear layers) has the same integrated Jacobian J̄ at
every example, so the chunk needs one set of VJPs at a single example, not one set over the batch. A
section is never assumed affine: every chunk is probed. The integrated VJPs of two random cotangents
(the same for every example) are taken over the chunk's first :data:`PROBE_FIRST` examples, then, if they
agree, over the whole chunk (the attention and MLP of the main job's callback differ on the first few: 4
examples' probe instead of 400's), at the very point and with the very rule
of the Jacobian; the chunk is *shared* when every example's VJPs equal the first example's to ``rtol``
relative (rounding). Otherwise the caller takes the per-example path.

A non-affine section may still have one Jacobian on the data: a ReLU MLP whose units do not flip
between the examples of a chunk. The probe treats that as shared, and this is still exact: what the
fast path returns *is* every example's own J̄ (the same activation pattern gives the same matrix). What
is checked is the quantity used, not a property of the model.

The one example's rows are taken several per autograd call (batched through vmap): as many rows per call
as the per-example path takes example-rows (the chunk's examples × ``rows_per_call``), so no more memory
per call, and every row of the usual chunks in one call: on CPU the training callback's unembedding (113
rows) takes 2.7 ms instead of 11 ms one row at a time, with the same numbers. A section whose backward
vmap cannot batch (an error from the batched call) takes them as the per-example path does. The probe
stays one VJP per direction: its two directions batched were no faster on CPU (benchmarks/README.md).

The result keeps a batch dimension of 1, broadcast against the chunk's activations: M′ counts it once
per example (``m_prime_update(g, repeat=batch)``) and the edges multiply the one J̄ C⁺ᵀ by each
example's f̂ (:func:`~lib_lightning.core.lib.jacobian.edge_attributions`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lib_lightning.core.lib.basis import LayerBasis
from lib_lightning.core.lib.capture import Forward, NodeLayer, select_examples
from lib_lightning.core.lib.integration import IntegrationRule
from lib_lightning.core.lib.jacobian import GivenRows, batch_size, integrated_jacobian, integrated_vjps, point_of

__all__ = ["PROBE_DIRECTIONS", "PROBE_FIRST", "same_for_every_example", "shared_jacobian", "is_shared"]

PROBE_DIRECTIONS = 2  # random cotangents per chunk: one would do almost surely; two cost little more
PROBE_FIRST = 4  # examples probed first: a section whose few first examples differ is not probed on the rest


def same_for_every_example(vjps: torch.Tensor, rtol: float) -> bool:
    """Whether every example's VJPs ``(batch, ...)`` equal the first example's to ``rtol`` × its largest entry."""
    first = vjps[:1]
    return bool((vjps - first).abs().max() <= rtol * first.abs().max())


class _RandomRows(GivenRows):
    """``n`` standard normal cotangents of the section's output shape, the same for every example."""

    def __init__(self, seed: int, n: int, out: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(seed)
        super().__init__(torch.randn((n, *out.shape[1:]), generator=gen, dtype=torch.float64), out)


def shared_jacobian(
    model: nn.Module,
    layer_in: NodeLayer,
    layer_out: NodeLayer,
    inputs: Any,
    rule: IntegrationRule,
    forward: Forward,
    rtol: float,
    seed: int,
    point: Callable[[torch.Tensor], torch.Tensor] | None = None,
    out_basis: LayerBasis | None = None,
    rows_per_call: int = 1,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The chunk's point and its one J̄, if the probe finds it shared by every example; else ``None``.

    Args: as :func:`~lib_lightning.core.lib.jacobian.integrated_jacobian` (without stochastic signs,
        whose rows differ per example), plus ``rtol`` (relative agreement of the probe VJPs) and
        ``seed`` (of the probe's cotangents); ``rows_per_call`` is the per-example path's: the one
        example takes the chunk's examples × ``rows_per_call`` rows per autograd call.

    Returns:
        acts ``(batch, pos_in, d_in)`` and jac ``(1, pos_in, pos_out, k, d_in)`` (J̄ at the first example,
        every example's J̄), or ``None`` when the chunk has fewer than 2 examples or a probe VJP differs.

    Raises:
        ValueError: if the activation or the Jacobian contains NaN or Inf.
    """
    batch = batch_size(inputs)
    if batch < 2:
        return None
    rows = functools.partial(_RandomRows, seed, PROBE_DIRECTIONS)

    def probed(examples: Any) -> tuple[torch.Tensor, bool]:
        """The examples' point, and whether their probe VJPs all equal the first example's."""
        acts = point_of(model, layer_in, examples, forward, point)
        probe, _ = integrated_vjps(model, layer_in, layer_out, examples, acts, rule, forward, rows)
        return acts, same_for_every_example(probe, rtol)

    # most sections that are not shared differ among the first few examples already, for a fraction of the cost
    if batch > PROBE_FIRST and not probed(select_examples(inputs, slice(0, PROBE_FIRST)))[1]:
        return None
    acts, shared = probed(inputs)
    if not shared:
        return None
    one = select_examples(inputs, slice(0, 1))
    args = (model, layer_in, layer_out, one, rule, forward, point, out_basis, None)
    try:  # as many rows per call as the per-example path takes example-rows
        return acts, integrated_jacobian(*args, batch * rows_per_call)[1]
    except RuntimeError as err:  # a backward that vmap cannot batch: the rows as the per-example path takes them
        if isinstance(err, torch.OutOfMemoryError):
            raise
        return acts, integrated_jacobian(*args, rows_per_call)[1]


def is_shared(acts: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether ``g`` is one J̄ shared by the chunk's examples (batch dimension 1 against several)."""
    return g.shape[0] == 1 < acts.shape[0]
