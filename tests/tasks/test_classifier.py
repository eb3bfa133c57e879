import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lib_lightning.data.modadd import ModularAdditionDataModule
from lib_lightning.tasks.classifier import Classifier, ModularAddition

SMALL = dict(p=23, d_model=32, n_heads=2, d_head=16, d_mlp=64)


class _Steps(Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)


def _trainer(tmp_path, max_steps, callbacks=(), **kwargs):
    return L.Trainer(
        max_steps=max_steps,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kwargs,
    )


def test_short_run_memorises_training_set(tmp_path):
    L.seed_everything(0)
    task = ModularAddition(**SMALL, lr=1e-2, warmup_steps=5)
    dm = ModularAdditionDataModule(p=23, train_fraction=0.5, steps_per_epoch=50)
    trainer = _trainer(tmp_path, 150, check_val_every_n_epoch=1)
    trainer.fit(task, dm)
    tokens, labels = dm.train_tensors
    with torch.no_grad():
        acc = (task(tokens).argmax(-1) == labels).float().mean().item()
    assert acc == 1.0
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.logged_metrics)


def test_resume_from_last_ckpt_continues_at_right_step_and_matches_straight_run(tmp_path):
    dm_kwargs = dict(p=23, train_fraction=0.5, steps_per_epoch=10)

    L.seed_everything(0)
    straight = ModularAddition(**SMALL, lr=1e-2)
    _trainer(tmp_path / "straight", 40).fit(straight, ModularAdditionDataModule(**dm_kwargs))

    L.seed_everything(0)
    first = ModularAddition(**SMALL, lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "run", save_last=True, every_n_epochs=1)
    _trainer(tmp_path / "run", 20, callbacks=[ckpt]).fit(first, ModularAdditionDataModule(**dm_kwargs))
    assert (tmp_path / "run" / "last.ckpt").exists()

    L.seed_everything(123)  # the resumed run must not depend on the fresh initialisation
    resumed = ModularAddition(**SMALL, lr=1e-2)
    steps = _Steps()
    trainer = _trainer(tmp_path / "run", 40, callbacks=[steps])
    trainer.fit(resumed, ModularAdditionDataModule(**dm_kwargs), ckpt_path=tmp_path / "run" / "last.ckpt")
    assert steps.steps[0] == 20 and steps.steps[-1] == 39 and trainer.global_step == 40
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "sgd"}, r"optimizer must be one of \['adam', 'adamw'\], got 'sgd'"),
        ({"log_every": "batch"}, r"log_every must be one of \('step', 'epoch'\), got 'batch'"),
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Classifier(num_classes=3, **kwargs)


def test_modulus_mismatch_between_model_and_data(tmp_path):
    task = ModularAddition(**{**SMALL, "p": 29})
    with pytest.raises(ValueError, match="model p=29 does not match data p=23"):
        _trainer(tmp_path, 1).fit(task, ModularAdditionDataModule(p=23, train_fraction=0.5))
