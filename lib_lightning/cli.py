"""LightningCLI entry point: ``python -m lib_lightning fit --config configs/modadd.yaml``.

Every LightningModule and LightningDataModule importable by class path can be named in a config. Extra
top-level option: ``--threads N`` sets torch's intra-op thread count (on a shared 2-core machine one
thread per process is often faster than two).
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

__all__ = ["LibCLI", "main"]


class LibCLI(LightningCLI):
    """LightningCLI with a ``--threads`` option and a closing message that says where the logs are."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--threads", type=int | None, default=None, help="torch intra-op threads (default: torch's)")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        threads = config.get("threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.global_rank != 0 or trainer.logger is None:
            return
        log_dir = trainer.log_dir
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", ""
        )
        root = trainer.logger.save_dir if trainer.logger.save_dir else log_dir
        print(f"\nTensorBoard logs: {log_dir}")
        if ckpt:
            print(f"Last checkpoint:  {ckpt}")
        print(f"Open them with:   .venv/bin/tensorboard --logdir {root}")


def main(args: list[str] | None = None, run: bool = True) -> LibCLI | dict:
    """Run the CLI (``run=False`` parses the config and instantiates its classes without running).

    ``analyze ...`` runs the offline analysis of a checkpoint instead (:mod:`lib_lightning.analyze`);
    ``llc-calibrate ...`` sweeps the LLC sampler's settings on one (:mod:`lib_lightning.llc_calibrate`).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["analyze"]:
        from lib_lightning.analyze import main as analyze

        return analyze(argv[1:])
    if argv[:1] == ["llc-calibrate"]:
        from lib_lightning.llc_calibrate import main as llc_calibrate

        return llc_calibrate(argv[1:])
    return LibCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main(sys.argv[1:])
