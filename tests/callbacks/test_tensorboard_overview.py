"""TensorBoard at a glance, read back with TensorBoard's own event reader: layout, HParams, key frequencies."""

from __future__ import annotations

import re

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from callbacks._tensorboard import callback_settings
from callbacks.lib_analysis import LIBAnalysis
from callbacks.llc import LLCCallback
from callbacks.progress_measures import ProgressMeasures
from lib_lightning.data.modadd import ModularAdditionDataModule
from lib_lightning.tasks.classifier import ModularAddition
from tests.callbacks.foreign import ForeignData, ForeignModule

MODADD_LAYERS = ["model.hook_resid_pre", "model.hook_resid_mid", "model.hook_resid_post", "model.hook_logits"]
SMALL = dict(p=23, d_model=32, n_heads=2, d_head=16, d_mlp=64, lr=1e-2)


def _fit(root, callbacks, module, data, max_steps=4, seed=0):
    L.seed_everything(seed)
    trainer = L.Trainer(
        max_steps=max_steps, default_root_dir=root, logger=TensorBoardLogger(root, name="run"), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, val_check_interval=2, log_every_n_steps=1,
    )
    trainer.fit(module, data)
    events = EventAccumulator(str(root / "run" / "version_0"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    return events


def _layout(events) -> dict[str, dict[str, list[str]]]:
    (event,) = events.Tensors("custom_scalars__config__")  # written once per run
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    return {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}


def _hparams(events) -> tuple[dict, list[str]]:
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    ).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    ).experiment
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return values, [m.name.tag for m in experiment.metric_infos]


def _matches(regexes: list[str], tags: list[str]) -> set[str]:
    """The tags a chart draws: TensorBoard applies each regex with re.match."""
    return {t for t in tags for r in regexes if re.match(r, t)}


def test_modadd_run_has_layout_hparams_and_key_frequency_text(tmp_path):
    callbacks = [
        ProgressMeasures(every_n_steps=2),
        LIBAnalysis(MODADD_LAYERS, every_n_steps=2, size=64, images=False, histograms=False, save=False),
        LLCCallback(schedule="every", every_n_steps=4, num_chains=2, num_draws=4, num_burnin=1, batch_size=32),
    ]
    events = _fit(tmp_path, callbacks, ModularAddition(**SMALL), ModularAdditionDataModule(p=23, train_fraction=0.5, steps_per_epoch=4))
    scalars = events.Tags()["scalars"]

    layout = _layout(events)
    assert list(layout)[0] == "overview"
    overview = layout["overview"]
    assert _matches(overview["accuracy (train / val)"], scalars) >= {"train/acc", "val/acc"}
    assert _matches(overview["modularity Q of the LIB interaction graph"], scalars) == {"graph/modularity"}
    assert len(_matches(overview["edges n99 ratio LIB / PCA, every section (below 1: LIB sparser)"], scalars)) == 3
    assert _matches(overview["LLC (mean over chains)"], scalars) == {"llc/mean"}
    assert _matches(overview["restricted / excluded loss"], scalars) == {"progress/restricted_loss", "progress/excluded_loss"}
    # LIB and PCA on one chart per node layer (the logits have no basis) and per section
    mid = layout["layer hook_resid_mid: lib vs pca"]
    assert _matches(mid["kept dimension dim_rel (Λ > 1e-3 × max)"], scalars) == {"lib/hook_resid_mid/dim_rel", "pca/hook_resid_mid/dim_rel"}
    assert "layer hook_logits: lib vs pca" not in layout
    section = layout["section hook_resid_post → hook_logits"]
    assert _matches(section["n99: edges holding 99 % of the weight"], scalars) == {
        "edges/hook_resid_post->hook_logits/lib_n99", "edges/hook_resid_post->hook_logits/pca_n99"
    }
    # every chart of the layout draws something in this run
    empty = [(c, t) for c, charts in layout.items() for t, regexes in charts.items() if not _matches(regexes, scalars)]
    assert not empty

    hparams, metrics = _hparams(events)
    assert hparams["LIBAnalysis/size"] == 64 and hparams["LIBAnalysis/kinds"] == "lib, pca"
    assert hparams["LIBAnalysis/every_n_steps"] == 2 and hparams["LIBAnalysis/rule"] == "gradient"
    assert hparams["LLCCallback/num_chains"] == 2 and hparams["ProgressMeasures/source"] == "embedding"
    assert hparams["p"] == 23 and hparams["lr"] == pytest.approx(1e-2)  # the module's, as Lightning logs them
    assert {"val/acc", "graph/modularity", "lib/hook_resid_mid/dim_rel", "llc/mean", "progress/restricted_loss"} <= set(metrics)
    assert set(metrics) <= set(scalars)  # every metric column has values in the same run folder

    text = events.Tensors("progress/key_frequencies/text_summary")
    assert [e.step for e in text] == [0, 2, 4]
    entry = text[-1].tensor_proto.string_val[0].decode()
    assert entry.startswith("key frequencies (embedding power >= 0.1 × the strongest): ")
    assert entry.split(": ")[1] == ", ".join(str(k) for k in callbacks[0].history[-1]["key_frequencies"])
    assert not any(tag.startswith("progress/key_frequency_") for tag in scalars)


