"""A LightningModule and data the library does not own: dict batches, its own module names."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


class _Points(Dataset):
    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, generator=gen)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).long() + (self.x[:, 2] > 1).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i], "target": self.y[i]}


class ForeignData(L.LightningDataModule):
    def __init__(self, n: int = 256, batch_size: int = 32):
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self):
        return DataLoader(_Points(self.n, 0), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(_Points(128, 1), batch_size=64)


def features_of(batch):
    return batch["features"]


class ForeignModule(L.LightningModule):
    def __init__(self, hidden: int = 12, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.encoder = nn.Sequential(nn.Linear(5, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 3)

    def forward(self, features):
        return self.head(self.encoder(features))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["features"]), batch["target"])
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["features"]), batch["target"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class NaNAfter(ForeignModule):
    """Produces NaN activations in its hidden layer once ``poison`` is set (to test skipping)."""

    poison = False

    def forward(self, features):
        h = self.encoder(features)
        if self.poison:
            h = h * float("nan")
        return self.head(h)
