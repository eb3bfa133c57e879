"""Invariants of LIB_SPEC.md §10 on small float64 models, with jacrev as an independent reference."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

from lib_lightning.core.lib.capture import NodeLayer, capture
from lib_lightning.core.lib.jacobian import (
    edge_attributions,
    edges_update,
    integrated_jacobian,
    integrated_vjp,
    m_prime_update,
    project,
)
from lib_lightning.core.lib import build_graphs, default_reuse_rtol
from lib_lightning.core.lib.graph import load_graphs, save_graphs
from lib_lightning.core.lib.integration import integration_rule
from lib_lightning.core.lib.stats import augment
from tests.core.models import MLP, TinyTransformer, mlp_inputs

LAYERS = ["inp", "h0", "h1", "out"]
TOL = dict(rtol=1e-9, atol=1e-12)


def _sections(model: MLP):
    return [
        lambda f: torch.relu(model.l0(f)),
        lambda f: torch.relu(model.l1(f)),
        lambda f: model.l2(f),
    ]


@pytest.fixture(scope="module")
def mlp_setup():
    model, x = MLP(), mlp_inputs()
    graphs = build_graphs(model, LAYERS, [x[:120], x[120:250], x[250:]], kinds=("lib", "pca", "neuron"), chunk_size=50)
    with torch.no_grad():
        acts = [a[:, 0] for a in capture(model, [NodeLayer(n) for n in LAYERS], x)]
    return model, x, graphs, acts


def _m_prime_ref(section, acts_in, basis_out):
    """E_x[Jᵀ C Cᵀ J] by jacrev, padded with a zero constant row and column."""
    jac = vmap(jacrev(section))(acts_in)  # (N, d_out, d_in)
    c = basis_out.basis[: jac.shape[1]]
    g = torch.einsum("nid,ik->nkd", jac, c)
    d = acts_in.shape[1]
    m = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    m[:d, :d] = torch.einsum("nkd,nke->de", g, g) / acts_in.shape[0]
    return m


def _edges_ref(section, acts_in, basis_in, basis_out):
    """E_ij = mean_x (∂ĥ_i/∂f̂_j · f̂_j)² with ĥ(f̂) = (F((f̂ C⁺)[:d]), 1) C_out, by jacrev."""

    def h_hat(f_hat):
        return augment(section((f_hat @ basis_in.basis_pinv)[:-1])) @ basis_out.basis

    f_hat = basis_in.transform(acts_in)
    jac = vmap(jacrev(h_hat))(f_hat)  # (N, k_out, k_in)
    return ((jac * f_hat[:, None, :]) ** 2).mean(0)


def test_t1_left_inverse_and_projection(mlp_setup):
    _, _, graphs, _ = mlp_setup
    for graph in graphs.values():
        for layer in graph.layers:
            c, c_pinv = layer.basis, layer.basis_pinv
            k = c.shape[1]
            torch.testing.assert_close(c_pinv @ c, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
            proj = c @ c_pinv
            torch.testing.assert_close(proj @ proj, proj, rtol=0, atol=1e-11)
            assert torch.linalg.matrix_rank(proj) == k


def test_t2_features_have_diagonal_second_moment_lambda(mlp_setup):
    _, _, graphs, acts = mlp_setup
    for layer, a in zip(graphs["lib"].layers[:-1], acts[:-1]):
        f_hat = layer.transform(a)
        torch.testing.assert_close(f_hat.T @ f_hat / len(a), torch.diag(layer.lambdas), rtol=1e-12, atol=1e-13)


def test_t3_whitened_m_is_identity_and_m_prime_matches_jacrev(mlp_setup):
    model, _, graphs, acts = mlp_setup
    lib = graphs["lib"]
    for sec, section in enumerate(_sections(model)):
        m_prime = _m_prime_ref(section, acts[sec], lib.layers[sec + 1])
        c_pinv = lib.layers[sec].basis_pinv
        m_hat = c_pinv @ m_prime @ c_pinv.T
        torch.testing.assert_close(m_hat[1:, 1:], torch.eye(m_hat.shape[0] - 1, dtype=torch.float64), rtol=0, atol=1e-9)
        torch.testing.assert_close(m_hat[0, 0], torch.tensor(1.0, dtype=torch.float64), rtol=1e-9, atol=0)


def test_edges_match_jacrev_reference(mlp_setup):
    model, _, graphs, acts = mlp_setup
    for kind in ("lib", "pca", "neuron"):
        graph = graphs[kind]
        for sec, section in enumerate(_sections(model)):
            ref = _edges_ref(section, acts[sec], graph.layers[sec], graph.layers[sec + 1])
            assert graph.edges[sec].shape == (graph.layers[sec + 1].d_lib, graph.layers[sec].d_lib)
            torch.testing.assert_close(graph.edges[sec], ref, rtol=1e-9, atol=1e-14)


def test_t4_uncentred_lambdas_are_eigenvalues_of_g_m_prime():
    model, x = MLP(), mlp_inputs()
    graphs = build_graphs(model, LAYERS, [x], kinds=("lib",), center=False)
    lib = graphs["lib"]
    with torch.no_grad():
        acts = [a[:, 0] for a in capture(model, [NodeLayer(n) for n in LAYERS], x)]
    for sec, section in enumerate(_sections(model)):
        aug = augment(acts[sec])
        gram = aug.T @ aug / len(aug)
        m_prime = _m_prime_ref(section, acts[sec], lib.layers[sec + 1])
        evals = torch.linalg.eigvals(gram @ m_prime).real.abs().sort(descending=True).values
        lam = lib.layers[sec].lambdas.sort(descending=True).values
        torch.testing.assert_close(lam, evals[: len(lam)], rtol=1e-8, atol=1e-12)
        assert (evals[len(lam) :] < 1e-10).all()


@pytest.mark.parametrize("rule, n", [("gradient", 0), ("trapezoidal", 3), ("gauss-legendre", 2)])
def test_t5_linear_section_edge_column_sums_are_lambdas(mlp_setup, rule, n):
    model, x, _, _ = mlp_setup
    lib = build_graphs(model, LAYERS, [x], kinds=("lib",), rule=rule, n_intervals=n)["lib"]
    torch.testing.assert_close(lib.edges[-1].sum(0)[1:], lib.layers[-2].lambdas[1:], rtol=1e-9, atol=1e-14)


def test_t6_invertible_linear_chain_uncentred_rotated():
    """Identity activations, no biases, exactly centred inputs: every E diagonal, Λ equal at every layer.

    With the constant's Jacobian taken as zero (spec §11) the constant direction gets Λ = 0 uncentred and
    is dropped; the invariant holds on the remaining directions.
    """
    model = MLP(widths=(4, 4, 4, 4), bias=False, act=nn.Identity, seed=3)
    x = mlp_inputs()
    x = x - x.mean(0)
    lib = build_graphs(model, LAYERS, [x], kinds=("lib",), center=False, rotate_final=True)["lib"]
    out_spectrum = lib.layers[-1].lambdas
    out_spectrum = out_spectrum[(out_spectrum - 1).abs() > 1e-9]  # drop the constant coordinate's 1
    for sec, edges in enumerate(lib.edges):
        lam = lib.layers[sec].lambdas
        torch.testing.assert_close(lam, out_spectrum, rtol=1e-9, atol=1e-12)
        nonconst_out = [i for i, v in enumerate(lib.layers[sec + 1].lambdas) if abs(v - 1) > 1e-9 or sec + 1 < 3]
        block = edges[nonconst_out]
        torch.testing.assert_close(block, torch.diag(lam), rtol=1e-9, atol=1e-12)


def test_t7_rules_agree_on_homogeneous_relu_mlp():
    model, x = MLP(bias=False, seed=2), mlp_inputs()
    ref = build_graphs(model, LAYERS, [x], kinds=("lib",))["lib"]
    for rule, n in [("gauss-legendre", 3), ("trapezoidal", 4)]:
        other = build_graphs(model, LAYERS, [x], kinds=("lib",), rule=rule, n_intervals=n)["lib"]
        for a, b in zip(ref.layers, other.layers):
            torch.testing.assert_close(a.lambdas, b.lambdas, rtol=1e-10, atol=1e-15)
            torch.testing.assert_close(a.basis.abs(), b.basis.abs(), rtol=1e-8, atol=1e-12)
        for a, b in zip(ref.edges, other.edges):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


def test_t8_attributions_sum_to_the_output():
    """Σ_j A_{t,i,j}(x) = ĥ_{t,i}(f̂(x)) exactly for a bias-free ReLU section (constant row excluded)."""
    model, x = MLP(bias=False, seed=4), mlp_inputs()
    lib = build_graphs(model, LAYERS, [x], kinds=("lib",))["lib"]
    rule = integration_rule("gradient")
    for sec in range(3):
        layer_in, layer_out = NodeLayer(LAYERS[sec]), NodeLayer(LAYERS[sec + 1])
        acts, g = integrated_jacobian(model, layer_in, layer_out, x, rule, lambda m, i: m(i), out_basis=lib.layers[sec + 1])
        a = edge_attributions(acts, g, lib.layers[sec])  # (N, 1, k_out, k_in)
        with torch.no_grad():
            (out,) = capture(model, [layer_out], x)
        basis_out = lib.layers[sec + 1].basis
        h_hat = out[:, 0] @ basis_out[:-1]  # the constant row of C_out carries no attribution
        torch.testing.assert_close(a.sum(-1)[:, 0], h_hat, rtol=1e-9, atol=1e-12)


def test_t8_quadrature_converges_for_non_homogeneous_section():
    model, x = MLP(act=nn.Tanh, seed=5), mlp_inputs(n=60)
    lib = build_graphs(model, LAYERS, [x], kinds=("lib",))["lib"]
    layer_in, layer_out = NodeLayer("h0"), NodeLayer("h1")
    with torch.no_grad():
        (out,) = capture(model, [layer_out], x)
        (inp,) = capture(model, [layer_in], x)
        zero_out = torch.tanh(model.l1(torch.zeros_like(inp[:, 0])))
    target = (out[:, 0] - zero_out) @ lib.layers[2].basis[:-1]  # ĥ(f̂) − ĥ(0): F(0) ≠ 0 without folding
    errors = []
    for n in (1, 4, 16):
        acts, jac = integrated_jacobian(model, layer_in, layer_out, x, integration_rule("gauss-legendre", n), lambda m, i: m(i))
        a = edge_attributions(acts, project(jac, lib.layers[2]), lib.layers[1])
        errors.append((a.sum(-1)[:, 0] - target).abs().max().item())
    assert errors[0] > 0.1 > errors[1] > 1e-4 > 1e-8 > errors[2]


def test_t9_dead_neuron_drops_lib_dimension_by_one():
    model, x = MLP(seed=6), mlp_inputs()
    before = build_graphs(model, LAYERS, [x], kinds=("lib", "pca"))
    with torch.no_grad():
        model.l1.weight[:, 2] = 0.0  # the next layer ignores neuron 2 of h0
    after = build_graphs(model, LAYERS, [x], kinds=("lib", "pca"))
    assert after["lib"].dims[1] == before["lib"].dims[1] - 1
    assert after["pca"].dims[1] == before["pca"].dims[1]
    layer = after["lib"].layers[1]
    with torch.no_grad():
        (h0,) = capture(model, [NodeLayer("h0")], x)
        h0 = h0[:, 0]
        projected = layer.reconstruct(layer.transform(h0))
        next_basis = after["lib"].layers[2].basis
        torch.testing.assert_close(
            augment(torch.relu(model.l1(projected))) @ next_basis,
            augment(torch.relu(model.l1(h0))) @ next_basis,
            rtol=1e-9,
            atol=1e-12,
        )
        assert not torch.allclose(projected, h0)


class _Transformed(nn.Module):
    """MLP with an invertible affine map T inserted at h0, undone before l1."""

    def __init__(self, base: MLP, t: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.base, self.t, self.shift = base, t, shift
        self.inp, self.h0, self.h1, self.out = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, x):
        b = self.base
        h0 = self.h0(torch.relu(b.l0(self.inp(x))) @ self.t + self.shift)
        h1 = self.h1(torch.relu(b.l1((h0 - self.shift) @ torch.linalg.inv(self.t))))
        return self.out(b.l2(h1))


def test_t10_affine_reparametrisation_leaves_lib_unchanged_but_not_pca():
    """Non-constant Λ, edges between non-constant features and |f̂| are unchanged.

    The constant direction's Λ and edges change with the shift: without bias folding (spec §11) the
    constant's Jacobian is zero, so its quantities depend on where the mean sits.
    """
    base, x = MLP(seed=7), mlp_inputs()
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(6, 6, generator=gen, dtype=torch.float64) + 2 * torch.eye(6, dtype=torch.float64)
    shift = torch.randn(6, generator=gen, dtype=torch.float64)
    a = build_graphs(base, LAYERS, [x], kinds=("lib", "pca"))
    b = build_graphs(_Transformed(base, t, shift), LAYERS, [x], kinds=("lib", "pca"))
    for la, lb in zip(a["lib"].layers[:-1], b["lib"].layers[:-1]):
        torch.testing.assert_close(la.lambdas[1:], lb.lambdas[1:], rtol=1e-9, atol=1e-13)
    assert not torch.allclose(a["lib"].layers[1].lambdas[:1], b["lib"].layers[1].lambdas[:1])
    for ea, eb in zip(a["lib"].edges[:-1], b["lib"].edges[:-1]):
        torch.testing.assert_close(ea[1:, 1:], eb[1:, 1:], rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(a["lib"].edges[-1][:, 1:], b["lib"].edges[-1][:, 1:], rtol=1e-8, atol=1e-13)
    with torch.no_grad():
        (h_a,) = capture(base, [NodeLayer("h0")], x)
        (h_b,) = capture(_Transformed(base, t, shift), [NodeLayer("h0")], x)
    f_a = a["lib"].layers[1].transform(h_a[:, 0])
    f_b = b["lib"].layers[1].transform(h_b[:, 0])
    torch.testing.assert_close(f_a[:, 1:].abs(), f_b[:, 1:].abs(), rtol=1e-7, atol=1e-10)
    assert not torch.allclose(a["pca"].layers[1].lambdas, b["pca"].layers[1].lambdas, rtol=1e-3)


def test_t11_centred_constant_direction(mlp_setup):
    _, _, graphs, acts = mlp_setup
    for layer, a in zip(graphs["lib"].layers[:-1], acts[:-1]):
        f_hat = layer.transform(a)
        torch.testing.assert_close(f_hat[:, 0].abs(), layer.lambdas[0].sqrt().expand(len(a)), rtol=1e-12, atol=0)
        mean = a.mean(0)
        row0 = layer.basis_pinv[0]
        torch.testing.assert_close(row0 / row0[-1], augment(mean), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.basis_pinv[1:, -1], torch.zeros(layer.d_lib - 1, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(f_hat[:, 1:].mean(0), torch.zeros(layer.d_lib - 1, dtype=torch.float64), rtol=0, atol=1e-12)


def test_t12_feature_sign_flips_leave_edges_unchanged(mlp_setup):
    model, x, graphs, _ = mlp_setup
    lib = graphs["lib"]
    rule = integration_rule("gradient")
    acts, jac = integrated_jacobian(model, NodeLayer("h0"), NodeLayer("h1"), x, rule, lambda m, i: m(i))
    flip = torch.ones(lib.layers[1].d_lib, dtype=torch.float64)
    flip[[1, 3]] = -1
    layer = lib.layers[1]
    flipped = type(layer)(**{**layer.__dict__, "basis": layer.basis * flip, "basis_pinv": layer.basis_pinv * flip[:, None]})
    g = project(jac, lib.layers[2])
    e = (edge_attributions(acts, g, layer) ** 2).sum((0, 1))
    e_flipped = (edge_attributions(acts, g, flipped) ** 2).sum((0, 1))
    torch.testing.assert_close(e, e_flipped, rtol=1e-12, atol=0)


def test_output_constant_receives_no_edges_t15_analogue(mlp_setup):
    """T15 in our departure (spec §11): the constant's Jacobian is zero, so no edge enters output node 0."""
    _, _, graphs, _ = mlp_setup
    for kind in ("lib", "pca"):
        for e in graphs[kind].edges[:-1]:
            assert e[0].abs().max() == 0


