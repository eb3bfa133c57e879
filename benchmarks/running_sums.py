"""Node ablation's running sums over the ks (issue 16, target 2) against one product per k, one thread:
the copies f C_k C⁺ of one stacked forward (``ablation._projections``) and the affine rest's logits
(``AffineMap.prefixes``), on random features of the main job's sizes; three alternating rounds.

Last, the idea measured and not taken in the sixth round (``benchmarks/README.md``): the rest's first
``nn.Linear`` layers (q, k and v after resid_pre, the MLP's first layer after resid_mid) read x_k's rows
directly, so their outputs b + Σ_{i<k} f_i (D_i Wᵀ) could be running sums over the ks too, instead of the
layers computing x_k Wᵀ for every k. Timed per stacked forward: the layers themselves against those
outputs accumulated in float32 (one ``addmm`` per k and layer, written in place) and in float64 next to
the copies, rounded once (``_projections`` with the extra columns, as the attempt did).

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
    linear_readers()


def linear_readers() -> None:
    """Per stacked forward: the rest's first Linear layers against their outputs as running sums over the ks."""
    for name, d_lib, pos, widths, query in (("resid_pre: q, k, v", 115, 3, (128, 128, 128), True),
                                             ("resid_mid: the MLP's first layer", 127, 1, (512,), False)):
        ks = [k for k in ablation_schedule(d_lib) if k < d_lib]
        e, d = max(1, 2048 // len(ks)), 128
        feats = torch.randn(e, pos, d_lib, dtype=torch.float64)
        directions = torch.randn(d_lib, d, dtype=torch.float64)
        weights = [torch.randn(w, d) / d**0.5 for w in widths]
        biases = [torch.randn(w) for w in widths]
        acts = _projections(feats, directions, ks, torch.float32)  # (c * e, pos, d): what the layers read
        f32 = feats.reshape(e * pos, d_lib).float()
        products = [directions @ w.double().T for w in weights]  # D Wᵀ
        grams = [g.float() for g in products]
        outs = [torch.empty(len(ks), e * pos, w) for w in widths]
        right = torch.cat([directions, *products], dim=1)  # [D | D Wᵀ ...]

        def layers():
            for n, (w, b) in enumerate(zip(weights, biases)):
                torch.nn.functional.linear(acts[:, -1:] if query and n == 0 else acts, w, b)

        def float32_sums():
            for g, b, out in zip(grams, biases, outs):
                prev, done = b.expand(e * pos, -1), 0
                for j, k in enumerate(ks):
                    if k > done:
                        torch.addmm(prev, f32[:, done:k], g[done:k], out=out[j])
                        done = k
                    else:
                        out[j].copy_(prev)
                    prev = out[j]

        def float64_sums():  # the copies and the layers' outputs as one running sum, rounded once
            return _projections(feats, right, ks, torch.float32)

        def copies_alone():
            return _projections(feats, directions, ks, torch.float32)

        rounds = {"layers": [], "float32 sums": [], "float64 sums with the copies": [], "the copies alone": []}
        for _ in range(3):
            rounds["layers"].append(median_ms(layers, 30))
            rounds["float32 sums"].append(median_ms(float32_sums, 30))
            rounds["float64 sums with the copies"].append(median_ms(float64_sums, 30))
            rounds["the copies alone"].append(median_ms(copies_alone, 30))
        print(f"Linear readers, {name}, {len(ks)} ks x {e} examples: "
              + ", ".join(f"{k} {spread(v)}" for k, v in rounds.items()))


if __name__ == "__main__":
    main()
