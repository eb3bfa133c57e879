"""The affine fast path (core/lib/affine.py): one Jacobian per chunk where every example shares it, the
per-example path everywhere else, and the same graphs either way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lib_lightning.core.lib.affine as affine_module
import lib_lightning.core.lib.section as section_module
from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.affine import same_for_every_example, shared_jacobian
from lib_lightning.core.lib.capture import NodeLayer, default_forward
from lib_lightning.core.lib.integration import integration_rule
from lib_lightning.core.lib.jacobian import edges_update, integrated_jacobian, m_prime_update
from lib_lightning.core.lib.modes import analysis_mode
from tests.core.models import MLP, hf_forward, mlp_inputs

TOL = dict(rtol=1e-10, atol=1e-13)
MLP_LAYERS = ["inp", "h0", "h1", "out"]


class MaskedChain(nn.Module):
    """Dict inputs ``tokens``, ``mask`` ``(batch, 4)``: embedding -> ``pre (batch, 4, 5)`` -> attention over
    the unmasked keys -> ``mid (batch, 4, 5)`` -> Linear(5, 6) -> Linear(6, 3) per position, positions
    mixed 4 -> 2 -> ``post (batch, 2, 3)`` -> scaled by the example's mask count, read out -> ``out (batch, 2)``.

    Sections: pre -> mid attention (not affine), mid -> post a Linear chain (affine, shared by every
    example), post -> out linear in f but with a per-example scale from the context (not shared).
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(7, 5)
        self.pre, self.mid, self.post, self.out = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
        self.q, self.k, self.v = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 5)
        self.a, self.b, self.head = nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(6, 2)
        self.mix = nn.Parameter(torch.empty(2, 4))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.8)
        self.double()

    def forward(self, tokens, mask):
        x = self.pre(self.embed(tokens))  # (batch, 4, 5)
        scores = self.q(x) @ self.k(x).transpose(1, 2) / 5**0.5  # (batch, 4, 4)
        scores = scores.masked_fill(mask[:, None, :] == 0, -1e9)
        x = self.mid(x + scores.softmax(-1) @ self.v(x))  # (batch, 4, 5)
        x = self.post(torch.einsum("ts,bsd->btd", self.mix, self.b(self.a(x))))  # (batch, 2, 3)
        scale = mask.sum(1, dtype=x.dtype)[:, None, None]  # (batch, 1, 1)
        return self.out(self.head((x * scale).flatten(1)))


def masked_inputs(n=40, seed=3):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (n, 4), generator=gen)
    mask = (torch.arange(4)[None] < torch.randint(2, 5, (n, 1), generator=gen)).long()
    return {"tokens": tokens, "mask": mask}


def _assert_same_graphs(fast, slow):
    """Λ, bases up to each feature's sign, and edges agree to 1e-10 relative."""
    for kind in slow:
        for a, b in zip(fast[kind].layers, slow[kind].layers):
            torch.testing.assert_close(a.lambdas, b.lambdas, **TOL)
            signs = torch.sign((a.basis * b.basis).sum(0))  # (k,): a feature's sign is arbitrary
            torch.testing.assert_close(a.basis * signs, b.basis, **TOL)
        for a, b in zip(fast[kind].edges, slow[kind].edges):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))


def _spy(monkeypatch):
    """Records (input layer, batch) of every per-example Jacobian the section module takes."""
    calls, real = [], section_module.integrated_jacobian

    def spy(model, layer_in, layer_out, inputs, *args, **kwargs):
        calls.append((layer_in.name, len(inputs["tokens"]) if isinstance(inputs, dict) else inputs.shape[0]))
        return real(model, layer_in, layer_out, inputs, *args, **kwargs)

    monkeypatch.setattr(section_module, "integrated_jacobian", spy)
    return calls


@pytest.mark.parametrize("edge_point", ["activation", "reconstruction"])
def test_fast_path_equals_per_example_path_with_context_inputs_and_attention(monkeypatch, edge_point):
    model, x = MaskedChain(), masked_inputs()
    kwargs = dict(kinds=("lib", "pca"), forward=hf_forward, chunk_size=16, rel_threshold=0.02, edge_point=edge_point)
    slow = build_graphs(model, ["pre", "mid", "post", "out"], [x], affine_probe=False, **kwargs)
    calls = _spy(monkeypatch)
    fast = build_graphs(model, ["pre", "mid", "post", "out"], [x], **kwargs)
    _assert_same_graphs(fast, slow)
    per_example = {name for name, _ in calls}
    assert "mid" not in per_example  # the Linear chain took one Jacobian per chunk
    assert {"pre", "post"} <= per_example  # attention, and the context-scaled readout, did not


