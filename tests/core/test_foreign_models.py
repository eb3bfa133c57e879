"""``build_graphs`` on architectures nobody here wrote: torchvision CNNs with BatchNorm (conv maps as
positions), HuggingFace transformers on padded dict batches, recurrent networks with tuple outputs, and
the refusals (an encoder-decoder whose target bypasses the encoder, a ``batch_first=False`` layer).

Random weights, float64, a few examples: these check that the analysis runs and returns finite results of
the documented shapes, or refuses with a clear message; the numbers themselves are checked elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_lightning.core import CutError, IndependenceError, build_graphs
from tests.core.models import hf_forward, padded_tokens, tiny_gpt2

torchvision = pytest.importorskip("torchvision")


def _check(graphs, shapes):
    """Finite Lambdas and edges; ``edges[l]`` is ``(d_lib[l+1], d_lib[l])``; basis rows = ``d + 1``."""
    for kind, graph in graphs.items():
        assert [b.basis.shape[0] for b in graph.layers[:-1]] == [d + 1 for d in shapes[:-1]], kind
        for l, edges in enumerate(graph.edges):
            assert edges.shape == (graph.dims[l + 1], graph.dims[l]), kind
            assert torch.isfinite(edges).all(), kind
        assert all(torch.isfinite(b.lambdas).all() for b in graph.layers), kind


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


CNNS = [
    # (constructor, node layers at block outputs, channels of each node layer)
    ("resnet18", ["layer1", "layer2.0"], [64, 128]),
    pytest.param("resnet34", ["layer1.2", "layer2.0"], [64, 128], marks=pytest.mark.slow),
    ("mobilenet_v3_small", ["features.1", "features.2", "features.3"], [16, 24, 24]),
    ("efficientnet_b0", ["features.1", "features.2.0"], [16, 24]),
    ("regnet_x_400mf", ["trunk_output.block1", "trunk_output.block2.block2-0"], [32, 64]),
]


@pytest.mark.parametrize("name, layers, channels", CNNS)
def test_torchvision_cnn_blocks_as_positions_of_channels(name, layers, channels):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    graphs = build_graphs(model, layers, [_images(8)], kinds=("lib", "pca"), position_sources=1)
    _check(graphs, channels)


@pytest.mark.slow
def test_resnet18_every_block_to_the_logits():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = _images(16)
    layers = ["layer1", "layer2", "layer3", "layer4", "fc"]
    graphs = build_graphs(model, layers, [x[:8], x[8:]], kinds=("lib", "pca"), position_sources=1)
    _check(graphs, [64, 128, 256, 512, 10])


def test_resnet18_stem_is_not_a_cut_of_a_block_with_its_shortcut():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(CutError, match=r"'layer1.0.bn2' -> 'layer1.0' are not a cut"):
        build_graphs(model, ["layer1.0.bn2", "layer1.0"], [_images(8)])


def test_tiny_gpt2_on_padded_batches():
    pytest.importorskip("transformers")
    layers = ["transformer.h.0", "transformer.h.1", "lm_head"]
    graphs = build_graphs(tiny_gpt2(), layers, [padded_tokens(8)], forward=hf_forward, kinds=("lib", "pca"), position_sources=1)
    _check(graphs, [64, 64, 13])


def _bert():
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=13, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=8, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(cfg).double().eval()


def _llama():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=13, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=8, attn_implementation="eager",
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaModel(cfg).double().eval()


@pytest.mark.parametrize("make, layers, dims", [(_bert, ["encoder.layer.0", "encoder.layer.1"], [32, 32]), (_llama, ["layers.0", "layers.1", "norm"], [32, 32, 32])], ids=["bert", "llama"])
def test_hf_encoder_and_decoder_on_padded_batches(make, layers, dims):
    pytest.importorskip("transformers")
    model, inputs = make(), padded_tokens(16)
    graphs = build_graphs(model, layers, [inputs], forward=hf_forward, kinds=("lib", "pca"), position_sources=1)
    _check(graphs, dims)
    # examples with different masks are not interchangeable: the mask is context, held fixed by default
    with pytest.raises(CutError, match=rf"'{layers[0]}' -> '{layers[1]}' are not a cut.*no context inputs held fixed"):
        build_graphs(model, layers, [inputs], forward=hf_forward, context_inputs=())


class Recurrent(nn.Module):
    """Embedding -> ``nn.LSTM`` or ``nn.GRU`` (batch first, tuple outputs) -> linear head over every step."""

    def __init__(self, cell: type[nn.Module], vocab=11, d=6, hidden=7, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.rnn, self.head = nn.Embedding(vocab, d), cell(d, hidden, batch_first=True), nn.Linear(hidden, 5)
        self.double()

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_recurrent_tuple_outputs(cell):
    tokens = torch.randint(0, 11, (16, 5), generator=torch.Generator().manual_seed(0))
    graphs = build_graphs(Recurrent(cell), ["embed", "rnn[out:0]", "head"], [tokens], kinds=("lib", "pca"))
    _check(graphs, [6, 7, 5])


def test_lightning_simple_lstm_with_its_hidden_state_argument():
    from lightning.pytorch.demos.lstm import SimpleLSTM

    torch.manual_seed(0)
    model = SimpleLSTM(vocab_size=17, ninp=8, nhid=6, nlayers=2).double()
    tokens = torch.randint(0, 17, (12, 4), generator=torch.Generator().manual_seed(0))
    forward = lambda m, x: m(x, m.init_hidden(x.shape[0]))  # noqa: E731  the hidden state is made per batch
    layers = ["encoder", "rnn[out:0]", "decoder"]
    graphs = build_graphs(model, layers, [tokens], forward=forward, kinds=("lib", "pca"), position_sources=1)
    _check(graphs, [8, 6, 17])
    with pytest.raises(TypeError, match=r"'rnn': the output of module 'rnn' is a tuple of 2: \[0\] Tensor \(12, 4, 6\), \[1\] tuple of 2; pick a tensor with 'rnn\[out:0\]'"):
        build_graphs(model, ["encoder", "rnn", "decoder"], [tokens], forward=forward)


def test_lightning_demo_transformer_target_bypasses_the_encoder():
    from lightning.pytorch.demos.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=17, ninp=8, nhead=2, nhid=16, nlayers=1).double()
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(0, 17, (8, 5), generator=gen), torch.randint(0, 17, (8, 5), generator=gen)
    with pytest.raises(CutError, match=r"'transformer.encoder' -> 'decoder' are not a cut"):
        build_graphs(model, ["transformer.encoder", "decoder"], [(src, tgt)], forward=lambda m, x: m(*x))


def test_transformer_encoder_not_batch_first_is_refused():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=False)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).double()
    x = torch.randn(6, 5, 8, dtype=torch.float64)
    with pytest.raises(IndependenceError, match=r"'layers.0' -> 'layers.1': the batch dimension is mixed.*batch_first"):
        build_graphs(model, ["layers.0", "layers.1"], [x])
