"""The LIB and LLC callbacks on models with structured batches, BatchNorm and dropout, and on several processes."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from transformers import BatchEncoding

from callbacks.ablation import Ablation
from callbacks.lib_analysis import LIBAnalysis
from callbacks.llc import LLCCallback
from lib_lightning.core.lib import batch as nested
from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.capture import CutError
from lib_lightning.core.lib.graph import load_graphs
from tests.callbacks.structured import (
    BagOfTokens,
    BatchNormNet,
    OfflineTransformer,
    PaddedTokens,
    call_with_keywords,
    collate_encodings,
    padded_tokens,
)
from tests.core.test_reduce_devices import DevicelessFactories, RecordingReduce

BAG_LAYERS = ["mlp.0[in]", "mlp.1", "mlp.3", "head"]
BN_LAYERS = ["net.0[in]", "net.2", "net.5", "net.6"]


def _trainer(root, max_steps, callbacks, **kwargs):
    return L.Trainer(
        max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, **{"enable_checkpointing": False, **kwargs},
    )


def _bag_callback(**kwargs):
    settings = dict(every_n_steps=3, size=40, batch_size=16, forward="tests.callbacks.structured:call_with_keywords")
    return LIBAnalysis(BAG_LAYERS, **{**settings, **kwargs})


def test_tuple_batches_of_an_encoder_decoder_reach_the_cut_check(tmp_path):
    """Lightning's demo transformer: the target embedding bypasses the encoder, so the pair is no cut."""
    L.seed_everything(0)
    cb = LIBAnalysis(["model.transformer.encoder", "model.transformer.decoder"], every_n_steps=2, size=12,
                     batch_inputs=lambda b: (b[0], b[1]), forward=lambda m, x: m(*x))
    with pytest.raises(CutError, match="node layers 'model.transformer.encoder' -> 'model.transformer.decoder' are not a cut"):
        _trainer(tmp_path, 2, [cb]).fit(OfflineTransformer())
    assert isinstance(cb._inputs, tuple) and [t.shape for t in cb._inputs] == [(12, 6), (12, 6)]