def test_linear_chain_section_is_detected_and_its_jacobian_is_every_examples():
    model, x = MaskedChain(), masked_inputs(n=12)
    rule = integration_rule("gauss-legendre", 2)
    layers = {name: NodeLayer(name) for name in ("pre", "mid", "post", "out")}
    with analysis_mode(model, torch.float64):
        got = shared_jacobian(model, layers["mid"], layers["post"], x, rule, hf_forward, 1e-10, seed=0)
        assert got is not None
        acts, jac = got
        assert jac.shape == (1, 4, 2, 3, 5)  # (1, pos_in, pos_out, d_out, d_in)
        ref_acts, ref = integrated_jacobian(model, layers["mid"], layers["post"], x, rule, hf_forward)
        torch.testing.assert_close(acts, ref_acts, rtol=0, atol=0)
        torch.testing.assert_close(jac.expand_as(ref), ref, rtol=1e-12, atol=1e-14)
        assert shared_jacobian(model, layers["pre"], layers["mid"], x, rule, hf_forward, 1e-10, seed=0) is None
        assert shared_jacobian(model, layers["post"], layers["out"], x, rule, hf_forward, 1e-10, seed=0) is None
        one = {key: value[:1] for key, value in x.items()}
        assert shared_jacobian(model, layers["mid"], layers["post"], one, rule, hf_forward, 1e-10, seed=0) is None


def test_relu_section_that_flips_takes_the_per_example_path_and_skipping_the_probe_would_fail(monkeypatch):
    model, x = MLP(), mlp_inputs(n=64)
    kwargs = dict(kinds=("lib", "pca"), chunk_size=32)
    slow = build_graphs(model, MLP_LAYERS, [x], affine_probe=False, **kwargs)
    fast = build_graphs(model, MLP_LAYERS, [x], **kwargs)
    _assert_same_graphs(fast, slow)
    with analysis_mode(model, torch.float64):
        args = (model, NodeLayer("inp"), NodeLayer("h0"), x, integration_rule(), default_forward, 1e-10)
        assert shared_jacobian(*args, seed=0) is None
    # a probe that always agrees (as if skipped) takes one ReLU pattern for every example: wrong graphs
    monkeypatch.setattr(affine_module, "same_for_every_example", lambda vjps, rtol: True)
    skipped = build_graphs(model, MLP_LAYERS, [x], **kwargs)
    wrong, right = skipped["lib"].layers[1].lambdas, slow["lib"].layers[1].lambdas  # h0, from the ReLU section h0 -> h1
    assert wrong.shape != right.shape or not torch.allclose(wrong, right, rtol=1e-3)


def test_every_chunk_is_probed_not_only_the_first(monkeypatch):
    """Chunk 0 sits where no ReLU of inp -> h0 flips (one shared Jacobian, exact); chunk 1 is generic."""
    model, x = MLP(seed=2), mlp_inputs(n=48)
    gen = torch.Generator().manual_seed(5)
    calm = x[:1] + 1e-4 * torch.randn(24, 4, generator=gen, dtype=torch.float64)  # one activation pattern
    batches = [calm, x[:24]]
    kwargs = dict(kinds=("lib",), chunk_size=24)
    slow = build_graphs(model, MLP_LAYERS, batches, affine_probe=False, **kwargs)
    calls = _spy(monkeypatch)
    fast = build_graphs(model, MLP_LAYERS, batches, **kwargs)
    _assert_same_graphs(fast, slow)
    assert ("inp", 24) in calls and calls.count(("inp", 24)) == 1  # chunk 1 alone per example
    with analysis_mode(model, torch.float64):
        args = (model, NodeLayer("inp"), NodeLayer("h0"), calm, integration_rule(), default_forward, 1e-10)
        assert shared_jacobian(*args, seed=0) is not None  # a ReLU section that does not flip is shared


def test_shared_sums_equal_the_sums_over_every_example():
    model, x = MLP(), mlp_inputs(n=20)
    graph = build_graphs(model, MLP_LAYERS, [x], kinds=("lib",))["lib"]
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(1, 1, 1, graph.dims[3], 7, generator=gen, dtype=torch.float64)  # (1, pos_in, pos_out, k, d_in)
    acts = torch.randn(20, 1, 7, generator=gen, dtype=torch.float64)
    every = g.expand(20, -1, -1, -1, -1)
    torch.testing.assert_close(m_prime_update(g, repeat=20), m_prime_update(every), rtol=1e-13, atol=0)
    layer = graph.layers[2]
    torch.testing.assert_close(edges_update(acts, g, layer), edges_update(acts, every, layer), rtol=1e-13, atol=0)


