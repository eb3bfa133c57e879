"""Node and edge ablation (LIB_SPEC.md §5, §7) on small float64 models, against direct computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_lightning.core.interpret.ablation import ablation_schedule, evaluate, node_ablation, smallest_passing, substitute
from lib_lightning.core.interpret.edge_ablation import edge_ablation, edge_mask
from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.capture import NodeLayer, capture
from tests.core.models import MLP, TinyTransformer, mlp_inputs

LAYERS = ["inp", "h0", "h1", "out"]
TOL = dict(rtol=1e-10, atol=1e-12)


def _noisy_labels(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """The model's own predictions with every fifth label changed: a baseline accuracy below 1."""
    labels = logits.argmax(-1)
    gen = torch.Generator().manual_seed(seed)
    flip = torch.arange(len(labels)) % 5 == 0
    return torch.where(flip, torch.randint(0, logits.shape[1], labels.shape, generator=gen), labels)


@pytest.fixture(scope="module")
def mlp():
    model, x = MLP(seed=3), mlp_inputs(n=240)  # seed 3 predicts two classes about equally often
    graphs = build_graphs(model, LAYERS, [x[:120], x[120:]], kinds=("lib", "pca"))
    x_val = mlp_inputs(n=64, seed=7)
    with torch.no_grad():
        y_val = _noisy_labels(model(x_val), seed=3)
    data = [(x_val[:40], y_val[:40]), (x_val[40:], y_val[40:])]  # unequal batches: sums, not means
    return model, x, graphs, data


def _reference_eval(logits: torch.Tensor, data) -> tuple[float, float]:
    labels = torch.cat([y for _, y in data])
    logits = logits.detach()
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(-1) == labels).double().mean())


def test_substitute_identity_and_replacement(mlp):
    model, _, _, data = mlp
    x = data[0][0]
    assert torch.equal(substitute(model, "h0", lambda a: a, x), model(x))
    zero = substitute(model, "h1", torch.zeros_like, x)
    torch.testing.assert_close(zero, model.l2.bias.expand(len(x), -1), **TOL)
    with pytest.raises(KeyError, match="available modules"):
        substitute(model, "nope", lambda a: a, x)


def test_evaluate_sums_over_batches(mlp):
    model, _, _, data = mlp
    result = evaluate(model, data)
    loss, acc = _reference_eval(torch.cat([model(x) for x, _ in data]), data)
    assert result.count == 64
    assert result.loss == pytest.approx(loss, rel=1e-12)
    assert result.accuracy == acc
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [])


def test_schedule_closed_form_and_bad_input():
    assert ablation_schedule(20) == list(range(21))  # ⌈10·1.05^j⌉ = 11, 12, 12, 13, ..., 19, then 20
    assert ablation_schedule(7) == list(range(8))
    big = ablation_schedule(129)
    assert big[:11] == list(range(11)) and big[-1] == 129 and big == sorted(set(big))
    assert all(b <= a * 1.05 + 1 for a, b in zip(big[10:-1], big[11:]))
    with pytest.raises(ValueError, match="base must be > 1"):
        ablation_schedule(10, base=1.0)
    with pytest.raises(ValueError, match="n and dense_up_to"):
        ablation_schedule(-1)


def test_node_ablation_full_k_is_exact_and_constant_only_is_chance(mlp):
    model, x, graphs, data = mlp
    lib = graphs["lib"]
    curves = node_ablation(model, lib, data, ks=[0, 1])
    assert [c.layer for c in curves] == ["inp", "h0", "h1"]  # the unrotated logits are left out
    base = evaluate(model, data)
    labels = torch.cat([y for _, y in data])
    with torch.no_grad():
        acts = capture(model, [NodeLayer(n) for n in LAYERS], x)
    for c, act in zip(curves, acts):
        assert c.ks.tolist() == [0, 1, c.d_lib]
        # full k: the identity, so exactly the unablated model
        assert c.accuracy[-1].item() == base.accuracy and c.loss[-1].item() == base.loss
        assert c.baseline_accuracy == base.accuracy
        # k = 1 keeps the constant direction only: the mean activation of the graph's data for every input
        mean = act.mean((0, 1))
        logits = torch.cat([substitute(model, c.layer, lambda a: mean.expand_as(a), xv) for xv, _ in data])
        loss, acc = _reference_eval(logits, data)
        assert c.loss[1].item() == pytest.approx(loss, rel=1e-9)
        assert c.accuracy[1].item() == acc
        # one prediction for every input: accuracy is the share of that class among the labels (chance)
        pred = logits.argmax(-1)
        assert (pred == pred[0]).all()
        assert acc == pytest.approx(float((labels == pred[0]).double().mean()))
        assert acc < base.accuracy


def test_node_ablation_of_an_uncentred_graph_covers_every_non_output_layer(mlp):
    model, x, _, data = mlp
    lib = build_graphs(model, LAYERS, [x], kinds=("lib",), center=False)["lib"]
    curves = node_ablation(model, lib, data, ks=[1])  # no layer has a constant direction: none was ablated
    assert [c.layer for c in curves] == ["inp", "h0", "h1"]
    base = evaluate(model, data)
    assert all(c.accuracy[-1].item() == base.accuracy for c in curves)


