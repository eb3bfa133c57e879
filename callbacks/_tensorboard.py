"""What the analysis callbacks write to TensorBoard besides scalars: figures, the layout and the HParams.

``write_overview`` is called by every analysis callback at ``on_fit_start``; the first analysis callback
on the trainer writes, for all of them, one custom-scalars layout and one HParams entry into the run's own
folder, built from the callbacks actually attached (their layers, kinds and settings). It runs before
Lightning logs the module's hyperparameters: TensorBoard keeps the first HParams entry of a run folder,
so this one carries the module's and datamodule's hyperparameters too.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict, is_dataclass
from typing import Any

import lightning as L
import torch

from lib_lightning.core.metrics.summary import spectrum
from lib_lightning.tensorboard import (
    hparams_summaries,
    layer_categories,
    merge_layouts,
    overview_category,
    section_categories,
    summary_markdown,
)

__all__ = ["callback_settings", "log_lib_figures", "tensorboards", "write_overview", "write_text"]

def tensorboards(trainer: L.Trainer) -> list:
    """The trainer's loggers' SummaryWriters (anything with ``add_image`` and ``add_histogram``)."""
    writers = [getattr(logger, "experiment", None) for logger in trainer.loggers]
    return [w for w in writers if hasattr(w, "add_image") and hasattr(w, "add_histogram")]


def write_text(trainer: L.Trainer, tag: str, text: str, step: int) -> None:
    """One text entry (markdown) at ``step`` on every TensorBoard logger (global rank zero)."""
    if trainer.is_global_zero:
        for writer in tensorboards(trainer):
            writer.add_text(tag, text, step)


def log_lib_figures(writers: list, names: list[str], graphs, summary, step: int, images: bool, histograms: bool) -> None:
    """The LIB callback's spectra and interaction-graph images, log-Λ histograms and text summary."""
    from lib_lightning.plotting import figure_to_array, plot_interaction_graph, plot_spectra

    spectra = {}
    for i, name in enumerate(names):
        per_kind = {k: spectrum(g.layers[i]) for k, g in graphs.items() if g.layers[i].kind != "identity"}
        if per_kind:
            spectra[name] = per_kind
    pictures = {}
    if images:
        pictures["lib/spectra"] = figure_to_array(plot_spectra(spectra, title=f"step {step}"))
        if summary.graph is not None and summary.graph.number_of_edges():
            fig = plot_interaction_graph(summary.graph, summary.communities, title=f"LIB interaction graph, step {step}")
            pictures["graph/interaction"] = figure_to_array(fig)
    text = summary_markdown(summary.metrics, names, list(graphs))
    for writer in writers:
        if histograms:
            for name, per_kind in spectra.items():
                for kind, lam in per_kind.items():
                    if lam.numel():
                        writer.add_histogram(f"{kind}/{name}/log10_lambda", torch.log10(lam.clamp_min(1e-30)), step)
        for tag, image in pictures.items():
            writer.add_image(tag, image, step, dataformats="HWC")
        writer.add_text("lib/summary", text, step)


# ---------------------------------------------------------------------------------------- the overview
def _role(callback: Any) -> str | None:
    """Which analysis a callback is: ``"lib"``, ``"ablation"``, ``"llc"``, ``"progress"`` or None."""
    from callbacks.ablation import Ablation
    from callbacks.lib_analysis import LIBAnalysis
    from callbacks.llc import LLCCallback
    from callbacks.progress_measures import ProgressMeasures

    for cls, role in ((Ablation, "ablation"), (LIBAnalysis, "lib"), (LLCCallback, "llc"), (ProgressMeasures, "progress")):
        if isinstance(callback, cls):
            return role
    return None


# Arguments kept under another name: the LIB callback's kept-dimension thresholds (its own abs_threshold
# and rel_threshold truncate the bases) and the fixed key frequencies of ProgressMeasures.
_KEPT_AS = {"dim_abs_threshold": "options.abs_threshold", "dim_rel_threshold": "options.rel_threshold",
            "key_frequencies": "fixed"}


