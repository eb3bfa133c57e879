"""The summary's metrics computed in one pass (one sort, one pairs sum, one greedy scan) against the
formulas they replaced, written out here as references, on random inputs with ties: the same integers,
the same floats."""

from __future__ import annotations

import pytest
import torch

from lib_lightning.core.metrics import evolution
from lib_lightning.core.metrics.degeneracy import spectrum_stats
from lib_lightning.core.metrics.evolution import adjusted_rand_index, match_features
from lib_lightning.core.metrics.modularity import log_cutoff
from lib_lightning.core.metrics.sparsity import edge_sparsity, n_to_hold, n_to_hold_each


def _n_to_hold_reference(values: torch.Tensor, fraction: float) -> int:
    """One sort per count (the former n_to_hold)."""
    cumsum = torch.sort(values.to(torch.float64), descending=True).values.cumsum(0)
    if cumsum.numel() == 0 or cumsum[-1] == 0:
        return 0
    target = fraction * cumsum[-1] * (1.0 - 1e-12)
    return int(torch.searchsorted(cumsum, target.reshape(1)).item()) + 1


def _gini_reference(weights: torch.Tensor) -> float:
    """Its own ascending sort (the former _gini)."""
    n, total = weights.numel(), weights.sum()
    if n == 0 or total == 0:
        return 0.0
    ascending = torch.sort(weights).values
    i = torch.arange(1, n + 1, dtype=weights.dtype)
    return float(((2 * i - n - 1) * ascending).sum() / (n * total))


def _match_reference(prev: torch.Tensor, new: torch.Tensor) -> list[int]:
    """One argmax per match over the masked |cos| matrix (the former match_features)."""
    unit = lambda x: x / x.norm(dim=1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)  # noqa: E731
    cos = (unit(new) @ unit(prev).T).abs()
    matched = [-1] * new.shape[0]
    for _ in range(min(new.shape[0], prev.shape[0])):
        i, j = divmod(int(torch.argmax(cos)), prev.shape[0])
        matched[i] = j
        cos[i, :] = -1.0
        cos[:, j] = -1.0
    return matched


