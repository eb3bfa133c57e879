"""The shared-forward and affine paths of the ablations against the paths before them (one forward per
mask or k), on small float64 models: a Linear section, ReLU sections, attention, a context-input model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_lightning.core.interpret.ablation import _projections, copy_updates, evaluation_update, node_ablation
from lib_lightning.core.interpret.edge_ablation import _section_features, edge_ablation, edge_mask
from lib_lightning.core.interpret.edge_columns import ColumnCache, affine_columns, new_columns
from lib_lightning.core.interpret.sections import (
    AffineMap, Section, affine_holds, affine_map, layer_features, probe_masks, row_plan, section_mode, stacking_holds,
)
from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.capture import NodeLayer, capture, default_forward
from lib_lightning.core.lib.modes import analysis_mode
from tests.core.interpret.test_ablation import LAYERS, _assert_same_result, _counting, _gated_case, _tiny_transformer
from tests.core.models import MLP, mlp_inputs

TOL = dict(rtol=1e-10, atol=1e-12)


def _graphs(model, seed=3):
    x = mlp_inputs(n=240)
    return build_graphs(model, LAYERS, [x[:120], x[120:]], kinds=("lib", "pca")), mlp_inputs(n=64, seed=7)


def _labelled(model, x, seed=3):
    with torch.no_grad():
        logits = model(x)
    labels = logits.argmax(-1)
    flip = torch.arange(len(labels)) % 5 == 0  # a baseline accuracy below 1
    labels = torch.where(flip, torch.randint(0, 3, labels.shape, generator=torch.Generator().manual_seed(seed)), labels)
    return [(x[:40], labels[:40]), (x[40:], labels[40:])]


def _mode(model, graph, i, x, out=True):
    basis_in = graph.layers[i]
    layer_out = NodeLayer(LAYERS[i + 1]) if out else None
    section = Section(model, default_forward, NodeLayer(LAYERS[i]), layer_out)
    with torch.no_grad():
        (act,) = capture(model, [section.layer_in], x)
        feats = basis_in.transform(act)
        read = graph.layers[i + 1].transform if out else (lambda o: o)
        return section, feats, read, section_mode(section, basis_in, x, feats, read, probe_masks(basis_in.d_lib), 4096)


def test_row_plan_closed_form():
    assert row_plan(100, 5, 4096) == (100, 5)  # everything in one forward
    assert row_plan(4096, 100, 4096) == (40, 100)  # all copies of 40-example slices
    assert row_plan(4096, 1, 4096) == (4096, 1)
    assert row_plan(10, 3, 1) == (1, 1)
    assert row_plan(10, 0, 8) == (8, 1)


def test_probe_masks_keep_the_constant_and_differ():
    masks = probe_masks(9)
    assert masks.shape == (6, 9) and masks[:, 0].all() and masks[0].all()
    assert masks[1].sum() == 1 and masks[2].sum() == 4
    assert len({tuple(m.tolist()) for m in masks}) == 6


def test_affine_probe_accepts_linear_sections_and_rejects_relu():
    model = MLP(seed=3)
    graphs, x = _graphs(model)
    for g in graphs.values():
        # h1 -> out is one Linear: affine, and the map reproduces real forwards of masks it never saw
        section, feats, read, (stacked, affine) = _mode(model, g, 2, x)
        assert stacked and affine is not None
        mask = edge_mask(g.edges[2], 9)  # one mask per output feature
        with torch.no_grad():
            groups = _section_features(section, False, g.layers[2], g.layers[3], x, feats, mask.double())
        want = torch.stack([groups[i][..., i] for i in range(mask.shape[0])], dim=-1)
        torch.testing.assert_close(affine_columns(affine, feats, mask), want, **TOL)
        # inp -> h0 and h0 -> h1 end in a ReLU: stacking holds, the affine probe refuses
        for i in (0, 1):
            section, feats, read, (stacked, affine) = _mode(model, g, i, x)
            assert stacked and affine is None
            # the map read from unit features exists, but real forwards of the probe masks expose it
            with torch.no_grad():
                forged = affine_map(section, x, feats, g.layers[i], read, 4096)
                assert not affine_holds(section, x, feats, g.layers[i], forged, read, probe_masks(g.layers[i].d_lib))
    # without the ReLUs the whole MLP is a Linear chain: every section and every rest is affine
    linear = MLP(seed=3, act=nn.Identity)
    graphs, x = _graphs(linear)
    for i in range(3):
        assert _mode(linear, graphs["lib"], i, x)[3][1] is not None
        assert _mode(linear, graphs["lib"], i, x, out=False)[3][1] is not None


def test_stacking_probe_refuses_a_model_that_reads_context_across_the_section():
    model, g, data = _gated_case()
    val = data[0][0]
    section = Section(model, default_forward, NodeLayer("h0"), NodeLayer("h1"))
    with torch.no_grad():
        feats = g.layers[1].transform(capture(model, [section.layer_in], val)[0])
        masked = feats.unsqueeze(0) * probe_masks(g.layers[1].d_lib)[:, None, None, :].double()
        assert not stacking_holds(section, val, g.layers[1].reconstruct(masked), 32)
        assert section_mode(section, g.layers[1], val, feats, g.layers[2].transform,
                            probe_masks(g.layers[1].d_lib), 4096) == (False, None)
    # node ablation of h0 falls back to one forward per k, with the same result
    old = node_ablation(model, g, data, layers=[1], reuse=False)[0]
    new = node_ablation(model, g, data, layers=[1])[0]
    assert torch.equal(old.accuracy, new.accuracy)
    torch.testing.assert_close(new.loss, old.loss, **TOL)


def _h0_section(kind="lib"):
    """The MLP's section h0 -> h1 with its bases in the ``kind`` graph: (model, x, graph, basis_in, basis_out, section)."""
    model = MLP(seed=3)
    graphs, x = _graphs(model)
    g = graphs[kind]
    return model, x, g, g.layers[1], g.layers[2], Section(model, default_forward, NodeLayer("h0"), NodeLayer("h1"))


