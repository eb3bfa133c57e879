import numpy as np
import pytest
import torch

from lib_lightning.core.metrics.sparsity import edge_sparsity, fraction_key, n_to_hold


def _with_constant(inner: torch.Tensor, fill: float = 50.0) -> torch.Tensor:
    """Wrap ``inner`` with a heavy constant row 0 and column 0, which must be ignored."""
    k_out, k_in = inner.shape
    edges = torch.full((k_out + 1, k_in + 1), fill, dtype=torch.float64)
    edges[1:, 1:] = inner
    return edges


def test_uniform_edges_closed_form():
    result = edge_sparsity(_with_constant(torch.ones(4, 5, dtype=torch.float64)))
    assert result.shape == (4, 5) and result.n_edges == 20
    assert result.total == pytest.approx(20.0, abs=1e-12)
    assert result.gini == pytest.approx(0.0, abs=1e-12)
    # 90 % of 20 equal edges: 18 of them; 99 %: 19.8 -> 20
    assert result.n_required == (18, 20)
    assert result.frac_required == pytest.approx((0.9, 1.0), abs=1e-12)
    assert result.to_dict() == {"n_edges": 20, "total": 20.0, "gini": result.gini,
                                "n_90": 18, "frac_90": 0.9, "n_99": 20, "frac_99": 1.0}


def test_single_edge_gini_and_counts():
    inner = torch.zeros(3, 4, dtype=torch.float64)
    inner[2, 1] = 7.0
    result = edge_sparsity(_with_constant(inner))
    n = 12
    assert result.gini == pytest.approx((n - 1) / n, abs=1e-12)
    assert result.n_required == (1, 1) and result.total == pytest.approx(7.0)


def test_known_counts_and_gini_against_numpy_reference():
    weights = torch.tensor([[50.0, 30.0, 10.0], [5.0, 3.0, 2.0]], dtype=torch.float64)  # total 100
    result = edge_sparsity(weights, exclude_constant=False, fractions=(0.5, 0.9, 0.95, 0.99, 1.0))
    # cumulative: 50, 80, 90, 95, 98, 100
    assert result.n_required == (1, 3, 4, 6, 6)
    assert result.to_dict()["n_95"] == 4 and result.to_dict()["frac_50"] == pytest.approx(1 / 6)
    # Gini as the mean absolute difference over twice the mean (an independent formula)
    x = weights.numpy().ravel()
    reference = np.abs(x[:, None] - x[None, :]).mean() / (2 * x.mean())
    assert result.gini == pytest.approx(reference, abs=1e-12)


def test_drops_row_zero_and_column_zero_of_an_asymmetric_fixture():
    edges = torch.tensor(
        [[9.0, 8.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0], [7.0, 0.0, 0.0, 6.0]], dtype=torch.float64
    )  # (3, 4); inner block [[1, 1, 1], [0, 0, 6]]. Dropping only row 0 gives 16, only column 0 17.
    direct = edge_sparsity(edges)
    assert direct.shape == (2, 3) and direct.n_edges == 6
    assert direct.total == pytest.approx(9.0, abs=1e-12)
    assert direct.n_required == (4, 4)  # 6, then 1 + 1 + 1: 90 % of 9 needs 8.1
    assert edge_sparsity(edges.T.contiguous()).shape == (3, 2)  # rows stay outputs
    full = edge_sparsity(edges, exclude_constant=False)
    assert full.shape == (3, 4) and full.total == pytest.approx(33.0, abs=1e-12)


def test_empty_and_zero_sections():
    assert edge_sparsity(torch.ones(1, 5)).n_edges == 0
    zero = edge_sparsity(torch.zeros(3, 3))
    assert zero.n_required == (0, 0) and zero.gini == 0.0 and zero.frac_required == (0.0, 0.0)
    assert n_to_hold(torch.zeros(0), 0.9) == 0


def test_n_to_hold_ignores_order_and_handles_ties():
    values = torch.tensor([0.1] * 10, dtype=torch.float64)
    assert n_to_hold(values, 0.9) == 9
    # exact ties in real arithmetic that float round-off pushes either way (e.g. 0.3 * 4 < 0.8 * 1.5)
    assert n_to_hold(torch.full((5,), 0.3, dtype=torch.float64), 0.8) == 4
    assert n_to_hold(torch.full((10,), 0.7, dtype=torch.float64), 0.5) == 5
    assert n_to_hold(torch.tensor([1.0, 4.0, 2.0, 3.0]), 0.7) == 2
    assert fraction_key(0.9) == "90" and fraction_key(0.999) == "99.9"


@pytest.mark.parametrize(
    "edges, kwargs, match",
    [
        (torch.tensor([[1.0, -0.5], [0.0, 2.0]]), {}, r"non-negative.*-0\.5.*\(0, 1\)"),
        (torch.ones(3), {}, r"2-D, got shape \(3,\)"),
        (torch.ones(2, 2, 2), {}, r"2-D"),
        (torch.tensor([[1.0, float("nan")]]), {}, r"non-finite"),
        (torch.ones(3, 3), {"fractions": (0.9, 1.5)}, r"fraction must be in \(0, 1\], got 1.5"),
        (torch.ones(3, 3), {"fractions": (0.0,)}, r"fraction must be in \(0, 1\]"),
    ],
)
def test_bad_input(edges, kwargs, match):
    with pytest.raises(ValueError, match=match):
        edge_sparsity(edges, **kwargs)


def test_exclude_constant_per_side_drops_only_the_constant_row_or_column():
    edges = torch.arange(12, dtype=torch.float64).reshape(3, 4)  # (k_out, k_in)
    assert edge_sparsity(edges, exclude_constant=(True, False)).shape == (2, 4)
    assert edge_sparsity(edges, exclude_constant=(False, True)).shape == (3, 3)
    assert edge_sparsity(edges, exclude_constant=(False, False)) == edge_sparsity(edges, exclude_constant=False)
