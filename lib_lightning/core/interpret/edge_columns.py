"""Output features of an edge-ablated section, computed once per row mask and reused across the ks of
the search (LIB_SPEC.md §5, §7).

With the k strongest edges kept, output feature i reads the section run on the input features masked by
row i of the edge mask, and that row is fixed by how many of row i's own edges rank in the top k: the
key ``(i, count)``. A step of the search changes the count of few rows once its interval is small, so
only those rows are run (:class:`ColumnCache`); the rest are read back. The runs of one step share
forwards through :meth:`lib_lightning.core.interpret.sections.Section.run`, examples x masks up to a
row budget, and an affine section needs no forward at all (:func:`affine_columns`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lib_lightning.core.interpret.sections import AffineMap, Section, row_plan
from lib_lightning.core.lib import batch as nested
from lib_lightning.core.lib.basis import LayerBasis

__all__ = ["ColumnCache", "new_columns", "affine_columns"]


class ColumnCache:
    """Output feature i of the section over every example ``(n, pos_out)``, keyed by ``(i, count)``: the
    row of the edge mask that produced it is row i's ``count`` strongest inputs (the constant included)."""

    def __init__(self) -> None:
        self._store: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def keys(mask: torch.Tensor) -> list[tuple[int, int]]:
        """``(row, kept inputs)`` of each row of the ``(k_out, k_in)`` edge mask."""
        return list(enumerate(mask.sum(1).tolist()))

    def missing(self, mask: torch.Tensor) -> torch.Tensor:
        """Indices of the rows of ``mask`` not stored yet."""
        return torch.tensor([i for i, key in enumerate(self.keys(mask)) if key not in self._store], dtype=torch.long)

    def put(self, key: tuple[int, int], column: torch.Tensor) -> None:
        self._store[key] = column

    def columns(self, mask: torch.Tensor) -> torch.Tensor:
        """``(n, pos_out, k_out)``: every output feature under its row of ``mask`` (all stored)."""
        return torch.stack([self._store[key] for key in self.keys(mask)], dim=-1)

    def keep_between(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Drops the entries outside the bracket of the search: row i with fewer kept inputs than row i of
        the ``low`` mask or more than row i of ``high``."""
        lo, hi = low.sum(1).tolist(), high.sum(1).tolist()
        self._store = {(i, c): v for (i, c), v in self._store.items() if lo[i] <= c <= hi[i]}


def _group(mask: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The distinct masks ``(g, k_in)`` among ``rows`` of ``mask``, and the rows of each."""
    groups, inverse = torch.unique(mask[rows], dim=0, return_inverse=True)
    return groups, [rows[inverse == g] for g in range(groups.shape[0])]


def _masked_acts(feats: torch.Tensor, kept: list[torch.Tensor], directions: list[torch.Tensor],
                 dtype: torch.dtype) -> torch.Tensor:
    """``(c * e, pos_in, d_in)`` in ``dtype``: copy j is (f̂ ⊙ m_j) C⁺ of ``feats`` ``(e, pos_in, k_in)``, formed
    from the kept features ``kept[j]`` and their rows ``directions[j]`` ``(kept, d_in)`` of C⁺ alone (masks of
    a search step keep few of them) in the features' precision, and rounded once to ``dtype``."""
    e, pos, k_in = feats.shape
    d = directions[0].shape[1]
    flat = feats.reshape(e * pos, k_in)
    acts = torch.empty(len(kept), e * pos, d, dtype=dtype, device=feats.device)
    for j, (cols, rows) in enumerate(zip(kept, directions)):
        acts[j] = torch.mm(flat.index_select(1, cols), rows)  # (e * pos_in, d_in); 2-D: 25 % faster, same bits
    return acts.reshape(-1, pos, d)  # (c * e, pos_in, d_in)


def _augmented(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(..., d + 1)`` in ``dtype``: :func:`lib_lightning.core.lib.stats.augment` of ``out`` ``(..., d)`` cast to
    ``dtype``, in one copy. Written in place, so for these no-grad forwards only: ``augment`` itself stays
    out of place, as the build's Jacobians differentiate (and vmap) through it."""
    aug = torch.empty(*out.shape[:-1], out.shape[-1] + 1, dtype=dtype, device=out.device)
    aug[..., :-1] = out
    aug[..., -1] = 1
    return aug


def _batch_columns(section: Section, stacked: bool, basis_in: LayerBasis, basis_out: LayerBasis, inputs: Any,
                   feats: torch.Tensor, groups: torch.Tensor, members: list[torch.Tensor], max_rows: int,
                   dtype: torch.dtype):
    """One batch: for each group, the output features of its member rows ``(batch, pos_out, members)``;
    layer l's values are handed to the section in ``dtype``."""
    batch = feats.shape[0]
    n_groups = groups.shape[0]
    examples, copies = row_plan(batch, n_groups, max_rows) if stacked else (batch, 1)
    kept = [torch.nonzero(g).squeeze(1).to(feats.device) for g in groups]  # the input features of each mask
    directions = [basis_in.basis_pinv[cols, :-1] for cols in kept]  # (kept, d_in) rows of C⁺
    readers = [basis_out.basis[:, rows] for rows in members]  # (d_out + 1, m) columns of C
    parts: list[list[torch.Tensor]] = [[] for _ in range(n_groups)]
    for first in range(0, batch, examples):
        part = inputs if examples >= batch else nested.select(inputs, slice(first, first + examples))
        f = feats[first:first + examples]  # (e, pos_in, k_in)
        e = f.shape[0]
        for start in range(0, n_groups, copies):
            c = min(copies, n_groups - start)
            acts = _masked_acts(f, kept[start:start + c], directions[start:start + c], dtype)  # (c * e, pos_in, d)
            out = section.run(part, acts, c, stacked)  # (c * e, pos_out, d_out)
            out = _augmented(out, basis_out.basis.dtype).reshape(c, e, *out.shape[1:-1], -1)
            for j in range(c):
                parts[start + j].append(out[j] @ readers[start + j])  # (e, pos_out, m)
    return [torch.cat(p) for p in parts]


def new_columns(section: Section, stacked: bool, basis_in: LayerBasis, basis_out: LayerBasis,
                batches: Sequence[tuple[Any, torch.Tensor]], mask: torch.Tensor, cache: ColumnCache,
                max_rows: int, dtype: torch.dtype | None = None) -> int:
    """Runs the rows of ``mask`` ``(k_out, k_in)`` that ``cache`` lacks, on every batch of
    ``(inputs, input features (batch, pos_in, k_in))``, and stores them; returns the number of distinct
    masks run. ``stacked``: several masks and examples per forward, up to ``max_rows`` rows. ``dtype``:
    the dtype the model computes layer l in (the masked values are rounded to it once; default the
    features' dtype, which the section's hook casts as needed)."""
    dtype = batches[0][1].dtype if dtype is None else dtype
    rows = cache.missing(mask)
    if rows.numel() == 0:
        return 0
    groups, members = _group(mask, rows)
    per_batch = [
        _batch_columns(section, stacked, basis_in, basis_out, inputs, feats, groups, members, max_rows, dtype)
        for inputs, feats in batches
    ]
    keys = cache.keys(mask)
    for g, member in enumerate(members):
        columns = torch.cat([b[g] for b in per_batch]).movedim(-1, 0).contiguous()  # (m, n, pos_out)
        for j, i in enumerate(member.tolist()):
            cache.put(keys[i], columns[j])  # contiguous: ColumnCache.columns stacks them 6x faster than strided
    return groups.shape[0]


def affine_columns(affine: AffineMap, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(batch, pos_out, k_out)``: the output features of an affine section, row i with its inputs masked
    by row i of ``mask`` ``(k_out, k_in)``: ``a0[q,i] + Σ_{p,j} f[b,p,j] m[i,j] A[p,j,q,i]``."""
    dtype = torch.promote_types(feats.dtype, affine.A.dtype)
    weights = affine.A.to(dtype) * mask.T.to(affine.A.device, dtype)[None, :, None, :]  # (pos_in, k_in, pos_out, k_out)
    return affine.a0.to(dtype) + torch.einsum("bpj,pjqi->bqi", feats.to(dtype), weights)
