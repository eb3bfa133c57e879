"""Build LIB, PCA and neuron interaction graphs of any model from module names (spec §2–§4).

The build is a sequence of named passes: the statistics pass (``passes.py``), then per section, from
the last backwards, its Jacobian pass and its edges pass (``section.py``). Order of work: two forward
passes over the data for the means, then the Gram matrices about them, of every node layer (stats.py:
no cancellation for large means); then, from the last section backwards, one pass per section for its
integrated Jacobians. Their rows are taken in
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

from lib_lightning.core.lib.basis import LayerBasis, lib_basis, whiten
from lib_lightning.core.lib.cache import JacobianCache
from lib_lightning.core.lib.capture import Forward, NodeLayer, default_forward
from lib_lightning.core.lib.checks import Context
from lib_lightning.core.lib.graph import InteractionGraph
from lib_lightning.core.lib.integration import integration_rule
from lib_lightning.core.lib.memory import MEMORY_BUDGET
from lib_lightning.core.lib.modes import analysis_mode
from lib_lightning.core.lib.passes import Observer, initial_bases, preflight, statistics_pass
from lib_lightning.core.lib.section import Section, edges_pass, jacobian_pass
from lib_lightning.core.validation import check_at_least, check_choice, check_choices

__all__ = ["build_graphs", "check_build", "KINDS", "default_reuse_rtol", "default_vjp_rows"]

KINDS = ("lib", "pca", "neuron")
EDGE_POINTS = ("activation", "reconstruction")
Reduce = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[str, int, int], None]


def _validate(kinds, chunk_size, cache_bytes, edge_point, position_sources, batches) -> list[Any]:
    check_choice("edge_point", edge_point, EDGE_POINTS)
    check_choices("basis kind(s)", kinds, KINDS)
    check_at_least("chunk_size", chunk_size, 1)
    check_at_least("cache_bytes", cache_bytes, 0)
    check_at_least("position_sources", position_sources, 1, optional=True)
    if iter(batches) is batches:
        raise TypeError("batches must be re-iterable (a list or a DataLoader), not a one-shot iterator")
    return batches


def default_vjp_rows(device: torch.device | str) -> int:
    """``vjp_rows`` when none is given: 8 Jacobian rows per autograd call on CUDA, where one VJP per row is
    bound by kernel launches (on an H200: 2.7x on the exact build, 2.1x per training-callback analysis;
    32 rows gave 3.7x and 2.6x at four times the backward's memory, benchmarks/README.md); 1 elsewhere
    (on CPU batching was no faster)."""
    return 8 if torch.device(device).type == "cuda" else 1


def default_reuse_rtol(dtype: torch.dtype) -> float:
    """``reuse_rtol`` when none is given: max(1e-10, 1000 ε) of the analysis dtype.

    1e-10 in float64 sits 10× above the rounding of f C C⁺ measured on the trained transformer (1e-11);
    1000 ε (1.2e-4 in float32) is the same allowance for the rounding of a float32 forward and VJP
    (~ d ε for d of a few hundred). A fixed 1e-10 is below float32's ε: every chunk was recomputed.
    """
    return max(1e-10, 1e3 * torch.finfo(dtype).eps)


def check_build(
    model: nn.Module,
    layers: Sequence[str | NodeLayer],
    batches: Iterable[Any],
    *,
    kinds: Sequence[str] = ("lib", "pca"),
    forward: Forward = default_forward,
    position_sources: int | None = None,
    chunk_size: int = 256,
    cache_bytes: int = 2 << 30,
    dtype: torch.dtype | None = torch.float64,
    check_cuts: bool = True,
    context_inputs: Context = None,
    memory_budget_bytes: int | None = MEMORY_BUDGET,
    **build_options: Any,
) -> None:
    """What :func:`build_graphs` checks before its first pass, alone: the node layers' order, independence
    and cuts on the first batch's first examples, and the memory guard. It reduces nothing, so under DDP
    a caller can run it on every rank and share a failure before the build's first collective (then
    build with ``check_cuts=False, memory_budget_bytes=None``). Takes :func:`build_graphs`' arguments
    (the others, ``build_options``, are ignored).

    Raises:
        ValueError, KeyError, TypeError, CutError, IndependenceError, MemoryBudgetError: as build_graphs.
    """
    node_layers = [NodeLayer.parse(layer) for layer in layers]
    if len(node_layers) < 2:
        raise ValueError(f"need at least 2 node layers, got {len(node_layers)}")
    batches = _validate(kinds, chunk_size, cache_bytes, build_options.get("edge_point", "activation"),
                        position_sources, batches)
    if not check_cuts and memory_budget_bytes is None:
        return
    with torch.inference_mode(False), analysis_mode(model, dtype):
        _preflight(model, node_layers, batches, kinds, forward, position_sources, chunk_size, cache_bytes, dtype,
                   check_cuts, context_inputs, memory_budget_bytes)


def _preflight(model, node_layers, batches, kinds, forward, position_sources, chunk_size, cache_bytes, dtype,
               check_cuts, context_inputs, memory_budget_bytes) -> None:
    """:func:`~lib_lightning.core.lib.passes.preflight` on the first batch; the model already in analysis mode."""
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("the analysis dataset is empty: no batch was given")
    sizes = dict(chunk_size=chunk_size, cache_bytes=cache_bytes, position_sources=position_sources, lib="lib" in kinds)
    preflight(
        model, node_layers, first, n_batches=len(batches) if hasattr(batches, "__len__") else 0, dtype=dtype,
        forward=forward, check_cuts=check_cuts, context_inputs=context_inputs,
        memory_budget_bytes=memory_budget_bytes, memory_sizes=sizes,
    )  # fmt: skip


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
    affine_probe: bool = True,
    vjp_rows: int | None = None,
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
    observe: Sequence[str | NodeLayer] = (),
    observer: Observer | None = None,
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
        affine_probe: probe every chunk for one Jacobian shared by all its examples (an affine section
            such as the unembedding, or a ReLU MLP whose units do not flip within the chunk): the
            integrated VJPs of two random cotangents agree at every example to ``reuse_rtol``. Such a
            chunk takes its Jacobian at one example (one VJP per output feature on one example instead
            of the batch); the result is the same to rounding, since that Jacobian is every example's.
            A section stops being probed at its first chunk that is not shared. Not with
            ``position_sources`` (the rows differ per example). ``False``: always per example.
        vjp_rows: Jacobian rows per ``torch.autograd.grad`` call; ``None``: :func:`default_vjp_rows` of the
            model's device (1 on CPU, where one VJP per row is the fastest; 8 on CUDA). More than 1
            batches the rows through vmap (``is_grads_batched``): fewer, larger kernels, 2.6-4.2x faster
            on an H200 (benchmarks/README.md, "On a GPU"), at that many times the backward's memory, which
            the memory guard does not count (lower it or ``chunk_size`` if a GPU runs out). The same
            numbers to rounding.
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
        observe, observer: more layers to read in the statistics pass (no forward of their own):
            ``observer(b, acts)`` gets their activations ``(batch, pos, d)``, in the analysis dtype, for
            each batch ``b`` of this process (e.g. ReLU co-firing counts).

    Raises:
        NonFiniteActivations: (a ValueError) on every process alike when any process's node layer
            activations contain NaN or Inf, at the reduction of the means, before any other collective.
        ValueError, KeyError, TypeError, CutError, IndependenceError, MemoryBudgetError: on bad input,
            naming the value and the valid choices.
    """
    node_layers = [NodeLayer.parse(layer) for layer in layers]
    if len(node_layers) < 2:
        raise ValueError(f"need at least 2 node layers, got {len(node_layers)}")
    if bool(observe) != (observer is not None):
        raise ValueError(f"give observe and observer together, got observe={list(observe)} and observer={observer!r}")
    batches = _validate(kinds, chunk_size, cache_bytes, edge_point, position_sources, batches)
    check_at_least("vjp_rows", vjp_rows, 1, optional=True)
    int_rule = integration_rule(rule, n_intervals)
    if reuse_rtol is None:
        own = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float64)
        reuse_rtol = default_reuse_rtol(dtype or own)
    reduce = reduce or (lambda t: t)
    report = progress or (lambda phase, done, total: None)
    names = [layer.name for layer in node_layers]
    with torch.inference_mode(False), analysis_mode(model, dtype):
        # before any pass and any reduce: a failure costs one forward of a few examples
        _preflight(model, node_layers, batches, kinds, forward, position_sources, chunk_size, cache_bytes, dtype,
                   check_cuts, context_inputs, memory_budget_bytes)
        measured = statistics_pass(
            model, node_layers, batches, dtype=dtype, forward=forward, reduce=reduce, report=report,
            observe=[NodeLayer.parse(layer) for layer in observe], observer=observer,
        )  # fmt: skip
        stats = measured.stats
        whitenings = [whiten(s, center, abs_threshold, rel_threshold, name) for s, name in zip(stats, names)]
        bases = initial_bases(kinds, names, stats, whitenings, rotate_final)
        edges: dict[str, list[torch.Tensor | None]] = {kind: [None] * (len(names) - 1) for kind in kinds}
        device = stats[0].count.device  # the model's device, for NCCL
        vjp_rows = default_vjp_rows(device) if vjp_rows is None else vjp_rows
        for sec in reversed(range(len(names) - 1)):
            section = Section(
                model, node_layers[sec], node_layers[sec + 1], sec, int_rule, forward, dtype, chunk_size,
                measured.positions[sec + 1], position_sources, seed, edge_point, reuse_rtol, affine_probe,
                vjp_rows,
            )  # fmt: skip
            in_bases = {kind: bases[kind][sec] for kind in kinds}
            out_bases = {kind: bases[kind][sec + 1] for kind in kinds}
            cache = JacobianCache(cache_bytes)
            sums = jacobian_pass(section, batches, in_bases, out_bases, _shared_basis(out_bases), cache, report)
            count = reduce(torch.tensor(sums.count, dtype=torch.float64, device=device))
            if "lib" in kinds:
                m_prime = reduce(sums.m_sum) / count
                bases["lib"][sec] = in_bases["lib"] = lib_basis(
                    names[sec], whitenings[sec], m_prime, abs_threshold, rel_threshold, max_features=max_features
                )
            edge_sums = edges_pass(section, batches, in_bases, out_bases, cache, sums, report)
            for kind in kinds:
                edges[kind][sec] = reduce(edge_sums[kind]) / count
    n_examples = measured.n_examples
    return {kind: InteractionGraph(kind, tuple(bases[kind]), tuple(edges[kind]), n_examples) for kind in kinds}


def _shared_basis(out_bases: dict[str, LayerBasis]) -> LayerBasis | None:
    """The one output basis of every kind (LIB alone, or the shared final layer), else ``None``.

    With one, the VJPs run in its features directly; otherwise in neurons, projected onto each kind's.
    """
    first = next(iter(out_bases.values()))
    return first if all(torch.equal(o.basis, first.basis) for o in out_bases.values()) else None
