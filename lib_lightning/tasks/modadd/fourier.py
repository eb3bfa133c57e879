"""Fourier analysis of modular addition: feature labels, key frequencies, communities (progress
measures built on the key frequencies are in :mod:`lib_lightning.tasks.modadd.progress`).

A function g(a, b) on the p×p grid of inputs (row-major (a, b) order, the order of
``modular_addition_pairs``) has the 2-D DFT ĝ(u, v) = Σ_{a,b} g(a, b) e^{-2πi(ua + vb)/p}. Its
variance splits exactly (Parseval) over the frequency pairs (u, v) ≠ (0, 0), and each pair belongs to
one **term family** of frequency k = min(u, p − u) (for ``"a"``, ``"a+b"``, ``"a-b"``) or
k = min(v, p − v) (for ``"b"``):

- ``"a"``   (u ≠ 0, v = 0): cos(k·a), sin(k·a);
- ``"b"``   (u = 0, v ≠ 0): cos(k·b), sin(k·b);
- ``"a+b"`` (u = v ≠ 0): cos(k(a+b)), sin(k(a+b));
- ``"a-b"`` (u = −v ≠ 0): cos(k(a−b)), sin(k(a−b));
- ``"other"``: products of two different frequencies, split half to each.

So cos(k·a) + cos(k·b) is half ``"a"`` and half ``"b"`` at k, cos(k·a)·cos(k·b) is half ``"a+b"`` and
half ``"a-b"``, and cos(k(a+b)) is all ``"a+b"``. For even p the Nyquist pair u = v = p/2 counts as
``"a+b"``. A feature of a node layer with several positions is analysed at every position and the
variances are summed.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "FAMILIES",
    "FourierSpectrum",
    "CommunityFrequency",
    "grid_spectrum",
    "fourier_labels",
    "embedding_frequency_power",
    "logit_frequency_power",
    "key_frequencies",
    "community_frequencies",
]

FAMILIES = ("a", "b", "a+b", "a-b", "other")


def _freq(p: int) -> torch.Tensor:
    """``(p,)`` frequency k = min(u, p − u) of each DFT index u."""
    u = torch.arange(p)
    return torch.minimum(u, p - u)


@dataclass(frozen=True)
class FourierSpectrum:
    """Fractions of each feature's variance per term family and frequency.

    Attributes:
        p: the modulus.
        fractions: ``(n_features, 5, p // 2 + 1)`` fraction of the feature's variance in each family of
            :data:`FAMILIES` at each frequency k (index 0 is always 0); sums to 1 per feature (0 for a
            constant feature).
        variance: ``(n_features,)`` variance over the grid (summed over positions).
    """

    p: int
    fractions: torch.Tensor
    variance: torch.Tensor

    @property
    def frequency_fractions(self) -> torch.Tensor:
        """``(n_features, p // 2 + 1)`` fraction of the variance at each frequency, all families."""
        return self.fractions.sum(1)

    @property
    def dominant(self) -> torch.Tensor:
        """``(n_features,)`` the frequency holding the most variance (0 for a constant feature)."""
        return self.frequency_fractions.argmax(-1)


def grid_spectrum(feats: torch.Tensor, p: int, constant_rtol: float = 1e-12) -> FourierSpectrum:
    """2-D DFT of features over the (a, b) grid, split by term family and frequency (module docstring).

    Args:
        feats: ``(p*p, n_features)`` or ``(p*p, pos, n_features)`` feature activations on every input,
            row-major in (a, b).
        p: the modulus, >= 2.
        constant_rtol: a feature whose variance is at most this fraction of its mean square is constant
            (round-off, not structure): its fractions are all 0.

    Raises:
        ValueError: for p < 2, a first dimension other than p², or non-finite values.
    """
    if p < 2:
        raise ValueError(f"p must be >= 2, got {p}")
    if feats.ndim == 2:
        feats = feats[:, None]
    if feats.ndim != 3 or feats.shape[0] != p * p:
        raise ValueError(f"feats must be (p*p={p * p}, n) or (p*p, pos, n), got shape {tuple(feats.shape)}")
    if not torch.isfinite(feats).all():
        raise ValueError("feats contain NaN or Inf")
    _, pos, n = feats.shape
    grid = feats.to(torch.float64).reshape(p, p, pos, n).permute(2, 3, 0, 1)  # (pos, n, p_a, p_b)
    power = torch.fft.fft2(grid).abs().square().sum(0)  # (n, p_a, p_b)
    mean_square = power.sum((-2, -1))  # (n,) p² Σ f², Parseval
    power[:, 0, 0] = 0.0  # the mean is not variance
    total = power.sum((-2, -1))  # (n,)
    structured = total > constant_rtol * mean_square
    u = torch.arange(p)[:, None].expand(p, p)
    v = torch.arange(p)[None, :].expand(p, p)
    fu, fv = _freq(p)[u], _freq(p)[v]
    n_freq = p // 2 + 1
    fam = torch.full((p, p), 4, dtype=torch.long)  # "other"
    fam[(u != 0) & (v == 0)] = 0
    fam[(u == 0) & (v != 0)] = 1
    fam[(u != 0) & ((u + v) % p == 0)] = 3
    fam[(u != 0) & (u == v)] = 2  # after "a-b": the even-p Nyquist pair counts as "a+b"
    freq = torch.where(fam == 1, fv, fu)
    out = torch.zeros(n, len(FAMILIES), n_freq, dtype=torch.float64)
    flat = power.reshape(n, p * p)
    main = fam.reshape(-1) < 4
    index = fam.reshape(-1)[main] * n_freq + freq.reshape(-1)[main]
    out.view(n, -1).index_add_(1, index, flat[:, main])
    other = fam.reshape(-1) == 4
    half = flat[:, other] / 2
    base = 4 * n_freq
    out.view(n, -1).index_add_(1, base + fu.reshape(-1)[other], half)
    out.view(n, -1).index_add_(1, base + fv.reshape(-1)[other], half)
    safe = torch.where(structured, total, torch.ones_like(total))
    fractions = torch.where(structured[:, None, None], out / safe[:, None, None], torch.zeros_like(out))
    return FourierSpectrum(p, fractions, total / p**4)


def fourier_labels(spectrum: FourierSpectrum, min_fraction: float = 0.1, max_terms: int = 3) -> list[str]:
    """One short label per feature: its strongest (family, frequency) terms, e.g. ``"15:a+b .91"``.

    Terms with at least ``min_fraction`` of the variance are listed, strongest first, at most
    ``max_terms``; a feature without one is labelled by its single strongest term; a constant feature
    is ``"const"``. ``"other"`` terms are written ``"k:×"``.

    Raises:
        ValueError: for ``min_fraction`` outside (0, 1] or ``max_terms < 1``.
    """
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    if max_terms < 1:
        raise ValueError(f"max_terms must be >= 1, got {max_terms}")
    labels = []
    n_freq = spectrum.fractions.shape[-1]
    for f in spectrum.fractions:
        if not f.any():  # a constant feature
            labels.append("const")
            continue
        values, order = torch.sort(f.reshape(-1), descending=True)
        keep = max(1, min(max_terms, int((values >= min_fraction).sum())))
        terms = []
        for value, idx in zip(values[:keep].tolist(), order[:keep].tolist()):
            family, k = FAMILIES[idx // n_freq], idx % n_freq
            share = f"{value:.2f}".removeprefix("0")  # ".91", "1.00"
            terms.append(f"{k}:{'×' if family == 'other' else family} {share}")
        labels.append(", ".join(terms))
    return labels


def _frequency_power(power: torch.Tensor, p: int) -> torch.Tensor:
    """``(p,)`` power per DFT index -> ``(p // 2 + 1,)`` per frequency k (index 0: the mean, zeroed)."""
    out = torch.zeros(p // 2 + 1, dtype=torch.float64)
    out.index_add_(0, _freq(p), power.to(torch.float64))
    out[0] = 0.0
    return out


def embedding_frequency_power(embed: torch.Tensor) -> torch.Tensor:
    """Power of the token embedding at each frequency: Σ_d |DFT over tokens of W_E[:, d]|² at ±k.

    Args:
        embed: ``(p, d_model)`` embeddings of the tokens 0 … p−1 (without ``=``).

    Returns:
        ``(p // 2 + 1,)``; index 0 (the mean embedding) is 0.
    """
    if embed.ndim != 2 or embed.shape[0] < 2:
        raise ValueError(f"embed must be (p, d_model) with p >= 2, got shape {tuple(embed.shape)}")
    p = embed.shape[0]
    power = torch.fft.fft(embed.detach().to(torch.float64), dim=0).abs().square().sum(1)  # (p,)
    return _frequency_power(power, p)


def logit_frequency_power(logits: torch.Tensor, p: int) -> torch.Tensor:
    """Power of the logits' ``"a+b"`` terms at each frequency, summed over the output classes.

    Args:
        logits: ``(p*p, n_classes)`` logits on every input, row-major in (a, b).

    Returns:
        ``(p // 2 + 1,)`` Σ_c |L̂_c(k, k)|² + |L̂_c(−k, −k)|²; index 0 is 0.
    """
    spectrum = grid_spectrum(logits, p)
    return (spectrum.fractions[:, FAMILIES.index("a+b")] * spectrum.variance[:, None]).sum(0)


def key_frequencies(power: torch.Tensor, rel_threshold: float = 0.1) -> list[int]:
    """The frequencies with at least ``rel_threshold`` × the largest power, strongest first.

    Relative to the strongest rather than a share of the total: a trained embedding keeps a flat tail
    of small power at every frequency (about 1 % each on a grokked p = 113 model), which a share of the total
    would have to sweep in.

    Args:
        power: ``(p // 2 + 1,)`` per frequency (index 0 ignored), e.g. from
            :func:`embedding_frequency_power` or :func:`logit_frequency_power`.
        rel_threshold: in (0, 1].
    """
    values = power.detach().to(torch.float64).clone()
    if values.ndim != 1:
        raise ValueError(f"power must be 1-D, got shape {tuple(values.shape)}")
    if not 0 < rel_threshold <= 1:
        raise ValueError(f"rel_threshold must be in (0, 1], got {rel_threshold}")
    values[0] = 0.0
    if not values.max() > 0:
        return []
    order = torch.sort(values, descending=True, stable=True).indices
    return [int(k) for k in order if values[k] >= rel_threshold * values.max()]


@dataclass(frozen=True)
class CommunityFrequency:
    """The frequency that dominates one community of the interaction graph.

    Attributes:
        community: index of the community.
        size: number of features in it.
        frequency: the frequency with the largest weighted share of the features' variance.
        purity: that share: Σ_n w_n φ_n(k) / Σ_n w_n, with φ_n(k) the fraction of feature n's variance at
            frequency k and w_n the feature's weight (its weighted degree in the graph).
        node_purity: the fraction of the community's weight in features whose own dominant frequency is k.
        is_key: whether k is among the key frequencies given.
        layers: features per node layer.
        runner_up, runner_up_share: the frequency with the next largest weighted share, and that share
            (a community that merges two frequencies has both shares large).
    """

    community: int
    size: int
    frequency: int
    purity: float
    node_purity: float
    is_key: bool
    layers: dict[str, int]
    runner_up: int
    runner_up_share: float


def community_frequencies(
    membership: Mapping[Hashable, int],
    frequency_fractions: Mapping[Hashable, torch.Tensor],
    weights: Mapping[Hashable, float],
    key: Sequence[int] = (),
    min_size: int = 2,
) -> list[CommunityFrequency]:
    """Each community's dominant frequency and its purity (see :class:`CommunityFrequency`).

    Args:
        membership: node -> community index (nodes ``(layer_name, feature)``).
        frequency_fractions: node -> ``(p // 2 + 1,)`` fraction of its variance per frequency.
        weights: node -> non-negative weight; a community whose weight is 0 is weighted uniformly.
        key: the key frequencies.
        min_size: communities smaller than this are left out.

    Raises:
        KeyError: for a node of ``membership`` without frequency fractions.
    """
    missing = [node for node in membership if node not in frequency_fractions]
    if missing:
        raise KeyError(f"nodes without Fourier fractions: {missing[:5]}")
    groups: dict[int, list[Hashable]] = {}
    for node, c in membership.items():
        groups.setdefault(c, []).append(node)
    out = []
    for c in sorted(groups):
        nodes = groups[c]
        if len(nodes) < min_size:
            continue
        w = torch.tensor([float(weights.get(node, 0.0)) for node in nodes], dtype=torch.float64)
        if not w.sum() > 0:
            w = torch.ones_like(w)
        w = w / w.sum()
        fractions = torch.stack([frequency_fractions[node].to(torch.float64) for node in nodes])  # (n, K)
        profile = w @ fractions  # (K,)
        top = torch.topk(profile, 2).indices.tolist()
        k, second = top[0], top[1]
        node_purity = float(w[fractions.argmax(-1) == k].sum())
        layers: dict[str, int] = {}
        for node in nodes:
            name = node[0] if isinstance(node, tuple) else str(node)
            layers[name] = layers.get(name, 0) + 1
        out.append(CommunityFrequency(
            c, len(nodes), k, float(profile[k]), node_purity, k in set(key), layers, second, float(profile[second])
        ))
    return out
