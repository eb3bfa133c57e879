"""How the basis moved between two analyses: subspaces, spectra, matched features and communities."""

from __future__ import annotations

from typing import Hashable, Mapping

import torch

from lib_lightning.core.validation import check_weights

__all__ = [
    "adjusted_rand_index",
    "community_stability",
    "match_features",
    "spectrum_distance",
    "subspace_overlap",
]


def subspace_overlap(prev: torch.Tensor, new: torch.Tensor, k: int | None = None, *, rank_rtol: float = 1e-10) -> float:
    """How much of the span of the top-k previous directions the top-k new ones share.

    overlap = ‖Q₁ᵀQ₂‖_F² / k = mean cos² of the principal angles, with Q the orthonormalised (QR, float64)
    top-k rows. 1 for the same subspace under any invertible mixing, 0 for orthogonal subspaces.

    Args:
        prev: ``(k1, d)`` feature directions in activation space (rows of the basis' left inverse),
            most important first.
        new: ``(k2, d)`` likewise.
        k: rows to compare, in [1, min(k1, k2)]; default min(k1, k2).
        rank_rtol: the top-k rows count as linearly dependent when, scaled to unit norm, one is within
            an angle of sine ``rank_rtol`` of the span of those before it (|R_ii| of their QR).

    Raises:
        ValueError: for non-2-D inputs, different ``d``, ``k`` out of range, or dependent top-k rows.
    """
    prev, new = _check_directions(prev, "prev"), _check_directions(new, "new")
    if prev.shape[1] != new.shape[1]:
        raise ValueError(f"prev and new must have the same d, got shapes {tuple(prev.shape)} and {tuple(new.shape)}")
    k_max = min(prev.shape[0], new.shape[0])
    k = k_max if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= k_max:
        raise ValueError(f"k must be an int in [1, {k_max}] (the fewer rows of prev and new), got {k!r}")
    q1 = _orthonormal_rows(prev[:k], "prev", rank_rtol)  # (d, k)
    q2 = _orthonormal_rows(new[:k], "new", rank_rtol)  # (d, k)
    return float((q1.T @ q2).pow(2).sum() / k)


def _orthonormal_rows(rows: torch.Tensor, name: str, rank_rtol: float) -> torch.Tensor:
    """An orthonormal basis ``(d, k)`` of the span of ``rows`` ``(k, d)``.

    The rows are scaled to unit norm first: rows of C⁺ have norms ∝ Λ^(-1/2), many orders of magnitude
    apart, and a span does not depend on them; after it, |R_ii| is the sine of the angle between row i
    and the span of the rows before it, so ``rank_rtol`` measures dependence and nothing else.
    """
    k, d = rows.shape
    if k > d:
        raise ValueError(f"{name}: {k} rows in d={d} dimensions are linearly dependent; use k <= {d}")
    norms = rows.norm(dim=1)  # (k,)
    if bool((norms == 0).any()):
        raise ValueError(f"{name}: rows {(norms == 0).nonzero().flatten().tolist()} of the top {k} are zero")
    q, r = torch.linalg.qr((rows / norms[:, None]).T)  # (d, k), (k, k)
    diag = r.diagonal().abs()
    if bool((diag <= rank_rtol).any()):
        raise ValueError(
            f"{name}: the top-{k} rows are linearly dependent (|diag R| of the unit rows = {diag.tolist()})"
        )
    return q


def spectrum_distance(prev: torch.Tensor, new: torch.Tensor) -> float:
    """Total-variation distance between two normalised spectra.

    TV = ½ Σ_i |p_i − q_i| with p = Λ/ΣΛ of each spectrum sorted descending, the shorter zero-padded.

    Args:
        prev: ``(k1,)`` non-negative spectrum.
        new: ``(k2,)`` non-negative spectrum.

    Returns:
        A number in [0, 1]. By convention two all-zero (or empty) spectra are at distance 0 and an
        all-zero one is at distance 1 from any other.

    Raises:
        ValueError: for non-1-D inputs or negative or non-finite entries.
    """
    p = torch.sort(check_weights(prev, "prev", ndim=1), descending=True).values
    q = torch.sort(check_weights(new, "new", ndim=1), descending=True).values
    p_total, q_total = p.sum(), q.sum()
    if p_total == 0 or q_total == 0:
        return 0.0 if p_total == q_total else 1.0
    n = max(len(p), len(q))
    p = torch.nn.functional.pad(p / p_total, (0, n - len(p)))  # (n,)
    q = torch.nn.functional.pad(q / q_total, (0, n - len(q)))  # (n,)
    return float(0.5 * (p - q).abs().sum())


