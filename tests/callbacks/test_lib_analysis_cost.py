"""What one analysis of the LIB callback costs beyond the build, and that its logged quantities did not change:
no forward of its own after the first analysis (NaN check and ReLU co-firing ride on the build's statistics
pass; the structural checks run at the first analysis), figures every k-th analysis, scalars at every one."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.lib_analysis import LIBAnalysis
from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.modes import analysis_mode
from lib_lightning.core.metrics.coactivation import relu_coactivation
from lib_lightning.core.metrics.summary import short_names, summarise
from lib_lightning.data.modadd import ModularAdditionDataModule
from lib_lightning.runtime import preserved_rng
from lib_lightning.tasks.classifier import ModularAddition
from tests.callbacks.foreign import ForeignData, ForeignModule, NaNAfter
from tests.callbacks.test_lib_analysis import FOREIGN_LAYERS, MODADD_LAYERS, SMALL, _foreign_callback, _trainer


def _count_forwards(cb: LIBAnalysis) -> list[int]:
    """Wraps the callback's analysis: the number of forward calls of the LightningModule in each one."""
    counts: list[int] = []
    analyse = cb._analyse

    def counted(trainer, pl_module, step):
        calls = []
        handle = pl_module.register_forward_pre_hook(lambda *args: calls.append(1))
        try:
            analyse(trainer, pl_module, step)
        finally:
            handle.remove()
        counts.append(len(calls))

    cb._analyse = counted
    return counts


def _build_forwards(cb: LIBAnalysis, model: L.LightningModule, batches: list) -> int:
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with torch.enable_grad():
            build_graphs(model, cb.layers, batches, forward=cb.forward,
                         **{**cb.build_kwargs, "check_cuts": False, "memory_budget_bytes": None})
    finally:
        handle.remove()
    return len(calls)


def test_after_the_first_analysis_the_callback_runs_no_forward_beyond_the_build(tmp_path):
    """Before: each analysis ran a NaN-check pass, the structural checks and a co-firing pass on top of the
    build (13 forwards more here); now only the first analysis checks, and the build's forwards are all."""
    L.seed_everything(0)
    cb = _foreign_callback(relu_layers=["encoder.1"])
    counts = _count_forwards(cb)
    model = ForeignModule()
    trainer = _trainer(tmp_path, 8, [cb])
    trainer.fit(model, ForeignData())
    assert cb.analysed_steps == [0, 4, 8] and "relu/encoder.1/n_dead" in cb.history[-1]["metrics"]
    batches, _ = cb._shard(trainer, cb._inputs, model.device)
    build = _build_forwards(cb, model, batches)
    assert counts[1:] == [build, build]
    assert counts[0] > build  # the structural checks of the first analysis


def test_a_nan_at_the_first_analysis_skips_it_and_the_next_one_checks_again(tmp_path):
    L.seed_everything(0)
    model = NaNAfter()
    model.poison = True
    cb = _foreign_callback()
    counts = _count_forwards(cb)

    class Cure(L.Callback):  # after the analysis at the start, before the first training step
        def on_train_batch_start(self, trainer, pl_module, *args):
            pl_module.poison = False

    with pytest.warns(UserWarning, match="LIB analysis at step 0 skipped: NaN or Inf"):
        _trainer(tmp_path, 8, [Cure(), cb]).fit(model, ForeignData())
    assert cb.analysed_steps == [4, 8] and cb.skipped == 1
    assert counts[0] == 1  # the first batch's forward saw the NaN: no checks, no build
    assert counts[1] > counts[2]  # the first finite analysis ran the structural checks, the next did not


