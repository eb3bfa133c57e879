"""CIFAR-10 through torchvision's reader, decoded once into an in-memory tensor cache.

``torchvision.datasets.CIFAR10`` reads (and, when asked, downloads) the ``cifar-10-batches-py`` folder;
its ``.data`` (N, 32, 32, 3) uint8 array is kept as a (N, 3, 32, 32) uint8 tensor and each batch is
normalised when it is served. That skips the per-image PIL/ToTensor path (7-9 s per 50,000 images on
one core, more than the MLP's own compute: benchmarks/README.md) and keeps the cache at a quarter of a
float32 copy (184 MB for the 60,000 images against 737 MB).

``write_fake_cifar10`` writes a small folder in the same pickle format with learnable class-dependent
images, so tests and smoke runs need neither the real data nor a network.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR10

from lib_lightning.data.modadd import _Batches

__all__ = [
    "CIFAR10DataModule",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CLASSES",
    "missing_data_message",
    "normalise",
    "write_fake_cifar10",
]

URL = CIFAR10.url
BASE_FOLDER = CIFAR10.base_folder  # "cifar-10-batches-py"
N_TRAIN = 50_000  # images in the five training files
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# per-channel mean and standard deviation of the 50,000 training images, pixel values scaled to [0, 1]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_SPLITS = ("train", "val", "test")


class _FakeCIFAR10(CIFAR10):
    """torchvision's CIFAR10 reader for folders written by ``write_fake_cifar10``.

    Only the MD5 checksums are removed (torchvision's ``check_integrity`` then checks that each file
    exists); reading is the parent's code. Real data always goes through ``CIFAR10`` itself.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def write_fake_cifar10(root: str | os.PathLike, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write a fake ``cifar-10-batches-py`` folder under ``root`` in the pickle format of the real one.

    Each class has its own colour and stripe orientation; an image is its class's colour, a random
    colour cast, stripes of random phase and Gaussian pixel noise. A classifier beats chance within a
    few dozen steps, while classes whose colours are close stay confusable.
    Files: ``data_batch_1`` .. ``data_batch_5`` (the ``n_train`` images split evenly), ``test_batch``,
    ``batches.meta``; each batch a dict with ``data`` (n, 3072) uint8 (red, green, blue planes,
    row-major) and ``labels``. Keys are Python 3 ``str``, which is how torchvision's reader
    (``pickle.load(..., encoding="latin1")``) sees the original Python 2 files.

    Args:
        root: folder to write into (created if needed).
        n_train, n_test: number of training and test images (``n_train >= 5``, ``n_test >= 1``).
        seed: seed of the images and labels.

    Returns:
        the path of the ``cifar-10-batches-py`` folder.
    """
    if n_train < 5 or n_test < 1:
        raise ValueError(f"need n_train >= 5 (one per data batch) and n_test >= 1, got {n_train} and {n_test}")
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(10, 3, 1, 1))  # one RGB colour per class
    angles = np.arange(10) * np.pi / 10  # one stripe orientation per class
    folder = Path(root) / BASE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in CIFAR10.train_list] + [name for name, _ in CIFAR10.test_list]
    sizes = [len(s) for s in np.array_split(np.arange(n_train), 5)] + [n_test]
    yy, xx = np.mgrid[0:32, 0:32]
    for name, n in zip(names, sizes):
        labels = rng.integers(0, 10, size=n)
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
        along = np.cos(angles[labels])[:, None, None] * xx + np.sin(angles[labels])[:, None, None] * yy  # (n, 32, 32)
        stripes = 35 * np.sin(2 * np.pi * along / 8 + phase)[:, None]  # (n, 1, 32, 32)
        jitter = rng.normal(0, 30, size=(n, 3, 1, 1))  # per-image colour cast, so colours of classes overlap
        images = colours[labels] + jitter + stripes + rng.normal(0, 40, size=(n, 3, 32, 32))
        data = np.clip(np.rint(images), 0, 255).astype(np.uint8).reshape(n, 3072)
        batch = {
            "batch_label": f"fake {name}",
            "labels": labels.tolist(),
            "data": data,
            "filenames": [f"fake_{name}_{i}.png" for i in range(n)],
        }
        _dump(batch, folder / name)
    _dump({"label_names": list(CLASSES), "num_cases_per_batch": sizes[0], "num_vis": 3072}, folder / "batches.meta")
    return folder


def _dump(obj: dict, path: Path) -> None:
    # write-then-rename, so a reader never sees half a file
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=4)  # protocol 2 would store the pixels as latin-1 text, 1.5x larger
    os.replace(tmp, path)


def missing_data_message(data_dir: str | os.PathLike, reason: str) -> str:
    """The one message for CIFAR-10 files that are missing or corrupted and could not be downloaded."""
    root = Path(data_dir).expanduser().resolve()
    return (
        f"CIFAR-10 not found (or corrupted: torchvision checks every file's MD5) in {root / BASE_FOLDER}, "
        f"and it could not be downloaded ({reason}).\n"
        f"To get it, download {URL} (163 MB) on a machine with internet and extract it into {root}:\n"
        f"    mkdir -p {root} && tar -xzf cifar-10-python.tar.gz -C {root}\n"
        f"so that {root / BASE_FOLDER} holds data_batch_1 .. data_batch_5, test_batch and batches.meta, "
        f"or point data_dir at a folder that already holds {BASE_FOLDER}.\n"
        "For a smoke run without the data, pass --data.init_args.fake true (generated images, not CIFAR-10)."
    )


class _NormalisedBatches(_Batches):
    """Whole pre-built batches of uint8 images, normalised to float32 as they are served."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = super().__getitem__(i)
        return normalise(images), labels


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(batch, 3, 32, 32)`` -> float32 ``(x / 255 - mean) / std`` per channel (ToTensor + Normalize)."""
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1) * 255
    return (images.float() - mean) / std


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10: a seeded train/validation split of the 50,000 training images, and the 10,000 test images.

    Files are read once by ``torchvision.datasets.CIFAR10`` into uint8 tensors; batches are normalised
    with the standard per-channel mean and standard deviation when served. The training order of epoch
    ``e`` is seeded by ``seed + e``, so a resumed run sees the same batches as a straight one.

    Args:
        data_dir: folder holding (or receiving) ``cifar-10-batches-py``.
        download: download the data into ``data_dir`` when it is missing (in ``prepare_data``).
        val_size: images of the training files held out for validation (seeded by ``seed``).
        seed: seed of the split and the shuffles (and of the fake images).
        batch_size, eval_batch_size: training and validation/test batch sizes.
        fake: use generated images in ``<data_dir>/fake/`` instead of CIFAR-10 (smoke runs, tests).
        fake_size: number of fake training-file images (the fake test set has a fifth as many).

    Raises:
        FileNotFoundError: in ``prepare_data``/``setup`` if the data is missing or corrupted and cannot
            be downloaded; the message says where to put it and how to get it.
    """

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        download: bool = True,
        val_size: int = 5000,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        fake: bool = False,
        fake_size: int = 10_000,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("val_size", val_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if fake and fake_size < 10:
            raise ValueError(f"fake_size must be >= 10, got {fake_size}")
        n_files = fake_size if fake else N_TRAIN
        if val_size >= n_files:
            raise ValueError(
                f"val_size={val_size} leaves no training images of the {n_files} in the training files"
                + (" (raise fake_size or lower val_size)" if fake else "")
            )
        self.save_hyperparameters()
        self.data_dir, self.download, self.val_size, self.seed = Path(data_dir), download, val_size, seed
        self.batch_size, self.eval_batch_size, self.fake, self.fake_size = batch_size, eval_batch_size, fake, fake_size
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> (uint8 images, labels)

    @property
    def root(self) -> Path:
        """The folder that holds ``cifar-10-batches-py`` (``<data_dir>/fake`` for fake data)."""
        return self.data_dir / "fake" if self.fake else self.data_dir

    def prepare_data(self) -> None:
        """Write the fake folder, or download CIFAR-10 if it is missing and ``download`` is on."""
        if self.fake:
            write_fake_cifar10(self.root, self.fake_size, max(1, self.fake_size // 5), self.seed)
        elif self.download:
            try:
                CIFAR10(self.root, train=False, download=True)  # downloads both splits, reads the small one
            except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad archive a RuntimeError
                raise FileNotFoundError(missing_data_message(self.data_dir, f"download failed: {err}")) from None

    def setup(self, stage: str) -> None:
        if self.fake:
            rank_zero_warn(
                f"CIFAR10DataModule(fake=True): FAKE data, {self.fake_size} generated images in "
                f"{(self.root / BASE_FOLDER).resolve()} (class colours and stripes), not CIFAR-10. Smoke runs only."
            )
        if stage in ("fit", "validate") and "train" not in self._tensors:
            images, labels = self._read(train=True)
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            train_idx, val_idx = perm[self.val_size :], perm[: self.val_size]
            self._tensors["train"] = images[train_idx], labels[train_idx]
            self._tensors["val"] = images[val_idx], labels[val_idx]
        if stage in ("test", "predict") and "test" not in self._tensors:
            self._tensors["test"] = self._read(train=False)

    def _read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one split with torchvision: uint8 images ``(n, 3, 32, 32)`` and int64 labels ``(n,)``."""
        reader = _FakeCIFAR10 if self.fake else CIFAR10
        try:
            dataset = reader(self.root, train=train, download=False)
        except RuntimeError as err:
            if self.fake:
                message = f"no fake CIFAR-10 in {self.root.resolve()}: call prepare_data() first"
                raise FileNotFoundError(message) from None
            reason = "download=False" if not self.download else f"{err}; was prepare_data() called?"
            raise FileNotFoundError(missing_data_message(self.data_dir, reason)) from None
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # (n, 3, 32, 32) from HWC
        return images, torch.tensor(dataset.targets, dtype=torch.long)

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached uint8 images ``(n, 3, 32, 32)`` and labels ``(n,)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if split not in self._tensors:
            self.setup("test" if split == "test" else "fit")
        return self._tensors[split]

    def analysis_tensors(self, n: int = 2000, split: str = "test", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed seeded subset of ``n`` images of a split, normalised: float32 ``(n, 3, 32, 32)``, labels ``(n,)``.

        The same arguments give the same images in every process and run (the LIB analysis set).
        """
        images, labels = self.tensors(split)
        if not 1 <= n <= len(labels):
            raise ValueError(f"n must be in [1, {len(labels)}] for split {split!r}, got {n}")
        idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return normalise(images[idx]), labels[idx]

    def analysis_inputs(self, split: str = "test", size: int = 2000, seed: int = 0) -> torch.Tensor:
        """The LIB callbacks' analysis set: the images of :meth:`analysis_tensors` (all of a smaller split)."""
        return self.analysis_tensors(min(size, len(self.tensors(split)[1])), split, seed)[0]

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        images, labels = self.tensors(split)
        dataset = _NormalisedBatches(images, labels, batch_size, shuffle, self.seed, self._current_epoch)
        return DataLoader(dataset, batch_size=None, shuffle=False)

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
