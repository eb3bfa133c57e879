"""The chunk sums of float32 Jacobians: products in float32, each chunk's sum rounded to float64.

With ``dtype=float32`` the Jacobians are float32; the build adds the chunks' partial sums in float64.
Converting each chunk's ĝ to float64 for float64 products (what float64 Jacobians get) took about a
fifth of the training callback's build (issue 16). Here the edges are taken in float32: their products
run over ``d_in`` terms and their chunk sum over the examples, with errors at the level the float32
Jacobians already have (measured in benchmarks/README.md: no logged count changes); a chunk whose sum
overflows float32 is taken again in float64 by the caller. M′ is not taken in float32: see
:func:`~lib_lightning.core.lib.jacobian.m_prime_update`.

The edge attributions are linear in ĝ's rows, so the edges of rows in neurons projected onto a basis
equal the projection of the neurons' attributions: J̄ C⁺ᵀ f̂ first, summed over the input positions,
then C^{l+1}ᵀ once per example instead of once per input position.
"""

from __future__ import annotations

import torch

from lib_lightning.core.lib.basis import LayerBasis

__all__ = ["edge_attributions_float32", "edges_update_float32"]


def edge_attributions_float32(acts: torch.Tensor, g: torch.Tensor, basis_in: LayerBasis) -> torch.Tensor:
    """:func:`~lib_lightning.core.lib.jacobian.edge_attributions` of a float32 ĝ
    ``(n_g, pos_in, pos_out, k_out, d_in)``, in float32 ``(batch, pos_out, k_out, k_in)``: one product
    ĝ C⁺ᵀ over the whole chunk and every input position (no float64 copy of ĝ); f̂ is taken in float64,
    then rounded to float32. A ĝ of batch 1 is shared by every example (an affine chunk)."""
    n_g, pos_in, pos_out, k_out, d_in = g.shape
    batch = acts.shape[0]
    f_hat = basis_in.transform(acts.to(torch.float64)).to(torch.float32)  # (batch, pos_in, k_in)
    pinv_t = basis_in.basis_pinv[:, :d_in].T.to(torch.float32)  # (d_in, k_in)
    k_in = pinv_t.shape[1]  # explicit: a layer may keep no feature
    prod = (g.reshape(-1, d_in) @ pinv_t).view(n_g, pos_in, pos_out * k_out, k_in)
    a = None
    for s in range(pos_in):
        part = prod[:, s].mul_(f_hat[:, s, None, :]) if n_g == batch else prod[:, s] * f_hat[:, s, None, :]
        a = part if a is None else a.add_(part)
    return a.view(batch, pos_out, k_out, k_in)


def edges_update_float32(
    acts: torch.Tensor, g: torch.Tensor, basis_in: LayerBasis, basis_out: LayerBasis | None = None
) -> torch.Tensor:
    """Σ_x Σ_t A² ``(k_out, k_in)`` of a float32 ĝ, summed in float32 and returned in float64.

    ``basis_out``: ``g`` holds rows in neurons ``(n_g, pos_in, pos_out, d_out, d_in)``, and the edges are
    those of its projection onto ``basis_out``'s features (the constant row of C^{l+1} left out), taken
    without forming it.
    """
    a = edge_attributions_float32(acts, g, basis_in)  # (batch, pos_out, k or d_out, k_in)
    if basis_out is not None:
        c_out = basis_out.basis[: g.shape[3]].to(torch.float32)  # (d_out, k_out)
        a = torch.matmul(c_out.T, a)
    return a.square_().sum(dim=(0, 1)).to(torch.float64)
