"""Property-based checks of LIB_SPEC.md §10 on small random architectures, against torch.func.jacrev.

Architectures: 1-3 sections, each a per-position MLP layer (ReLU, GELU, tanh or none; bias on or off),
a residual-free attention layer over 1-3 positions (optionally read at the last position only) or a
causal Conv1d over 2-4 positions (written as transpose, conv, transpose, so the model itself outputs
``(batch, pos, d)`` at every node layer). Inputs: random widths, scales and offsets; random batchings,
chunkings and shardings.

The default run draws a fixed, small number of examples per test (``derandomize=True``: the same ones in
every run, about 25 in all); ``LIB_PROPERTY_SCALE=k`` multiplies the counts, and the ``slow`` test draws
more with random seeds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jacrev, vmap

from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.capture import NodeLayer
from lib_lightning.core.lib.integration import integration_rule
from lib_lightning.core.lib.jacobian import edge_attributions, integrated_jacobian
from tests.core.lib.test_build import _two_process_graphs

SCALE = int(os.environ.get("LIB_PROPERTY_SCALE", "1"))
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "none": nn.Identity}


def _settings(examples: int, **kwargs) -> settings:
    return settings(
        max_examples=examples * SCALE, derandomize=True, deadline=None, database=None, print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], **kwargs,
    )


# --- random architectures --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    kind: str  # "mlp", "attn" or "conv"
    d_out: int
    act: str = "none"
    bias: bool = True
    last_only: bool = False  # attention read at the last position only (P -> 1)


@dataclass(frozen=True)
class Arch:
    d_in: int
    pos: int
    sections: tuple[Section, ...]
    seed: int
    n: int
    scale: float
    offset: float

    @property
    def layers(self) -> list[str]:
        return [f"hooks.{i}" for i in range(len(self.sections) + 1)]


class Block(nn.Module):
    """One section: ``(batch, pos, d_in)`` -> ``(batch, pos', d_out)``."""

    def __init__(self, section: Section, d_in: int, gen: torch.Generator):
        super().__init__()
        self.section = section
        d_out = section.d_out
        if section.kind == "mlp":
            self.lin = nn.Linear(d_in, d_out, bias=section.bias)
        elif section.kind == "attn":
            self.q, self.k, self.v = (nn.Linear(d_in, d_out, bias=section.bias) for _ in range(3))
        else:
            self.conv = nn.Conv1d(d_in, d_out, kernel_size=2, padding=1, bias=section.bias)
        self.act = ACTS[section.act]()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(max(d_in, 2)) * 1.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.section.kind
        if kind == "mlp":
            return self.act(self.lin(x))
        if kind == "attn":
            q = self.q(x[:, -1:] if self.section.last_only else x)  # (batch, pos', d_out)
            scores = q @ self.k(x).transpose(1, 2) / math.sqrt(q.shape[-1])  # (batch, pos', pos)
            return self.act(scores.softmax(-1) @ self.v(x))
        pos = x.shape[1]
        return self.act(self.conv(x.transpose(1, 2))[..., :pos].transpose(1, 2))  # causal: (batch, pos, d_out)


class RandomNet(nn.Module):
    """Node layers ``hooks.0`` (the input) ... ``hooks.L`` (the output), each an ``nn.Identity``."""

    def __init__(self, arch: Arch):
        super().__init__()
        gen = torch.Generator().manual_seed(arch.seed)
        widths = [arch.d_in] + [s.d_out for s in arch.sections]
        self.blocks = nn.ModuleList(Block(s, d, gen) for s, d in zip(arch.sections, widths))
        self.hooks = nn.ModuleList(nn.Identity() for _ in widths)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hooks[0](x)
        for block, hook in zip(self.blocks, self.hooks[1:]):
            x = hook(block(x))
        return x


@st.composite
def architectures(
    draw, kinds=("mlp", "attn", "conv"), acts=tuple(ACTS), bias=None, min_sections=1, max_sections=3, pos=None
):
    n_pos = draw(st.integers(1, 4)) if pos is None else pos
    sections, p = [], n_pos
    for _ in range(draw(st.integers(min_sections, max_sections))):
        allowed = [k for k in kinds if (k != "attn" or p <= 3) and (k != "conv" or p >= 2)]
        kind = draw(st.sampled_from(allowed or ["mlp"]))
        last_only = kind == "attn" and p > 1 and draw(st.booleans())
        has_bias = draw(st.booleans()) if bias is None else bias
        sections.append(Section(kind, draw(st.integers(2, 5)), draw(st.sampled_from(acts)), has_bias, last_only))
        p = 1 if last_only else p
    return Arch(
        d_in=draw(st.integers(2, 4)), pos=n_pos, sections=tuple(sections), seed=draw(st.integers(0, 2**16)),
        n=draw(st.integers(24, 48)), scale=draw(st.sampled_from([0.1, 1.0, 5.0])),
        offset=draw(st.sampled_from([0.0, 1.0, -3.0, 30.0])),
    )


def inputs(arch: Arch) -> torch.Tensor:
    """``(n, pos, d_in)``: correlated, anisotropic, scaled and offset."""
    gen = torch.Generator().manual_seed(arch.seed + 1)
    eye = torch.eye(arch.d_in, dtype=torch.float64)
    mix = torch.randn(arch.d_in, arch.d_in, generator=gen, dtype=torch.float64) + eye
    x = torch.randn(arch.n, arch.pos, arch.d_in, generator=gen, dtype=torch.float64) @ mix
    return arch.scale * x + arch.offset


def random_batches(x: torch.Tensor, data) -> list[torch.Tensor]:
    if len(x) < 4:
        return [x]
    cuts = sorted(set(data.draw(st.lists(st.integers(2, len(x) - 1), max_size=3))))  # the cut check needs 2
    bounds = [0, *cuts, len(x)]
    return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# --- jacrev references -----------------------------------------------------------------------------------------


def node_acts(model: RandomNet, x: torch.Tensor) -> list[torch.Tensor]:
    acts = [x]
    with torch.no_grad():
        for block in model.blocks:
            acts.append(block(acts[-1]))
    return acts


def section_jacobian(block: Block, acts: torch.Tensor) -> torch.Tensor:
    """``(N, P', d', P, d)`` by jacrev, one example at a time."""
    return vmap(jacrev(lambda f: block(f[None])[0]))(acts).detach()


def m_prime_ref(jac: torch.Tensor, basis_out) -> torch.Tensor:
    """M′ ``(d + 1, d + 1)`` = Σ_{x,t,i,s} J̄_{(t,i),(s,j)} J̄_{(t,i),(s,j′)} / (N P); constant row/column 0."""
    n, _, d_out, pos, d = jac.shape
    g = torch.einsum("ntasj,ai->ntisj", jac, basis_out.basis[:d_out])  # ĝ's Jacobian
    m = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    m[:d, :d] = torch.einsum("ntisj,ntisk->jk", g, g) / (n * pos)
    return m


def edges_ref(jac: torch.Tensor, acts: torch.Tensor, basis_in, basis_out) -> torch.Tensor:
    """E_ij = Σ_{x,t} (Σ_s ∂ĥ_{t,i}/∂f̂_{s,j} f̂_{s,j})² / (N P), ĥ(f̂) = F(f̂ C⁺) C_out (spec §4)."""
    n, _, d_out, pos, d = jac.shape
    g = torch.einsum("ntasj,ai->ntisj", jac, basis_out.basis[:d_out])
    dh = torch.einsum("ntisa,ka->ntisk", g, basis_in.basis_pinv[:, :d])  # ∂ĥ/∂f̂
    f_hat = basis_in.transform(acts)  # (N, P, k_in)
    a = torch.einsum("ntisk,nsk->ntik", dh, f_hat)
    return a.square().sum((0, 1)) / (n * pos)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol_rel: float) -> None:
    """assert_close with an absolute tolerance relative to the largest entry of the reference."""
    if b.numel() == 0:
        assert a.numel() == 0
        return
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol_rel * float(b.abs().max()) + 1e-300)


