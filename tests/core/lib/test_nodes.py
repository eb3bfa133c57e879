"""Node layers: the grammar, elements of structured outputs and inputs, layouts, and substitution back."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.capture import capture, check_cut, run_section
from lib_lightning.core.lib.nodes import NodeLayer


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fc", NodeLayer("fc")),
        ("fc[in]", NodeLayer("fc", use_input=True)),
        ("fc[in:0]", NodeLayer("fc", use_input=True)),
        ("fc@-1", NodeLayer("fc", (-1,))),
        ("fc[in]@0,1", NodeLayer("fc", (0, 1), True)),
        ("rnn[out:0]", NodeLayer("rnn", element=(0,))),
        ("rnn[out:1.0]", NodeLayer("rnn", element=(1, 0))),
        ("block[in:hidden_states]", NodeLayer("block", use_input=True, element=("hidden_states",))),
        ("fc[in:1]", NodeLayer("fc", use_input=True, element=(1,))),
        ("conv~flat", NodeLayer("conv", layout="flat")),
        ("a.b[out:logits]~tokens@-1,2", NodeLayer("a.b", (-1, 2), False, ("logits",), "tokens")),
    ],
)
def test_grammar_parses_and_names_round_trip(spec, expected):
    layer = NodeLayer.parse(spec)
    assert layer == expected
    assert NodeLayer.parse(layer.name) == layer


def test_old_names_are_unchanged():
    assert [NodeLayer.parse(s).name for s in ("fc", "fc[in]", "fc@-1", "fc[in]@0,1")] == ["fc", "fc[in]", "fc@-1", "fc[in]@0,1"]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("fc[inp]", r"unknown selector \[inp\]; grammar: 'module', 'module\[in\]'"),
        ("fc[out:]", r"empty path after ':'"),
        ("fc~rows", r"unknown layout 'rows'; valid choices: \('tokens', 'channels', 'flat'\)"),
        ("fc@a", r"positions must be comma-separated integers, got 'a'"),
        ("fc]x", r"cannot read node layer 'fc\]x'"),
    ],
)
def test_bad_specs_name_the_grammar(spec, match):
    with pytest.raises(ValueError, match=match):
        NodeLayer.parse(spec)


class RNN(nn.Module):
    """An LSTM between two linear layers: ``rnn`` returns ``(out, (h, c))``."""

    def __init__(self, d=3, hidden=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(d, 4)
        self.rnn = nn.LSTM(4, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)
        self.double()

    def forward(self, x):
        out, (h, c) = self.rnn(self.inp(x))
        return self.head(out[:, -1] + h[0])


def test_tuple_output_without_element_lists_the_choices():
    model, x = RNN(), torch.randn(6, 4, 3, dtype=torch.float64)
    with pytest.raises(
        TypeError,
        match=r"'rnn': the output of module 'rnn' is a tuple of 2: \[0\] Tensor \(6, 4, 5\), \[1\] tuple of 2; "
        r"pick a tensor with 'rnn\[out:0\]'",
    ):
        capture(model, [NodeLayer.parse("rnn"), NodeLayer.parse("head")], x)
    with pytest.raises(TypeError, match=r"element 1 of the output of module 'rnn' is a tuple of 2: .*'rnn\[out:1.0\]'"):
        capture(model, [NodeLayer.parse("rnn[out:1]")], x)
    with pytest.raises(TypeError, match=r"the output of module 'rnn' is a tuple of 2.*'rnn\[out:0\]'"):
        capture(model, [NodeLayer.parse("rnn[out:2]")], x)


def test_elements_of_a_tuple_output_are_captured_and_substituted_in_place():
    model, x = RNN(), torch.randn(6, 4, 3, dtype=torch.float64)
    (out,) = capture(model, [NodeLayer.parse("rnn[out:0]")], x)
    with torch.no_grad():
        ref_out, (ref_h, _) = model.rnn(model.inp(x))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    new = torch.randn_like(out)
    got = run_section(model, NodeLayer.parse("rnn[out:0]"), NodeLayer("head"), x, lambda a: new)
    torch.testing.assert_close(got[:, 0], model.head(new[:, -1] + ref_h[0]), rtol=1e-12, atol=1e-12)


class Nested(nn.Module):
    def forward(self, x):
        return x, (2 * x, [3 * x])


class NestedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = Nested(), nn.Identity()

    def forward(self, x):
        a, (b, (c,)) = self.inner(x)
        return self.head(a + 10 * b + 100 * c)


def test_nested_elements_are_rebuilt_with_their_types():
    x = torch.randn(3, 2, dtype=torch.float64)
    for spec, dropped in (("inner[out:1.0]", 20), ("inner[out:1.1.0]", 300)):  # 10 * 2x, 100 * 3x
        got = run_section(NestedModel(), NodeLayer.parse(spec), NodeLayer("head"), x, lambda a: torch.zeros_like(a))
        torch.testing.assert_close(got[:, 0], (321 - dropped) * x, rtol=1e-12, atol=0)


class Block(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, hidden_states, scale=None):
        return {"hidden": torch.tanh(self.lin(hidden_states)) * scale, "aux": hidden_states.sum(-1)}


class KwargModel(nn.Module):
    """Calls its block with keyword arguments only, and reads a dict output."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(3, 4)
        self.block = Block()
        self.head = nn.Linear(4, 2)
        self.double()

    def forward(self, x):
        out = self.block(hidden_states=self.embed(x), scale=2.0)
        return self.head(out["hidden"])


