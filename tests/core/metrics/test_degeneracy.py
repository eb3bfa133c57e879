import math

import numpy as np
import pytest
import torch

from lib_lightning.core.metrics.coactivation import coactivation_groups, coactivation_signature_update, example_weights
from lib_lightning.core.metrics.degeneracy import (
    gradient_degeneracy,
    gram_rank_deficit,
    spectrum_stats,
)

# --- spectrum summaries --------------------------------------------------------------------------------


def test_spectrum_stats_closed_form():
    lam = torch.tensor([4.0, 2.0, 1.0, 1.0, 1e-12, 0.0], dtype=torch.float64)
    stats = spectrum_stats(lam, abs_threshold=1e-10, rel_threshold=0.3)
    assert stats.dim == 6 and stats.kept_abs == 4 and stats.kept_rel == 2  # > 1.2
    assert stats.total == pytest.approx(8.0, abs=1e-11)
    assert stats.participation_ratio == pytest.approx(64 / 22, rel=1e-10)
    p = lam.numpy() / lam.numpy().sum()
    entropy = -sum(x * math.log(x) for x in p if x > 0)  # independent 0 log 0 = 0
    assert stats.effective_rank == pytest.approx(math.exp(entropy), rel=1e-12)
    assert (stats.n_90, stats.n_99) == (4, 4)  # cumulative 4, 6, 7, 8 against 7.2 and 7.92
    assert set(stats.to_dict()) == {"dim", "kept_abs", "kept_rel", "participation_ratio", "effective_rank",
                                    "n_90", "n_99", "total"}
    assert all(isinstance(v, (int, float)) for v in stats.to_dict().values())


@pytest.mark.parametrize("n", [1, 3, 10])
def test_uniform_spectrum_has_full_effective_dimension(n):
    stats = spectrum_stats(torch.full((n,), 0.25, dtype=torch.float64))
    assert stats.participation_ratio == pytest.approx(n, rel=1e-12)
    assert stats.effective_rank == pytest.approx(n, rel=1e-12)
    assert stats.n_90 == math.ceil(0.9 * n) and stats.n_99 == n


def test_spectrum_stats_scale_and_order_invariant():
    gen = torch.Generator().manual_seed(0)
    lam = torch.rand(7, generator=gen, dtype=torch.float64) ** 3
    base = spectrum_stats(lam)
    moved = spectrum_stats(1e4 * lam[torch.randperm(7, generator=gen)])
    for field in ("dim", "kept_rel", "n_90", "n_99"):
        assert getattr(moved, field) == getattr(base, field)
    assert moved.participation_ratio == pytest.approx(base.participation_ratio, rel=1e-12)
    assert moved.effective_rank == pytest.approx(base.effective_rank, rel=1e-12)


def test_spectrum_stats_empty_and_all_zero():
    for lam in (torch.zeros(0, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)):
        stats = spectrum_stats(lam)
        assert (stats.kept_abs, stats.kept_rel, stats.n_90, stats.n_99) == (0, 0, 0, 0)
        assert stats.participation_ratio == 0.0 and stats.effective_rank == 0.0 and stats.dim == lam.numel()


