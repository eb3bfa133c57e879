"""Calibration of the LLC sampler: a sweep over step size ε and inverse temperature nβ on one model,
and the recommended setting (the largest ε whose chains stay healthy and flat).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lib_lightning.core.llc.estimator import Batch, estimate_llc
from lib_lightning.core.llc.health import HealthLimits, health_problems

__all__ = ["LLCCalibration", "Recommendation", "calibrate", "recommend"]


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
        acceptance: ``(E, B)`` float64 mean MALA acceptance probability over chains.
        trend: ``(E, B)`` float64 largest |t| of the chains' trend after burn-in.
        problems: ``E × B`` tuples of :func:`~lib_lightning.core.llc.health_problems` messages, plus one
            for below-init chains; empty for a healthy cell.
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
    acceptance: torch.Tensor
    trend: torch.Tensor
    problems: tuple[tuple[tuple[str, ...], ...], ...]


def calibrate(
    model: nn.Module,
    data: Batch,
    epsilons: Sequence[float],
    nbetas: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    limits: HealthLimits = HealthLimits(),
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
        acceptance=grid([c.acceptance.nanmean() for c in cells]),
        trend=grid([c.trend.abs().max() for c in cells]),
        problems=tuple(tuple(_cell_problems(cells[i * shape[1] + j], limits) for j in range(shape[1]))
                       for i in range(shape[0])),
    )


def _cell_problems(estimate, limits: HealthLimits) -> tuple[str, ...]:
    problems = health_problems(estimate, limits)
    below = int(estimate.below_init.sum())
    if below:
        problems.append(f"{below} of {len(estimate.below_init)} chains below L(w*)")
    return tuple(problems)


@dataclass(frozen=True)
class Recommendation:
    """The setting :func:`recommend` picks: ``epsilon`` and ``nbeta`` (NaN when no cell is healthy), the λ̂
    there (``mean`` ± ``std``), and ``reason`` in words."""

    epsilon: float
    nbeta: float
    mean: float
    std: float
    reason: str


def recommend(table: LLCCalibration, nbeta: float | None = None) -> Recommendation:
    """The largest ε of the first unbroken run of healthy cells, in increasing ε, at the chosen nβ.

    Healthy: no problem in ``table.problems`` (no failed, diverged, below-init or trending chain, MALA
    acceptance above the limit). The run starts at the smallest healthy ε (the smallest steps can fail
    for another reason: too short a burn-in for their small moves) and ends before the first unhealthy
    cell after it, so that a lucky cell past a failure is never picked.

    Args:
        table: a :func:`calibrate` sweep.
        nbeta: the column to read; default the swept nβ nearest the middle of the sweep (in log scale).

    Raises:
        ValueError: if ``nbeta`` is not one of the swept values.
    """
    nbetas = table.nbetas.tolist()
    if nbeta is None:
        middle = math.exp(sum(math.log(b) for b in nbetas) / len(nbetas))
        j = min(range(len(nbetas)), key=lambda k: abs(math.log(nbetas[k] / middle)))
    else:
        matches = [k for k, b in enumerate(nbetas) if math.isclose(b, nbeta, rel_tol=1e-9)]
        if not matches:
            raise ValueError(f"nbeta={nbeta} is not one of the swept values {nbetas}")
        j = matches[0]
    order = sorted(range(len(table.epsilons)), key=lambda i: table.epsilons[i].item())
    best = None
    for i in order:
        if table.problems[i][j]:
            if best is not None:
                break
            continue
        best = i
    b = nbetas[j]
    if best is None:
        first = order[0]
        reason = (f"no swept epsilon is healthy at nbeta={b:.4g}: the smallest, {table.epsilons[first].item():.3g}, "
                  f"has {'; '.join(table.problems[first][j])}; sweep smaller steps, or a longer num_burnin if the "
                  "acceptance rises with epsilon (chains not yet spread into the flat directions)")
        return Recommendation(math.nan, b, math.nan, math.nan, reason)
    eps = table.epsilons[best].item()
    reason = (f"epsilon={eps:.3g} is the largest swept step whose chains at nbeta={b:.4g} are healthy "
              f"(MALA acceptance {table.acceptance[best, j].item():.3f}, trend |t| <= {table.trend[best, j].item():.2f}, "
              "no diverged or below-init chain)")
    position = order.index(best)
    if position + 1 < len(order):
        nxt = order[position + 1]
        reason += f"; the next, epsilon={table.epsilons[nxt].item():.3g}, has {'; '.join(table.problems[nxt][j])}"
    else:
        reason += "; it is the largest swept: larger steps may also be healthy"
    return Recommendation(eps, b, table.mean[best, j].item(), table.std[best, j].item(), reason)
