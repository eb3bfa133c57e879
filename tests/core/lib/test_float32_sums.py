"""The chunk sums of float32 Jacobians (issue 16): edges in float32 without a float64 copy of ĝ, M′ as
a float64 product of float32 rows (a block at a time), and the float64 path unchanged."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.jacobian import M_PRIME_ROWS, edge_attributions, edges_update, m_prime_update, project
from tests.core.models import MLP, mlp_inputs

MLP_LAYERS = ["inp", "h0", "h1", "out"]


class _LargestFloat64(TorchDispatchMode):
    """Records the largest number of elements of any float64 tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.numel = max(self.numel, t.numel())
        return out


def _layers():
    """LIB bases of the MLP's layers h0 (d = 6) and h1 (d = 7), float64."""
    layers = build_graphs(MLP(), MLP_LAYERS, [mlp_inputs(n=50)], kinds=("lib",))["lib"].layers
    return layers[1], layers[2]


def _layer():
    return _layers()[0]


def _chunk(batch: int, pos_in: int, pos_out: int, k_out: int, d_in: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(batch, pos_in, pos_out, k_out, d_in, generator=gen, dtype=torch.float64)
    acts = torch.randn(batch, pos_in, d_in, generator=gen, dtype=torch.float64) + 0.5
    return acts, g


def test_float64_sums_are_the_plain_float64_products():
    """The float64 path is main's, bit for bit: M′ = rowsᵀ rows in one product, edges = Σ A²."""
    layer = _layer()
    acts, g = _chunk(9, 3, 2, 4, layer.d)
    rows = g.reshape(-1, layer.d)
    m = m_prime_update(g)
    assert torch.equal(m[: layer.d, : layer.d], rows.T @ rows) and not m[-1].any() and not m[:, -1].any()
    assert torch.equal(edges_update(acts, g, layer), edge_attributions(acts, g, layer).square_().sum(dim=(0, 1)))


def test_float32_sums_are_within_float32_rounding_of_the_float64_sums_of_the_same_rows():
    layer = _layer()
    acts, g = _chunk(40, 3, 2, 5, layer.d)
    g32 = g.float()
    for rows, repeat in ((g32, 1), (g32[:1], 40)):  # per example, and one ĝ shared by the chunk
        exact = rows.double()
        m = m_prime_update(rows, repeat)
        assert m.dtype == torch.float64
        torch.testing.assert_close(m, m_prime_update(exact, repeat), rtol=1e-12, atol=1e-12 * m.abs().max().item())
        e, e_exact = edges_update(acts, rows, layer), edges_update(acts, exact, layer)
        assert e.dtype == torch.float64 and e.shape == (5, layer.d_lib)
        assert (e - e_exact).abs().max() <= 1e-5 * e_exact.abs().max()


def test_m_prime_of_float32_rows_converts_a_block_at_a_time():
    """Issue 16: the float64 copies of float32 ĝ were a fifth of the callback's build. M′ converts at
    most a block of M_PRIME_ROWS rows at a time."""
    layer = _layer()
    g32 = _chunk(256, 3, 2, 12, layer.d)[1].float()  # 18,432 rows, more than M_PRIME_ROWS
    with _LargestFloat64() as seen:
        m_prime_update(g32)
    assert seen.numel <= M_PRIME_ROWS * layer.d < g32.numel()


def test_edges_of_float32_rows_make_no_float64_copy_of_them():
    layer = _layer()
    acts, g = _chunk(256, 3, 2, 12, layer.d)
    g32 = g.float()
    with _LargestFloat64() as seen:
        edges_update(acts, g32, layer)
    assert seen.numel < g32[:, 0].numel()  # f̂ (batch, pos_in, k_in) and the sum (k_out, k_in) only


def test_edges_of_rows_in_neurons_are_those_of_their_projection():
    """Rows in neurons with ``basis_out``: float64 projects first (main's order, bit for bit); float32
    projects the attributions instead (linear in the rows), within float32 rounding."""
    layer_in, layer_out = _layers()
    acts, jac = _chunk(30, 3, 2, layer_out.d, layer_in.d)
    projected = edges_update(acts, project(jac, layer_out), layer_in)
    assert torch.equal(edges_update(acts, jac, layer_in, layer_out), projected)
    for rows in (jac.float(), jac[:1].float()):  # per example, and one shared by the chunk
        exact = edges_update(acts, project(rows.double(), layer_out), layer_in)
        low = edges_update(acts, rows, layer_in, layer_out)
        assert low.shape == exact.shape == (layer_out.d_lib, layer_in.d_lib)
        assert (low - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_float32_edges_that_overflow_float32_are_taken_in_float64():
    layer_in, layer_out = _layers()
    acts, jac = _chunk(30, 3, 2, layer_out.d, layer_in.d)
    jac32 = jac.float() * 1e18  # attributions ~1e19 and more: their squares overflow float32
    e = edges_update(acts, jac32, layer_in, layer_out)
    assert torch.isfinite(e).all() and e.abs().max() > torch.finfo(torch.float32).max
    # main's float32 path: ĝ projected in float32, its attributions in float64
    assert torch.equal(e, edge_attributions(acts, project(jac32, layer_out), layer_in).square_().sum(dim=(0, 1)))
    exact = edges_update(acts, project(jac32.double(), layer_out), layer_in)
    assert (e - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_m_prime_of_float32_rows_keeps_their_null_space():
    """Fewer rows than inputs (an unembedding with fewer logits than d_model): M′ must stay singular to
    float64 rounding, or the truncation keeps directions the rows never reach (a float32 product left
    eigenvalues ~1e-8 of the largest there; on the trained mod-add checkpoint 15 more LIB dimensions)."""
    gen = torch.Generator().manual_seed(3)
    g32 = torch.randn(1, 1, 1, 3, 7, generator=gen, dtype=torch.float32)  # 3 rows in 7 dimensions
    eig = torch.linalg.eigvalsh(m_prime_update(g32, repeat=5000)[:7, :7])
    assert eig[-3:].min() > 1e-3 * eig.max()
    assert eig[:4].abs().max() <= 1e-14 * eig.max()


def test_float32_build_keeps_the_dims_and_is_within_float32_tolerance_of_float64():
    model, x = MLP(act=torch.nn.Tanh), mlp_inputs(n=300)
    kwargs = dict(kinds=("lib", "pca"), chunk_size=128)
    ref = build_graphs(model, MLP_LAYERS, [x], **kwargs)
    low = build_graphs(model, MLP_LAYERS, [x], dtype=torch.float32, **kwargs)
    for kind in ("lib", "pca"):
        assert low[kind].dims == ref[kind].dims
        for a, b in zip(ref[kind].layers, low[kind].layers):
            keep = a.lambdas > 1e-4 * a.lambdas.max()
            assert ((b.lambdas[keep] - a.lambdas[keep]).abs() / a.lambdas[keep]).max() <= 1e-4
        for ea, eb in zip(ref[kind].edges, low[kind].edges):
            assert (eb - ea).abs().max() <= 1e-5 * ea.abs().max()
