"""Model inputs as nested structures: one helper for their batch size, examples, devices and dtypes.

Model inputs may be a tensor or any nesting of tuples, lists, dicts and other mappings (a HuggingFace
``BatchEncoding`` is a ``UserDict``, not a dict) holding tensors and other values. Built on
``torch.utils._pytree``; mappings that pytree does not know are treated as dicts and rebuilt as their
own type (``type(m)(dict)``; a plain dict where that constructor fails).

Which leaves are example-level: tensors with ``ndim >= 1``, batch first. They must all share the batch
size. Everything else (0-d tensors, numbers, strings, None) is context that every example shares: it
passes through selection unchanged and is taken from the first batch when batches are concatenated.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = [
    "batch_size", "describe", "example_leaves", "select", "split", "concat", "to_device", "prepare", "to_state",
    "from_state",
]


class _Mapped:
    """A mapping pytree does not know, as a dict plus the type to rebuild (registered below)."""

    def __init__(self, cls: type, data: dict[Any, Any]) -> None:
        self.cls, self.data = cls, data


def _mapped_flatten(node: _Mapped) -> tuple[list[Any], Any]:
    return list(node.data.values()), (node.cls, tuple(node.data))


def _mapped_flatten_with_keys(node: _Mapped) -> tuple[list[tuple[Any, Any]], Any]:
    values, context = _mapped_flatten(node)
    return [(pytree.MappingKey(k), v) for k, v in zip(context[1], values)], context


def _mapped_unflatten(values: Sequence[Any], context: Any) -> _Mapped:
    cls, keys = context
    return _Mapped(cls, dict(zip(keys, values)))


def _mapped_to_json(context: Any) -> list[Any]:
    cls, keys = context
    return [f"{cls.__module__}:{cls.__qualname__}", list(keys)]


def _mapped_from_json(dumped: list[Any]) -> Any:
    """The mapping type named ``module:qualname`` (a plain dict if it cannot be imported), and the keys."""
    module, _, qualname = dumped[0].partition(":")
    try:
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError):
        cls = dict
    return (cls if isinstance(cls, type) and issubclass(cls, Mapping) else dict), tuple(dumped[1])


pytree.register_pytree_node(
    _Mapped, _mapped_flatten, _mapped_unflatten, flatten_with_keys_fn=_mapped_flatten_with_keys,
    serialized_type_name="lib_lightning.core.lib.batch._Mapped", to_dumpable_context=_mapped_to_json,
    from_dumpable_context=_mapped_from_json,
)


def _foreign_mapping(x: Any) -> bool:
    return isinstance(x, Mapping) and type(x) not in pytree.SUPPORTED_NODES


def _wrap(tree: Any) -> Any:
    """Foreign mappings -> :class:`_Mapped` nodes, at any depth."""
    return pytree.tree_map(
        lambda x: _Mapped(type(x), {k: _wrap(v) for k, v in x.items()}) if _foreign_mapping(x) else x,
        tree,
        is_leaf=_foreign_mapping,
    )


def _rebuild(cls: type, data: dict[Any, Any]) -> Any:
    try:
        return cls(data)
    except Exception:  # a constructor that does not take a dict: keep the contents as a plain dict
        return data


def _unwrap(tree: Any) -> Any:
    """Inverse of :func:`_wrap`."""
    is_mapped = lambda x: isinstance(x, _Mapped)  # noqa: E731
    return pytree.tree_map(
        lambda x: _rebuild(x.cls, {k: _unwrap(v) for k, v in x.data.items()}) if is_mapped(x) else x,
        tree,
        is_leaf=is_mapped,
    )


def _map(fn, inputs: Any) -> Any:
    """``fn`` applied to every leaf; the structure (and mapping types) kept."""
    return _unwrap(pytree.tree_map(fn, _wrap(inputs)))


def _is_example_level(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.ndim >= 1


def example_leaves(inputs: Any) -> list[tuple[str, torch.Tensor]]:
    """The example-level tensors of model inputs with their paths (``"[0]['input_ids']"``; ``""`` for a tensor)."""
    paths_leaves, _ = pytree.tree_flatten_with_path(_wrap(inputs))
    return [(pytree.keystr(path), leaf) for path, leaf in paths_leaves if _is_example_level(leaf)]


def describe(inputs: Any) -> str:
    """A short account of model inputs for error messages: type and every tensor's path, shape and dtype."""
    paths_leaves, _ = pytree.tree_flatten_with_path(_wrap(inputs))
    parts = [
        f"{pytree.keystr(path) or 'tensor'} {tuple(leaf.shape)} {str(leaf.dtype).removeprefix('torch.')}"
        for path, leaf in paths_leaves
        if isinstance(leaf, torch.Tensor)
    ]
    return f"{type(inputs).__name__} of " + (", ".join(parts) if parts else "no tensors")


