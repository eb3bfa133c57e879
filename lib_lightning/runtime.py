"""Runtime helpers shared by the callbacks: callables named in YAML, blocks that leave the training run's
RNG state and thread count as they found them, the start-of-training rule of every schedule, writes that
a full disk cannot turn into a crash, the warning for an analysis set larger than its data, and the
process setting that keeps freed memory (:func:`keep_freed_memory`, for a program's entry point)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import random
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "import_callable", "default_batch_inputs", "preserved_rng", "num_threads", "starts_fresh", "write_or_count",
    "oversize_message",
]


def import_callable(path: str | Callable | None) -> Callable | None:
    """``"package.module:function"`` -> the function (callables and None pass through)."""
    if path is None or callable(path):
        return path
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"expected an import path 'package.module:function', got {path!r}")
    return getattr(importlib.import_module(module), name)


def default_batch_inputs(batch: Any) -> Any:
    """The model inputs of a batch: its first element for ``(inputs, labels)`` tuples."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@contextlib.contextmanager
def preserved_rng() -> Any:
    """Restores the torch, numpy and Python RNG states: the analysis must not change training."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py)
    np.random.set_state(np_state)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Any:
    """Runs the block with ``threads`` torch threads (unchanged if None), then restores the count."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _HasStep(Protocol):
    global_step: int


def starts_fresh(trainer: _HasStep) -> bool:
    """Whether ``on_train_start`` is the start of training (step 0) rather than a resume.

    An ``at_start`` analysis belongs to step 0 only: after a resume from a checkpoint taken between two
    scheduled steps, analysing at the resume step would put an analysis off the schedule (and change the
    evolution metrics of the next one), so the resumed run would differ from a straight run.
    """
    return trainer.global_step == 0


def write_or_count(write: Callable[[], None], what: str, failures: int, warn: Callable[[str], None]) -> int:
    """Runs ``write``; returns the failure count, one more if it raised ``OSError`` (full disk, lost mount).

    Files of an analysis are auxiliary: a failed write must not end training. Only the first failure is
    reported (``warn``, one line, no traceback); later ones are only counted, so a full disk does not
    flood the log. The writes themselves are atomic (:mod:`lib_lightning.core.lib.files`): a failed one
    leaves neither a temporary file nor half a file.
    """
    try:
        write()
    except OSError as err:
        if failures == 0:
            warn(f"could not write {what} ({err.__class__.__name__}: {err}); skipped, training goes on; "
                 "further write failures are only counted")
        return failures + 1
    return failures


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MAX_KEEP_FREED_MB = (2**31 - 1) >> 20  # mallopt takes an int of bytes


def keep_freed_memory(megabytes: int) -> bool:
    """Lets glibc's malloc keep up to ``megabytes`` MiB of freed memory in the process; returns whether it applied.

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
    ``mmap`` and returns it on free, and gives the top of the heap back beyond twice that. A large
    temporary (a LIB analysis of the main job allocates tensors of 20-80 MB: Jacobian rows, their
    projection, edge attributions) is then paid again at its next allocation as page faults, one per
    4 KiB page touched: about 90,000 per analysis, 0.07-0.12 s of its 0.6-0.8 s build
    (``benchmarks/README.md``). With both thresholds at ``megabytes`` such allocations come from the
    heap and freed memory stays there for the next one; the process' resident memory stays at its peak.

    A process-wide setting (like ``torch.set_num_threads``), for a program's entry point: the CLI's
    ``keep_freed_mb`` (``configs/modadd.yaml``), or your own script before training. Other C libraries
    (macOS, Windows, musl) have no such setting: nothing happens and False is returned.

    Raises:
        ValueError: for ``megabytes`` outside 1 .. :data:`MAX_KEEP_FREED_MB`.
    """
    if isinstance(megabytes, bool) or not isinstance(megabytes, int) or not 1 <= megabytes <= MAX_KEEP_FREED_MB:
        raise ValueError(f"keep_freed_mb must be an int in 1 .. {MAX_KEEP_FREED_MB} (MiB), got {megabytes!r}")
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    size = ctypes.c_int(megabytes << 20)
    return bool(mallopt(_M_MMAP_THRESHOLD, size)) and bool(mallopt(_M_TRIM_THRESHOLD, size))


def _glibc_mallopt() -> Any:
    """glibc's ``mallopt``, or None where the C library is another one."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # glibc only: musl also has a mallopt, which does nothing
    return libc.mallopt if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def oversize_message(size: int, available: int, what: str) -> str:
    """The warning for an analysis set asked larger than its source: both numbers, and what is used."""
    return f"size={size} is larger than {what}, which has {available} examples: the analysis uses all {available}"
