"""Interaction sparsity of one section's edges: how few edges hold most of the interaction weight.

These are threshold-free stand-ins for the reference's "edges required" count (LIB_SPEC.md §5), which
needs an accuracy-bisected ablation: the number of strongest edges that hold 90 % / 99 % of the total
edge weight, and the Gini coefficient of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lib_lightning.core.validation import check_fraction, check_weights

__all__ = ["EdgeSparsity", "edge_sparsity", "fraction_key", "n_to_hold", "n_to_hold_each", "n_to_hold_sorted",
           "sorted_descending"]

# Slack on "the cumulative sum reaches fraction × total": cumulative sums carry round-off, and an exact
# tie (e.g. 9 of 10 equal weights holding 90 %) must not tip over to the next count. Not a threshold.
_CUMSUM_RTOL = 1e-12


def n_to_hold(values: torch.Tensor, fraction: float) -> int:
    """The fewest largest entries of ``values`` whose sum reaches ``fraction`` of the total.

    n = min{n : Σ_{i<n} v_(i) ≥ fraction · Σ v}, with v sorted descending (the order given is ignored).

    Args:
        values: ``(n,)`` non-negative weights.
        fraction: in (0, 1].

    Returns:
        The count; 0 when the total is 0 (there is no weight to hold) or ``values`` is empty.

    Raises:
        ValueError: if ``values`` is not 1-D, has negative or non-finite entries, or ``fraction`` is
            outside (0, 1].
    """
    return n_to_hold_each(values, (fraction,))[0]


def n_to_hold_each(values: torch.Tensor, fractions: Sequence[float]) -> tuple[int, ...]:
    """:func:`n_to_hold` for each of ``fractions``, from one sort of ``values``."""
    for fraction in fractions:
        check_fraction(fraction)
    return n_to_hold_sorted(sorted_descending(check_weights(values, "values", ndim=1)), fractions)


def sorted_descending(values: torch.Tensor) -> torch.Tensor:
    """``values`` sorted largest first: what the counts, the Gini coefficient and ε of the log weighting share."""
    return torch.sort(values, descending=True).values


def n_to_hold_sorted(descending: torch.Tensor, fractions: Sequence[float]) -> tuple[int, ...]:
    """The counts of :func:`n_to_hold` for each of ``fractions`` (checked by the caller) from checked
    weights already sorted largest first (:func:`sorted_descending`)."""
    if descending.numel() == 0:
        return (0,) * len(fractions)
    cumsum = descending.cumsum(0)  # (n,)
    total = cumsum[-1]  # the same summation order as the prefix sums
    if total == 0:
        return (0,) * len(fractions)
    targets = torch.tensor(list(fractions), dtype=cumsum.dtype) * total * (1.0 - _CUMSUM_RTOL)
    return tuple(int(n) + 1 for n in torch.searchsorted(cumsum, targets).tolist())


def fraction_key(fraction: float) -> str:
    """The percentage spelling used in result keys: 0.9 -> ``"90"``, 0.999 -> ``"99.9"``."""
    return f"{100 * fraction:.6g}"


@dataclass(frozen=True)
class EdgeSparsity:
    """Concentration of one section's edge weights.

    Attributes:
        shape: ``(k_out, k_in)`` of the edge matrix analysed (after dropping the constant node).
        n_edges: number of possible edges, ``k_out * k_in``.
        total: sum of all edge weights.
        fractions: the weight fractions asked for, e.g. ``(0.9, 0.99)``.
        n_required: ``(len(fractions),)`` fewest strongest edges holding each fraction of ``total``.
        frac_required: ``(len(fractions),)`` the same as a fraction of ``n_edges`` (0 when there are
            no edges).
        gini: Gini coefficient of the weights: 0 for uniform weights, (n-1)/n for a single non-zero edge.
    """

    shape: tuple[int, int]
    n_edges: int
    total: float
    fractions: tuple[float, ...]
    n_required: tuple[int, ...]
    frac_required: tuple[float, ...]
    gini: float

    def to_dict(self) -> dict[str, float | int]:
        """Scalars keyed ``n_edges``, ``total``, ``gini``, ``n_90``, ``frac_90``, ... for logging."""
        out: dict[str, float | int] = {"n_edges": self.n_edges, "total": self.total, "gini": self.gini}
        for fraction, n, frac in zip(self.fractions, self.n_required, self.frac_required):
            out[f"n_{fraction_key(fraction)}"] = n
            out[f"frac_{fraction_key(fraction)}"] = frac
        return out


def edge_sparsity(
    edges: torch.Tensor, *, exclude_constant: bool | tuple[bool, bool] = True, fractions: Sequence[float] = (0.9, 0.99)
) -> EdgeSparsity:
    """How concentrated the edge weights of one section are.

    n_q = fewest strongest edges with Σ E ≥ q · Σ E;  Gini = Σ_i (2i - n - 1) E_(i) / (n Σ E), with E
    sorted ascending and i = 1..n.

    Args:
        edges: ``(k_out, k_in)`` non-negative edges; rows are the output node layer's features, columns
            the input's.
        exclude_constant: drop every edge touching a constant node, as the reference does for sparsity
            and modularity: ``True`` drops row 0 and column 0, a pair ``(out, in)`` drops row 0 only if
            ``out`` and column 0 only if ``in`` (each: whether that layer's feature 0 is the constant
            direction, ``LayerBasis.has_constant``; an uncentred layer's feature 0 is a real feature).
        fractions: weight fractions in (0, 1], each reported as ``n_<pct>`` and ``frac_<pct>``.

    Returns:
        An :class:`EdgeSparsity`. With no edges or zero total weight every count is 0 and ``gini`` is 0.

    Raises:
        ValueError: if ``edges`` is not 2-D, has negative or non-finite entries, or a fraction is outside
            (0, 1].
    """
    fractions = tuple(float(f) for f in fractions)
    for fraction in fractions:
        check_fraction(fraction)
    edges = check_weights(edges, "edges", ndim=2)
    drop_out, drop_in = (exclude_constant, exclude_constant) if isinstance(exclude_constant, bool) else exclude_constant
    edges = edges[int(drop_out) :, int(drop_in) :]
    k_out, k_in = edges.shape
    weights = edges.reshape(-1)  # (k_out * k_in,)
    n_edges = weights.numel()
    descending = sorted_descending(weights)  # one sort for every count and the Gini coefficient
    n_required = n_to_hold_sorted(descending, fractions)
    return EdgeSparsity(
        shape=(k_out, k_in),
        n_edges=n_edges,
        total=float(weights.sum()),
        fractions=fractions,
        n_required=n_required,
        frac_required=tuple(n / n_edges if n_edges else 0.0 for n in n_required),
        gini=_gini(weights, descending),
    )


def _gini(weights: torch.Tensor, descending: torch.Tensor) -> float:
    n = weights.numel()
    total = weights.sum()
    if n == 0 or total == 0:
        return 0.0
    ascending = descending.flip(0)  # (n,)
    i = torch.arange(1, n + 1, dtype=weights.dtype)
    return float(((2 * i - n - 1) * ascending).sum() / (n * total))
