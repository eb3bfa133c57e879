import pytest
import torch

from lib_lightning.models.transformer import ModAddTransformer


def _hook_shapes(model, tokens):
    shapes = {}
    handles = [
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
        for name in ("hook_resid_pre", "hook_resid_mid", "hook_mlp_hidden", "hook_resid_post", "hook_logits")
    ]
    out = model(tokens)
    for h in handles:
        h.remove()
    return out, shapes


def test_output_and_hook_shapes():
    model = ModAddTransformer(p=13, d_model=16, n_heads=2, d_head=8, d_mlp=24)
    tokens = torch.randint(0, 13, (5, 3))
    out, shapes = _hook_shapes(model, tokens)
    assert out.shape == (5, 13)
    assert shapes == {
        "hook_resid_pre": (5, 3, 16),
        "hook_resid_mid": (5, 1, 16),
        "hook_mlp_hidden": (5, 1, 24),
        "hook_resid_post": (5, 1, 16),
        "hook_logits": (5, 13),
    }


def test_last_position_attention_equals_full_causal_attention():
    """Computing the query at the last position only must equal full causal attention read there."""
    torch.manual_seed(0)
    model = ModAddTransformer(p=13, d_model=16, n_heads=2, d_head=8, d_mlp=24).double()
    tokens = torch.randint(0, 14, (6, 3))
    attn = model.attn
    resid = (model.embed(tokens) + model.pos_embed).double()
    batch, pos, _ = resid.shape
    q = attn.q(resid).view(batch, pos, 2, 8).transpose(1, 2)
    k = attn.k(resid).view(batch, pos, 2, 8).transpose(1, 2)
    v = attn.v(resid).view(batch, pos, 2, 8).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(pos, pos, dtype=torch.bool), 1), float("-inf"))
    z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, pos, 16)
    full = attn.o(z)[:, -1:]
    torch.testing.assert_close(attn(resid), full, rtol=1e-12, atol=1e-12)


def test_deterministic_under_seed():
    torch.manual_seed(3)
    a = ModAddTransformer(p=13, d_model=16, n_heads=2, d_head=8, d_mlp=24)
    torch.manual_seed(3)
    b = ModAddTransformer(p=13, d_model=16, n_heads=2, d_head=8, d_mlp=24)
    tokens = torch.randint(0, 13, (4, 3))
    assert torch.equal(a(tokens), b(tokens))


def test_bad_modulus():
    with pytest.raises(ValueError, match="p must be >= 2, got p=1"):
        ModAddTransformer(p=1)
