"""Faults around the analysis callbacks: a full disk costs no training, an oversized analysis set warns."""

from __future__ import annotations

import errno
import warnings

import lightning as L
import pytest
from lightning.pytorch.loggers.logger import Logger

import callbacks._lib_logging as lib_logging_module
from callbacks.ablation import Ablation
import callbacks.ablation as ablation_module
from callbacks.lib_analysis import LIBAnalysis
from lib_lightning.core.lib.files import atomic_write
from lib_lightning.data.modadd import ModularAdditionDataModule
from lib_lightning.tasks.classifier import ModularAddition
from tests.callbacks.foreign import ForeignData, ForeignModule

SMALL = dict(p=23, d_model=32, n_heads=2, d_head=16, d_mlp=64, lr=1e-2)
LAYERS = ["model.hook_resid_pre", "model.hook_resid_mid", "model.hook_resid_post", "model.hook_logits"]


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self):
        super().__init__()
        self.records = []

    name = property(lambda self: "memory")
    version = property(lambda self: 0)

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


def _full_disk(path, *args) -> None:
    """A writer that gets half way, then finds the disk full (through the real atomic writer)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    atomic_write(path, write)


def _fit(root, callbacks, logger=False, max_steps=10):
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=root, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                        enable_checkpointing=False, val_check_interval=5)
    trainer.fit(ModularAddition(**SMALL), ModularAdditionDataModule(p=23, train_fraction=0.5, steps_per_epoch=10))
    return trainer


def test_a_full_disk_skips_the_analysis_files_counts_them_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(lib_logging_module, "save_graphs", lambda graphs, path: _full_disk(path))
    logger = MemoryLogger()
    cb = LIBAnalysis(LAYERS, every_n_steps=5, size=64, images=False, histograms=False)
    with pytest.warns(UserWarning, match=r"could not write the LIB analysis of step 0 \(OSError: \[Errno 28\]") as caught:
        trainer = _fit(tmp_path, [cb], logger=logger)
    assert trainer.global_step == 10 and cb.analysed_steps == [0, 5, 10]
    assert len([w for w in caught if "could not write" in str(w.message)]) == 1  # reported once, then counted
    logged = [m["lib/save_errors"] for _, m in logger.records if "lib/save_errors" in m]
    assert logged == [1.0, 2.0, 3.0] and cb.state_dict()["save_errors"] == 3
    folder = tmp_path / "lib"
    assert sorted(p.name for p in folder.iterdir()) == []  # no temporary file, no half file


def test_a_full_disk_skips_the_ablation_curves(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation_module, "atomic_write_text", _full_disk)
    logger = MemoryLogger()
    cb = Ablation(LAYERS, every_n_steps=10, size=64, eval_size=64, edges=False, kinds=["lib"])
    with pytest.warns(UserWarning, match="Ablation: could not write the ablation curves of step 0"):
        trainer = _fit(tmp_path, [cb], logger=logger)
    assert trainer.global_step == 10 and cb.analysed_steps == [0, 10]
    assert [m["ablation/save_errors"] for _, m in logger.records if "ablation/save_errors" in m] == [1.0, 2.0]
    assert list((tmp_path / "ablation").iterdir()) == []


def test_an_analysis_set_larger_than_the_data_warns_once_with_both_numbers(tmp_path):
    cb = LIBAnalysis(["encoder.0[in]", "encoder.1", "encoder.3", "head"], every_n_steps=2, size=100_000, save=False,
                     images=False, histograms=False, batch_inputs="tests.callbacks.foreign:features_of")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.seed_everything(0)
        L.Trainer(max_steps=4, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, callbacks=[cb]).fit(ForeignModule(), ForeignData())
    messages = [str(w.message) for w in caught if "larger than" in str(w.message)]
    n = len(cb.analysis_inputs(None, None))
    assert cb.analysed_steps == [0, 2, 4] and n < 100_000
    assert messages == [f"LIBAnalysis: size=100000 is larger than the train split, which has {n} examples: "
                        f"the analysis uses all {n}"]


def test_the_datamodule_analysis_set_larger_than_its_split_warns_once(tmp_path):
    cb = LIBAnalysis(LAYERS, every_n_steps=5, size=1000, save=False, images=False, histograms=False)
    with pytest.warns(UserWarning, match=r"size=1000 is larger than the train split, which has 264 examples") as caught:
        _fit(tmp_path, [cb])
    assert len([w for w in caught if "larger than" in str(w.message)]) == 1 and cb.analysed_steps == [0, 5, 10]
