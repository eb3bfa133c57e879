"""Is an LLC estimate trustworthy? Statistics of the kept draws and the documented health thresholds.

Both statistics use batch means: the kept draws of a chain are cut into (at most) 10 equal blocks,
whose means are treated as independent (the chain forgets within a block).

- ``stderr``: the standard error of a chain's mean kept loss.
- ``trend``: the t statistic of the least-squares slope of the block means against block index. A chain
  whose loss is still moving at the end of burn-in has |t| large; a stationary one has |t| of order 1.

Thresholds (:class:`HealthLimits`), each a named argument:

- ``min_acceptance = 0.9``: the mean MALA acceptance probability across chains. An uncorrected SGLD
  chain is accurate only when a Metropolis correction would seldom reject; MALA's 0.574 optimum is for
  a chain that is corrected, so an SGLD chain must stay well above it. The acceptance is a
  discretisation diagnostic only once a chain is stationary in every direction: in many dimensions a
  chain still spreading into the flat, γ-held directions (burn-in shorter than a few 1/(εγ) steps)
  reads low too, and there a smaller ε makes it lower, not higher.
- ``max_trend = 4.0``: |t| of a chain's trend; above it the chain is counted as trending (with 10
  blocks of independent means, |t| > 4 happens by chance in 0.4 % of stationary chains; correlated
  blocks, from a chain that mixes within fewer steps than a block, raise that rate).
- diverged chains (non-finite loss, or λ̂ above ``max_llc``) always make an estimate unhealthy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["NUM_FIELDS", "HealthLimits", "block_means", "estimate_sums", "health_problems", "metrics_from_sums", "stderr", "trend"]


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


# Sums of one estimate, additive over chains (so over ranks): chains, Σλ̂, Σλ̂², diverged, below L(w*),
# non-finite, Σ L(w*), Σ acceptance and chains with one, Σ norms of the gradient, localisation and noise
# terms, trending chains
NUM_FIELDS = 13
(_COUNT, _SUM, _SQ_SUM, _DIVERGED, _BELOW, _FAILED, _INIT_SUM, _ACC_SUM, _ACC_COUNT, _GRAD_SUM, _LOC_SUM, _NOISE_SUM,
 _TRENDING) = range(NUM_FIELDS)


def estimate_sums(estimate, limits: HealthLimits = HealthLimits()) -> torch.Tensor:
    """``(NUM_FIELDS,)`` float64 sums over an :class:`~lib_lightning.core.llc.LLCEstimate`'s chains; chains
    split across processes give the whole estimate's sums when added."""
    sums = torch.zeros(NUM_FIELDS, dtype=torch.float64)
    llcs, count = estimate.chain_llcs, len(estimate.chain_llcs)
    has_acceptance = torch.isfinite(estimate.acceptance)
    sums[_COUNT] = count
    sums[_SUM], sums[_SQ_SUM] = llcs.sum(), (llcs**2).sum()
    sums[_DIVERGED], sums[_BELOW] = estimate.diverged.sum(), estimate.below_init.sum()
    sums[_FAILED] = (~torch.isfinite(estimate.loss_traces).all(dim=1)).sum()
    sums[_INIT_SUM] = estimate.init_loss * count
    sums[_ACC_SUM], sums[_ACC_COUNT] = estimate.acceptance[has_acceptance].sum(), has_acceptance.sum()
    sums[_GRAD_SUM], sums[_LOC_SUM] = estimate.grad_norm.sum(), estimate.loc_norm.sum()
    sums[_NOISE_SUM] = estimate.noise_norm.sum()
    sums[_TRENDING] = (estimate.trend.abs() > limits.max_trend).sum()
    return sums


def metrics_from_sums(sums: torch.Tensor, limits: HealthLimits = HealthLimits()) -> tuple[dict[str, float], list[str]]:
    """The values to log from an estimate's (all-process) sums, and its health problems (empty: healthy).

    Values: ``mean``, ``std`` (sample std across chains; NaN for one chain), ``grad_norm``, ``loc_norm``,
    ``noise_norm`` (absent when a chain failed), ``acceptance`` (absent when none was evaluated),
    ``init_loss``, ``diverged_chains``, ``below_init_chains``, ``failed``, ``trending_chains``, ``healthy``.
    """
    count = sums[_COUNT].item()
    failed = sums[_FAILED].item() > 0
    mean = sums[_SUM].item() / count
    var = (sums[_SQ_SUM].item() - count * mean * mean) / (count - 1) if count > 1 else math.nan  # inf, not OverflowError
    std = math.sqrt(max(var, 0.0)) if not math.isnan(var) else math.nan
    acceptance = sums[_ACC_SUM].item() / sums[_ACC_COUNT].item() if sums[_ACC_COUNT] > 0 else math.nan
    problems = []
    if failed:
        problems.append(f"{int(sums[_FAILED])} of {int(count)} chains produced a non-finite loss")
    elif sums[_DIVERGED] > 0:
        problems.append(f"{int(sums[_DIVERGED])} of {int(count)} chains diverged")
    if acceptance < limits.min_acceptance:
        problems.append(f"MALA acceptance {acceptance:.3f} < {limits.min_acceptance} (epsilon too large, or num_burnin "
                        "too short for the chains to spread into the flat directions)")
    if sums[_TRENDING] > 0:
        problems.append(f"{int(sums[_TRENDING])} of {int(count)} chains still trending after burn-in "
                        f"(|t| > {limits.max_trend}: num_burnin too short)")
    values = {
        "init_loss": sums[_INIT_SUM].item() / count,
        "diverged_chains": sums[_DIVERGED].item(),
        "below_init_chains": sums[_BELOW].item(),
        "failed": float(failed),
        "trending_chains": sums[_TRENDING].item(),
        "healthy": float(not problems),
    }
    if math.isfinite(acceptance):
        values["acceptance"] = acceptance
    if not failed:
        values.update({"mean": mean, "std": std, "grad_norm": sums[_GRAD_SUM].item() / count,
                       "loc_norm": sums[_LOC_SUM].item() / count, "noise_norm": sums[_NOISE_SUM].item() / count})
    return values, problems


def health_problems(estimate, limits: HealthLimits = HealthLimits()) -> list[str]:
    """What makes ``estimate`` (an :class:`~lib_lightning.core.llc.LLCEstimate`) unhealthy; empty if nothing."""
    problems = metrics_from_sums(estimate_sums(estimate, limits), limits)[1]
    return [f"{p}: {estimate.reason}" if p.endswith("non-finite loss") else p for p in problems]
