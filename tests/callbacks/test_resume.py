"""Resume between two scheduled steps: every callback with a schedule gives the series of a straight run.

The first run stops at step 12 (a checkpoint off the schedule, as a kill or a shorter ``max_steps`` would
leave it), the second resumes from it; neither ``at_start`` nor anything else may analyse at step 12.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.ablation import Ablation
from callbacks.lib_analysis import LIBAnalysis
from callbacks.llc import LLCCallback
from callbacks.progress_measures import ProgressMeasures
from lib_lightning.data.modadd import ModularAdditionDataModule
from lib_lightning.tasks.classifier import ModularAddition

SMALL = dict(p=23, d_model=32, n_heads=2, d_head=16, d_mlp=64, lr=1e-2)
LAYERS = ["model.hook_resid_pre", "model.hook_resid_mid", "model.hook_resid_post", "model.hook_logits"]
STOP, END = 12, 20  # the checkpoint's step is between the scheduled steps 10 and 15
QUIET = dict(size=32, kinds=["lib"], images=False, histograms=False, save=False)


class StopAt(Callback):
    """Ends training after ``step`` steps, as an interruption would (the trainer's max_steps is unchanged)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(root, callbacks, max_steps=END, ckpt_path=None, seed=0):
    L.seed_everything(seed)
    trainer = L.Trainer(
        max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, val_check_interval=5,
    )
    dm = ModularAdditionDataModule(p=23, train_fraction=0.5, steps_per_epoch=10)  # full batch: any resume is exact
    trainer.fit(ModularAddition(**SMALL), dm, ckpt_path=ckpt_path)


def _straight_and_resumed(tmp_path, make, first_max_steps=END):
    """Histories of a straight run and of a run stopped at STOP and resumed from its checkpoint."""
    straight = make()
    _fit(tmp_path / "straight", [straight])
    first = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "run", save_last=True, every_n_train_steps=1)
    _fit(tmp_path / "run", [first, StopAt(STOP), ckpt], max_steps=first_max_steps)
    resumed = make()
    _fit(tmp_path / "run", [resumed], ckpt_path=tmp_path / "run" / "last.ckpt", seed=1)
    return straight.history, resumed.history


def _assert_same_dict_series(straight, resumed):
    assert [e["step"] for e in resumed] == [e["step"] for e in straight]
    for a, b in zip(straight, resumed):
        assert a["metrics"].keys() == b["metrics"].keys()
        for key, value in a["metrics"].items():
            if "/time/" not in key:
                assert b["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (a["step"], key)


@pytest.mark.parametrize("first_max_steps", [END, STOP], ids=["interrupted", "shorter-max-steps"])
def test_lib_analysis_resumed_between_analyses(tmp_path, first_max_steps):
    make = partial(LIBAnalysis, LAYERS, every_n_steps=5, **QUIET)
    straight, resumed = _straight_and_resumed(tmp_path, make, first_max_steps)
    assert [e["step"] for e in straight] == [0, 5, 10, 15, 20]
    _assert_same_dict_series(straight, resumed)  # includes the evolution metrics at step 15


def test_lib_analysis_log_steps_resumed_between_analyses(tmp_path):
    make = partial(LIBAnalysis, LAYERS, log_steps=6, **QUIET)
    straight, resumed = _straight_and_resumed(tmp_path, make)
    assert STOP not in [e["step"] for e in straight]
    _assert_same_dict_series(straight, resumed)


def test_progress_measures_resumed_between_measurements(tmp_path):
    straight, resumed = _straight_and_resumed(tmp_path, lambda: ProgressMeasures(every_n_steps=5))
    assert [e["step"] for e in straight] == [0, 5, 10, 15, 20]
    _assert_same_dict_series(straight, resumed)


def test_ablation_resumed_between_analyses(tmp_path):
    make = partial(Ablation, LAYERS, every_n_steps=10, size=64, eval_size=64, edges=False, kinds=["lib"])
    straight, resumed = _straight_and_resumed(tmp_path, make)
    assert [e["step"] for e in straight] == [0, 10, 20]
    _assert_same_dict_series(straight, resumed)


@pytest.mark.parametrize("schedule", [dict(schedule="every", every_n_steps=5), dict(schedule="log", first_step=2,
                                                                                      num_points=5)])
def test_llc_resumed_between_estimates(tmp_path, schedule):
    make = partial(LLCCallback, num_chains=2, num_draws=6, num_burnin=2, batch_size=32, epsilon=1e-4, log_traces=False,
                   **schedule)
    straight, resumed = _straight_and_resumed(tmp_path, make)
    assert STOP not in [step for step, _, _ in straight] and len(straight) >= 3
    assert [step for step, _, _ in resumed] == [step for step, _, _ in straight]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight), rtol=1e-6, atol=1e-9)