def _describe(path: str) -> str:
    return f"leaf {path!r}" if path else "the tensor"


def batch_size(inputs: Any, expected: int | None = None, what: str = "model inputs") -> int:
    """The number of examples in model inputs: the shared first dimension of every example-level tensor.

    Args:
        inputs: a tensor or a nesting of tuples, lists, dicts and mappings.
        expected: if given, the batch size the inputs must have.
        what: what the inputs are, for the error messages.

    Raises:
        TypeError: if no leaf is a tensor with a batch dimension.
        ValueError: naming the first leaf (its path and shape) whose first dimension differs from the
            others' (or from ``expected``).
    """
    leaves = example_leaves(inputs)
    if not leaves:
        raise TypeError(
            f"{what} of type {type(inputs).__name__} hold no tensor with a batch dimension (ndim >= 1); "
            "give a tensor, or a tuple/list/dict/mapping of tensors, batch first"
        )
    first_path, first = leaves[0]
    size = first.shape[0] if expected is None else expected
    for path, leaf in leaves:
        if leaf.shape[0] != size:
            source = f"expected batch size {expected}" if expected is not None else (
                f"{_describe(first_path)} has batch size {size} (shape {tuple(first.shape)})"
            )
            raise ValueError(
                f"{what}: {_describe(path)} has shape {tuple(leaf.shape)}, but {source}; every tensor "
                "with ndim >= 1 must be batch first with the same batch size"
            )
    return size


def select(inputs: Any, index: slice | torch.Tensor) -> Any:
    """The examples ``index`` (a slice or an index tensor over the batch dimension, on any device) of model inputs."""

    def one(x: Any) -> Any:
        if not _is_example_level(x):
            return x
        return x[index.to(x.device)] if isinstance(index, torch.Tensor) else x[index]

    return _map(one, inputs)


def split(inputs: Any, size: int) -> list[Any]:
    """Model inputs in consecutive batches of at most ``size`` examples."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    n = batch_size(inputs)
    return [select(inputs, slice(start, start + size)) for start in range(0, n, size)]


def concat(batches: Sequence[Any]) -> Any:
    """One batch from several of the same structure (example-level tensors concatenated, batch first).

    Raises:
        ValueError: on an empty list, or batches whose structures (containers, keys) differ.
    """
    if not batches:
        raise ValueError("concat needs at least one batch, got none")
    flat = [pytree.tree_flatten(_wrap(b)) for b in batches]
    leaves0, spec = flat[0]
    for i, (_, other) in enumerate(flat[1:], start=1):
        if other != spec:
            raise ValueError(f"batch {i} has another structure than batch 0: {other} versus {spec}")
    for b in batches:
        batch_size(b)
    columns = zip(*(leaves for leaves, _ in flat))
    merged = [torch.cat(col) if _is_example_level(col[0]) else col[0] for col in columns]
    return _unwrap(pytree.tree_unflatten(merged, spec))


def to_device(inputs: Any, device: torch.device | str) -> Any:
    """Model inputs with every tensor moved to ``device``."""
    return _map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, inputs)


def prepare(inputs: Any, dtype: torch.dtype | None) -> Any:
    """Every tensor cloned (out of inference mode), floating ones cast to ``dtype`` (None: kept)."""

    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        out = x.clone()
        return out.to(dtype) if dtype is not None and out.is_floating_point() else out

    return _map(one, inputs)


def to_state(inputs: Any) -> dict[str, Any]:
    """Model inputs as tensors, plain values and a JSON string, which ``torch.load(weights_only=True)`` reads.

    Mapping types are stored by name and rebuilt by :func:`from_state` (as a dict if not importable).

    Raises:
        NotImplementedError: for containers pytree cannot serialise (e.g. a namedtuple it does not know).
    """
    leaves, spec = pytree.tree_flatten(_wrap(inputs))
    return {"leaves": leaves, "structure": pytree.treespec_dumps(spec)}


def from_state(state: dict[str, Any]) -> Any:
    """Inverse of :func:`to_state`."""
    return _unwrap(pytree.tree_unflatten(state["leaves"], pytree.treespec_loads(state["structure"])))
