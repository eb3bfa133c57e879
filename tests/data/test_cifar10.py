import pickle
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision import transforms

from lib_lightning.data import cifar10
from lib_lightning.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule, write_fake_cifar10

# the fake-data warning is asserted where a data module is set up for the first time (small_dm)
pytestmark = pytest.mark.filterwarnings(r"ignore:CIFAR10DataModule\(fake=True\)")

SMALL = dict(fake=True, fake_size=300, val_size=60, batch_size=32, eval_batch_size=25)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake_cifar")
    write_fake_cifar10(root, n_train=120, n_test=30, seed=0)
    return root


@pytest.fixture(scope="module")
def small_dm(tmp_path_factory) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(data_dir=str(tmp_path_factory.mktemp("dm")), **SMALL)
    dm.prepare_data()
    with pytest.warns(UserWarning, match="FAKE data"):
        dm.setup("fit")
    return dm


@pytest.fixture
def offline(monkeypatch):
    """No network: torchvision's download raises as it does offline; record that it was asked."""
    calls = []

    def unreachable(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", unreachable)
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)  # a guard, should the name above move
    return calls


def test_fake_folder_loads_through_torchvisions_reader(fake_root):
    for train, n in ((True, 120), (False, 30)):
        dataset = cifar10._FakeCIFAR10(fake_root, train=train)
        assert isinstance(dataset, torchvision.datasets.CIFAR10)
        assert dataset.data.shape == (n, 32, 32, 3) and dataset.data.dtype == np.uint8 and len(dataset.targets) == n
        assert dataset.classes == list(cifar10.CLASSES)
    # the reading code is torchvision's own: only the checksums differ
    assert cifar10._FakeCIFAR10.__init__ is torchvision.datasets.CIFAR10.__init__
    assert all(md5 is None for _, md5 in cifar10._FakeCIFAR10.train_list + cifar10._FakeCIFAR10.test_list)
    # and the data is what was pickled: CHW planes of 1024 values each
    with open(fake_root / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    dataset = cifar10._FakeCIFAR10(fake_root, train=True)
    assert len(raw["labels"]) == 24 and dataset.targets[24:48] == raw["labels"]
    assert dataset.data[24, 3, 7, 2] == raw["data"][0, 2 * 1024 + 3 * 32 + 7]


def test_datamodule_reads_through_torchvisions_reader(tmp_path, monkeypatch):
    readers = []
    original = torchvision.datasets.CIFAR10.__init__

    def spy(self, *args, **kwargs):
        readers.append(type(self))
        original(self, *args, **kwargs)

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "__init__", spy)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), **SMALL)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert readers == [cifar10._FakeCIFAR10] * 2 and issubclass(readers[0], torchvision.datasets.CIFAR10)


def test_stock_reader_keeps_the_checksum(fake_root):
    """The fake files exist but fail torchvision's MD5 check: the real class must refuse them."""
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        torchvision.datasets.CIFAR10(fake_root, train=False, download=False)


def test_fake_data_is_seeded_and_learnable_by_colour(tmp_path):
    a = write_fake_cifar10(tmp_path / "a", 50, 10, seed=3)
    b = write_fake_cifar10(tmp_path / "b", 50, 10, seed=3)
    c = write_fake_cifar10(tmp_path / "c", 50, 10, seed=4)
    assert (a / "test_batch").read_bytes() == (b / "test_batch").read_bytes() != (c / "test_batch").read_bytes()
    data = cifar10._FakeCIFAR10(tmp_path / "a", train=True)
    colours = torch.tensor(data.data, dtype=torch.float64).mean(dim=(1, 2))  # (50, 3)
    labels = torch.tensor(data.targets)
    # nearest class-mean colour, fitted on the same 50 images, is far above chance (0.1)
    absent = torch.full((3,), 1e9)  # a class with no image here must never be the nearest
    means = torch.stack([colours[labels == k].mean(0) if (labels == k).any() else absent for k in range(10)])
    assert (torch.cdist(colours, means).argmin(1) == labels).double().mean() > 0.5


def test_fake_writer_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="need n_train >= 5 .* got 4 and 1"):
        write_fake_cifar10(tmp_path, 4, 1)


def test_missing_data_offline_gives_one_clear_error(tmp_path, offline):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message, root = str(info.value), (tmp_path / "nowhere").resolve()
    assert offline == [torchvision.datasets.CIFAR10.url]
    assert f"in {root / 'cifar-10-batches-py'}" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert f"tar -xzf cifar-10-python.tar.gz -C {root}" in message
    assert "download failed: <urlopen error [Errno -2] Name or service not known>" in message
    assert "--data.init_args.fake true" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no urllib traceback
    with pytest.raises(FileNotFoundError, match="was prepare_data\\(\\) called"):
        dm.setup("fit")


def test_missing_data_without_download(tmp_path, offline):
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    dm.prepare_data()  # nothing to do
    with pytest.raises(FileNotFoundError, match=r"could not be downloaded \(download=False\)"):
        dm.setup("test")
    assert offline == []


