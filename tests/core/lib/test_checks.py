"""The section checks: independence of examples, cuts given each example's context, the memory guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_lightning.core import CutError, IndependenceError, MemoryBudgetError
from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.checks import check_cut, check_independence, context_keys
from lib_lightning.core.lib.memory import estimate_memory
from lib_lightning.core.lib.nodes import NodeLayer
from tests.core.models import MLP, hf_forward, mlp_inputs, padded_tokens, tiny_gpt2


class Wrapped(nn.Module):
    """A module between two named identities, so that its input and output are node layers."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inp, self.inner, self.out = nn.Identity(), inner, nn.Identity()

    def forward(self, x):
        return self.out(self.inner(self.inp(x)))


def test_transformer_encoder_layer_not_batch_first_is_refused():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=False)
    model, x = Wrapped(layer).double(), torch.randn(6, 5, 8, dtype=torch.float64)  # batch first, read as (seq, batch, d)
    with pytest.raises(IndependenceError, match=r"'inp' -> 'out': the batch dimension is mixed: .* examples \[1, 2, 3, 4, 5\].*batch_first=False"):
        build_graphs(model, ["inp", "out"], [x])
    torch.manual_seed(0)
    fixed = Wrapped(nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)).double()
    graphs = build_graphs(fixed, ["inp", "out"], [x], kinds=("lib",), position_sources=1)
    assert all(torch.isfinite(e).all() for e in graphs["lib"].edges)


def test_batchnorm_mixes_examples_in_training_mode_but_analysis_runs_in_eval_mode():
    torch.manual_seed(0)
    model = Wrapped(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))).double()
    x = mlp_inputs(n=32)
    with pytest.raises(IndependenceError, match=r"the batch dimension is mixed"):
        check_independence(model.train(), NodeLayer("inp"), NodeLayer("out"), x)
    graphs = build_graphs(model.train(), ["inp", "out"], [x], kinds=("lib", "pca"))
    assert model.training  # restored
    assert all(torch.isfinite(e).all() for g in graphs.values() for e in g.edges)


def test_residual_bypass_is_still_caught_with_independent_examples():
    from tests.core.models import Residual

    with pytest.raises(CutError, match=r"'hidden' -> 'out' are not a cut.*no context inputs held fixed"):
        check_cut(Residual(), NodeLayer("hidden"), NodeLayer("out"), torch.randn(8, 5, dtype=torch.float64))


def test_context_keys_by_name_and_by_argument():
    inputs = {"input_ids": 0, "attention_mask": 1, "token_type_ids": 2, "pixel_values": 3}
    assert context_keys(inputs) == ("attention_mask", "token_type_ids")
    assert context_keys(inputs, ["pixel_values"]) == ("pixel_values",)
    assert context_keys((1, 2)) == ()
    with pytest.raises(ValueError, match=r"context inputs \['mask'\] are not .* available: \['input_ids', 'attention_mask'"):
        context_keys(inputs, ["mask"])
    with pytest.raises(ValueError, match=r"context inputs \[2\] .* \(tuple\); available: \[0, 1\]"):
        context_keys((1, 2), [2])


RESIDUAL = ["transformer.h.0", "transformer.h.1", "lm_head"]


def test_padded_gpt2_residual_stream_is_a_cut_given_the_mask():
    pytest.importorskip("transformers")
    model, inputs = tiny_gpt2(), padded_tokens()
    assert len({tuple(m.tolist()) for m in inputs["attention_mask"][:5]}) > 1  # the checked examples differ in mask
    for first, second in zip(RESIDUAL[:-1], RESIDUAL[1:]):
        check_cut(model, NodeLayer(first), NodeLayer(second), inputs, hf_forward)
    # swapping activations between examples with different masks fails where attention reads the mask
    with pytest.raises(CutError, match=r"'transformer.h.0' -> 'transformer.h.1' are not a cut.*no context inputs held fixed"):
        check_cut(model, NodeLayer("transformer.h.0"), NodeLayer("transformer.h.1"), inputs, hf_forward, context=())
    # a bypass inside a block is still a bypass when the mask is held fixed
    with pytest.raises(CutError, match=r"'transformer.h.0.mlp' -> 'transformer.h.1' are not a cut.*\['attention_mask'\] held fixed"):
        check_cut(model, NodeLayer("transformer.h.0.mlp"), NodeLayer("transformer.h.1"), inputs, hf_forward)
    # build_graphs on this model and these batches: tests/core/test_foreign_models.py


class BigConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(3, 64, 3, padding=1), nn.Linear(64, 10)
        self.double()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_memory_guard_refuses_a_flat_conv_map_and_accepts_it_as_positions():
    model, x = BigConv(), torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(MemoryBudgetError, match=r"about 138 GB \(every layer's statistics plus the largest section\), above memory_budget_bytes = 8589934592 .*\n  103 GB  statistics of 'conv~flat': 3 x \(d\+1\)\^2 float64, d = 65536\n  34.4 GB  section 'conv~flat' -> 'head'.*M' \(34.4 GB\)[\s\S]*\nWays out: select positions"):
        build_graphs(model, ["conv~flat", "head"], [x], kinds=("lib",))
    graphs = build_graphs(model, ["conv", "head"], [x], kinds=("lib",))
    assert graphs["lib"].layers[0].basis.shape[0] == 65  # 64 channels + constant
    with pytest.raises(MemoryError, match=r"section 'conv' -> 'head': Jacobian chunk of 4 examples x 1024 positions x 10 rows x 64"):
        build_graphs(model, ["conv", "head"], [x], kinds=("lib",), memory_budget_bytes=10**6)