def _two_process_graphs(models, shards, layers=LAYERS, **kwargs):
    """Runs build_graphs on two shards in lockstep threads whose reduce is an all-reduce (sum)."""
    barrier = threading.Barrier(2)
    slots: list = [None, None]
    results: list = [None, None]

    def all_reduce(rank: int, t: torch.Tensor) -> torch.Tensor:
        slots[rank] = t
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()
        return total

    def run(rank: int) -> None:
        results[rank] = build_graphs(models[rank], layers, shards[rank], reduce=lambda t: all_reduce(rank, t), **kwargs)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def test_batching_and_sum_then_merge_give_the_same_graphs(mlp_setup):
    model, x, graphs, _ = mlp_setup
    kinds = ("lib", "pca")
    one = build_graphs(model, LAYERS, [x], kinds=kinds, chunk_size=7, cache_bytes=0)
    ranks = _two_process_graphs([MLP(), MLP()], [[x[:130]], [x[130:200], x[200:]]], kinds=kinds, chunk_size=32)
    for kind in kinds:
        for ref in (one, *ranks):
            for a, b in zip(graphs[kind].layers, ref[kind].layers):
                torch.testing.assert_close(a.lambdas, b.lambdas, rtol=1e-10, atol=1e-15)
            for a, b in zip(graphs[kind].edges, ref[kind].edges):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)
    assert ranks[0]["lib"].n_examples == len(x)


