"""Local learning coefficient (LLC) by stochastic-gradient Langevin dynamics localised at w*.

Singular learning theory's learning coefficient λ measures how degenerate (broad) the loss basin at
w* is: a regular model with d parameters has λ = d/2, a degenerate one less. It is estimated as

    λ̂ = nβ · (E_w[L(w)] − L(w*)),   w ~ p(w) ∝ exp(−nβ·L(w) − γ/2·|w − w*|²),

with L the per-example average negative log-likelihood on n training examples, nβ the inverse
temperature (default n / log n) and γ the localisation strength. The expectation is over SGLD chains
started at w*, each step

    w ← w − (ε/2)·(nβ·∇L_B(w) + γ·(w − w*)) + N(0, ε)

with L_B a minibatch loss; after ``num_burnin`` steps, each of ``num_draws`` states contributes its
minibatch loss (an unbiased estimate of L(w)). Chains run on cloned parameters through
``torch.func.functional_call``: the module's parameters and ``.grad`` are never touched, and all
randomness comes from the given ``torch.Generator``\\ s, never the global RNG.

The loss must be a per-example average negative log-likelihood for λ̂ to be on the theory's scale:
cross-entropy is; for regression with Gaussian noise of variance σ², use MSE / (2σ²).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lib_lightning.core import batch as nested

__all__ = [
    "LLCCalibration",
    "LLCEstimate",
    "calibrate",
    "default_nbeta",
    "estimate_llc",
]

Batch = Any  # a tuple of tensors such as (inputs, labels), or any nesting of them


def _default_forward(model: Callable, batch: Batch) -> torch.Tensor:
    return model(batch[0])


def _default_loss(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(output, batch[-1])


@dataclass(frozen=True)
class LLCEstimate:
    """One LLC estimate and its chain-health diagnostics.

    Fields:
        mean: ``()`` float64, λ̂ averaged over chains (NaN when ``failed``).
        std: ``()`` float64, spread of the per-chain estimates (sample std; NaN for one chain or ``failed``).
        chain_llcs: ``(chains,)`` float64, nβ · (mean kept minibatch loss − L(w*)) per chain.
        loss_traces: ``(chains, num_burnin + num_draws)`` float64 minibatch loss at each state, the first
            at w*; NaN after a chain stopped on a non-finite loss.
        init_loss: ``()`` float64, L(w*) on all the data.
        diverged: ``(chains,)`` bool, a non-finite loss or an estimate above ``max_llc``.
        below_init: ``(chains,)`` bool, kept losses below L(w*) by more than ``below_init_sigmas``
            standard errors: w* is not a local minimum, or ε is too large.
        failed: whether a loss was non-finite; ``reason`` says where.
        nbeta, epsilon, gamma, num_burnin: the settings used.
    """

    mean: torch.Tensor
    std: torch.Tensor
    chain_llcs: torch.Tensor
    loss_traces: torch.Tensor
    init_loss: torch.Tensor
    diverged: torch.Tensor
    below_init: torch.Tensor
    failed: bool
    reason: str
    nbeta: float
    epsilon: float
    gamma: float
    num_burnin: int


def default_nbeta(n: int) -> float:
    """The inverse temperature n / log n of the WBIC (Watanabe 2013) for ``n`` training examples (n ≥ 2)."""
    if n < 2:
        raise ValueError(f"the default nbeta = n / log n needs n >= 2 training examples, got n={n}; pass nbeta")
    return n / math.log(n)


def _check_data(data: Batch) -> int:
    leaves = nested.example_leaves(data)
    if not leaves or leaves[0][1].shape[0] == 0:
        raise ValueError("data is empty: the LLC needs at least one training example")
    try:
        return nested.batch_size(data, what="LLC data")
    except ValueError as err:
        lengths = [t.shape[0] for _, t in leaves]
        raise ValueError(
            f"data tensors must share their first dimension (examples), got lengths {lengths}: {err}"
        ) from err


def _positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {name}={value}")


def _mean_loss(call, data: Batch, n: int, forward, loss_fn, eval_batch_size: int) -> torch.Tensor:
    """L on all the data as a sum of per-chunk means times chunk sizes, divided by n at the end."""
    loss_sum = torch.zeros((), dtype=torch.float64)
    for start in range(0, n, eval_batch_size):
        chunk = nested.select(data, slice(start, start + eval_batch_size))
        count = min(eval_batch_size, n - start)
        loss_sum += loss_fn(forward(call, chunk), chunk).detach().double().cpu() * count
    return loss_sum / n


def _chain(model, w_star, fixed, data, n, forward, loss_fn, nbeta, epsilon, gamma, steps, batch_size, gen):
    """One SGLD chain from w*; returns its minibatch-loss trace ``(steps,)`` (NaN after a non-finite loss)."""
    trace = torch.full((steps,), float("nan"), dtype=torch.float64)
    w = dict(w_star)
    noise_scale = math.sqrt(epsilon)
    for t in range(steps):
        if batch_size is None or batch_size >= n:
            batch = data
        else:
            idx = torch.randperm(n, generator=gen, device=gen.device)[:batch_size]
            batch = nested.select(data, idx)
        leaves = {k: v.detach().requires_grad_(True) for k, v in w.items()}
        state = {**fixed, **leaves}
        loss = loss_fn(forward(lambda *a, **kw: functional_call(model, state, a, kw), batch), batch)
        trace[t] = value = float(loss.detach())
        if not math.isfinite(value):
            break
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        with torch.no_grad():
            for (k, v), g in zip(leaves.items(), grads):
                drift = gamma * (v - w_star[k])
                if g is not None:
                    drift = drift + nbeta * g
                noise = torch.randn(v.shape, generator=gen, dtype=v.dtype, device=gen.device).to(v.device)
                w[k] = v.detach() - 0.5 * epsilon * drift + noise_scale * noise
    return trace


def estimate_llc(
    model: nn.Module,
    data: Batch,
    *,
    forward: Callable[[Callable, Batch], torch.Tensor] = _default_forward,
    loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor] = _default_loss,
    num_chains: int = 4,
    num_draws: int = 100,
    num_burnin: int = 50,
    epsilon: float = 5e-5,
    gamma: float = 1000.0,
    nbeta: float | None = None,
    batch_size: int | None = 128,
    eval_batch_size: int = 4096,
    max_llc: float | None = None,
    below_init_sigmas: float = 3.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> LLCEstimate:
    """λ̂ = nβ·(E[L(w)] − L(w*)) by SGLD chains localised at the module's current weights w*.

    Call it with the module in eval mode (dropout would otherwise draw from the global RNG). Buffers
    are passed as clones, so even train-mode batch norm leaves the module untouched. The chains run the
    module itself at swapped-in weights, so forward hooks registered on it fire at every SGLD step.

    Args:
        model: the module at w*. Parameters with ``requires_grad=False`` are held fixed.
        data: tensors sharing their first dimension (examples), e.g. ``(inputs, labels)``, or any nesting
            of tuples, lists, dicts and mappings of them (see :mod:`lib_lightning.core.batch`), on the
            module's device; minibatches are examples drawn without replacement.
        forward: ``forward(call, batch) -> output``; ``call`` has the module's signature and runs it at
            a chain's weights. Default ``call(batch[0])``.
        loss_fn: ``loss_fn(output, batch) -> scalar``, the per-example average negative log-likelihood.
            Default cross-entropy against ``batch[-1]``.
        num_chains, num_draws, num_burnin: chains, kept states per chain, discarded states per chain.
        epsilon: SGLD step size ε > 0. Too large: chains diverge or fall below L(w*). The defaults of
            ε, γ, batch size and chain lengths were calibrated on the modular-addition transformer
            (``benchmarks/llc.py``); run :func:`calibrate` for another model.
        gamma: localisation strength γ ≥ 0.
        nbeta: inverse temperature nβ > 0; default n / log n with n = len(data).
        batch_size: minibatch size; ``None`` or ≥ n for the full-batch loss.
        eval_batch_size: chunk size for L(w*) on all the data.
        max_llc: a chain whose estimate exceeds this is flagged diverged; default d, twice the value d/2
            of a regular model with d sampled parameters (the largest λ can be), leaving room for noise.
        below_init_sigmas: a chain is flagged ``below_init`` when its mean kept loss is below L(w*) by
            more than this many standard errors (batch means over 10 blocks of draws).
        generator: one generator for all chains (run in turn), or one per chain (its length must be
            ``num_chains``); chains are then independent of how they are split across processes.
            Default: a CPU generator seeded with 0.

    Returns:
        An :class:`LLCEstimate`. A non-finite loss does not raise: the estimate is ``failed``.

    Raises:
        ValueError: for a bad setting, empty data, or a module without trainable parameters.
    """
    n = _check_data(data)
    for name, value in (("epsilon", epsilon), ("nbeta", nbeta), ("below_init_sigmas", below_init_sigmas)):
        _positive(name, value)
    _positive("gamma", gamma, allow_zero=True)
    for name, value, low in (("num_chains", num_chains, 1), ("num_draws", num_draws, 1), ("num_burnin", num_burnin, 0),
                             ("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1)):
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {name}={value}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    gens = [generator] * num_chains if isinstance(generator, torch.Generator) else list(generator)
    if len(gens) != num_chains:
        raise ValueError(f"got {len(gens)} generators for num_chains={num_chains}; pass one generator or one per chain")
    nbeta = default_nbeta(n) if nbeta is None else float(nbeta)

    w_star = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    if not w_star:
        raise ValueError("model has no parameters with requires_grad=True to sample")
    fixed = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    fixed.update({k: v.detach().clone() for k, v in model.named_buffers()})
    d = sum(v.numel() for v in w_star.values())
    max_llc = float(d) if max_llc is None else max_llc

    steps = num_burnin + num_draws
    with torch.no_grad():
        state = {**fixed, **w_star}
        init_loss = _mean_loss(lambda *a, **kw: functional_call(model, state, a, kw), data, n, forward, loss_fn,
                               eval_batch_size)
    if torch.isfinite(init_loss):
        traces = torch.stack([
            _chain(model, w_star, fixed, data, n, forward, loss_fn, nbeta, epsilon, gamma, steps, batch_size, g)
            for g in gens
        ])  # (chains, steps)
    else:
        traces = torch.full((num_chains, steps), float("nan"), dtype=torch.float64)

    kept = traces[:, num_burnin:]  # (chains, num_draws)
    chain_llcs = nbeta * (kept.mean(dim=1) - init_loss)  # (chains,)
    blocks = min(10, num_draws)
    block_means = kept[:, : num_draws // blocks * blocks].reshape(num_chains, blocks, -1).mean(dim=2)
    stderr = block_means.std(dim=1) / math.sqrt(blocks) if blocks > 1 else torch.zeros(num_chains, dtype=torch.float64)
    below_init = kept.mean(dim=1) - init_loss < -below_init_sigmas * stderr
    finite = torch.isfinite(traces).all(dim=1)
    diverged = ~finite | (chain_llcs > max_llc)

    failed = not bool(finite.all())
    if not torch.isfinite(init_loss):
        reason = f"L(w*) is not finite ({init_loss.item()})"
    elif failed:
        bad = int((~finite).nonzero()[0])
        step = int((~torch.isfinite(traces[bad])).nonzero()[0])
        reason = f"chain {bad} produced a non-finite loss at step {step} (epsilon={epsilon} may be too large)"
    else:
        reason = ""
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    mean = nan if failed else chain_llcs.mean()
    std = nan if failed or num_chains < 2 else chain_llcs.std()
    return LLCEstimate(mean, std, chain_llcs, traces, init_loss, diverged, below_init & finite, failed, reason,
                       nbeta, float(epsilon), float(gamma), num_burnin)


@dataclass(frozen=True)
class LLCCalibration:
    """A sweep of :func:`estimate_llc` over step sizes and inverse temperatures (same random numbers per cell).

    Fields:
        epsilons: ``(E,)``; nbetas: ``(B,)`` float64.
        mean, std: ``(E, B)`` float64 λ̂ and its spread across chains.
        diverged, below_init: ``(E, B)`` float64 fraction of chains flagged.
        failed: ``(E, B)`` bool.
        llc_traces: ``(E, B, steps)`` float64 nβ·(L_B(w) − L(w*)) averaged over chains.
        num_burnin: steps discarded before the kept draws.
    """

    epsilons: torch.Tensor
    nbetas: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    diverged: torch.Tensor
    below_init: torch.Tensor
    failed: torch.Tensor
    llc_traces: torch.Tensor
    num_burnin: int


def calibrate(
    model: nn.Module,
    data: Batch,
    epsilons: Sequence[float],
    nbetas: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    **kwargs,
) -> LLCCalibration:
    """Run :func:`estimate_llc` for every (ε, nβ) pair, each from the same generator state.

    A good setting is the largest ε whose chains flatten after burn-in, with no divergence or
    below-init flags, and whose λ̂ agrees with that of smaller ε. ``kwargs`` go to :func:`estimate_llc`.

    Raises:
        ValueError: if ``epsilons`` or ``nbetas`` is empty, or as :func:`estimate_llc`.
    """
    if len(epsilons) == 0 or len(nbetas) == 0:
        raise ValueError(
            f"need at least one epsilon and one nbeta, got epsilons={list(epsilons)}, nbetas={list(nbetas)}"
        )
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    start = generator.get_state()
    cells = []
    for epsilon in epsilons:
        for nbeta in nbetas:
            gen = torch.Generator(generator.device).set_state(start)
            cells.append(estimate_llc(model, data, epsilon=epsilon, nbeta=nbeta, generator=gen, **kwargs))
    shape = (len(epsilons), len(nbetas))

    def grid(values) -> torch.Tensor:
        return torch.stack(values).reshape(*shape, *values[0].shape)

    return LLCCalibration(
        epsilons=torch.tensor(list(epsilons), dtype=torch.float64),
        nbetas=torch.tensor(list(nbetas), dtype=torch.float64),
        mean=grid([c.mean for c in cells]),
        std=grid([c.std for c in cells]),
        diverged=grid([c.diverged.double().mean() for c in cells]),
        below_init=grid([c.below_init.double().mean() for c in cells]),
        failed=grid([torch.tensor(c.failed) for c in cells]),
        llc_traces=grid([c.nbeta * (c.loss_traces - c.init_loss).mean(dim=0) for c in cells]),
        num_burnin=cells[0].num_burnin,
    )