def important(lambdas: torch.Tensor, has_constant: bool, floor: float = 1e-6) -> torch.Tensor:
    """Indices of the non-constant features with Λ above ``floor`` × the largest (well-conditioned)."""
    start = int(has_constant)
    lam = lambdas[start:]
    if lam.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    return (lam > floor * lam.max()).nonzero().flatten() + start


# --- properties ------------------------------------------------------------------------------------------------


@_settings(8)
@given(arch=architectures(), data=st.data())
def test_bases_and_edges_match_jacrev_and_the_spec_invariants(arch, data):
    """T1, T2, T3 (via M′ by jacrev), T5 (linear per-position sections), T11, T15 (as §11 departs: the
    output constant has no Jacobian), and
    the edges of LIB and PCA against jacrev, for any batching and chunking."""
    event(" ".join(f"{s.kind}/{s.act}" for s in arch.sections) + f" pos={arch.pos}")
    model, x = RandomNet(arch), inputs(arch)
    chunk = data.draw(st.integers(5, arch.n))
    graphs = build_graphs(model, arch.layers, random_batches(x, data), kinds=("lib", "pca"), chunk_size=chunk)
    acts = node_acts(model, x)
    for kind, graph in graphs.items():
        for layer, a in zip(graph.layers, acts):
            k = layer.d_lib
            eye = torch.eye(k, dtype=torch.float64)
            close(layer.basis_pinv @ layer.basis, eye, 1e-8, 1e-8)  # T1
            proj = layer.basis @ layer.basis_pinv
            close(proj @ proj, proj, 1e-8, 1e-8)
            f_hat = layer.transform(a).reshape(-1, k)  # (N P, k)
            second = f_hat.T @ f_hat / f_hat.shape[0]
            if kind == "lib" and layer.kind == "lib":  # T2 over the non-constant features
                keep = important(layer.lambdas, layer.has_constant, 0.0)
                close(second[keep][:, keep], torch.diag(layer.lambdas[keep]), 1e-7, 1e-9)
            if layer.has_constant:  # T11: f̂₀ ≡ ±√Λ₀ (±1 if Λ₀ vanishes, or PCA), C⁺[a, bias] = 0, E f̂_a = 0
                lam0 = float(layer.lambdas[0]) if layer.kind == "lib" and layer.lambdas[0] > 1e-12 else 1.0
                close(f_hat[:, 0].abs(), torch.full_like(f_hat[:, 0], math.sqrt(lam0)), 1e-9, 0)
                if k > 1:
                    assert float(layer.basis_pinv[1:, -1].abs().max()) <= 1e-9 * float(layer.basis_pinv.abs().max())
                    assert float(f_hat[:, 1:].mean(0).abs().max()) <= 1e-9 * float(f_hat[:, 1:].abs().max())
        for sec, block in enumerate(model.blocks):
            jac = section_jacobian(block, acts[sec])
            basis_in, basis_out = graph.layers[sec], graph.layers[sec + 1]
            close(graph.edges[sec], edges_ref(jac, acts[sec], basis_in, basis_out), 1e-7, 1e-9)
            if basis_out.has_constant:  # T15 as §11 departs: the output constant receives no edge
                assert float(graph.edges[sec][0].abs().max()) == 0.0
            if kind == "lib":  # T3: M̂ = C⁺ M′ C⁺ᵀ is the identity outside the masked constant
                m_hat = basis_in.basis_pinv @ m_prime_ref(jac, basis_out) @ basis_in.basis_pinv.T
                keep = important(basis_in.lambdas, basis_in.has_constant)
                sub = m_hat[keep][:, keep]
                close(sub, torch.eye(len(keep), dtype=torch.float64), 1e-6, 1e-6)
                if arch.sections[sec].kind == "mlp" and arch.sections[sec].act == "none":  # T5: Σ_i E_ij = Λ_j
                    close(graph.edges[sec][:, keep].sum(0), basis_in.lambdas[keep], 1e-6, 1e-9)


