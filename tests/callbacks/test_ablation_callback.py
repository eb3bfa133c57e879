"""The ablation callback: schedule, logged thresholds equal a direct computation, trajectory untouched."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from callbacks.ablation import Ablation
from lib_lightning.core.interpret.edge_ablation import edge_ablation
from lib_lightning.core.lib import build_graphs
from lib_lightning.data.modadd import ModularAdditionDataModule
from lib_lightning.tasks.classifier import ModularAddition

SMALL = dict(p=23, d_model=32, n_heads=2, d_head=16, d_mlp=64, lr=1e-2)
LAYERS = ["model.hook_resid_pre", "model.hook_resid_mid", "model.hook_resid_post", "model.hook_logits"]


def _fit(root, callbacks, max_steps=10):
    L.seed_everything(0)
    task = ModularAddition(**SMALL)
    dm = ModularAdditionDataModule(p=23, train_fraction=0.5, steps_per_epoch=10)
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, val_check_interval=5)
    trainer.fit(task, dm)
    return task, dm, trainer


def test_schedule_metrics_and_files(tmp_path):
    cb = Ablation(LAYERS, every_n_steps=5, size=64, eval_size=100, node=False)
    task, dm, trainer = _fit(tmp_path, [cb])
    assert cb.analysed_steps == [0, 5, 10]
    last = cb.history[-1]["metrics"]
    tag = "ablation/hook_resid_mid->hook_resid_post"
    assert {f"{tag}/lib_edges_required", f"{tag}/pca_edges_required", "ablation/baseline_acc"} <= set(last)
    # the logged count equals the core function on the final model and the same data
    graphs = build_graphs(task, LAYERS, [cb.analysis_inputs(trainer, task)], kinds=("lib",))
    direct = edge_ablation(task, graphs["lib"], 1, cb.evaluation_data(trainer, task))
    assert last[f"{tag}/lib_edges_required"] == direct.n_required
    saved = json.loads((tmp_path / "ablation" / "step_00000010.json").read_text())
    assert saved["metrics"] == last and "edges/lib/hook_resid_mid->hook_resid_post" in saved["curves"]


def test_trajectory_untouched(tmp_path):
    with_cb, _, _ = _fit(tmp_path / "a", [Ablation(LAYERS, every_n_steps=4, size=32, eval_size=40, edges=False)], 8)
    without, _, _ = _fit(tmp_path / "b", [], 8)
    for (name, p), q in zip(with_cb.named_parameters(), without.parameters()):
        assert torch.equal(p, q), name


def test_bad_arguments():
    with pytest.raises(ValueError, match="node=True or edges=True"):
        Ablation(LAYERS, every_n_steps=5, node=False, edges=False)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        Ablation(LAYERS, every_n_steps=5, tolerance=-1)
    with pytest.raises(ValueError, match="eval_size must be >= 1"):
        Ablation(LAYERS, every_n_steps=5, eval_size=0)
    with pytest.raises(ValueError, match="give exactly one of"):
        Ablation(LAYERS)
