"""The LIB callback attached by module names to LightningModules built around models nobody here wrote.

Each model trains a few steps inside a LightningModule with ``LIBAnalysis`` attached; the test asserts
finite Lambdas and edges of the documented shapes and that training follows the same trajectory
bit for bit with and without the callback (parameters and buffers: BatchNorm statistics, dropout RNG).
The refusals (an encoder-decoder whose target bypasses the encoder, ``batch_first=False``) are refused
through the callback with the core's clear errors. ``tests/core/test_foreign_models.py`` covers more
members of each family through ``build_graphs`` directly.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.lib_analysis import LIBAnalysis
from lib_lightning.core import IndependenceError, MemoryBudgetError, load_graphs
from lib_lightning.data.cifar10 import CIFAR10DataModule
from lib_lightning.tasks.cifar import CifarClassifier

pytestmark = pytest.mark.filterwarnings(
    r"ignore:CIFAR10DataModule\(fake=True\)", "ignore:.*does not have many workers", "ignore:.*val_dataloader"
)


def _trainer(root, steps, callbacks):
    return L.Trainer(
        max_steps=steps, default_root_dir=root, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks,
    )  # fmt: skip


def _fit_twice(make_module, make_data, callback, root, steps):
    """Trains the same seeded module without and with ``callback``; returns both modules."""
    modules = []
    for sub, callbacks in (("plain", []), ("analysed", [callback])):
        L.seed_everything(0)
        module = make_module()
        _trainer(root / sub, steps, callbacks).fit(module, make_data())
        modules.append(module)
    return modules


def _assert_same_trajectory(plain: nn.Module, analysed: nn.Module) -> None:
    state = analysed.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.equal(value, state[name]), name


def _assert_graphs(callback: LIBAnalysis, root, dims: list[int]) -> None:
    """Finite Λ and edges on disk for every analysed step; kept LIB dims at most the layer widths."""
    assert callback.analysed_steps and callback.skipped == 0 and callback.metric_errors == 0
    for step in callback.analysed_steps:
        graphs = load_graphs(root / "analysed" / "lib" / f"step_{step:08d}.pt")
        for kind, graph in graphs.items():
            assert [layer.basis.shape[0] for layer in graph.layers[:-1]] == [d + 1 for d in dims[:-1]], kind
            for i, edges in enumerate(graph.edges):
                assert edges.shape == (graph.dims[i + 1], graph.dims[i]) and torch.isfinite(edges).all(), kind
            assert all(torch.isfinite(layer.lambdas).all() for layer in graph.layers), kind


# ----------------------------------------------------------------- torchvision ResNet-18 (BatchNorm, residual blocks)
def _cifar(tmp_path):
    def make():
        dm = CIFAR10DataModule(
            data_dir=str(tmp_path / "data"), fake=True, fake_size=96, val_size=32, batch_size=16, eval_batch_size=32,
        )  # fmt: skip
        dm.prepare_data()
        return dm

    return make


def test_resnet18_block_outputs_as_positions_of_channels(tmp_path):
    """layer4 (batch, 512, 4, 4) is 16 positions of 512 channels; BatchNorm buffers untouched by the analysis."""
    callback = LIBAnalysis(
        ["model.layer4", "model.avgpool", "model.fc"], every_n_steps=2, split="val", size=8, batch_size=8,
        relu_layers=["model.layer4"], dtype="float32", images=False, histograms=False,
    )  # fmt: skip
    plain, analysed = _fit_twice(lambda: CifarClassifier(arch="resnet18"), _cifar(tmp_path), callback, tmp_path, 3)
    assert callback.analysed_steps == [0, 2]
    _assert_same_trajectory(plain, analysed)
    assert int(analysed.state_dict()["model.bn1.num_batches_tracked"]) == 3
    _assert_graphs(callback, tmp_path, [512, 512, 10])
    assert callback.history[-1]["metrics"]["relu/model.layer4/n_groups"] >= 1


def test_a_conv_map_read_flat_is_refused_by_the_memory_guard(tmp_path):
    callback = LIBAnalysis(
        ["model.layer1~flat", "model.layer2"], every_n_steps=5, split="val", size=4, batch_size=4,
    )  # fmt: skip
    L.seed_everything(0)
    with pytest.raises(MemoryBudgetError, match=r"'model.layer1~flat'.*positions"):
        _trainer(tmp_path, 1, [callback]).fit(CifarClassifier(arch="resnet18"), _cifar(tmp_path)())


# ----------------------------------------------------------------- HuggingFace GPT-2 on padded dict batches
VOCAB, LENGTH = 13, 8


def _padded_copy_task(n: int, seed: int):
    """``(input_ids, attention_mask, labels)``: right-padded sequences; the label of a position is its token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen)
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=gen)
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    return ids * mask, mask, torch.where(mask.bool(), ids, -100)


