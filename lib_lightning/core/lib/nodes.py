"""What a node layer is: which value of a module (an element of its output or one of its inputs) and
how that value is read as ``(batch, pos, d)`` (its layout), with the inverse for substitution.

Grammar of a node-layer string (every part after the module name is optional, in this order)::

    module[sel]~layout@positions

- ``module``: a dotted name from ``model.named_modules()``.
- ``[sel]``: which value. None (or ``[out]``): the module's output. ``[out:PATH]``: an element of a
  tuple/list/dict/``ModelOutput`` output, ``PATH`` being dot-separated steps, an integer for a
  sequence index (or the n-th value of a mapping), a name for a mapping key: ``rnn[out:0]`` is the
  output sequence of ``nn.LSTM``'s ``(out, (h, c))``, ``rnn[out:1.0]`` its ``h``. ``[in]``: the first
  positional input; ``[in:1]`` the second; ``[in:hidden_states]`` the keyword (or named positional)
  input; further steps go into that input's structure (``[in:0.x]``).
- ``~layout``: how the tensor maps to positions and features (see :data:`LAYOUTS`); by default a 2-D
  value ``(batch, d)`` is one position, a 3-D value is ``~tokens`` and 4-D or more is ``~channels``.
- ``@positions``: comma-separated indices into the position axis, e.g. ``@-1`` or ``@0,1``. For
  ``~channels`` the positions are the spatial grid flattened in row-major order (``p = h * W + w``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LAYOUTS", "NodeLayer", "describe", "register_hook"]

LAYOUTS = ("tokens", "channels", "flat")
"""``tokens``: ``(batch, *pos, d)``, features last (a 3-D ``(batch, T, d)`` sequence, or channels-last
images); ``channels``: ``(batch, C, *spatial)``, the C channels are the features at each of the
flattened spatial positions (conv maps; Conv1d's ``(batch, C, L)``); ``flat``: one position of every
value, ``(batch, 1, prod(rest))``."""

_SPEC = re.compile(r"^(?P<module>[^\[\]~@]*)(?:\[(?P<sel>[^\]]*)\])?(?:~(?P<layout>[^@]*))?(?:@(?P<pos>.*))?$")
_GRAMMAR = "'module', 'module[in]', 'module[in:<index or name>]', 'module[out:<path>]', then '~<layout>' and '@<positions>'"

Step = int | str


def _steps(path: str, spec: str) -> tuple[Step, ...]:
    if not path:
        raise ValueError(f"node layer {spec!r}: empty path after ':'; grammar: {_GRAMMAR}")
    return tuple(int(s) if re.fullmatch(r"-?\d+", s) else s for s in path.split("."))


@dataclass(frozen=True)
class NodeLayer:
    """A node layer: a value of the module at ``module`` read as ``(batch, pos, d)``, at some positions.

    Args:
        module: dotted module path, as in ``model.named_modules()`` (e.g. ``"model.hook_resid_mid"``).
        positions: indices into the position axis (see ``layout``); ``None`` keeps all.
        use_input: take one of the module's inputs instead of its output.
        element: path to the value: into the output (``(0,)`` for element 0 of a tuple), or for an
            input, first the positional index or keyword name, then a path into that input.
        layout: ``None`` (by the number of dimensions) or one of :data:`LAYOUTS`.
    """

    module: str
    positions: tuple[int, ...] | None = None
    use_input: bool = False
    element: tuple[Step, ...] = ()
    layout: str | None = None

    def __post_init__(self) -> None:
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
            if not self.positions:
                raise ValueError(f"node layer {self.module!r}: positions must be non-empty or None")
        element = tuple(self.element)
        if any(not isinstance(s, (int, str)) or s == "" for s in element):
            raise ValueError(f"node layer {self.module!r}: element steps must be ints or names, got {element}")
        if self.use_input and element == (0,):
            element = ()  # the first positional input is written 'module[in]'
        object.__setattr__(self, "element", element)
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"node layer {self.module!r}: unknown layout {self.layout!r}; valid choices: {LAYOUTS}")

    @property
    def name(self) -> str:
        """A readable, unique name that :meth:`parse` reads back: ``module``, ``module[in]``,
        ``module[out:0]~channels@-1``..."""
        path = ".".join(str(s) for s in self.element)
        if self.use_input:
            sel = f"[in:{path}]" if path else "[in]"
        else:
            sel = f"[out:{path}]" if path else ""
        name = self.module + sel + (f"~{self.layout}" if self.layout else "")
        if self.positions is not None:
            name += "@" + ",".join(str(p) for p in self.positions)
        return name

    @classmethod
    def parse(cls, spec: str | NodeLayer) -> NodeLayer:
        """``"mod"``, ``"mod[in]"``, ``"mod[in:1]"``, ``"mod[out:1.0]~flat@-1"``... -> NodeLayer (grammar above)."""
        if isinstance(spec, NodeLayer):
            return spec
        match = _SPEC.match(spec)
        if match is None:
            raise ValueError(f"cannot read node layer {spec!r}; grammar: {_GRAMMAR}")
        sel, layout, pos = match["sel"], match["layout"], match["pos"]
        use_input, element = False, ()
        if sel is not None:
            kind, colon, path = sel.partition(":")
            if kind not in ("in", "out"):
                raise ValueError(f"node layer {spec!r}: unknown selector [{sel}]; grammar: {_GRAMMAR}")
            use_input = kind == "in"
            element = _steps(path, spec) if colon else ()
        try:
            positions = tuple(int(p) for p in pos.split(",")) if pos else None
        except ValueError:
            raise ValueError(f"node layer {spec!r}: positions must be comma-separated integers, got {pos!r}") from None
        return cls(match["module"], positions, use_input, element, layout or None)

    def to_acts(self, value: torch.Tensor) -> torch.Tensor:
        """The selected tensor -> activation ``(batch, pos, d)`` (positions selected); may be a view."""
        if not value.is_floating_point():
            raise TypeError(f"node layer {self.name!r} has non-floating activations of dtype {value.dtype}")
        ndim = value.ndim
        if ndim < 2:
            raise ValueError(f"node layer {self.name!r} has activation shape {tuple(value.shape)}; need (batch, ...)")
        if ndim == 3 and self.layout is None:
            acts = value  # the hot path of sequence models
        elif ndim == 2:
            acts = value[:, None]
        else:
            acts = self._reshape(value)
        if self.positions is None:
            return acts
        n_pos = acts.shape[1]
        bad = [p for p in self.positions if not -n_pos <= p < n_pos]
        if bad:
            raise IndexError(f"node layer {self.name!r}: positions {bad} out of range for {n_pos} positions")
        if len({p % n_pos for p in self.positions}) < len(self.positions):
            raise ValueError(f"node layer {self.name!r}: positions {list(self.positions)} repeat a position of {n_pos}")
        return acts[:, list(self.positions)]

    def _reshape(self, value: torch.Tensor) -> torch.Tensor:
        layout = self.layout or ("tokens" if value.ndim <= 3 else "channels")
        batch = value.shape[0]
        if layout == "flat":
            return value.reshape(batch, 1, -1)
        if layout == "tokens":
            return value.reshape(batch, -1, value.shape[-1])  # (batch, pos, d)
        return value.flatten(2).transpose(1, 2)  # (batch, C, *spatial) -> (batch, pos, C)

    def from_acts(self, original: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_acts`: ``acts (batch, pos, d)`` put back into a tensor shaped like ``original``."""
        if self.positions is not None:
            every = NodeLayer(self.module, None, self.use_input, self.element, self.layout)
            full = every.to_acts(original).clone()  # (batch, pos, d), the unselected positions kept
            full[:, list(self.positions)] = acts
            acts = full
        if original.ndim > 2 and (self.layout or ("tokens" if original.ndim == 3 else "channels")) == "channels":
            return acts.transpose(1, 2).reshape(original.shape)  # (batch, C, pos) -> (batch, C, *spatial)
        return acts.reshape(original.shape)


def describe(value: Any) -> str:
    """A short description of a module's value for error messages: ``Tensor (8, 5, 32)``, ``tuple of 2``..."""
    if isinstance(value, torch.Tensor):
        return f"Tensor {tuple(value.shape)}"
    if isinstance(value, (tuple, list, Mapping)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _choices(value: Any) -> list[tuple[Step, Any]]:
    if isinstance(value, (tuple, list)):
        return list(enumerate(value))
    if isinstance(value, Mapping):
        return list(value.items())
    return []


def _first_tensor(value: Any, path: tuple[Step, ...]) -> tuple[Step, ...] | None:
    if isinstance(value, torch.Tensor):
        return path
    for key, child in _choices(value):
        found = _first_tensor(child, (*path, key))
        if found is not None:
            return found
    return None


def _not_a_tensor(layer: NodeLayer, what: str, value: Any, done: tuple[Step, ...]) -> TypeError:
    listed = ", ".join(f"[{k}] {describe(v)}" for k, v in _choices(value)) or "nothing to select"
    msg = f"node layer {layer.name!r}: {what} is a {describe(value)}: {listed}"
    path = _first_tensor(value, done)
    if path is not None:
        example = NodeLayer(layer.module, layer.positions, layer.use_input, path, layer.layout).name
        msg += f"; pick a tensor with {example!r}"
    return TypeError(msg)


def _child(value: Any, step: Step) -> Any:
    if isinstance(value, (tuple, list)) and isinstance(step, int) and -len(value) <= step < len(value):
        return value[step]
    if isinstance(value, Mapping):
        if step in value:
            return value[step]
        if isinstance(step, int) and -len(value) <= step < len(value):
            return list(value.values())[step]
    raise LookupError(step)


def _select(layer: NodeLayer, value: Any, path: tuple[Step, ...], what: str, done: tuple[Step, ...]) -> torch.Tensor:
    for i, step in enumerate(path):
        try:
            value = _child(value, step)
        except LookupError:
            raise _not_a_tensor(layer, what, value, (*done, *path[:i])) from None
        what = f"element {'.'.join(str(s) for s in (*done, *path[: i + 1]))} of {what}"
    if not isinstance(value, torch.Tensor):
        raise _not_a_tensor(layer, what, value, (*done, *path))
    return value


def _replace(value: Any, path: tuple[Step, ...], new: torch.Tensor) -> Any:
    """``value`` with the element at ``path`` replaced by ``new``: tuples rebuilt, lists/dicts copied."""
    if not path:
        return new
    step, rest = path[0], path[1:]
    if isinstance(value, (tuple, list)):
        items = list(value)
        items[step] = _replace(items[step], rest, new)
        if isinstance(value, list):
            return items
        return type(value)._make(items) if hasattr(value, "_fields") else type(value)(items)
    key = step if step in value else list(value.keys())[step]
    copy = value.copy() if hasattr(value, "copy") else dict(value)  # a ModelOutput copies as its own type
    copy[key] = _replace(value[key], rest, new)
    return copy


def _positional_names(module: nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _input_slot(layer: NodeLayer, module: nn.Module, args: tuple, kwargs: dict) -> int | str:
    """Where the node layer's input is: a positional index into ``args`` or a keyword of ``kwargs``."""
    key = layer.element[0] if layer.element else 0
    if isinstance(key, int) and -len(args) <= key < len(args):
        return key
    if isinstance(key, str) and key in kwargs:
        return key
    names = _positional_names(module)
    if isinstance(key, int) and 0 <= key < len(names) and names[key] in kwargs:
        return names[key]
    if isinstance(key, str) and key in names and names.index(key) < len(args):
        return names.index(key)
    positional = ", ".join(f"[{i}] {describe(a)}" for i, a in enumerate(args)) or "none"
    keywords = ", ".join(f"{k}: {describe(v)}" for k, v in kwargs.items()) or "none"
    return_hint = f"'{layer.module}[in:0]'" if args else f"'{layer.module}[in:{next(iter(kwargs), 'name')}]'"
    raise IndexError(
        f"node layer {layer.name!r}: module {layer.module!r} has no input {key!r} in this call; it was called "
        f"with positional inputs ({positional}) and keyword inputs ({keywords}); pick one with {return_hint}"
    )


def register_hook(module: nn.Module, layer: NodeLayer, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Registers ``fn(tensor) -> replacement or None`` on the node layer's value of ``module``.

    ``fn`` receives the selected tensor (before any layout reshape); a replacement is put back into the
    same element of the output or input structure. Returns the hook handle.
    """
    if layer.use_input:

        def pre_hook(mod, args, kwargs):
            slot = _input_slot(layer, mod, args, kwargs)
            top = args[slot] if isinstance(slot, int) else kwargs[slot]
            what = f"input {slot!r} of module {layer.module!r}"
            new = fn(_select(layer, top, layer.element[1:], what, (slot,)))
            if new is None:
                return None
            top = _replace(top, layer.element[1:], new)
            if isinstance(slot, int):
                return _set(args, slot, top), kwargs
            return args, {**kwargs, slot: top}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(mod, args, output):
        if isinstance(output, torch.Tensor) and not layer.element:  # the hot path
            return fn(output)
        new = fn(_select(layer, output, layer.element, f"the output of module {layer.module!r}", ()))
        return None if new is None else _replace(output, layer.element, new)

    return module.register_forward_hook(hook)


def _set(args: tuple, index: int, value: Any) -> tuple:
    items = list(args)
    items[index] = value
    return tuple(items)