def test_tiny_transformer_four_to_one_positions_matches_jacrev():
    model = TinyTransformer()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7, (64, 4), generator=gen)
    layers = ["resid_pre", "resid_mid", "logits"]
    graphs = build_graphs(model, layers, [tokens[:40], tokens[40:]], kinds=("lib", "pca"), chunk_size=16)
    with torch.no_grad():
        pre, mid = capture(model, [NodeLayer("resid_pre"), NodeLayer("resid_mid")], tokens)

    def section(f):  # (4, d) -> (1, d)
        scores = model.q(f[-1:]) @ model.k(f).T / f.shape[-1] ** 0.5
        return f[-1:] + scores.softmax(-1) @ model.v(f)

    for kind in ("lib", "pca"):
        g = graphs[kind]
        c_in, c_out = g.layers[0], g.layers[1]

        def h_hat(f_hat):  # (4, k_in) -> (1, k_out)
            return augment(section((f_hat @ c_in.basis_pinv)[:, :-1])) @ c_out.basis

        f_hat = c_in.transform(pre)  # (N, 4, k_in)
        jac = vmap(jacrev(h_hat))(f_hat)  # (N, 1, k_out, 4, k_in)
        a = torch.einsum("ntksj,nsj->ntkj", jac, f_hat)
        ref = (a**2).sum((0, 1)) / (len(tokens) * 4)  # normalised by N × input positions
        torch.testing.assert_close(g.edges[0], ref, rtol=1e-9, atol=1e-14)
    # T2 with positions averaged
    lib0 = graphs["lib"].layers[0]
    f_hat = lib0.transform(pre).reshape(-1, lib0.d_lib)
    torch.testing.assert_close(f_hat.T @ f_hat / len(f_hat), torch.diag(lib0.lambdas), rtol=0, atol=1e-12)


