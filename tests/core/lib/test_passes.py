"""The statistics pass: non-finite activations found at the means' reduction on every process alike, and
other layers read in its forward (``observe``) with no forward of their own."""

from __future__ import annotations

import pytest
import torch

from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.capture import NodeLayer, capture
from lib_lightning.core.lib.passes import NonFiniteActivations
from tests.core.models import MLP, mlp_inputs

LAYERS = ["inp", "h0", "h1", "out"]


def _other_process(count_bad: float):
    """A reduce that sums this process's partials with another process's: zeros, except ``count_bad``
    non-finite entries counted in the first node layer's means partial (the first reduction)."""
    calls = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        other = torch.zeros_like(t)
        if len(calls) == 1:
            other[-1] = count_bad
        return t + other

    return reduce, calls


def test_a_nan_on_another_process_raises_here_at_the_first_reduction():
    model, x = MLP(), mlp_inputs(n=24)
    reduce, calls = _other_process(3.0)
    with pytest.raises(NonFiniteActivations, match=r"node layer\(s\) \['inp'\] contain NaN or Inf on another process"):
        build_graphs(model, LAYERS, [x[:10], x[10:]], reduce=reduce, check_cuts=False)
    assert len(calls) == len(LAYERS)  # the means' reductions only: no later collective was entered
    assert calls[0] == (4 + 2,)  # (Σ f, N P, non-finite count) of a layer of width 4


def test_a_finite_run_reduces_zero_non_finite_entries_and_builds():
    model, x = MLP(), mlp_inputs(n=24)
    reduce, _ = _other_process(0.0)
    graphs = build_graphs(model, LAYERS, [x[:10], x[10:]], reduce=reduce, check_cuts=False)
    reference = build_graphs(model, LAYERS, [x], check_cuts=False)
    torch.testing.assert_close(graphs["lib"].edges[0], reference["lib"].edges[0], rtol=1e-10, atol=1e-12)


def test_a_nan_here_names_the_layer_and_batch_and_raises_after_the_reduction():
    model, x = MLP(), mlp_inputs(n=24)
    bad = x.clone()
    bad[2, 0] = float("inf")
    reduced = []
    with pytest.raises(NonFiniteActivations, match=r"node layer 'inp' contain NaN or Inf \(batch 1\).*'inp': 1"):
        build_graphs(model, LAYERS, [x[:10], bad], reduce=lambda t: reduced.append(t) or t, check_cuts=False)
    assert len(reduced) == len(LAYERS)  # every process reaches the same reductions before raising


def test_observed_layers_are_read_in_the_statistics_forward():
    model, x = MLP(), mlp_inputs(n=24)
    batches = [x[:10], x[10:]]
    seen: dict[int, list[torch.Tensor]] = {}
    forwards = []
    handle = model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        build_graphs(model, LAYERS, batches, observe=["a0"], observer=lambda b, acts: seen.setdefault(b, acts),
                     check_cuts=False)
        with_observer = len(forwards)
        forwards.clear()
        build_graphs(model, LAYERS, batches, check_cuts=False)
        without = len(forwards)
    finally:
        handle.remove()
    assert with_observer == without
    assert sorted(seen) == [0, 1]
    for b, inputs in enumerate(batches):
        (expected,) = capture(model, [NodeLayer.parse("a0")], inputs)
        assert len(seen[b]) == 1
        torch.testing.assert_close(seen[b][0], expected, rtol=0, atol=0)


def test_observe_without_observer_is_refused():
    model, x = MLP(), mlp_inputs(n=8)
    with pytest.raises(ValueError, match=r"give observe and observer together, got observe=\['a0'\] and observer=None"):
        build_graphs(model, LAYERS, [x], observe=["a0"])
