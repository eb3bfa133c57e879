"""Activation statistics stay exact for data whose mean is large against its spread (issue 11, item 1)."""

from __future__ import annotations

import pytest
import torch

from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.basis import whiten
from lib_lightning.core.lib.stats import mean_update, shift_of, stats_update
from lib_lightning.core.metrics.summary import SummaryOptions, summarise
from tests.core.models import MLP
from tests.core.lib.test_build import LAYERS, _two_process_graphs

DIRECTION = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)


def low_rank(offset: float, n: int = 1000) -> torch.Tensor:
    """``(n, 3)`` rank-2 data (exactly: z A with A of shape 2 x 3) shifted by offset * (1, -2, 3)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    a = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    return z @ a + offset * DIRECTION


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4])
def test_low_rank_data_keeps_its_rank_at_the_default_threshold_at_any_offset(offset):
    x = low_rank(offset)
    graphs = build_graphs(MLP((3, 4, 5, 2)), LAYERS, [x[:300], x[300:]], kinds=("pca",))
    inp = graphs["pca"].layers[0]
    # constant + the two real directions; the one-pass formula gave 6.9e-11 at offset 1e2 (> 1e-12)
    assert inp.d_lib == 3
    assert inp.pca_eigenvalues[-1] < 1e-15 * inp.pca_eigenvalues[1]


def test_gram_rank_deficit_sees_the_dependent_direction_at_offset_1e3():
    x = low_rank(1e3)
    graphs = build_graphs(MLP((3, 4, 5, 2)), LAYERS, [x], kinds=("lib",))
    options = SummaryOptions(sparsity=False, modularity=False, evolution=False)
    # the one-pass formula left a variance of 4.5e-9 > 1e-10 in the null direction: deficit 0
    assert summarise(graphs, options).metrics["lib/inp/gram_rank_deficit"] == 1


def test_sharded_shifted_sums_equal_one_process_at_a_large_offset():
    x = low_rank(1e4, n=200)
    kinds = ("lib", "pca")
    one = build_graphs(MLP((3, 4, 5, 2)), LAYERS, [x[:17], x[17:]], kinds=kinds)
    models = [MLP((3, 4, 5, 2)), MLP((3, 4, 5, 2))]
    ranks = _two_process_graphs(models, [[x[:90], x[150:]], [x[90:150]]], kinds=kinds)
    for kind in kinds:
        for ref in ranks:
            for a, b in zip(one[kind].layers, ref[kind].layers):
                torch.testing.assert_close(a.lambdas, b.lambdas, rtol=1e-9, atol=1e-12 * float(a.lambdas.max()))
                torch.testing.assert_close(a.pca_eigenvalues, b.pca_eigenvalues, rtol=1e-9, atol=1e-9)


def test_the_shift_is_the_dataset_mean_however_batched_and_merged_sums_match_one_batch():
    x = low_rank(1e4, n=60)[:, None, :]  # (60, 1, 3)
    one = shift_of(mean_update(x))
    torch.testing.assert_close(one, x.mean((0, 1)), rtol=1e-15, atol=0)
    # two "ranks" with two and one batches: their partials, sum-reduced, give the same shift
    partials = [mean_update(x[:10]) + mean_update(x[10:25]), mean_update(x[25:])]
    sharded = shift_of(partials[0] + partials[1])
    torch.testing.assert_close(sharded, one, rtol=1e-15, atol=0)
    merged = stats_update(x[:25], sharded) + stats_update(x[25:], sharded)
    whole = stats_update(x, one)
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-15, atol=0)
    torch.testing.assert_close(merged.covariance(), whole.covariance(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(whiten(merged).all_eigenvalues, whiten(whole).all_eigenvalues, rtol=1e-10, atol=1e-13)


def test_adding_statistics_about_different_shifts_or_a_wrong_shift_shape_is_an_error():
    x = low_rank(1.0, n=8)[:, None, :]
    with pytest.raises(ValueError, match="different shifts"):
        stats_update(x, x[0, 0]) + stats_update(x, x[1, 0])
    with pytest.raises(ValueError, match=r"shift must have shape \(3,\)"):
        stats_update(x, torch.zeros(2, dtype=torch.float64))