def test_save_and_load_round_trip_with_weights_only(mlp_setup, tmp_path):
    _, _, graphs, _ = mlp_setup
    path = tmp_path / "sub" / "graphs.pt"
    save_graphs(graphs, path)
    assert [p.name for p in path.parent.iterdir()] == ["graphs.pt"]  # no temporary file left behind
    torch.load(path, weights_only=True)
    loaded = load_graphs(path)
    for kind in graphs:
        assert loaded[kind].layer_names == graphs[kind].layer_names
        for a, b in zip(graphs[kind].edges, loaded[kind].edges):
            assert torch.equal(a, b)
        for a, b in zip(graphs[kind].layers, loaded[kind].layers):
            assert torch.equal(a.basis_pinv, b.basis_pinv) and a.kind == b.kind


def test_model_is_restored_exactly(mlp_setup):
    model = MLP(seed=9).float().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_graphs(model, LAYERS, [mlp_inputs().float()], kinds=("lib",))
    assert model.training and all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_relative_threshold_and_max_features(mlp_setup):
    model, x, graphs, _ = mlp_setup
    lam = graphs["lib"].layers[1].lambdas[1:]
    rel = 0.05
    cut = build_graphs(model, LAYERS, [x], kinds=("lib",), rel_threshold=rel)["lib"]
    # the kept non-constant count at a relative threshold on Λ is at most the count above rel * max
    assert cut.dims[1] - 1 <= int((lam > rel * lam.max()).sum())
    capped = build_graphs(model, LAYERS, [x], kinds=("lib",), max_features=3)["lib"]
    assert capped.dims[:-1] == [3, 3, 3]


