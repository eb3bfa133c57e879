"""Every tensor handed to ``reduce`` lives on the model's device (NCCL cannot all-reduce CPU tensors).

On a CPU-only machine every tensor is on the CPU, so a device check alone cannot fail here. The
recording reduce therefore also refuses tensors that a factory (``torch.tensor``, ``torch.zeros``, ...)
created without a ``device`` argument: on a GPU those land on the CPU while the model is on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.capture import NodeLayer
from lib_lightning.core.metrics.coactivation import relu_coactivation

_FACTORIES = {torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
              torch.arange}


class DevicelessFactories(TorchFunctionMode):
    """Marks every tensor made by a factory call without ``device=`` (the default device is then used)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES and kwargs.get("device") is None and isinstance(out, torch.Tensor):
            out._made_without_device = True
        return out


class RecordingReduce:
    """An identity reduce that asserts each tensor is on ``device`` and was not made without one."""

    def __init__(self, device: torch.device | str):
        self.device, self.seen = torch.device(device), 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        assert t.device == self.device, f"reduced tensor of shape {tuple(t.shape)} on {t.device}, model on {self.device}"
        assert not getattr(t, "_made_without_device", False), (
            f"reduced tensor of shape {tuple(t.shape)} was made without a device argument (the default device)"
        )
        self.seen += 1
        return t


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def test_the_recording_reduce_catches_a_tensor_made_without_a_device():
    reduce = RecordingReduce("cpu")
    with DevicelessFactories():
        with pytest.raises(AssertionError, match="made without a device argument"):
            reduce(torch.tensor(3.0))
        reduce(torch.tensor(3.0, device="cpu"))
        reduce(torch.ones(2, device="cpu") * 2)
    with pytest.raises(AssertionError, match="on cpu, model on meta"):
        RecordingReduce("meta")(torch.ones(2))


def test_build_graphs_and_co_firing_reduce_only_tensors_on_the_model_device():
    model = _mlp()
    x = torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    batches = [x[:12], x[12:]]
    reduce = RecordingReduce("cpu")
    with DevicelessFactories():
        build_graphs(model, ["0[in]", "1", "3", "4"], batches, kinds=("lib", "pca", "neuron"), reduce=reduce,
                     position_sources=2)
        relu_coactivation(model, [NodeLayer("1")], batches, torch.arange(20), 0, reduce=reduce)
    assert reduce.seen >= 3 * 4 + 2 + 3  # the statistics of 4 layers, counts, M′ and edges, co-firing