class _Reference(L.Callback):
    """Before the LIB callback at each of its steps: the metrics as the core pieces give them, run
    separately (the build with its own checks, summarise, relu_coactivation with a forward of its own)."""

    def __init__(self, cb: LIBAnalysis):
        self.cb, self.metrics = cb, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cb, step = self.cb, trainer.global_step
        if step % cb.every:
            return
        with preserved_rng(), torch.inference_mode(False), torch.enable_grad(), analysis_mode(pl_module, None):
            batches, index = cb._shard(trainer, cb.analysis_inputs(trainer, pl_module), pl_module.device)
            graphs = build_graphs(pl_module, cb.layers, batches, forward=cb.forward, **cb.build_kwargs)
            metrics = dict(summarise(graphs, cb.options, cb.snapshot, strict=False).metrics)
            (groups,) = relu_coactivation(pl_module, cb.relu_layers, batches, index, cb.seed, cb.forward)
        (name,) = short_names([layer.name for layer in cb.relu_layers])
        metrics.update({f"relu/{name}/{k}": float(v) for k, v in groups.to_dict().items() if k != "group_of"})
        self.metrics[step] = metrics


def test_logged_metrics_equal_the_core_pieces_run_separately(tmp_path):
    L.seed_everything(0)
    cb = LIBAnalysis(MODADD_LAYERS, every_n_steps=5, size=100, dtype="float32", relu_layers=["model.hook_mlp_hidden"],
                     at_start=False)
    reference = _Reference(cb)
    _trainer(tmp_path, 10, [reference, cb], val_check_interval=5).fit(
        ModularAddition(**SMALL), ModularAdditionDataModule(p=23, train_fraction=0.5, steps_per_epoch=10)
    )
    assert cb.analysed_steps == [5, 10] == sorted(reference.metrics)
    bookkeeping = ("lib/time/", "lib/skipped", "lib/metric_errors", "lib/save_errors")
    for entry in cb.history:
        logged = {k: v for k, v in entry["metrics"].items() if not k.startswith(bookkeeping)}
        expected = reference.metrics[entry["step"]]
        assert logged.keys() == expected.keys()
        assert any(k.startswith("relu/") for k in logged) and any(k.startswith("edges/") for k in logged)
        for key, value in expected.items():
            assert logged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (entry["step"], key)


def test_figures_every_k_analyses_and_scalars_at_every_one(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    cb = LIBAnalysis(FOREIGN_LAYERS, every_n_steps=2, size=96, batch_inputs="tests.callbacks.foreign:features_of",
                     figures_every=2)
    _trainer(tmp_path, 6, [cb], logger=TensorBoardLogger(tmp_path)).fit(ForeignModule(), ForeignData())
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("graph/modularity")] == [0, 2, 4, 6]
    assert [e.step for e in events.Images("lib/spectra")] == [0, 4]
    assert [e.step for e in events.Histograms("lib/encoder.1/log10_lambda")] == [0, 4]
    assert [e.step for e in events.Tensors("lib/summary/text_summary")] == [0, 2, 4, 6]


def test_figures_every_must_be_positive():
    with pytest.raises(ValueError, match="figures_every"):
        LIBAnalysis(FOREIGN_LAYERS, every_n_steps=2, figures_every=0)


class _PoisonRankOne(L.Callback):
    """NaN activations on rank 1 only, in the analyses from step 4 on (training itself stays finite)."""

    def on_train_batch_start(self, trainer, pl_module, *args):
        pl_module.poison = False

    def on_train_batch_end(self, trainer, pl_module, *args):
        pl_module.poison = trainer.global_rank == 1 and trainer.global_step >= 4


def test_a_nan_on_one_ddp_rank_skips_the_analysis_on_both_and_none_hangs(tmp_path):
    """Rank 1 finds the NaN in the statistics pass; rank 0 learns it at the same reduction (a hang would
    end in the strategy's 60 s collective timeout)."""
    import csv
    from datetime import timedelta

    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import DDPStrategy

    L.seed_everything(0)
    cb = _foreign_callback()
    trainer = L.Trainer(
        max_steps=8, default_root_dir=tmp_path, logger=CSVLogger(tmp_path), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[_PoisonRankOne(), cb], accelerator="cpu",
        devices=2, strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)), limit_val_batches=0,
    )
    trainer.fit(NaNAfter(), ForeignData())
    folder = tmp_path / "lightning_logs" / "version_0"
    assert sorted(p.name for p in (folder / "lib").iterdir()) == ["step_00000000.json", "step_00000000.pt"]
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    skipped = {int(r["step"]): float(r["lib/skipped"]) for r in rows if r.get("lib/skipped")}
    assert skipped == {0: 0.0, 4: 1.0, 8: 2.0}
