"""The progress-measures callback: schedule, values against a direct computation, resume state, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callbacks.progress_measures import ProgressMeasures
from lib_lightning.data.modadd import ModularAdditionDataModule, modular_addition_pairs
from lib_lightning.tasks.classifier import ModularAddition
from lib_lightning.tasks.modadd.fourier import embedding_frequency_power, key_frequencies
from lib_lightning.tasks.modadd.progress import progress_measures

SMALL = dict(p=23, d_model=32, n_heads=2, d_head=16, d_mlp=64, lr=1e-2)


def _fit(root, callbacks, max_steps=12, logger=False):
    L.seed_everything(0)
    task = ModularAddition(**SMALL)
    dm = ModularAdditionDataModule(p=23, train_fraction=0.5, steps_per_epoch=10)
    trainer = L.Trainer(
        max_steps=max_steps, default_root_dir=root, logger=logger, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, val_check_interval=5,
    )
    trainer.fit(task, dm)
    return task, dm, trainer


def test_schedule_values_and_training_untouched(tmp_path):
    cb = ProgressMeasures(every_n_steps=4, rel_threshold=0.3)
    task, dm, trainer = _fit(tmp_path, [cb], logger=CSVLogger(tmp_path))
    assert cb.measured_steps == [0, 4, 8, 12]
    assert task.training  # the model is back in training mode
    # the last entry equals a direct computation on the final model
    tokens, labels = modular_addition_pairs(23)
    with torch.no_grad():
        task.eval()
        logits = task(tokens).double()
    key = key_frequencies(embedding_frequency_power(task.model.embed.weight[:23]), 0.3)
    expected = progress_measures(logits, labels, 23, key, excluded_index=dm.train_idx)
    last = cb.history[-1]
    assert last["key_frequencies"] == key
    assert last["metrics"]["progress/restricted_loss"] == pytest.approx(expected.restricted_loss, rel=1e-6)
    assert last["metrics"]["progress/excluded_loss"] == pytest.approx(expected.excluded_loss, rel=1e-6)
    assert last["metrics"]["progress/n_key_frequencies"] == len(key)
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "progress/restricted_loss" in logged and "progress/n_key_frequencies" in logged
    assert "progress/key_frequency_" not in logged  # one text entry per step on TensorBoard, not a series each


def test_callback_does_not_change_the_trajectory(tmp_path):
    with_cb, _, _ = _fit(tmp_path / "a", [ProgressMeasures(every_n_steps=3, source="logits")], max_steps=8)
    without, _, _ = _fit(tmp_path / "b", [], max_steps=8)
    for (name, p), q in zip(with_cb.named_parameters(), without.parameters()):
        assert torch.equal(p, q), name


def test_fixed_frequencies_state_and_resume_guard(tmp_path):
    cb = ProgressMeasures(every_n_steps=5, key_frequencies=[1, 5])
    _fit(tmp_path, [cb], max_steps=10)
    assert all(entry["key_frequencies"] == [1, 5] for entry in cb.history)
    restored = ProgressMeasures(every_n_steps=5, key_frequencies=[1, 5])
    restored.load_state_dict(cb.state_dict())
    assert restored.measured_steps == [0, 5, 10]
    restored.load_state_dict({})  # an older checkpoint without this callback's state
    assert restored.measured_steps == []
    assert cb.state_key != ProgressMeasures(every_n_steps=5).state_key


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"source must be one of \('embedding', 'logits'\)"):
        ProgressMeasures(source="neurons")
    with pytest.raises(ValueError, match="rel_threshold must be in"):
        ProgressMeasures(rel_threshold=0)
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        ProgressMeasures(every_n_steps=0)
    with pytest.raises(ValueError, match=r"key_frequencies must be in \[1, 11\]"):
        _fit(tmp_path, [ProgressMeasures(key_frequencies=[12])], max_steps=1)
    with pytest.raises(KeyError, match="available modules"):
        _fit(tmp_path, [ProgressMeasures(embedding="model.embedding")], max_steps=1)
