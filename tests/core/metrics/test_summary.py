"""summarise: every metric knows whether feature 0 is the constant, and logs under the right kind (issue 11)."""

from __future__ import annotations

import pytest
import torch

from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.basis import neuron_basis
from lib_lightning.core.lib.stats import mean_update, shift_of, stats_update
from lib_lightning.core.metrics.evolution import subspace_overlap
from lib_lightning.core.metrics.sparsity import n_to_hold
from lib_lightning.core.metrics.summary import SummaryOptions, summarise
from tests.core.models import MLP, mlp_inputs

LAYERS = ["inp", "h0", "h1", "out"]


@pytest.fixture(scope="module")
def uncentred():
    x = mlp_inputs(n=64)
    return [build_graphs(MLP(seed=s), LAYERS, [x], kinds=("lib", "pca"), center=False) for s in (0, 1)]


def test_uncentred_sparsity_counts_every_feature(uncentred):
    graphs = uncentred[0]
    metrics = summarise(graphs, SummaryOptions(modularity=False, evolution=False)).metrics
    for sec, tag in enumerate(("inp->h0", "h0->h1", "h1->out")):
        for kind in ("lib", "pca"):
            edges = graphs[kind].edges[sec]  # no constant row or column: feature 0 is the top feature
            assert metrics[f"edges/{tag}/{kind}_n99"] == n_to_hold(edges.reshape(-1), 0.99)
            assert metrics[f"edges/{tag}/{kind}_frac99"] == pytest.approx(metrics[f"edges/{tag}/{kind}_n99"] / edges.numel())


def test_uncentred_modularity_is_computed_on_every_feature(uncentred):
    summary = summarise(uncentred[0], SummaryOptions(evolution=False))
    assert "graph/modularity" in summary.metrics
    lib = uncentred[0]["lib"]
    assert summary.graph.number_of_nodes() == sum(layer.d_lib for layer in lib.layers[:-1])
    assert ("inp", 0) in summary.graph.nodes


def test_uncentred_evolution_compares_feature_zero(uncentred):
    options = SummaryOptions(modularity=False, sparsity=False, overlap_k=2)
    first = summarise(uncentred[0], options)
    second = summarise(uncentred[1], options, previous=first.snapshot)
    for i, name in enumerate(LAYERS[:-1]):
        prev, new = (g["lib"].layers[i].directions() for g in uncentred)
        expected = subspace_overlap(prev[:2], new[:2], 2)
        assert second.metrics[f"lib/{name}/subspace_overlap"] == pytest.approx(expected, rel=1e-12)


def test_rotated_final_layer_is_logged_as_pca_only_and_overlaps_under_the_tracked_kind():
    x = mlp_inputs(n=64)
    graphs = build_graphs(MLP(), LAYERS, [x], kinds=("lib", "pca"), rotate_final=True)
    metrics = summarise(graphs, SummaryOptions(modularity=False)).metrics
    assert not [k for k in metrics if k.startswith("lib/out/")]  # the final layer's basis is PCA, not LIB
    assert "pca/out/dim_rel" in metrics and "lib/h1/grad_degenerate_rel" in metrics
    pca_only = {"pca": build_graphs(MLP(), LAYERS, [x], kinds=("pca",))["pca"]}
    first = summarise(pca_only, SummaryOptions(modularity=False))
    again = summarise(pca_only, SummaryOptions(modularity=False), previous=first.snapshot).metrics
    assert again["pca/h0/subspace_overlap"] == pytest.approx(1.0, abs=1e-12)
    assert not [k for k in again if k.startswith("lib/")]


def test_neuron_basis_stores_pca_eigenvalues_constant_first():
    x = mlp_inputs(n=64)[:, None, :] * torch.tensor([3.0, 0.2, 1.5, 0.1], dtype=torch.float64)  # variances around 1
    stats = stats_update(x, shift_of(mean_update(x)))
    evals = neuron_basis("inp", stats).pca_eigenvalues
    cov = torch.cov(x[:, 0].T, correction=0)
    expected = torch.linalg.eigvalsh(cov).flip(0)
    assert expected[0] > 1 > expected[-1]  # the constant's 1 would sort into the middle
    torch.testing.assert_close(evals, torch.cat([torch.ones(1, dtype=torch.float64), expected]), rtol=1e-12, atol=1e-14)


def test_non_strict_summary_skips_a_failing_metric_and_keeps_the_others(uncentred, monkeypatch):
    def broken(*args, **kwargs):
        raise FloatingPointError("sparsity broke")

    monkeypatch.setattr("lib_lightning.core.metrics.summary.edge_sparsity", broken)
    with pytest.raises(FloatingPointError, match="sparsity broke"):
        summarise(uncentred[0])
    summary = summarise(uncentred[0], strict=False)
    assert set(summary.errors) == {f"edges/{t}/{k}" for t in ("inp->h0", "h0->h1", "h1->out") for k in ("lib", "pca")}
    assert summary.errors["edges/h0->h1/pca"] == "FloatingPointError: sparsity broke"
    assert "graph/modularity" in summary.metrics and "lib/h0/dim_rel" in summary.metrics
    assert not [k for k in summary.metrics if k.startswith("edges/")]