def match_features(prev_dirs: torch.Tensor, new_dirs: torch.Tensor) -> torch.Tensor:
    """One-to-one matching of new features to previous ones by the direction's |cosine|.

    Greedy: repeatedly take the unmatched (new, previous) pair with the largest |cos| (ties: lowest
    indices) and match it, until one side runs out. Not the optimal assignment, but stable and exact for
    well-separated matches; the sign of a feature is arbitrary, hence |cos|.

    Args:
        prev_dirs: ``(k_prev, d)`` previous feature directions (rows).
        new_dirs: ``(k_new, d)`` new feature directions (rows).

    Returns:
        ``(k_new,)`` int64: the previous index matched to each new feature, -1 where none is left
        (``k_new > k_prev``). A zero direction has cosine 0 with everything.

    Raises:
        ValueError: for non-2-D inputs or different ``d``.
    """
    prev, new = _check_directions(prev_dirs, "prev_dirs"), _check_directions(new_dirs, "new_dirs")
    if prev.shape[1] != new.shape[1]:
        raise ValueError(
            f"prev_dirs and new_dirs must have the same d, got shapes {tuple(prev.shape)} and {tuple(new.shape)}"
        )
    k_prev, k_new = prev.shape[0], new.shape[0]
    cos = (_unit_rows(new) @ _unit_rows(prev).T).abs()  # (k_new, k_prev)
    # The pairs by |cos|, largest first, ties in row-major order (lowest new, then lowest prev: a stable
    # sort); the greedy pick is then the first pair of the order whose two sides are both still free.
    order = torch.sort(cos.reshape(-1), descending=True, stable=True).indices.tolist()
    matched, taken = [-1] * k_new, [False] * k_prev
    left = min(k_new, k_prev)
    for flat in order:
        if not left:
            break
        i, j = divmod(flat, k_prev)
        if matched[i] < 0 and not taken[j]:
            matched[i], taken[j] = j, True
            left -= 1
    return torch.tensor(matched, dtype=torch.long)


def adjusted_rand_index(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """Adjusted Rand index of two partitions of the same items, from their contingency table.

    ARI = (Σ_ij C(n_ij,2) − a·b/C(n,2)) / (½(a + b) − a·b/C(n,2)), a = Σ_i C(n_i·,2), b = Σ_j C(n_·j,2).

    Args:
        labels_a: ``(n,)`` integer cluster labels (any values).
        labels_b: ``(n,)`` integer cluster labels.

    Returns:
        The ARI: 1 for identical partitions (up to relabelling), about 0 for independent ones, and
        possibly negative. The denominator vanishes only when both partitions are all singletons or both
        one cluster (including n = 1): identical partitions, so 1 by convention.

    Raises:
        ValueError: for non-1-D or non-integer inputs, different lengths, or n = 0.
    """
    for name, labels in (("labels_a", labels_a), ("labels_b", labels_b)):
        is_int = isinstance(labels, torch.Tensor) and not (labels.is_floating_point() or labels.is_complex())
        if not is_int or labels.ndim != 1:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels))} "
                             f"of shape {tuple(getattr(labels, 'shape', ()))}")
    if labels_a.shape != labels_b.shape or labels_a.numel() == 0:
        raise ValueError(f"labels must be non-empty and of equal length, got {labels_a.numel()} and {labels_b.numel()}")
    _, a = torch.unique(labels_a.cpu(), return_inverse=True)  # (n,) in [0, n_a)
    _, b = torch.unique(labels_b.cpu(), return_inverse=True)  # (n,) in [0, n_b)
    n_b = int(b.max()) + 1
    _, cells = torch.unique(a * n_b + b, return_counts=True)  # the non-empty cells of the contingency table
    index = _pairs(cells)
    sum_a, sum_b = _pairs(torch.bincount(a)), _pairs(torch.bincount(b))
    n = labels_a.numel()
    expected = sum_a * sum_b / (n * (n - 1) // 2) if n > 1 else 0.0
    denominator = 0.5 * (sum_a + sum_b) - expected
    return 1.0 if denominator == 0 else float((index - expected) / denominator)


def community_stability(
    prev_membership: Mapping[Hashable, int],
    new_membership: Mapping[Hashable, int],
    feature_map: Mapping[str, torch.Tensor],
) -> float:
    """ARI between the previous and the new partition over the features present in both.

    New node ``(layer, j)`` is compared with previous node ``(layer, feature_map[layer][j])``; new nodes
    whose layer is missing from ``feature_map``, whose match is -1 or out of range, or whose match is not
    a previous node are left out.

    Args:
        prev_membership: previous node ``(layer_name, feature_index)`` -> community id.
        new_membership: new node -> community id.
        feature_map: layer name -> ``(k_new,)`` int64 previous index of each new feature, indexed like the
            node features (e.g. :func:`match_features` on all rows of the left inverse, constant included).

    Returns:
        The ARI over the matched nodes, or NaN when no node could be matched (nothing to compare).
    """
    prev_labels, new_labels = [], []
    for node, community in new_membership.items():
        layer, feature = node
        mapping = feature_map.get(layer)
        if mapping is None or not 0 <= feature < len(mapping):
            continue
        prev_node = (layer, int(mapping[feature]))
        if prev_node[1] >= 0 and prev_node in prev_membership:
            prev_labels.append(prev_membership[prev_node])
            new_labels.append(community)
    if not prev_labels:
        return float("nan")
    return adjusted_rand_index(torch.tensor(prev_labels), torch.tensor(new_labels))


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)


def _pairs(counts: torch.Tensor) -> int:
    """Σ C(c, 2) over int64 ``counts``: pairs of items sharing a cell (exact integers)."""
    return int((counts * (counts - 1) // 2).sum())


def _check_directions(dirs: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(dirs, torch.Tensor) or dirs.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor (features, d), got shape {tuple(getattr(dirs, 'shape', ()))}")
    if not bool(torch.isfinite(dirs).all()):
        raise ValueError(f"{name} has non-finite entries")
    return dirs.detach().to(torch.float64).cpu()
