"""The LLC estimate: λ̂ by Langevin chains localised at w*, over all or a chosen subset of the weights.

Singular learning theory's learning coefficient λ measures how degenerate (broad) the loss basin at
w* is: a regular model with d parameters has λ = d/2, a degenerate one less. It is estimated as

    λ̂ = nβ · (E_w[L(w)] − L(w*)),   w ~ p(w) ∝ exp(−nβ·L(w) − γ/2·|w − w*|²),

with L the per-example average negative log-likelihood on n training examples, nβ the inverse
temperature (default n / log n) and γ the localisation strength. The expectation is over SGLD chains
started at w*, each step

    w ← w − (ε/2)·(nβ·∇L_B(w) + γ·(w − w*)) + N(0, ε)

with L_B a minibatch loss (:mod:`~lib_lightning.core.llc.samplers` has the preconditioned variant);
after ``num_burnin`` steps, each of ``num_draws`` states contributes its minibatch loss (an unbiased
estimate of L(w)).

Refined LLCs (Wang et al. 2024, arXiv 2410.02984): ``params`` samples only the parameters it names (the
rest held at w*), which gives the weight-refined λ̂ of that part, a regular part of dimension d giving
d/2; passing another data set (e.g. held-out examples) gives the data-refined λ̂ on it. Chains run on cloned parameters through
``torch.func.functional_call``: the module's parameters and ``.grad`` are never touched, and all
randomness comes from the given ``torch.Generator``\\ s, never the global RNG.

The loss must be a per-example average negative log-likelihood for λ̂ to be on the theory's scale:
cross-entropy is; for regression with Gaussian noise of variance σ², use MSE / (2σ²).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lib_lightning.core import batch as nested
from lib_lightning.core.llc.health import stderr, trend
from lib_lightning.core.llc.samplers import SAMPLERS, ChainResult, ChainSetup, run_chain

__all__ = ["LLCEstimate", "default_nbeta", "estimate_llc", "select_params"]

Batch = Any  # a tuple of tensors such as (inputs, labels), or any nesting of them


def _default_forward(model: Callable, batch: Batch) -> torch.Tensor:
    return model(batch[0])


def _default_loss(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(output, batch[-1])


@dataclass(frozen=True)
class LLCEstimate:
    """One LLC estimate and its sampler-health diagnostics (thresholds: :mod:`~lib_lightning.core.llc.health`).

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
        acceptance: ``(chains,)`` float64 mean MALA acceptance probability of the chain's steps after
            burn-in (NaN if none was evaluated).
        grad_norm, loc_norm, noise_norm: ``(chains,)`` float64 mean norms of the update's gradient,
            localisation and noise terms.
        trend: ``(chains,)`` float64 t statistic of the kept losses' drift (still moving after burn-in).
        failed: whether a loss was non-finite; ``reason`` says where.
        nbeta, epsilon, gamma, num_burnin: the settings used; sampler: its name.
        params: names of the sampled parameters; num_params: their total size d.
    """

    mean: torch.Tensor
    std: torch.Tensor
    chain_llcs: torch.Tensor
    loss_traces: torch.Tensor
    init_loss: torch.Tensor
    diverged: torch.Tensor
    below_init: torch.Tensor
    acceptance: torch.Tensor
    grad_norm: torch.Tensor
    loc_norm: torch.Tensor
    noise_norm: torch.Tensor
    trend: torch.Tensor
    failed: bool
    reason: str
    nbeta: float
    epsilon: float
    gamma: float
    num_burnin: int
    sampler: str = "sgld"
    params: tuple[str, ...] = ()
    num_params: int = 0


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


def select_params(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """Names of the trainable parameters matching any of ``patterns`` (exact names or ``fnmatch`` globs,
    e.g. ``"model.attn.*"``), in the module's order; all trainable ones for ``None``.

    Raises:
        ValueError: if ``patterns`` is empty or a pattern matches no trainable parameter (the message
            lists the available names).
    """
    names = [k for k, v in model.named_parameters() if v.requires_grad]
    if patterns is None:
        return names
    if isinstance(patterns, str) or len(patterns) == 0:
        raise ValueError(f"params must be a non-empty list of names or glob patterns, got {patterns!r}")
    unmatched = [p for p in patterns if not any(fnmatchcase(k, p) for k in names)]
    if unmatched:
        raise ValueError(f"params pattern(s) {unmatched} match no trainable parameter; available: {names}")
    return [k for k in names if any(fnmatchcase(k, p) for p in patterns)]


def estimate_llc(
    model: nn.Module,
    data: Batch,
    *,
    forward: Callable[[Callable, Batch], torch.Tensor] = _default_forward,
    loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor] = _default_loss,
    params: Sequence[str] | None = None,
    sampler: str = "sgld",
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
    mala_every: int = 10,
    precond_decay: float = 0.99,
    precond_floor: float = 0.1,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> LLCEstimate:
    """λ̂ = nβ·(E[L(w)] − L(w*)) by Langevin chains localised at the module's current weights w*.

    Call it with the module in eval mode (dropout would otherwise draw from the global RNG). Buffers
    are passed as clones, so even train-mode batch norm leaves the module untouched. The chains run the
    module itself at swapped-in weights, so forward hooks registered on it fire at every step.

    Args:
        model: the module at w*. Parameters with ``requires_grad=False`` are held fixed.
        data: tensors sharing their first dimension (examples), e.g. ``(inputs, labels)``, or any nesting
            of tuples, lists, dicts and mappings of them (see :mod:`lib_lightning.core.batch`), on the
            module's device; minibatches are examples drawn without replacement. A held-out set
            here gives the data-refined LLC.
        forward: ``forward(call, batch) -> output``; ``call`` has the module's signature and runs it at
            a chain's weights. Default ``call(batch[0])``.
        loss_fn: ``loss_fn(output, batch) -> scalar``, the per-example average negative log-likelihood.
            Default cross-entropy against ``batch[-1]``.
        params: sample only the parameters with these names or glob patterns (:func:`select_params`),
            holding the rest at w*: the weight-refined LLC. Default: every trainable parameter.
        sampler: ``"sgld"`` or ``"rmsprop_sgld"`` (:mod:`~lib_lightning.core.llc.samplers`).
        num_chains, num_draws, num_burnin: chains, kept states per chain, discarded states per chain.
        epsilon: step size ε > 0. Too large: chains diverge or fall below L(w*). The defaults of
            ε, γ, batch size and chain lengths were calibrated on the modular-addition transformer
            (``benchmarks/llc.py``); run :func:`~lib_lightning.core.llc.calibrate` for another model.
        gamma: localisation strength γ ≥ 0.
        nbeta: inverse temperature nβ > 0; default n / log n with n = len(data).
        batch_size: minibatch size; ``None`` or ≥ n for the full-batch loss.
        eval_batch_size: chunk size for L(w*) on all the data.
        max_llc: a chain whose estimate exceeds this is flagged diverged; default d, twice the value d/2
            of a regular model with d sampled parameters (the largest λ can be), leaving room for noise.
        below_init_sigmas: a chain is flagged ``below_init`` when its mean kept loss is below L(w*) by
            more than this many standard errors (batch means over 10 blocks of draws).
        mala_every: estimate the MALA acceptance probability every this many kept draws (0: never). Each
            costs one more forward and backward pass on a minibatch; free with the full batch.
        precond_decay, precond_floor: the RMSprop preconditioner's EMA decay in [0, 1) and floor δ > 0.
        generator: one generator for all chains (run in turn), or one per chain (its length must be
            ``num_chains``); chains are then independent of how they are split across processes.
            Default: a CPU generator seeded with 0.

    Returns:
        An :class:`LLCEstimate`. A non-finite loss does not raise: the estimate is ``failed``.

    Raises:
        ValueError: for a bad setting, empty data, or a module without trainable parameters.
    """
    n = _check_data(data)
    _check_settings(locals())
    gens = _generators(generator, num_chains)
    nbeta = default_nbeta(n) if nbeta is None else float(nbeta)
    if not any(v.requires_grad for v in model.parameters()):
        raise ValueError("model has no parameters with requires_grad=True to sample")
    names = select_params(model, params)
    all_params = dict(model.named_parameters())
    w_star = {k: all_params[k].detach().clone() for k in names}
    fixed = {k: v.detach().clone() for k, v in all_params.items() if k not in w_star}
    fixed.update({k: v.detach().clone() for k, v in model.named_buffers()})
    d = sum(v.numel() for v in w_star.values())
    max_llc = float(d) if max_llc is None else max_llc

    steps = num_burnin + num_draws
    with torch.no_grad():
        state = {**fixed, **w_star}
        init_loss = _mean_loss(lambda *a, **kw: functional_call(model, state, a, kw), data, n, forward, loss_fn,
                               eval_batch_size)
    setup = ChainSetup(model, w_star, fixed, data, n, forward, loss_fn, sampler, nbeta, float(epsilon),
                       float(gamma), num_burnin, steps, batch_size, mala_every, precond_decay, precond_floor)
    if torch.isfinite(init_loss):
        chains = [run_chain(setup, g) for g in gens]
    else:
        unrun = ChainResult(torch.full((steps,), math.nan, dtype=torch.float64), *[math.nan] * 4)
        chains = [unrun] * num_chains
    traces = torch.stack([c.trace for c in chains])  # (chains, steps)

    def per_chain(field: str) -> torch.Tensor:
        return torch.tensor([getattr(c, field) for c in chains], dtype=torch.float64)  # (chains,)

    kept = traces[:, num_burnin:]  # (chains, num_draws)
    chain_llcs = nbeta * (kept.mean(dim=1) - init_loss)  # (chains,)
    below_init = kept.mean(dim=1) - init_loss < -below_init_sigmas * stderr(kept)
    finite = torch.isfinite(traces).all(dim=1)
    diverged = ~finite | (chain_llcs > max_llc)
    failed = not bool(finite.all())
    reason = _failure_reason(init_loss, traces, finite, epsilon) if failed or not torch.isfinite(init_loss) else ""
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    mean = nan if failed else chain_llcs.mean()
    std = nan if failed or num_chains < 2 else chain_llcs.std()
    return LLCEstimate(
        mean, std, chain_llcs, traces, init_loss, diverged, below_init & finite, per_chain("acceptance"),
        per_chain("grad_norm"), per_chain("loc_norm"), per_chain("noise_norm"),
        torch.where(finite, trend(kept), torch.full_like(chain_llcs, float("nan"))), failed, reason, nbeta,
        float(epsilon), float(gamma), num_burnin, sampler, tuple(names), d,
    )


def _check_settings(args: dict) -> None:
    for name in ("epsilon", "nbeta", "below_init_sigmas", "precond_floor"):
        _positive(name, args[name])
    _positive("gamma", args["gamma"], allow_zero=True)
    for name, low in (("num_chains", 1), ("num_draws", 1), ("num_burnin", 0), ("batch_size", 1),
                      ("eval_batch_size", 1), ("mala_every", 0)):
        value = args[name]
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {name}={value}")
    if args["sampler"] not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {args['sampler']!r}")
    if args["sampler"] == "rmsprop_sgld" and args["num_burnin"] < 1:
        raise ValueError("sampler='rmsprop_sgld' adapts its preconditioner during burn-in: needs num_burnin >= 1, "
                         f"got num_burnin={args['num_burnin']}")
    if not 0.0 <= args["precond_decay"] < 1.0:
        raise ValueError(f"precond_decay must be in [0, 1), got precond_decay={args['precond_decay']}")


def _generators(generator, num_chains: int) -> list[torch.Generator]:
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    gens = [generator] * num_chains if isinstance(generator, torch.Generator) else list(generator)
    if len(gens) != num_chains:
        raise ValueError(f"got {len(gens)} generators for num_chains={num_chains}; pass one generator or one per chain")
    return gens


def _failure_reason(init_loss, traces, finite, epsilon) -> str:
    if not torch.isfinite(init_loss):
        return f"L(w*) is not finite ({init_loss.item()})"
    bad = int((~finite).nonzero()[0])
    step = int((~torch.isfinite(traces[bad])).nonzero()[0])
    return f"chain {bad} produced a non-finite loss at step {step} (epsilon={epsilon} may be too large)"
