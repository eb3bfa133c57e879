"""Errors of the CLI read at the end: the root cause is the last line; failed runs leave no folders."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
import yaml

from lib_lightning.cli import main
from lib_lightning.tasks.classifier import ModularAddition
from tests.callbacks.foreign import ForeignModule

MODADD = Path(__file__).parents[1] / "configs" / "modadd.yaml"


def _config(tmp_path, edit) -> Path:
    config = yaml.safe_load(MODADD.read_text())
    edit(config)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _lib(config) -> dict:
    (entry,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("LIBAnalysis")]
    return entry["init_args"]


BAD = {
    "train_fraction": (lambda c: c["data"]["init_args"].update(train_fraction=1.5),
                       ValueError, r"train_fraction must be in \(0, 1\), got 1.5"),
    "every_n_steps": (lambda c: _lib(c).update(every_n_steps=-5), ValueError, "every_n_steps must be >= 1, got -5"),
    "kinds": (lambda c: _lib(c).update(kinds=["foo"]), ValueError, r"unknown basis kind\(s\) \['foo'\]; valid choices"),
    "dtype": (lambda c: _lib(c).update(dtype="float16"), ValueError, "dtype must be one of .*got 'float16'"),
    "p": (lambda c: c["model"]["init_args"].update(p=1), ValueError, "p must be >= 2, got p=1"),
    "keep_freed_mb": (lambda c: c.update(keep_freed_mb=0), ValueError, r"keep_freed_mb must be an int in 1 \.\. 2047 \(MiB\), got 0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_value_is_the_last_line_of_the_error(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    edit, kind, match = BAD[case]
    with pytest.raises(kind, match=match) as caught:
        main(["--config", str(_config(tmp_path, edit))], run=False)
    lines = traceback.format_exception(caught.value)
    assert lines[-1].startswith(f"{kind.__name__}: ") and "Union" not in "".join(lines) and "Namespace" not in lines[-1]
    assert len("".join(lines).splitlines()) < 40


def test_the_modadd_task_itself_rejects_p_below_two():
    with pytest.raises(ValueError, match="p must be >= 2, got p=1"):
        ModularAddition(p=1)


def test_a_fit_that_fails_before_training_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()  # a folder that existed before stays

    def unknown_layer(config):
        _lib(config)["layers"][1] = "model.nope"
        config["trainer"].update(max_steps=1, logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                      "init_args": {"save_dir": "kept/logs", "name": "modadd"}})

    with pytest.raises(KeyError, match=r"unknown module name\(s\) \['model.nope'\]"):
        main(["fit", "--config", str(_config(tmp_path, unknown_layer))])
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_yaml_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: [1\nmodel: {\n")
    with pytest.raises(ValueError, match=r"config file .*broken.yaml is not valid YAML") as caught:
        main(["fit", "--config", str(broken)])
    assert str(broken) in traceback.format_exception(caught.value)[-1]  # the last line: where in which file
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, ckpt)
    (tmp_path / "run" / "config.yaml").write_text(broken.read_text())
    with pytest.raises(ValueError, match=r"config file .*config.yaml is not valid YAML"):
        main(["analyze", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out").exists()


class FailsInTraining(ForeignModule):
    """Raises a chained error from its first training step (the chain is the user's: it must survive)."""

    def training_step(self, batch, batch_idx):
        try:
            raise KeyError("inner")
        except KeyError as err:
            raise ValueError("outer: training failed") from err


def test_errors_raised_by_training_keep_their_own_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {"trainer": {"max_steps": 2, "logger": False, "enable_progress_bar": False, "enable_checkpointing": False},
              "model": {"class_path": "tests.test_cli_errors.FailsInTraining"},
              "data": {"class_path": "tests.callbacks.foreign.ForeignData"}}
    path = tmp_path / "fails.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="outer: training failed") as caught:
        main(["fit", "--config", str(path)])
    assert isinstance(caught.value.__cause__, KeyError)
