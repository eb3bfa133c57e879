"""Integrated Jacobians of a section, chunk by chunk, and the sums built from them (M′ and edges).

For a chunk of examples, J̄ ``(batch, pos_in, pos_out, k, d_in)`` is Σ_q ω_q ∂f^{l+1}/∂f^l at
α_q f^l(x), with its output rows in neurons or in the features of the next layer's basis
(:mod:`lib_lightning.core.lib.rows`), taken with one vector-Jacobian product per output row on CPU
(measured faster there than vmap over VJPs or jacrev, and memory stays at one chunk) and several rows
per vmapped call on a GPU (``vjp_rows``). The model must treat examples independently (eval mode),
because the VJP of the batch sum is taken.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lib_lightning.core.lib.basis import LayerBasis
from lib_lightning.core.lib.batch import batch_size as _nested_batch_size
from lib_lightning.core.lib.capture import Forward, NodeLayer, capture, run_section, select_examples
from lib_lightning.core.lib.integration import IntegrationRule
from lib_lightning.core.lib.rows import GivenRows, Rows, jacobian_rows, row_grads

__all__ = [
    "batch_size",
    "split_batch",
    "chunks",
    "integrated_jacobian",
    "integrated_vjp",
    "integrated_vjps",
    "point_of",
    "GivenRows",
    "project",
    "m_prime_update",
    "edge_attributions",
    "edges_update",
    "M_PRIME_ROWS",
]

M_PRIME_ROWS = 4096  # rows of a float32 ĝ converted to float64 at a time for M′ (measured 1.4x faster than all)


def batch_size(inputs: Any) -> int:
    """The number of examples in model inputs (a tensor, or a nesting of tuples/lists/dicts/mappings of
    tensors, batch first); a leaf with another batch size is an error (see :mod:`lib_lightning.core.lib.batch`)."""
    return _nested_batch_size(inputs)


def split_batch(inputs: Any, chunk_size: int) -> Iterator[Any]:
    """Splits model inputs (a tensor or a nesting of tensors, batch first) into chunks."""
    n = batch_size(inputs)
    for start in range(0, n, chunk_size):
        yield select_examples(inputs, slice(start, start + chunk_size))


def chunks(batches: Iterable[Any], chunk_size: int) -> Iterator[Any]:
    """Every chunk of at most ``chunk_size`` examples of every batch, in order."""
    for inputs in batches:
        yield from split_batch(inputs, chunk_size)


def point_of(model: nn.Module, layer_in: NodeLayer, inputs: Any, forward: Forward, point) -> torch.Tensor:
    """The activation of ``layer_in`` mapped by ``point`` (if given): where the Jacobians are taken."""
    with torch.no_grad():
        (acts,) = capture(model, [layer_in], inputs, forward)
        if point is not None:
            acts = point(acts)
    if not torch.isfinite(acts.sum()):  # one reduction: a NaN or Inf anywhere makes the sum non-finite
        raise ValueError(f"activations of node layer {layer_in.name!r} contain NaN or Inf")
    return acts


def integrated_vjps(
    model: nn.Module,
    layer_in: NodeLayer,
    layer_out: NodeLayer,
    inputs: Any,
    acts: torch.Tensor,
    rule: IntegrationRule,
    forward: Forward,
    make_rows: Callable[[torch.Tensor], Rows],
    rows_per_call: int = 1,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Σ_q ω_q wᵣᵀ ∂f^{l+1}/∂f^l at α_q·acts for every cotangent wᵣ: ``(batch, pos_in, n_rows, d_in)``,
    and the rows' layout.

    ``make_rows(out)`` receives the section's output ``(batch, pos_out, d_out)`` and returns its
    :class:`Rows`. One VJP of the batch sum per row (the model must treat examples independently);
    ``rows_per_call`` > 1 takes that many rows per ``torch.autograd.grad`` call, batched through vmap
    (``is_grads_batched``): fewer, larger kernels, for accelerators (no faster on CPU, benchmarks/README.md).
    """
    batch, pos_in, d_in = acts.shape
    rows, plan = None, None
    for q, (alpha, weight) in enumerate(zip(rule.alphas.tolist(), rule.weights.tolist())):
        leaf = (alpha * acts).detach().requires_grad_(True)
        with torch.enable_grad():
            out = run_section(model, layer_in, layer_out, inputs, lambda _: leaf, forward)
        plan = make_rows(out)
        n_rows = plan.n_rows
        if rows is None:
            rows = torch.empty(batch, pos_in, n_rows, d_in, dtype=acts.dtype, device=acts.device)
        for first in range(0, n_rows, rows_per_call):
            last = min(first + rows_per_call, n_rows)
            grad = row_grads(out, leaf, plan, first, last, last < n_rows, rows_per_call)
            row = rows[:, :, first:last]  # (batch, pos_in, rows, d_in)
            if grad is None:  # the section does not depend on its input along these rows
                if q == 0:
                    row.zero_()
            elif q == 0:
                row.copy_(grad)
                if weight != 1.0:
                    row.mul_(weight)
            else:
                row.add_(grad, alpha=weight)
        del out, leaf
    return rows, plan.layout