def test_keyword_inputs_and_dict_outputs():
    model, x = KwargModel(), torch.randn(5, 3, dtype=torch.float64)
    by_name, by_index, hidden = capture(
        model, [NodeLayer.parse(s) for s in ("block[in:hidden_states]", "block[in]", "block[out:hidden]")], x
    )
    torch.testing.assert_close(by_name[:, 0], model.embed(x), rtol=0, atol=0)
    torch.testing.assert_close(by_index, by_name, rtol=0, atol=0)  # [in] finds the first parameter by name
    torch.testing.assert_close(hidden[:, 0], torch.tanh(model.block.lin(model.embed(x))) * 2, rtol=0, atol=0)
    check_cut(model, NodeLayer.parse("block[in:hidden_states]"), NodeLayer.parse("head"), x)
    new = torch.randn(5, 1, 4, dtype=torch.float64)
    got = run_section(model, NodeLayer.parse("block[out:0]"), NodeLayer("head"), x, lambda a: new)
    torch.testing.assert_close(got[:, 0], model.head(new[:, 0]), rtol=1e-12, atol=1e-12)


def test_missing_input_lists_positional_and_keyword_inputs():
    model, x = KwargModel(), torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(
        IndexError,
        match=r"module 'block' has no input 2 in this call; it was called with positional inputs \(none\) and "
        r"keyword inputs \(hidden_states: Tensor \(5, 4\), scale: float\); pick one with 'block\[in:hidden_states\]'",
    ):
        capture(model, [NodeLayer.parse("block[in:2]")], x)
    with pytest.raises(TypeError, match=r"input 'scale' of module 'block' is a float"):
        capture(model, [NodeLayer.parse("block[in:scale]")], x)


