"""Modular addition data: every pair ``(a, b)`` as the tokens ``a b =``, labelled ``(a + b) mod p``."""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["ModularAdditionDataModule", "modular_addition_pairs", "split_indices"]


def modular_addition_pairs(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All p² problems in row-major order of (a, b).

    Returns:
        tokens ``(p*p, 3)`` int64 rows ``[a, b, p]`` (``p`` is the ``=`` token), labels ``(p*p,)``.
    """
    if p < 2:
        raise ValueError(f"p must be >= 2, got p={p}")
    a = torch.arange(p).repeat_interleave(p)  # (p*p,)
    b = torch.arange(p).repeat(p)  # (p*p,)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)  # (p*p, 3)
    return tokens, (a + b) % p


def split_indices(n: int, train_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of ``range(n)`` into train and held-out indices.

    Raises:
        ValueError: if the fraction is outside (0, 1) or a side of the split would be empty.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    n_train = int(round(train_fraction * n))
    if n_train == 0 or n_train == n:
        raise ValueError(
            f"train_fraction={train_fraction} of {n} examples leaves an empty "
            f"{'train' if n_train == 0 else 'validation'} set ({n_train} train examples)"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:]


class _Batches(Dataset):
    """A dataset whose items are whole batches.

    A full-batch ``DataLoader`` over a ``TensorDataset`` spends tens of milliseconds per step collating
    thousands of items; yielding pre-built batches (``batch_size=None`` in the loader) avoids that.
    With ``shuffle``, the order of epoch ``e`` is a permutation seeded by ``seed + epoch()``, so a run
    resumed from a checkpoint sees the same batches as a straight run.

    A full batch is yielded ``repeats`` times per epoch, so that an "epoch" of full-batch training is a
    block of steps (progress bars and epoch hooks stay readable at thousands of steps).
    """

    def __init__(self, tokens, labels, batch_size: int, shuffle: bool, seed: int, epoch: Callable[[], int], repeats=1):
        self.tokens, self.labels = tokens, labels
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.n_batches = -(-len(labels) // batch_size)
        self.repeats = repeats if self.n_batches == 1 else 1
        self._order = torch.arange(len(labels))

    def __len__(self) -> int:
        return self.n_batches * self.repeats

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i >= len(self):
            raise IndexError(i)
        if i == 0 and self.shuffle and self.n_batches > 1:
            gen = torch.Generator().manual_seed(self.seed + self.epoch())
            self._order = torch.randperm(len(self.labels), generator=gen)
        i = i % self.n_batches
        idx = self._order[i * self.batch_size : (i + 1) * self.batch_size]
        return self.tokens[idx], self.labels[idx]


class ModularAdditionDataModule(L.LightningDataModule):
    """All pairs ``(a, b)`` mod ``p``: a seeded train split, the held-out pairs for validation.

    Args:
        p: the modulus (>= 2). Token ``p`` is ``=``.
        train_fraction: fraction of the p² pairs used for training, in (0, 1).
        seed: seed of the split (independent of the model's seed).
        batch_size: training batch size; ``None`` (default) means full-batch training.
        val_batch_size: validation batch size; ``None`` means one batch.
        steps_per_epoch: with full-batch training, how many steps make one epoch (default 100), so
            that validation and checkpoints can be scheduled in steps inside an epoch.
    """

    def __init__(
        self,
        p: int = 113,
        train_fraction: float = 0.3,
        seed: int = 0,
        batch_size: int | None = None,
        val_batch_size: int | None = None,
        steps_per_epoch: int = 100,
    ) -> None:
        super().__init__()
        if p < 2:
            raise ValueError(f"p must be >= 2, got p={p}")
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None (full batch), got {value}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.save_hyperparameters()
        self.p, self.train_fraction, self.seed = p, train_fraction, seed
        self.batch_size, self.val_batch_size, self.steps_per_epoch = batch_size, val_batch_size, steps_per_epoch
        self.tokens, self.labels = modular_addition_pairs(p)
        self.train_idx, self.val_idx = split_indices(p * p, train_fraction, seed)

    @property
    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[self.train_idx], self.labels[self.train_idx]

    @property
    def val_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[self.val_idx], self.labels[self.val_idx]

    def analysis_inputs(self, split: str = "train", size: int = 1000, seed: int = 0) -> torch.Tensor:
        """A fixed, seeded subset of ``size`` inputs of a split (all of it when smaller), for analyses."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        tokens = self.train_tensors[0] if split == "train" else self.val_tensors[0]
        if size >= len(tokens):
            return tokens
        return tokens[torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))[:size]]

    def _loader(self, tensors: tuple[torch.Tensor, torch.Tensor], batch_size: int | None, shuffle: bool, repeats=1):
        tokens, labels = tensors
        dataset = _Batches(tokens, labels, batch_size or len(labels), shuffle, self.seed, self._current_epoch, repeats)
        return DataLoader(dataset, batch_size=None, shuffle=False)

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_tensors, self.batch_size, shuffle=True, repeats=self.steps_per_epoch)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_tensors, self.val_batch_size, shuffle=False)
