"""Runs of one part of a model on many substituted activations at once, for the ablations.

A :class:`Section` is the computation from node layer l to node layer l+1 (edge ablation) or to the
model's output (node ablation). Its runs on several substituted values of node layer l share one
forward: the model runs once up to layer l on a slice of the batch, that value is repeated once per
substitution along the batch dimension and replaced, and the rest runs on all rows at once
(:meth:`Section.run`). That is valid only where nothing after layer l reads a batch-sized tensor from
before it, which :func:`stacking_holds` checks on real data.

Where the section is affine in layer l's features (the unembedding; any Linear chain), its output is
``a0 + Σ_{p,j} f[b,p,j] A[p,j,...]`` for every example, so every ablation is one contraction with
``A`` instead of a forward: :func:`affine_map` reads ``A`` from the section's response to scaled unit
features, and :func:`affine_holds` accepts it only if it reproduces real forwards of several masks to
1000 ulp of the bound on the rounding error (a ReLU or softmax section fails by orders of magnitude).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import torch
from torch import nn

from lib_lightning.core.lib import batch as nested
from lib_lightning.core.lib.basis import LayerBasis
from lib_lightning.core.lib.capture import Forward, NodeLayer, capture, resolve_modules, run_section, substituted
from lib_lightning.core.lib.nodes import register_hook

__all__ = [
    "Section", "AffineMap", "row_plan", "stacking_holds", "affine_map", "affine_holds", "probe_masks", "section_mode",
    "identity", "single_runs", "layer_features", "running_products",
]

ULP_TOLERANCE = 1e3  # agreement required by the probes, in units of the dtype's eps


class _Stop(BaseException):
    """Ends a forward pass once the section's output is read (not an ``Exception``: models may catch those)."""


@dataclass(frozen=True)
class Section:
    """The model from node layer ``layer_in`` to node layer ``layer_out`` (None: to the model's output)."""

    model: nn.Module
    forward: Forward
    layer_in: NodeLayer
    layer_out: NodeLayer | None

    def run(self, inputs: Any, acts: torch.Tensor, c: int, stacked: bool) -> torch.Tensor:
        """The output ``(c * batch, ...)`` (``layer_out``'s activation ``(c * batch, pos, d)``, or the model's
        output) with ``layer_in``'s activation replaced by ``acts`` ``(c * batch, pos_in, d_in)``, copy j
        of the batch taking rows ``j * batch : (j + 1) * batch``. ``stacked``: one forward for all c copies
        (valid where :func:`stacking_holds`), else one forward per copy."""
        if c == 1 or not stacked:
            batch = acts.shape[0] // c
            return torch.cat([self._single(inputs, acts[j * batch:(j + 1) * batch]) for j in range(c)])
        return self._stacked(inputs, acts, c)

    def _single(self, inputs: Any, acts: torch.Tensor) -> torch.Tensor:
        if self.layer_out is None:
            with substituted(self.model, self.layer_in, lambda act: acts.to(act.dtype)) as done:
                output = self.forward(self.model, inputs)
            if not done:
                raise RuntimeError(f"node layer {self.layer_in.name!r} was not reached by the forward pass")
            return output
        return run_section(self.model, self.layer_in, self.layer_out, inputs, lambda act: acts.to(act.dtype),
                           self.forward)

    @cached_property
    def _modules(self) -> list[nn.Module]:
        """The modules of ``layer_in`` (and ``layer_out``), resolved once: a run resolving them by name walked
        every module of the model."""
        return resolve_modules(self.model, [self.layer_in] + ([] if self.layer_out is None else [self.layer_out]))

    def _stacked(self, inputs: Any, acts: torch.Tensor, c: int) -> torch.Tensor:
        modules = self._modules
        result: list[torch.Tensor] = []

        def replace(value: torch.Tensor) -> torch.Tensor:
            shape = (c * value.shape[0], *value.shape[1:])
            if self.layer_in.positions is None:  # only the shape of the stacked value is read: no copies
                return self.layer_in.from_acts(torch.broadcast_to(value[:1], shape), acts.to(value.dtype))
            stacked = value.repeat(c, *[1] * (value.ndim - 1))  # the unselected positions are kept
            return self.layer_in.from_acts(stacked, acts.to(value.dtype))

        def read(value: torch.Tensor) -> None:
            result.append(self.layer_out.to_acts(value))
            raise _Stop

        handles = [register_hook(modules[0], self.layer_in, replace)]
        if self.layer_out is not None:
            handles.append(register_hook(modules[1], self.layer_out, read))
        try:
            output = self.forward(self.model, inputs)
        except _Stop:
            output = None
        finally:
            for handle in handles:
                handle.remove()
        if self.layer_out is not None:
            if not result:
                raise RuntimeError(f"node layer {self.layer_out.name!r} was not reached after {self.layer_in.name!r}")
            output = result[0]
        if not isinstance(output, torch.Tensor) or output.shape[0] != acts.shape[0]:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise RuntimeError(f"stacked section returned {got}, expected {acts.shape[0]} rows")
        return output


