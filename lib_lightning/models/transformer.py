"""One-layer transformer for modular addition (the grokking setting).

The standard configuration of the grokking literature: d_model 128, 4 heads of 32, d_mlp 512, ReLU,
no LayerNorm, learned positional embedding, causal attention, logits read at the last position.

Named hook points (``nn.Identity`` modules, so analysis code can hook them by name):

==================  =========================  =====================================================
module name         output shape               meaning
==================  =========================  =====================================================
``hook_resid_pre``  ``(batch, n_ctx, d_model)``  residual stream after token + positional embedding
``hook_resid_mid``  ``(batch, 1, d_model)``      residual stream after attention, last position only
``hook_resid_post`` ``(batch, 1, d_model)``      residual stream after the MLP, last position only
``hook_mlp_hidden`` ``(batch, 1, d_mlp)``        MLP hidden activations after the ReLU
``hook_logits``     ``(batch, d_vocab_out)``     logits at the last position
==================  =========================  =====================================================

Only the last position's output is ever read, so queries, the attention output, the MLP and the
unembedding are computed there alone (keys and values still see every position). This is exact and
halves the step time. The residual hooks and the logits form a chain of cuts (each is a function of
the previous one alone), which is what the LIB analysis needs. ``hook_mlp_hidden`` is not a cut between
``hook_resid_mid`` and ``hook_resid_post`` (the residual connection bypasses it); it is there for
neuron-level statistics such as ReLU co-activation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ModAddTransformer"]


class Attention(nn.Module):
    """Multi-head causal self-attention whose query is the last position only."""

    def __init__(self, d_model: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        self.q = nn.Linear(d_model, n_heads * d_head)
        self.k = nn.Linear(d_model, n_heads * d_head)
        self.v = nn.Linear(d_model, n_heads * d_head)
        self.o = nn.Linear(n_heads * d_head, d_model)

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        """``resid (batch, pos, d_model)`` -> attention output at the last position ``(batch, 1, d_model)``.

        The last position may attend to every position, so the causal mask is empty for it.
        """
        batch, pos, _ = resid.shape
        heads, d_head = self.n_heads, self.d_head
        q = self.q(resid[:, -1:]).view(batch, 1, heads, d_head).transpose(1, 2)  # (batch, heads, 1, d_head)
        k = self.k(resid).view(batch, pos, heads, d_head).transpose(1, 2)  # (batch, heads, pos, d_head)
        v = self.v(resid).view(batch, pos, heads, d_head).transpose(1, 2)  # (batch, heads, pos, d_head)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_head)  # (batch, heads, 1, pos)
        z = scores.softmax(dim=-1) @ v  # (batch, heads, 1, d_head)
        z = z.transpose(1, 2).reshape(batch, 1, heads * d_head)  # (batch, 1, heads * d_head)
        return self.o(z)


class ModAddTransformer(nn.Module):
    """One-layer, LayerNorm-free transformer reading ``a b =`` and predicting ``(a + b) mod p``.

    Args:
        p: the modulus. The vocabulary is ``0 .. p-1`` plus the ``=`` token ``p``; outputs are ``p`` logits.
        d_model, n_heads, d_head, d_mlp: widths.
        n_ctx: sequence length (3 for ``a b =``).
    """

    def __init__(
        self,
        p: int = 113,
        d_model: int = 128,
        n_heads: int = 4,
        d_head: int = 32,
        d_mlp: int = 512,
        n_ctx: int = 3,
    ) -> None:
        super().__init__()
        if p < 2:
            raise ValueError(f"p must be >= 2, got p={p}")
        self.p, self.n_ctx = p, n_ctx
        self.embed = nn.Embedding(p + 1, d_model)
        self.pos_embed = nn.Parameter(torch.randn(n_ctx, d_model) / math.sqrt(d_model))
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(d_model))
        self.hook_resid_pre = nn.Identity()
        self.attn = Attention(d_model, n_heads, d_head)
        self.hook_resid_mid = nn.Identity()
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.hook_mlp_hidden = nn.Identity()
        self.mlp_out = nn.Linear(d_mlp, d_model)
        self.hook_resid_post = nn.Identity()
        self.unembed = nn.Linear(d_model, p)
        self.hook_logits = nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (batch, n_ctx)`` of ints -> logits ``(batch, p)`` at the last position."""
        batch, pos = tokens.shape
        if pos > self.n_ctx:
            raise ValueError(f"sequence length {pos} exceeds n_ctx={self.n_ctx}")
        resid = self.embed(tokens) + self.pos_embed[:pos]  # (batch, pos, d_model)
        resid = self.hook_resid_pre(resid)
        resid = resid[:, -1:] + self.attn(resid)  # (batch, 1, d_model)
        resid = self.hook_resid_mid(resid)
        hidden = self.hook_mlp_hidden(torch.relu(self.mlp_in(resid)))  # (batch, 1, d_mlp)
        resid = resid + self.mlp_out(hidden)  # (batch, 1, d_model)
        resid = self.hook_resid_post(resid)
        return self.hook_logits(self.unembed(resid[:, 0]))  # (batch, p)
