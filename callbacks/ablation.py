"""Node and edge ablation on a schedule during training (off unless added to the callbacks: it costs more).

The callback decides when and on which data; :mod:`lib_lightning.core.interpret.ablation` decides how. It shares
the LIB callback's arguments (node layers, schedule, analysis set, basis settings) and builds its own
graphs at each analysis, then evaluates on held-out data.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from callbacks.lib_analysis import LIBAnalysis
from lib_lightning.core.interpret.ablation import node_ablation, smallest_passing
from lib_lightning.core.interpret.edge_ablation import edge_ablation
from lib_lightning.core.lib import batch as nested
from lib_lightning.core.lib import build_graphs
from lib_lightning.core.lib.files import atomic_write_text

__all__ = ["Ablation"]


class Ablation(LIBAnalysis):
    """Logs the features and edges LIB and PCA need to keep held-out accuracy, on a schedule.

    At each analysis (global rank zero logs and writes; every rank computes the same, unsharded):

    - ``ablation/<layer>/<kind>_features_required``: the smallest k (constant included) of the node
      ablation f ↦ f C_k C⁺ from which accuracy stays >= baseline − ``tolerance`` (−1: never);
    - ``ablation/<a>-><b>/<kind>_edges_required``: the fewest strongest edges of the section that keep
      accuracy >= baseline − ``tolerance`` (bisection), and ``ablation/<a>-><b>/lib_pca_ratio``;
    - ``ablation/baseline_acc``; the curves go to ``<log_dir>/ablation/step_<step>.json``.

    Args:
        node, edges: run the node and the edge ablation.
        tolerance: accuracy drop allowed, >= 0.
        eval_size: held-out examples (a fixed, seeded subset of the validation split; None: all).
        eval_batch_size: examples per forward pass of the evaluation.
        **kwargs: the :class:`~callbacks.lib_analysis.LIBAnalysis` arguments (``layers``, the schedule,
            ``split``, ``size``, ``seed``, basis settings, ``threads``, ``name``); its metric, image and
            saving switches are unused.

    Raises:
        ValueError: for an argument outside its valid range, naming it and the valid choices.
    """

    def __init__(
        self,
        *args: Any,
        node: bool = True,
        edges: bool = True,
        tolerance: float = 1e-3,
        eval_size: int | None = 2000,
        eval_batch_size: int = 4096,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not (node or edges):
            raise ValueError("Ablation needs node=True or edges=True")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        if eval_size is not None and eval_size < 1:
            raise ValueError(f"eval_size must be >= 1 or None, got {eval_size}")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self.node, self.edges, self.tolerance = node, edges, tolerance
        self.eval_size, self.eval_batch_size = eval_size, eval_batch_size
        self._data: list | None = None

    def evaluation_data(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list:
        """Held-out ``(inputs, labels)`` batches on the module's device, drawn once per fit."""
        if self._data is not None:
            return self._data
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "val_tensors"):
            x, y = dm.val_tensors
        else:
            loader = (dm if dm is not None else pl_module).val_dataloader()
            batches = [(self.batch_inputs(b), b[1]) for b in loader]
            x, y = nested.concat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        nested.batch_size(x, expected=len(y), what="the held-out inputs")  # as many as labels
        if self.eval_size is not None and self.eval_size < len(y):
            index = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))[: self.eval_size]
            x, y = nested.select(x, index), y[index]
        x, y = nested.to_device(x, pl_module.device), y.to(pl_module.device)
        size = self.eval_batch_size
        self._data = list(zip(nested.split(x, size), y.split(size)))
        return self._data

    def _analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        root = trainer.log_dir or trainer.default_root_dir
        folder = os.path.join(root, "ablation" if self.name is None else f"ablation_{self.name}")
        inputs = nested.to_device(self.analysis_inputs(trainer, pl_module), pl_module.device)
        batches = nested.split(inputs, self.batch_size)
        graphs = build_graphs(pl_module, self.layers, batches, forward=self.forward, **self.build_kwargs)
        data = self.evaluation_data(trainer, pl_module)
        names = self._names
        metrics: dict[str, float] = {}
        curves: dict[str, Any] = {}
        for kind, graph in graphs.items():
            if self.node:
                for c in node_ablation(pl_module, graph, data, forward=self.forward, dtype=self.build_kwargs["dtype"]):
                    name = names[graph.layer_names.index(c.layer)]
                    k = smallest_passing(c.ks, c.accuracy, c.baseline_accuracy - self.tolerance)
                    metrics[f"ablation/{name}/{kind}_features_required"] = float(-1 if k is None else k)
                    metrics["ablation/baseline_acc"] = c.baseline_accuracy
                    curves[f"node/{kind}/{name}"] = {
                        "ks": c.ks.tolist(), "accuracy": c.accuracy.tolist(), "loss": c.loss.tolist()
                    }
            if self.edges:
                for sec in range(len(graph.edges)):
                    r = edge_ablation(pl_module, graph, sec, data, forward=self.forward, tolerance=self.tolerance,
                                      dtype=self.build_kwargs["dtype"])
                    tag = f"{names[sec]}->{names[sec + 1]}"
                    metrics[f"ablation/{tag}/{kind}_edges_required"] = float(r.n_required)
                    metrics["ablation/baseline_acc"] = r.baseline_accuracy
                    curves[f"edges/{kind}/{tag}"] = {
                        "ks": r.ks.tolist(), "accuracy": r.accuracy.tolist(), "reached": r.reached
                    }
        for sec in range(len(names) - 1):
            tag = f"ablation/{names[sec]}->{names[sec + 1]}"
            if metrics.get(f"{tag}/pca_edges_required") and f"{tag}/lib_edges_required" in metrics:
                metrics[f"{tag}/lib_pca_ratio"] = metrics[f"{tag}/lib_edges_required"] / metrics[f"{tag}/pca_edges_required"]
        self.history.append({"step": step, "metrics": metrics})
        if trainer.is_global_zero:
            self._log(trainer, metrics, step)
            text = json.dumps({"step": step, "metrics": metrics, "curves": curves}, indent=1)
            self._write(lambda: atomic_write_text(os.path.join(folder, f"step_{step:08d}.json"), text),
                        f"the ablation curves of step {step}")
            if self.save_errors:
                self._log(trainer, {"ablation/save_errors": float(self.save_errors)}, step)
        required = {k.split("/", 1)[1]: int(v) for k, v in metrics.items() if k.endswith("edges_required")}
        rank_zero_info(f"ablation step {step}: edges required {required}")
