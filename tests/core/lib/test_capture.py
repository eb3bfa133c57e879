"""Capture and substitution against models that fight back: in-place writes after a hook point, and
forward passes that catch every ``Exception``."""

from __future__ import annotations

import torch
from torch import nn

from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.capture import capture
from lib_lightning.core.lib.nodes import NodeLayer
from tests.core.models import MLP, mlp_inputs


class InplaceReLU(nn.Module):
    """``out = relu_(bn(lin1(x)))`` then ``lin2``, as torchvision's BasicBlock: the ReLU overwrites bn's output."""

    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lin1, self.bn1, self.relu, self.lin2 = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(inplace=True), nn.Linear(6, 3)
        self.out = nn.Identity()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            self.bn1.running_mean.copy_(torch.randn(6, generator=gen))
            self.bn1.running_var.copy_(torch.rand(6, generator=gen) + 0.5)
        self.double().eval()

    def forward(self, x):
        out = self.bn1(self.lin1(x))
        out = self.relu(out)
        return self.out(self.lin2(out))


def test_capture_is_immune_to_later_in_place_writes():
    model, x = InplaceReLU(), mlp_inputs(n=20)
    bn, _ = capture(model, [NodeLayer("bn1"), NodeLayer("out")], x)
    with torch.no_grad():
        expected = model.bn1(model.lin1(x))
    assert (expected < 0).any()  # the in-place ReLU would have zeroed these
    torch.testing.assert_close(bn[:, 0], expected, rtol=0, atol=0)


def test_build_graphs_with_in_place_relu_after_the_node_layer_matches_jacrev():
    model, x = InplaceReLU(), mlp_inputs(n=40)
    lib = build_graphs(model, ["lin1[in]", "bn1", "out"], [x[:24], x[24:]], kinds=("lib",))["lib"]
    with torch.no_grad():
        f = model.bn1(model.lin1(x))  # (N, 6), before the ReLU
    section = lambda v: model.lin2(torch.relu(v))  # noqa: E731  the section bn1 -> out, out of place
    jac = torch.func.vmap(torch.func.jacrev(section))(f)  # (N, 3, 6)
    c_out, b_in = lib.layers[2].basis[:3], lib.layers[1]  # the output basis without its constant row
    f_hat = b_in.transform(f)  # (N, k_in)
    a = (c_out.T @ jac @ b_in.basis_pinv[:, :6].T) * f_hat[:, None, :]  # (N, k_out, k_in)
    torch.testing.assert_close(lib.edges[1], a.square().mean(0), rtol=1e-9, atol=1e-12)
    assert all(torch.isfinite(e).all() for e in lib.edges)


class Swallowing(MLP):
    """Tries a 'fast path' and falls back to the same modules on any ``Exception``, a common pattern."""

    def forward(self, x):
        try:
            return super().forward(x)
        except Exception:
            return super().forward(x)


def test_a_forward_that_catches_exception_does_not_swallow_the_stop():
    layers = ["inp", "h0", "h1", "out"]
    x = mlp_inputs(n=30)
    got = build_graphs(Swallowing(seed=3), layers, [x], kinds=("lib",))["lib"]
    ref = build_graphs(MLP(seed=3), layers, [x], kinds=("lib",))["lib"]
    for a, b in zip(got.layers, ref.layers):
        torch.testing.assert_close(a.lambdas, b.lambdas, rtol=0, atol=0)
    h0, h1 = capture(Swallowing(seed=3), [NodeLayer("h0"), NodeLayer("h1")], x)
    assert h1.shape == (30, 1, 7)
