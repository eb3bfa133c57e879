"""CIFAR-10 models: the LIB paper's MLP and a small CNN, with named hook points between layers.

Inputs are normalised images ``(batch, 3, 32, 32)``. Hook points are ``nn.Identity`` modules, so analysis
code can hook them by name (``model.hook_hidden_0``); ``model.hook_points`` lists them in forward order.

``CifarMLP`` with the default ``widths=(100, 100)`` (the paper's 3072 → 100 → 100 → 10, ReLU):

====================  ======================  ==============================================
module name           output shape            meaning
====================  ======================  ==============================================
``hook_in``           ``(batch, 3072)``       flattened input image (channel-major, as CHW)
``hook_hidden_0``     ``(batch, 100)``        first hidden layer after the ReLU
``hook_hidden_1``     ``(batch, 100)``        second hidden layer after the ReLU
``hook_logits``       ``(batch, 10)``         logits
====================  ======================  ==============================================

``CifarCNN`` with the default ``channels=(32, 64, 64)``; each block is a 3×3 convolution (padding 1),
a ReLU and a 2×2 max-pool, so every block halves the side:

====================  ==========================  ==========================================
module name           output shape                meaning
====================  ==========================  ==========================================
``hook_in``           ``(batch, 3, 32, 32)``      input image
``hook_block_0``      ``(batch, 32, 16, 16)``     after block 0 (3072 → 8192 values)
``hook_block_1``      ``(batch, 64, 8, 8)``       after block 1 (4096 values)
``hook_block_2``      ``(batch, 64, 4, 4)``       after block 2 (1024 values)
``hook_pooled``       ``(batch, 64)``             global average over the 4×4 positions
``hook_logits``       ``(batch, 10)``             logits of the linear head
====================  ==========================  ==========================================

Cuts: both networks are plain chains (no skip connections, no normalisation across the batch), so
every hook point is a cut: each one is a function of the previous hook point alone, and therefore of
any earlier one. Any subsequence of ``hook_points`` is a valid list of LIB node layers. For the CNN,
the values per example (C·H·W) set the cost of the analysis; ``hook_block_2``, ``hook_pooled`` and
``hook_logits`` are the cheap ones. There is deliberately no BatchNorm in these two: in training mode it makes a node layer depend
on the other examples of the batch, which breaks the cut property.

``cifar_resnet18`` is torchvision's ResNet-18, unchanged but for the stem (3×3 stride-1 ``conv1`` and no
max-pool, the usual adaptation to 32×32 images). It is a model this library does not own: its module
names are torchvision's, there are no hook points, and it has BatchNorm, residual blocks and in-place
ReLUs. The analysis runs in eval mode, where BatchNorm is a fixed per-channel affine map, so the outputs
of ``layer1`` … ``layer4`` (each residual stage ends the stage's skip connections) are cuts; points
inside a block are not (the skip bypasses them):

====================  ==========================  ==========================================
module name           output shape                read as (the default conv layout)
====================  ==========================  ==========================================
``layer1``            ``(batch, 64, 32, 32)``     1,024 positions of 64 channels
``layer2``            ``(batch, 128, 16, 16)``    256 positions of 128 channels
``layer3``            ``(batch, 256, 8, 8)``      64 positions of 256 channels
``layer4``            ``(batch, 512, 4, 4)``      16 positions of 512 channels
``avgpool``           ``(batch, 512, 1, 1)``      1 position of 512 channels
``fc``                ``(batch, 10)``             logits
====================  ==========================  ==========================================
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["CifarCNN", "CifarMLP", "cifar_resnet18"]

IMAGE_SHAPE = (3, 32, 32)
_MAX_BLOCKS = 5  # each block halves the 32-pixel side: after five blocks it is 1


class CifarMLP(nn.Module):
    """Fully connected ReLU network on flattened images: ``3072 → widths... → num_classes``.

    Args:
        widths: hidden layer widths (the paper: ``(100, 100)``); empty gives a linear classifier.
        num_classes: number of logits.

    Raises:
        ValueError: if a width or ``num_classes`` is below 1.
    """

    def __init__(self, widths: Sequence[int] = (100, 100), num_classes: int = 10) -> None:
        super().__init__()
        widths = tuple(widths)
        if any(w < 1 for w in widths):
            raise ValueError(f"every width must be >= 1, got widths={widths}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.widths, self.num_classes = widths, num_classes
        d_in = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
        self.hook_in = nn.Identity()
        # registered in forward order, so named_modules() reads like the network
        for i, (d_prev, d_hidden) in enumerate(zip((d_in,) + widths, widths)):
            self.add_module(f"fc_{i}", nn.Linear(d_prev, d_hidden))
            self.add_module(f"hook_hidden_{i}", nn.Identity())
        self.readout = nn.Linear(widths[-1] if widths else d_in, num_classes)
        self.hook_logits = nn.Identity()
        self.hook_points = ("hook_in", *(f"hook_hidden_{i}" for i in range(len(widths))), "hook_logits")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images (batch, 3, 32, 32)`` -> logits ``(batch, num_classes)``."""
        x = self.hook_in(images.flatten(1))  # (batch, 3072)
        for i in range(len(self.widths)):
            x = getattr(self, f"hook_hidden_{i}")(torch.relu(getattr(self, f"fc_{i}")(x)))  # (batch, d_hidden)
        return self.hook_logits(self.readout(x))


class CifarCNN(nn.Module):
    """Conv blocks (3×3 conv, ReLU, 2×2 max-pool), global average pooling and a linear head.

    Args:
        channels: output channels of each block (1 to 5 blocks); the default ``(32, 64, 64)`` has
            about 60,000 parameters.
        num_classes: number of logits.

    Raises:
        ValueError: if there are no blocks or more than 5, or a channel count or ``num_classes`` is below 1.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 64), num_classes: int = 10) -> None:
        super().__init__()
        channels = tuple(channels)
        if not 1 <= len(channels) <= _MAX_BLOCKS:
            raise ValueError(f"channels must name 1 to {_MAX_BLOCKS} blocks, got channels={channels}")
        if any(c < 1 for c in channels):
            raise ValueError(f"every channel count must be >= 1, got channels={channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.channels, self.num_classes = channels, num_classes
        self.hook_in = nn.Identity()
        for i, (c_in, c_out) in enumerate(zip((IMAGE_SHAPE[0],) + channels, channels)):
            self.add_module(f"conv_{i}", nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            self.add_module(f"hook_block_{i}", nn.Identity())
        self.pool = nn.MaxPool2d(2)
        self.hook_pooled = nn.Identity()
        self.head = nn.Linear(channels[-1], num_classes)
        self.hook_logits = nn.Identity()
        blocks = tuple(f"hook_block_{i}" for i in range(len(channels)))
        self.hook_points = ("hook_in", *blocks, "hook_pooled", "hook_logits")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images (batch, 3, 32, 32)`` -> logits ``(batch, num_classes)``."""
        x = self.hook_in(images)
        for i in range(len(self.channels)):
            x = self.pool(torch.relu(getattr(self, f"conv_{i}")(x)))  # (batch, c_out, side / 2, side / 2)
            x = getattr(self, f"hook_block_{i}")(x)
        pooled = self.hook_pooled(x.mean(dim=(2, 3)))  # (batch, c_last)
        return self.hook_logits(self.head(pooled))


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 for 32×32 images: ``conv1`` is 3×3 with stride 1 and the max-pool is dropped.

    Raises:
        ValueError: if ``num_classes`` is below 1.
    """
    from torchvision.models import resnet18

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(IMAGE_SHAPE[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
