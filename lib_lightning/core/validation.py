"""The one home of argument checks shared by the core and the callbacks.

Every check raises with the argument's name, the bad value and the valid range or choices, so that a
callback validating its arguments in ``__init__`` and the core function it calls say the same thing.
Imports torch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "check_at_least",
    "check_choice",
    "check_choices",
    "check_fraction",
    "check_thresholds",
    "check_weights",
]


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_choices(what: str, values: Sequence[Any], choices: Sequence[Any]) -> None:
    """``values`` must be non-empty and each one of ``choices`` (e.g. the basis kinds)."""
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise ValueError(f"unknown {what} {bad or list(values)}; valid choices: {tuple(choices)}")


def check_at_least(name: str, value: float | None, minimum: float, *, optional: bool = False, why: str = "") -> None:
    """``value >= minimum`` (or ``None`` when ``optional``); ``why`` is appended in parentheses."""
    if optional and value is None:
        return
    if value is None or not value >= minimum:
        allowed = f"None or >= {minimum}" if optional else f">= {minimum}"
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} must be {allowed}{reason}, got {value}")


def check_thresholds(abs_threshold: float, rel_threshold: float) -> None:
    """The one check of truncation and counting thresholds (bases and degeneracy counts alike).

    rel_threshold = 1 would keep (or count) nothing but the constant, so it is excluded.
    """
    if not abs_threshold >= 0:
        raise ValueError(f"abs_threshold must be >= 0, got {abs_threshold}")
    if not 0 <= rel_threshold < 1:
        raise ValueError(f"rel_threshold must be in [0, 1), got {rel_threshold}")


def check_fraction(fraction: float) -> None:
    """A fraction of the total weight: in (0, 1]."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")


def check_weights(weights: torch.Tensor, name: str, ndim: int, hint: str = "") -> torch.Tensor:
    """Non-negative finite weights of ``ndim`` dimensions, returned as float64."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weights).__name__}")
    if weights.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(weights.shape)}")
    weights = weights.detach().to(torch.float64)
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"{name} has non-finite entries at {_where(~torch.isfinite(weights))}")
    negative = weights < 0
    if bool(negative.any()):
        raise ValueError(
            f"{name} must be non-negative, got {int(negative.sum())} negative entries "
            f"(min {float(weights.min()):.3g}) at {_where(negative)}{hint}"
        )
    return weights


def _where(mask: torch.Tensor, limit: int = 5) -> str:
    """The first few indices where ``mask`` holds, for error messages."""
    idx = [tuple(i) if len(i) > 1 else i[0] for i in torch.nonzero(mask).tolist()[:limit]]
    more = int(mask.sum()) - len(idx)
    return f"{idx}" + (f" and {more} more" if more > 0 else "")
