"""Load what a training run left behind: its config, the task with the checkpoint's weights, its
datamodule and the LIB analysis settings it ran with (used by ``python -m lib_lightning analyze``).

A checkpoint, and the ``config.yaml`` beside it, may come from someone else: the class paths they name
are imported and called only when :class:`Trust` allows them (this project's own packages, the prefixes
the user passes with ``--trust-code``, and the class paths of a ``--config`` the user names), and only
when they are LightningModule / LightningDataModule / Callback subclasses. Weights are read with
``torch.load(weights_only=True)``, so no pickle code runs.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lib_lightning.models.transformer import ModAddTransformer

__all__ = ["Trust", "UntrustedCodeError", "read_config", "load_task", "load_datamodule", "lib_settings",
           "check_same_model", "MODADD_LIB", "PROJECT_PACKAGES"]

PROJECT_PACKAGES = ("lib_lightning", "callbacks")  # trusted: this project's own code

MODADD_TASK = "lib_lightning.tasks.classifier.ModularAddition"
MODADD_DATA = "lib_lightning.data.modadd.ModularAdditionDataModule"
LIB_CALLBACK = "callbacks.lib_analysis.LIBAnalysis"
MODADD_LIB = {  # the main job's callback settings (configs/modadd.yaml)
    "layers": ["model.hook_resid_pre", "model.hook_resid_mid", "model.hook_resid_post", "model.hook_logits"],
    "kinds": ["lib", "pca"], "every_n_steps": 125, "split": "train", "size": 500,
    "relu_layers": ["model.hook_mlp_hidden"],
}

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # "package.module:function" (runtime.import_callable)


class UntrustedCodeError(ValueError):
    """A checkpoint or an untrusted config names code that is not allowed to run."""


@dataclass(frozen=True)
class Trust:
    """Which class paths a checkpoint or a config may make us import and call.

    Args:
        prefixes: trusted package or module prefixes (``"mypkg"`` allows ``mypkg.tasks.Task``).
        class_paths: exact class or ``module:function`` paths that are trusted (those of a ``--config``
            the user named).
    """

    prefixes: tuple[str, ...] = PROJECT_PACKAGES
    class_paths: frozenset[str] = frozenset()

    def allows(self, path: str) -> bool:
        if path in self.class_paths:
            return True
        module = path.partition(":")[0]
        return any(module == p or module.startswith(p + ".") for p in self.prefixes)

    def with_config(self, config: dict[str, Any]) -> Trust:
        """Also trusts every class path and ``module:function`` string of a config the user named."""
        return Trust(self.prefixes, self.class_paths | frozenset(_paths_in(config)))


def _paths_in(tree: Any) -> list[str]:
    """Every ``class_path`` value and ``module:function`` string in a nested config."""
    if isinstance(tree, dict):
        found = [tree["class_path"]] if isinstance(tree.get("class_path"), str) else []
        return found + [p for v in tree.values() for p in _paths_in(v)]
    if isinstance(tree, list):
        return [p for v in tree for p in _paths_in(v)]
    return [tree] if isinstance(tree, str) and _IMPORT_PATH.match(tree) else []


def _refuse(path: str, source: str, why: str) -> UntrustedCodeError:
    top = path.partition(":")[0].split(".")[0]
    return UntrustedCodeError(
        f"{source} names {path!r}, {why}; refusing to import or call it (a checkpoint, or the config.yaml beside "
        f"it, could run any code that way). Trusted: this project's packages {PROJECT_PACKAGES}. If you trust "
        f"that code, pass --trust-code {top} or name it in a --config you wrote"
    )


def _import(class_path: str, base: type, trust: Trust, source: str) -> type:
    """The class named by ``package.module.Class``, if ``trust`` allows it and it subclasses ``base``.

    The check on the path comes before the import: importing a module runs its code.
    """
    module, _, name = class_path.rpartition(".")
    if not module or not name.isidentifier():
        raise ValueError(f"expected a class path 'package.module.Class', got {class_path!r} ({source})")
    if not trust.allows(class_path):
        raise _refuse(class_path, source, "which is not trusted")
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError as err:
        raise ValueError(f"cannot import {class_path!r} ({source}): {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise _refuse(class_path, source, f"which is not a {base.__name__} subclass")
    return cls


def _check_arguments(args: dict[str, Any], trust: Trust, source: str) -> dict[str, Any]:
    """Refuses untrusted ``module:function`` strings among constructor arguments (callables are imported)."""
    for path in _paths_in(args):
        if not trust.allows(path):
            raise _refuse(path, source, "an import path that is not trusted")
    return args


def _plain(hparams: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def read_config(ckpt: str, config: str | None = None) -> tuple[dict[str, Any], str | None]:
    """The run's configuration and its path: ``config`` if given, else the ``config.yaml`` LightningCLI
    saved beside the checkpoint's run folder, else empty."""
    path = config
    if path is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(ckpt)), os.pardir, "config.yaml")
        path = beside if os.path.isfile(beside) else None
    if path is None:
        return {}, None
    with open(path) as f:
        try:
            return yaml.safe_load(f) or {}, os.path.normpath(path)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None