def test_wrong_files_in_a_real_data_dir_fail_the_checksum(tmp_path, offline):
    """Fake-format files where real data belongs are rejected as corrupted, then re-download is tried."""
    write_fake_cifar10(tmp_path, 50, 10)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match="or corrupted: torchvision checks every file's MD5"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="download failed"):
        CIFAR10DataModule(data_dir=str(tmp_path)).prepare_data()
    assert offline == [torchvision.datasets.CIFAR10.url]


def test_fake_datamodule_records_that_it_is_fake(small_dm, tmp_path):
    assert small_dm.hparams.fake is True
    assert small_dm.root == Path(small_dm.hparams.data_dir) / "fake"
    assert (small_dm.root / "cifar-10-batches-py" / "test_batch").exists()
    assert not (Path(small_dm.hparams.data_dir) / "cifar-10-batches-py").exists()  # real location untouched


def test_split_sizes_disjoint_and_seeded(small_dm, tmp_path):
    (train_x, train_y), (val_x, val_y) = small_dm.tensors("train"), small_dm.tensors("val")
    assert train_x.shape == (240, 3, 32, 32) and train_x.dtype == torch.uint8 and val_x.shape == (60, 3, 32, 32)
    everything = cifar10._FakeCIFAR10(small_dm.root, train=True)
    all_x = torch.from_numpy(everything.data).permute(0, 3, 1, 2)
    rows = {x.numpy().tobytes() for x in all_x}
    train_rows, val_rows = {x.numpy().tobytes() for x in train_x}, {x.numpy().tobytes() for x in val_x}
    assert train_rows | val_rows == rows and not train_rows & val_rows
    other = CIFAR10DataModule(data_dir=str(small_dm.data_dir), **{**SMALL, "seed": 1})
    with pytest.warns(UserWarning, match="FAKE"):
        other.setup("fit")  # reads the same folder: same images, another split
    assert not torch.equal(other.tensors("val")[0], val_x)


def test_batches_are_normalised_like_torchvision(small_dm):
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    images, labels = next(iter(small_dm.val_dataloader()))
    raw, raw_labels = small_dm.tensors("val")
    assert images.shape == (25, 3, 32, 32) and images.dtype == torch.float32 and torch.equal(labels, raw_labels[:25])
    expected = torch.stack([to_tensor(img.permute(1, 2, 0).numpy()) for img in raw[:25]])
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)


def test_train_loader_covers_the_split_and_reshuffles_each_epoch(small_dm, monkeypatch):
    epoch = {"now": 0}
    monkeypatch.setattr(small_dm, "_current_epoch", lambda: epoch["now"])
    first = list(small_dm.train_dataloader())
    assert [len(y) for _, y in first] == [32] * 7 + [16]
    labels = torch.cat([y for _, y in first])
    assert sorted(labels.tolist()) == sorted(small_dm.tensors("train")[1].tolist())
    again = torch.cat([y for _, y in small_dm.train_dataloader()])
    epoch["now"] = 1
    second = torch.cat([y for _, y in small_dm.train_dataloader()])
    assert torch.equal(labels, again) and not torch.equal(labels, second)


def test_test_loader_and_analysis_subset(small_dm):
    batches = list(small_dm.test_dataloader())
    assert sum(len(y) for _, y in batches) == 60  # fake test set: a fifth of fake_size
    images, labels = small_dm.analysis_tensors(n=40, split="test", seed=0)
    again, _ = small_dm.analysis_tensors(n=40, split="test", seed=0)
    other, _ = small_dm.analysis_tensors(n=40, split="test", seed=1)
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.float32 and labels.shape == (40,)
    assert torch.equal(images, again) and not torch.equal(images, other)
    full = torch.cat([x for x, _ in batches])
    assert all((full == img).flatten(1).all(1).any() for img in images)  # drawn from the test set


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda dm: dm.analysis_tensors(n=61), r"n must be in \[1, 60\] for split 'test', got 61"),
        (
            lambda dm: dm.analysis_tensors(split="holdout"),
            r"split must be one of \('train', 'val', 'test'\), got 'holdout'",
        ),
    ],
)
def test_bad_analysis_arguments(small_dm, call, match):
    with pytest.raises(ValueError, match=match):
        call(small_dm)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"eval_batch_size": -1}, "eval_batch_size must be >= 1, got -1"),
        ({"val_size": 0}, "val_size must be >= 1, got 0"),
        ({"val_size": 50_000}, "val_size=50000 leaves no training images of the 50000"),
        ({"fake": True, "fake_size": 5}, "fake_size must be >= 10, got 5"),
        ({"fake": True, "fake_size": 100}, r"val_size=5000 leaves no training images of the 100 .*raise fake_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(**kwargs)


def test_construction_touches_no_files(tmp_path, offline):
    CIFAR10DataModule(data_dir=str(tmp_path / "later"))
    CIFAR10DataModule(data_dir=str(tmp_path / "later_fake"), fake=True)
    assert not list(tmp_path.iterdir()) and offline == []