def _hf_batches():
    def collate(items):
        ids, mask, labels = (torch.stack(t) for t in zip(*items))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return DataLoader(TensorDataset(*_padded_copy_task(64, 0)), batch_size=16, shuffle=True, collate_fn=collate)


class TinyGPT2(L.LightningModule):
    """A 2-layer GPT-2 (d 64, dropout 0.1) from a config, trained on dict batches with its own loss."""

    def __init__(self):
        super().__init__()
        import transformers

        cfg = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=LENGTH, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        self.model = transformers.GPT2LMHeadModel(cfg)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def model_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def call_model(module, inputs):
    return module.model(**inputs)


def test_tiny_gpt2_residual_stream_on_padded_dict_batches(tmp_path):
    pytest.importorskip("transformers")
    callback = LIBAnalysis(
        ["model.transformer.h.0", "model.transformer.h.1", "model.lm_head"], every_n_steps=2, size=16,
        batch_size=8, batch_inputs=model_inputs, forward=call_model, position_sources=1, images=False,
    )  # fmt: skip
    plain, analysed = _fit_twice(TinyGPT2, _hf_batches, callback, tmp_path, 3)
    assert callback.analysed_steps == [0, 2]
    _assert_same_trajectory(plain, analysed)
    _assert_graphs(callback, tmp_path, [64, 64, VOCAB])
    assert 0 < callback.history[-1]["metrics"]["lib/transformer.h.0/dim_rel"] <= 64


# ----------------------------------------------------------------- Lightning's demo LSTM (hidden-state argument, tuple outputs)
class TokenLSTM(L.LightningModule):
    """Lightning's ``SimpleLSTM`` (2 layers, dropout) predicting the next token of a seeded stream."""

    def __init__(self):
        super().__init__()
        from lightning.pytorch.demos.lstm import SimpleLSTM

        self.model = SimpleLSTM(vocab_size=17, ninp=8, nhid=12, nlayers=2)

    def forward(self, tokens):
        return self.model(tokens, self.model.init_hidden(tokens.shape[0]))[0]

    def training_step(self, batch, batch_idx):
        tokens, target = batch
        return F.nll_loss(self(tokens), target.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _token_stream():
    data = torch.randint(0, 17, (64 * 6 + 1,), generator=torch.Generator().manual_seed(0))
    blocks = data[:-1].view(64, 6), data[1:].view(64, 6)
    return DataLoader(TensorDataset(*blocks), batch_size=16, shuffle=True)


def test_simple_lstm_output_sequence_by_element(tmp_path):
    callback = LIBAnalysis(
        ["model.encoder", "model.rnn[out:0]", "model.decoder"], every_n_steps=2, size=16, batch_size=8,
        position_sources=1, images=False,
    )  # fmt: skip
    plain, analysed = _fit_twice(TokenLSTM, _token_stream, callback, tmp_path, 3)
    assert callback.analysed_steps == [0, 2]
    _assert_same_trajectory(plain, analysed)
    _assert_graphs(callback, tmp_path, [8, 12, 17])


def test_lstm_tuple_output_without_an_element_lists_the_choices(tmp_path):
    callback = LIBAnalysis(["model.encoder", "model.rnn", "model.decoder"], every_n_steps=2, size=16, batch_size=8)
    with pytest.raises(TypeError, match=r"module 'model.rnn' is a tuple of 2: \[0\] Tensor \(8, 6, 12\).*'model.rnn\[out:0\]'"):
        _trainer(tmp_path, 1, [callback]).fit(TokenLSTM(), _token_stream())


# ----------------------------------------------------------------- refused: the batch dimension is mixed
class SequenceFirstEncoder(L.LightningModule):
    """``nn.TransformerEncoder`` with PyTorch's default ``batch_first=False``, fed ``(batch, seq, d)`` by mistake."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_transformer_encoder_not_batch_first_is_refused(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 5, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)), batch_size=8)
    callback = LIBAnalysis(["encoder.layers.0", "encoder.layers.1"], every_n_steps=2, size=16, batch_size=8)
    with pytest.raises(IndependenceError, match=r"'encoder.layers.0' -> 'encoder.layers.1': the batch dimension is mixed.*batch_first"):
        _trainer(tmp_path, 1, [callback]).fit(SequenceFirstEncoder(), data)
