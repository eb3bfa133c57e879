import pytest
import torch

from lib_lightning.data.modadd import ModularAdditionDataModule, modular_addition_pairs, split_indices


def test_pairs_tokens_and_labels():
    tokens, labels = modular_addition_pairs(7)
    assert tokens.shape == (49, 3) and labels.shape == (49,)
    assert torch.equal(tokens[:, 2], torch.full((49,), 7))
    assert torch.equal(labels, (tokens[:, 0] + tokens[:, 1]) % 7)
    # every (a, b) appears exactly once
    assert len({(int(a), int(b)) for a, b, _ in tokens}) == 49


def test_split_sizes_disjoint_and_deterministic():
    train, val = split_indices(113 * 113, 0.3, seed=0)
    assert len(train) == round(0.3 * 113 * 113) and len(train) + len(val) == 113 * 113
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    again, _ = split_indices(113 * 113, 0.3, seed=0)
    other, _ = split_indices(113 * 113, 0.3, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_datamodule_full_batch_and_steps_per_epoch():
    dm = ModularAdditionDataModule(p=11, train_fraction=0.5, steps_per_epoch=3)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    tokens, labels = batches[0]
    assert tokens.shape == (round(0.5 * 121), 3) and torch.equal(labels, (tokens[:, 0] + tokens[:, 1]) % 11)
    (val_tokens, val_labels), = list(dm.val_dataloader())
    assert len(val_labels) == 121 - len(labels)
    seen = {tuple(t.tolist()) for t in torch.cat([tokens, val_tokens])}
    assert len(seen) == 121


def test_datamodule_minibatches_cover_train_set_each_epoch():
    dm = ModularAdditionDataModule(p=11, train_fraction=0.5, batch_size=16)
    batches = list(dm.train_dataloader())
    assert [len(b[1]) for b in batches] == [16, 16, 16, 12]
    tokens = torch.cat([b[0] for b in batches])
    assert sorted(map(tuple, tokens.tolist())) == sorted(map(tuple, dm.train_tensors[0].tolist()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p": 1}, "p must be >= 2, got p=1"),
        ({"train_fraction": 0.0}, r"train_fraction must be in \(0, 1\), got 0.0"),
        ({"train_fraction": 1.5}, r"train_fraction must be in \(0, 1\), got 1.5"),
        ({"p": 3, "train_fraction": 0.01}, "leaves an empty train set"),
        ({"p": 3, "train_fraction": 0.99}, "leaves an empty validation set"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModularAdditionDataModule(**kwargs)
