"""The ablations' float64 cross-entropy and predictions of float32 logits (issue 16, target 2): the
formula before (a float64 copy of the logits, ``F.cross_entropy``, then the maximum's index) against
``evaluation._losses`` (one maximum with its index in float32, x − max taken in float64 on the fly, no
log-softmax of every class), on rows of the main job's 113 classes; one thread, three alternating rounds,
medians of 30; also the largest relative difference of the losses and whether every prediction agrees.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/losses.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_lightning.core.interpret.evaluation import _losses  # noqa: E402


def before(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``copy_updates``' per-row losses and predictions before this change."""
    logits = logits.to(torch.float64)
    return F.cross_entropy(logits, labels, reduction="none"), logits.max(-1).indices


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows, classes = 2048, 113
    logits = (torch.randn(rows, classes, generator=gen) * 8).float()
    labels = torch.randint(0, classes, (rows,), generator=gen)
    (a, pa), (b, pb) = before(logits, labels), _losses(logits, labels)
    print(f"largest relative loss difference {((a - b).abs() / a.abs()).max().item():.2e}, "
          f"predictions equal: {torch.equal(pa, pb)}, loss sums {a.sum().item()!r} {b.sum().item()!r}")
    for round_ in range(3):
        for name, fn in (("before", before), ("_losses", _losses)):
            fn(logits, labels)
            times = []
            for _ in range(30):
                start = time.perf_counter()
                fn(logits, labels)
                times.append(time.perf_counter() - start)
            print(f"round {round_} {name}: {statistics.median(times) * 1e3:.3f} ms per {rows} rows of {classes}")


if __name__ == "__main__":
    main()