def test_edges_at_reconstruction_match_jacrev_when_truncation_drops_variance():
    model, x = MLP(seed=8), mlp_inputs()
    kwargs = dict(kinds=("lib", "pca"), rel_threshold=0.05)
    recon = build_graphs(model, LAYERS, [x[:150], x[150:]], edge_point="reconstruction", chunk_size=64, cache_bytes=10**5, **kwargs)
    at_act = build_graphs(model, LAYERS, [x], **kwargs)
    with torch.no_grad():
        acts = [a[:, 0] for a in capture(model, [NodeLayer(n) for n in LAYERS], x)]
    differs = False
    for kind in ("lib", "pca"):
        g = recon[kind]
        assert g.dims[1] < 7  # the relative threshold dropped directions that carry variance
        for sec, section in enumerate(_sections(model)):
            ref = _edges_ref(section, acts[sec], g.layers[sec], g.layers[sec + 1])
            torch.testing.assert_close(g.edges[sec], ref, rtol=1e-9, atol=1e-14)
            differs |= not torch.allclose(at_act[kind].edges[sec], ref, rtol=1e-6)
    assert differs


def test_reconstruction_edges_recompute_only_examples_whose_jacobian_changes(monkeypatch):
    """A cached chunk keeps ĝ for examples whose ReLU pattern is the same at f C C⁺ (and for every example
    of the affine last section); only the others are recomputed, and the edges still match jacrev there."""
    import lib_lightning.core.lib.section as lib_module

    model, x = MLP(seed=8), mlp_inputs()
    calls, real = [], lib_module.integrated_jacobian

    def spy(model_, layer_in, layer_out, inputs, *args, **kwargs):
        calls.append((layer_in.name, inputs.shape[0]))
        return real(model_, layer_in, layer_out, inputs, *args, **kwargs)

    monkeypatch.setattr(lib_module, "integrated_jacobian", spy)
    # the per-example path (the affine h1 -> out chunk would otherwise take its Jacobian at one example)
    lib = build_graphs(model, LAYERS, [x], kinds=("lib",), rel_threshold=0.05, edge_point="reconstruction",
                       chunk_size=len(x), affine_probe=False)["lib"]
    assert [name for name, n in calls if n == len(x)] == ["h1", "h0", "inp"]  # one basis pass per section
    redone = {name: n for name, n in calls if n < len(x)}
    assert set(redone) == {"h0", "inp"}  # the affine h1 -> out section reuses every example
    assert all(0 < n < len(x) for n in redone.values())
    with torch.no_grad():
        acts = [a[:, 0] for a in capture(model, [NodeLayer(n) for n in LAYERS], x)]
    for sec, section in enumerate(_sections(model)):
        ref = _edges_ref(section, acts[sec], lib.layers[sec], lib.layers[sec + 1])
        torch.testing.assert_close(lib.edges[sec], ref, rtol=1e-9, atol=1e-14)