def layer_features(section: Section, basis: LayerBasis, data) -> tuple[list[torch.Tensor], torch.dtype]:
    """``layer_in``'s features ``(batch, pos_in, k_in)`` on each batch of ``data`` (``(inputs, labels)``
    pairs), captured once, and the dtype the model computes that layer in (the dtype to hand its
    substituted values over in)."""
    feats, dtype = [], None
    for inputs, _ in data:
        (act,) = capture(section.model, [section.layer_in], inputs, section.forward)  # (batch, pos_in, d_in)
        feats.append(basis.transform(act))
        dtype = act.dtype
    return feats, dtype


def identity(out: torch.Tensor) -> torch.Tensor:
    """A section's output as it is (the ``read`` of a section that ends at the model's output)."""
    return out


def row_plan(batch: int, copies: int, max_rows: int) -> tuple[int, int]:
    """``(examples, copies)`` per forward: all ``copies`` of slices of the batch while they fit in
    ``max_rows`` rows, so that the model's part before the section runs once for many copies."""
    copies = max(copies, 1)
    examples = min(batch, max(1, max_rows // copies))
    return examples, min(copies, max(1, max_rows // examples))


def probe_masks(k_in: int, seed: int = 0) -> torch.Tensor:
    """``(6, k_in)`` bool masks of the probes: every feature, the first only, the first half, and three
    random halves that keep the first (the constant direction of a centred basis)."""
    masks = torch.rand(6, k_in, generator=torch.Generator().manual_seed(seed)) < 0.5
    masks[0] = True
    masks[1:3] = torch.arange(k_in)[None, :] < torch.tensor([[1], [max(k_in // 2, 1)]])
    masks[:, 0] = True
    return masks


def _agree(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | float,
           dtype: torch.dtype | None = None) -> bool:
    """``got`` equals ``want`` to 1000 ulp of ``dtype`` (default ``want``'s: the precision the model ran in)
    relative to ``scale``."""
    if got.shape != want.shape:
        return False
    rtol = ULP_TOLERANCE * torch.finfo(dtype or want.dtype).eps
    return bool(((got - want).abs().max() <= rtol * max(float(scale), torch.finfo(want.dtype).tiny)).item())


def single_runs(section: Section, inputs: Any, acts: torch.Tensor) -> torch.Tensor:
    """``(c, batch, ...)``: the section's output for each copy of ``acts`` ``(c, batch, pos_in, d_in)``, one
    forward each (the reference the probes compare with)."""
    c, batch = acts.shape[:2]
    single = section.run(inputs, acts.reshape(c * batch, *acts.shape[2:]), c, stacked=False)
    return single.reshape(c, batch, *single.shape[1:])


def stacking_holds(section: Section, inputs: Any, acts: torch.Tensor, examples: int,
                   single: torch.Tensor | None = None) -> bool:
    """Whether one stacked forward of the copies ``acts`` ``(c, batch, pos_in, d_in)`` on the first
    ``examples`` examples agrees with one forward per copy on the whole batch (``single``, computed when
    not given) to 1000 ulp of the model's dtype, relative to the largest output; False also when the
    stacked forward fails on this model (it reads a batch-sized tensor across the section, or one from
    another example)."""
    c, batch = acts.shape[:2]
    single = (single_runs(section, inputs, acts) if single is None else single)[:, :examples]  # (c, examples, ...)
    part = inputs if examples == batch else nested.select(inputs, slice(0, examples))
    try:
        stacked = section.run(part, acts[:, :examples].reshape(c * examples, *acts.shape[2:]), c, stacked=True)
    except (RuntimeError, ValueError, IndexError, TypeError):
        return False
    return _agree(stacked.reshape(single.shape) if stacked.numel() == single.numel() else stacked, single,
                  single.abs().max())


@dataclass(frozen=True)
class AffineMap:
    """A section's output as an affine function of its input features: ``out = a0 + Σ_{p,j} f[p,j] A[p,j]``.

    Attributes:
        a0: ``(*out,)`` the output at zero features (one example's output shape, e.g. ``(pos_out, k_out)``).
        A: ``(pos_in, k_in, *out)`` the response to each input feature.
    """

    a0: torch.Tensor
    A: torch.Tensor

    def __call__(self, feats: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """``(batch, pos_in, k_in)`` -> ``(batch, *out)``, in the wider of the two dtypes; ``k``: only the
        first k input features count (the rest taken as zero)."""
        dtype = torch.promote_types(feats.dtype, self.A.dtype)
        A = self.A if k is None else self.A[:, :k]
        feats = feats if k is None else feats[..., :k]
        return self.a0.to(dtype) + torch.tensordot(feats.to(dtype), A.to(dtype), dims=([1, 2], [0, 1]))

    def prefixes(self, feats: torch.Tensor, ks: list[int]) -> Iterator[torch.Tensor]:
        """``self(feats, k)`` for each k of the ascending ``ks`` (:func:`running_products`, features major and
        positions minor so that the first k features of every position are the first k·pos_in columns).
        Each result is the running sum itself, changed by the next step: use it before asking for the next."""
        dtype = torch.promote_types(feats.dtype, self.A.dtype)
        batch, pos_in, k_in = feats.shape
        left = feats.to(dtype).transpose(1, 2).reshape(batch, k_in * pos_in)
        right = self.A.to(dtype).transpose(0, 1).reshape(k_in * pos_in, -1)  # (k_in * pos_in, out)
        start = self.a0.to(dtype).reshape(1, -1).expand(batch, -1)
        for running in running_products(left, right, ks, start, width=pos_in):
            yield running.view(batch, *self.a0.shape)

    def bound(self, feats: torch.Tensor) -> torch.Tensor:
        """The largest ``|a0| + Σ |f A|``: the scale of the rounding error of a real forward and of this map."""
        dtype = torch.promote_types(feats.dtype, self.A.dtype)
        terms = torch.tensordot(feats.to(dtype).abs(), self.A.to(dtype).abs(), dims=([1, 2], [0, 1]))
        return (self.a0.to(dtype).abs() + terms).max()


def running_products(left: torch.Tensor, right: torch.Tensor, ks: list[int], start: torch.Tensor,
                     width: int = 1) -> Iterator[torch.Tensor]:
    """``start + left[:, :k·width] @ right[:k·width]`` for each k of the ascending ``ks``, as one running sum
    that adds the columns since the previous k (Σ k_j − k_{j−1} of them multiplied in all, not Σ k_j: node
    ablation's projections and affine rest, 2-3x faster on the main job's schedule); equal to one product
    per k up to rounding. Each result is the running sum itself, changed by the next step.

    Raises:
        ValueError: for ``ks`` not ascending.
    """
    running, done = start.clone(), 0
    for k in ks:
        if k < done:
            raise ValueError(f"ks must be ascending, got {list(ks)}")
        if k > done:
            running.addmm_(left[:, done * width:k * width], right[done * width:k * width])
            done = k
        yield running


def affine_map(section: Section, inputs: Any, feats: torch.Tensor, basis: LayerBasis,
               read: Callable[[torch.Tensor], torch.Tensor], max_rows: int, max_size: int = 2**25) -> AffineMap | None:
    """The affine map that the section would be, read from its response to unit features on the first
    example of ``inputs``, each scaled to the largest magnitude of that feature in ``feats``
    ``(batch, pos_in, k_in)``; None when ``A`` would exceed ``max_size`` elements. Valid only where
    :func:`stacking_holds` and :func:`affine_holds`. ``read`` maps the section's output to the
    quantity wanted (e.g. output features)."""
    _, pos_in, k_in = feats.shape
    scale = feats.abs().amax(dim=0).clamp_min(1.0).reshape(-1)  # (pos_in * k_in,)
    units = torch.cat([scale.new_zeros(1, pos_in * k_in), torch.diag(scale)])  # (1 + pos_in * k_in, ...)
    one = nested.select(inputs, slice(0, 1))
    outs = []
    for start in range(0, units.shape[0], max_rows):
        chunk = units[start:start + max_rows].reshape(-1, pos_in, k_in)  # (c, pos_in, k_in)
        outs.append(read(section.run(one, basis.reconstruct(chunk), chunk.shape[0], stacked=True)))
        if outs[0][0].numel() * pos_in * k_in > max_size:
            return None
    out = torch.cat(outs)  # (1 + pos_in * k_in, *out)
    a0 = out[0]
    A = (out[1:] - a0) / scale.reshape(-1, *[1] * a0.ndim).to(out.dtype)  # (pos_in * k_in, *out)
    return AffineMap(a0, A.reshape(pos_in, k_in, *a0.shape))


def affine_holds(section: Section, inputs: Any, feats: torch.Tensor, basis: LayerBasis, affine: AffineMap,
                 read: Callable[[torch.Tensor], torch.Tensor], masks: torch.Tensor,
                 single: torch.Tensor | None = None) -> bool:
    """Whether ``affine`` reproduces the section's real forward on ``inputs`` (``single``
    ``(m, batch, ...)``, computed when not given) with the input features ``feats``
    ``(batch, pos_in, k_in)`` masked by each of ``masks`` ``(m, k_in)``, to 1000 ulp of the precision the
    model ran in, relative to :meth:`AffineMap.bound`."""
    masked = feats.unsqueeze(0) * masks[:, None, None, :].to(feats.device, feats.dtype)  # (m, batch, pos_in, k_in)
    if single is None:
        single = single_runs(section, inputs, basis.reconstruct(masked))
    for raw, m in zip(single, masked):
        real = read(raw)
        if not _agree(affine(m).to(real.dtype), real, affine.bound(m), raw.dtype):
            return False
    return True


def section_mode(section: Section, basis: LayerBasis, inputs: Any, feats: torch.Tensor,
                 read: Callable[[torch.Tensor], torch.Tensor], masks: torch.Tensor, max_rows: int,
                 probe_size: int = 128) -> tuple[bool, AffineMap | None]:
    """``(stacked, affine)`` by the probes on the first ``probe_size`` examples of one batch (``inputs``
    with input features ``feats`` ``(batch, pos_in, k_in)``), masked by each of ``masks`` ``(m, k_in)``:
    whether copies of half of them may share a forward (:func:`stacking_holds`), and the section's affine
    map where it is affine (:func:`affine_map`, :func:`affine_holds`). ``max_rows`` <= 1:
    ``(False, None)``, no probe."""
    if max_rows <= 1:
        return False, None
    n = min(feats.shape[0], probe_size)
    inputs = inputs if n == feats.shape[0] else nested.select(inputs, slice(0, n))
    feats = feats[:n]
    masked = feats.unsqueeze(0) * masks[:, None, None, :].to(feats.device, feats.dtype)  # (m, n, pos_in, k_in)
    acts = basis.reconstruct(masked)
    single = single_runs(section, inputs, acts)  # (m, n, ...): the reference of both probes
    if not stacking_holds(section, inputs, acts, max(1, n // 2), single):
        return False, None  # the model reads batch-sized tensors across the section: one forward per copy
    affine = affine_map(section, inputs, feats, basis, read, max_rows)
    if affine is None or not affine_holds(section, inputs, feats, basis, affine, read, masks, single):
        return True, None
    return True, affine