def test_only_a_lib_callback_on_a_foreign_module(tmp_path):
    cb = LIBAnalysis(["encoder.0[in]", "encoder.1", "encoder.3", "head"], kinds=["lib"], every_n_steps=2, size=64,
                     batch_inputs="tests.callbacks.foreign:features_of", sparsity=False, images=False, histograms=False)
    events = _fit(tmp_path, [cb], ForeignModule(), ForeignData(), seed=3)
    layout = _layout(events)
    assert set(layout) == {"overview", "layer encoder.0[in]: lib", "layer encoder.1: lib", "layer encoder.3: lib"}
    assert set(layout["overview"]) == {"accuracy (train / val)", "loss (train / val)",
                                       "modularity Q of the LIB interaction graph", "LIB dimension dim_rel, every layer"}
    n99 = layout["layer encoder.0[in]: lib"]["n99: directions holding 99 % of ΣΛ"]  # '.' and '[' escaped
    assert _matches(n99, events.Tags()["scalars"]) == {"lib/encoder.0[in]/n99"}
    hparams, metrics = _hparams(events)
    assert hparams["LIBAnalysis/layers"] == "encoder.0[in], encoder.1, encoder.3, head"
    assert hparams["seed_everything"] == 3 and "p" not in hparams  # the module saved no hyperparameters
    assert hparams["LIBAnalysis/sparsity"] == False  # noqa: E712 (a bool hparam is stored as a number)
    # TensorBoard shows the first five metric columns until more are ticked: accuracy, modularity, LIB dimension
    assert metrics == ["val/acc", "graph/modularity", "lib/encoder.0[in]/dim_rel", "lib/encoder.1/dim_rel",
                       "lib/encoder.3/dim_rel", "val/loss"]


def test_callback_settings_reads_each_argument_where_the_callback_kept_it():
    cb = LIBAnalysis(MODADD_LAYERS, log_steps=7, size=50, rule="gauss-legendre", n_intervals=3, resolution=0.5,
                     forward="lib_lightning.core.lib.capture:default_forward", name="a", abs_threshold=1e-9,
                     dim_abs_threshold=1e-8, dim_rel_threshold=1e-2)
    settings = callback_settings(cb)
    assert (settings["abs_threshold"], settings["dim_abs_threshold"], settings["dim_rel_threshold"]) == (1e-9, 1e-8, 1e-2)
    assert settings["log_steps"] == 7 and "every_n_steps" not in settings
    assert settings["layers"] == MODADD_LAYERS and settings["size"] == 50
    assert (settings["rule"], settings["n_intervals"], settings["resolution"]) == ("gauss-legendre", 3, 0.5)
    assert "forward" not in settings and "threads" not in settings and "name" not in settings
    llc = callback_settings(LLCCallback(schedule="every", every_n_steps=5, epsilon=1e-4))
    assert (llc["schedule"], llc["every_n_steps"], llc["epsilon"]) == ("every", 5, 1e-4)
    assert callback_settings(ProgressMeasures(key_frequencies=[3, 1]))["key_frequencies"] == [3, 1]
    assert "key_frequencies" not in callback_settings(ProgressMeasures())


def test_only_an_llc_callback_writes_the_overview(tmp_path):
    llc = LLCCallback(schedule="every", every_n_steps=2, num_chains=2, num_draws=4, num_burnin=1, batch_size=32)
    events = _fit(tmp_path, [llc], ModularAddition(**SMALL), ModularAdditionDataModule(p=23, train_fraction=0.5, steps_per_epoch=4))
    layout = _layout(events)
    assert set(layout) == {"overview"}
    assert list(layout["overview"]) == ["accuracy (train / val)", "loss (train / val)", "LLC (mean over chains)"]
    assert _matches(layout["overview"]["LLC (mean over chains)"], events.Tags()["scalars"]) == {"llc/mean"}
    hparams, metrics = _hparams(events)
    assert hparams["LLCCallback/num_draws"] == 4 and hparams["p"] == 23
    assert metrics == ["val/acc", "llc/mean", "val/loss"]