def callback_settings(callback: Any) -> dict[str, Any]:
    """A callback's constructor arguments as it kept them, by name.

    Each argument of the ``__init__`` of the callback's classes is read from a same-named attribute, else
    from the callback's ``build_kwargs`` or ``options`` (the LIB callback's basis and summary settings);
    the LIB callback's schedule argument is its ``every``, and the arguments in ``_KEPT_AS`` are read where
    those callbacks keep them. Callables, None and arguments kept under another name are left out.
    """
    sources = [vars(callback), getattr(callback, "build_kwargs", None) or {}]
    options = getattr(callback, "options", None)
    if is_dataclass(options):
        sources.append(asdict(options))
    names = []
    for cls in type(callback).__mro__:
        if cls.__init__ is object.__init__ or "__init__" not in vars(cls):
            continue
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD) and param.name not in names:
                names.append(param.name)
    out: dict[str, Any] = {}
    for name in names:
        if getattr(callback, "schedule", None) == name and hasattr(callback, "every"):
            out[name] = callback.every
            continue
        if name in _KEPT_AS:
            owner, _, attribute = _KEPT_AS[name].rpartition(".")
            value = getattr(getattr(callback, owner, None) if owner else callback, attribute, None)
        else:
            value = next((source[name] for source in sources if name in source), None)
        if value is not None and not callable(value) and name != "name":
            out[name] = [getattr(v, "name", v) for v in value] if isinstance(value, (list, tuple)) else value
    return out


def _lib_layout(callback: Any) -> tuple[dict, list[str]]:
    """The per-layer and per-section categories of one LIB callback and its final metrics."""
    names = callback._names
    rotated = names if callback.build_kwargs.get("rotate_final") else names[:-1]  # the logits have no basis
    layout = merge_layouts([layer_categories(rotated, callback.kinds)])
    if callback.options.sparsity:
        layout = merge_layouts([layout, section_categories(names, callback.kinds)])
    metrics = ["graph/modularity"] if callback.options.modularity and "lib" in callback.kinds else []
    metrics += [f"lib/{name}/dim_rel" for name in rotated] if "lib" in callback.kinds else []
    return layout, metrics


def write_overview(trainer: L.Trainer, pl_module: L.LightningModule, caller: Any) -> None:
    """The run's custom-scalars layout and HParams entry, written once by the first analysis callback."""
    attached = [(cb, _role(cb)) for cb in trainer.callbacks]
    attached = [(cb, role) for cb, role in attached if role is not None]
    if not attached or attached[0][0] is not caller or not trainer.is_global_zero:
        return
    writers = tensorboards(trainer)
    if not writers:
        return
    roles = {role for _, role in attached}
    lib = [cb for cb, role in attached if role == "lib"]
    parts = [_lib_layout(cb) for cb in lib]
    overview = overview_category(
        lib=any("lib" in cb.kinds for cb in lib), modularity=any(m == "graph/modularity" for _, ms in parts for m in ms),
        edge_ratio=any({"lib", "pca"} <= set(cb.kinds) and cb.options.sparsity for cb in lib),
        llc="llc" in roles, progress="progress" in roles,
    )
    layout = merge_layouts([overview] + [part for part, _ in parts])
    # The HParams table shows the first five metric columns until the user ticks more: these come first.
    metrics = ["val/acc"] + [m for _, ms in parts for m in ms] + ["llc/mean"] * ("llc" in roles)
    metrics += ["progress/restricted_loss", "progress/excluded_loss"] * ("progress" in roles) + ["val/loss"]
    hparams = _module_hparams(trainer, pl_module)
    seen: dict[str, int] = {}
    for cb, _ in attached:
        label = type(cb).__name__ + (f"[{cb.name}]" if getattr(cb, "name", None) else "")
        seen[label] = seen.get(label, 0) + 1
        hparams[label if seen[label] == 1 else f"{label}#{seen[label]}"] = callback_settings(cb)
    summaries = hparams_summaries(hparams, list(dict.fromkeys(metrics)))
    for writer in writers:
        writer.add_custom_scalars(layout)
        for summary in summaries:  # add_hparams would open a new run folder; these belong in this one
            writer._get_file_writer().add_summary(summary)


def _module_hparams(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """The hyperparameters Lightning itself logs for the run (the datamodule's and the module's, unprefixed)
    and the global seed of ``seed_everything``, which Lightning does not log."""
    hparams: dict[str, Any] = {}
    datamodule = trainer.datamodule
    if datamodule is not None and getattr(datamodule, "_log_hyperparams", False):
        hparams.update(datamodule.hparams_initial)
    if getattr(pl_module, "_log_hyperparams", False):
        hparams.update(pl_module.hparams_initial)
    hparams.pop("_class_path", None)
    if os.environ.get("PL_GLOBAL_SEED", "").lstrip("-").isdigit():  # set by seed_everything: runs differ by it
        hparams.setdefault("seed_everything", int(os.environ["PL_GLOBAL_SEED"]))
    return hparams
