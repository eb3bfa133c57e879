"""A memory guard: estimate the analysis' largest buffers from the first batch's shapes, refuse above a budget.

What grows with the node layers' sizes, for node layer l with ``pos_l`` positions of ``d_l`` values:

- statistics, kept for every layer through the whole analysis: the float64 Gram sum, the centred Gram
  and its eigenvectors, 3·(d_l+1)² × 8 bytes;
- per section l -> l+1, one at a time: the Jacobian chunk ``(chunk, pos_l, rows, d_l)`` in the analysis
  dtype with ``rows = pos_{l+1}·d_{l+1}`` (``position_sources·d_{l+1}`` with stochastic sources), twice
  (the chunk and its projection onto a basis); the per-example edge attributions
  ``(chunk, pos_{l+1}, d_{l+1}, d_l)`` in float64; M′, (d_l+1)² × 8 bytes; and the Jacobian cache kept
  for the LIB edges, up to ``cache_bytes``.

The estimate is the statistics of every layer plus the largest section: an upper bound on these
buffers (rows are counted in neurons even where they are taken in a smaller basis), not counting the
model's own forward and backward memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MEMORY_BUDGET", "MemoryBudgetError", "MemoryEstimate", "estimate_memory", "check_memory"]

MEMORY_BUDGET = 8 << 30
"""Default budget in bytes: 8 GiB, a third of a 24 GB machine."""

WAYS_OUT = (
    "select positions ('name@0,1'); read a conv map as positions of channels ('~channels', the default for "
    "4-D activations) instead of '~flat'; a smaller chunk_size; position_sources=R for sections with many "
    "output positions; a smaller cache_bytes; another node layer with fewer values; or "
    "memory_budget_bytes=None to skip this check"
)


class MemoryBudgetError(MemoryError, ValueError):
    """Raised before the analysis starts when its estimated memory exceeds the budget."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes of the analysis' largest buffers.

    Attributes:
        layers: ``(description, bytes)`` of every node layer's statistics.
        sections: ``(description, bytes)`` of every section's Jacobian work.
        total: every layer's statistics plus the largest section.
    """

    layers: tuple[tuple[str, int], ...]
    sections: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.layers) + max((b for _, b in self.sections), default=0)

    def lines(self) -> list[str]:
        """Every item, largest first."""
        items = sorted([*self.layers, *self.sections], key=lambda item: -item[1])
        return [f"{_gb(b)}  {what}" for what, b in items]


def _gb(n: int) -> str:
    """Bytes in the largest unit of GB, MB, kB that keeps the number at least 1."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def estimate_memory(
    names: Sequence[str],
    shapes: Sequence[tuple[int, int, int]],
    *,
    chunk_size: int,
    itemsize: int,
    cache_bytes: int,
    n_examples: int | None,
    position_sources: int | None = None,
    lib: bool = True,
) -> MemoryEstimate:
    """The estimate for node layers ``names`` whose first-batch activations have ``shapes`` ``(batch, pos, d)``.

    Args:
        chunk_size: examples per Jacobian chunk (capped by the first batch's size).
        itemsize: bytes per value in the analysis dtype.
        cache_bytes: the Jacobian cache's budget.
        n_examples: the dataset's size if known (bounds the cache), else the cache is counted full.
        position_sources: stochastic sources replacing the output positions, if any.
        lib: whether the LIB basis (M′ and the cache) is built.
    """
    chunk = min(chunk_size, shapes[0][0])
    layers = tuple(
        (f"statistics of {name!r}: 3 x (d+1)^2 float64, d = {d}", 3 * (d + 1) ** 2 * 8)
        for name, (_, _, d) in zip(names, shapes)
    )
    sections = []
    for (name_in, (_, pos_in, d_in)), (name_out, (_, pos_out, d_out)) in zip(zip(names, shapes), zip(names[1:], shapes[1:])):
        rows = (position_sources or pos_out) * d_out
        per_example = pos_in * rows * d_in * itemsize
        jac = 2 * chunk * per_example
        attributions = chunk * (position_sources or pos_out) * d_out * d_in * 8
        m_prime = (d_in + 1) ** 2 * 8 if lib else 0
        cache = min(cache_bytes, per_example * n_examples if n_examples is not None else cache_bytes) if lib else 0
        what = (
            f"section {name_in!r} -> {name_out!r}: Jacobian chunk of {chunk} examples x {pos_in} positions x "
            f"{rows} rows x {d_in} values, twice ({_gb(jac)}); attributions ({_gb(attributions)}); "
            f"M' ({_gb(m_prime)}); Jacobian cache ({_gb(cache)})"
        )
        sections.append((what, jac + attributions + m_prime + cache))
    return MemoryEstimate(layers, tuple(sections))


def check_memory(estimate: MemoryEstimate, budget: int | None) -> None:
    """Raises :class:`MemoryBudgetError` if ``estimate.total`` exceeds ``budget`` bytes (``None``: no limit).

    Raises:
        MemoryBudgetError: with the estimate per layer and section, largest first, and the ways out.
    """
    if budget is None or estimate.total <= budget:
        return
    listed = "\n  ".join(estimate.lines())
    raise MemoryBudgetError(
        f"the analysis would need about {_gb(estimate.total)} (every layer's statistics plus the largest "
        f"section), above memory_budget_bytes = {budget} ({_gb(budget)}):\n  {listed}\nWays out: {WAYS_OUT}"
    )