def test_column_cache_runs_each_row_mask_once_and_keeps_the_bracket():
    model, x, g, basis_in, basis_out, section = _h0_section()
    batches = [(x[:40], None), (x[40:], None)]
    with torch.no_grad():
        feats = [basis_in.transform(capture(model, [section.layer_in], b)[0]) for b, _ in batches]
        batches = [(b, f) for (b, _), f in zip(batches, feats)]
        cache, reused, before = ColumnCache(), 0, 0
        for k in (0, 1, 2, 4, 8, 16, 12, 10, 11):  # the steps of a search
            mask = edge_mask(g.edges[1], k)
            reused += new_columns(section, True, basis_in, basis_out, batches, mask, cache, max_rows=64)
            before += torch.unique(mask, dim=0).shape[0]
            want = torch.cat([_section_features(section, False, basis_in, basis_out, b, f, mask.double())
                              for b, f in batches], dim=1)  # (k_out, n, 1, k_out): one run per row
            got = cache.columns(mask)  # (n, 1, k_out)
            torch.testing.assert_close(got, torch.stack([want[i, ..., i] for i in range(mask.shape[0])], -1), **TOL)
    assert reused < before, (reused, before)
    low, high = edge_mask(g.edges[1], 10), edge_mask(g.edges[1], 11)
    cache.keep_between(low, high)
    lo, hi = low.sum(1), high.sum(1)
    assert len(cache) >= basis_out.d_lib and all(lo[i] <= c <= hi[i] for i, c in cache._store)
    assert cache.missing(high).numel() == 0 and cache.missing(edge_mask(g.edges[1], 16)).numel() > 0


