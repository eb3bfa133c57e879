"""Fourier labels, key frequencies, community purity and progress measures on planted functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_lightning.tasks.modadd.fourier import (
    FAMILIES,
    community_frequencies,
    embedding_frequency_power,
    fourier_labels,
    grid_spectrum,
    key_frequencies,
    logit_frequency_power,
)
from lib_lightning.data.modadd import modular_addition_pairs
from lib_lightning.tasks.modadd.progress import key_frequency_logits, progress_measures

P = 7
TOL = dict(rtol=0, atol=1e-12)


def _grid(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """a and b of every pair, row-major, as float64 angles' integer parts."""
    tokens, _ = modular_addition_pairs(p)
    return tokens[:, 0].double(), tokens[:, 1].double()


def _w(k: int, x: torch.Tensor, p: int = P) -> torch.Tensor:
    return 2 * math.pi * k * x / p


def _fraction(spec, feature: int, family: str, k: int) -> float:
    return float(spec.fractions[feature, FAMILIES.index(family), k])


@pytest.fixture(scope="module")
def planted():
    a, b = _grid(P)
    feats = torch.stack([
        torch.cos(_w(2, a)),                                  # 0: a only, k = 2
        torch.cos(_w(3, a + b)) + 0.5,                        # 1: a+b, k = 3 (the offset is not variance)
        torch.cos(_w(1, a)) * torch.cos(_w(1, b)),            # 2: half a+b, half a-b, k = 1
        2 * torch.cos(_w(3, a)) + torch.sin(_w(3, b)),        # 3: a 4/5, b 1/5, k = 3
        torch.cos(_w(1, a)) * torch.cos(_w(2, b)),            # 4: cross product, half to k = 1 and 2
        torch.full_like(a, 3.0),                              # 5: constant
        torch.sin(_w(2, a - b)),                              # 6: a-b, k = 2
    ], dim=1)  # (p*p, 7)
    return feats, grid_spectrum(feats, P)