@pytest.mark.parametrize(
    "lam, kwargs, match",
    [
        (torch.tensor([3.0, 1.0, -1e-14, -2.0]), {}, r"negative entries .* at \[2, 3\].*\|λ\|"),
        (torch.ones(2, 2), {}, r"1-D"),
        (torch.ones(3), {"abs_threshold": -1.0}, r"abs_threshold must be >= 0, got -1.0"),
        (torch.ones(3), {"rel_threshold": 2.0}, r"rel_threshold must be in \[0, 1\), got 2.0"),
    ],
)
def test_spectrum_stats_bad_input(lam, kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectrum_stats(lam, **kwargs)


# --- rank deficit and gradient degeneracy ----------------------------------------------------------------


def test_gram_rank_deficit_counts_linearly_dependent_activations():
    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    acts[:, 4] = 2 * acts[:, 0] - acts[:, 2]
    acts[:, 5] = acts[:, 1]
    centred = acts - acts.mean(0)
    eigenvalues = np.abs(np.linalg.eigvalsh((centred.T @ centred / 64).numpy()))  # independent eigensolver
    assert gram_rank_deficit(torch.from_numpy(eigenvalues), threshold=1e-10) == 2
    assert gram_rank_deficit(torch.from_numpy(eigenvalues), threshold=0.0) <= 2  # round-off may survive
    with pytest.raises(ValueError, match=r"abs_threshold must be >= 0"):
        gram_rank_deficit(torch.from_numpy(eigenvalues), threshold=-1.0)


def test_gradient_degeneracy_closed_form():
    pca = torch.tensor([5.0, 3.0, 1.0, 0.5, 1e-6], dtype=torch.float64)
    lib = torch.tensor([8.0, 2.0, 1e-9, 1e-13, 0.0], dtype=torch.float64)
    result = gradient_degeneracy(pca, lib, rel_threshold=1e-2)
    # relative cuts 0.05 and 0.08: PCA keeps 4, LIB 2
    assert result.to_dict() == {"pca_kept": 4, "lib_kept": 2, "n": 2}


def test_gradient_degeneracy_does_not_depend_on_the_units_of_either_spectrum():
    # Λ is in output units², PCA variances in activation units²: rescaling either must not change the count
    pca = torch.tensor([5.0, 3.0, 1.0, 0.5, 1e-6], dtype=torch.float64)
    lib = torch.tensor([8.0, 2.0, 1e-9, 1e-13, 0.0], dtype=torch.float64)
    base = gradient_degeneracy(pca, lib).to_dict()
    for scale_pca, scale_lib in ((1e-12, 1.0), (1.0, 1e-9), (1e6, 1e-6)):
        assert gradient_degeneracy(pca * scale_pca, lib * scale_lib).to_dict() == base
    with pytest.raises(ValueError, match=r"rel_threshold must be in \[0, 1\), got 1.0"):
        gradient_degeneracy(pca, lib, rel_threshold=1.0)


# --- ReLU co-firing ------------------------------------------------------------------------------------------


def _splitmix64_reference(seed: int, n: int) -> list[int]:
    """SplitMix64 in unbounded Python ints, reduced mod 2^64 by hand."""
    mask, state, out = (1 << 64) - 1, seed, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


@pytest.mark.parametrize("seed", [0, 7, 1234567, -3])
def test_example_weights_follow_splitmix64(seed):
    # published first output for seed 1234567: 6457827717110365317
    if seed == 1234567:
        assert _splitmix64_reference(seed, 1) == [6457827717110365317]
    stream = _splitmix64_reference(seed, 10)
    expected = torch.tensor([[1 + (stream[2 * x + j] >> 12) / 2**52 for j in (0, 1)] for x in range(5)],
                            dtype=torch.float64)
    weights = example_weights(torch.arange(5), seed)
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)
    assert bool(((weights >= 1) & (weights < 2)).all())
    assert not torch.equal(weights, example_weights(torch.arange(5), seed + 1))


def _planted_patterns() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    active = torch.rand(48, 8, generator=gen) < 0.5  # (n, d_hidden)
    active[:, 0] = False  # dead
    active[:, 4] = True  # always on
    active[:, 5] = active[:, 1]
    active[:, 6] = active[:, 1]
    active[:, 7] = active[:, 3]
    assert len({tuple(active[:, u].tolist()) for u in (1, 2, 3)}) == 3
    return active, torch.arange(48)


def test_planted_duplicates_are_grouped_exactly():
    active, index = _planted_patterns()
    signature, count = coactivation_signature_update(active, index, seed=3)
    groups = coactivation_groups(signature, count, n_examples=48)
    assert groups.group_of.tolist() == [-1, 1, 2, 3, -2, 1, 1, 3]
    summary = {k: v for k, v in groups.to_dict().items() if k != "group_of"}
    assert summary == {"n_dead": 1, "n_always": 1, "n_groups": 2, "n_redundant": 3, "largest_group": 3}


