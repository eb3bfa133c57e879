import pytest
import torch

from lib_lightning.models.cifar import CifarCNN, CifarMLP, cifar_resnet18
from lib_lightning.models.transformer import ModAddTransformer


def _run_with_hooks(model, inputs, replace=None):
    """Forward ``inputs``, recording every hook point's output in call order.

    ``replace={name: tensor}`` substitutes that hook point's output (the section-by-substitution of the
    LIB analysis).
    """
    outputs = {}

    def hook(module, args, out, name):
        if replace is not None and name in replace:
            out = replace[name]
        outputs[name] = out
        return out

    names = [n for n, _ in model.named_modules() if n.startswith("hook_")]
    handles = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n in names]
    try:
        logits = model(inputs)
    finally:
        for h in handles:
            h.remove()
    return logits, outputs


def _is_cut(model, inputs, node, downstream):
    """Whether ``downstream`` is a function of ``node`` alone on these inputs.

    Substitute, at ``node``, the activations of the same examples in reverse order: if ``node`` is a cut,
    ``downstream`` must then equal the reversed examples' own activations.
    """
    _, clean = _run_with_hooks(model, inputs)
    flipped = inputs.flip(0)
    _, patched = _run_with_hooks(model, inputs, replace={node: clean[node].flip(0)})
    _, reference = _run_with_hooks(model, flipped)
    return torch.allclose(patched[downstream], reference[downstream], rtol=1e-12, atol=1e-12)


def test_mlp_hook_shapes_and_order():
    model = CifarMLP()
    logits, outputs = _run_with_hooks(model, torch.randn(5, 3, 32, 32))
    assert logits.shape == (5, 10)
    assert {name: tuple(out.shape) for name, out in outputs.items()} == {
        "hook_in": (5, 3072),
        "hook_hidden_0": (5, 100),
        "hook_hidden_1": (5, 100),
        "hook_logits": (5, 10),
    }
    assert tuple(outputs) == model.hook_points  # hook_points lists them in forward order
    assert torch.equal(outputs["hook_logits"], logits)
    assert sum(p.numel() for p in model.parameters()) == 3072 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10


def test_mlp_input_hook_is_the_channel_major_flattening():
    images = torch.randn(2, 3, 32, 32)
    _, outputs = _run_with_hooks(CifarMLP(widths=(7,)), images)
    assert torch.equal(outputs["hook_in"][1, 1024 * 2 + 32 * 5 + 9], images[1, 2, 5, 9])


def test_cnn_hook_shapes_and_order():
    model = CifarCNN()
    logits, outputs = _run_with_hooks(model, torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    assert {name: tuple(out.shape) for name, out in outputs.items()} == {
        "hook_in": (4, 3, 32, 32),
        "hook_block_0": (4, 32, 16, 16),
        "hook_block_1": (4, 64, 8, 8),
        "hook_block_2": (4, 64, 4, 4),
        "hook_pooled": (4, 64),
        "hook_logits": (4, 10),
    }
    assert tuple(outputs) == model.hook_points
    torch.testing.assert_close(outputs["hook_pooled"], outputs["hook_block_2"].mean(dim=(2, 3)), rtol=0, atol=0)


def test_cnn_two_blocks_and_other_widths():
    model = CifarCNN(channels=(8, 5), num_classes=3)
    logits, outputs = _run_with_hooks(model, torch.randn(2, 3, 32, 32))
    assert model.hook_points == ("hook_in", "hook_block_0", "hook_block_1", "hook_pooled", "hook_logits")
    assert outputs["hook_block_1"].shape == (2, 5, 8, 8) and logits.shape == (2, 3)


@pytest.mark.parametrize(
    "make", [lambda: CifarMLP(widths=(12, 9, 7)), lambda: CifarCNN(channels=(4, 6, 5))], ids=["mlp", "cnn"]
)
def test_every_hook_point_is_a_cut(make):
    torch.manual_seed(0)
    model = make().double()
    inputs = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    points = model.hook_points
    for node, downstream in zip(points, points[1:]):
        assert _is_cut(model, inputs, node, downstream), (node, downstream)
    for node in points[:-1]:  # hence every node layer determines the logits
        assert _is_cut(model, inputs, node, "hook_logits"), node


def test_cut_check_can_fail():
    """The transformer's MLP hidden layer is bypassed by the residual stream: not a cut."""
    torch.manual_seed(0)
    model = ModAddTransformer(p=7, d_model=8, n_heads=2, d_head=4, d_mlp=16).double()
    tokens = torch.randint(0, 7, (5, 3))
    assert not _is_cut(model, tokens, "hook_mlp_hidden", "hook_resid_post")
    assert _is_cut(model, tokens, "hook_resid_mid", "hook_resid_post")


def test_linear_mlp_without_hidden_layers():
    model = CifarMLP(widths=())
    assert model.hook_points == ("hook_in", "hook_logits")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CifarMLP(widths=(100, 0)), r"every width must be >= 1, got widths=\(100, 0\)"),
        (lambda: CifarMLP(num_classes=0), "num_classes must be >= 1, got 0"),
        (lambda: CifarCNN(channels=()), r"channels must name 1 to 5 blocks, got channels=\(\)"),
        (lambda: CifarCNN(channels=(8,) * 6), "channels must name 1 to 5 blocks"),
        (lambda: CifarCNN(channels=(8, -1)), r"every channel count must be >= 1, got channels=\(8, -1\)"),
        (lambda: CifarCNN(num_classes=0), "num_classes must be >= 1, got 0"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_resnet18_keeps_32x32_resolution_through_the_stem():
    model = cifar_resnet18(num_classes=7).eval()
    shapes = {}
    hooks = [
        getattr(model, name).register_forward_hook(lambda m, a, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name in ("layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
    ]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert shapes == {
        "layer1": (2, 64, 32, 32), "layer2": (2, 128, 16, 16), "layer3": (2, 256, 8, 8),
        "layer4": (2, 512, 4, 4), "avgpool": (2, 512, 1, 1), "fc": (2, 7),
    }
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        cifar_resnet18(num_classes=0)
