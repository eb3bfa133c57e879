"""Degeneracy of a node layer: spectrum summaries and the three sources of degeneracy of 2405.10927.

- linearly dependent activations: the rank deficit of the activations' covariance (Gram matrix);
- directions with variance that the next layers ignore: PCA keeps them, LIB (Λ ≈ 0) does not;
- ReLU units that fire on exactly the same examples: :mod:`lib_lightning.core.metrics.coactivation`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lib_lightning.core.metrics.sparsity import n_to_hold_each
from lib_lightning.core.validation import check_thresholds, check_weights

__all__ = ["GradientDegeneracy", "SpectrumStats", "gradient_degeneracy", "gram_rank_deficit", "spectrum_stats"]

_ABS_HINT = "; eigensolvers return tiny negatives: pass |λ| explicitly if that is what you mean"


@dataclass(frozen=True)
class SpectrumStats:
    """Summaries of one eigenvalue spectrum (constant direction already removed).

    Attributes:
        dim: number of eigenvalues.
        kept_abs: eigenvalues above the absolute threshold.
        kept_rel: eigenvalues above the relative threshold times the largest one.
        participation_ratio: (ΣΛ)² / ΣΛ², in [1, dim] (0 for an all-zero spectrum).
        effective_rank: exp(H(Λ/ΣΛ)) with 0·log 0 = 0, in [1, dim] (0 for an all-zero spectrum).
        n_90: fewest leading eigenvalues holding 90 % of ΣΛ.
        n_99: fewest leading eigenvalues holding 99 % of ΣΛ.
        total: ΣΛ.
    """

    dim: int
    kept_abs: int
    kept_rel: int
    participation_ratio: float
    effective_rank: float
    n_90: int
    n_99: int
    total: float

    def to_dict(self) -> dict[str, float | int]:
        """The fields as plain Python scalars."""
        return asdict(self)


def spectrum_stats(
    eigenvalues: torch.Tensor, *, abs_threshold: float = 1e-10, rel_threshold: float = 1e-3
) -> SpectrumStats:
    """Dimension counts and threshold-free effective dimensions of a spectrum (LIB_SPEC.md §11).

    PR = (ΣΛ)²/ΣΛ²;  r_eff = exp(-Σ p log p) with p = Λ/ΣΛ;  n_q = min{n : Σ_{i<n} Λ_(i) ≥ q ΣΛ}.

    Args:
        eigenvalues: ``(dim,)`` non-negative spectrum, e.g. LIB Λ or PCA variances without the constant.
        abs_threshold: ``kept_abs`` counts Λ > abs_threshold; must be >= 0.
        rel_threshold: ``kept_rel`` counts Λ > rel_threshold · max Λ; must be in [0, 1).

    Returns:
        A :class:`SpectrumStats`. An empty or all-zero spectrum has every count, ``total``,
        ``participation_ratio`` and ``effective_rank`` equal to 0 (there is no direction with weight).

    Raises:
        ValueError: for a non-1-D spectrum, negative or non-finite entries (named with their indices),
            or thresholds out of range.
    """
    check_thresholds(abs_threshold, rel_threshold)
    lam = check_weights(eigenvalues, "eigenvalues", ndim=1, hint=_ABS_HINT)  # (dim,)
    dim = lam.numel()
    total = lam.sum()
    if dim == 0 or total == 0:
        return SpectrumStats(dim, 0, 0, 0.0, 0.0, 0, 0, 0.0)
    p = lam / total  # (dim,)
    entropy = -torch.xlogy(p, p).sum()
    n_90, n_99 = n_to_hold_each(lam, (0.9, 0.99))
    return SpectrumStats(
        dim=dim,
        kept_abs=int((lam > abs_threshold).sum()),
        kept_rel=int((lam > rel_threshold * lam.max()).sum()),
        participation_ratio=float(total**2 / (lam**2).sum()),
        effective_rank=float(torch.exp(entropy)),
        n_90=n_90,
        n_99=n_99,
        total=float(total),
    )


def gram_rank_deficit(gram_eigenvalues: torch.Tensor, threshold: float = 1e-10) -> int:
    """Linearly dependent activations: the dimension minus the covariance eigenvalues above ``threshold``.

    Args:
        gram_eigenvalues: ``(d,)`` non-negative eigenvalues of the activations' covariance.
        threshold: absolute threshold, >= 0.

    Raises:
        ValueError: for a non-1-D input, negative or non-finite entries, or a negative threshold.
    """
    check_thresholds(threshold, 0.0)
    lam = check_weights(gram_eigenvalues, "gram_eigenvalues", ndim=1, hint=_ABS_HINT)
    return lam.numel() - int((lam > threshold).sum())


@dataclass(frozen=True)
class GradientDegeneracy:
    """Directions with variance that LIB finds irrelevant (Λ ≈ 0), counted relative to each spectrum's maximum.

    Only relative counts: Λ is in output units² (squared singular values of the whitened Jacobian) and the
    PCA variances in activation units², so one absolute threshold applied to both compares numbers with
    different units; a fraction of each spectrum's own maximum is unit-free.

    Attributes:
        pca_kept, lib_kept: directions above ``rel_threshold`` times that spectrum's maximum.
        n: ``pca_kept - lib_kept`` (may be negative: relative cuts of different spectra).
    """

    pca_kept: int
    lib_kept: int
    n: int

    def to_dict(self) -> dict[str, int]:
        """The fields as plain Python ints."""
        return asdict(self)


def gradient_degeneracy(
    pca_eigenvalues: torch.Tensor, lib_lambdas: torch.Tensor, rel_threshold: float = 1e-3
) -> GradientDegeneracy:
    """PCA directions kept minus LIB directions kept, each above ``rel_threshold`` × its own maximum.

    Invariant to rescaling either spectrum (a change of output or activation units).

    Args:
        pca_eigenvalues: ``(d_pca,)`` non-negative PCA variances (constant removed).
        lib_lambdas: ``(d_lib,)`` non-negative LIB Λ (constant removed).
        rel_threshold: counts eigenvalues > rel_threshold · (that spectrum's max); in [0, 1).

    Raises:
        ValueError: as :func:`spectrum_stats`.
    """
    pca = spectrum_stats(pca_eigenvalues, abs_threshold=0.0, rel_threshold=rel_threshold)
    lib = spectrum_stats(lib_lambdas, abs_threshold=0.0, rel_threshold=rel_threshold)
    return GradientDegeneracy(pca.kept_rel, lib.kept_rel, n=pca.kept_rel - lib.kept_rel)