def test_signature_is_a_sum_over_any_batching():
    active, index = _planted_patterns()
    whole = coactivation_signature_update(active, index, seed=3)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(4))
    parts = [coactivation_signature_update(active[perm[a:b]], index[perm[a:b]], seed=3)
             for a, b in ((0, 5), (5, 6), (6, 30), (30, 48))]
    signature, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    torch.testing.assert_close(signature, whole[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(count, whole[1], rtol=0, atol=0)
    assert torch.equal(coactivation_groups(signature, count, 48).group_of,
                       coactivation_groups(*whole, 48).group_of)


def test_many_random_patterns_are_never_merged():
    gen = torch.Generator().manual_seed(5)
    n, d_hidden = 40, 400
    pool = torch.rand(n, 60, generator=gen) < 0.5  # (n, 60) patterns, then near-copies differing in one example
    near = pool.clone()
    near[torch.arange(60) % n, torch.arange(60)] ^= True
    patterns = torch.cat([pool, near], dim=1)  # (n, 120)
    active = patterns[:, torch.randint(0, 120, (d_hidden,), generator=gen)]  # (n, d_hidden), many duplicates
    groups = coactivation_groups(*coactivation_signature_update(active, torch.arange(n), seed=6), n_examples=n)
    first_of: dict[tuple, int] = {}
    expected = [first_of.setdefault(tuple(active[:, u].tolist()), u) for u in range(d_hidden)]
    assert groups.group_of.tolist() == expected
    assert groups.n_redundant == d_hidden - len(first_of)


def test_groups_need_both_signatures_and_the_count_to_agree():
    signature = torch.tensor([[3.0, 2.0], [3.0, 5.0], [3.0, 2.0], [3.0, 2.0], [3.0 * (1 + 1e-12), 2.0]],
                             dtype=torch.float64)
    count = torch.tensor([2.0, 2.0, 2.0, 1.0, 2.0], dtype=torch.float64)
    groups = coactivation_groups(signature, count, n_examples=4, rtol=1e-9)
    assert groups.group_of.tolist() == [0, 1, 0, 3, 0]  # unit 4 differs by round-off only
    assert coactivation_groups(signature, count, n_examples=4, rtol=0.0).group_of.tolist() == [0, 1, 0, 3, 4]


def test_coactivation_bad_input():
    active, index = _planted_patterns()
    with pytest.raises(TypeError, match=r"active must be a bool tensor, got torch.float32"):
        coactivation_signature_update(active.float(), index, seed=0)
    with pytest.raises(ValueError, match=r"example_index must have shape \(48,\)"):
        coactivation_signature_update(active, index[:-1], seed=0)
    signature, count = coactivation_signature_update(active, index, seed=0)
    with pytest.raises(ValueError, match=r"integers in \[0, n_examples=40\].*48"):
        coactivation_groups(signature, count, n_examples=40)
    with pytest.raises(ValueError, match=r"signature must be \(d_hidden, 2\)"):
        coactivation_groups(signature[:, :1], count, n_examples=48)


def test_relu_coactivation_on_a_model_over_batches_and_shards():
    """Units 0 and 3 share weights (one group), unit 1 never fires, unit 2 always does; two shards summed
    by ``reduce`` equal one pass over every example."""
    from torch import nn

    from lib_lightning.core.lib.capture import NodeLayer
    from lib_lightning.core.metrics.coactivation import relu_coactivation

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.relu = nn.Linear(3, 5), nn.ReLU()
            with torch.no_grad():
                w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
                w[3] = w[0]
                w[1], w[2] = 0.0, 0.0
                self.lin.weight.copy_(w)
                self.lin.bias.copy_(torch.tensor([0.1, -1.0, 1.0, 0.1, -0.2]))
            self.double()

        def forward(self, x):
            return self.relu(self.lin(x))

    model, x = Net(), torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    layer, index = [NodeLayer("relu")], torch.arange(40)
    (whole,) = relu_coactivation(model, layer, [x[:15], x[15:]], index, seed=3)
    assert (whole.n_dead, whole.n_always, whole.n_groups, whole.n_redundant, whole.largest_group) == (1, 1, 1, 1, 2)
    assert whole.group_of.tolist()[:4] == [0, -1, -2, 0]
    shards = [index[0::2], index[1::2]]
    parts = []  # what each of two processes contributes; reduce sums them in a fixed order
    for shard in shards:
        parts.append([])
        relu_coactivation(model, layer, [x[shard]], shard, seed=3, reduce=lambda t, p=parts[-1]: p.append(t) or t)
    totals = [a + b for a, b in zip(*parts)]
    calls = iter(totals)
    (merged,) = relu_coactivation(model, layer, [x[shards[0]]], shards[0], seed=3, reduce=lambda t: next(calls))
    assert merged.to_dict() == whole.to_dict()


def test_coactivation_sums_of_batches_in_any_order_equal_one_batch_and_check_the_layers():
    from lib_lightning.core.metrics.coactivation import CoactivationSums

    gen = torch.Generator().manual_seed(2)
    acts = torch.randn(30, 2, 4, generator=gen, dtype=torch.float64)  # (batch, pos, d)
    acts[:, 0, 1] = acts[:, 1, 3].abs() + 1  # unit (0, 1) always fires
    index = torch.arange(100, 130)
    whole, parts = CoactivationSums(1, seed=5), CoactivationSums(1, seed=5)
    whole.update([acts], index)
    for rows in (slice(20, 30), slice(0, 7), slice(7, 20)):
        parts.update([acts[rows]], index[rows])
    (a,), (b,) = whole.groups(torch.device("cpu")), parts.groups(torch.device("cpu"))
    assert a.to_dict() == b.to_dict() and a.n_always >= 1 and parts.n_examples == 30
    with pytest.raises(ValueError, match=r"expected the outputs of 1 layer\(s\), got 2"):
        whole.update([acts, acts], index)
