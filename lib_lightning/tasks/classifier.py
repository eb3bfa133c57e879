"""LightningModules: training logic only (loss, accuracy, optimiser, warm-up)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lib_lightning.models.transformer import ModAddTransformer

__all__ = ["Classifier", "ModularAddition"]

_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
_LOG_EVERY = ("step", "epoch")


class Classifier(L.LightningModule):
    """Cross-entropy classification of ``(inputs, labels)`` batches by ``self.model``.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``. Subclasses build ``self.model``.

    Args:
        num_classes: number of classes (for the accuracy metric).
        optimizer: ``"adamw"`` or ``"adam"``.
        lr, weight_decay, betas: optimiser settings.
        warmup_steps: linear learning-rate warm-up over this many steps (0: none).
        log_every: ``"step"`` or ``"epoch"``: when training metrics are logged.
    """

    model: nn.Module

    def __init__(
        self,
        num_classes: int,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        log_every: str = "step",
    ) -> None:
        super().__init__()
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
        if log_every not in _LOG_EVERY:
            raise ValueError(f"log_every must be one of {_LOG_EVERY}, got {log_every!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.optimizer_name, self.lr, self.weight_decay, self.betas = optimizer, lr, weight_decay, tuple(betas)
        self.warmup_steps, self.log_every = warmup_steps, log_every
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        on_step = self.log_every == "step"
        self.log("train/loss", loss, on_step=on_step, on_epoch=not on_step, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=on_step, on_epoch=not on_step, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        logits = self(inputs)
        self.val_acc(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay, "betas": self.betas}
        optimizer = _OPTIMIZERS[self.optimizer_name](self.parameters(), **kwargs)
        if not self.warmup_steps:
            return optimizer
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ModularAddition(Classifier):
    """The grokking task: a one-layer transformer learning ``(a + b) mod p`` with AdamW.

    Defaults are the fast-grokking setting of ``configs/modadd.yaml`` (lr 5e-3, weight decay 1.0,
    betas (0.9, 0.98), 10 warm-up steps); the paper used lr 1e-3 (``configs/modadd_paper.yaml``).
    The network is ``self.model``; its hook points are listed in
    :mod:`lib_lightning.models.transformer` (``model.hook_resid_pre`` and so on).
    """

    def __init__(
        self,
        p: int = 113,
        d_model: int = 128,
        n_heads: int = 4,
        d_head: int = 32,
        d_mlp: int = 512,
        lr: float = 5e-3,
        weight_decay: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 10,
        log_every: str = "step",
    ) -> None:
        if p < 2:  # before the accuracy metric complains about num_classes instead
            raise ValueError(f"p must be >= 2, got p={p}")
        super().__init__(p, "adamw", lr, weight_decay, betas, warmup_steps, log_every)
        self.save_hyperparameters()
        self.model = ModAddTransformer(p, d_model, n_heads, d_head, d_mlp)

    def setup(self, stage: str) -> None:
        data_p = getattr(self.trainer.datamodule, "p", None) if self.trainer is not None else None
        if data_p is not None and data_p != self.hparams.p:
            raise ValueError(f"model p={self.hparams.p} does not match data p={data_p}; set both to the same modulus")