def test_edge_ablation_of_an_affine_section_runs_no_forward_per_step():
    model = MLP(seed=3)
    graphs, x = _graphs(model)
    data = _labelled(model, x)
    for g in graphs.values():
        for dtype in (torch.float64, torch.float32):  # float32: the probe's tolerance is float32's
            few, many = [], []
            a = edge_ablation(model, g, 2, data, forward=_counting(few), dtype=dtype)
            b = edge_ablation(model, g, 2, data, ks=[3, 5, 7, 9, 13], forward=_counting(many), dtype=dtype)
            assert len(b.ks) > len(a.ks) and len(many) == len(few), (dtype, len(many), len(few))  # the probes only
        old = edge_ablation(model, g, 2, data, ks=[3, 5, 7, 9, 13], max_rows=1, reuse=False)
        _assert_same_result(old, edge_ablation(model, g, 2, data, ks=[3, 5, 7, 9, 13]))


@pytest.mark.parametrize("max_rows", [2048, 50, 1])
def test_node_ablation_reuse_matches_the_path_before(max_rows):
    model = MLP(seed=3)
    graphs, x = _graphs(model)
    data = _labelled(model, x)
    cases = [(model, g, data) for g in graphs.values()]
    tiny, tiny_graphs, tiny_data = _tiny_transformer(label_seed=2)
    cases += [(tiny, g, tiny_data) for g in tiny_graphs.values()]
    for m, g, d in cases:
        old = node_ablation(m, g, d, reuse=False)
        new = node_ablation(m, g, d, max_rows=max_rows)
        for a, b in zip(old, new, strict=True):
            assert torch.equal(a.ks, b.ks) and torch.equal(a.accuracy, b.accuracy), a.layer
            torch.testing.assert_close(b.loss, a.loss, **TOL)
            assert b.loss[-1].item() == a.baseline_loss  # k = d_lib is the unablated model, exactly


def test_node_ablation_bad_max_rows():
    model = MLP(seed=3)
    graphs, x = _graphs(model)
    with pytest.raises(ValueError, match="max_rows must be an int >= 1"):
        node_ablation(model, graphs["lib"], _labelled(model, x), max_rows=0)


