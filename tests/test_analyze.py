"""`python -m lib_lightning analyze` end to end on a tiny modular-addition checkpoint."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.lib_analysis import LIBAnalysis
from callbacks.progress_measures import ProgressMeasures
from lib_lightning.cli import main
from lib_lightning.core.lib.graph import load_graphs
from lib_lightning.data.modadd import ModularAdditionDataModule
from lib_lightning.tasks.classifier import ModularAddition

SMALL = dict(p=23, d_model=32, n_heads=2, d_head=16, d_mlp=64, lr=1e-2)
LAYERS = ["model.hook_resid_pre", "model.hook_resid_mid", "model.hook_resid_post", "model.hook_logits"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    L.seed_everything(0)
    task = ModularAddition(**SMALL)
    dm = ModularAdditionDataModule(p=23, train_fraction=0.5, steps_per_epoch=10)
    logger = TensorBoardLogger(root, name="tiny")
    callbacks = [
        ModelCheckpoint(dirpath=root / "ckpt", save_last=True),
        ProgressMeasures(every_n_steps=10),
        LIBAnalysis(LAYERS, every_n_steps=15, size=64, images=False, histograms=False),
    ]
    trainer = L.Trainer(max_steps=30, default_root_dir=root, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, val_check_interval=10)
    trainer.fit(task, dm)
    return root, task, trainer.log_dir


def _png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_analyze_end_to_end(run, tmp_path):
    root, task, log_dir = run
    out = tmp_path / "out"
    # no config: the main job's settings, whose size (500) is more than the 264 training pairs of p = 23
    with pytest.warns(UserWarning, match="size=500 is larger than the train split, which has 264 examples"):
        result = main(["analyze", "--ckpt", str(root / "ckpt" / "last.ckpt"), "--out", str(out), "--threads", "1",
                       "--no-progress", "--run", log_dir])
    for name in ("spectra.png", "graph.png", "node_ablation.png", "edge_ablation.png", "timeline.png"):
        assert _png(out / name), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result, default=lambda x: x.tolist()))
    assert metrics["step"] == 30 and metrics["settings"]["size"] == 264  # the whole training half of 23² pairs
    sections = ["hook_resid_pre->hook_resid_mid", "hook_resid_mid->hook_resid_post", "hook_resid_post->hook_logits"]
    assert list(metrics["edges_required"]) == sections
    for kind in ("lib", "pca"):
        for layer, curve in metrics["node_ablation"][kind].items():
            # all features kept: the identity, so the unablated model exactly
            assert curve["accuracy"][-1] == curve["baseline_accuracy"], layer
            assert curve["features_required"] is not None
        for section, r in metrics["edge_ablation"][kind].items():
            assert 0 <= r["n_required"] <= r["n_edges"], section
            assert r["n_required"] in r["ks"]
    assert "graph/modularity" in metrics["metrics"]
    graphs = load_graphs(out / "graphs.pt")
    assert graphs["lib"].layer_names == LAYERS
    fourier = json.loads((out / "fourier.json").read_text())
    assert fourier["p"] == 23 and fourier["key_frequencies"]["embedding"]
    assert all(1 <= k <= 11 for k in fourier["key_frequencies"]["embedding"])
    assert set(fourier["features"]) == {"hook_resid_pre", "hook_resid_mid", "hook_resid_post"}
    for c in fourier["communities"]:
        assert 0 < c["purity"] <= 1 + 1e-12 and 1 <= c["frequency"] <= 11
    assert metrics["fourier"]["progress"]["restricted_loss"] > 0


def test_analyze_plain_state_dict_with_config(run, tmp_path):
    root, task, _ = run
    weights = tmp_path / "model.pt"
    torch.save(task.model.state_dict(), weights)  # the bare transformer's weights
    config = {
        "model": {"class_path": "lib_lightning.tasks.classifier.ModularAddition", "init_args": SMALL},
        "data": {"class_path": "lib_lightning.data.modadd.ModularAdditionDataModule",
                 "init_args": {"p": 23, "train_fraction": 0.5}},
        "trainer": {"callbacks": [{"class_path": "callbacks.lib_analysis.LIBAnalysis",
                                   "init_args": {"layers": LAYERS[1:], "every_n_steps": 5, "size": 100}}]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    out = tmp_path / "out"
    result = main(["analyze", "--ckpt", str(weights), "--config", str(path), "--out", str(out), "--no-ablation",
                   "--no-progress", "--threads", "1"])
    assert result["settings"]["size"] == 100 and result["settings"]["layers"] == LAYERS[1:]
    assert "node_ablation" not in result and _png(out / "graph.png") and _png(out / "spectra.png")
    assert not (out / "node_ablation.png").exists()


def test_analyze_bad_input(run, tmp_path):
    root, task, _ = run
    weights = tmp_path / "model.pt"
    torch.save(task.state_dict(), weights)
    with pytest.raises(ValueError, match="plain state dict: give --config"):
        main(["analyze", "--ckpt", str(weights), "--out", str(tmp_path / "out"), "--no-progress"])
    with pytest.raises(SystemExit):
        main(["analyze", "--ckpt", str(weights), "--out", str(tmp_path / "out"), "--size", "many"])


@pytest.mark.filterwarnings(r"ignore:CIFAR10DataModule\(fake=True\)", "ignore:.*FAKE data.*")
def test_analyze_runs_on_a_shipped_cifar_config(tmp_path, monkeypatch):
    """The CIFAR-10 MLP config's own checkpoint and saved config.yaml, on generated images."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(Path(__file__).parents[1] / "configs" / "cifar10_mlp.yaml"), "--data.fake", "true",
            "--data.data_dir", "data", "--data.fake_size", "600", "--data.val_size", "100", "--trainer.max_steps", "8",
            "--trainer.enable_progress_bar", "false"]
    main(args)
    (ckpt,) = Path("checkpoints").rglob("last.ckpt")
    result = main(["analyze", "--ckpt", str(ckpt), "--out", "out", "--no-progress", "--threads", "1", "--size", "64",
                   "--no-edge-ablation"])
    assert result["config"].endswith("config.yaml") and result["settings"]["split"] == "test"
    assert list(result["node_ablation"]["lib"]) == ["hook_hidden_0", "hook_hidden_1"]
    assert "fourier" not in result and not Path("out", "fourier.json").exists()
    assert _png(Path("out", "node_ablation.png")) and _png(Path("out", "spectra.png"))
