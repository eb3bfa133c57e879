import itertools
import math

import numpy as np
import pytest
import torch

from lib_lightning.core.metrics.evolution import (
    adjusted_rand_index,
    community_stability,
    match_features,
    spectrum_distance,
    subspace_overlap,
)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- subspace overlap ----------------------------------------------------------------------------------------


def test_same_subspace_under_invertible_mixing():
    prev = _randn(5, 7, seed=0)
    mixing = _randn(3, 3, seed=1) + 3 * torch.eye(3, dtype=torch.float64)
    new = torch.cat([mixing @ prev[:3], _randn(2, 7, seed=2)])  # (5, 7): only the top 3 rows agree
    assert subspace_overlap(prev, new, k=3) == pytest.approx(1.0, abs=1e-12)
    assert subspace_overlap(prev, 1e3 * prev) == pytest.approx(1.0, abs=1e-12)
    assert subspace_overlap(prev, new) < 0.99


def test_orthogonal_and_partial_overlap_closed_form():
    eye = torch.eye(6, dtype=torch.float64)
    assert subspace_overlap(eye[:2], eye[2:4]) == pytest.approx(0.0, abs=1e-15)
    theta = 0.7
    new = torch.stack([eye[0], math.cos(theta) * eye[1] + math.sin(theta) * eye[2]])  # (2, 6)
    expected = (1 + math.cos(theta) ** 2) / 2
    assert subspace_overlap(eye[:2], new) == pytest.approx(expected, abs=1e-12)


def test_subspace_overlap_against_principal_angles():
    prev, new = _randn(3, 8, seed=3), _randn(4, 8, seed=4)
    q1, _ = np.linalg.qr(prev.numpy().T)
    q2, _ = np.linalg.qr(new.numpy()[:3].T)
    cosines = np.linalg.svd(q1.T @ q2, compute_uv=False)
    assert subspace_overlap(prev, new) == pytest.approx(np.mean(cosines**2), abs=1e-12)
    assert subspace_overlap(prev, new) == pytest.approx(subspace_overlap(new[:3], prev), abs=1e-12)


def test_subspace_overlap_bad_input():
    with pytest.raises(ValueError, match=r"same d, got shapes \(2, 5\) and \(2, 6\)"):
        subspace_overlap(_randn(2, 5), _randn(2, 6))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 2\].*got 3"):
        subspace_overlap(_randn(2, 5), _randn(4, 5), k=3)
    dependent = _randn(3, 5)
    dependent[2] = dependent[0] - 2 * dependent[1]
    with pytest.raises(ValueError, match=r"prev: the top-3 rows are linearly dependent"):
        subspace_overlap(dependent, _randn(3, 5))
    with pytest.raises(ValueError, match=r"2-D tensor"):
        subspace_overlap(torch.ones(5), _randn(2, 5))


def test_rows_of_very_different_norms_are_not_called_dependent():
    # rows of C⁺ scale as Λ^(-1/2): norms 1e-6 .. 1e6 on well-separated directions (issue 11, item 4)
    directions = torch.linalg.qr(_randn(6, 3, seed=5))[0].T  # (3, 6) orthonormal rows
    prev = directions * torch.tensor([1e6, 1.0, 1e-6], dtype=torch.float64)[:, None]
    new = directions[[0, 2, 1]] * torch.tensor([1e-3, 1e4, 2.0], dtype=torch.float64)[:, None]
    assert subspace_overlap(prev, new) == pytest.approx(1.0, abs=1e-12)
    assert subspace_overlap(prev, directions, k=2) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"new: rows \[1\] of the top 3 are zero"):
        subspace_overlap(prev, directions * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)[:, None])


# --- spectrum distance -------------------------------------------------------------------------------------


def test_spectrum_distance_closed_forms():
    lam = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    assert spectrum_distance(lam, 10 * lam) == pytest.approx(0.0, abs=1e-15)
    assert spectrum_distance(lam, lam.flip(0)) == pytest.approx(0.0, abs=1e-15)  # compared sorted
    a = torch.tensor([3.0, 1.0], dtype=torch.float64)
    b = torch.ones(4, dtype=torch.float64)
    # [.75, .25, 0, 0] vs [.25, .25, .25, .25]: ½(.5 + 0 + .25 + .25)
    assert spectrum_distance(a, b) == pytest.approx(0.5, abs=1e-15)
    assert spectrum_distance(b, a) == pytest.approx(0.5, abs=1e-15)
    assert spectrum_distance(torch.tensor([1.0]), torch.tensor([1.0] + [0.0] * 3)) == 0.0
    assert spectrum_distance(torch.zeros(3), torch.zeros(0)) == 0.0
    assert spectrum_distance(torch.zeros(3), lam) == 1.0


def test_spectrum_distance_against_numpy():
    a, b = _randn(6, seed=5).abs(), _randn(4, seed=6).abs()
    p = np.sort(a.numpy())[::-1] / a.numpy().sum()
    q = np.concatenate([np.sort(b.numpy())[::-1] / b.numpy().sum(), np.zeros(2)])
    assert spectrum_distance(a, b) == pytest.approx(0.5 * np.abs(p - q).sum(), abs=1e-14)
    with pytest.raises(ValueError, match=r"new must be non-negative"):
        spectrum_distance(a, -b)