def test_planted_frequencies_are_recovered_exactly(planted):
    _, spec = planted
    assert spec.fractions.shape == (7, 5, P // 2 + 1)
    assert _fraction(spec, 0, "a", 2) == pytest.approx(1.0, abs=1e-12)
    assert _fraction(spec, 1, "a+b", 3) == pytest.approx(1.0, abs=1e-12)
    assert _fraction(spec, 2, "a+b", 1) == pytest.approx(0.5, abs=1e-12)
    assert _fraction(spec, 2, "a-b", 1) == pytest.approx(0.5, abs=1e-12)
    assert _fraction(spec, 3, "a", 3) == pytest.approx(0.8, abs=1e-12)
    assert _fraction(spec, 3, "b", 3) == pytest.approx(0.2, abs=1e-12)
    assert _fraction(spec, 4, "other", 1) == pytest.approx(0.5, abs=1e-12)
    assert _fraction(spec, 4, "other", 2) == pytest.approx(0.5, abs=1e-12)
    assert _fraction(spec, 6, "a-b", 2) == pytest.approx(1.0, abs=1e-12)
    sums = spec.fractions.sum((1, 2))
    torch.testing.assert_close(sums, torch.tensor([1.0, 1, 1, 1, 1, 0, 1], dtype=torch.float64), **TOL)
    assert spec.dominant[[0, 1, 2, 3, 6]].tolist() == [2, 3, 1, 3, 2]
    # variance over the grid: cos² averages to 1/2
    torch.testing.assert_close(spec.variance[[0, 1, 3, 5]], torch.tensor([0.5, 0.5, 2.5, 0.0], dtype=torch.float64), **TOL)


def test_family_totals_match_marginal_variances():
    """Independent reference: the a family is the variance of the mean over b, the a+b family the variance
    of the mean over each anti-diagonal a + b ≡ s, each divided by the total variance."""
    p = 11
    feats = torch.randn(p * p, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = grid_spectrum(feats, p)
    grid = feats.T.reshape(3, p, p)  # (n, a, b)
    total = grid.var((1, 2), unbiased=False)
    a_part = grid.mean(2).var(1, unbiased=False) / total
    b_part = grid.mean(1).var(1, unbiased=False) / total
    s = (torch.arange(p)[:, None] + torch.arange(p)[None, :]) % p
    diag = torch.stack([grid[:, s == k].mean(1) for k in range(p)], 1)  # (n, p)
    sum_part = diag.var(1, unbiased=False) / total
    torch.testing.assert_close(spec.fractions[:, 0].sum(1), a_part, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(spec.fractions[:, 1].sum(1), b_part, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(spec.fractions[:, 2].sum(1), sum_part, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(spec.variance, total, rtol=1e-12, atol=0)


def test_positions_are_summed_and_even_p_nyquist():
    a, b = _grid(P)
    two = torch.stack([torch.cos(_w(2, a)), torch.cos(_w(2, b))], dim=1)[:, :, None]  # (p*p, pos=2, 1)
    spec = grid_spectrum(two, P)
    assert _fraction(spec, 0, "a", 2) == pytest.approx(0.5, abs=1e-12)
    assert _fraction(spec, 0, "b", 2) == pytest.approx(0.5, abs=1e-12)
    a8, b8 = _grid(8)
    nyquist = grid_spectrum(torch.cos(math.pi * (a8 + b8))[:, None], 8)
    assert _fraction(nyquist, 0, "a+b", 4) == pytest.approx(1.0, abs=1e-12)


def test_labels(planted):
    _, spec = planted
    labels = fourier_labels(spec)
    assert labels[0] == "2:a 1.00"
    assert labels[1] == "3:a+b 1.00"
    assert labels[2] in ("1:a+b .50, 1:a-b .50", "1:a-b .50, 1:a+b .50")
    assert labels[3] == "3:a .80, 3:b .20"
    assert labels[5] == "const"
    assert fourier_labels(spec, min_fraction=0.9)[3] == "3:a .80"  # nothing above: the strongest term alone
    with pytest.raises(ValueError, match="min_fraction"):
        fourier_labels(spec, min_fraction=0.0)


def test_key_frequencies_from_embedding_and_logits():
    p = 11
    t = torch.arange(p, dtype=torch.float64)
    embed = torch.stack([torch.cos(_w(2, t, p)), torch.sin(_w(2, t, p)), 0.5 * torch.cos(_w(5, t, p)),
                         0.5 * torch.sin(_w(5, t, p)), torch.ones(p)], dim=1)  # (p, 5); the mean is ignored
    power = embedding_frequency_power(embed)
    torch.testing.assert_close(power / power.sum(), torch.tensor([0, 0, 0.8, 0, 0, 0.2], dtype=torch.float64), **TOL)
    assert key_frequencies(power, 0.25) == [2, 5]  # 0.2 >= 0.25 × 0.8
    assert key_frequencies(power, 0.3) == [2]
    assert key_frequencies(torch.zeros(6)) == []
    with pytest.raises(ValueError, match="rel_threshold must be in"):
        key_frequencies(power, 0.0)
    a, b = _grid(p)
    c = torch.arange(p, dtype=torch.float64)
    logits = torch.cos(_w(3, a[:, None] + b[:, None] - c[None], p)) + torch.cos(_w(1, a, p))[:, None]  # (p*p, p)
    assert key_frequencies(logit_frequency_power(logits, p), 1e-6) == [3]
    with pytest.raises(ValueError, match="embed must be"):
        embedding_frequency_power(torch.zeros(5))


def test_progress_measures_closed_form():
    p = 11
    a, b = _grid(p)
    c = torch.arange(p, dtype=torch.float64)
    labels = ((a + b) % p).long()
    circuit = 4 * torch.cos(_w(3, a[:, None] + b[:, None] - c[None], p))  # (p*p, p): the generalising terms
    noise = torch.randn(p * p, p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = noise - key_frequency_logits(noise, p, [3])  # no key-frequency part left in the noise
    logits = circuit + noise
    torch.testing.assert_close(key_frequency_logits(logits, p, [3]), circuit, rtol=0, atol=1e-10)
    train = torch.arange(0, p * p, 3)
    m = progress_measures(logits, labels, p, [3], excluded_index=train)
    restricted = circuit + noise.mean(0, keepdim=True)
    assert m.restricted_loss == pytest.approx(float(F.cross_entropy(restricted, labels)), rel=1e-10)
    assert m.excluded_loss == pytest.approx(float(F.cross_entropy(noise[train], labels[train])), rel=1e-10)
    assert m.loss_excluded_set == pytest.approx(float(F.cross_entropy(logits[train], labels[train])), rel=1e-10)
    assert m.restricted_loss < m.excluded_loss and m.frequencies == (3,)
    with pytest.raises(ValueError, match=r"frequencies must be in \[1, 5\]"):
        key_frequency_logits(logits, p, [6])
    with pytest.raises(ValueError, match="labels must be"):
        progress_measures(logits, labels[:-1], p, [3])


def test_community_purity():
    k = 6
    def at(*pairs):
        out = torch.zeros(k, dtype=torch.float64)
        for f, v in pairs:
            out[f] = v
        return out

    fractions = {("x", 1): at((2, 1.0)), ("y", 1): at((2, 0.5), (4, 0.5)), ("y", 2): at((5, 1.0)), ("z", 1): at((4, 1.0))}
    membership = {("x", 1): 0, ("y", 1): 0, ("y", 2): 0, ("z", 1): 1}
    weights = {("x", 1): 1.0, ("y", 1): 3.0, ("y", 2): 1.0, ("z", 1): 2.0}
    (c,) = community_frequencies(membership, fractions, weights, key=[2, 4])
    assert (c.community, c.size, c.frequency, c.is_key) == (0, 3, 2, True)
    assert c.purity == pytest.approx((1.0 + 1.5) / 5)  # weighted share of the variance at k = 2
    assert c.node_purity == pytest.approx(4 / 5)  # features whose own dominant frequency is 2 (ties: lowest k)
    assert c.layers == {"x": 1, "y": 2}
    assert (c.runner_up, c.runner_up_share) == (4, pytest.approx(1.5 / 5))
    assert len(community_frequencies(membership, fractions, weights, min_size=1)) == 2
    with pytest.raises(KeyError, match="without Fourier fractions"):
        community_frequencies({("w", 0): 0}, fractions, weights)


def test_grid_spectrum_bad_input():
    with pytest.raises(ValueError, match=r"p\*p=49"):
        grid_spectrum(torch.zeros(48, 2), P)
    with pytest.raises(ValueError, match="p must be >= 2"):
        grid_spectrum(torch.zeros(1, 1), 1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        grid_spectrum(torch.full((49, 1), float("nan")), P)
