"""`python -m lib_lightning llc-calibrate` end to end on a tiny modular-addition checkpoint."""

from __future__ import annotations

import csv
import inspect
import math
import re

import pytest
import yaml

from callbacks.llc import LLCCallback
from tests.callbacks.test_llc_callback import _fit
from lib_lightning.cli import main
from lib_lightning.llc_calibrate import DEFAULTS, callback_settings

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    trainer, _ = _fit(root, 40)  # the LLC callback tests' tiny modular-addition run (p = 23)
    path = root / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_sweep_writes_table_figure_and_a_pasteable_recommendation(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    epsilons = [1e-6, 1e-5, 1e-2]  # the last is far too large for this model (the smallest, ε·γ ≈ 0)
    result = main(["llc-calibrate", "--ckpt", str(ckpt), "--out", str(out), "--epsilons", *map(str, epsilons),
                   "--nbetas", "20.25", "47.3", "--num-chains", "2", "--num-burnin", "5", "--num-draws", "10",
                   "--mala-every", "2", "--batch-size", "64", "--threads", "1"])
    with open(out / "calibration.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["epsilon"]), float(r["nbeta"])) for r in rows] == [(e, b) for e in epsilons for b in (20.25, 47.3)]
    assert rows[-1]["healthy"] == "False" and rows[0]["healthy"] == "True"
    assert (out / "calibration.png").read_bytes()[:8] == PNG
    choice = result["recommendation"]
    assert choice.epsilon in epsilons[:2] and choice.nbeta == 20.25  # nearest the middle of the swept nβ (log)
    printed = capsys.readouterr().out
    assert "| epsilon | nbeta |" in printed and "Recommended: epsilon=" in printed
    pasted = yaml.safe_load((out / "recommendation.yaml").read_text())
    assert pasted[0]["class_path"] == "callbacks.llc.LLCCallback"
    assert pasted[0]["init_args"]["epsilon"] == pytest.approx(choice.epsilon, rel=1e-2)
    assert pasted[0]["init_args"]["nbeta"] == 20.25 and pasted[0]["init_args"]["gamma"] == 1000.0
    assert pasted[0]["init_args"]["num_chains"] == 2 and pasted[0]["init_args"]["sampler"] == "sgld"


def test_section_and_held_out_split(ckpt, tmp_path):
    result = main(["llc-calibrate", "--ckpt", str(ckpt), "--out", str(tmp_path), "--epsilons", "1e-5",
                   "--nbetas", "50", "--num-chains", "1", "--num-burnin", "2", "--num-draws", "4",
                   "--params", "model.unembed.*", "--split", "val", "--sampler", "rmsprop_sgld"])
    assert len(result["rows"]) == 1 and result["rows"][0]["sampler"] == "rmsprop_sgld"
    assert math.isfinite(result["rows"][0]["llc_mean"])


def test_settings_come_from_the_config_llc_callback():
    config = {"trainer": {"callbacks": [{"class_path": "callbacks.llc.LLCCallback",
                                         "init_args": {"epsilon": 2e-5, "num_chains": 3, "every_n_steps": 9}}]}}
    settings = callback_settings(config)
    assert settings["epsilon"] == 2e-5 and settings["num_chains"] == 3 and settings["gamma"] == 1000.0
    assert "every_n_steps" not in settings and callback_settings({})["epsilon"] == 5e-5


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--epsilons", "0"], r"--epsilons must all be > 0 and finite, got \[0.0\]"),
        (["--nbetas", "-1"], r"--nbetas must all be > 0 and finite, got \[-1.0\]"),
        (["--threads", "0"], r"--threads must be >= 1, got 0"),
    ],
)
def test_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit):  # before any file is read: x.ckpt does not exist
        main(["llc-calibrate", "--ckpt", "x.ckpt", "--out", "o", *argv])
    assert re.search(match, capsys.readouterr().err)


def test_defaults_are_the_callbacks():
    """The package may not import ``callbacks``, so it keeps a copy of the defaults: they must agree."""
    signature = inspect.signature(LLCCallback).parameters
    assert DEFAULTS == {k: signature[k].default for k in DEFAULTS}