def test_jacobian_rows_in_an_output_basis_and_probes_match_the_neuron_rows():
    model, x = TinyTransformer(seed=3), torch.randint(0, 7, (40, 4))
    lib = build_graphs(model, ["resid_pre", "resid_mid", "logits"], [x], kinds=("lib",))["lib"]
    layer_in, layer_out = NodeLayer("resid_pre"), NodeLayer("resid_mid")
    rule, fwd = integration_rule("gauss-legendre", 2), (lambda m, i: m(i))
    _, jac = integrated_jacobian(model, layer_in, layer_out, x, rule, fwd)  # (N, 4, 1, d_out, d_in)
    _, g = integrated_jacobian(model, layer_in, layer_out, x, rule, fwd, out_basis=lib.layers[1])
    assert g.shape == (40, 4, 1, lib.dims[1], jac.shape[-1])
    torch.testing.assert_close(g, project(jac, lib.layers[1]), rtol=1e-10, atol=1e-12)
    w = torch.randn(2, 1, jac.shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probes = integrated_vjp(model, layer_in, layer_out, x, rule, fwd, w)  # (N, 4, 2, d_in)
    torch.testing.assert_close(probes, torch.einsum("rd,nsde->nsre", w[:, 0], jac[:, :, 0]), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="do not match the section's output"):
        integrated_vjp(model, layer_in, layer_out, x, rule, fwd, w[:, :, :3])


class Mixer(nn.Module):
    """``inp (batch, 4, 3)`` -> per-position linear, mixed across positions, tanh -> ``hid (batch, 4, 5)``
    -> linear readout of every position -> ``out (batch, 2)``: a section with 4 output positions."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.inp, self.hid, self.out = nn.Identity(), nn.Identity(), nn.Identity()
        self.lin, self.head = nn.Linear(3, 5), nn.Linear(20, 2)
        self.mix = nn.Parameter(torch.empty(4, 4))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.8)
        self.double()

    def forward(self, x):
        h = self.hid(torch.tanh(torch.einsum("st,btd->bsd", self.mix, self.lin(self.inp(x)))))
        return self.out(self.head(h.flatten(1)))


def mixer_inputs(n=48):
    return torch.randn(n, 4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.3


def test_t13_position_sources_average_to_the_exact_sums_over_every_sign_pattern():
    """E_φ[(Σ_t φ_t a_t)²] = Σ_t a_t²: averaging M′ and the squared edges over all 2⁴ sign patterns is exact."""
    model, x = Mixer(), mixer_inputs()
    lib = build_graphs(model, ["inp", "hid", "out"], [x], kinds=("lib",))["lib"]
    layer_in, layer_out, rule = NodeLayer("inp"), NodeLayer("hid"), integration_rule("gauss-legendre", 1)
    args = (model, layer_in, layer_out, x, rule, lambda m, i: m(i))
    acts, exact = integrated_jacobian(*args, out_basis=lib.layers[1])  # (N, 4, 4, k, 3)
    m_sum, e_sum = torch.zeros(4, 4, dtype=torch.float64), 0.0
    patterns = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * 4)  # (16, 4)
    for phi in patterns:
        _, g = integrated_jacobian(*args, out_basis=lib.layers[1], signs=phi.expand(len(x), 1, 4))
        assert g.shape == (len(x), 4, 1, lib.dims[1], 3)
        m_sum += m_prime_update(g) / len(patterns)
        e_sum += edges_update(acts, g, lib.layers[0]) / len(patterns)
    torch.testing.assert_close(m_sum, m_prime_update(exact), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e_sum, edges_update(acts, exact, lib.layers[0]), rtol=1e-12, atol=1e-14)
    one = patterns[5].expand(len(x), 1, 4)  # a single pattern is not the exact value
    assert not torch.allclose(m_prime_update(integrated_jacobian(*args, out_basis=lib.layers[1], signs=one)[1]), m_prime_update(exact))
    with pytest.raises(ValueError, match="do not match"):
        integrated_jacobian(*args, signs=torch.ones(len(x), 1, 3, dtype=torch.float64))


def test_t13_single_source_is_exact_for_single_position_outputs(mlp_setup):
    model, x, graphs, _ = mlp_setup
    stochastic = build_graphs(model, LAYERS, [x], kinds=("lib", "pca"), position_sources=1, seed=3)
    for kind in ("lib", "pca"):
        for a, b in zip(graphs[kind].layers, stochastic[kind].layers):
            torch.testing.assert_close(a.lambdas, b.lambdas, rtol=1e-10, atol=1e-15)
        for a, b in zip(graphs[kind].edges, stochastic[kind].edges):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


def test_position_sources_are_seeded_per_chunk_and_recomputed_chunks_agree():
    model, x = Mixer(), mixer_inputs()
    run = lambda **kw: build_graphs(model, ["inp", "hid", "out"], [x], kinds=("lib",), position_sources=2, chunk_size=16, **kw)["lib"]  # noqa: E731
    cached, recomputed, other = run(seed=1), run(seed=1, cache_bytes=0), run(seed=2)
    exact = build_graphs(model, ["inp", "hid", "out"], [x], kinds=("lib",))["lib"]
    for a, b in zip(cached.edges, recomputed.edges):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(cached.layers[0].lambdas, other.layers[0].lambdas)
    # the estimate sits near the exact Λ of the input layer (4 positions, 2 sources, 48 examples)
    lam, lam_exact = cached.layers[0].lambdas[1:], exact.layers[0].lambdas[1:]
    assert ((lam - lam_exact).abs() / lam_exact).max() < 0.5
    with pytest.raises(ValueError, match="position_sources must be None or >= 1, got 0"):
        build_graphs(model, ["inp", "hid", "out"], [x], position_sources=0)


def test_float32_reconstruction_edges_reuse_jacobians_when_only_rounding_is_dropped(monkeypatch):
    """reuse_rtol scales with the dtype (issue 11, item 5): in float32 the null direction of rank-3
    inputs holds only rounding, so f C C⁺ differs from f by ~1e-8 relative, not a different point; with
    a fixed 1e-10 the tanh section's VJPs there (different by float32 rounding) forced recomputation."""
    import lib_lightning.core.lib.section as lib_module

    model, x = MLP(seed=8, act=nn.Tanh), mlp_inputs()
    x[:, 3] = x[:, 0] - 0.5 * x[:, 1]  # (300, 4) of rank 3
    calls, real = [], lib_module.integrated_jacobian

    def spy(model_, layer_in, layer_out, inputs, *args, **kwargs):
        calls.append((layer_in.name, inputs.shape[0]))
        return real(model_, layer_in, layer_out, inputs, *args, **kwargs)

    monkeypatch.setattr(lib_module, "integrated_jacobian", spy)
    kwargs = dict(kinds=("lib",), abs_threshold=1e-8, edge_point="reconstruction", chunk_size=len(x), affine_probe=False)
    lib = build_graphs(model, LAYERS, [x], dtype=torch.float32, **kwargs)["lib"]
    assert lib.dims[0] == 4  # the constant and three directions: the rounding-only one is dropped
    assert calls == [("h1", len(x)), ("h0", len(x)), ("inp", len(x))]  # no recomputation (14 examples before)
    ref = build_graphs(model, LAYERS, [x], **kwargs)["lib"]
    for a, b in zip(ref.edges, lib.edges):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5 * float(a.max()))
    assert default_reuse_rtol(torch.float64) == 1e-10
    assert default_reuse_rtol(torch.float32) == pytest.approx(1.19e-4, rel=1e-2)


