"""Every YAML in configs/ must parse and instantiate with LightningCLI (run=False)."""

from pathlib import Path

import pytest

from lib_lightning.cli import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert any(c.name == "modadd.yaml" for c in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c.name))
def test_config_parses(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative output folders land in the temporary folder
    cli = main(["--config", str(config)], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