def test_node_ablation_projection_matches_direct_computation(mlp):
    model, _, graphs, data = mlp
    for kind in ("lib", "pca"):
        basis = graphs[kind].layers[2]
        (curve,) = node_ablation(model, graphs[kind], data, layers=[2], ks=[3])
        mask = (torch.arange(basis.d_lib) < 3).double()
        with torch.no_grad():
            logits = torch.cat([
                model.l2(basis.reconstruct(basis.transform(model.h1(torch.relu(model.l1(torch.relu(model.l0(xv)))))) * mask))
                for xv, _ in data
            ])
        loss, acc = _reference_eval(logits, data)
        assert curve.loss[0].item() == pytest.approx(loss, rel=1e-10)
        assert curve.accuracy[0].item() == acc


def test_node_ablation_bad_input(mlp):
    model, _, graphs, data = mlp
    with pytest.raises(ValueError, match="out of range"):
        node_ablation(model, graphs["lib"], data, layers=[4])
    with pytest.raises(ValueError, match="ks must be >= 0"):
        node_ablation(model, graphs["lib"], data, ks=[-1])
    with pytest.raises(TypeError, match="re-iterable"):
        node_ablation(model, graphs["lib"], iter(data))


def test_edge_mask_closed_form():
    edges = torch.tensor([[9.0, 1.0, 5.0], [8.0, 4.0, 0.5], [7.0, 3.0, 6.0], [0.0, 2.0, 0.1]])  # (k_out=4, k_in=3)
    mask = edge_mask(edges, 3)
    expected = torch.tensor([[1, 0, 1], [1, 1, 0], [1, 0, 1], [1, 0, 0]], dtype=torch.bool)  # 6, 5, 4 + constant column
    assert torch.equal(mask, expected)
    assert edge_mask(edges, 0).sum() == 4 and edge_mask(edges, 8).all()
    assert torch.equal(edge_mask(edges, 2, skip_constant_input=False), torch.tensor(
        [[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match=r"k must be in \[0, 8\]"):
        edge_mask(edges, 9)
    with pytest.raises(ValueError, match="k_out, k_in"):
        edge_mask(edges[0], 1)


def _edge_reference(model, basis_in, basis_out, mask, data):
    """Section h0 -> h1 of the MLP ablated one output feature at a time (no grouping), then the rest."""
    logits = []
    with torch.no_grad():
        for x, _ in data:
            h0 = torch.relu(model.l0(x))
            feats_in = basis_in.transform(h0)
            feats_out = torch.zeros(len(x), basis_out.d_lib, dtype=torch.float64)
            for i in range(basis_out.d_lib):
                out = torch.relu(model.l1(basis_in.reconstruct(feats_in * mask[i])))
                feats_out[:, i] = basis_out.transform(out)[:, i]
            logits.append(model.l2(basis_out.reconstruct(feats_out)))
    return _reference_eval(torch.cat(logits), data)


def test_edge_ablation_matches_per_feature_reference(mlp):
    model, _, graphs, data = mlp
    for kind in ("lib", "pca"):
        g = graphs[kind]
        result = edge_ablation(model, g, 1, data, ks=[5, 17])
        for k in (5, 17):
            loss, acc = _edge_reference(model, g.layers[1], g.layers[2], edge_mask(g.edges[1], k), data)
            at = result.ks.tolist().index(k)
            assert result.loss[at].item() == pytest.approx(loss, rel=1e-10)
            assert result.accuracy[at].item() == acc


def test_edge_ablation_all_edges_kept_is_exact_and_bisection_is_tight(mlp):
    model, _, graphs, data = mlp
    base = evaluate(model, data)
    for kind in ("lib", "pca"):
        g = graphs[kind]
        for sec in range(3):
            n = g.edges[sec].shape[0] * (g.edges[sec].shape[1] - 1)
            r = edge_ablation(model, g, sec, data, ks=[n])
            assert r.n_edges == n and r.section == f"{LAYERS[sec]}->{LAYERS[sec + 1]}"
            assert r.accuracy[-1].item() == base.accuracy
            assert r.loss[-1].item() == pytest.approx(base.loss, rel=1e-10)
            assert r.reached
            ks, acc = r.ks.tolist(), r.accuracy.tolist()
            target = base.accuracy - r.tolerance
            assert acc[ks.index(r.n_required)] >= target
            if r.n_required > 0:
                assert acc[ks.index(r.n_required - 1)] < target
            kept = edge_mask(g.edges[sec], r.n_required)
            weakest = g.edges[sec][:, 1:][kept[:, 1:]].min() if r.n_required else 0.0
            assert r.cutoff == pytest.approx(float(weakest))


def _tiny_transformer(label_seed: int):
    """TinyTransformer, its graphs on 200 token rows (node layers with 4 positions, then 1), 60 held out."""
    model = TinyTransformer()
    gen = torch.Generator().manual_seed(0)
    tokens, val = torch.randint(0, 7, (200, 4), generator=gen), torch.randint(0, 7, (60, 4), generator=gen)
    graphs = build_graphs(model, ["resid_pre", "resid_mid", "logits"], [tokens])
    with torch.no_grad():
        labels = _noisy_labels(model(val), seed=label_seed)
    return model, graphs, [(val, labels)]


def test_edge_ablation_multi_position_section_all_kept():
    model, graphs, data = _tiny_transformer(label_seed=1)
    base = evaluate(model, data)
    for kind, g in graphs.items():
        n = g.edges[0].shape[0] * (g.edges[0].shape[1] - 1)
        r = edge_ablation(model, g, 0, data, ks=[n])
        assert r.accuracy[-1].item() == base.accuracy
        assert r.loss[-1].item() == pytest.approx(base.loss, rel=1e-9)
        (curve,) = node_ablation(model, g, data, layers=[0], ks=[g.layers[0].d_lib])
        assert curve.loss[-1].item() == base.loss


def test_edge_ablation_bad_input(mlp):
    model, _, graphs, data = mlp
    with pytest.raises(ValueError, match=r"section must be in \[0, 2\]"):
        edge_ablation(model, graphs["lib"], 3, data)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        edge_ablation(model, graphs["lib"], 0, data, tolerance=-0.1)


def test_smallest_passing_requires_the_criterion_to_keep_holding():
    ks = torch.tensor([0, 1, 2, 3, 4])
    assert smallest_passing(ks, torch.tensor([0.1, 0.95, 0.5, 0.96, 0.97]), 0.9) == 3
    assert smallest_passing(ks, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), 0.9) is None


class _GatedMLP(MLP):
    """The MLP on ``{"x", "attention_mask"}`` inputs whose per-example mask (context) gates section
    h0 -> h1: a batch-sized tensor from before h0 is read after it, so repeating h0's value per mask fails."""

    def forward(self, inputs):
        h0 = self.h0(self.a0(self.l0(self.inp(inputs["x"]))))
        h1 = self.h1(self.a1(self.l1(h0)) * inputs["attention_mask"])
        return self.out(self.l2(h1))


def _counting(calls: list[int]):
    def forward(model, inputs):
        calls.append(1)
        return model(inputs)

    return forward


def _assert_same_result(a, b):
    assert (a.n_required, a.reached, a.cutoff) == (b.n_required, b.reached, b.cutoff)
    assert torch.equal(a.ks, b.ks) and torch.equal(a.accuracy, b.accuracy)
    assert torch.allclose(a.loss, b.loss, rtol=1e-12, atol=0)


def test_edge_ablation_reuse_matches_the_path_before_at_every_budget(mlp):
    model, _, graphs, data = mlp
    for kind in ("lib", "pca"):
        g = graphs[kind]
        for sec in range(3):
            old = edge_ablation(model, g, sec, data, ks=[3, 11], max_rows=1, reuse=False)
            _assert_same_result(old, edge_ablation(model, g, sec, data, ks=[3, 11]))
            # one mask per forward on whole batches; and several stacked forwards per step
            _assert_same_result(old, edge_ablation(model, g, sec, data, ks=[3, 11], max_rows=1))
            _assert_same_result(old, edge_ablation(model, g, sec, data, ks=[3, 11], max_rows=50))


def test_edge_ablation_stacked_masks_multi_position_transformer():
    model, graphs, data = _tiny_transformer(label_seed=2)
    for g in graphs.values():
        for sec in range(2):
            n = g.edges[sec].shape[0] * (g.edges[sec].shape[1] - 1)
            ks = [n // 7, n // 3, n // 2]
            old = edge_ablation(model, g, sec, data, ks=ks, max_rows=1, reuse=False)
            _assert_same_result(old, edge_ablation(model, g, sec, data, ks=ks))


def _gated_case():
    """The gated MLP, its LIB graph, and 64 held-out ``{"x", "attention_mask"}`` inputs with labels."""
    model = _GatedMLP(seed=3)

    def gated(x):
        return {"x": x, "attention_mask": (x[:, :1] > -0.5).to(x.dtype)}  # (batch, 1)

    g = build_graphs(model, LAYERS, [gated(mlp_inputs(n=240))], kinds=("lib",))["lib"]
    val = gated(mlp_inputs(n=64, seed=7))
    with torch.no_grad():
        data = [(val, _noisy_labels(model(val), seed=3))]
    return model, g, data


def test_edge_ablation_falls_back_when_the_section_reads_earlier_batch_tensors():
    model, g, data = _gated_case()
    old = edge_ablation(model, g, 1, data, ks=[4, 9], max_rows=1, reuse=False)
    _assert_same_result(old, edge_ablation(model, g, 1, data, ks=[4, 9]))


def test_edge_ablation_bad_max_rows(mlp):
    model, _, graphs, data = mlp
    with pytest.raises(ValueError, match=r"max_rows must be an int >= 1 \(examples x masks per forward\), got 0"):
        edge_ablation(model, graphs["lib"], 0, data, max_rows=0)
