"""Speed and memory of building LIB + edges for the modular-addition transformer.

Node layers: after the embeddings (3 positions), after attention, after the MLP and the logits (last
position only); float64; the ``gradient`` rule. Compares ``build_graphs`` with a straightforward
reference written here the way the reference library works: the whole dataset as one batch, one
``torch.autograd.grad`` call per output dimension, every input gradient stored, and a second full pass
of the same kind for the edges. Each measurement runs in its own subprocess so that peak memory
(max RSS) belongs to it alone.

    python benchmarks/lib_build.py                 # side-by-side run, prints a Markdown table
    python benchmarks/lib_build.py --repeats 3 --threads 1 --sizes 1000 3830 12769
    python benchmarks/lib_build.py --callback-setting --repeats 5   # the training callback's build, old vs new
    git worktree add /tmp/old main && python benchmarks/lib_build.py --callback-setting --old-tree /tmp/old \
        --repeats 5 --ckpt $PWD/checkpoints/modadd/version_0/checkpoints/last.ckpt   # main's code vs this tree's

``-noprobe`` implementations run with ``affine_probe=False``: every chunk per example, main's code path
before the affine fast path (core/lib/affine.py), kept reachable to measure old against new.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

LAYERS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_logits"]
IMPLS = ["reference", "ours-recon", "ours-recon-noprobe", "ours", "ours-noprobe", "ours-nocache", "ours-float32"]


def _model_and_data(n: int, ckpt: str | None):
    from lib_lightning.data.modadd import modular_addition_pairs
    from lib_lightning.models.transformer import ModAddTransformer

    torch.manual_seed(0)
    model = ModAddTransformer()
    if ckpt:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    tokens, _ = modular_addition_pairs(113)
    perm = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))
    return model, tokens[perm[:n]]


def run_ours(model, tokens, chunk_size: int, cache_bytes: int, dtype=torch.float64, edge_point="activation",
             affine_probe: bool = True, kinds=("lib",), **options):
    from lib_lightning.core.lib import build_graphs

    phases: dict[str, float] = {}
    state = {"phase": None, "t": time.perf_counter()}

    def progress(phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        key = phase.split(" ")[0]
        phases[key] = phases.get(key, 0.0) + now - state["t"]
        state["t"] = now

    graphs = build_graphs(
        model, LAYERS, [tokens], kinds=kinds, chunk_size=chunk_size, cache_bytes=cache_bytes, dtype=dtype,
        edge_point=edge_point, affine_probe=affine_probe, progress=progress, **options,
    )
    return graphs["lib"], phases


def run_reference(model, tokens):
    """Whole dataset as one batch, one autograd.grad per output dimension, two passes per section."""
    from lib_lightning.core.lib.basis import identity_basis, lib_basis, whiten
    from lib_lightning.core.lib.capture import NodeLayer, capture, run_section
    from lib_lightning.core.lib.modes import analysis_mode
    from lib_lightning.core.lib.stats import augment, mean_update, shift_of, stats_update

    layers = [NodeLayer(n) for n in LAYERS]
    phases: dict[str, float] = {}
    with analysis_mode(model, torch.float64):
        t = time.perf_counter()
        with torch.no_grad():
            acts = capture(model, layers, tokens)
        stats = [stats_update(a, shift_of(mean_update(a))) for a in acts]
        whitenings = [whiten(s) for s in stats]
        phases["statistics"] = time.perf_counter() - t
        bases = [None] * len(layers)
        bases[-1] = identity_basis(LAYERS[-1], stats[-1], whitenings[-1].all_eigenvalues)
        edges = [None] * (len(layers) - 1)

        def all_grads(sec, f_in, c_out):
            """Every input gradient of ĝ = F(f) C_out: (outputs, N, pos_in, d_in)."""
            leaf = f_in.clone().requires_grad_(True)
            with torch.enable_grad():
                out = run_section(model, layers[sec], layers[sec + 1], tokens, lambda _: leaf)
                g_hat = out @ c_out[:-1]  # (N, pos_out, k_out)
                grads = []
                flat = g_hat.reshape(len(tokens), -1)
                for i in range(flat.shape[1]):
                    (g,) = torch.autograd.grad(flat[:, i].sum(), leaf, retain_graph=True)
                    grads.append(g)
            return torch.stack(grads)

        for sec in reversed(range(len(layers) - 1)):
            t = time.perf_counter()
            f_in = acts[sec]
            n, pos_in, d_in = f_in.shape
            grads = all_grads(sec, f_in, bases[sec + 1].basis)  # pass 1: the basis
            m = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)
            m[:d_in, :d_in] = torch.einsum("onsd,onse->de", grads, grads) / (n * pos_in)
            del grads
            bases[sec] = lib_basis(LAYERS[sec], whitenings[sec], m)
            t2 = time.perf_counter()
            phases["basis"] = phases.get("basis", 0.0) + t2 - t
            f_rec = bases[sec].reconstruct(bases[sec].transform(f_in))  # pass 2: edges at f C C⁺
            grads = all_grads(sec, f_rec, bases[sec + 1].basis)  # (k_out*pos_out, N, pos_in, d_in)
            f_hat = augment(f_rec) @ bases[sec].basis  # (N, pos_in, k_in)
            grad_hat = grads @ bases[sec].basis_pinv[:, :d_in].T  # (outputs, N, pos_in, k_in)
            a = (grad_hat * f_hat).sum(2)  # (outputs, N, k_in)
            k_out = bases[sec + 1].d_lib
            edges[sec] = (a**2).reshape(-1, k_out, n, a.shape[-1]).sum((0, 2)) / (n * pos_in)
            del grads, a
            phases["edges"] = phases.get("edges", 0.0) + time.perf_counter() - t2
    return bases, edges, phases


def _child(args) -> None:
    torch.set_num_threads(args.threads)
    model, tokens = _model_and_data(args.n, args.ckpt)
    if args.reverse:  # the same examples in reverse order: the results may differ only by rounding
        tokens = tokens.flip(0)
    start = time.perf_counter()
    if args.impl == "reference":
        bases, edges, phases = run_reference(model, tokens)
        lambdas = [b.lambdas for b in bases]
    else:
        dtype = torch.float32 if args.impl == "ours-float32" else torch.float64
        cache = 0 if args.impl == "ours-nocache" else args.cache_mb << 20
        point = "reconstruction" if args.impl.startswith("ours-recon") else "activation"
        probe = not args.impl.endswith("-noprobe")
        graph, phases = run_ours(model, tokens, args.chunk_size, cache, dtype, point, probe)
        lambdas, edges = [layer.lambdas for layer in graph.layers], list(graph.edges)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.save:
        torch.save({"lambdas": lambdas, "edges": edges}, args.save)
    print(json.dumps({"impl": args.impl, "n": args.n, "wall_s": wall, "peak_mb": peak_mb, "phases": phases}))


def _compare(a_path: str, b_path: str) -> tuple[float, float]:
    """Largest relative errors of Lambdas and of edges on directions with Λ above 1e-8 of the largest."""
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    lam_err, edge_err = 0.0, 0.0
    for la, lb in zip(a["lambdas"], b["lambdas"]):
        keep = la[1:] > 1e-8 * la[1:].max()
        lam_err = max(lam_err, ((la[1:][keep] - lb[1:][keep]).abs() / la[1:][keep]).max().item())
    for sec, (ea, eb) in enumerate(zip(a["edges"], b["edges"])):
        lam_in, lam_out = a["lambdas"][sec], a["lambdas"][sec + 1]
        rows = torch.ones(len(lam_out), dtype=torch.bool) if sec + 1 == len(a["lambdas"]) - 1 else lam_out > 1e-8 * lam_out[1:].max()
        cols = lam_in > 1e-8 * lam_in[1:].max()
        rows[0], cols[0] = False, False  # constant node excluded, as in sparsity and modularity
        sub_a, sub_b = ea[rows][:, cols], eb[rows][:, cols]
        scale = sub_a.abs().max()
        edge_err = max(edge_err, ((sub_a - sub_b).abs() / scale).max().item())
    return lam_err, edge_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=IMPLS)
    parser.add_argument("--impls", nargs="*", default=IMPLS, choices=IMPLS, help="rows of the side-by-side table")
    parser.add_argument("--callback-setting", action="store_true",
                        help="time build_graphs as configs/modadd.yaml's callback calls it (lib+pca, 400 examples, "
                        "float32), affine probe on and off alternating; --repeats runs of each")
    parser.add_argument("--old-tree", default=None,
                        help="with --callback-setting: time main's code from this worktree against this tree's "
                        "instead (one child process per build, alternating) and compare what they log")
    parser.add_argument("--callback-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=3830)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 3830, 12769])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--cache-mb", type=int, default=2048)
    parser.add_argument("--ckpt", default=None, help="a Lightning checkpoint of configs/modadd.yaml (default: random init)")
    parser.add_argument("--save", default=None)
    parser.add_argument("--reverse", action="store_true", help="(one run) the examples in reverse order")
    parser.add_argument("--floor-reference", action="store_true", help="also run the reference on reversed examples")
    args = parser.parse_args()
    if args.impl:
        _child(args)
        return
    if args.callback_child or args.callback_setting:
        import callback_build  # the training callback's build: this folder is on sys.path as the script's

        if args.callback_child:
            callback_build.child(args)
        else:
            (callback_build.against_tree if args.old_tree else callback_build.probe_on_off)(args)
        return

    def run(impl: str, n: int, save: str | None = None, chunk_size: int | None = None, reverse: bool = False) -> dict:
        cmd = [sys.executable, __file__, "--impl", impl, "--n", str(n), "--threads", str(args.threads),
               "--chunk-size", str(chunk_size or args.chunk_size), "--cache-mb", str(args.cache_mb)]
        cmd += ["--reverse"] if reverse else []
        cmd += ["--ckpt", args.ckpt] if args.ckpt else []
        cmd += ["--save", save] if save else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    tmp = os.environ.get("TMPDIR", "/tmp")
    print(f"threads={args.threads} chunk_size={args.chunk_size} cache={args.cache_mb} MB load={os.getloadavg()}")
    n = args.n
    rows = {impl: [] for impl in ["reference", *[i for i in args.impls if i != "reference"]]}
    for r in range(args.repeats):  # interleaved, so drifts in machine load hit every implementation alike
        for impl in rows:
            rows[impl].append(run(impl, n, save=f"{tmp}/lib_{impl}.pt" if r == 0 else None))
    ref = statistics.median(x["wall_s"] for x in rows["reference"])
    print(f"\n| implementation (n={n}) | median wall s | runs (s) | ratio vs reference | peak MB | max rel. error of Λ / edges vs reference | phases (s, last run) |")
    print("|---|---|---|---|---|---|---|")
    for impl, runs in rows.items():
        wall = statistics.median(x["wall_s"] for x in runs)
        lam, edge = (0.0, 0.0) if impl == "reference" else _compare(f"{tmp}/lib_reference.pt", f"{tmp}/lib_{impl}.pt")
        phases = ", ".join(f"{k} {v:.1f}" for k, v in runs[-1]["phases"].items())
        walls = ", ".join(f"{x['wall_s']:.1f}" for x in runs)
        print(f"| {impl} | {wall:.1f} | {walls} | {ref / wall:.2f}x | {max(x['peak_mb'] for x in runs):.0f} | {lam:.1e} / {edge:.1e} | {phases} |")
    # The float64 floor: the same exact computations summed in another order.
    run("ours-recon", n, save=f"{tmp}/lib_floor.pt", chunk_size=383)
    lam, edge = _compare(f"{tmp}/lib_ours-recon.pt", f"{tmp}/lib_floor.pt")
    print(f"\nrounding floor, ours-recon with chunks of 383 vs {args.chunk_size}: Λ {lam:.1e}, edges {edge:.1e}")
    if args.floor_reference:
        run("reference", n, save=f"{tmp}/lib_reference_reversed.pt", reverse=True)
        lam, edge = _compare(f"{tmp}/lib_reference.pt", f"{tmp}/lib_reference_reversed.pt")
        print(f"rounding floor, reference with the examples reversed: Λ {lam:.1e}, edges {edge:.1e}")
    if not args.sizes:
        return
    print("\n| n examples | ours: wall s | ours: peak MB | ours-nocache: wall s | ours-nocache: peak MB |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        a, b = run("ours", size), run("ours-nocache", size)
        print(f"| {size} | {a['wall_s']:.1f} | {a['peak_mb']:.0f} | {b['wall_s']:.1f} | {b['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
