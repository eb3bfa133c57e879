"""LightningCLI entry point: ``python -m lib_lightning fit --config configs/modadd.yaml``.

Every LightningModule and LightningDataModule importable by class path can be named in a config. Extra
top-level options: ``--threads N`` sets torch's intra-op thread count (on a shared 2-core machine one
thread per process is often faster than two); ``--keep_freed_mb N`` lets glibc keep up to N MiB of freed
memory instead of page-faulting large temporaries back in at every allocation
(:func:`lib_lightning.runtime.keep_freed_memory`; the main job's LIB analyses are 10-15 % faster with it).

Errors read at the end: a class that rejects its arguments is reported by its own exception (the last
line of the traceback), not by jsonargparse's union error and config dump; a config file that is not
valid YAML is named; a run that fails before its first training step leaves no run folder behind.
"""

from __future__ import annotations

import os
import shutil
import sys

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lib_lightning.runtime import keep_freed_memory

__all__ = ["LibCLI", "main", "root_cause", "check_config_files"]

# What a run leaves in its log folder before it has trained a step: nothing worth keeping after a failure.
_LOG_ONLY = ("config.yaml", "hparams.yaml", "metrics.csv", "events.out.tfevents.")


class LibCLI(LightningCLI):
    """LightningCLI with ``--threads`` and ``--keep_freed_mb`` options and a closing message that says where the logs are."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--threads", type=int | None, default=None, help="torch intra-op threads (default: torch's)")
        parser.add_argument("--keep_freed_mb", type=int | None, default=None,
                            help="MiB of freed memory glibc keeps for reuse (default: the C library's own policy)")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        threads = config.get("threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        keep = config.get("keep_freed_mb")
        if keep is not None:
            keep_freed_memory(keep)  # False (no glibc): the C library's own policy, nothing to say

    def _run_subcommand(self, subcommand: str) -> None:
        folder = self._log_dir()
        created = _missing_folders(folder) if folder is not None else []
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if created and self.trainer.global_step == 0:
                _remove_if_only_logs(created)
            raise

    def _log_dir(self) -> str | None:
        logger = self.trainer.logger
        if logger is None or not self.trainer.is_global_zero:
            return None
        return getattr(logger, "log_dir", None)

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


def _missing_folders(folder: str) -> list[str]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_if_only_logs(created: list[str]) -> None:
    """Removes a run folder this run created if it holds nothing but the logs of a run that never trained
    a step, then the parents it created that are left empty."""
    folder = created[0]
    files = [name for _, _, names in os.walk(folder) for name in names]
    if not all(name.startswith(_LOG_ONLY) for name in files):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in created[1:]:
        if os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of an explicit ``raise ... from`` chain (jsonargparse wraps a class's own
    error in a union-type error that ends with the whole config)."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    return err


def _raised_by_jsonargparse(err: BaseException) -> bool:
    """Whether ``err`` was raised inside jsonargparse (its wrapping of a class's error while instantiating);
    errors raised by training itself keep their chain."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}jsonargparse{os.sep}" in tb.tb_frame.f_code.co_filename


def check_config_files(argv: list[str]) -> None:
    """Parses every ``--config`` file first, so that a YAML error names its file (jsonargparse does not)."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("--config", "-c") and i + 1 < len(argv) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path is None or not os.path.isfile(path):
            continue
        with open(path) as f:
            try:
                yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ValueError(f"config file {path} is not valid YAML: {err}") from None


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
    check_config_files(argv)
    try:
        return LibCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
        )
    except (ValueError, TypeError, KeyError) as err:
        cause = root_cause(err)
        if cause is err or not _raised_by_jsonargparse(err):
            raise
        raise cause from None  # its own traceback, its message the last line


if __name__ == "__main__":
    main(sys.argv[1:])