def integrated_jacobian(
    model: nn.Module,
    layer_in: NodeLayer,
    layer_out: NodeLayer,
    inputs: Any,
    rule: IntegrationRule,
    forward: Forward,
    point: Callable[[torch.Tensor], torch.Tensor] | None = None,
    out_basis: LayerBasis | None = None,
    signs: torch.Tensor | None = None,
    rows_per_call: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation of ``layer_in`` and J̄ of the section, for one chunk.

    ``point`` maps the captured activation to the point where the Jacobian is evaluated (for example
    the reconstruction f C C⁺); by default the activation itself. The returned ``acts`` is that point.

    ``out_basis`` gives the output coordinates: with it, each VJP's cotangent is one of its feature
    columns (C^{l+1} without the constant row) at one output position, so the rows come out as
    ĝ = J̄ C^{l+1} directly: one VJP per kept feature instead of one per neuron, and no projection
    afterwards. Without it, the rows are the output neurons.

    ``signs`` ``(batch, n_sources, pos_out)`` of ±1 replaces the output positions by stochastic sources
    (spec §3): row (r, i) is Σ_t φ_{x,r,t} J̄_{t,i} / √R. Every quantity quadratic in the rows (M′, the
    squared edges) then sums over r to an unbiased estimate of its sum over t, exact when pos_out = 1,
    with R VJPs per feature instead of pos_out.

    ``rows_per_call``: rows per ``torch.autograd.grad`` call (see :func:`integrated_vjps`).

    Returns:
        acts ``(batch, pos_in, d_in)`` and jac ``(batch, pos_in, pos_out, k, d_in)`` (``pos_out`` becomes
        ``n_sources`` with ``signs``), ``k`` = ``d_out`` or ``out_basis.d_lib`` (for each input position,
        the rows and input coordinates are a matrix, so that the contractions with the input basis are
        plain matrix products).

    Raises:
        ValueError: if the activation or the Jacobian contains NaN or Inf, or ``signs`` do not match.
    """
    acts = point_of(model, layer_in, inputs, forward, point)
    make_rows = functools.partial(jacobian_rows, out_basis=out_basis, signs=signs)
    jac, layout = integrated_vjps(model, layer_in, layer_out, inputs, acts, rule, forward, make_rows, rows_per_call)
    if not torch.isfinite(jac.sum()):
        raise ValueError(f"the Jacobian of section {layer_in.name!r} -> {layer_out.name!r} contains NaN or Inf")
    batch, pos_in, d_in = acts.shape
    return acts, jac.view(batch, pos_in, *layout, d_in)


def integrated_vjp(
    model: nn.Module,
    layer_in: NodeLayer,
    layer_out: NodeLayer,
    inputs: Any,
    rule: IntegrationRule,
    forward: Forward,
    cotangents: torch.Tensor,
    point: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Integrated VJPs Σ_q ω_q wᵣᵀ J(α_q f) for a few cotangents ``(n, pos_out, d_out)`` shared by all examples.

    Returns ``(batch, pos_in, n, d_in)``: n rows of J̄ in the directions wᵣ, at the same point and with the
    same rule as :func:`integrated_jacobian` (used to probe whether two points have the same Jacobian).
    """
    acts = point_of(model, layer_in, inputs, forward, point)
    make_rows = functools.partial(GivenRows, cotangents)
    return integrated_vjps(model, layer_in, layer_out, inputs, acts, rule, forward, make_rows)[0]


def project(jac: torch.Tensor, basis_out: LayerBasis) -> torch.Tensor:
    """Output rows in neurons -> in the features of ``basis_out``: ĝ = J̄ C^{l+1},
    ``(batch, pos_in, pos_out, k, d_in)``.

    The constant row of C^{l+1} is left out: the constant is not an output of the section.
    """
    d_out = jac.shape[3]
    c_out = basis_out.basis[:d_out].to(jac.dtype)  # (d_out, k)
    return torch.matmul(c_out.T, jac)


def _in_float32(g: torch.Tensor) -> bool:
    """Whether a chunk's products are taken in float32 (float32 Jacobians); any other dtype: float64."""
    return g.dtype == torch.float32


def m_prime_update(g: torch.Tensor, repeat: int = 1) -> torch.Tensor:
    """Partial sum of M′ for a chunk: Σ_x Σ_s Σ_{t,i} ĝ_{s,t,i}ᵀ ĝ_{s,t,i}, with ĝ
    ``(batch, pos_in, pos_out, k_out, d_in)``.

    ``repeat``: how many examples share each ĝ (a chunk of an affine section holds one ĝ for all its
    examples, :mod:`lib_lightning.core.lib.affine`); the sum counts it that many times.

    A float32 ĝ is multiplied in float64 all the same, on purpose: products of float32 numbers are exact
    in float64, so M′ keeps the null space of the rows, which a float32 product rounds into small
    eigenvalues that the truncation keeps (tried on the trained mod-add checkpoint: 114 -> 129 kept LIB
    dimensions after the MLP, benchmarks/README.md). Its rows go to float64 :data:`M_PRIME_ROWS` at a
    time (a block that stays in cache) instead of as one float64 copy of the chunk.

    Returns ``(d_in + 1, d_in + 1)`` in float64; the constant coordinate's row and column are zero
    (the constant is not an input of the section).
    """
    d_in = g.shape[-1]
    m = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64, device=g.device)
    if _in_float32(g):
        rows = g.reshape(-1, d_in)
        for start in range(0, rows.shape[0], M_PRIME_ROWS):
            block = rows[start : start + M_PRIME_ROWS].to(torch.float64)
            m[:d_in, :d_in] += block.T @ block
    else:
        rows = g.reshape(-1, d_in).to(torch.float64)
        m[:d_in, :d_in] = rows.T @ rows
    return m if repeat == 1 else m.mul_(repeat)


