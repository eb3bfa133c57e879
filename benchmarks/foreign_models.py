"""Seconds and peak memory of one LIB analysis on models this library does not own, at configured sizes.

Each case runs in its own subprocess (fresh interpreter, so ``ru_maxrss`` is that case's peak) and builds
the graphs exactly as the callback would (its node layers, ``forward`` and build options), with random
weights (the cost does not depend on training):

- ``cnn``: ``configs/cifar10_cnn.yaml`` (the small CNN, every conv block read as positions of channels);
- ``resnet18``: ``configs/cifar10_resnet18.yaml`` (torchvision ResNet-18, its stage outputs);
- ``gpt2``: a tiny HuggingFace GPT-2 (2 layers, d 64, 32 positions) on padded dict batches, the residual
  stream between blocks, one position source.

    python benchmarks/foreign_models.py --cases cnn resnet18 gpt2 --size 256 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"cnn": "configs/cifar10_cnn.yaml", "resnet18": "configs/cifar10_resnet18.yaml"}


def _callback_args(config: str) -> dict:
    cfg = yaml.safe_load((ROOT / config).read_text())
    (args,) = [c["init_args"] for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("LIBAnalysis")]
    return cfg, args


def _case(name: str, size: int) -> tuple:
    """(model, node layers, batches, callback) of one case, the callback built from the config's arguments."""
    import torch

    from callbacks.lib_analysis import LIBAnalysis

    gen = torch.Generator().manual_seed(0)
    if name in CONFIGS:
        from lib_lightning.tasks.cifar import CifarClassifier

        cfg, args = _callback_args(CONFIGS[name])
        args = {**args, "size": size}
        model = CifarClassifier(**cfg["model"]["init_args"]).eval()
        inputs = torch.randn(size, 3, 32, 32, generator=gen)
    else:
        import transformers

        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg).eval()
        ids = torch.randint(1, 50, (size, 32), generator=gen)
        mask = (torch.arange(32)[None] < torch.randint(8, 33, (size, 1), generator=gen)).long()
        inputs = {"input_ids": ids * mask, "attention_mask": mask}
        args = dict(
            layers=["transformer.h.0", "transformer.h.1", "lm_head"], every_n_steps=1, size=size, batch_size=128,
            position_sources=1, forward=lambda m, x: m(**x),
        )  # fmt: skip
    callback = LIBAnalysis(**{k: v for k, v in args.items() if k not in ("every_n_steps", "log_steps")}, every_n_steps=1)
    from lib_lightning.core import batch as nested

    return model, callback, nested.split(inputs, callback.batch_size)


def _child(name: str, size: int, threads: int) -> None:
    import torch

    from lib_lightning.core import build_graphs

    torch.set_num_threads(threads)
    model, callback, batches = _case(name, size)
    start = time.perf_counter()
    graphs = build_graphs(model, callback.layers, batches, forward=callback.forward, **callback.build_kwargs)
    seconds = time.perf_counter() - start
    dims = {kind: list(g.dims) for kind, g in graphs.items()}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"case": name, "size": size, "seconds": seconds, "peak_mb": peak_mb, "dims": dims,
                      "layers": [layer.name for layer in callback.layers]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["cnn", "resnet18", "gpt2"], choices=["cnn", "resnet18", "gpt2"])
    parser.add_argument("--size", type=int, default=256, help="examples analysed (the configs' size is replaced)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.size, args.threads)
        return
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--size", str(args.size), "--threads", str(args.threads)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            print(f"{case}: failed\n{out.stderr[-3000:]}")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{case}: {result['seconds']:.1f} s, peak {result['peak_mb']:.0f} MB at n={result['size']}; "
              f"layers {result['layers']}; kept dims {result['dims']}")


if __name__ == "__main__":
    main()