def test_a_layer_that_keeps_no_feature_gives_empty_edges_not_an_error():
    """Uncentred, a layer whose downstream ignores it has no LIB feature at all (no constant is kept):
    its edges are (k_out, 0) and (0, k_in) matrices (found by the property tests: a reshape of 0 elements)."""
    model, x = MLP(), mlp_inputs(n=40)
    with torch.no_grad():
        model.l2.weight.zero_()  # the output ignores h1, hence everything before it
    lib = build_graphs(model, LAYERS, [x], kinds=("lib",), center=False)["lib"]
    assert lib.dims == [0, 0, 0, 3]
    assert [tuple(e.shape) for e in lib.edges] == [(0, 0), (0, 0), (3, 0)]
    from lib_lightning.core.metrics.summary import summarise

    metrics = summarise({"lib": lib}).metrics
    assert metrics["lib/h1/dim_abs"] == 0 and metrics["edges/h1->out/lib_n99"] == 0


@pytest.mark.parametrize("kinds, rule, n_intervals, sources", [
    (("lib", "pca"), "gradient", 0, None), (("lib",), "gauss-legendre", 3, None), (("lib", "pca"), "gradient", 0, 2),
])
@pytest.mark.parametrize("vjp_rows", [2, 3, 64])
def test_rows_batched_through_vmap_give_the_loop_s_graphs(kinds, rule, n_intervals, sources, vjp_rows):
    """``vjp_rows`` > 1 takes several Jacobian rows per autograd call (is_grads_batched): the same bases
    and edges as one VJP per row, in rows given in neurons (lib+pca) or in features (lib alone), per
    stochastic source, with a rule of several points, a row count that does not divide the rows (3) and
    one above them (64)."""
    model = TinyTransformer()
    tokens = torch.randint(0, 7, (64, 4), generator=torch.Generator().manual_seed(0))
    layers = ["resid_pre", "resid_mid", "logits"]
    options = dict(kinds=kinds, rule=rule, n_intervals=n_intervals, chunk_size=16, edge_point="reconstruction",
                   position_sources=sources)
    loop = build_graphs(model, layers, [tokens[:40], tokens[40:]], **options)
    batched = build_graphs(model, layers, [tokens[:40], tokens[40:]], vjp_rows=vjp_rows, **options)
    for kind in kinds:
        assert loop[kind].dims == batched[kind].dims
        for a, b in zip(loop[kind].layers, batched[kind].layers):
            torch.testing.assert_close(b.lambdas, a.lambdas, rtol=1e-10, atol=1e-14)
        for a, b in zip(loop[kind].edges, batched[kind].edges):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)


