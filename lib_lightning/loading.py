"""Load what a training run left behind: its config, the task with the checkpoint's weights, its
datamodule and the LIB analysis settings it ran with (used by ``python -m lib_lightning analyze``)."""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
import yaml

from lib_lightning.models.transformer import ModAddTransformer

__all__ = ["read_config", "load_task", "load_datamodule", "lib_settings", "MODADD_LIB"]

MODADD_TASK = "lib_lightning.tasks.classifier.ModularAddition"
MODADD_DATA = "lib_lightning.data.modadd.ModularAdditionDataModule"
LIB_CALLBACK = "callbacks.lib_analysis.LIBAnalysis"
MODADD_LIB = {  # the main job's callback settings (configs/modadd.yaml)
    "layers": ["model.hook_resid_pre", "model.hook_resid_mid", "model.hook_resid_post", "model.hook_logits"],
    "kinds": ["lib", "pca"], "every_n_steps": 125, "split": "train", "size": 500,
    "relu_layers": ["model.hook_mlp_hidden"],
}



def _import(class_path: str) -> type:
    """The class named by ``package.module.Class``."""
    module, _, name = class_path.rpartition(".")
    if not module:
        raise ValueError(f"expected a class path 'package.module.Class', got {class_path!r}")
    return getattr(importlib.import_module(module), name)


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
        return yaml.safe_load(f) or {}, os.path.normpath(path)


def load_task(ckpt: str, config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The LightningModule with the checkpoint's weights (eval mode), and the raw checkpoint dict.

    A Lightning checkpoint names its class in ``hyper_parameters["_class_path"]`` (LightningCLI) or via
    the config's ``model.class_path``, else the modular-addition task is assumed. A plain state dict
    (of the task or of its ``model``) takes its class and arguments from the config.
    """
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model_cfg = config.get("model") or {}
    if isinstance(state, dict) and "state_dict" in state:
        hparams = dict(state.get("hyper_parameters") or {})
        class_path = hparams.get("_class_path") or model_cfg.get("class_path") or MODADD_TASK
        task = _import(class_path)(**_plain(hparams))
        task.load_state_dict(state["state_dict"])
    else:
        if not model_cfg:
            raise ValueError(f"{ckpt!r} is a plain state dict: give --config with a model section to build the model")
        task = _import(model_cfg["class_path"])(**(model_cfg.get("init_args") or {}))
        try:
            task.load_state_dict(state)
        except RuntimeError:
            inner = getattr(task, "model", None)
            if inner is None:
                raise
            inner.load_state_dict(state)
        state = {}
    return task.eval(), state


def load_datamodule(config: dict[str, Any], state: dict[str, Any], task: Any) -> Any:
    """The datamodule of the config's ``data`` section, else the one the checkpoint recorded, else the
    modular-addition data for the modular-addition transformer."""
    data_cfg = config.get("data") or {}
    if data_cfg:
        return _import(data_cfg["class_path"])(**(data_cfg.get("init_args") or {}))
    hparams = dict(state.get("datamodule_hyper_parameters") or {})
    modadd = isinstance(getattr(task, "model", None), ModAddTransformer)
    class_path = hparams.get("_class_path") or (MODADD_DATA if modadd else None)
    if class_path is None:
        raise ValueError("cannot tell which datamodule the model was trained on: give --config with a data section")
    return _import(class_path)(**_plain(hparams))


def lib_settings(config: dict[str, Any], task: Any) -> Any:
    """The LIB callback the config names, built from its class path as LightningCLI would (so this package
    does not import the callbacks package); its parsed settings (``layers``, ``build_kwargs``, ``options``,
    ``forward``, ``split``, ``size``, ``seed`` ...) are the analysis settings."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    for entry in callbacks:
        if isinstance(entry, dict) and str(entry.get("class_path", "")).endswith("LIBAnalysis"):
            return _import(entry["class_path"])(**(entry.get("init_args") or {}))
    if isinstance(getattr(task, "model", None), ModAddTransformer):
        return _import(LIB_CALLBACK)(**MODADD_LIB)
    raise ValueError("no LIBAnalysis callback in the config to take the node layers from: give --config with one")
