"""Streaming activation statistics: sums and counts, float64, mergeable across batches and processes.

A node layer's activations ``f (batch, pos, d)`` get a constant coordinate 1 appended for the
statistics only (no bias folding inside the model): ``f_aug = (f, 1)`` of width ``d + 1``, the constant
last. Positions are averaged, as in the spec (§2): every quantity is divided by ``N * P``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ActivationStats", "stats_update", "centring_matrices", "augment"]


def augment(acts: torch.Tensor) -> torch.Tensor:
    """``(..., d)`` -> ``(..., d + 1)`` with a last coordinate fixed at 1."""
    return torch.cat([acts, torch.ones_like(acts[..., :1])], dim=-1)


@dataclass(frozen=True)
class ActivationStats:
    """Sums over examples and positions of one node layer.

    Attributes:
        sum: ``(d,)`` Σ f_s(x).
        gram_sum: ``(d + 1, d + 1)`` Σ f_aug_sᵀ f_aug_s of the raw (uncentred) augmented activations.
        count: number of rows summed, N * P (a float64 scalar tensor, so it reduces like the sums).
    """

    sum: torch.Tensor
    gram_sum: torch.Tensor
    count: torch.Tensor

    def __add__(self, other: ActivationStats) -> ActivationStats:
        return ActivationStats(self.sum + other.sum, self.gram_sum + other.gram_sum, self.count + other.count)

    @property
    def d(self) -> int:
        return self.sum.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """``(d,)`` μ̃ = Σ f / (N P)."""
        return self.sum / self.count

    def gram(self, center: bool) -> torch.Tensor:
        """``(d + 1, d + 1)`` G = E[(f_aug Y)ᵀ(f_aug Y)] = Yᵀ G_raw Y (Y = I when not centring).

        Centred with the means of the same data, G = blockdiag(Cov, 1) exactly.
        """
        raw = self.gram_sum / self.count
        if not center:
            return raw
        y, _ = centring_matrices(self.mean)
        return y.T @ raw @ y

    def reduce(self, reduce_fn) -> ActivationStats:
        """Applies a sum-reduction (e.g. across processes) to every field."""
        return ActivationStats(reduce_fn(self.sum), reduce_fn(self.gram_sum), reduce_fn(self.count))


def stats_update(acts: torch.Tensor) -> ActivationStats:
    """Partial sums of one batch of activations ``(batch, pos, d)``, in float64.

    Raises:
        ValueError: on NaN or Inf, or a batch that is not ``(batch, pos, d)``.
    """
    if acts.ndim != 3:
        raise ValueError(f"activations must be (batch, pos, d), got shape {tuple(acts.shape)}")
    if not torch.isfinite(acts).all():
        raise ValueError("activations contain NaN or Inf")
    rows = augment(acts.detach().to(torch.float64).reshape(-1, acts.shape[-1]))  # (batch * pos, d + 1)
    return ActivationStats(
        sum=rows[:, :-1].sum(0),
        gram_sum=rows.T @ rows,
        count=torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=rows.device),
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
