"""The LIB callback: any LightningModule, same trajectory, resume, DDP, logging, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from callbacks.lib_analysis import LIBAnalysis
from lib_lightning.cli import main
from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.graph import load_graphs
from lib_lightning.data.modadd import ModularAdditionDataModule
from lib_lightning.tasks.classifier import ModularAddition
from tests.callbacks.foreign import ForeignData, ForeignModule, NaNAfter

FOREIGN_LAYERS = ["encoder.0[in]", "encoder.1", "encoder.3", "head"]
MODADD_LAYERS = ["model.hook_resid_pre", "model.hook_resid_mid", "model.hook_resid_post", "model.hook_logits"]
SMALL = dict(p=23, d_model=32, n_heads=2, d_head=16, d_mlp=64, lr=1e-2)


def _trainer(root, max_steps, callbacks, logger=False, **kwargs):
    return L.Trainer(
        max_steps=max_steps, default_root_dir=root, logger=logger, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, **kwargs,
    )


def _foreign_callback(**kwargs):
    return LIBAnalysis(FOREIGN_LAYERS, every_n_steps=4, size=96, batch_inputs="tests.callbacks.foreign:features_of", **kwargs)


def test_foreign_module_from_python(tmp_path):
    L.seed_everything(0)
    cb = _foreign_callback(relu_layers=["encoder.1"])
    _trainer(tmp_path, 12, [cb], logger=TensorBoardLogger(tmp_path)).fit(ForeignModule(), ForeignData())
    assert cb.analysed_steps == [0, 4, 8, 12]
    last = cb.history[-1]["metrics"]
    assert {"lib/encoder.1/dim_abs", "pca/encoder.1/dim_abs", "edges/encoder.1->encoder.3/lib_n99", "graph/modularity",
            "lib/encoder.1/subspace_overlap", "relu/encoder.1/n_dead"} <= set(last)
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
    files = sorted(p.name for p in (tmp_path / "lightning_logs" / "version_0" / "lib").iterdir())
    assert files == [f"step_{s:08d}.{e}" for s in (0, 4, 8, 12) for e in ("json", "pt")]
    graphs = load_graphs(tmp_path / "lightning_logs" / "version_0" / "lib" / "step_00000012.pt")
    assert graphs["lib"].layer_names == FOREIGN_LAYERS and graphs["lib"].dims[-1] == 3


def test_foreign_module_from_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {
        "trainer": {
            "max_steps": 8, "logger": False, "enable_progress_bar": False, "num_sanity_val_steps": 0,
            "callbacks": [{
                "class_path": "callbacks.lib_analysis.LIBAnalysis",
                "init_args": {"layers": FOREIGN_LAYERS, "log_steps": 3, "size": 64,
                              "batch_inputs": "tests.callbacks.foreign:features_of", "kinds": ["lib", "pca", "neuron"]},
            }],
        },
        "model": {"class_path": "tests.callbacks.foreign.ForeignModule"},
        "data": {"class_path": "tests.callbacks.foreign.ForeignData"},
    }
    path = tmp_path / "foreign.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    cli = main(["fit", "--config", str(path)])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, LIBAnalysis)]
    assert cb.analysed_steps == [0, 1, 3, 8]  # log-spaced over 8 steps, plus the start
    assert "neuron/encoder.1/dim_abs" in cb.history[-1]["metrics"]


def _modadd_run(root, max_steps, callbacks, ckpt_path=None, seed=0):
    L.seed_everything(seed)
    task = ModularAddition(**SMALL)
    trainer = _trainer(root, max_steps, callbacks, val_check_interval=5)
    trainer.fit(task, ModularAdditionDataModule(p=23, train_fraction=0.5, steps_per_epoch=10), ckpt_path=ckpt_path)
    return task, trainer


def test_training_follows_the_same_trajectory_with_and_without_the_callback(tmp_path):
    plain, _ = _modadd_run(tmp_path / "a", 20, [])
    cb = LIBAnalysis(MODADD_LAYERS, every_n_steps=5, size=100, relu_layers=["model.hook_mlp_hidden"])
    analysed, _ = _modadd_run(tmp_path / "b", 20, [cb])
    assert cb.analysed_steps == [0, 5, 10, 15, 20]
    for (name, a), b in zip(plain.state_dict().items(), analysed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_gives_the_same_series_of_analyses_as_a_straight_run(tmp_path):
    straight = LIBAnalysis(MODADD_LAYERS, every_n_steps=5, size=100)
    _modadd_run(tmp_path / "straight", 20, [straight])

    first = LIBAnalysis(MODADD_LAYERS, every_n_steps=5, size=100)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "run", save_last=True, every_n_epochs=1)
    _modadd_run(tmp_path / "run", 10, [first, ckpt])
    resumed = LIBAnalysis(MODADD_LAYERS, every_n_steps=5, size=100)
    _modadd_run(tmp_path / "run", 20, [resumed], ckpt_path=tmp_path / "run" / "last.ckpt", seed=1)

    assert resumed.analysed_steps == straight.analysed_steps == [0, 5, 10, 15, 20]
    for a, b in zip(straight.history, resumed.history):
        assert a["metrics"].keys() == b["metrics"].keys()
        for key, value in a["metrics"].items():
            if not key.startswith("lib/time/"):
                assert b["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (a["step"], key)


def test_two_instances_keep_separate_state_in_a_checkpoint(tmp_path):
    a = LIBAnalysis(MODADD_LAYERS, every_n_steps=5, size=100)
    b = LIBAnalysis(MODADD_LAYERS[1:], every_n_steps=5, size=100)
    assert a.state_key != b.state_key
    assert LIBAnalysis(MODADD_LAYERS, every_n_steps=5, size=100, name="x").state_key != a.state_key


def test_nan_activations_skip_the_analysis_and_training_goes_on(tmp_path):
    L.seed_everything(0)
    model = NaNAfter()
    cb = _foreign_callback()

    class Poison(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            pl_module.poison = trainer.global_step >= 6

    with pytest.warns(UserWarning, match="LIB analysis at step 8 skipped: NaN or Inf"):
        trainer = _trainer(tmp_path, 12, [Poison(), cb])
        trainer.fit(model, ForeignData())
    assert trainer.global_step == 12
    assert cb.analysed_steps == [0, 4] and cb.skipped == 2


def test_a_failing_metric_is_counted_and_skipped_and_the_others_are_logged(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("community detection broke")

    monkeypatch.setattr("lib_lightning.core.metrics.summary.find_communities", broken)
    L.seed_everything(0)
    cb = _foreign_callback()
    with pytest.warns(UserWarning, match=r"step 4: 1 metric\(s\) failed and were skipped \(graph/modularity: RuntimeError"):
        trainer = _trainer(tmp_path, 8, [cb])
        trainer.fit(ForeignModule(), ForeignData())
    assert trainer.global_step == 8 and cb.analysed_steps == [0, 4, 8]
    last = cb.history[-1]["metrics"]
    assert "graph/modularity" not in last
    assert {"lib/encoder.1/dim_abs", "edges/encoder.1->encoder.3/lib_n99", "lib/encoder.1/subspace_overlap"} <= set(last)
    assert last["lib/metric_errors"] == 3.0 and cb.state_dict()["metric_errors"] == 3


def test_logger_without_images_falls_back_to_scalars_with_one_warning(tmp_path):
    L.seed_everything(0)
    cb = _foreign_callback()
    with pytest.warns(UserWarning, match="no logger can take images") as record:
        _trainer(tmp_path, 8, [cb], logger=CSVLogger(tmp_path)).fit(ForeignModule(), ForeignData())
    assert sum("no logger can take images" in str(w.message) for w in record) == 1
    header = (Path(tmp_path) / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "graph/modularity" in header


def test_tensorboard_gets_scalars_histograms_images_and_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    _trainer(tmp_path, 4, [_foreign_callback()], logger=TensorBoardLogger(tmp_path)).fit(ForeignModule(), ForeignData())
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert "lib/encoder.1/effective_rank" in tags["scalars"] and "graph/modularity" in tags["scalars"]
    assert "lib/encoder.1/log10_lambda" in tags["histograms"]
    assert {"lib/spectra", "graph/interaction"} <= set(tags["images"])
    assert "lib/summary/text_summary" in tags["tensors"]
    (image,) = [e for e in events.Images("lib/spectra") if e.step == 0]
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > image.height > 0


def test_two_process_ddp_gives_the_same_graphs_as_one_process(tmp_path):
    """Two gloo processes, each with its own shard (rank::2), sums reduced by the strategy.

    The one-process reference sees the same two shards as two batches and runs on one thread like each
    worker, so that every float64 sum is added in the same order (a + b): different summation orders
    alone (sharding, or matmul blocking under another thread count) move Lambdas of directions with tiny
    variance by ~1e-8 relative (the whitening divides by those variances).
    """
    L.seed_everything(0)
    model = ModularAddition(**SMALL)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    data = ModularAdditionDataModule(p=23, train_fraction=0.5, steps_per_epoch=10)
    cb = LIBAnalysis(MODADD_LAYERS, every_n_steps=5, size=101)
    trainer = L.Trainer(
        max_steps=1, default_root_dir=tmp_path, logger=TensorBoardLogger(tmp_path), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[cb], accelerator="cpu",
        devices=2, strategy="ddp_spawn", limit_val_batches=0,
    )
    trainer.fit(model, data)
    two = load_graphs(tmp_path / "lightning_logs" / "version_0" / "lib" / "step_00000000.pt")

    reference = ModularAddition(**SMALL)
    reference.load_state_dict(initial)
    x = data.analysis_inputs("train", 101, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP worker (Lightning gives each cpu_count // processes): same matmul order
    try:
        one = build_graphs(reference, MODADD_LAYERS, [x[0::2], x[1::2]], kinds=("lib", "pca"), chunk_size=256)
    finally:
        torch.set_num_threads(threads)
    for kind in ("lib", "pca"):
        for a, b in zip(one[kind].layers, two[kind].layers):
            torch.testing.assert_close(a.lambdas, b.lambdas, rtol=1e-10, atol=1e-14)
        for a, b in zip(one[kind].edges, two[kind].edges):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert two["lib"].n_examples == 101


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps must be >= 1, got 0"),
        ({"log_steps": -3}, "log_steps must be >= 1, got -3"),
        ({}, "give exactly one of every_n_steps, every_n_epochs, log_steps; got none"),
        ({"every_n_steps": 5, "every_n_epochs": 1}, "give exactly one of"),
        ({"every_n_steps": 5, "kinds": ["lib", "ica"]}, r"unknown basis kind\(s\) \['ica'\]"),
        ({"every_n_steps": 5, "size": 1}, "size must be >= 2"),
        ({"every_n_steps": 5, "split": "holdout"}, r"split must be one of \('train', 'val', 'test'\), got 'holdout'"),
        ({"every_n_steps": 5, "dtype": "float16"}, r"dtype must be one of \('float64', 'float32'\)"),
        ({"every_n_steps": 5, "rule": "simpson"}, "unknown integration rule 'simpson'"),
        ({"every_n_steps": 5, "forward": "no_colon"}, "expected an import path"),
        ({"every_n_steps": 5, "position_sources": 0}, "position_sources must be None or >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LIBAnalysis(MODADD_LAYERS, **kwargs)


def test_unknown_module_names_are_listed_at_setup(tmp_path):
    cb = LIBAnalysis(["encoder.0[in]", "encoder.9", "head"], every_n_steps=2, size=10)
    with pytest.raises(KeyError, match=r"unknown module name\(s\) \['encoder.9'\]; available modules: 'encoder'"):
        _trainer(tmp_path, 2, [cb]).fit(ForeignModule(), ForeignData())


def test_too_small_analysis_set(tmp_path):
    cb = LIBAnalysis(FOREIGN_LAYERS, every_n_steps=2, size=10, batch_inputs="tests.callbacks.foreign:features_of")
    with pytest.raises(ValueError, match="the analysis set has 1 example"):
        _trainer(tmp_path, 2, [cb]).fit(ForeignModule(), ForeignData(n=1, batch_size=1))


def test_dataloaders_given_to_fit_directly(tmp_path):
    L.seed_everything(0)
    data = ForeignData()
    cb = _foreign_callback()
    _trainer(tmp_path, 4, [cb]).fit(ForeignModule(), train_dataloaders=data.train_dataloader())
    assert cb.analysed_steps == [0, 4] and cb.history[0]["metrics"]["lib/encoder.1/dim_abs"] > 0
