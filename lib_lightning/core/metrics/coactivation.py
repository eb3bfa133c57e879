"""ReLU units that fire on exactly the same examples (a source of degeneracy, 2405.10927), counted from a
signature that sums over any batching or sharding of the analysis set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lib_lightning.core.lib.capture import Forward, NodeLayer, capture, default_forward

__all__ = [
    "CoactivationGroups",
    "coactivation_groups",
    "coactivation_signature_update",
    "example_weights",
    "CoactivationSums",
    "relu_coactivation",
    "relu_signature_update",
]


def _as_int64(c: int) -> int:
    """The int64 with the same 64 bits as the integer ``c`` taken modulo 2^64."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


# SplitMix64's increment and multipliers, as the int64 values with the same bits
_GOLDEN, _MIX1, _MIX2 = (_as_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on signed ints)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(seed: int, position: torch.Tensor) -> torch.Tensor:
    """Output number ``position`` (0-based, int64) of the SplitMix64 generator seeded with ``seed``.

    int64 tensor arithmetic wraps modulo 2^64, which is exactly the unsigned arithmetic SplitMix64 uses.
    """
    z = _as_int64(seed) + (position + 1) * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def example_weights(example_index: torch.Tensor, seed: int) -> torch.Tensor:
    """Two pseudo-random weights in [1, 2) per example, a pure function of (seed, example index).

    w_j(x) = 1 + (top 52 bits of SplitMix64(seed) output number 2x + j) / 2^52, exact in float64.

    Returns:
        ``(batch, 2)`` float64.
    """
    position = 2 * example_index[:, None] + torch.arange(2, device=example_index.device)  # (batch, 2)
    bits = _shr(_splitmix64(seed, position), 12)  # (batch, 2) in [0, 2^52)
    return 1.0 + bits.to(torch.float64) * 2.0**-52


