"""Nanda et al.'s progress measures of grokking for modular addition: the loss restricted to the key
frequencies' cos/sin(k(a+b)) part of the logits, and the loss with that part removed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ProgressMeasures", "key_frequency_logits", "progress_measures"]


def key_frequency_logits(logits: torch.Tensor, p: int, frequencies: Sequence[int]) -> torch.Tensor:
    """The part of the logits made of cos(k(a+b)), sin(k(a+b)) for the given frequencies.

    K(L)_c = inverse 2-D DFT of L̂_c restricted to (u, v) ∈ {(k, k), (−k, −k)}, per output class c.

    Args:
        logits: ``(p*p, n_classes)`` on every input, row-major in (a, b).
        frequencies: frequencies k in [1, p // 2].

    Returns:
        ``(p*p, n_classes)`` float64.
    """
    if logits.ndim != 2 or logits.shape[0] != p * p:
        raise ValueError(f"logits must be (p*p={p * p}, n_classes), got shape {tuple(logits.shape)}")
    bad = [k for k in frequencies if not 1 <= int(k) <= p // 2]
    if bad:
        raise ValueError(f"frequencies must be in [1, {p // 2}], got {bad}")
    grid = logits.to(torch.float64).T.reshape(-1, p, p)  # (n_classes, p_a, p_b)
    mask = torch.zeros(p, p, dtype=torch.bool)
    for k in frequencies:
        mask[k, k] = mask[p - k, p - k] = True
    kept = torch.fft.ifft2(torch.fft.fft2(grid) * mask).real  # (n_classes, p_a, p_b)
    return kept.reshape(-1, p * p).T


@dataclass(frozen=True)
class ProgressMeasures:
    """Nanda et al.'s progress measures of grokking (see :func:`progress_measures`).

    Attributes:
        restricted_loss: cross-entropy of the restricted logits on the restricted set.
        excluded_loss: cross-entropy of the excluded logits on the excluded set.
        loss_restricted_set, loss_excluded_set: the unablated loss on the same sets.
        frequencies: the key frequencies used.
    """

    restricted_loss: float
    excluded_loss: float
    loss_restricted_set: float
    loss_excluded_set: float
    frequencies: tuple[int, ...]


def progress_measures(
    logits: torch.Tensor,
    labels: torch.Tensor,
    p: int,
    frequencies: Sequence[int],
    restricted_index: torch.Tensor | None = None,
    excluded_index: torch.Tensor | None = None,
) -> ProgressMeasures:
    """Restricted and excluded loss (Nanda et al. 2023, "Progress measures for grokking").

    With K(L) the key-frequency part of the logits (:func:`key_frequency_logits`) and L̄_c the mean of
    logit c over the grid: restricted logits L̄ + K(L) keep only the generalising circuit's terms;
    excluded logits L − K(L) remove them. The restricted loss is measured on ``restricted_index``
    (default: every pair, since the circuit is meant to generalise) and the excluded loss on
    ``excluded_index`` (default: every pair; pass the training pairs to see memorisation alone).

    Args:
        logits: ``(p*p, n_classes)`` on every input, row-major in (a, b).
        labels: ``(p*p,)`` the answers (a + b) mod p.
        frequencies: key frequencies in [1, p // 2].
        restricted_index, excluded_index: indices into the p² pairs.
    """
    if labels.shape != (p * p,):
        raise ValueError(f"labels must be (p*p={p * p},), got shape {tuple(labels.shape)}")
    logits = logits.detach().to(torch.float64)
    kept = key_frequency_logits(logits, p, frequencies)
    restricted = logits.mean(0, keepdim=True) + kept
    excluded = logits - kept
    every = torch.arange(p * p)
    r = every if restricted_index is None else restricted_index
    e = every if excluded_index is None else excluded_index

    def ce(x: torch.Tensor, index: torch.Tensor) -> float:
        return float(F.cross_entropy(x[index], labels[index]))

    return ProgressMeasures(
        ce(restricted, r), ce(excluded, e), ce(logits, r), ce(logits, e), tuple(int(k) for k in frequencies)
    )
