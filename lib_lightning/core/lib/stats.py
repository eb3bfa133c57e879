"""Streaming activation statistics: shifted sums and counts, float64, mergeable across batches and processes.

A node layer's activations ``f (batch, pos, d)`` get a constant coordinate 1 appended for the
statistics only (no bias folding inside the model): ``f_aug = (f, 1)`` of width ``d + 1``, the constant
last. Positions are averaged, as in the spec (§2): every quantity is divided by ``N * P``.

Numerical design. The textbook one-pass covariance E[ffᵀ] − μμᵀ cancels catastrophically when the
mean is large against the spread: rank-2 data in d = 3 shifted by 1e4 gets a spurious variance of
~1e-8 in its null direction, far above the truncation threshold. So the sums are taken of deviations
from a **shift** s, fixed before the first sum and the same for every partial:

    sum = Σ (f − s),   gram_sum = Σ (f − s)ᵀ(f − s),   count = N P,

and the covariance is gram_sum/n − m mᵀ with m = sum/n = μ − s, which loses only ~ε·|μ − s|² instead
of ε·|μ|². The shift is the dataset mean itself, from a first, cheaper pass (the classic two-pass
algorithm): :func:`mean_update` gives (Σ f, N P) per batch, these partials are summed over batches and
sum-reduced over processes like every other sum, and :func:`shift_of` divides. So every rank gets the
same s with nothing but the sum-reduction DDP already uses, and s does not depend on how the data is
batched or sharded (a shift taken from the first batch would, which makes sharded and unsharded
results differ in rounding). Partials with the same shift merge by plain addition; adding partials
with different shifts is an error rather than a silent re-shift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["ActivationStats", "stats_update", "mean_update", "shift_of", "centring_matrices", "augment"]


def augment(acts: torch.Tensor) -> torch.Tensor:
    """``(..., d)`` -> ``(..., d + 1)`` with a last coordinate fixed at 1."""
    return torch.cat([acts, torch.ones_like(acts[..., :1])], dim=-1)


@dataclass(frozen=True)
class ActivationStats:
    """Sums over examples and positions of one node layer, taken about a fixed shift.

    Attributes:
        sum: ``(d,)`` Σ (f_s(x) − s).
        gram_sum: ``(d, d)`` Σ (f_s(x) − s)ᵀ(f_s(x) − s).
        count: number of rows summed, N * P (a float64 scalar tensor, so it reduces like the sums).
        shift: ``(d,)`` s, the same for every partial that is added or reduced (not reduced itself).
    """

    sum: torch.Tensor
    gram_sum: torch.Tensor
    count: torch.Tensor
    shift: torch.Tensor

    def __add__(self, other: ActivationStats) -> ActivationStats:
        if not torch.equal(self.shift, other.shift):
            raise ValueError("cannot add activation statistics taken about different shifts; use one shift for all")
        total = (self.sum + other.sum, self.gram_sum + other.gram_sum, self.count + other.count)
        return ActivationStats(*total, self.shift)

    @property
    def d(self) -> int:
        return self.sum.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """``(d,)`` μ̃ = s + Σ (f − s) / (N P)."""
        return self.shift + self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """``(d, d)`` E[(f − μ)ᵀ(f − μ)] = gram_sum/n − m mᵀ with m = μ − s (no cancellation of μ²)."""
        m = self.sum / self.count
        cov = self.gram_sum / self.count - torch.outer(m, m)
        return (cov + cov.T) / 2

    def second_moment(self) -> torch.Tensor:
        """``(d + 1, d + 1)`` E[f_augᵀ f_aug] of the raw augmented activations (the uncentred Gram matrix)."""
        mean = self.mean
        raw = torch.ones(self.d + 1, self.d + 1, dtype=torch.float64, device=mean.device)
        raw[:-1, :-1] = self.covariance() + torch.outer(mean, mean)
        raw[:-1, -1] = mean
        raw[-1, :-1] = mean
        return raw

    def gram(self, center: bool) -> torch.Tensor:
        """``(d + 1, d + 1)`` G = E[(f_aug Y)ᵀ(f_aug Y)] (Y = I when not centring).

        Centred with the means of the same data, G = blockdiag(Cov, 1) exactly, and it is built so.
        """
        if not center:
            return self.second_moment()
        g = torch.zeros(self.d + 1, self.d + 1, dtype=torch.float64, device=self.sum.device)
        g[:-1, :-1] = self.covariance()
        g[-1, -1] = 1.0
        return g

    def reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> ActivationStats:
        """Applies a sum-reduction (e.g. across processes) to every sum; the shared shift stays as is."""
        return ActivationStats(reduce_fn(self.sum), reduce_fn(self.gram_sum), reduce_fn(self.count), self.shift)


def _rows(acts: torch.Tensor) -> torch.Tensor:
    """``(batch, pos, d)`` -> float64 rows ``(batch * pos, d)``, checked."""
    if acts.ndim != 3:
        raise ValueError(f"activations must be (batch, pos, d), got shape {tuple(acts.shape)}")
    if not torch.isfinite(acts).all():
        raise ValueError("activations contain NaN or Inf")
    return acts.detach().to(torch.float64).reshape(-1, acts.shape[-1])


def mean_update(acts: torch.Tensor) -> torch.Tensor:
    """``(d + 1,)`` partial (Σ f, N P) of one batch ``(batch, pos, d)``, in float64, for the shift."""
    rows = _rows(acts)  # (batch * pos, d)
    count = torch.tensor([float(rows.shape[0])], dtype=torch.float64, device=rows.device)
    return torch.cat([rows.sum(0), count])


def shift_of(mean_sum: torch.Tensor) -> torch.Tensor:
    """``(d,)`` the shift s = Σ f / (N P) from the summed (and reduced) :func:`mean_update` partials."""
    return mean_sum[:-1] / mean_sum[-1]


def stats_update(acts: torch.Tensor, shift: torch.Tensor | None = None) -> ActivationStats:
    """Partial sums of one batch of activations ``(batch, pos, d)`` about ``shift``, in float64.

    Args:
        acts: ``(batch, pos, d)`` activations.
        shift: ``(d,)`` the shift s shared by every partial (see :func:`shift_of`); default zero, which
            is accurate only for data whose mean is small against its spread.

    Raises:
        ValueError: on NaN or Inf, a batch that is not ``(batch, pos, d)``, or a shift of another width.
    """
    rows = _rows(acts)  # (batch * pos, d)
    d = rows.shape[1]
    shift = torch.zeros(d, dtype=torch.float64, device=rows.device) if shift is None else shift.to(rows)
    if shift.shape != (d,):
        raise ValueError(f"shift must have shape ({d},) like the activations' last dimension, got {tuple(shift.shape)}")
    dev = rows - shift  # (batch * pos, d)
    return ActivationStats(
        sum=dev.sum(0),
        gram_sum=dev.T @ dev,
        count=torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=rows.device),
        shift=shift,
    )


def centring_matrices(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Y and Y⁻¹ for the augmented space: the identity with the last row replaced by (∓μ̃, 1).

    ``f_aug Y = (f − μ̃, 1)``; Y⁻¹ carries +μ̃ in the same place.
    """
    d = mean.shape[0]
    y = torch.eye(d + 1, dtype=torch.float64, device=mean.device)
    y_inv = y.clone()
    y[-1, :-1] = -mean
    y_inv[-1, :-1] = mean
    return y, y_inv