def coactivation_signature_update(
    active: torch.Tensor, example_index: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial sums identifying each unit's on/off pattern over the analysis set.

    signature[u, j] = Σ_x w_j(x) · active[x, u],  count[u] = Σ_x active[x, u], with w_j(x) from
    :func:`example_weights`. Sums over any batching or sharding of the examples give the same totals,
    provided each example (index) is seen exactly once.

    Args:
        active: ``(batch, d_hidden)`` bool, whether unit u fires on example x (e.g. ``pre_act > 0``).
        example_index: ``(batch,)`` int64 dataset index of each example.
        seed: integer seed of the example weights; every partial sum must use the same one.

    Returns:
        ``signature`` ``(d_hidden, 2)`` float64 and ``count`` ``(d_hidden,)`` float64.

    Raises:
        TypeError: if ``active`` is not bool, ``example_index`` not an integer tensor or ``seed`` not int.
        ValueError: if the shapes do not match.
    """
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool:
        raise TypeError(f"active must be a bool tensor, got {getattr(active, 'dtype', type(active))}")
    if active.ndim != 2:
        raise ValueError(f"active must be (batch, d_hidden), got shape {tuple(active.shape)}")
    batch, d_hidden = active.shape
    if not isinstance(example_index, torch.Tensor) or example_index.dtype not in (torch.int32, torch.int64):
        got = getattr(example_index, "dtype", example_index)
        raise TypeError(f"example_index must be an int64 (or int32) tensor, got {got}")
    if example_index.shape != (batch,):
        raise ValueError(f"example_index must have shape ({batch},) to match active, got {tuple(example_index.shape)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    weights = example_weights(example_index.to(device=active.device, dtype=torch.int64), seed)  # (batch, 2)
    on = active.to(torch.float64)  # (batch, d_hidden)
    return on.T @ weights, on.sum(0)


@dataclass(frozen=True)
class CoactivationGroups:
    """ReLU units grouped by identical on/off patterns over the analysis set.

    Attributes:
        n_dead: units that never fire.
        n_always: units that fire on every example (linear there: no ReLU degeneracy of their own).
        n_groups: groups of >= 2 live (neither dead nor always-on) units with identical patterns.
        n_redundant: units beyond the first in each such group.
        largest_group: size of the largest identical-pattern class of live units (1 if all differ,
            0 if no unit is live).
        group_of: ``(d_hidden,)`` int64: -1 dead, -2 always on, otherwise the lowest unit index with the
            same pattern (so ``group_of[u] == u`` for a unit without duplicates).
    """

    n_dead: int
    n_always: int
    n_groups: int
    n_redundant: int
    largest_group: int
    group_of: torch.Tensor

    def to_dict(self) -> dict[str, int | list[int]]:
        """The counts as ints and ``group_of`` as a list."""
        out = {k: v for k, v in asdict(self).items() if k != "group_of"}
        return {**out, "group_of": self.group_of.tolist()}


def coactivation_groups(
    signature: torch.Tensor, count: torch.Tensor, n_examples: int, rtol: float = 1e-9
) -> CoactivationGroups:
    """Group units whose summed signatures agree: identical firing patterns with high probability.

    Units u, v are grouped when count[u] = count[v] and |s[u, j] - s[v, j]| <= rtol · max(|s[u, j]|,
    |s[v, j]|) for both weights j. Distinct patterns differ by a sum of weights drawn from a continuum,
    so a false merge needs a cancellation below ``rtol`` in two independent weightings.

    Args:
        signature: ``(d_hidden, 2)`` summed signatures from :func:`coactivation_signature_update`.
        count: ``(d_hidden,)`` summed firing counts.
        n_examples: number of examples summed over (a unit with ``count == n_examples`` always fires).
        rtol: relative tolerance for summation round-off, in [0, 1e-3].

    Raises:
        ValueError: for mismatched shapes, ``n_examples < 1``, counts that are not integers in
            [0, n_examples], or ``rtol`` out of range.
    """
    if signature.ndim != 2 or signature.shape[1] != 2:
        raise ValueError(f"signature must be (d_hidden, 2), got shape {tuple(signature.shape)}")
    d_hidden = signature.shape[0]
    if count.shape != (d_hidden,):
        raise ValueError(f"count must have shape ({d_hidden},) to match signature, got {tuple(count.shape)}")
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(f"n_examples must be an int >= 1, got {n_examples!r}")
    if not 0.0 <= rtol <= 1e-3:
        raise ValueError(f"rtol must be in [0, 1e-3], got {rtol}")
    signature, count = signature.detach().to(torch.float64).cpu(), count.detach().to(torch.float64).cpu()
    bad = (count < 0) | (count > n_examples) | (count != count.round())
    if bool(bad.any()):
        raise ValueError(
            f"count must hold integers in [0, n_examples={n_examples}], got {count[bad][:5].tolist()} "
            f"at units {torch.nonzero(bad).flatten()[:5].tolist()}"
        )
    dead, always = count == 0, count == n_examples
    group_of = torch.arange(d_hidden)
    group_of[dead], group_of[always] = -1, -2

    # Sort the live units by the first signature; equal patterns are then adjacent runs of (near-)equal
    # values, and only inside a run are the second signature and the count compared.
    live = torch.nonzero(~dead & ~always).flatten()  # (n_live,)
    order = live[torch.argsort(signature[live, 0], stable=True)]
    s0 = signature[order, 0]
    tied = (s0[1:] - s0[:-1]).abs() <= rtol * torch.maximum(s0[1:].abs(), s0[:-1].abs())  # (n_live - 1,)
    bounds = [0, *(torch.nonzero(~tied).flatten() + 1).tolist(), len(order)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop - start > 1:
            _merge_run(sorted(order[start:stop].tolist()), signature, count, rtol, group_of)

    sizes = torch.bincount(group_of[live], minlength=d_hidden) if len(live) else torch.zeros(0, dtype=torch.long)
    return CoactivationGroups(
        n_dead=int(dead.sum()),
        n_always=int(always.sum()),
        n_groups=int((sizes >= 2).sum()),
        n_redundant=int((sizes - 1).clamp(min=0).sum()),
        largest_group=int(sizes.max()) if len(live) else 0,
        group_of=group_of,
    )


def _merge_run(units: list[int], signature: torch.Tensor, count: torch.Tensor, rtol: float, group_of) -> None:
    """Point each unit of a run at the first earlier unit with the same pattern (in place, local)."""
    reps: list[int] = []
    for u in units:
        for r in reps:
            close = (signature[u] - signature[r]).abs() <= rtol * torch.maximum(signature[u].abs(), signature[r].abs())
            if count[u] == count[r] and bool(close.all()):
                group_of[u] = r
                break
        else:
            reps.append(u)


def relu_signature_update(acts: torch.Tensor, example_index: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`coactivation_signature_update` of one batch of ReLU outputs ``(batch, ...)``: a unit (every
    position and neuron) is active on an example where its output is > 0.

    Returns:
        ``signature`` ``(units, 2)`` and ``count`` ``(units,)``, float64, on the CPU.
    """
    batch = acts.shape[0]
    active = (acts > 0).reshape(batch, -1).cpu()  # (batch, pos * d)
    return coactivation_signature_update(active, example_index.cpu(), seed)


class CoactivationSums:
    """Running (signature, count) sums of several ReLU layers over this process's examples, batch by
    batch, and their co-firing groups once reduced across processes."""

    def __init__(self, n_layers: int, seed: int) -> None:
        self.seed, self.n_examples = seed, 0
        self.sums: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    def update(self, acts: Sequence[torch.Tensor], example_index: torch.Tensor) -> None:
        """Adds one batch: ``acts`` the layers' outputs ``(batch, ...)``, ``example_index`` ``(batch,)``."""
        if len(acts) != len(self.sums):
            raise ValueError(f"expected the outputs of {len(self.sums)} layer(s), got {len(acts)}")
        for i, a in enumerate(acts):
            sig, count = relu_signature_update(a, example_index, self.seed)
            self.sums[i] = (sig, count) if self.sums[i] is None else (self.sums[i][0] + sig, self.sums[i][1] + count)
        self.n_examples += len(example_index)

    def groups(self, device: torch.device, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """The co-firing groups of each layer, the sums reduced by ``reduce`` (on ``device``, the one the
        reduction needs); every process calls it, with or without examples of its own."""
        reduce = reduce or (lambda t: t)
        n = int(reduce(torch.tensor(float(self.n_examples), dtype=torch.float64, device=device)).item())
        groups = []
        for part in self.sums:
            if part is None:
                raise ValueError("relu_coactivation needs at least one batch")
            sig, count = (reduce(t.to(device)).cpu() for t in part)
            groups.append(coactivation_groups(sig, count, n))
        return groups


def relu_coactivation(
    model: nn.Module,
    layers: Sequence[NodeLayer],
    batches: Iterable[Any],
    example_index: torch.Tensor,
    seed: int,
    forward: Forward = default_forward,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[CoactivationGroups]:
    """Co-firing groups of each ReLU node layer over the examples of ``batches``.

    A unit of a layer (every position and neuron) is active on an example where its output is > 0.
    ``example_index`` gives the dataset index of each example, in batch order; ``reduce`` sums the
    partial signatures and counts across processes (each process passing its own shard).
    """
    sums = CoactivationSums(len(layers), seed)
    offset, device = 0, example_index.device
    with torch.no_grad():
        for inputs in batches:
            acts = capture(model, list(layers), inputs, forward)
            batch = acts[0].shape[0]
            sums.update(acts, example_index[offset : offset + batch])
            offset += batch
            device = acts[0].device
    return sums.groups(device, reduce)