def test_float32_evaluation_matches_the_path_before():
    """The main job analyses in float32: the affine maps come from float32 outputs, the features are float64."""
    model = MLP(seed=3)
    graphs, x = _graphs(model)
    data = _labelled(model, x)
    for g in graphs.values():
        old = node_ablation(model, g, data, dtype=torch.float32, reuse=False)
        new = node_ablation(model, g, data, dtype=torch.float32)
        for a, b in zip(old, new, strict=True):
            assert torch.equal(a.accuracy, b.accuracy)
            torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=0)
        for sec in range(3):
            a = edge_ablation(model, g, sec, data, ks=[4, 9], dtype=torch.float32, reuse=False, max_rows=1)
            b = edge_ablation(model, g, sec, data, ks=[4, 9], dtype=torch.float32)
            assert (a.n_required, a.reached) == (b.n_required, b.reached) and torch.equal(a.ks, b.ks)
            assert torch.equal(a.accuracy, b.accuracy)
            torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_copy_updates_equal_one_evaluation_update_per_copy(dtype):
    gen = torch.Generator().manual_seed(5)
    copies, batch, classes = 4, 9, 5
    logits = (torch.randn(copies * batch, classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    logits[::batch, :2] = 10.0  # example 0 of every copy: a tie for the top class, broken towards class 0
    labels[0] = 1  # so that it counts as wrong
    got = copy_updates(logits, labels, copies)  # (copies, 3)
    want = torch.stack([evaluation_update(part, labels) for part in logits.split(batch)])
    assert got.dtype == torch.float64 and got.shape == (copies, 3)
    assert torch.equal(got[:, 1:], want[:, 1:])  # correct counts and counts exactly
    assert len(set(want[:, 1].tolist())) > 1  # the copies differ, so a mixed-up copy would show
    torch.testing.assert_close(got[:, 0], want[:, 0], **TOL)  # loss sums: another summation order
    with pytest.raises(ValueError, match=r"must return \(3 x 9, classes\) logits, got \(36, 5\)"):
        copy_updates(logits, labels, 3)
    with pytest.raises(ValueError, match="got tuple"):
        copy_updates((logits,), labels, copies)


def test_layer_features_are_the_captured_features_and_the_models_dtype():
    model, x, _, basis, _, section = _h0_section()
    for dtype in (torch.float64, torch.float32):
        data = [(x[:40].to(dtype), None), (x[40:].to(dtype), None)]
        with torch.no_grad(), analysis_mode(model, dtype):
            feats, got = layer_features(section, basis, data)
            want = [basis.transform(capture(model, [NodeLayer("h0")], b)[0]) for b, _ in data]
        assert got == dtype and len(feats) == 2
        for f, w in zip(feats, want):
            assert f.dtype == torch.float64 and torch.equal(f, w)


def test_new_columns_in_the_models_dtype_equal_the_cast_in_the_hook():
    """Masked values rounded once to float32 before the forward are the values the hook would cast."""
    model, x, g, basis_in, basis_out, section = _h0_section("pca")
    with torch.no_grad(), analysis_mode(model, torch.float32):
        x = x.float()
        feats, dtype = layer_features(section, basis_in, [(x[:40], None), (x[40:], None)])
        batches = [(x[:40], feats[0]), (x[40:], feats[1])]
        mask = edge_mask(g.edges[1], 20)
        by_hook, handed = ColumnCache(), ColumnCache()
        new_columns(section, True, basis_in, basis_out, batches, mask, by_hook, max_rows=64)
        new_columns(section, True, basis_in, basis_out, batches, mask, handed, max_rows=64, dtype=dtype)
    assert dtype == torch.float32
    assert torch.equal(handed.columns(mask), by_hook.columns(mask))


def test_running_projections_equal_one_product_per_k():
    """The node ablation's copies f C_k C⁺ as one running sum over the ascending ks equal one product per k
    (to float64 rounding), are handed over in the model's dtype, and refuse ks out of order."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(7, 3, 20, generator=gen, dtype=torch.float64)  # (e, pos, d_lib)
    directions = torch.randn(20, 6, generator=gen, dtype=torch.float64)  # (d_lib, d)
    ks = [0, 1, 2, 5, 5, 11, 19]  # a repeated k and a zero k included
    for dtype in (torch.float64, torch.float32):
        got = _projections(feats, directions, ks, dtype).view(len(ks), 7, 3, 6)
        assert got.dtype == dtype
        for j, k in enumerate(ks):
            want = (feats[..., :k] @ directions[:k]).to(dtype)
            torch.testing.assert_close(got[j], want, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=1e-12)
        assert torch.equal(got[0], torch.zeros_like(got[0]))
    with pytest.raises(ValueError, match="ks must be ascending"):
        _projections(feats, directions, [3, 2], torch.float64)


@pytest.mark.parametrize("pos_in", [1, 3])
def test_affine_prefixes_equal_the_map_at_each_k(pos_in):
    """AffineMap.prefixes (the affine rest of a node ablation, one running sum over the ks) gives the map
    with only the first k features at each k, for one or several input positions; ks out of order refused."""
    gen = torch.Generator().manual_seed(1)
    affine = AffineMap(torch.randn(2, 5, generator=gen, dtype=torch.float64),
                       torch.randn(pos_in, 9, 2, 5, generator=gen, dtype=torch.float32))
    feats = torch.randn(11, pos_in, 9, generator=gen, dtype=torch.float64)
    ks = [0, 1, 4, 4, 8]
    outs = [out.clone() for out in affine.prefixes(feats, ks)]
    for k, out in zip(ks, outs, strict=True):
        assert out.shape == (11, 2, 5) and out.dtype == torch.float64
        torch.testing.assert_close(out, affine(feats, k), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="ks must be ascending"):
        list(affine.prefixes(feats, [4, 1]))