def _projector(layer) -> torch.Tensor:
    """C C⁺ over the important features (Λ above 1e-6 of the largest, and the constant): the same for any
    basis of that subspace. Features near the truncation threshold are left out: their directions are
    defined only to rounding."""
    keep = torch.cat([torch.arange(int(layer.has_constant)), important(layer.lambdas, layer.has_constant)])
    return layer.basis[:, keep] @ layer.basis_pinv[keep]


def _separated(lambdas: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Whether the kept Λ are pairwise apart by more than ``rtol`` relative (features defined up to sign)."""
    lam = torch.sort(lambdas).values
    gaps = (lam[1:] - lam[:-1]) / lam[1:].clamp_min(1e-300)
    return bool((gaps > rtol).all())


@_settings(5)
@given(arch=architectures(), data=st.data())
def test_sharded_permuted_and_rebatched_data_give_the_same_graphs(arch, data):
    """Two processes (sum-reduced shards) = one process; a permuted dataset gives the same Λ and kept
    subspaces, and the same edges wherever Λ are non-degenerate (T12: features differ only in sign)."""
    model, x = RandomNet(arch), inputs(arch)
    kinds = ("lib", "pca")
    one = build_graphs(model, arch.layers, [x], kinds=kinds)
    split = data.draw(st.integers(2, arch.n - 2))
    perm = torch.randperm(arch.n, generator=torch.Generator().manual_seed(arch.seed))
    shards = [random_batches(x[perm][:split], data), random_batches(x[perm][split:], data)]
    ranks = _two_process_graphs([RandomNet(arch), RandomNet(arch)], shards, layers=arch.layers, kinds=kinds)
    permuted = build_graphs(model, arch.layers, random_batches(x[perm], data), kinds=kinds)
    for kind in kinds:
        for ref in (ranks[0], ranks[1], permuted):
            assert ref[kind].dims == one[kind].dims
            for a, b in zip(ref[kind].layers, one[kind].layers):
                close(a.lambdas, b.lambdas, 1e-8, 1e-10)
                close(_projector(a), _projector(b), 1e-6, 1e-7)
            for sec, (a, b) in enumerate(zip(ref[kind].edges, one[kind].edges)):
                lam_in, lam_out = (one[kind].layers[i].lambdas for i in (sec, sec + 1))
                if _separated(lam_in) and _separated(lam_out):
                    close(a, b, 1e-6, 1e-8)
        assert ranks[0][kind].n_examples == arch.n


@_settings(3)
@given(arch=architectures(kinds=("mlp", "conv"), acts=("relu", "tanh")), data=st.data())
def test_uncentred_lambdas_are_eigenvalues_of_g_m_prime_and_final_rotation_changes_nothing_upstream(arch, data):
    """T4: uncentred, Λ = the non-zero eigenvalues of G M′ (G, M′ by jacrev); T14: rotating the final
    layer to its full-rank PCA leaves every earlier C and E unchanged."""
    model, x = RandomNet(arch), inputs(arch)
    plain = build_graphs(model, arch.layers, [x], kinds=("lib",), center=False)["lib"]
    rotated = build_graphs(model, arch.layers, [x], kinds=("lib",), center=False, rotate_final=True)["lib"]
    acts = node_acts(model, x)
    for sec, block in enumerate(model.blocks):
        m_prime = m_prime_ref(section_jacobian(block, acts[sec]), plain.layers[sec + 1])
        rows = torch.cat([acts[sec], torch.ones_like(acts[sec][..., :1])], -1).reshape(-1, acts[sec].shape[-1] + 1)
        gram = rows.T @ rows / rows.shape[0]
        expected = torch.sort(torch.linalg.eigvals(gram @ m_prime).real, descending=True).values
        lam = plain.layers[sec].lambdas
        if lam.numel() == 0:  # nothing downstream depends on this layer: G M′ = 0
            assert float(expected.abs().max()) <= 1e-12 * float(gram.abs().max())
            continue
        keep = lam > 1e-6 * lam.max()
        close(lam[keep], expected[: int(keep.sum())], 1e-6, 1e-9)
    final_rank = int((rotated.layers[-1].lambdas > 1e-10 * rotated.layers[-1].lambdas.max()).sum())
    if final_rank == acts[-1].shape[-1] + 1:  # full rank (UUᵀ = I), as T14 requires
        for a, b in zip(plain.layers[:-1], rotated.layers[:-1]):
            close(a.lambdas, b.lambdas, 1e-8, 1e-10)
            close(_projector(a), _projector(b), 1e-6, 1e-7)
        for a, b, in zip(plain.edges[:-1], rotated.edges[:-1]):
            if all(_separated(layer.lambdas) for layer in plain.layers[:-1]):
                close(a, b, 1e-6, 1e-8)


@_settings(3)
@given(arch=architectures(kinds=("mlp",), acts=("relu",), bias=False), data=st.data())
def test_bias_free_relu_rules_agree_and_attributions_sum_to_the_output(arch, data):
    """T7: a 1-homogeneous section (bias-free ReLU MLP; without bias folding, §11, only bias-free
    networks are homogeneous) gives the same Λ and E under every rule; T8: there the attributions sum
    to the output, Σ_j A_{t,i,j}(x) = ĥ_{t,i}(f̂(x)), up to the directions truncation drops (Λ < 1e-12,
    so |J v| ≲ 1e-6 of the scale); T13: one position source is
    exact when the output has one position (every section here keeps the input's positions, so
    only pos = 1 draws check it)."""
    model, x = RandomNet(arch), inputs(arch)
    ref = build_graphs(model, arch.layers, [x], kinds=("lib",))["lib"]
    rules = [("gauss-legendre", data.draw(st.integers(1, 3))), ("trapezoidal", data.draw(st.integers(1, 3)))]
    if arch.pos == 1:
        rules.append(("sources", 1))
    for rule, n in rules:
        kwargs = dict(position_sources=1) if rule == "sources" else dict(rule=rule, n_intervals=n)
        other = build_graphs(model, arch.layers, [x], kinds=("lib",), **kwargs)["lib"]
        for a, b in zip(ref.layers, other.layers):
            close(b.lambdas, a.lambdas, 1e-8, 1e-10)
        for a, b in zip(ref.edges, other.edges):
            close(b, a, 1e-7, 1e-9)
    acts = node_acts(model, x)
    for sec in range(len(model.blocks)):
        layer_in, layer_out = (NodeLayer(arch.layers[i]) for i in (sec, sec + 1))
        rule = integration_rule("gradient")
        f, g = integrated_jacobian(model, layer_in, layer_out, x, rule, lambda m, i: m(i), out_basis=ref.layers[sec + 1])
        a = edge_attributions(f, g, ref.layers[sec])  # (N, P_out, k_out, k_in)
        h_hat = acts[sec + 1] @ ref.layers[sec + 1].basis[:-1]  # the constant row carries no attribution
        close(a.sum(-1), h_hat, 1e-7, 1e-6)


@_settings(3)
@given(arch=architectures(kinds=("mlp", "conv"), min_sections=2), data=st.data())
def test_affine_reparametrisation_of_a_hidden_layer_leaves_lib_unchanged(arch, data):
    """T10: f ↦ f T + c at hidden node layer 1 (undone in the next section) leaves Λ and E unchanged,
    except the constant's Λ₀ and edges, which measure the mean direction μ (moved by c; §11)."""
    model, x = RandomNet(arch), inputs(arch)
    d = arch.sections[0].d_out
    gen = torch.Generator().manual_seed(arch.seed + 2)
    t = torch.eye(d, dtype=torch.float64) + 0.4 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    c = torch.randn(d, generator=gen, dtype=torch.float64)
    assume(torch.linalg.cond(t) < 1e2)
    twisted = RandomNet(arch)
    first, second = twisted.blocks[0], twisted.blocks[1]
    twisted.blocks[0] = _Affine(first, t, c, after=True)
    twisted.blocks[1] = _Affine(second, t, c, after=False)
    a = build_graphs(model, arch.layers, [x], kinds=("lib",))["lib"]
    b = build_graphs(twisted, arch.layers, [x], kinds=("lib",))["lib"]
    assert a.dims == b.dims
    for la, lb in zip(a.layers, b.layers):
        start = int(la.has_constant)
        close(lb.lambdas[start:], la.lambdas[start:], 1e-6, 1e-9)
    if all(_separated(layer.lambdas[int(layer.has_constant):]) for layer in a.layers):
        for ea, eb in zip(a.edges, b.edges):
            close(eb[:, 1:], ea[:, 1:], 1e-5, 1e-8)


class _Affine(nn.Module):
    """``block`` followed by f ↦ f T + c (``after``), or preceded by its inverse."""

    def __init__(self, block: nn.Module, t: torch.Tensor, c: torch.Tensor, after: bool):
        super().__init__()
        self.block, self.after = block, after
        self.register_buffer("t", t)
        self.register_buffer("t_inv", torch.linalg.inv(t))
        self.register_buffer("c", c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.after:
            return self.block(x) @ self.t + self.c
        return self.block((x - self.c) @ self.t_inv)


@_settings(3)
@given(arch=architectures(), data=st.data())
def test_float32_analysis_is_within_tolerance_of_float64(arch, data):
    """float32 Jacobians (float64 sums and eigendecompositions): Λ above 1e-3 of the largest within 1e-3
    relative, and the edges between those features within 1e-3 of the section's largest edge."""
    model, x = RandomNet(arch), inputs(arch)
    g64 = build_graphs(model, arch.layers, [x], kinds=("lib",))["lib"]
    g32 = build_graphs(model, arch.layers, [x], kinds=("lib",), dtype=torch.float32)["lib"]
    keeps = []
    for a, b in zip(g64.layers, g32.layers):
        keep = important(a.lambdas, a.has_constant, 1e-3)
        assert b.lambdas.numel() > (int(keep.max()) if keep.numel() else 0)
        close(b.lambdas[keep], a.lambdas[keep], 1e-3, 0)
        keeps.append(keep)
    for sec, (a, b) in enumerate(zip(g64.edges, g32.edges)):
        rows, cols = keeps[sec + 1], keeps[sec]
        if _separated(g64.layers[sec].lambdas[cols], 1e-2) and _separated(g64.layers[sec + 1].lambdas[rows], 1e-2):
            close(b[rows][:, cols], a[rows][:, cols], 0, 1e-3)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(arch=architectures(), data=st.data())
def test_many_random_architectures(arch, data):
    """The first property on many more (random) draws: ``pytest -m slow``."""
    test_bases_and_edges_match_jacrev_and_the_spec_invariants.hypothesis.inner_test(arch, data)


@_settings(2)
@given(d=st.integers(2, 4), depth=st.integers(1, 3), pos=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_invertible_linear_chain_aligns_every_layer_with_the_output_spectrum(d, depth, pos, seed):
    """T6: bias-free invertible linear layers, uncentred, final layer rotated to PCA: Λ is the same at
    every layer (the output's covariance spectrum) and each E pairs each input feature with one output
    feature, E_jj = Λ_j. Without bias folding (§11) the constant coordinate has no Jacobian, so the data
    are antithetic (x and −x): zero mean keeps the constant out of the PCA directions."""
    arch = Arch(d, pos, tuple(Section("mlp", d, "none", False) for _ in range(depth)), seed, 16, 1.0, 0.0)
    model, half = RandomNet(arch), inputs(arch)
    x = torch.cat([half, -half])
    graph = build_graphs(model, arch.layers, [x], kinds=("lib",), center=False, rotate_final=True)["lib"]
    out = node_acts(model, x)[-1].reshape(-1, d)
    expected = torch.linalg.eigvalsh(out.T @ out / out.shape[0]).flip(0)  # (d,) descending
    for layer in graph.layers[:-1]:
        close(layer.lambdas, expected, 1e-8, 1e-10)
    for edges, layer in zip(graph.edges, graph.layers[:-1]):
        strong = edges > 1e-9 * edges.max()
        assert (strong.sum(0) == 1).all() and (strong.sum(1) <= 1).all()  # one partner per feature
        close(edges.sum(0), layer.lambdas, 1e-8, 1e-10)


@_settings(2)
@given(
    arch=architectures(kinds=("mlp",), acts=("relu", "tanh", "gelu"), min_sections=2, max_sections=2),
    neuron=st.integers(0, 4),
)
def test_a_neuron_the_next_layer_ignores_drops_one_lib_dimension_but_no_pca_one(arch, neuron):
    """T9 (centred): zero the next layer's weights from one hidden neuron with variance: the LIB dimension
    of that layer drops by exactly 1 and the PCA dimension does not change."""
    model, x = RandomNet(arch), inputs(arch)
    neuron = neuron % arch.sections[0].d_out
    before = build_graphs(model, arch.layers, [x], kinds=("lib", "pca"), rel_threshold=1e-9)
    hidden = node_acts(model, x)[1][..., neuron]
    assume(float(hidden.var()) > 1e-6 and before["lib"].dims[1] == before["pca"].dims[1])
    with torch.no_grad():
        model.blocks[1].lin.weight[:, neuron] = 0.0
    after = build_graphs(model, arch.layers, [x], kinds=("lib", "pca"), rel_threshold=1e-9)
    assert after["lib"].dims[1] == before["lib"].dims[1] - 1
    assert after["pca"].dims[1] == before["pca"].dims[1]