# --- feature matching ---------------------------------------------------------------------------------------


def test_match_features_recovers_permutation_and_signs():
    prev = _randn(5, 8, seed=7)
    perm = torch.tensor([3, 0, 4, 1, 2])
    signs = torch.tensor([1.0, -1.0, -2.0, 1.0, 0.5], dtype=torch.float64)[:, None]
    new = signs * prev[perm] + 1e-3 * _randn(5, 8, seed=8)  # new feature i is old feature perm[i]
    assert match_features(prev, new).tolist() == perm.tolist()
    # more new features than old: the extra ones stay unmatched
    extra = torch.cat([new, _randn(2, 8, seed=9)])
    matched = match_features(prev, extra)
    assert matched[:5].tolist() == perm.tolist() and matched[5:].tolist() == [-1, -1]
    assert match_features(extra, prev).tolist() == [1, 3, 4, 0, 2]


def test_match_features_is_greedy_one_to_one():
    prev = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    new = torch.tensor([[1.0, 0.9], [1.0, 0.1]], dtype=torch.float64)
    # both new features lean on prev 0; the stronger |cos| (new 1) takes it, new 0 gets prev 1
    assert match_features(prev, new).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"same d"):
        match_features(prev, torch.ones(2, 3))


# --- adjusted Rand index ------------------------------------------------------------------------------------


def _ari_by_pairs(a: list[int], b: list[int]) -> float:
    """Hubert–Arabie ARI from pair counts over all item pairs (independent of the contingency table)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    same_a = [a[i] == a[j] for i, j in pairs]
    same_b = [b[i] == b[j] for i, j in pairs]
    both = sum(x and y for x, y in zip(same_a, same_b))
    expected = sum(same_a) * sum(same_b) / len(pairs)
    return (both - expected) / (0.5 * (sum(same_a) + sum(same_b)) - expected)


def test_ari_hand_computed():
    assert adjusted_rand_index(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 2])) == pytest.approx(4 / 7)
    a, b = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 2, 2])
    # Σ C(n_ij, 2) = 2, a = 6, b = 3, C(6, 2) = 15: (2 - 1.2) / (4.5 - 1.2)
    assert adjusted_rand_index(a, b) == pytest.approx(8 / 33, abs=1e-15)
    assert adjusted_rand_index(b, a) == pytest.approx(8 / 33, abs=1e-15)


def test_ari_against_pair_counting():
    gen = torch.Generator().manual_seed(10)
    for _ in range(5):
        a, b = torch.randint(0, 3, (12,), generator=gen), torch.randint(0, 4, (12,), generator=gen)
        assert adjusted_rand_index(a, b) == pytest.approx(_ari_by_pairs(a.tolist(), b.tolist()), abs=1e-12)


def test_ari_edge_cases():
    labels = torch.tensor([2, 2, 7, 7, 7, 5])
    assert adjusted_rand_index(labels, labels) == 1.0
    assert adjusted_rand_index(labels, 10 - 3 * labels) == pytest.approx(1.0, abs=1e-15)  # relabelled
    singletons = torch.arange(5)
    assert adjusted_rand_index(singletons, singletons.flip(0)) == 1.0  # convention: 0/0 -> 1
    one = torch.zeros(5, dtype=torch.long)
    assert adjusted_rand_index(one, one) == 1.0
    assert adjusted_rand_index(one, singletons) == 0.0
    assert adjusted_rand_index(torch.tensor([4]), torch.tensor([9])) == 1.0
    with pytest.raises(ValueError, match=r"labels_a must be a 1-D integer tensor, got torch.float32"):
        adjusted_rand_index(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"equal length, got 3 and 4"):
        adjusted_rand_index(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))


# --- community stability -------------------------------------------------------------------------------------


def test_community_stability_follows_matched_features():
    prev_membership = {("a", 1): 0, ("a", 2): 0, ("a", 3): 1, ("b", 1): 1, ("b", 2): 0}
    # new features of "a" are old features [0, 3, 1, 2] (index 0 the constant); "b" unchanged
    feature_map = {"a": torch.tensor([0, 3, 1, 2]), "b": torch.tensor([0, 1, 2])}
    new_membership = {("a", 1): 5, ("a", 2): 9, ("a", 3): 9, ("b", 1): 5, ("b", 2): 9}
    assert community_stability(prev_membership, new_membership, feature_map) == 1.0
    # without the mapping the same partitions disagree
    identity = {"a": torch.arange(4), "b": torch.arange(3)}
    expected = adjusted_rand_index(torch.tensor([0, 0, 1, 1, 0]), torch.tensor([5, 9, 9, 5, 9]))
    assert community_stability(prev_membership, new_membership, identity) == pytest.approx(expected)
    assert expected < 1.0


def test_community_stability_skips_unmatched_features():
    prev_membership = {("a", 1): 0, ("a", 2): 1, ("b", 1): 0}
    new_membership = {("a", 1): 0, ("a", 2): 1, ("a", 3): 1, ("b", 1): 1, ("c", 1): 0}
    feature_map = {"a": torch.tensor([0, 1, 2, -1])}  # "a" 3 unmatched, layers "b" and "c" unmapped
    assert community_stability(prev_membership, new_membership, feature_map) == 1.0
    assert math.isnan(community_stability(prev_membership, new_membership, {}))
