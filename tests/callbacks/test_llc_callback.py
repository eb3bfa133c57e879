"""LLCCallback: schedule, logging, no side effects on training, resume, failed chains, rank split."""

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import Logger
from torch.utils.data import DataLoader, TensorDataset

from callbacks.lib_analysis import LIBAnalysis
from callbacks.llc import LLCCallback
from lib_lightning.data.modadd import ModularAdditionDataModule
from lib_lightning.runtime import num_threads
from lib_lightning.tasks.classifier import ModularAddition

SMALL = dict(p=23, d_model=32, n_heads=2, d_head=16, d_mlp=64)
DATA = dict(p=23, train_fraction=0.5, steps_per_epoch=10)
FAST = dict(num_chains=2, num_draws=8, num_burnin=4, batch_size=32, epsilon=1e-4, gamma=1000.0)
SECTIONS = {"embed_attn": ["model.embed.*", "model.pos_embed", "model.attn.*"], "mlp": ["model.mlp_*"],
            "unembed": ["model.unembed.*"]}
REFINED = dict(sections=SECTIONS, splits=["train", "val"], mala_every=2)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self):
        super().__init__()
        self.records = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))

    def llc(self):
        return {step: m for step, m in self.records if any(k.startswith("llc/") for k in m)}


def _fit(root, max_steps, callbacks=(), logger=None, ckpt_path=None, seed=0, **kwargs):
    L.seed_everything(seed)
    task = ModularAddition(**SMALL, lr=1e-2)
    trainer = L.Trainer(
        max_steps=max_steps, default_root_dir=root, logger=logger if logger is not None else False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=1, callbacks=list(callbacks), **{"enable_checkpointing": False, **kwargs},
    )
    trainer.fit(task, ModularAdditionDataModule(**DATA), ckpt_path=ckpt_path)
    return trainer, task


