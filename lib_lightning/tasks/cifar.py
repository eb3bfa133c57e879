"""CIFAR-10 classification with the paper's MLP, a small CNN or ResNet-18 (training logic only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lib_lightning.models.cifar import CifarCNN, CifarMLP, cifar_resnet18
from lib_lightning.tasks.classifier import Classifier

__all__ = ["CifarClassifier"]

_ARCHS = ("mlp", "cnn", "resnet18")
NUM_CLASSES = 10


class CifarClassifier(Classifier):
    """Cross-entropy on CIFAR-10 with Adam; logs ``train/*``, ``val/*`` and ``test/loss``, ``test/acc``.

    The network is ``self.model``; its hook points (``model.hook_hidden_0``, ``model.hook_block_1``, ...)
    and which of them are cuts are listed in :mod:`lib_lightning.models.cifar`.

    Args:
        arch: ``"mlp"`` (:class:`CifarMLP`, the paper's 3072 → 100 → 100 → 10), ``"cnn"`` (:class:`CifarCNN`)
            or ``"resnet18"`` (torchvision's ResNet-18 adapted to 32×32, :func:`cifar_resnet18`).
        widths: hidden widths of the MLP (ignored by the CNN).
        channels: channels of the CNN's conv blocks (ignored by the MLP).
        optimizer, lr, weight_decay, log_every: as in :class:`Classifier` (Adam, lr 1e-3 by default).
    """

    def __init__(
        self,
        arch: str = "mlp",
        widths: tuple[int, ...] = (100, 100),
        channels: tuple[int, ...] = (32, 64, 64),
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        log_every: str = "step",
    ) -> None:
        if arch not in _ARCHS:
            raise ValueError(f"arch must be one of {_ARCHS}, got {arch!r}")
        super().__init__(NUM_CLASSES, optimizer, lr, weight_decay, log_every=log_every)
        self.save_hyperparameters()
        if arch == "mlp":
            self.model = CifarMLP(widths, NUM_CLASSES)
        elif arch == "cnn":
            self.model = CifarCNN(channels, NUM_CLASSES)
        else:
            self.model = cifar_resnet18(NUM_CLASSES)
        self.test_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_acc(logits, labels)
        self.log("test/loss", F.cross_entropy(logits, labels))
        self.log("test/acc", self.test_acc)