def test_vjp_rows_below_one_is_refused():
    model = TinyTransformer()
    tokens = torch.randint(0, 7, (8, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="vjp_rows"):
        build_graphs(model, ["resid_pre", "resid_mid", "logits"], [tokens], vjp_rows=0)


def test_vjp_rows_default_batches_on_cuda_only():
    from lib_lightning.core.lib import default_vjp_rows

    assert default_vjp_rows(torch.device("cpu")) == 1
    assert default_vjp_rows("cuda") == default_vjp_rows(torch.device("cuda", 0)) == 8


def test_out_of_memory_with_batched_rows_names_vjp_rows_and_chunk_size(monkeypatch):
    """A GPU that runs out of memory under batched rows is told which settings take less."""
    model = TinyTransformer()
    tokens = torch.randint(0, 7, (16, 4), generator=torch.Generator().manual_seed(0))
    grad = torch.autograd.grad

    def short_of_memory(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", short_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match=r"\(vjp_rows=4\).*set vjp_rows lower.*chunk_size lower"):
        build_graphs(model, ["resid_pre", "resid_mid", "logits"], [tokens], vjp_rows=4, check_cuts=False)
    build_graphs(model, ["resid_pre", "resid_mid", "logits"], [tokens], vjp_rows=1, check_cuts=False)  # one row at a time