@pytest.mark.parametrize("options", [{}, {**REFINED, "sampler": "rmsprop_sgld"}], ids=["whole", "refined"])
def test_training_is_unchanged_bit_for_bit_and_llc_is_logged(tmp_path, options):
    plain_logger, llc_logger = MemoryLogger(), MemoryLogger()
    _, plain = _fit(tmp_path / "plain", 15, logger=plain_logger)
    plain_rng = torch.get_rng_state()
    callback = LLCCallback(schedule="every", every_n_steps=5, **FAST, **options)
    trainer, task = _fit(tmp_path / "llc", 15, callbacks=[callback], logger=llc_logger)

    assert torch.equal(torch.get_rng_state(), plain_rng)
    for (name, a), b in zip(plain.state_dict().items(), task.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(plain.optimizers().optimizer.state.values(), task.optimizers().optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert task.training == plain.training and task.model.training == plain.model.training
    logged = llc_logger.llc()
    assert sorted(logged) == [5, 10, 15] == [step for step, _, _ in callback.history]
    for step, mean, std in callback.history:
        assert {"llc/mean", "llc/std", "llc/init_loss", "llc/diverged_chains", "llc/failed"} <= set(logged[step])
        assert logged[step]["llc/mean"] == mean and logged[step]["llc/std"] == std and logged[step]["llc/failed"] == 0
        assert math.isfinite(mean) and std > 0
        health = {"llc/acceptance", "llc/grad_norm", "llc/loc_norm", "llc/noise_norm", "llc/trending_chains",
                  "llc/healthy", "llc/seconds"}
        assert health <= set(logged[step])
        assert 0 <= logged[step]["llc/acceptance"] <= 1 and logged[step]["llc/noise_norm"] > 0
    if options:
        names = ["val", *SECTIONS]
        assert [(s, n) for s, n, _, _ in callback.refined_history] == [(s, n) for s in (5, 10, 15) for n in names]
        for step, name, mean, std in callback.refined_history:
            assert logged[step][f"llc/{name}/mean"] == mean and logged[step][f"llc/{name}/std"] == std
            assert {f"llc/{name}/acceptance", f"llc/{name}/healthy"} <= set(logged[step])
        assert all(math.isfinite(mean) for _, _, mean, _ in callback.refined_history)


def test_plain_shuffling_loader_feeds_the_chains_without_touching_the_global_rng(tmp_path):
    """Without ``train_tensors`` the analysis set is the first batches of the training loader."""
    tokens, labels = ModularAdditionDataModule(**DATA).train_tensors
    results = []
    for callbacks in ([], [LLCCallback(schedule="every", every_n_steps=4, num_batches=2, log_traces=False, **FAST)]):
        L.seed_everything(0)
        task = ModularAddition(**SMALL, lr=1e-2)
        loader = DataLoader(TensorDataset(tokens, labels), batch_size=32, shuffle=True)
        trainer = L.Trainer(max_steps=8, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
        trainer.fit(task, train_dataloaders=loader)
        results.append((task.state_dict(), torch.get_rng_state()))
    (plain, plain_rng), (with_llc, llc_rng) = results
    assert torch.equal(plain_rng, llc_rng)
    assert all(torch.equal(plain[k], with_llc[k]) for k in plain)
    assert callbacks[0]._data["train"][0].shape == (64, 3)
    history = callbacks[0].history
    assert [s for s, _, _ in history] == [4, 8] and all(math.isfinite(m) for _, m, _ in history)


def test_log_schedule_from_trainer_max_steps(tmp_path):
    callback = LLCCallback(schedule="log", first_step=2, num_points=4, log_traces=False, **FAST)
    _fit(tmp_path, 20, callbacks=[callback])
    assert [step for step, _, _ in callback.history] == [2, 4, 9, 20]  # geomspace(2, 20, 4) rounded


def test_state_dict_round_trip_and_resume_match_straight_run(tmp_path):
    settings = dict(schedule="every", every_n_steps=5, **FAST, **REFINED)
    straight = LLCCallback(**settings)
    _fit(tmp_path / "straight", 20, callbacks=[straight])

    first = LLCCallback(**settings)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "run", save_last=True, every_n_epochs=1)
    _fit(tmp_path / "run", 10, callbacks=[first, ckpt], enable_checkpointing=True)
    saved = torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert saved == {"history": first.history, "refined_history": first.refined_history, "last_step": 10}

    resumed = LLCCallback(**settings)
    _fit(tmp_path / "run", 20, callbacks=[resumed], ckpt_path=tmp_path / "run" / "last.ckpt", seed=123)
    assert [s for s, _, _ in resumed.history] == [s for s, _, _ in straight.history] == [5, 10, 15, 20]
    torch.testing.assert_close(torch.tensor(resumed.history), torch.tensor(straight.history), rtol=1e-3, atol=1e-3)
    assert [h[:2] for h in resumed.refined_history] == [h[:2] for h in straight.refined_history]
    torch.testing.assert_close(torch.tensor([h[2:] for h in resumed.refined_history]),
                               torch.tensor([h[2:] for h in straight.refined_history]), rtol=1e-3, atol=1e-3)

    older = LLCCallback(**settings)
    older.load_state_dict({})  # a checkpoint from before the callback existed
    assert older.history == [] and older.refined_history == [] and older.last_step == -1
    older.load_state_dict({"history": [(5, 1.0, 0.1)], "last_step": 5})  # from before refined estimates
    assert older.history == [(5, 1.0, 0.1)] and older.refined_history == []


def test_state_key_tells_settings_apart():
    a = LLCCallback(epsilon=1e-4).state_key
    assert a == LLCCallback(epsilon=1e-4, num_draws=7).state_key
    assert a != LLCCallback(epsilon=2e-4).state_key and a != LLCCallback(epsilon=1e-4, seed=1).state_key
    assert a != LLCCallback(epsilon=1e-4, sampler="rmsprop_sgld").state_key
    assert a == LLCCallback(epsilon=1e-4, sampler="sgld").state_key  # unchanged for older checkpoints


def test_non_finite_chain_is_logged_as_failed_and_training_goes_on(tmp_path):
    logger = MemoryLogger()
    callback = LLCCallback(schedule="every", every_n_steps=5, **{**FAST, "epsilon": 10.0})
    with pytest.warns(UserWarning, match=r"LLC estimate at step 5 failed: chain \d produced a non-finite loss"):
        trainer, _ = _fit(tmp_path, 10, callbacks=[callback], logger=logger)
    assert trainer.global_step == 10
    logged = logger.llc()
    assert logged[5]["llc/failed"] == 1.0 and "llc/mean" not in logged[5]
    assert math.isnan(callback.history[0][1])


def test_chains_split_across_ranks_give_the_single_process_sums(tmp_path):
    callback = LLCCallback(schedule="every", every_n_steps=1000, **{**FAST, "num_chains": 3}, **REFINED)
    trainer, task = _fit(tmp_path, 5, callbacks=[callback])
    task.eval()
    whole, _ = callback.local_sums(trainer, task, 5, rank=0, world=1)
    assert whole.shape[0] == 5  # train, val, three sections
    parts = [callback.local_sums(trainer, task, 5, rank=r, world=2)[0] for r in range(2)]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=1e-12)
    assert (parts[0][:, 0] == 2).all() and (parts[1][:, 0] == 1).all()  # chains {0, 2} and {1}
    idle, estimate = callback.local_sums(trainer, task, 5, rank=3, world=4)
    assert estimate is None and not idle.any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schedule": "linear"}, r"schedule must be one of \('log', 'every'\), got 'linear'"),
        ({"schedule": "every"}, r"schedule='every' needs every_n_steps >= 1, got every_n_steps=None"),
        ({"max_steps": 50, "first_step": 100}, r"max_steps must be >= first_step=100, got max_steps=50"),
        ({"num_points": 0}, r"num_points must be >= 1, got num_points=0"),
        ({"num_chains": 0}, r"num_chains must be >= 1, got num_chains=0"),
        ({"epsilon": 0.0}, r"epsilon must be > 0, got epsilon=0.0"),
        ({"nbeta": -1.0}, r"nbeta must be > 0, got nbeta=-1.0"),
        ({"gamma": -1.0}, r"gamma must be >= 0, got gamma=-1.0"),
        ({"sampler": "hmc"}, r"sampler must be one of \('sgld', 'rmsprop_sgld'\), got 'hmc'"),
        ({"splits": ["test"]}, r"splits must be distinct values from \('train', 'val'\), got \['test'\]"),
        ({"splits": []}, r"splits must be distinct values from \('train', 'val'\), got \[\]"),
        ({"sections": {"val": ["model.*"]}}, r"section name 'val' is not allowed"),
        ({"sections": "all"}, r"sections must map names to parameter patterns, or be 'lib', got 'all'"),
        ({"sections": {"a/b": ["model.*"]}}, r"section name 'a/b' is not allowed"),
        ({"sections": {"mlp": []}}, r"section 'mlp' needs a non-empty list of parameter names or patterns, got \[\]"),
        ({"min_acceptance": 2.0}, r"min_acceptance must be in \[0, 1\], got min_acceptance=2.0"),
        ({"mala_every": -1}, r"mala_every must be >= 0, got mala_every=-1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLCCallback(**kwargs)


def test_unknown_section_parameter_lists_the_available_names(tmp_path):
    callback = LLCCallback(schedule="every", every_n_steps=5, sections={"mlp": ["model.mlp.*"]}, **FAST)
    with pytest.raises(ValueError, match=r"\['model.mlp.\*'\] match no trainable parameter; available: \[.*'model.mlp_in.weight'"):
        _fit(tmp_path, 5, callbacks=[callback])


def test_sections_from_the_lib_callbacks_node_layers(tmp_path):
    layers = ["model.hook_resid_pre", "model.hook_resid_mid", "model.hook_resid_post", "model.hook_logits"]
    lib = LIBAnalysis(layers, every_n_steps=1000, at_start=False)  # only its node layers are used here
    logger = MemoryLogger()
    callback = LLCCallback(schedule="every", every_n_steps=5, sections="lib", log_traces=False, **FAST)
    _fit(tmp_path, 5, callbacks=[lib, callback], logger=logger)
    names = ["hook_resid_pre->hook_resid_mid", "hook_resid_mid->hook_resid_post", "hook_resid_post->hook_logits"]
    assert list(callback.sections) == names  # the LIB callback's edges/<a>-><b> names
    assert callback.sections[names[0]][:2] == ("model.pos_embed", "model.embed.weight")
    assert callback.sections[names[1]] == ("model.mlp_in.weight", "model.mlp_in.bias", "model.mlp_out.weight",
                                           "model.mlp_out.bias")
    assert callback.sections[names[2]] == ("model.unembed.weight", "model.unembed.bias")
    assert {f"llc/{name}/mean" for name in names} <= set(logger.llc()[5])
    alone = LLCCallback(schedule="every", every_n_steps=5, sections="lib", **FAST)
    with pytest.raises(ValueError, match=r"sections='lib' needs a LIB analysis callback"):
        _fit(tmp_path / "alone", 5, callbacks=[alone])


def test_unhealthy_estimate_warns_once_per_step_and_is_logged(tmp_path):
    """ε = 3e-3 keeps the chains finite on this model but its MALA acceptance is far below 0.9."""
    logger = MemoryLogger()
    callback = LLCCallback(schedule="every", every_n_steps=5, mala_every=1, log_traces=False,
                           **{**FAST, "epsilon": 3e-3})
    with pytest.warns(UserWarning, match=r"unhealthy LLC estimate\(s\) at step 5: whole model: MALA acceptance") as record:
        _fit(tmp_path, 5, callbacks=[callback], logger=logger)
    assert len([w for w in record if "unhealthy" in str(w.message)]) == 1
    logged = logger.llc()[5]
    assert logged["llc/healthy"] == 0.0 and logged["llc/acceptance"] < 0.9 and logged["llc/failed"] == 0


def _csv_llc(log_dir):
    keys = ["llc/mean", "llc/val/mean", *(f"llc/{name}/mean" for name in SECTIONS), "llc/acceptance"]
    with open(log_dir / "metrics.csv") as f:
        return {int(row["step"]): [float(row[k]) for k in keys] for row in csv.DictReader(f) if row.get("llc/mean")}


@pytest.mark.slow
def test_two_process_ddp_equals_single_process(tmp_path, monkeypatch):
    """Chains split over two CPU processes, sums reduced: the logged LLC equals the one-process value.

    Every process runs one torch thread: without OMP_NUM_THREADS, Lightning gives each DDP process
    cores // processes threads while the single process keeps torch's default, and the chains' float
    sums then differ by a few 1e-6 (a different reduction order, not a different estimate).
    Slow only because spawning two processes costs 8–20 s on the shared machine.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by the spawned processes' torch; Lightning leaves it
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        root = tmp_path / str(devices)
        logger = CSVLogger(root, name="", version="")
        callback = LLCCallback(schedule="every", every_n_steps=5, log_traces=False, **{**FAST, "num_chains": 4},
                               **REFINED)
        with num_threads(1):
            _fit(root, 10, callbacks=[callback], logger=logger, accelerator="cpu", devices=devices, strategy=strategy)
        results[devices] = _csv_llc(root)
    assert sorted(results[1]) == [5, 10]
    assert results[1].keys() == results[2].keys()
    for step in results[1]:
        assert results[2][step] == pytest.approx(results[1][step], rel=1e-6)  # every estimate and the health
