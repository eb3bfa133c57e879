"""Degeneracy of a node layer: spectrum summaries and the three sources of degeneracy of 2405.10927.

- linearly dependent activations: the rank deficit of the activations' covariance (Gram matrix);
- directions with variance that the next layers ignore: PCA keeps them, LIB (Λ ≈ 0) does not;
- ReLU units that fire on exactly the same examples: counted from a batch-summable signature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lib_lightning.core.sparsity import _check_weights, n_to_hold

__all__ = [
    "CoactivationGroups", "GradientDegeneracy", "SpectrumStats", "coactivation_groups",
    "coactivation_signature_update", "example_weights", "gradient_degeneracy", "gram_rank_deficit", "spectrum_stats",
]

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
        rel_threshold: ``kept_rel`` counts Λ > rel_threshold · max Λ; must be in [0, 1].

    Returns:
        A :class:`SpectrumStats`. An empty or all-zero spectrum has every count, ``total``,
        ``participation_ratio`` and ``effective_rank`` equal to 0 (there is no direction with weight).

    Raises:
        ValueError: for a non-1-D spectrum, negative or non-finite entries (named with their indices),
            or thresholds out of range.
    """
    _check_thresholds(abs_threshold, rel_threshold)
    lam = _check_weights(eigenvalues, "eigenvalues", ndim=1, hint=_ABS_HINT)  # (dim,)
    dim = lam.numel()
    total = lam.sum()
    if dim == 0 or total == 0:
        return SpectrumStats(dim, 0, 0, 0.0, 0.0, 0, 0, 0.0)
    p = lam / total  # (dim,)
    entropy = -torch.xlogy(p, p).sum()
    return SpectrumStats(
        dim=dim,
        kept_abs=int((lam > abs_threshold).sum()),
        kept_rel=int((lam > rel_threshold * lam.max()).sum()),
        participation_ratio=float(total**2 / (lam**2).sum()),
        effective_rank=float(torch.exp(entropy)),
        n_90=n_to_hold(lam, 0.9),
        n_99=n_to_hold(lam, 0.99),
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
    _check_thresholds(threshold, 0.0)
    lam = _check_weights(gram_eigenvalues, "gram_eigenvalues", ndim=1, hint=_ABS_HINT)
    return lam.numel() - int((lam > threshold).sum())


@dataclass(frozen=True)
class GradientDegeneracy:
    """Directions with variance that LIB finds irrelevant (Λ ≈ 0), at an absolute and a relative threshold.

    Attributes:
        pca_kept_abs, lib_kept_abs: directions above ``abs_threshold``.
        pca_kept_rel, lib_kept_rel: directions above ``rel_threshold`` times each spectrum's own maximum.
        n_abs: ``pca_kept_abs - lib_kept_abs``.
        n_rel: ``pca_kept_rel - lib_kept_rel`` (may be negative: relative cuts of different spectra).
    """

    pca_kept_abs: int
    lib_kept_abs: int
    pca_kept_rel: int
    lib_kept_rel: int
    n_abs: int
    n_rel: int

    def to_dict(self) -> dict[str, int]:
        """The fields as plain Python ints."""
        return asdict(self)


def gradient_degeneracy(
    pca_eigenvalues: torch.Tensor,
    lib_lambdas: torch.Tensor,
    abs_threshold: float = 1e-10,
    rel_threshold: float = 1e-3,
) -> GradientDegeneracy:
    """PCA directions kept minus LIB directions kept, at the same absolute and relative thresholds.

    Args:
        pca_eigenvalues: ``(d_pca,)`` non-negative PCA variances (constant removed).
        lib_lambdas: ``(d_lib,)`` non-negative LIB Λ (constant removed).
        abs_threshold: counts eigenvalues > abs_threshold; >= 0.
        rel_threshold: counts eigenvalues > rel_threshold · (that spectrum's max); in [0, 1].

    Raises:
        ValueError: as :func:`spectrum_stats`.
    """
    pca = spectrum_stats(pca_eigenvalues, abs_threshold=abs_threshold, rel_threshold=rel_threshold)
    lib = spectrum_stats(lib_lambdas, abs_threshold=abs_threshold, rel_threshold=rel_threshold)
    return GradientDegeneracy(pca.kept_abs, lib.kept_abs, pca.kept_rel, lib.kept_rel,
                              n_abs=pca.kept_abs - lib.kept_abs, n_rel=pca.kept_rel - lib.kept_rel)


def _check_thresholds(abs_threshold: float, rel_threshold: float) -> None:
    if not abs_threshold >= 0.0:
        raise ValueError(f"abs_threshold must be >= 0, got {abs_threshold}")
    if not 0.0 <= rel_threshold <= 1.0:
        raise ValueError(f"rel_threshold must be in [0, 1], got {rel_threshold}")


# --- ReLU co-firing ----------------------------------------------------------------------------------


def _as_int64(c: int) -> int:
    """The int64 with the same 64 bits as the integer ``c`` taken modulo 2^64."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


# SplitMix64's increment and multipliers, as the int64 values with the same bits
_GOLDEN, _MIX1, _MIX2 = (_as_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on signed ints)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(seed: int, position: torch.Tensor) -> torch.Tensor:
    """Output number ``position`` (0-based, int64) of the SplitMix64 generator seeded with ``seed``.

    int64 tensor arithmetic wraps modulo 2^64, which is exactly the unsigned arithmetic SplitMix64 uses.
    """
    z = _as_int64(seed) + (position + 1) * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def example_weights(example_index: torch.Tensor, seed: int) -> torch.Tensor:
    """Two pseudo-random weights in [1, 2) per example, a pure function of (seed, example index).

    w_j(x) = 1 + (top 52 bits of SplitMix64(seed) output number 2x + j) / 2^52, exact in float64.

    Returns:
        ``(batch, 2)`` float64.
    """
    position = 2 * example_index[:, None] + torch.arange(2, device=example_index.device)  # (batch, 2)
    bits = _shr(_splitmix64(seed, position), 12)  # (batch, 2) in [0, 2^52)
    return 1.0 + bits.to(torch.float64) * 2.0**-52


def coactivation_signature_update(
    active: torch.Tensor, example_index: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial sums identifying each unit's on/off pattern over the analysis set.

    signature[u, j] = Σ_x w_j(x) · active[x, u],  count[u] = Σ_x active[x, u], with w_j(x) from
    :func:`example_weights`. Sums over any batching or sharding of the examples give the same totals,
    provided each example (index) is seen exactly once.

    Args:
        active: ``(batch, d_hidden)`` bool, whether unit u fires on example x (e.g. ``pre_act > 0``).
        example_index: ``(batch,)`` int64 dataset index of each example.
        seed: integer seed of the example weights; every partial sum must use the same one.

    Returns:
        ``signature`` ``(d_hidden, 2)`` float64 and ``count`` ``(d_hidden,)`` float64.

    Raises:
        TypeError: if ``active`` is not bool, ``example_index`` not an integer tensor or ``seed`` not int.
        ValueError: if the shapes do not match.
    """
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool:
        raise TypeError(f"active must be a bool tensor, got {getattr(active, 'dtype', type(active))}")
    if active.ndim != 2:
        raise ValueError(f"active must be (batch, d_hidden), got shape {tuple(active.shape)}")
    batch, d_hidden = active.shape
    if not isinstance(example_index, torch.Tensor) or example_index.dtype not in (torch.int32, torch.int64):
        got = getattr(example_index, "dtype", example_index)
        raise TypeError(f"example_index must be an int64 (or int32) tensor, got {got}")
    if example_index.shape != (batch,):
        raise ValueError(f"example_index must have shape ({batch},) to match active, got {tuple(example_index.shape)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    weights = example_weights(example_index.to(device=active.device, dtype=torch.int64), seed)  # (batch, 2)
    on = active.to(torch.float64)  # (batch, d_hidden)
    return on.T @ weights, on.sum(0)


@dataclass(frozen=True)
class CoactivationGroups:
    """ReLU units grouped by identical on/off patterns over the analysis set.

    Attributes:
        n_dead: units that never fire.
        n_always: units that fire on every example (linear there: no ReLU degeneracy of their own).
        n_groups: groups of >= 2 live (neither dead nor always-on) units with identical patterns.
        n_redundant: units beyond the first in each such group.
        largest_group: size of the largest identical-pattern class of live units (1 if all differ,
            0 if no unit is live).
        group_of: ``(d_hidden,)`` int64: -1 dead, -2 always on, otherwise the lowest unit index with the
            same pattern (so ``group_of[u] == u`` for a unit without duplicates).
    """

    n_dead: int
    n_always: int
    n_groups: int
    n_redundant: int
    largest_group: int
    group_of: torch.Tensor

    def to_dict(self) -> dict[str, int | list[int]]:
        """The counts as ints and ``group_of`` as a list."""
        out = {k: v for k, v in asdict(self).items() if k != "group_of"}
        return {**out, "group_of": self.group_of.tolist()}


def coactivation_groups(
    signature: torch.Tensor, count: torch.Tensor, n_examples: int, rtol: float = 1e-9
) -> CoactivationGroups:
    """Group units whose summed signatures agree: identical firing patterns with high probability.

    Units u, v are grouped when count[u] = count[v] and |s[u, j] - s[v, j]| <= rtol · max(|s[u, j]|,
    |s[v, j]|) for both weights j. Distinct patterns differ by a sum of weights drawn from a continuum,
    so a false merge needs a cancellation below ``rtol`` in two independent weightings.

    Args:
        signature: ``(d_hidden, 2)`` summed signatures from :func:`coactivation_signature_update`.
        count: ``(d_hidden,)`` summed firing counts.
        n_examples: number of examples summed over (a unit with ``count == n_examples`` always fires).
        rtol: relative tolerance for summation round-off, in [0, 1e-3].

    Raises:
        ValueError: for mismatched shapes, ``n_examples < 1``, counts that are not integers in
            [0, n_examples], or ``rtol`` out of range.
    """
    if signature.ndim != 2 or signature.shape[1] != 2:
        raise ValueError(f"signature must be (d_hidden, 2), got shape {tuple(signature.shape)}")
    d_hidden = signature.shape[0]
    if count.shape != (d_hidden,):
        raise ValueError(f"count must have shape ({d_hidden},) to match signature, got {tuple(count.shape)}")
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(f"n_examples must be an int >= 1, got {n_examples!r}")
    if not 0.0 <= rtol <= 1e-3:
        raise ValueError(f"rtol must be in [0, 1e-3], got {rtol}")
    signature, count = signature.detach().to(torch.float64).cpu(), count.detach().to(torch.float64).cpu()
    bad = (count < 0) | (count > n_examples) | (count != count.round())
    if bool(bad.any()):
        raise ValueError(
            f"count must hold integers in [0, n_examples={n_examples}], got {count[bad][:5].tolist()} "
            f"at units {torch.nonzero(bad).flatten()[:5].tolist()}"
        )
    dead, always = count == 0, count == n_examples
    group_of = torch.arange(d_hidden)
    group_of[dead], group_of[always] = -1, -2

    # Sort the live units by the first signature; equal patterns are then adjacent runs of (near-)equal
    # values, and only inside a run are the second signature and the count compared.
    live = torch.nonzero(~dead & ~always).flatten()  # (n_live,)
    order = live[torch.argsort(signature[live, 0], stable=True)]
    s0 = signature[order, 0]
    tied = (s0[1:] - s0[:-1]).abs() <= rtol * torch.maximum(s0[1:].abs(), s0[:-1].abs())  # (n_live - 1,)
    bounds = [0, *(torch.nonzero(~tied).flatten() + 1).tolist(), len(order)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop - start > 1:
            _merge_run(sorted(order[start:stop].tolist()), signature, count, rtol, group_of)

    sizes = torch.bincount(group_of[live], minlength=d_hidden) if len(live) else torch.zeros(0, dtype=torch.long)
    return CoactivationGroups(
        n_dead=int(dead.sum()),
        n_always=int(always.sum()),
        n_groups=int((sizes >= 2).sum()),
        n_redundant=int((sizes - 1).clamp(min=0).sum()),
        largest_group=int(sizes.max()) if len(live) else 0,
        group_of=group_of,
    )


def _merge_run(units: list[int], signature: torch.Tensor, count: torch.Tensor, rtol: float, group_of) -> None:
    """Point each unit of a run at the first earlier unit with the same pattern (in place, local)."""
    reps: list[int] = []
    for u in units:
        for r in reps:
            close = (signature[u] - signature[r]).abs() <= rtol * torch.maximum(signature[u].abs(), signature[r].abs())
            if count[u] == count[r] and bool(close.all()):
                group_of[u] = r
                break
        else:
            reps.append(u)
