"""The LLC callback's argument checks and its validation data (:mod:`callbacks.llc`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["check_sections", "check_splits", "val_loader"]

_SPLITS = ("train", "val")
_RESERVED = ("mean", "std", "init_loss", "diverged_chains", "below_init_chains", "failed", "traces", "acceptance",
             "grad_norm", "loc_norm", "noise_norm", "trending_chains", "healthy", "seconds")


def check_sections(sections: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    """Section name -> its parameter names or patterns, checked (names that logged keys cannot clash with)."""
    if sections is None:
        return {}
    if not isinstance(sections, Mapping):
        raise ValueError(f"sections must map names to parameter patterns, or be 'lib', got {sections!r}")
    checked = {}
    for name, patterns in sections.items():
        if not name or "/" in name or name in _SPLITS or name in _RESERVED:
            raise ValueError(f"section name {name!r} is not allowed: use a non-empty name without '/' that is "
                             f"not a split {_SPLITS} or a logged quantity {_RESERVED}")
        if isinstance(patterns, str) or len(patterns) == 0:
            raise ValueError(f"section {name!r} needs a non-empty list of parameter names or patterns, got {patterns!r}")
        checked[name] = tuple(patterns)
    return checked


def check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    """The splits as a tuple of distinct values of ``_SPLITS``."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    bad = [s for s in splits if s not in _SPLITS]
    if bad or not splits or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be distinct values from {_SPLITS}, got {list(splits)}")
    return splits


def val_loader(trainer):
    """The run's (first) validation loader, from the trainer or its datamodule."""
    loaders = trainer.val_dataloaders
    if loaders is None and trainer.datamodule is not None:
        loaders = trainer.datamodule.val_dataloader()
    if loaders is None:
        raise ValueError("splits includes 'val' but the run has no validation data (no val_tensors, no val loader)")
    return loaders[0] if isinstance(loaders, (list, tuple)) else loaders