def _ari_reference(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """The whole flattened contingency table, summed in Python (the former adjusted_rand_index)."""
    _, a = torch.unique(labels_a, return_inverse=True)
    _, b = torch.unique(labels_b, return_inverse=True)
    pairs = lambda counts: sum(c * (c - 1) // 2 for c in counts)  # noqa: E731
    index = pairs(torch.bincount(a * (int(b.max()) + 1) + b).tolist())
    sum_a, sum_b = pairs(torch.bincount(a).tolist()), pairs(torch.bincount(b).tolist())
    n = labels_a.numel()
    expected = sum_a * sum_b / (n * (n - 1) // 2) if n > 1 else 0.0
    denominator = 0.5 * (sum_a + sum_b) - expected
    return 1.0 if denominator == 0 else float((index - expected) / denominator)


def _weights_with_ties(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Non-negative weights over many decades, a third of them drawn from a few repeated values, some zero."""
    w = 10 ** (6 * torch.rand(shape, generator=gen, dtype=torch.float64) - 5)
    few = torch.tensor([0.0, 1e-3, 0.5, 2.0], dtype=torch.float64)
    tied = torch.rand(shape, generator=gen) < 1 / 3
    return torch.where(tied, few[torch.randint(0, 4, shape, generator=gen)], w)


@pytest.mark.parametrize("seed", range(8))
def test_counts_gini_and_cutoff_from_one_sort_equal_the_former_formulas(seed):
    gen = torch.Generator().manual_seed(seed)
    k_out, k_in = int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen))
    edges = _weights_with_ties(gen, (k_out, k_in))
    fractions = (0.5, 0.9, 0.99, 1.0)
    stats = edge_sparsity(edges, exclude_constant=False, fractions=fractions)
    weights = edges.reshape(-1)
    assert stats.n_required == tuple(_n_to_hold_reference(weights, f) for f in fractions)
    assert stats.gini == _gini_reference(weights)
    assert n_to_hold_each(weights, fractions) == stats.n_required
    assert [n_to_hold(weights, f) for f in fractions] == list(stats.n_required)
    n = _n_to_hold_reference(weights, 0.99)
    assert log_cutoff(edges, 0.99) == (float(torch.sort(weights, descending=True).values[n - 1]) if n else 0.0)
    lam = weights[: k_in]
    spec = spectrum_stats(lam, abs_threshold=1e-4)
    assert (spec.n_90, spec.n_99) == (_n_to_hold_reference(lam, 0.9), _n_to_hold_reference(lam, 0.99))


def test_one_sort_per_section_per_spectrum_and_per_cutoff(monkeypatch):
    """edge_sparsity sorted its weights three times (two counts and the Gini coefficient), spectrum_stats
    twice and log_cutoff twice: 260 sorts per analysis of the training callback."""
    sorts, real = [], torch.sort

    def counting(*args, **kwargs):
        sorts.append(args[0].numel())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "sort", counting)
    edges = _weights_with_ties(torch.Generator().manual_seed(0), (6, 7))
    edge_sparsity(edges, fractions=(0.9, 0.99))
    assert sorts == [30]  # row and column 0 (the constant) dropped
    spectrum_stats(edges[0])
    log_cutoff(edges, 0.99)
    assert sorts == [30, 7, 42]


@pytest.mark.parametrize("seed", range(8))
def test_greedy_matching_by_one_sort_equals_one_argmax_per_match(seed):
    gen = torch.Generator().manual_seed(seed)
    d = 6
    k_prev, k_new = int(torch.randint(1, 30, (1,), generator=gen)), int(torch.randint(1, 30, (1,), generator=gen))
    prev = torch.randn(k_prev, d, generator=gen, dtype=torch.float64)
    new = torch.randn(k_new, d, generator=gen, dtype=torch.float64)
    # ties: repeated and sign-flipped rows (equal |cos|), a zero row (cos 0 with everything), directions
    # drawn from a few axes (many equal |cos|)
    new[: k_new // 3] = -prev[torch.randint(0, k_prev, (k_new // 3,), generator=gen)]
    prev[k_prev // 2 :] = torch.eye(d, dtype=torch.float64)[torch.randint(0, 2, (k_prev - k_prev // 2,), generator=gen)]
    new[-1] = 0.0
    assert match_features(prev, new).tolist() == _match_reference(prev, new)
    assert match_features(new, prev).tolist() == _match_reference(new, prev)


def test_greedy_matching_takes_no_argmax_per_match(monkeypatch):
    calls = []
    monkeypatch.setattr(evolution.torch, "argmax", lambda *a, **k: calls.append(a) or torch.tensor(0))
    prev = torch.randn(9, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert match_features(prev, prev.flip(0)).tolist() == list(range(8, -1, -1))
    assert calls == []


@pytest.mark.parametrize("seed", range(8))
def test_ari_from_the_non_empty_cells_equals_the_whole_table(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 400, (1,), generator=gen))
    a = torch.randint(0, int(torch.randint(1, n + 1, (1,), generator=gen)), (n,), generator=gen) * 7 - 3
    b = torch.randint(0, int(torch.randint(1, n + 1, (1,), generator=gen)), (n,), generator=gen)
    assert adjusted_rand_index(a, b) == _ari_reference(a, b)
    assert adjusted_rand_index(b, b.flip(0)) == _ari_reference(b, b.flip(0))


def test_ari_of_many_singletons_needs_no_table_of_n_squared_cells():
    """Two partitions of 100,000 items with 50,000 and 100,000 clusters: the former code built a
    5e9-cell contingency table (40 GB); the non-empty cells are at most n."""
    a = torch.arange(100_000) // 2
    b = torch.arange(100_000)
    assert adjusted_rand_index(a, b) == 0.0  # b has no pair, so neither the index nor its expectation