def edge_attributions(
    acts: torch.Tensor, g: torch.Tensor, basis_in: LayerBasis, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Per-example attributions A ``(batch, pos_out, k_out, k_in)`` of the spec's squared edges (§4).

    A_{t,i,j}(x) = Σ_s [∂ĥ_{t,i}/∂f̂_{s,j}] f̂_{s,j}(x) with ∂ĥ/∂f̂ = ĝ C⁺ᵀ and ĝ = J̄ C^{l+1} (see
    :func:`project`); the α-sum is already inside J̄. One matrix product per input position over the
    whole chunk, in ``dtype`` (f̂ is taken in float64, then rounded to it). The constant coordinate
    carries no gradient, so only C⁺'s first d columns enter. A ĝ of batch 1 is shared by every example
    (an affine chunk): ĝ C⁺ᵀ is taken once.
    """
    n_g, pos_in, pos_out, k_out, d_in = g.shape
    batch = acts.shape[0]
    f_hat = basis_in.transform(acts.to(torch.float64)).to(dtype)  # (batch, pos_in, k_in)
    pinv_t = basis_in.basis_pinv[:, :d_in].T.to(dtype)  # (d_in, k_in)
    a = None
    for s in range(pos_in):
        part = torch.matmul(g[:, s].reshape(n_g, pos_out * k_out, d_in).to(dtype), pinv_t)
        part = part.mul_(f_hat[:, s, None, :]) if n_g == batch else part * f_hat[:, s, None, :]
        a = part if a is None else a.add_(part)
    return a.view(batch, pos_out, k_out, pinv_t.shape[1])  # k_in explicit: a layer may keep no feature


def edges_update(
    acts: torch.Tensor, g: torch.Tensor, basis_in: LayerBasis, basis_out: LayerBasis | None = None
) -> torch.Tensor:
    """Partial sum Σ_x Σ_t A² ``(k_out, k_in)`` in float64 of the squared edges; divide by N·P_in for E.

    ``basis_out``: ``g`` holds rows in neurons, and the edges are those of ĝ = :func:`project` (g, basis_out).
    A float32 ĝ gives its attributions and their chunk sum in float32, rounded to float64 after the sum
    over the chunk (the build adds the chunks in float64): no float64 copy of ĝ, which took about a fifth
    of the training callback's build, with errors at the float32 Jacobians' own level (no logged count
    changes, benchmarks/README.md). Its rows in neurons are projected after the attributions, which are
    linear in them: C^{l+1}ᵀ once per example instead of once per input position. Any other ĝ: projected
    first, float64 throughout. A float32 chunk whose sum overflows float32 (attributions beyond ~1e19) is
    taken again in float64."""
    if _in_float32(g):
        a = edge_attributions(acts, g, basis_in, torch.float32)  # (batch, pos_out, k_out or d_out, k_in)
        if basis_out is not None:
            a = torch.matmul(basis_out.basis[: g.shape[3]].to(torch.float32).T, a)  # constant row left out
        sums = a.square_().sum(dim=(0, 1)).to(torch.float64)
        if bool(torch.isfinite(sums).all()):
            return sums
    if basis_out is not None:
        g = project(g, basis_out)
    a = edge_attributions(acts, g, basis_in)
    return a.square_().sum(dim=(0, 1))
