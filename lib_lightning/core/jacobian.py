"""Integrated Jacobians of a section, chunk by chunk, and the sums built from them (M′ and edges).

For a chunk of examples, J̄ ``(batch, pos_out, d_out, pos_in, d_in)`` is Σ_q ω_q ∂f^{l+1}/∂f^l at
α_q f^l(x), taken with one vector-Jacobian product per output coordinate (measured faster on CPU than
vmap over VJPs or jacrev, and memory stays at one chunk). The model must treat examples independently
(eval mode), because the VJP of the batch sum is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lib_lightning.core.basis import LayerBasis
from lib_lightning.core.capture import Forward, NodeLayer, capture, run_section
from lib_lightning.core.integration import IntegrationRule

__all__ = ["split_batch", "chunks", "integrated_jacobian", "m_prime_update", "edge_attributions", "edges_update"]


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, (list, tuple)):
        return _batch_size(inputs[0])
    if isinstance(inputs, dict):
        return _batch_size(next(iter(inputs.values())))
    raise TypeError(f"cannot find the batch dimension of model inputs of type {type(inputs).__name__}")


def split_batch(inputs: Any, chunk_size: int) -> Iterator[Any]:
    """Splits model inputs (a tensor, or a tuple/list/dict of tensors, batch first) into chunks."""
    n = _batch_size(inputs)

    def take(x: Any, start: int) -> Any:
        if isinstance(x, torch.Tensor):
            return x[start : start + chunk_size]
        if isinstance(x, (list, tuple)):
            return type(x)(take(v, start) for v in x)
        if isinstance(x, dict):
            return {k: take(v, start) for k, v in x.items()}
        return x

    for start in range(0, n, chunk_size):
        yield take(inputs, start)


def chunks(batches: Iterable[Any], chunk_size: int) -> Iterator[Any]:
    """Every chunk of at most ``chunk_size`` examples of every batch, in order."""
    for inputs in batches:
        yield from split_batch(inputs, chunk_size)


def integrated_jacobian(
    model: nn.Module,
    layer_in: NodeLayer,
    layer_out: NodeLayer,
    inputs: Any,
    rule: IntegrationRule,
    forward: Forward,
    point: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation of ``layer_in`` and J̄ of the section, for one chunk.

    ``point`` maps the captured activation to the point where the Jacobian is evaluated (for example
    the reconstruction f C C⁺); by default the activation itself. The returned ``acts`` is that point.

    Returns:
        acts ``(batch, pos_in, d_in)`` and jac ``(batch, pos_in, pos_out, d_out, d_in)`` (the input position
        leads, so that contractions over the output and input coordinates are plain matrix products).

    Raises:
        ValueError: if the activation or the Jacobian contains NaN or Inf.
    """
    with torch.no_grad():
        (acts,) = capture(model, [layer_in], inputs, forward)
        if point is not None:
            acts = point(acts)
    if not torch.isfinite(acts.sum()):  # one reduction: a NaN or Inf anywhere makes the sum non-finite
        raise ValueError(f"activations of node layer {layer_in.name!r} contain NaN or Inf")
    jac = None
    for alpha, weight in zip(rule.alphas.tolist(), rule.weights.tolist()):
        leaf = (alpha * acts).detach().requires_grad_(True)
        with torch.enable_grad():
            out = run_section(model, layer_in, layer_out, inputs, lambda _: leaf, forward)
        batch, pos_out, d_out = out.shape
        flat = out.reshape(batch, pos_out * d_out)  # (batch, pos_out * d_out)
        rows = []
        for m in range(pos_out * d_out):
            (grad,) = torch.autograd.grad(flat[:, m].sum(), leaf, retain_graph=m + 1 < flat.shape[1], allow_unused=True)
            rows.append(torch.zeros_like(leaf) if grad is None else grad)
        part = torch.stack(rows, dim=2).reshape(batch, acts.shape[1], pos_out, d_out, acts.shape[2])
        jac = weight * part if jac is None else jac + weight * part
    if not torch.isfinite(jac.sum()):
        raise ValueError(f"the Jacobian of section {layer_in.name!r} -> {layer_out.name!r} contains NaN or Inf")
    return acts, jac


def m_prime_update(jac: torch.Tensor, basis_out: LayerBasis) -> torch.Tensor:
    """Partial sum of M′ for a chunk: Σ_x Σ_{t,i} Σ_s ĝ_{t,i,s}ᵀ ĝ_{t,i,s}, ĝ = J̄ in the next layer's basis.

    Returns ``(d_in + 1, d_in + 1)`` in float64; the constant coordinate's row and column are zero
    (the constant is not an input of the section).
    """
    batch, pos_in, pos_out, d_out, d_in = jac.shape
    c_out = basis_out.basis[:d_out].to(jac.dtype)  # (d_out, k_out); the constant row has no gradient
    g = torch.matmul(c_out.T, jac).reshape(-1, d_in).to(torch.float64)  # (batch*pos_in*pos_out*k_out, d_in)
    m = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64, device=jac.device)
    m[:d_in, :d_in] = g.T @ g
    return m


def edge_attributions(acts: torch.Tensor, jac: torch.Tensor, basis_in: LayerBasis, basis_out: LayerBasis) -> torch.Tensor:
    """Per-example attributions A ``(batch, pos_out, k_out, k_in)`` of the spec's squared edges (§4).

    A_{t,i,j}(x) = Σ_s [∂ĥ_{t,i}/∂f̂_{s,j}] f̂_{s,j}(x), with ∂ĥ/∂f̂ = (J̄ C^{l+1}) C⁺ᵀ; the α-sum is
    already inside J̄. The constant coordinate carries no gradient, so only C⁺'s first d columns enter.
    """
    batch, pos_in, pos_out, d_out, d_in = jac.shape
    jac = jac.to(torch.float64)
    f_hat = basis_in.transform(acts.to(torch.float64))  # (batch, pos_in, k_in)
    pinv = basis_in.basis_pinv[:, :d_in]  # (k_in, d_in)
    grad_hat = torch.matmul(jac, pinv.T)  # (batch, pos_in, pos_out, d_out, k_in)
    a_raw = (grad_hat * f_hat[:, :, None, None, :]).sum(1)  # (batch, pos_out, d_out, k_in)
    return torch.matmul(basis_out.basis[:d_out].T, a_raw)  # (batch, pos_out, k_out, k_in)


def edges_update(acts: torch.Tensor, jac: torch.Tensor, basis_in: LayerBasis, basis_out: LayerBasis) -> torch.Tensor:
    """Partial sum Σ_x Σ_t A² ``(k_out, k_in)`` in float64 of the squared edges; divide by N·P_in for E."""
    a = edge_attributions(acts, jac, basis_in, basis_out)
    return (a * a).sum(dim=(0, 1))
