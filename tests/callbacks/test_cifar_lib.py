"""LIB callbacks on both CIFAR-10 models (fake data in the real format)."""

import lightning as L
import pytest
import torch

from callbacks.lib_analysis import LIBAnalysis
from lib_lightning.core.lib.capture import NodeLayer, check_cut
from lib_lightning.data.cifar10 import CIFAR10DataModule
from lib_lightning.tasks.cifar import CifarClassifier

pytestmark = pytest.mark.filterwarnings(r"ignore:CIFAR10DataModule\(fake=True\)")

CASES = [
    ("mlp", {"widths": (24, 20)}, ["model.hook_hidden_0", "model.hook_hidden_1", "model.hook_logits"], [24, 20, 10]),
    # a conv map (batch, 8, 4, 4) is read as 16 positions of 8 channels ("model.hook_block_2~flat": 128 values)
    ("cnn", {"channels": (4, 6, 8)}, ["model.hook_block_2", "model.hook_pooled", "model.hook_logits"], [8, 8, 10]),
]


@pytest.fixture(scope="module")
def fake_dm(tmp_path_factory) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(
        data_dir=str(tmp_path_factory.mktemp("data")), fake=True, fake_size=600, val_size=100, eval_batch_size=200
    )
    dm.prepare_data()
    return dm


@pytest.mark.parametrize("arch, kwargs, layers, widths", CASES, ids=[c[0] for c in CASES])
def test_lib_callback_on_cifar_models(arch, kwargs, layers, widths, fake_dm, tmp_path):
    L.seed_everything(0)
    cb = LIBAnalysis(layers, every_n_steps=5, split="test", size=150, at_start=False, images=False)
    trainer = L.Trainer(max_steps=10, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[cb])
    trainer.fit(CifarClassifier(arch=arch, **kwargs), fake_dm)
    assert cb.analysed_steps == [5, 10]
    from lib_lightning.core.lib.graph import load_graphs

    graphs = load_graphs(tmp_path / "lib" / "step_00000010.pt")
    for kind in ("lib", "pca"):
        g = graphs[kind]
        assert [layer.d for layer in g.layers] == widths
        for layer in g.layers:
            assert torch.isfinite(layer.lambdas).all() and layer.basis.shape == (layer.d + 1, layer.d_lib)
        for sec, edges in enumerate(g.edges):
            assert edges.shape == (g.layers[sec + 1].d_lib, g.layers[sec].d_lib) and torch.isfinite(edges).all()
    assert all(torch.isfinite(torch.tensor(v)) for v in cb.history[-1]["metrics"].values())


def test_cnn_hook_points_are_cuts(fake_dm):
    task = CifarClassifier(arch="cnn", channels=(4, 6, 8)).double()
    images = fake_dm.analysis_inputs("test", 8, 0).double()
    names = [f"model.{h}" for h in task.model.hook_points]
    for first, second in zip(names[:-1], names[1:]):
        check_cut(task, NodeLayer(first), NodeLayer(second), images)
