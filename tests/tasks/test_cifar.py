from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lib_lightning.cli import main
from lib_lightning.data.cifar10 import CIFAR10DataModule
from lib_lightning.models.cifar import CifarCNN, CifarMLP
from lib_lightning.tasks.cifar import CifarClassifier

pytestmark = pytest.mark.filterwarnings(r"ignore:CIFAR10DataModule\(fake=True\)")

CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.fixture(scope="module")
def fake_dm(tmp_path_factory) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(
        data_dir=str(tmp_path_factory.mktemp("data")), fake=True, fake_size=1500, val_size=300, eval_batch_size=300
    )
    dm.prepare_data()
    return dm


def _trainer(tmp_path, max_steps):
    return L.Trainer(
        max_steps=max_steps,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


@pytest.mark.parametrize("arch, kwargs", [("mlp", {"widths": (32, 32)}), ("cnn", {"channels": (8, 16, 16)})])
def test_trains_above_chance_on_fake_data(arch, kwargs, fake_dm, tmp_path):
    L.seed_everything(0)
    task = CifarClassifier(arch=arch, **kwargs)
    images, labels = fake_dm.analysis_tensors(n=300, split="val")
    with torch.no_grad():
        before = (task(images).argmax(-1) == labels).double().mean().item()
    trainer = _trainer(tmp_path, max_steps=24)
    trainer.fit(task, fake_dm)
    with torch.no_grad():
        after = (task(images).argmax(-1) == labels).double().mean().item()
    assert before < 0.25 and after > 0.3, (before, after)  # chance is 0.1
    (metrics,) = trainer.test(task, fake_dm, verbose=False)
    assert set(metrics) == {"test/loss", "test/acc"} and metrics["test/acc"] > 0.3


def test_builds_the_named_architecture_under_model():
    mlp = CifarClassifier(arch="mlp", widths=(20,))
    cnn = CifarClassifier(arch="cnn", channels=(4, 8))
    assert isinstance(mlp.model, CifarMLP) and mlp.model.widths == (20,)
    assert isinstance(cnn.model, CifarCNN) and cnn.model.channels == (4, 8)
    assert {"model.hook_in", "model.hook_hidden_0", "model.hook_logits"} <= dict(mlp.named_modules()).keys()
    assert {"model.hook_block_1", "model.hook_pooled"} <= dict(cnn.named_modules()).keys()
    assert mlp.hparams.arch == "mlp" and mlp.hparams.lr == 1e-3 and mlp.hparams.optimizer == "adam"
    assert isinstance(mlp.configure_optimizers(), torch.optim.Adam)


def test_bad_arch():
    with pytest.raises(ValueError, match=r"arch must be one of \('mlp', 'cnn', 'resnet18'\), got 'resnet'"):
        CifarClassifier(arch="resnet")


def test_mlp_config_is_the_papers_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(CONFIGS / "cifar10_mlp.yaml")], run=False)
    assert cli.model.model.widths == (100, 100) and cli.model.hparams.lr == 1e-3
    assert cli.model.hparams.optimizer == "adam" and cli.datamodule.batch_size == 64
    assert cli.trainer.max_epochs == 12 and not cli.datamodule.fake
    assert not list(tmp_path.iterdir())  # parsing the config downloads and writes nothing


@pytest.mark.parametrize("config", ["cifar10_mlp.yaml", "cifar10_cnn.yaml"])
def test_fake_smoke_run_from_the_cli(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / config), "--data.fake", "true", "--data.data_dir", "data"]
    args += ["--data.fake_size", "600", "--data.val_size", "100", "--trainer.max_epochs", "1"]
    args += ["--trainer.limit_train_batches", "4", "--trainer.log_every_n_steps", "1"]
    args += ["--trainer.enable_progress_bar", "false"]
    with pytest.warns(UserWarning, match="FAKE data"):
        cli = main(args)
    assert cli.trainer.global_step == 4 and "val/acc" in cli.trainer.callback_metrics
    name = config.removesuffix(".yaml")
    assert list(Path("checkpoints", name).rglob("last.ckpt"))
    assert list(Path("checkpoints", name).rglob("events.out.tfevents.*"))
    (hparams,) = Path("checkpoints", name).rglob("hparams.yaml")
    assert yaml.safe_load(hparams.read_text())["fake"] is True  # the run is labelled fake in its logs
    assert Path("data", "fake", "cifar-10-batches-py", "data_batch_1").exists()


def test_resnet18_config_smoke_run_on_fake_data(tmp_path, monkeypatch):
    """The shipped ResNet-18 config, its LIB callback shrunk to 8 analysed images, trains and analyses."""
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((CONFIGS / "cifar10_resnet18.yaml").read_text())
    (lib,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("LIBAnalysis")]
    assert lib["init_args"]["layers"][:2] == ["model.layer3", "model.layer4"]  # stage outputs, as positions
    lib["init_args"].update(size=8, batch_size=8)
    Path("small.yaml").write_text(yaml.safe_dump(config))
    args = ["fit", "--config", "small.yaml", "--data.fake", "true", "--data.data_dir", "data"]
    args += ["--data.fake_size", "200", "--data.val_size", "40", "--data.batch_size", "8", "--trainer.max_epochs", "1"]
    args += ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    with pytest.warns(UserWarning, match="FAKE data"):
        cli = main(args)
    assert cli.trainer.global_step == 2
    (analysis,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "LIBAnalysis"]
    assert analysis.analysed_steps == [0] and analysis.skipped == 0
    metrics = analysis.history[0]["metrics"]
    assert 0 < metrics["lib/layer4/dim_rel"] <= 512 and metrics["pca/layer3/dim_rel"] > 0
    assert list(Path("checkpoints", "cifar10_resnet18").rglob("lib/step_00000000.pt"))
