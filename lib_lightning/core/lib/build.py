"""Build LIB, PCA and neuron interaction graphs of any model from module names (spec §2–§4).

Order of work: two forward passes over the data for the means, then the Gram matrices about them, of
every node layer (stats.py: no cancellation for large means); then, from
the last section backwards, one pass per section for its integrated Jacobians. Their rows are taken in
the next layer's basis when every requested kind shares it (LIB alone, or the final layer), so there is
one VJP per kept feature; otherwise in neurons, projected onto each kind's basis. Each Jacobian chunk
serves M′ (hence the LIB basis of the section's input layer) and the edges of every basis kind; the
chunks are kept within a memory budget for the LIB edges (which need the basis just computed) and
recomputed past it. Every dataset quantity is a sum plus a count, reduced by ``reduce`` (identity in one
process, a sum across processes under DDP) and divided at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lib_lightning.core.lib.basis import LayerBasis, identity_basis, lib_basis, neuron_basis, pca_basis, whiten
from lib_lightning.core.lib.capture import Forward, NodeLayer, capture, default_forward, select_examples
from lib_lightning.core.lib.checks import Context, check_sections
from lib_lightning.core.lib.graph import InteractionGraph
from lib_lightning.core.lib.integration import integration_rule
from lib_lightning.core.lib.jacobian import (
    batch_size,
    chunks,
    edges_update,
    integrated_jacobian,
    integrated_vjp,
    m_prime_update,
    project,
)
from lib_lightning.core.lib.memory import MEMORY_BUDGET, check_memory, estimate_memory
from lib_lightning.core.lib.modes import analysis_mode, prepare_inputs
from lib_lightning.core.lib.stats import ActivationStats, mean_update, shift_of, stats_update

__all__ = ["build_graphs", "KINDS", "default_reuse_rtol"]

KINDS = ("lib", "pca", "neuron")
EDGE_POINTS = ("activation", "reconstruction")
CHECK_EXAMPLES = 16  # examples of the first batch on which the order and cut checks run
Reduce = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[str, int, int], None]


def _validate(kinds, chunk_size, cache_bytes, edge_point, batches) -> list[Any]:
    if edge_point not in EDGE_POINTS:
        raise ValueError(f"unknown edge_point {edge_point!r}; valid choices: {EDGE_POINTS}")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown basis kind(s) {bad or kinds}; valid choices: {KINDS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if cache_bytes < 0:
        raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
    if iter(batches) is batches:
        raise TypeError("batches must be re-iterable (a list or a DataLoader), not a one-shot iterator")
    return batches


def default_reuse_rtol(dtype: torch.dtype) -> float:
    """``reuse_rtol`` when none is given: max(1e-10, 1000 ε) of the analysis dtype.

    1e-10 in float64 sits 10× above the rounding of f C C⁺ measured on the trained transformer (1e-11);
    1000 ε (1.2e-4 in float32) is the same allowance for the rounding of a float32 forward and VJP
    (~ d ε for d of a few hundred). A fixed 1e-10 is below float32's ε: every chunk was recomputed.
    """
    return max(1e-10, 1e3 * torch.finfo(dtype).eps)


def _mean_sums(
    model: nn.Module, node_layers: list[NodeLayer], batches: Iterable[Any], dtype: torch.dtype | None, forward: Forward
) -> list[torch.Tensor]:
    """Per node layer, the partial (Σ f, N P) of this process's batches: the shift of the statistics."""
    sums: list[torch.Tensor] | None = None
    for b, inputs in enumerate(batches):
        with torch.no_grad():
            acts = capture(model, node_layers, prepare_inputs(inputs, dtype), forward)
        for layer, a in zip(node_layers, acts):
            if not torch.isfinite(a).all():
                raise ValueError(f"activations of node layer {layer.name!r} contain NaN or Inf (batch {b})")
        parts = [mean_update(a) for a in acts]
        sums = parts if sums is None else [s + p for s, p in zip(sums, parts)]
    if sums is None:
        raise ValueError("the analysis dataset is empty: no batch was given")
    return sums


