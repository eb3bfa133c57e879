"""Loading a checkpoint someone else made: no code of theirs runs; checkpoint and config must agree."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from lib_lightning.cli import main
from lib_lightning.loading import PROJECT_PACKAGES, Trust, UntrustedCodeError, load_task
from lib_lightning.tasks.classifier import ModularAddition

SMALL = dict(p=23, d_model=32, n_heads=2, d_head=16, d_mlp=64)
MODADD_DATA = "lib_lightning.data.modadd.ModularAdditionDataModule"


def _analyze(ckpt, out, *extra):
    return main(["analyze", "--ckpt", str(ckpt), "--out", str(out), "--no-ablation", "--no-progress", *extra])


def _checkpoint(path, task=None, **hparams):
    """A Lightning-style checkpoint: weights and the hyperparameters the class is built from."""
    task = task or ModularAddition(**SMALL)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": {**dict(task.hparams), **hparams}}, path)
    return path


class _Payload:
    """A classic pickle payload: unpickling it runs ``touch marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------- item 1: no code runs
def test_a_checkpoint_naming_a_function_runs_nothing(tmp_path):
    marker, out = tmp_path / "marker", tmp_path / "out"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "subprocess.getoutput", "cmd": f"touch {marker}"}},
               evil)
    with pytest.raises(UntrustedCodeError, match=r"'subprocess.getoutput', which is not trusted.*--trust-code subprocess"):
        _analyze(evil, out)
    assert not marker.exists() and not out.exists()


def test_a_config_beside_a_real_checkpoint_runs_nothing(tmp_path):
    marker, out = tmp_path / "marker", tmp_path / "out"
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    beside = tmp_path / "run" / "config.yaml"
    for data in ({"class_path": "subprocess.getoutput", "init_args": {"cmd": f"touch {marker}"}},
                 {"class_path": "lib_lightning.runtime.import_callable", "init_args": {"path": "os:getcwd"}}):
        beside.write_text(json.dumps({"data": data}))  # JSON is YAML
        with pytest.raises(UntrustedCodeError, match="found beside the checkpoint"):
            _analyze(ckpt, out)
    callback = {"class_path": "callbacks.lib_analysis.LIBAnalysis",
                "init_args": {"layers": ["model.hook_resid_pre", "model.hook_logits"], "every_n_steps": 1,
                              "forward": "subprocess:getoutput"}}
    beside.write_text(json.dumps({"data": {"class_path": MODADD_DATA, "init_args": {"p": 23}},
                                  "trainer": {"callbacks": [callback]}}))
    with pytest.raises(UntrustedCodeError, match="'subprocess:getoutput', an import path that is not trusted"):
        _analyze(ckpt, out)
    assert not marker.exists() and not out.exists()


def test_classes_must_be_lightning_subclasses_even_in_trusted_packages(tmp_path):
    ckpt = _checkpoint(tmp_path / "a.ckpt", _class_path="lib_lightning.models.transformer.ModAddTransformer")
    with pytest.raises(UntrustedCodeError, match="which is not a LightningModule subclass"):
        load_task(str(ckpt), {})


def test_trust_is_opt_in_by_prefix_or_by_a_config_the_user_names(tmp_path):
    from tests.callbacks.foreign import ForeignModule

    ckpt = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": ForeignModule().state_dict(),
                "hyper_parameters": {"_class_path": "tests.callbacks.foreign.ForeignModule", "hidden": 12}}, ckpt)
    with pytest.raises(UntrustedCodeError, match="--trust-code tests"):
        load_task(str(ckpt), {})
    task, _ = load_task(str(ckpt), {}, Trust(PROJECT_PACKAGES + ("tests",)))
    assert isinstance(task, ForeignModule)
    named = Trust().with_config({"model": {"class_path": "tests.callbacks.foreign.ForeignModule"}})
    assert named.allows("tests.callbacks.foreign.ForeignModule") and not named.allows("tests.callbacks.foreign.NaNAfter")
    assert not Trust(("lib",)).allows("lib_lightning.x.Y")  # a prefix is a whole package name


def test_benchmarks_read_user_checkpoints_without_unpickling_code(tmp_path):
    from benchmarks.lib_build import _model_and_data
    from benchmarks.llc import load_or_train

    marker = tmp_path / "marker"
    ckpt = tmp_path / "evil.ckpt"
    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": _Payload(marker)}, f)
    for load in (lambda: load_or_train(ckpt, 0), lambda: _model_and_data(4, str(ckpt))):
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            load()
    assert not marker.exists()


# ----------------------------------------------------------------------------- item 4: same model
def test_a_config_with_another_p_is_reported_as_such(tmp_path):
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    config = tmp_path / "p29.yaml"
    config.write_text(json.dumps({"data": {"class_path": MODADD_DATA, "init_args": {"p": 29}}}))
    with pytest.raises(ValueError, match=r"model p=23 \(checkpoint .*\) does not match data p=29 \(config .*p29.yaml"):
        _analyze(ckpt, tmp_path / "out", "--config", str(config))
    (tmp_path / "run" / "config.yaml").write_text(config.read_text())  # the same, found beside the checkpoint
    with pytest.raises(ValueError, match=r"model p=23 .* does not match data p=29 .*found beside the checkpoint"):
        _analyze(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_plain_state_dict_of_another_shape_names_the_tensor_and_both_shapes(tmp_path):
    weights = tmp_path / "model.pt"
    for state in (ModularAddition(**SMALL).state_dict(), ModularAddition(**SMALL).model.state_dict()):
        torch.save(state, weights)
        config = tmp_path / "p29.yaml"
        config.write_text(json.dumps({"model": {"class_path": "lib_lightning.tasks.classifier.ModularAddition",
                                                "init_args": {**SMALL, "p": 29}}}))
        with pytest.raises(ValueError, match=r"tensor shapes differ \((model\.)?embed\.weight: checkpoint \(24, 32\), "
                                             r"model \(30, 32\);"):
            _analyze(weights, tmp_path / "out", "--config", str(config))


@pytest.mark.parametrize("size", ["-5", "0", "1"])
def test_analyze_rejects_a_size_below_two(tmp_path, size, capsys):
    with pytest.raises(SystemExit):
        _analyze(tmp_path / "missing.ckpt", tmp_path / "out", "--size", size)
    assert f"--size must be an integer >= 2 or 'all' (the analysis needs two examples), got {size}" in capsys.readouterr().err
