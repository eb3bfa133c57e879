"""Error of a float32 LIB analysis against float64 on the trained modular-addition transformer.

``dtype=float32`` runs the model and its Jacobians in float32 (sums, Gram matrices and
eigendecompositions stay float64), but the whitening matrices with D^(-1/2) terms up to ~1e6 are
applied to float32 Jacobians. This measures what that costs, on the callback's analysis set (400
training pairs, the four node layers of ``configs/modadd.yaml``): relative errors of Λ and of the
edges, the logged scalars, and how many Jacobian chunks ``edge_point="reconstruction"`` recomputes
with the default ``reuse_rtol``.

    python benchmarks/float32_error.py --ckpt checkpoints/modadd/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json

import torch

LAYERS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_logits"]


def _model_and_inputs(ckpt: str, size: int):
    from lib_lightning.data.modadd import ModularAdditionDataModule
    from lib_lightning.models.transformer import ModAddTransformer

    model = ModAddTransformer()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    data = ModularAdditionDataModule(p=113, train_fraction=0.3, seed=0)
    data.setup("fit")
    return model, data.analysis_inputs("train", size, 0), data


def _accuracy(model, data) -> float:
    tokens, labels = data.val_tensors
    with torch.no_grad():
        return float((model(tokens).argmax(-1) == labels).double().mean())


def _relative_errors(ref, other, floor: float) -> tuple[float, float]:
    """Largest relative error of the non-constant Λ above ``floor`` × the largest, and of the edges
    between those features relative to the section's largest edge."""
    lam_err, edge_err = 0.0, 0.0
    keeps = []
    for a, b in zip(ref.layers, other.layers):
        start = 1 if a.has_constant else 0
        lam = a.lambdas[start:]
        keep = lam > floor * lam.max()
        n = min(int(keep.sum()), b.lambdas.numel() - start)
        lam_err = max(lam_err, ((b.lambdas[start:][:n] - lam[:n]).abs() / lam[:n]).max().item())
        keeps.append((start, n))
    for sec, (ea, eb) in enumerate(zip(ref.edges, other.edges)):
        (s_in, n_in), (s_out, n_out) = keeps[sec], keeps[sec + 1]
        sub_a = ea[s_out : s_out + n_out, s_in : s_in + n_in]
        sub_b = eb[s_out : s_out + n_out, s_in : s_in + n_in]
        edge_err = max(edge_err, ((sub_a - sub_b).abs().max() / sub_a.max()).item())
    return lam_err, edge_err


def _recomputed_examples(model, inputs, dtype) -> int:
    """Examples whose Jacobians ``edge_point="reconstruction"`` recomputes, with the default ``reuse_rtol``."""
    import lib_lightning.core.lib.section as section
    from lib_lightning.core.lib import build_graphs

    calls = [0]
    original = section.integrated_jacobian

    def counting(model, layer_in, layer_out, inputs, *args, **kwargs):
        calls[0] += len(inputs)
        return original(model, layer_in, layer_out, inputs, *args, **kwargs)

    section.integrated_jacobian = counting
    try:
        build_graphs(model, LAYERS, [inputs], kinds=("lib",), dtype=dtype, edge_point="reconstruction")
    finally:
        section.integrated_jacobian = original
    return calls[0] - len(inputs) * (len(LAYERS) - 1)  # beyond the one basis pass per section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint of configs/modadd.yaml")
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lib_lightning.core.lib import build_graphs
    from lib_lightning.core.metrics.summary import SummaryOptions, summarise

    model, inputs, data = _model_and_inputs(args.ckpt, args.size)
    out = {"held_out_accuracy": _accuracy(model, data), "size": len(inputs)}
    graphs = {dt: build_graphs(model, LAYERS, [inputs], kinds=("lib", "pca"), dtype=dt) for dt in (torch.float64, torch.float32)}
    for floor in (1e-4, 1e-8):
        for kind in ("lib", "pca"):
            lam, edge = _relative_errors(graphs[torch.float64][kind], graphs[torch.float32][kind], floor)
            out[f"{kind}_max_rel_err_lambda_above_{floor:g}"] = lam
            out[f"{kind}_max_rel_err_edges_above_{floor:g}"] = edge
    options = SummaryOptions(evolution=False)
    m64, m32 = (summarise(graphs[dt], options).metrics for dt in (torch.float64, torch.float32))
    out["metrics_that_differ"] = {k: [m64[k], m32.get(k)] for k in sorted(m64) if m32.get(k) != m64[k]
                                  and not (abs(m64[k]) > 0 and abs(m32.get(k, 0) - m64[k]) <= 1e-6 * abs(m64[k]))}
    out["recomputed_examples_reconstruction_float32"] = _recomputed_examples(model, inputs, torch.float32)
    out["recomputed_examples_reconstruction_float64"] = _recomputed_examples(model, inputs, torch.float64)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