def build_graphs(
    model: nn.Module,
    layers: Sequence[str | NodeLayer],
    batches: Iterable[Any],
    *,
    kinds: Sequence[str] = ("lib", "pca"),
    forward: Forward = default_forward,
    rule: str = "gradient",
    n_intervals: int = 0,
    center: bool = True,
    rotate_final: bool = False,
    abs_threshold: float = 1e-12,
    rel_threshold: float = 0.0,
    max_features: int | None = None,
    edge_point: str = "activation",
    reuse_rtol: float | None = None,
    position_sources: int | None = None,
    seed: int = 0,
    chunk_size: int = 256,
    cache_bytes: int = 2 << 30,
    dtype: torch.dtype | None = torch.float64,
    check_cuts: bool = True,
    context_inputs: Context = None,
    memory_budget_bytes: int | None = MEMORY_BUDGET,
    reduce: Reduce | None = None,
    progress: Progress | None = None,
) -> dict[str, InteractionGraph]:
    """Bases and edges of every requested kind, built from the last node layer backwards.

    Args:
        model: any ``nn.Module``; it is put in eval mode, frozen and cast to ``dtype`` for the analysis,
            then restored exactly.
        layers: node layers in forward order: NodeLayer or strings ``module[in:k|out:path]~layout@positions``
            (:mod:`lib_lightning.core.lib.nodes`), e.g. ``"fc[in]"``, ``"rnn[out:0]"``, ``"layer1"`` (a conv
            map: positions of channels), ``"conv~flat"``, ``"resid@-1"``.
        batches: re-iterable batches of model inputs (each passed to ``forward(model, inputs)``).
        kinds: any of ``"lib"``, ``"pca"``, ``"neuron"``.
        rule, n_intervals: integration rule (see :mod:`lib_lightning.core.lib.integration`).
        center: centre activations (the constant direction becomes feature 0).
        rotate_final: rotate the final node layer to its PCA basis (else keep it as is).
        abs_threshold, rel_threshold: truncation of PCA eigenvalues and Lambdas: keep values above
            ``abs_threshold`` and above ``rel_threshold`` × the layer's largest (constant excluded).
        max_features: keep at most this many LIB features per layer (constant included); an error if a
            layer's rank is smaller.
        edge_point: where the section is evaluated for the edges: ``"activation"`` (the activation
            itself; the Jacobians of the basis pass are reused, one pass per section) or
            ``"reconstruction"`` (f C C⁺ of the edge's basis, as the reference library does). There a
            chunk's Jacobians at the activation are reused when its reconstruction is within
            ``reuse_rtol`` × the largest activation; for a cached LIB chunk, also per example when the
            integrated VJPs in two random directions agree at both points to ``reuse_rtol`` (affine and
            ReLU sections whose pattern does not change); everything else is recomputed at f C C⁺. The
            two points agree when truncation only drops directions without variance (spec §11). The
            default, :func:`default_reuse_rtol` of the analysis dtype (1e-10 in float64, 1.2e-4 in
            float32), sits above rounding, which is not a different point.
        position_sources: if set, R stochastic sources replace the output positions of every section
            (spec §3, Rademacher signs): R VJPs per output feature instead of one per position, with M′
            and the squared edges unbiased (exact for single-position outputs). For sections whose
            output has many positions (sequence models; conv feature maps, read by default as positions
            of channels, whereas a ``~flat`` map is one position).
        seed: seeds the signs, drawn per section and chunk, so repeated runs and recomputed chunks agree.
        chunk_size: examples per Jacobian chunk; bounds the working memory.
        cache_bytes: memory budget for keeping Jacobian chunks between the basis and the LIB edges
            (0: always recompute; past the budget, chunks are recomputed). 2 GiB by default: the
            attention section of the modular-addition transformer needs 1.4 GB for 3,830 examples.
        dtype: analysis precision (float64 by default; sums are float64 whatever it is).
        check_cuts: check on the first batch (its first 16 examples) that the layers run in order and
            each section is a function of one example's activation and context: changing one example
            leaves the others (else ``IndependenceError``) and no input bypasses the first layer (else
            ``CutError``); see :mod:`lib_lightning.core.lib.checks`.
        context_inputs: top-level keys (dict inputs) or indices (tuple inputs) of per-example side
            inputs held fixed per example by the cut check (attention masks, position ids). ``None``:
            dict keys containing ``mask``, ``position_ids``, ``token_type_ids`` or ``cache_position``.
        memory_budget_bytes: refuse (``MemoryBudgetError``) before the first pass when the estimated
            memory of the statistics and the largest section, from the first batch's shapes, exceeds it
            (see :mod:`lib_lightning.core.lib.memory`); 8 GiB by default, ``None`` for no limit.
        reduce: sum-reduction applied to every partial sum (across processes); identity by default.
        progress: called as ``progress(phase, done, total)`` after each batch.

    Raises:
        ValueError, KeyError, TypeError, CutError, IndependenceError, MemoryBudgetError: on bad input,
            naming the value and the valid choices.
    """
    node_layers = [NodeLayer.parse(layer) for layer in layers]
    if len(node_layers) < 2:
        raise ValueError(f"need at least 2 node layers, got {len(node_layers)}")
    batches = _validate(kinds, chunk_size, cache_bytes, edge_point, batches)
    if position_sources is not None and position_sources < 1:
        raise ValueError(f"position_sources must be None or >= 1, got {position_sources}")
    int_rule = integration_rule(rule, n_intervals)
    if reuse_rtol is None:
        own = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float64)
        reuse_rtol = default_reuse_rtol(dtype or own)
    reduce = reduce or (lambda t: t)
    report = progress or (lambda phase, done, total: None)
    n_batches = len(batches) if hasattr(batches, "__len__") else 0
    names = [layer.name for layer in node_layers]
    with torch.inference_mode(False), analysis_mode(model, dtype):
        # Two passes: the means, then the Gram matrices as sums about them (no cancellation, stats.py).
        shifts = [shift_of(reduce(part)) for part in _mean_sums(model, node_layers, batches, dtype, forward)]
        stats: list[ActivationStats | None] = [None] * len(node_layers)
        n_examples, positions = 0, []
        for b, inputs in enumerate(batches):
            inputs = prepare_inputs(inputs, dtype)
            if b == 0 and check_cuts:  # on a few examples: the checks compare single examples
                few = select_examples(inputs, slice(0, CHECK_EXAMPLES))
                check_sections(model, node_layers, few, forward, context_inputs)
            with torch.no_grad():
                acts = capture(model, node_layers, inputs, forward)
            if b == 0 and memory_budget_bytes is not None:
                estimate = estimate_memory(
                    names, [tuple(a.shape) for a in acts], chunk_size=chunk_size, itemsize=acts[0].element_size(),
                    cache_bytes=cache_bytes, n_examples=acts[0].shape[0] * n_batches or None,
                    position_sources=position_sources, lib="lib" in kinds,
                )  # fmt: skip
                check_memory(estimate, memory_budget_bytes)
            for i, a in enumerate(acts):
                part = stats_update(a, shifts[i])
                stats[i] = part if stats[i] is None else stats[i] + part
            n_examples += acts[0].shape[0]
            positions = [a.shape[1] for a in acts]
            report("statistics", b + 1, n_batches)
        stats = [s.reduce(reduce) for s in stats]
        n_examples = int(reduce(torch.tensor(float(n_examples), dtype=torch.float64, device=stats[0].count.device)).item())

        whitenings = [whiten(s, center, abs_threshold, rel_threshold, name) for s, name in zip(stats, names)]
        last = len(node_layers) - 1
        final = (
            pca_basis(names[last], whitenings[last])
            if rotate_final
            else identity_basis(names[last], stats[last], whitenings[last].all_eigenvalues)
        )
        bases: dict[str, list[LayerBasis | None]] = {}
        for kind in kinds:
            bases[kind] = [None] * len(node_layers)
            bases[kind][last] = final if kind != "neuron" else identity_basis(names[last], stats[last], whitenings[last].all_eigenvalues)
            for i in range(last):
                if kind == "pca":
                    bases[kind][i] = pca_basis(names[i], whitenings[i])
                elif kind == "neuron":
                    bases[kind][i] = neuron_basis(names[i], stats[i])
        edges: dict[str, list[torch.Tensor | None]] = {kind: [None] * last for kind in kinds}

        for sec in reversed(range(last)):
            layer_in, layer_out = node_layers[sec], node_layers[sec + 1]
            phase = f"jacobians {names[sec]} -> {names[sec + 1]}"
            outs = {kind: bases[kind][sec + 1] for kind in kinds}
            first = outs[kinds[0]]
            # One output basis for every kind (LIB alone, or the shared final layer): the VJPs run in its
            # features directly. Otherwise in neurons, projected onto each kind's basis.
            shared = first if all(torch.equal(o.basis, first.basis) for o in outs.values()) else None

            def signs(inputs: Any, c: int) -> torch.Tensor | None:
                """Rademacher signs ``(batch, R, pos_out)`` of chunk c, the same whenever it is recomputed."""
                if position_sources is None:
                    return None
                gen = torch.Generator().manual_seed(hash((seed, sec, c)) & (2**62 - 1))
                shape = (batch_size(inputs), position_sources, positions[sec + 1])
                return torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1

            def jacobian(
                inputs: Any,
                c: int,
                out_basis: LayerBasis | None,
                at: LayerBasis | None = None,
                only: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
                """J̄ of chunk c (of its examples ``only``), at the activation or at its reconstruction in ``at``."""
                point = None if at is None else (lambda a: at.reconstruct(at.transform(a)).to(a.dtype))
                phi = signs(inputs, c)
                if only is not None:
                    inputs, phi = select_examples(inputs, only), None if phi is None else phi[only]
                try:
                    return integrated_jacobian(
                        model, layer_in, layer_out, prepare_inputs(inputs, dtype), int_rule, forward, point, out_basis, phi
                    )
                except ValueError as err:
                    raise ValueError(f"{err} (chunk {c} of {chunk_size} examples)") from err

            def reusable(basis: LayerBasis, acts: torch.Tensor) -> bool:
                """Whether the Jacobian at the activation serves as the one at the chosen edge point."""
                if edge_point == "activation":
                    return True
                rec = basis.reconstruct(basis.transform(acts))
                return bool((rec - acts).abs().max() <= reuse_rtol * acts.abs().max())

            def at_reconstruction(inputs: Any, c: int, acts: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                """LIB edges' point f C C⁺ and ĝ there, from ĝ cached at f.

                An example keeps its cached rows when the integrated VJPs in two random directions agree
                at both points to ``reuse_rtol`` (a section that is affine, or ReLU-piecewise affine
                with the same pattern, gives identical VJPs); the other examples are recomputed.
                """
                basis, inputs = bases["lib"][sec], prepare_inputs(inputs, dtype)
                rec = lambda a: basis.reconstruct(basis.transform(a)).to(a.dtype)  # noqa: E731
                gen = torch.Generator().manual_seed(c)
                w = torch.randn((2, positions[sec + 1], outs["lib"].d), generator=gen, dtype=torch.float64)
                try:
                    here = integrated_vjp(model, layer_in, layer_out, inputs, int_rule, forward, w).flatten(1)
                    there = integrated_vjp(model, layer_in, layer_out, inputs, int_rule, forward, w, rec).flatten(1)
                except ValueError as err:
                    raise ValueError(f"{err} (chunk {c} of {chunk_size} examples)") from err
                same = (there - here).abs().amax(1) <= reuse_rtol * here.abs().amax(1)
                if not same.all():
                    redo = (~same).nonzero().squeeze(1)
                    g = g.clone()
                    g[redo] = jacobian(inputs, c, outs["lib"], basis, only=redo)[1]
                return rec(acts), g

            m_sum, count, cached_bytes = None, 0.0, 0
            cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            sums: dict[str, torch.Tensor | None] = {kind: None for kind in kinds}
            pending: dict[str, set[int]] = {kind: set() for kind in kinds}

            def add(kind: str, acts: torch.Tensor, g: torch.Tensor) -> None:
                part = edges_update(acts, g, bases[kind][sec])
                sums[kind] = part if sums[kind] is None else sums[kind] + part

            for c, inputs in enumerate(chunks(batches, chunk_size)):
                acts, jac = jacobian(inputs, c, shared)
                count += acts.shape[0] * acts.shape[1]
                for kind in kinds:
                    g = jac if shared is not None else project(jac, outs[kind])
                    if kind == "lib":  # the edges wait for this section's basis, built from M′
                        part = m_prime_update(g)
                        m_sum = part if m_sum is None else m_sum + part
                        pending["lib"].add(c)
                        size = g.numel() * g.element_size() + acts.numel() * acts.element_size()
                        if cached_bytes + size <= cache_bytes:
                            cache[c] = (acts, g)
                            cached_bytes += size
                    elif reusable(bases[kind][sec], acts):
                        add(kind, acts, g)
                    else:
                        pending[kind].add(c)
                del acts, jac, g
                report(phase, c + 1, 0)
            count_t = reduce(torch.tensor(count, dtype=torch.float64, device=stats[0].count.device))  # on the model's device, for NCCL
            if "lib" in kinds:
                m_prime = reduce(m_sum) / count_t
                bases["lib"][sec] = lib_basis(
                    names[sec], whitenings[sec], m_prime, abs_threshold, rel_threshold, max_features=max_features
                )
            if any(pending.values()):
                for c, inputs in enumerate(chunks(batches, chunk_size)):
                    todo = [kind for kind in kinds if c in pending[kind]]
                    if not todo:
                        continue
                    cached = cache.pop(c, None)
                    if cached is not None:
                        acts = cached[0]
                    else:
                        with torch.no_grad():
                            (acts,) = capture(model, [layer_in], prepare_inputs(inputs, dtype), forward)
                    for kind in todo:
                        if cached is not None and kind == "lib":
                            add(kind, *(cached if reusable(bases[kind][sec], acts) else at_reconstruction(inputs, c, *cached)))
                        elif reusable(bases[kind][sec], acts):
                            add(kind, *jacobian(inputs, c, outs[kind]))
                        else:
                            add(kind, *jacobian(inputs, c, outs[kind], bases[kind][sec]))
                    del acts, cached
                    report(f"edges {names[sec]} -> {names[sec + 1]}", c + 1, 0)
            for kind in kinds:
                edges[kind][sec] = reduce(sums[kind]) / count_t
    return {kind: InteractionGraph(kind, tuple(bases[kind]), tuple(edges[kind]), n_examples) for kind in kinds}
