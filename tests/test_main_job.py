"""The README's main job, end to end (slow: a few minutes on 2 cores)."""

from pathlib import Path

import pytest

from lib_lightning.cli import main

CONFIG = Path(__file__).parents[1] / "configs" / "modadd.yaml"


@pytest.mark.slow
def test_main_job_groks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(CONFIG)])
    assert cli.trainer.callback_metrics["val/acc"] >= 0.99
    assert list(Path("checkpoints").rglob("events.out.tfevents.*"))
    assert list(Path("checkpoints").rglob("last.ckpt"))
