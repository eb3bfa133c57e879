"""One section of the build (node layer l -> l+1): its integrated Jacobians, the Jacobian pass (M′ and
the edges whose input basis is known) and the edges pass (the rest, once the LIB basis is built).

:class:`Section` holds what every chunk of the section shares, so that the passes are plain functions
of it instead of closures over the build's loop variables. Edge sums are partial sums ``(k_out, k_in)``
over this process's examples; the build reduces and divides them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lib_lightning.core.lib.affine import is_shared, shared_jacobian
from lib_lightning.core.lib.basis import LayerBasis
from lib_lightning.core.lib.cache import JacobianCache
from lib_lightning.core.lib.capture import Forward, NodeLayer, capture, select_examples
from lib_lightning.core.lib.integration import IntegrationRule
from lib_lightning.core.lib.jacobian import (
    batch_size,
    chunks,
    edges_update,
    integrated_jacobian,
    integrated_vjp,
    m_prime_update,
    project,
)
from lib_lightning.core.lib.modes import prepare_inputs

__all__ = ["Section", "JacobianSums", "jacobian_pass", "edges_pass"]

Bases = dict[str, LayerBasis | None]  # basis kind -> basis of one layer
Progress = Callable[[str, int, int], None]


def accumulate(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """``total + part``, or ``part`` for the first one."""
    return part if total is None else total + part


@dataclass(frozen=True)
class Section:
    """What the chunks of section ``index`` (``layer_in`` -> ``layer_out``) share.

    ``pos_out`` is the output layer's number of positions (for the stochastic sources); ``edge_point``,
    ``reuse_rtol``, ``affine_probe`` and ``vjp_rows`` are :func:`~lib_lightning.core.lib.build_graphs`'s.
    """

    model: nn.Module
    layer_in: NodeLayer
    layer_out: NodeLayer
    index: int
    rule: IntegrationRule
    forward: Forward
    dtype: torch.dtype | None
    chunk_size: int
    pos_out: int
    position_sources: int | None
    seed: int
    edge_point: str
    reuse_rtol: float
    affine_probe: bool = True
    vjp_rows: int = 1

    def phase(self, name: str) -> str:
        return f"{name} {self.layer_in.name} -> {self.layer_out.name}"

    def signs(self, inputs: Any, chunk: int) -> torch.Tensor | None:
        """Rademacher signs ``(batch, R, pos_out)`` of ``chunk``, the same whenever it is recomputed."""
        if self.position_sources is None:
            return None
        gen = torch.Generator().manual_seed(hash((self.seed, self.index, chunk)) & (2**62 - 1))
        shape = (batch_size(inputs), self.position_sources, self.pos_out)
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1

    def _error(self, err: ValueError, chunk: int) -> ValueError:
        return ValueError(f"{err} (chunk {chunk} of {self.chunk_size} examples)")

    def jacobian(
        self,
        inputs: Any,
        chunk: int,
        out_basis: LayerBasis | None,
        at: LayerBasis | None = None,
        only: torch.Tensor | None = None,
        probe: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """J̄ of ``chunk`` (of its examples ``only``), at the activation or at its reconstruction in ``at``.

        With ``probe`` (and ``affine_probe``, and no stochastic signs), a chunk whose examples share one
        J̄ gets it at one example: jac of batch 1 (:mod:`lib_lightning.core.lib.affine`).
        """
        point = None if at is None else _reconstruction(at)
        phi = self.signs(inputs, chunk)
        if only is not None:
            inputs, phi = select_examples(inputs, only), None if phi is None else phi[only]
        inputs = prepare_inputs(inputs, self.dtype)
        try:
            if probe and self.affine_probe and phi is None:
                seed = hash((self.seed, self.index, chunk, 1)) & (2**62 - 1)
                args = (self.layer_in, self.layer_out, inputs, self.rule, self.forward, self.reuse_rtol, seed)
                shared = shared_jacobian(self.model, *args, point, out_basis, self.vjp_rows)
                if shared is not None:
                    return shared
            return integrated_jacobian(
                self.model, self.layer_in, self.layer_out, inputs, self.rule, self.forward, point, out_basis, phi,
                self.vjp_rows,
            )
        except ValueError as err:
            raise self._error(err, chunk) from err

    def reusable(self, basis: LayerBasis, acts: torch.Tensor) -> bool:
        """Whether the Jacobian at the activation serves as the one at the edge point."""
        if self.edge_point == "activation":
            return True
        rec = basis.reconstruct(basis.transform(acts))
        return bool((rec - acts).abs().max() <= self.reuse_rtol * acts.abs().max())

    def at_reconstruction(
        self,
        inputs: Any,
        chunk: int,
        cached: tuple[torch.Tensor, torch.Tensor],
        basis: LayerBasis,
        out_basis: LayerBasis,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The edge point f C C⁺ of ``basis`` and ĝ there, from (f, ĝ) cached at f.

        An example keeps its cached rows when the integrated VJPs in two random directions agree at
        both points to ``reuse_rtol`` (an affine section, or a ReLU one whose pattern does not change,
        gives identical VJPs); the other examples are recomputed.
        """
        acts, g = cached
        inputs, rec = prepare_inputs(inputs, self.dtype), _reconstruction(basis)
        gen = torch.Generator().manual_seed(chunk)
        directions = torch.randn((2, self.pos_out, out_basis.d), generator=gen, dtype=torch.float64)
        args = (self.model, self.layer_in, self.layer_out, inputs, self.rule, self.forward, directions)
        try:
            here = integrated_vjp(*args).flatten(1)
            there = integrated_vjp(*args, rec).flatten(1)
        except ValueError as err:
            raise self._error(err, chunk) from err
        same = (there - here).abs().amax(1) <= self.reuse_rtol * here.abs().amax(1)
        if not same.all():
            redo = (~same).nonzero().squeeze(1)
            g = g.expand(acts.shape[0], *g.shape[1:]).clone()  # a shared ĝ becomes one per example
            g[redo] = self.jacobian(inputs, chunk, out_basis, basis, only=redo)[1]
        return rec(acts), g


