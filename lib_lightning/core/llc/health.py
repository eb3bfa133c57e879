"""Is an LLC estimate trustworthy? Statistics of the kept draws and the documented health thresholds.

Both statistics use batch means: the kept draws of a chain are cut into (at most) 10 equal blocks,
whose means are treated as independent (the chain forgets within a block).

- ``stderr``: the standard error of a chain's mean kept loss.
- ``trend``: the t statistic of the least-squares slope of the block means against block index. A chain
  whose loss is still moving at the end of burn-in has |t| large; a stationary one has |t| of order 1.

Thresholds (:class:`HealthLimits`), each a named argument:

- ``min_acceptance = 0.9``: the mean MALA acceptance probability across chains. An uncorrected SGLD
  chain is accurate only when a Metropolis correction would seldom reject; MALA's 0.574 optimum is for
  a chain that is corrected, so an SGLD chain must stay well above it.
- ``max_trend = 4.0``: |t| of a chain's trend; above it the chain is counted as trending (with 10
  blocks of independent means, |t| > 4 happens by chance in 0.4 % of stationary chains; correlated
  blocks, from a chain that mixes within fewer steps than a block, raise that rate).
- diverged chains (non-finite loss, or λ̂ above ``max_llc``) always make an estimate unhealthy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["HealthLimits", "block_means", "health_problems", "stderr", "trend"]


@dataclass(frozen=True)
class HealthLimits:
    """The health thresholds of the module docstring."""

    min_acceptance: float = 0.9
    max_trend: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_acceptance <= 1.0:
            raise ValueError(f"min_acceptance must be in [0, 1], got min_acceptance={self.min_acceptance}")
        if not self.max_trend > 0:
            raise ValueError(f"max_trend must be > 0, got max_trend={self.max_trend}")


def block_means(kept: torch.Tensor, max_blocks: int = 10) -> torch.Tensor:
    """``kept (chains, draws)`` -> ``(chains, blocks)`` means of ``min(max_blocks, draws)`` equal blocks
    (a remainder of fewer than one block at the end is dropped)."""
    chains, draws = kept.shape
    blocks = min(max_blocks, draws)
    return kept[:, : draws // blocks * blocks].reshape(chains, blocks, -1).mean(dim=2)


def stderr(kept: torch.Tensor) -> torch.Tensor:
    """``(chains,)`` standard error of each chain's mean by batch means (0 with a single block)."""
    means = block_means(kept)
    blocks = means.shape[1]
    if blocks < 2:
        return torch.zeros(kept.shape[0], dtype=torch.float64)
    return means.std(dim=1) / math.sqrt(blocks)


def trend(kept: torch.Tensor) -> torch.Tensor:
    """``(chains,)`` t statistic of the slope of the block means against block index.

    0 with fewer than 3 blocks (no residual degree of freedom) and for a constant trace; ±inf for an
    exactly linear one.
    """
    means = block_means(kept)  # (chains, blocks)
    chains, blocks = means.shape
    if blocks < 3:
        return torch.zeros(chains, dtype=torch.float64)
    x = torch.arange(blocks, dtype=torch.float64) - (blocks - 1) / 2
    sxx = (x**2).sum()
    slope = (means * x).sum(dim=1) / sxx  # (chains,)
    residuals = means - means.mean(dim=1, keepdim=True) - slope[:, None] * x
    se = ((residuals**2).sum(dim=1) / (blocks - 2) / sxx).sqrt()
    t = slope / se
    return torch.where(slope == 0, torch.zeros_like(t), t)


def health_problems(estimate, limits: HealthLimits = HealthLimits()) -> list[str]:
    """What makes ``estimate`` (an :class:`~lib_lightning.core.llc.LLCEstimate`) unhealthy; empty if nothing."""
    problems = []
    if estimate.failed:
        problems.append(f"failed: {estimate.reason}")
    diverged = int(estimate.diverged.sum())
    if diverged and not estimate.failed:
        problems.append(f"{diverged} of {len(estimate.diverged)} chains diverged")
    acceptance = float(estimate.acceptance.nanmean()) if estimate.acceptance.numel() else math.nan
    if math.isfinite(acceptance) and acceptance < limits.min_acceptance:
        problems.append(f"MALA acceptance {acceptance:.3f} < {limits.min_acceptance} (epsilon too large)")
    trending = int((estimate.trend.abs() > limits.max_trend).sum())
    if trending:
        problems.append(f"{trending} of {len(estimate.trend)} chains still trending after burn-in "
                        f"(|t| > {limits.max_trend}: num_burnin too short)")
    return problems
