"""Bad input -> a clear error naming the value, and nothing half-done."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.capture import CutError, NodeLayer, check_cut
from lib_lightning.core.lib.integration import integration_rule
from tests.core.models import MLP, Residual, TinyTransformer, mlp_inputs

LAYERS = ["inp", "h0", "h1", "out"]


@pytest.fixture
def mlp():
    return MLP(), mlp_inputs(n=40)


def test_unknown_module_lists_available_names(mlp):
    model, x = mlp
    with pytest.raises(KeyError, match=r"unknown module name\(s\) \['h9'\]; available modules: 'inp', 'l0'"):
        build_graphs(model, ["inp", "h9", "out"], [x])


def test_residual_bypass_is_not_a_cut():
    model = Residual()
    x = torch.randn(8, 5, dtype=torch.float64)
    with pytest.raises(CutError, match=r"'inp' -> 'hidden' are not a cut|'hidden' -> 'out' are not a cut.*example 0"):
        build_graphs(model, ["inp", "hidden", "out"], [x])
    check_cut(model, NodeLayer("inp"), NodeLayer("out"), x)  # the block as a whole is a cut


def test_dropping_positions_the_next_layer_uses_is_not_a_cut():
    model = TinyTransformer()
    tokens = torch.randint(0, 7, (8, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CutError, match=r"'resid_pre@-1' -> 'resid_mid' are not a cut"):
        build_graphs(model, ["resid_pre@-1", "resid_mid", "logits"], [tokens])


def test_layers_out_of_order(mlp):
    model, x = mlp
    with pytest.raises(ValueError, match=r"out of order: given \['inp', 'h1', 'h0', 'out'\]"):
        build_graphs(model, ["inp", "h1", "h0", "out"], [x])


def test_positions_out_of_range():
    model = TinyTransformer()
    tokens = torch.randint(0, 7, (8, 4))
    with pytest.raises(IndexError, match=r"positions \[7\] out of range for 4 positions"):
        build_graphs(model, ["resid_pre@7", "resid_mid", "logits"], [tokens])


def test_nan_activations_name_layer_and_batch(mlp):
    model, x = mlp
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"node layer 'inp' contain NaN or Inf \(batch 1\)"):
        build_graphs(model, LAYERS, [x, bad], check_cuts=False)


def test_nan_jacobian_names_the_section():
    class Sqrt(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Identity(), nn.Identity()

        def forward(self, x):
            return self.out(torch.sqrt(self.inp(x)) * 2 + x.sum())

    x = torch.zeros(4, 3, dtype=torch.float64)  # sqrt'(0) = inf
    x[:, 0] = torch.arange(4.0)
    with pytest.raises(ValueError, match=r"Jacobian of section 'inp' -> 'out' contains NaN or Inf \(chunk 0 of 256 examples\)"):
        build_graphs(Sqrt(), ["inp", "out"], [x], check_cuts=False)


def test_empty_dataset(mlp):
    model, _ = mlp
    with pytest.raises(ValueError, match="the analysis dataset is empty"):
        build_graphs(model, LAYERS, [])


def test_one_shot_iterator_is_rejected(mlp):
    model, x = mlp
    with pytest.raises(TypeError, match="batches must be re-iterable"):
        build_graphs(model, LAYERS, iter([x]))


def test_integer_activations():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.emb, self.out = nn.Identity(), nn.Embedding(5, 3), nn.Identity()

        def forward(self, t):
            return self.out(self.emb(self.inp(t)))

    with pytest.raises(TypeError, match=r"node layer 'inp' has non-floating activations of dtype torch.int64"):
        build_graphs(Tokens(), ["inp", "out"], [torch.randint(0, 5, (6, 2))])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"abs_threshold": -1.0}, r"abs_threshold must be >= 0, got -1.0"),
        ({"rel_threshold": 1.0}, r"rel_threshold must be in \[0, 1\), got 1.0"),
        ({"kinds": ("lib", "ica")}, r"unknown basis kind\(s\) \['ica'\]; valid choices: \('lib', 'pca', 'neuron'\)"),
        ({"chunk_size": 0}, "chunk_size must be >= 1, got 0"),
        ({"rule": "simpson"}, r"unknown integration rule 'simpson'; valid choices"),
        ({"rule": "gradient", "n_intervals": 2}, "the 'gradient' rule needs n_intervals=0, got 2"),
        ({"max_features": 50}, r"max_features=50 is outside \[1, \d+\], the rank of the basis"),
    ],
)
def test_bad_arguments(mlp, kwargs, match):
    model, x = mlp
    with pytest.raises((ValueError, TypeError), match=match):
        build_graphs(model, LAYERS, [x], **kwargs)


def test_a_single_layer_is_not_a_graph(mlp):
    model, x = mlp
    with pytest.raises(ValueError, match="need at least 2 node layers, got 1"):
        build_graphs(model, ["inp"], [x])


def test_integration_rules_sum_to_one_and_match_closed_forms():
    trap = integration_rule("trapezoidal", 2)
    eps = 1e-3 / 3
    torch.testing.assert_close(trap.alphas, torch.tensor([eps, 0.5, 1 - eps], dtype=torch.float64))
    torch.testing.assert_close(trap.weights, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    gl = integration_rule("gauss-legendre", 1)
    torch.testing.assert_close(gl.alphas, torch.tensor([0.5 - 0.5 / 3**0.5, 0.5 + 0.5 / 3**0.5], dtype=torch.float64))
    torch.testing.assert_close(gl.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert integration_rule("trapezoidal", 0).alphas.item() == 0.5
    with pytest.raises(ValueError, match="n_intervals must be >= 0, got -1"):
        integration_rule("trapezoidal", -1)