def test_batch_encodings_through_a_keyword_forward_end_to_end(tmp_path):
    L.seed_everything(0)
    cb = _bag_callback(relu_layers=["mlp.1"])
    _trainer(tmp_path, 6, [cb]).fit(BagOfTokens(), PaddedTokens())
    assert cb.analysed_steps == [0, 3, 6]
    assert type(cb._inputs) is BatchEncoding and cb._inputs["input_ids"].shape == (40, 7)
    metrics = cb.history[-1]["metrics"]
    assert {"lib/mlp.1/dim_abs", "edges/mlp.1->mlp.3/lib_n99", "relu/mlp.1/n_dead"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    graphs = load_graphs(tmp_path / "lib" / "step_00000006.pt")
    lib = graphs["lib"]
    assert lib.layer_names == BAG_LAYERS and lib.dims[-1] == 3 and lib.n_examples == 40
    for edges, (d_in, d_out) in zip(lib.edges, zip(lib.dims[:-1], lib.dims[1:])):
        assert edges.shape == (d_out, d_in) and torch.isfinite(edges).all()  # rows: output features


def test_batch_inputs_with_leaves_of_other_batch_sizes_are_named(tmp_path):
    cb = _bag_callback(batch_inputs=lambda b: {"input_ids": b[0]["input_ids"], "attention_mask": b[0]["attention_mask"][:-1]})
    with pytest.raises(ValueError, match=r"batch_inputs\(batch\) of train batch 0: leaf \"\['attention_mask'\]\" has "
                                         r"shape \(15, 7\), but leaf \"\['input_ids'\]\" has batch size 16"):
        _trainer(tmp_path, 1, [cb]).fit(BagOfTokens(), PaddedTokens())


def test_a_forward_that_does_not_fit_the_inputs_says_what_it_was_given(tmp_path):
    cb = _bag_callback(forward=None)  # model(encoding): the module wants keyword arguments
    with pytest.raises(TypeError, match="attention_mask") as info:
        _trainer(tmp_path, 1, [cb]).fit(BagOfTokens(), PaddedTokens())
    assert "with inputs BatchEncoding of ['input_ids'] (16, 7) int64, ['attention_mask'] (16, 7) int64" in "".join(
        info.value.__notes__
    )


def _bn_run(root, callbacks):
    L.seed_everything(0)
    model = BatchNormNet()
    _trainer(root, 8, callbacks).fit(model)
    return model


def test_batchnorm_and_dropout_training_is_bit_identical_with_the_callback(tmp_path):
    """Every analysis forward (NaN check, co-firing, LIB) runs in eval mode: no BatchNorm update, no dropout draw."""
    plain = _bn_run(tmp_path / "a", [])
    cb = LIBAnalysis(BN_LAYERS, every_n_steps=2, size=64, batch_size=32, relu_layers=["net.2", "net.5"])
    llc = LLCCallback(schedule="every", every_n_steps=3, num_chains=2, num_draws=4, num_burnin=2, batch_size=16,
                      log_traces=False)
    analysed = _bn_run(tmp_path / "b", [cb, llc])
    assert cb.analysed_steps == [0, 2, 4, 6, 8] and [h[0] for h in llc.history] == [3, 6]
    assert analysed.training and all(m.training for m in analysed.modules())
    state = analysed.state_dict()
    assert "net.1.running_mean" in state and state["net.1.num_batches_tracked"] == 8
    for name, value in plain.state_dict().items():
        assert torch.equal(value, state[name]), name


class _Recorded(LIBAnalysis):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorder: RecordingReduce | None = None

    def _reduce(self, trainer):
        self.recorder = RecordingReduce(trainer.lightning_module.device)
        return self.recorder


def test_every_tensor_the_callback_reduces_lives_on_the_model_device(tmp_path):
    cb = _Recorded(BN_LAYERS, every_n_steps=2, size=64, batch_size=32, relu_layers=["net.2"])
    with DevicelessFactories():
        _bn_run(tmp_path, [cb])
    assert cb.analysed_steps == [0, 2, 4, 6, 8] and cb.recorder.seen > 20


def test_too_few_examples_for_the_processes_is_refused_alike_on_every_rank():
    """The check needs only the set's size and the world size: every rank raises, none waits in a collective."""
    cb = LIBAnalysis(BN_LAYERS, every_n_steps=2, size=3)
    inputs = torch.randn(3, 5)
    for rank in range(2):
        trainer = SimpleNamespace(world_size=2, global_rank=rank)
        with pytest.raises(ValueError, match="the analysis set has 3 examples for 2 processes: every process needs at least 2"):
            cb._shard(trainer, inputs, torch.device("cpu"))
    batches, index = cb._shard(SimpleNamespace(world_size=2, global_rank=1), torch.randn(5, 5), torch.device("cpu"))
    assert index.tolist() == [1, 3] and [b.shape[0] for b in batches] == [2]


def test_a_failure_on_one_rank_is_raised_on_every_rank_after_the_first_collective():
    model = BatchNormNet()
    cb = LIBAnalysis(BN_LAYERS, every_n_steps=2, size=4, batch_size=2)
    cb._inputs = torch.randn(4, 5)
    trainer = SimpleNamespace(world_size=2, global_rank=0)
    other_failed = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="failed on another process before its first collective"):
        cb._prepare(trainer, model, lambda t: t + other_failed)
    cb._inputs = torch.randn(4, 7)  # this rank's forward fails: it still joins the collective, then raises
    joined = []
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        cb._prepare(trainer, model, lambda t: joined.append(t) or t)
    assert joined and joined[0].tolist() == [1.0, 0.0]
    cb._inputs = torch.randn(4, 5)
    batches, index, finite = cb._prepare(trainer, model.eval(), lambda t: t)
    assert finite and index.tolist() == [0, 2] and len(batches) == 1