def test_memory_estimate_closed_form():
    est = estimate_memory(
        ["a", "b"], [(8, 3, 5), (8, 2, 7)], chunk_size=4, itemsize=8, cache_bytes=10**9, n_examples=16, position_sources=None
    )
    assert [b for _, b in est.layers] == [3 * 36 * 8, 3 * 64 * 8]
    per_example = 3 * (2 * 7) * 5 * 8
    jac, attributions, m_prime, cache = 2 * 4 * per_example, 4 * 2 * 7 * 5 * 8, 36 * 8, per_example * 16
    assert est.sections[0][1] == jac + attributions + m_prime + cache
    assert est.total == 3 * 36 * 8 + 3 * 64 * 8 + est.sections[0][1]
    small_cache = estimate_memory(["a", "b"], [(8, 3, 5), (8, 2, 7)], chunk_size=4, itemsize=8, cache_bytes=100, n_examples=None)
    assert small_cache.sections[0][1] == jac + attributions + m_prime + 100


def test_no_budget_skips_the_guard():
    model, x = MLP(), mlp_inputs(n=20)
    with pytest.raises(MemoryBudgetError):
        build_graphs(model, ["inp", "h0", "out"], [x], memory_budget_bytes=1)
    build_graphs(model, ["inp", "h0", "out"], [x], memory_budget_bytes=None)


class MaskedPool(nn.Module):
    """``out = head(Σ_t valid_t · h_t)``: the per-example ``valid`` weights are context, not content."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin, self.h, self.head = nn.Linear(3, 4), nn.Identity(), nn.Linear(4, 2)
        self.double()

    def forward(self, inputs):
        h = self.h(torch.tanh(self.lin(inputs["x"])))  # (batch, T, 4)
        return self.head((h * inputs["valid"][..., None]).sum(1))


def test_user_named_context_inputs():
    gen = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(8, 5, 3, generator=gen, dtype=torch.float64), "valid": torch.rand(8, 5, generator=gen, dtype=torch.float64)}
    forward = lambda m, i: m(i)  # noqa: E731
    with pytest.raises(CutError, match=r"'h' -> 'head' are not a cut"):
        build_graphs(MaskedPool(), ["h", "head"], [inputs], forward=forward)  # 'valid' is not a known context name
    graphs = build_graphs(MaskedPool(), ["h", "head"], [inputs], forward=forward, context_inputs=["valid"])
    assert all(torch.isfinite(e).all() for e in graphs["lib"].edges)
    with pytest.raises(CutError, match=r"'h' -> 'head' are not a cut.*\['valid'\] held fixed"):
        # x also reaches the head around h: a bypass stays a bypass with the context held fixed
        build_graphs(BypassPool(), ["h", "head"], [inputs], forward=forward, context_inputs=["valid"])


class BypassPool(MaskedPool):
    def forward(self, inputs):
        h = self.h(torch.tanh(self.lin(inputs["x"])))
        return self.head((h * inputs["valid"][..., None]).sum(1) + inputs["x"].sum((1, 2))[:, None])


def test_a_node_layer_that_is_not_batch_first_is_named():
    class LastState(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.rnn = nn.Linear(3, 4), nn.LSTM(4, 5, batch_first=True)
            self.double()

        def forward(self, x):
            return self.rnn(self.embed(x))

    x = torch.randn(6, 7, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"node layer 'rnn\[out:1.0\]' has 1 rows in dim 0 but the inputs hold 6 examples .*h_n"):
        build_graphs(LastState(), ["embed", "rnn[out:1.0]"], [x])


def test_checks_and_memory_guard_run_before_any_pass_or_reduce():
    """A refused build reduces nothing: under DDP a rank that fails its checks must not have joined a
    collective the others wait in (the means pass reduces first); check_build runs the same checks alone."""
    from lib_lightning.core.lib import check_build
    from tests.core.models import Residual

    reduced = []

    def reduce(t):
        reduced.append(t)
        return t

    x = torch.randn(32, 5, dtype=torch.float64)
    with pytest.raises(CutError, match=r"'hidden' -> 'out' are not a cut"):
        build_graphs(Residual(), ["hidden", "out"], [x[:16], x[16:]], reduce=reduce)
    with pytest.raises(MemoryBudgetError):
        build_graphs(MLP(), ["h0", "h1"], [mlp_inputs(64)], reduce=reduce, memory_budget_bytes=1)
    assert reduced == []
    with pytest.raises(CutError, match=r"'hidden' -> 'out' are not a cut"):
        check_build(Residual(), ["hidden", "out"], [x], edge_point="activation", seed=3)  # other options ignored
    check_build(Residual(), ["inp", "out"], [x])  # a cut: nothing raised