def test_ordered_dict_output_keeps_its_type_when_substituted():
    class Out(nn.Module):
        def forward(self, x):
            return OrderedDict(a=x * 2, b=x + 1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = Out(), nn.Identity()

        def forward(self, x):
            out = self.inner(x)
            assert isinstance(out, OrderedDict)
            return self.head(out["a"] - out["b"])

    x = torch.randn(3, 2, dtype=torch.float64)
    got = run_section(M(), NodeLayer.parse("inner[out:a]"), NodeLayer("head"), x, lambda a: torch.zeros_like(a))
    torch.testing.assert_close(got[:, 0], -(x + 1), rtol=0, atol=0)


def test_conv_maps_are_positions_of_channels_and_go_back_exactly():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    default = NodeLayer("m")
    acts = default.to_acts(x)
    assert acts.shape == (2, 20, 3)
    torch.testing.assert_close(acts[1, 2 * 5 + 3], x[1, :, 2, 3], rtol=0, atol=0)  # p = h * W + w
    assert torch.equal(default.from_acts(x, acts), x)
    assert NodeLayer("m", layout="flat").to_acts(x).shape == (2, 1, 60)
    assert NodeLayer("m", layout="tokens").to_acts(x).shape == (2, 12, 5)
    conv1d = torch.randn(2, 3, 7, dtype=torch.float64)
    assert NodeLayer("m", layout="channels").to_acts(conv1d).shape == (2, 7, 3)
    for layer in (NodeLayer("m", (0, -1)), NodeLayer("m", (1,), layout="tokens"), NodeLayer("m", (0,), layout="flat")):
        sub = layer.to_acts(x)
        back = layer.from_acts(x, sub * 3)
        assert torch.equal(layer.to_acts(back), sub * 3)
        untouched = layer.to_acts(x).new_ones(sub.shape)
        assert torch.equal(layer.from_acts(x, layer.to_acts(x)), x)
        assert not torch.equal(layer.from_acts(x, untouched), x)


def test_repeated_positions_are_refused():
    with pytest.raises(ValueError, match=r"node layer 'm@1,-3': positions \[1, -3\] repeat a position of 4"):
        NodeLayer.parse("m@1,-3").to_acts(torch.zeros(2, 4, 3))


class ConvNet(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.double()

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (batch, 4, H, W)
        return self.head(h.mean((2, 3)))


def test_conv_sections_substitute_at_positions():
    model, x = ConvNet(), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    layer = NodeLayer.parse("conv1@5")
    (acts,) = capture(model, [layer], x)
    assert acts.shape == (3, 1, 3)
    got = run_section(model, layer, NodeLayer("conv2"), x, lambda a: a * 0)
    with torch.no_grad():
        h1 = model.conv1(x)
        h1[:, :, 1, 1] = 0  # position 5 = row 1, column 1 of a 4-wide map
        expected = NodeLayer("conv2").to_acts(model.conv2(torch.relu(h1)))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_build_graphs_on_conv_maps_as_positions_and_flat():
    model, x = ConvNet(), torch.randn(16, 2, 4, 4, dtype=torch.float64)
    layers = ["conv1", "conv2", "head"]
    graphs = build_graphs(model, layers, [x[:8], x[8:]], kinds=("lib", "pca"))
    assert [b.basis.shape[0] for b in graphs["pca"].layers] == [4, 5, 3]  # channels + constant
    flat = build_graphs(model, ["conv1~flat", "conv2~flat", "head"], [x], kinds=("lib",))
    assert flat["lib"].layers[0].basis.shape[0] == 3 * 16 + 1
    for g in (graphs["lib"], graphs["pca"], flat["lib"]):
        assert all(torch.isfinite(e).all() for e in g.edges)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=5),
    layout=st.sampled_from([None, "tokens", "channels", "flat"]),
    picks=st.lists(st.integers(-30, 30), min_size=1, max_size=3),
    use_positions=st.booleans(),
)
def test_layouts_and_positions_invert_exactly(shape, layout, picks, use_positions):
    """from_acts(x, to_acts(x)) = x, and to_acts(from_acts(x, y)) = y, for every layout and position choice."""
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(len(shape)))
    n_pos = NodeLayer("m", layout=layout).to_acts(x).shape[1]
    positions = tuple(sorted({p % n_pos for p in picks})) if use_positions else None
    layer = NodeLayer("m", positions, layout=layout)
    acts = layer.to_acts(x)
    assert acts.shape[0] == shape[0] and acts.shape[1] == (len(positions) if positions else n_pos)
    assert torch.equal(layer.from_acts(x, acts), x)
    y = torch.randn(acts.shape, dtype=torch.float64)
    back = layer.from_acts(x, y)
    assert back.shape == x.shape and torch.equal(layer.to_acts(back), y)
    assert acts.shape[1] * acts.shape[2] <= x[0].numel()
