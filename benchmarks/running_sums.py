"""Node ablation's running sums over the ks (issue 16, target 2) against one product per k, one thread:
the copies f C_k C⁺ of one stacked forward (``ablation._projections``) and the affine rest's logits
(``AffineMap.prefixes``), on random features of the main job's sizes; three alternating rounds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/running_sums.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_lightning.core.interpret.ablation import _projections, ablation_schedule  # noqa: E402
from lib_lightning.core.interpret.sections import AffineMap  # noqa: E402


def one_product_per_k(feats, directions, ks, dtype):
    """The copies as before the running sums: ``feats[..., :k] @ directions[:k]`` for each k."""
    e, pos, _ = feats.shape
    acts = torch.empty(len(ks), e, pos, directions.shape[1], dtype=dtype)
    for j, k in enumerate(ks):
        acts[j] = feats[..., :k] @ directions[:k]
    return acts.reshape(-1, pos, directions.shape[1])


def median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f} ms"


def main() -> None:
    torch.set_num_threads(1)
    for d_lib, pos in ((115, 3), (127, 1)):
        ks = [k for k in ablation_schedule(d_lib) if k < d_lib]
        e = max(1, 2048 // len(ks))  # examples per stacked forward at max_rows 2048
        feats = torch.randn(e, pos, d_lib, dtype=torch.float64)
        directions = torch.randn(d_lib, 128, dtype=torch.float64)
        before, after = [], []
        for _ in range(3):
            before.append(median_ms(lambda: one_product_per_k(feats, directions, ks, torch.float32), 30))
            after.append(median_ms(lambda: _projections(feats, directions, ks, torch.float32), 30))
        same = torch.equal(one_product_per_k(feats, directions, ks, torch.float32),
                           _projections(feats, directions, ks, torch.float32))
        print(f"copies, {pos} position(s), {len(ks)} ks x {e} examples: one product per k {spread(before)}, "
              f"running sum {spread(after)}; float32 copies equal: {same}")
    batch, d_lib = 4096, 114
    ks = [k for k in ablation_schedule(d_lib) if k < d_lib]
    feats = torch.randn(batch, 1, d_lib, dtype=torch.float64)
    affine = AffineMap(torch.randn(113), torch.randn(1, d_lib, 113))
    before, after = [], []
    for _ in range(3):
        before.append(median_ms(lambda: [affine(feats, k).sum() for k in ks], 5))
        after.append(median_ms(lambda: [out.sum() for out in affine.prefixes(feats, ks)], 5))
    print(f"affine rest, {len(ks)} ks x {batch} examples: one contraction per k {spread(before)}, running sum {spread(after)}")


if __name__ == "__main__":
    main()
