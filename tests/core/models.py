"""Small float64 models for the core tests: asymmetric widths so a transpose fails."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """in (4) -> h0 (6) -> h1 (7) -> out (3); hooks ``inp``, ``h0``, ``h1``, ``out``."""

    def __init__(self, widths=(4, 6, 7, 3), bias: bool = True, act: type[nn.Module] = nn.ReLU, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.inp = nn.Identity()
        self.l0 = nn.Linear(widths[0], widths[1], bias=bias)
        self.a0 = act()
        self.h0 = nn.Identity()
        self.l1 = nn.Linear(widths[1], widths[2], bias=bias)
        self.a1 = act()
        self.h1 = nn.Identity()
        self.l2 = nn.Linear(widths[2], widths[3], bias=bias)
        self.out = nn.Identity()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
        self.double()

    def forward(self, x):
        h0 = self.h0(self.a0(self.l0(self.inp(x))))
        h1 = self.h1(self.a1(self.l1(h0)))
        return self.out(self.l2(h1))


class Residual(nn.Module):
    """A residual block: ``out = x + W2 relu(W1 x)``; the hidden layer is NOT a cut between in and out."""

    def __init__(self, d=5, hidden=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Identity()
        self.l1 = nn.Linear(d, hidden)
        self.hidden = nn.Identity()
        self.l2 = nn.Linear(hidden, d)
        self.out = nn.Identity()
        self.double()

    def forward(self, x):
        x = self.inp(x)
        return self.out(x + self.l2(self.hidden(torch.relu(self.l1(x)))))


class TinyTransformer(nn.Module):
    """One attention layer over 4 positions, read at the last one: a 4 -> 1 position section.

    Hooks: ``resid_pre`` (batch, 4, d), ``resid_mid`` (batch, 1, d), ``logits`` (batch, n_out).
    """

    def __init__(self, vocab=7, d=5, n_out=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(4, d))
        self.resid_pre = nn.Identity()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.resid_mid = nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, n_out))
        self.logits = nn.Identity()
        self.double()

    def forward(self, tokens):
        x = self.resid_pre(self.embed(tokens) + self.pos)  # (batch, 4, d)
        scores = self.q(x[:, -1:]) @ self.k(x).transpose(1, 2) / x.shape[-1] ** 0.5  # (batch, 1, 4)
        x = self.resid_mid(x[:, -1:] + scores.softmax(-1) @ self.v(x))  # (batch, 1, d)
        return self.logits(self.mlp(x[:, 0]))


def mlp_inputs(n=300, d=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    # an affine, anisotropic input distribution: nonzero mean and unequal variances
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.3, 0.0, 0.2], [0.0, 0.5, 0.4, 0.0], [0.1, 0.0, 2.0, 0.3], [0.0, 0.0, 0.2, 0.8]], dtype=torch.float64
    )[:d, :d] + torch.arange(1, d + 1, dtype=torch.float64) * 0.3


def tiny_gpt2(vocab=13, n_positions=8, seed=0):
    """A 2-layer GPT-2 (d 64) from a config, random weights, float64, eval mode: nothing downloaded."""
    import transformers

    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=vocab, n_positions=n_positions,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def padded_tokens(n=16, length=8, vocab=13, seed=0):
    """Dict inputs ``input_ids``, ``attention_mask`` ``(n, length)``: right-padded with 0, lengths 3..length."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def hf_forward(model, inputs):
    """Calls a HuggingFace model with dict inputs."""
    return model(**inputs)
