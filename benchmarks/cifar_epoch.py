"""What one CIFAR-10 training epoch costs on CPU: the tensor cache of CIFAR10DataModule vs ToTensor.

    .venv/bin/python benchmarks/cifar_epoch.py                 # fake 50,000-image folder in a temp dir
    .venv/bin/python benchmarks/cifar_epoch.py --data-dir data/cifar10 --real

Rows (median of ``--repeats`` epochs, ``--threads`` torch threads, batch 64, Adam):
  - data only: iterating the training loader, no model;
  - MLP epoch, plain loop: the paper's MLP trained over all 50,000 training-file images;
  - MLP epoch, Lightning: ``Trainer.fit`` of ``CifarClassifier`` on ``CIFAR10DataModule`` (45,000
    images after the 5,000-image validation split; validation off), timed from epoch start to end;
  - CNN epoch: the default CNN, ``--cnn-steps`` steps timed and scaled to 50,000 images.
Without ``--real`` the images are fake (``write_fake_cifar10``) but the files have the real format and
size, so reading and decoding cost what they cost on CIFAR-10.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import CIFAR10

from lib_lightning.data.cifar10 import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10DataModule,
    _FakeCIFAR10,
    _NormalisedBatches,
    write_fake_cifar10,
)
from lib_lightning.models.cifar import CifarCNN, CifarMLP
from lib_lightning.tasks.cifar import CifarClassifier

BATCH = 64


def tensor_cache_loader(root, reader) -> tuple[DataLoader, float]:
    """The data module's pipeline over all training-file images, and the one-off read time."""
    start = time.perf_counter()
    dataset = reader(root, train=True)
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # (50000, 3, 32, 32) uint8
    labels = torch.tensor(dataset.targets)
    read_s = time.perf_counter() - start
    epoch = itertools.count().__next__  # a new shuffle each epoch, as in training
    return DataLoader(_NormalisedBatches(images, labels, BATCH, True, 0, epoch), batch_size=None), read_s


def totensor_loader(root, reader) -> DataLoader:
    """torchvision's usual pipeline: PIL image -> ToTensor -> Normalize per item, default collation."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    return DataLoader(reader(root, train=True, transform=transform), batch_size=BATCH, shuffle=True)


def epoch_seconds(loader, model=None, max_steps=None) -> tuple[float, int]:
    """Seconds for one pass (training ``model`` with Adam if given) and the number of images seen."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3) if model is not None else None
    seen, start = 0, time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        if max_steps is not None and step == max_steps:
            break
        if model is not None:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seen += len(labels)
    return time.perf_counter() - start, seen


class _EpochTimer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def lightning_epoch(data_dir: str, fake: bool) -> float:
    dm = CIFAR10DataModule(data_dir=data_dir, download=False, fake=fake, fake_size=50_000)
    dm.prepare_data = lambda: None  # main() wrote the fake folder once; rewriting it is not part of an epoch
    timer = _EpochTimer()
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
    )
    trainer.fit(CifarClassifier(arch="mlp"), dm)
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py (default: a fake one in a temp dir)")
    parser.add_argument("--real", action="store_true", help="the folder holds real CIFAR-10 (checksums enforced)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cnn-steps", type=int, default=60, help="CNN steps to time (0: skip the CNN row)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory()
        args.data_dir = tmp.name
    fake = not args.real
    # the data module reads fake data from <data_dir>/fake: write it there, once, with the real sizes
    root = f"{args.data_dir}/fake" if fake else args.data_dir
    reader = _FakeCIFAR10 if fake else CIFAR10
    if fake:
        write_fake_cifar10(root, 50_000, 10_000, seed=0)

    cache, read_s = tensor_cache_loader(root, reader)
    totensor = totensor_loader(root, reader)
    rows = [("one-off read of the 50,000 training images (torchvision unpickling + uint8 tensor)", read_s, None)]

    def median(fn) -> float:
        return statistics.median(fn() for _ in range(args.repeats))

    rows.append(("data only, tensor cache", median(lambda: epoch_seconds(cache)[0]), 50_000))
    rows.append(("data only, ToTensor + Normalize per item", median(lambda: epoch_seconds(totensor)[0]), 50_000))
    rows.append(("MLP epoch, plain loop, tensor cache", median(lambda: epoch_seconds(cache, CifarMLP())[0]), 50_000))
    rows.append(("MLP epoch, plain loop, ToTensor", median(lambda: epoch_seconds(totensor, CifarMLP())[0]), 50_000))
    lightning_s = median(lambda: lightning_epoch(args.data_dir, fake))
    rows.append(("MLP epoch, Lightning + CIFAR10DataModule", lightning_s, 45_000))
    if args.cnn_steps:
        seconds, seen = epoch_seconds(cache, CifarCNN(), max_steps=args.cnn_steps)
        what = f"CNN epoch, plain loop, tensor cache (scaled from {args.cnn_steps} steps)"
        rows.append((what, seconds * 50_000 / seen, 50_000))

    kind = "real CIFAR-10" if args.real else "fake images in the real format and size"
    print(f"\n{kind}; torch threads {args.threads}; median of {args.repeats}; batch {BATCH}\n")
    print("| what | seconds | images |")
    print("|---|---:|---:|")
    for what, seconds, images in rows:
        print(f"| {what} | {seconds:.2f} | {images or ''} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