def _reconstruction(basis: LayerBasis):
    """f ↦ f C C⁺ in ``basis``, in f's dtype."""
    return lambda acts: basis.reconstruct(basis.transform(acts)).to(acts.dtype)


@dataclass(frozen=True)
class JacobianSums:
    """What the Jacobian pass leaves: M′'s partial sum ``(d_in + 1, d_in + 1)`` (LIB only), the number
    of (example, input position) pairs, the edge sums per kind so far and the chunks still pending."""

    m_sum: torch.Tensor | None
    count: float
    edge_sums: dict[str, torch.Tensor | None]
    pending: dict[str, set[int]]


def jacobian_pass(
    section: Section,
    batches: Iterable[Any],
    in_bases: Bases,
    out_bases: Bases,
    shared: LayerBasis | None,
    cache: JacobianCache,
    report: Progress,
) -> JacobianSums:
    """One pass over the chunks: M′ for the LIB basis of the input layer (caching the chunks for its
    edges), and the edges of every kind whose input basis is already known and whose edge point is the
    activation. ``shared``: the one output basis of every kind, or ``None`` (rows in neurons, projected)."""
    kinds = list(out_bases)
    m_sum, count = None, 0.0
    edge_sums: dict[str, torch.Tensor | None] = {kind: None for kind in kinds}
    pending: dict[str, set[int]] = {kind: set() for kind in kinds}
    probe = True  # until a chunk of several examples is found not shared: then the section is not affine
    for chunk, inputs in enumerate(chunks(batches, section.chunk_size)):
        acts, jac = section.jacobian(inputs, chunk, shared, probe=probe)
        probe = probe and (is_shared(acts, jac) or acts.shape[0] < 2)
        count += acts.shape[0] * acts.shape[1]
        for kind in kinds:
            rows_in = None if shared is not None else out_bases[kind]  # rows in neurons: project onto it
            if kind == "lib":  # the edges wait for this section's basis, built from M′
                g = jac if rows_in is None else project(jac, rows_in)
                m_sum = accumulate(m_sum, m_prime_update(g, acts.shape[0] if is_shared(acts, g) else 1))
                pending["lib"].add(chunk)
                cache.put(chunk, acts, g)
                del g
            elif section.reusable(in_bases[kind], acts):
                edge_sums[kind] = accumulate(edge_sums[kind], edges_update(acts, jac, in_bases[kind], rows_in))
            else:
                pending[kind].add(chunk)
        del acts, jac
        report(section.phase("jacobians"), chunk + 1, 0)
    return JacobianSums(m_sum, count, edge_sums, pending)


def _edge_point(section, inputs, chunk, kind, acts, cached, basis, out_basis):
    """(f, ĝ) at the edge point of ``kind``: from the cache where it holds the chunk, else recomputed."""
    if cached is not None and kind == "lib":
        if section.reusable(basis, acts):
            return cached
        return section.at_reconstruction(inputs, chunk, cached, basis, out_basis)
    if section.reusable(basis, acts):
        return section.jacobian(inputs, chunk, out_basis)
    return section.jacobian(inputs, chunk, out_basis, basis)


def edges_pass(
    section: Section,
    batches: Iterable[Any],
    in_bases: Bases,
    out_bases: Bases,
    cache: JacobianCache,
    sums: JacobianSums,
    report: Progress,
) -> dict[str, torch.Tensor | None]:
    """The pending chunks' edges, now that every input basis is known; returns the edge sums per kind."""
    edge_sums = dict(sums.edge_sums)
    if not any(sums.pending.values()):
        return edge_sums
    for chunk, inputs in enumerate(chunks(batches, section.chunk_size)):
        todo = [kind for kind in out_bases if chunk in sums.pending[kind]]
        if not todo:
            continue
        cached = cache.pop(chunk)
        if cached is not None:
            acts = cached[0]
        else:
            with torch.no_grad():
                prepared = prepare_inputs(inputs, section.dtype)
                (acts,) = capture(section.model, [section.layer_in], prepared, section.forward)
        for kind in todo:
            basis = in_bases[kind]
            point = _edge_point(section, inputs, chunk, kind, acts, cached, basis, out_bases[kind])
            edge_sums[kind] = accumulate(edge_sums[kind], edges_update(*point, basis))
            del point  # not held while the next chunk's Jacobians are taken
        del acts, cached
        report(section.phase("edges"), chunk + 1, 0)
    return edge_sums
