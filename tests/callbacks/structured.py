"""LightningModules the library does not own, with structured batches and train-mode layers.

- :class:`OfflineTransformer`: Lightning's demo encoder-decoder (tuple batches ``(inputs, target)``) on
  synthetic token blocks instead of the downloaded WikiText-2.
- :class:`BagOfTokens`: a padded-sequence classifier called as ``model(input_ids=..., attention_mask=...)``
  on ``(BatchEncoding, labels)`` batches, as a HuggingFace tokenizer gives them.
- :class:`BatchNormNet`: BatchNorm and dropout, whose state and RNG an analysis must not touch.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.transformer import LightningTransformer
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from transformers import BatchEncoding

VOCAB = 40


class _TokenBlocks(Dataset):
    """(inputs, target) blocks of a seeded token stream, target shifted by one, like WikiText2."""

    def __init__(self, n: int, block: int, seed: int = 0):
        self.data = torch.randint(0, VOCAB, (n * block + 1,), generator=torch.Generator().manual_seed(seed))
        self.n, self.block = n, block

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        start = i * self.block
        return self.data[start : start + self.block], self.data[start + 1 : start + self.block + 1]


class OfflineTransformer(LightningTransformer):
    def __init__(self, n: int = 24, block: int = 6, batch_size: int = 8):
        super().__init__(vocab_size=VOCAB)
        self.n, self.block, self.batch_size = n, block, batch_size

    def prepare_data(self) -> None:  # nothing to download
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_TokenBlocks(self.n, self.block), batch_size=self.batch_size)


def padded_tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 7), generator=gen)
    lengths = torch.randint(2, 8, (n,), generator=gen)
    mask = (torch.arange(7) < lengths[:, None]).long()  # (n, 7): padded on the right
    ids = ids * mask  # padding id 0
    labels = ((ids % 3 == 0).sum(1) * 3 // lengths).clamp(max=2)  # depends on the unpadded tokens
    return ids, mask, labels


def collate_encodings(items):
    ids, mask, labels = (torch.stack(t) for t in zip(*items))
    return BatchEncoding({"input_ids": ids, "attention_mask": mask}), labels


class PaddedTokens(L.LightningDataModule):
    def __init__(self, n: int = 96, batch_size: int = 16, shuffle: bool = True):
        super().__init__()
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle

    def train_dataloader(self):
        dataset = TensorDataset(*padded_tokens(self.n, 0))
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=self.shuffle, collate_fn=collate_encodings)


def call_with_keywords(model, inputs):
    return model(**inputs)


class BagOfTokens(L.LightningModule):
    """Token embedding, mean over the unpadded positions, an MLP: node layers are plain tensors."""

    def __init__(self, d: int = 8, hidden: int = 12):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask[..., None].to(self.embed.weight.dtype)  # (batch, pos, 1)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)  # (batch, d)
        return self.head(self.mlp(pooled))

    def training_step(self, batch, batch_idx):
        encoding, labels = batch
        return F.cross_entropy(self(**encoding), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class BatchNormNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 12), nn.ReLU(),
            nn.Linear(12, 3),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(128, 5, generator=gen)
        y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)