def load_task(ckpt: str, config: dict[str, Any], trust: Trust = Trust(),
              config_source: str = "the config") -> tuple[Any, dict[str, Any]]:
    """The LightningModule with the checkpoint's weights (eval mode), and the raw checkpoint dict.

    A Lightning checkpoint names its class in ``hyper_parameters["_class_path"]`` (LightningCLI) or via
    the config's ``model.class_path``, else the modular-addition task is assumed. A plain state dict
    (of the task or of its ``model``) takes its class and arguments from the config.

    Raises:
        UntrustedCodeError: the class (or a ``module:function`` argument) is not allowed by ``trust``.
        ValueError: a tensor of the checkpoint has another shape than the model's (both are named).
    """
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model_cfg = config.get("model") or {}
    if isinstance(state, dict) and "state_dict" in state:
        hparams = dict(state.get("hyper_parameters") or {})
        if hparams.get("_class_path"):
            class_path, source = hparams["_class_path"], f"checkpoint {ckpt!r} (hyper_parameters._class_path)"
        else:
            class_path, source = model_cfg.get("class_path") or MODADD_TASK, f"{config_source} (model.class_path)"
        cls = _import(class_path, L.LightningModule, trust, source)
        task = cls(**_check_arguments(_plain(hparams), trust, f"checkpoint {ckpt!r} (hyper_parameters)"))
        _load_weights(task, state["state_dict"], ckpt)
    else:
        if not model_cfg:
            raise ValueError(f"{ckpt!r} is a plain state dict: give --config with a model section to build the model")
        source = f"{config_source} (model)"
        cls = _import(model_cfg["class_path"], L.LightningModule, trust, source)
        task = cls(**_check_arguments(model_cfg.get("init_args") or {}, trust, source))
        _load_weights(task, state, ckpt)
        state = {}
    return task.eval(), state


def _load_weights(task: Any, weights: dict[str, Any], ckpt: str) -> None:
    """Loads ``weights`` into the task, or into its ``model`` when the keys are those of the bare network.

    Shapes are compared first, so that a checkpoint of another size of model reads as such (which tensor,
    which shapes) rather than as missing or unexpected keys.
    """
    target, inner = task, getattr(task, "model", None)
    if isinstance(inner, torch.nn.Module) and not set(weights) & set(task.state_dict()):
        target = inner
    own = target.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in weights.items()
             if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if wrong:
        raise ValueError(
            f"checkpoint {ckpt!r} does not fit the model built from the config: tensor shapes differ "
            f"({'; '.join(wrong)}); the checkpoint and the config describe different models"
        )
    target.load_state_dict(weights)


def load_datamodule(config: dict[str, Any], state: dict[str, Any], task: Any, trust: Trust = Trust(),
                    config_source: str = "the config") -> Any:
    """The datamodule of the config's ``data`` section, else the one the checkpoint recorded, else the
    modular-addition data for the modular-addition transformer.

    Raises:
        UntrustedCodeError: the class (or a ``module:function`` argument) is not allowed by ``trust``.
    """
    data_cfg = config.get("data") or {}
    if data_cfg:
        source = f"{config_source} (data)"
        cls = _import(data_cfg["class_path"], L.LightningDataModule, trust, source)
        return cls(**_check_arguments(data_cfg.get("init_args") or {}, trust, source))
    hparams = dict(state.get("datamodule_hyper_parameters") or {})
    modadd = isinstance(getattr(task, "model", None), ModAddTransformer)
    class_path = hparams.get("_class_path") or (MODADD_DATA if modadd else None)
    if class_path is None:
        raise ValueError("cannot tell which datamodule the model was trained on: give --config with a data section")
    source = "the checkpoint (datamodule_hyper_parameters)"
    cls = _import(class_path, L.LightningDataModule, trust, source)
    return cls(**_check_arguments(_plain(hparams), trust, source))


def check_same_model(task: Any, datamodule: Any, ckpt: str, data_source: str) -> None:
    """Raises ValueError when the task and the data name different moduli ``p`` (both given)."""
    hparams = getattr(task, "hparams", {})
    model_p = hparams.get("p") if hasattr(hparams, "get") else None
    data_p = getattr(datamodule, "p", None)
    if model_p is not None and data_p is not None and model_p != data_p:
        raise ValueError(
            f"model p={model_p} (checkpoint {ckpt!r}) does not match data p={data_p} ({data_source}); "
            "analyse a checkpoint with the config of its own run"
        )


def lib_settings(config: dict[str, Any], task: Any, trust: Trust = Trust(), config_source: str = "the config") -> Any:
    """The LIB callback the config names, built from its class path as LightningCLI would (so this package
    does not import the callbacks package); its parsed settings (``layers``, ``build_kwargs``, ``options``,
    ``forward``, ``split``, ``size``, ``seed`` ...) are the analysis settings.

    Raises:
        UntrustedCodeError: the class (or its ``forward`` / ``batch_inputs``) is not allowed by ``trust``.
    """
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    for entry in callbacks:
        if isinstance(entry, dict) and str(entry.get("class_path", "")).endswith("LIBAnalysis"):
            source = f"{config_source} (trainer.callbacks)"
            cls = _import(entry["class_path"], Callback, trust, source)
            return cls(**_check_arguments(entry.get("init_args") or {}, trust, source))
    if isinstance(getattr(task, "model", None), ModAddTransformer):
        return _import(LIB_CALLBACK, Callback, trust, "the built-in settings")(**MODADD_LIB)
    raise ValueError("no LIBAnalysis callback in the config to take the node layers from: give --config with one")