def test_batch_size_below_two_is_refused():
    with pytest.raises(ValueError, match=r"batch_size must be >= 2 \(the cut check compares examples of a batch\), got 1"):
        LIBAnalysis(BN_LAYERS, every_n_steps=2, batch_size=1)


def test_two_processes_with_unequal_shards_and_batch_counts_equal_one_process(tmp_path):
    """9 examples on 2 gloo processes: shards of 5 and 4, in 3 and 2 batches of at most 2 (BatchEncodings).

    The set is drawn from the dataloader (its first 9 examples) and broadcast from rank zero.
    """
    L.seed_everything(0)
    model = BagOfTokens()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    data = PaddedTokens(shuffle=False)
    cb = _bag_callback(size=9, batch_size=2)
    trainer = _trainer(tmp_path, 1, [cb], accelerator="cpu", devices=2, strategy="ddp_spawn")
    trainer.fit(model, data)
    two = load_graphs(tmp_path / "lib" / "step_00000000.pt")

    reference = BagOfTokens()
    reference.load_state_dict(initial)
    x, _ = cb._first_examples(data.train_dataloader())
    shards = [nested.select(x, torch.arange(9)[rank::2]) for rank in range(2)]
    batches = [b for shard in shards for b in nested.split(shard, 2)]
    assert [nested.batch_size(b) for b in batches] == [2, 2, 1, 2, 2]
    one = build_graphs(reference, BAG_LAYERS, batches, forward=call_with_keywords, kinds=("lib", "pca"))
    for kind in ("lib", "pca"):
        assert one[kind].dims == two[kind].dims
        for a, b in zip(one[kind].layers, two[kind].layers):
            torch.testing.assert_close(a.lambdas, b.lambdas, rtol=1e-7, atol=1e-12)
        for a, b in zip(one[kind].edges, two[kind].edges):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    assert two["lib"].n_examples == 9


class _EncodingLLC(LLCCallback):
    def forward(self, model, batch):
        return model(**batch[0])

    def loss(self, output, batch):
        return F.cross_entropy(output, batch[1])


def test_the_llc_callback_takes_batches_of_batch_encodings(tmp_path):
    L.seed_everything(0)
    cb = _EncodingLLC(schedule="every", every_n_steps=2, num_chains=2, num_draws=4, num_burnin=2, batch_size=16,
                      num_batches=3, log_traces=False)
    _trainer(tmp_path, 4, [cb]).fit(BagOfTokens(), PaddedTokens())
    encoding, labels = cb._data["train"]
    assert type(encoding) is BatchEncoding and encoding["input_ids"].shape == (48, 7) and labels.shape == (48,)
    assert [step for step, _, _ in cb.history] == [2, 4]
    assert all(torch.isfinite(torch.tensor([mean, std])).all() for _, mean, std in cb.history)