def test_probe_tolerance_is_relative_to_the_first_example():
    vjps = torch.tensor([[1.0, -2.0], [1.0, -2.0 + 1e-12], [1.0, -2.0]], dtype=torch.float64)
    assert same_for_every_example(vjps, 1e-10)
    assert not same_for_every_example(vjps, 1e-13)
    assert not same_for_every_example(vjps * torch.tensor([[1.0], [1.0], [1.001]], dtype=torch.float64), 1e-10)


@pytest.mark.parametrize("n, rows_per_call, rows_of_each_call", [(12, 1, [6]), (2, 1, [2, 2, 2]), (2, 2, [4, 2])])
def test_shared_jacobian_takes_its_rows_batched_as_many_per_call_as_the_chunk_takes(
    monkeypatch, n, rows_per_call, rows_of_each_call
):
    """The one example's 6 rows (pos_out 2 × d_out 3) go through autograd calls of the chunk's examples ×
    ``rows_per_call`` rows (vmapped): one call for 12 examples, calls of 2 and 4 rows for 2; the J̄ is the
    loop's, one row per call, to rounding."""
    model, x = MaskedChain(), masked_inputs(n=n)
    rule = integration_rule("gauss-legendre", 2)
    mid, post = NodeLayer("mid"), NodeLayer("post")
    grad, batched = torch.autograd.grad, []

    def counting(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            batched.append(args[2].shape[0])  # rows of this call
        return grad(*args, **kwargs)

    with analysis_mode(model, torch.float64):
        one = {key: value[:1] for key, value in x.items()}
        _, loop = integrated_jacobian(model, mid, post, one, rule, hf_forward, rows_per_call=1)
        monkeypatch.setattr(torch.autograd, "grad", counting)
        _, jac = shared_jacobian(model, mid, post, x, rule, hf_forward, 1e-10, seed=0, rows_per_call=rows_per_call)
    assert batched == rows_of_each_call * 3  # at each of the rule's 3 points
    torch.testing.assert_close(jac, loop, rtol=1e-13, atol=1e-15)


def test_shared_jacobian_falls_back_to_the_chunk_s_rows_when_vmap_fails(monkeypatch):
    """A backward that vmap cannot batch (here: every batched call raises) still gets the one example's J̄,
    taken as the per-example path takes rows (``rows_per_call`` per call), equal to the loop's."""
    model, x = MaskedChain(), masked_inputs(n=12)
    rule = integration_rule("gradient", 0)
    mid, post = NodeLayer("mid"), NodeLayer("post")
    grad, calls = torch.autograd.grad, []

    def no_vmap(*args, **kwargs):
        calls.append(bool(kwargs.get("is_grads_batched")))
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("vmap: no batching rule for this op")
        return grad(*args, **kwargs)

    with analysis_mode(model, torch.float64):
        one = {key: value[:1] for key, value in x.items()}
        _, loop = integrated_jacobian(model, mid, post, one, rule, hf_forward, rows_per_call=1)
        monkeypatch.setattr(torch.autograd, "grad", no_vmap)
        _, jac = shared_jacobian(model, mid, post, x, rule, hf_forward, 1e-10, seed=0, rows_per_call=1)
    failed = calls.index(True)  # the probes' VJPs (one direction per call) come first, then the one batched call
    assert calls.count(True) == 1 and not any(calls[:failed]) and len(calls) > failed + 1  # then the loop
    torch.testing.assert_close(jac, loop, rtol=1e-13, atol=1e-15)


def test_probe_stops_at_the_first_examples_when_they_differ(monkeypatch):
    """A section whose first PROBE_FIRST examples differ is not probed on the rest of the chunk (the main
    job's attention and MLP); a shared one is probed on those first, then on every example."""
    model, x = MaskedChain(), masked_inputs(n=12)
    rule = integration_rule("gradient", 0)
    layers = {name: NodeLayer(name) for name in ("pre", "mid", "post")}
    grad, examples = torch.autograd.grad, []

    def counting(*args, **kwargs):
        examples.append(args[1].shape[0])  # the leaf's examples
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    with analysis_mode(model, torch.float64):
        assert shared_jacobian(model, layers["pre"], layers["mid"], x, rule, hf_forward, 1e-10, seed=0) is None
        assert examples == [affine_module.PROBE_FIRST] * affine_module.PROBE_DIRECTIONS
        examples.clear()
        assert shared_jacobian(model, layers["mid"], layers["post"], x, rule, hf_forward, 1e-10, seed=0) is not None
    probes = affine_module.PROBE_DIRECTIONS
    assert examples == [affine_module.PROBE_FIRST] * probes + [12] * probes + [1]  # then the one example's rows