def test_a_resumed_run_analyses_the_set_drawn_before_the_checkpoint(tmp_path):
    """A set drawn from a shuffling loader is kept in the checkpoint (loaded with torch's weights_only default)."""
    L.seed_everything(0)
    first = _bag_callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    _trainer(tmp_path, 6, [first, ckpt], enable_checkpointing=True).fit(BagOfTokens(), PaddedTokens())
    L.seed_everything(1)  # the loader now shuffles otherwise: drawing again would give other examples
    resumed = _bag_callback()
    _trainer(tmp_path, 9, [resumed]).fit(BagOfTokens(), PaddedTokens(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.analysed_steps == [0, 3, 6, 9]
    assert type(resumed._inputs) is BatchEncoding
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(resumed._inputs[key], first._inputs[key])


class _SequenceFirst(BagOfTokens):
    """Runs its MLP on (pos, batch, d) activations, as batch_first=False modules do."""

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids).transpose(0, 1)  # (pos, batch, d)
        return self.head(self.mlp(h)).mean(0)


def test_node_layers_whose_first_dimension_is_not_the_batch_are_named(tmp_path):
    cb = _bag_callback(size=16)
    with pytest.raises(ValueError, match=r"node layer 'mlp.0\[in\]' has 7 rows in dim 0 but the inputs hold 16 examples "
                                         r"\(activation read as \(7, 16, 8\)\): node layers must be batch first.*batch_first=False"):
        _trainer(tmp_path, 1, [cb]).fit(_SequenceFirst(), PaddedTokens())


def test_under_ddp_every_rank_analyses_the_set_rank_zero_drew():
    """Each rank's loader may shuffle or shard differently: rank zero's draw is broadcast, its failure raised."""
    drawn_by_rank_zero = PaddedTokens(n=8)
    sent = []

    def broadcast(obj, src):
        sent.append(obj)
        return rank_zero_obj

    cb = _bag_callback(size=5)
    rank_zero_obj = cb._first_examples(drawn_by_rank_zero.train_dataloader())
    strategy = SimpleNamespace(broadcast=broadcast)
    rank_one = SimpleNamespace(world_size=2, global_rank=1, datamodule=PaddedTokens(n=0), strategy=strategy)
    inputs = cb.analysis_inputs(rank_one, BagOfTokens())  # its own loader is empty: it gets rank zero's set
    assert len(sent) == 1 and sent[0].startswith("ValueError: ")  # what it failed with, sent to the broadcast
    assert torch.equal(inputs["input_ids"], rank_zero_obj[0]["input_ids"]) and cb._drawn

    rank_zero_obj = "ValueError: the train dataloader is empty: no analysis set"
    rank_one.datamodule = PaddedTokens(n=8)
    with pytest.raises(RuntimeError, match="rank 0 could not draw the analysis set: ValueError: the train dataloader is empty"):
        _bag_callback(size=5).analysis_inputs(rank_one, BagOfTokens())


class _PaddedTokensWithVal(PaddedTokens):
    def val_dataloader(self):
        return DataLoader(TensorDataset(*padded_tokens(64, 5)), batch_size=32, collate_fn=collate_encodings)


def test_the_ablation_callback_takes_batch_encodings(tmp_path):
    L.seed_everything(0)
    cb = Ablation(BAG_LAYERS, every_n_steps=4, size=40, batch_size=16, eval_size=48, eval_batch_size=16,
                  forward="tests.callbacks.structured:call_with_keywords")
    _trainer(tmp_path, 4, [cb], limit_val_batches=0).fit(BagOfTokens(), _PaddedTokensWithVal())
    inputs, labels = cb._data[0]
    assert type(inputs) is BatchEncoding and inputs["input_ids"].shape == (16, 7) and labels.shape == (16,)
    metrics = cb.history[-1]["metrics"]
    assert {"ablation/mlp.1/lib_features_required", "ablation/mlp.1->mlp.3/pca_edges_required"} <= set(metrics)
    assert 0 < metrics["ablation/baseline_acc"] <= 1


def test_a_cut_check_failing_on_one_rank_is_raised_on_every_rank_before_the_build():
    """The build's checks run in _prepare, before its first collective: a failing rank joins the flag
    collective and raises its CutError; the build then skips them (no rank left waiting in a reduce)."""
    model = BatchNormNet().eval()
    cb = LIBAnalysis(["net.0", "net.4[in]", "net.6"], every_n_steps=2, size=4, batch_size=2)
    cb._inputs = torch.randn(4, 5)
    trainer = SimpleNamespace(world_size=2, global_rank=0)
    joined = []
    seen = {}  # on this rank, the model input reaches net.4 around net.0: a bypass
    hooks = [model.register_forward_pre_hook(lambda m, args: seen.update(x=args[0])),
             model.net[3].register_forward_hook(lambda m, args, out: out + seen["x"][:, :1])]
    try:
        with pytest.raises(CutError, match=r"'net.0' -> 'net.4\[in\]' are not a cut"):
            cb._prepare(trainer, model, lambda t: joined.append(t) or t)
    finally:
        for hook in hooks:
            hook.remove()
    assert joined and joined[0].tolist() == [1.0, 0.0]
    other_failed = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="failed on another process before its first collective"):
        cb._prepare(trainer, model, lambda t: t + other_failed)  # this rank's checks pass; the other's did not
