"""TensorBoard at a glance: a custom-scalars layout (LIB against PCA on one chart) and HParams summaries.

Plain builders, no Lightning: the callbacks decide what is logged (``callbacks/_tensorboard.py`` gathers
it from the trainer) and hand the node layers, basis kinds and metric names to these functions.

A layout is the dict ``SummaryWriter.add_custom_scalars`` takes: category -> chart title ->
``["Multiline", [tag regexes]]``. TensorBoard matches each regex against a run's scalar tags with
``re.match`` (anchored at the start only), so exact tags are escaped and end with ``$``, and a regex that
matches nothing yet (a callback that has not logged, a key that lands later) draws an empty chart
instead of failing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "Layout",
    "exact",
    "flat_hparams",
    "hparams_summaries",
    "layer_categories",
    "merge_layouts",
    "overview_category",
    "section_categories",
    "summary_markdown",
]

Layout = dict[str, dict[str, list]]

OVERVIEW = "overview"
# Regexes of the LightningModule's own metrics: ``train/acc``, ``val/acc``, ``val/loss``, ... (also the
# ``_epoch`` / ``_step`` variants Lightning adds); a module that logs other names gets an empty chart.
MODEL_ACCURACY = r"(train|val|test)/acc"
MODEL_LOSS = r"(train|val|test)/loss"


def exact(tag: str) -> str:
    """A regex matching exactly ``tag`` (layer names may hold ``.``, ``[``, ``@``)."""
    return re.escape(tag) + "$"


def _chart(tags: Iterable[str]) -> list:
    return ["Multiline", list(tags)]


def layer_categories(layers: Sequence[str], kinds: Sequence[str]) -> Layout:
    """One category per node layer: every kind's kept dimension, participation ratio and n99 on one chart each.

    Args:
        layers: short node-layer names, as in the ``<kind>/<layer>/...`` tags.
        kinds: basis kinds (``"lib"``, ``"pca"``, ``"neuron"``), drawn together on each chart.
    """
    charts = (
        ("kept dimension dim_rel (Λ > 1e-3 × max)", "dim_rel"),
        ("participation ratio (ΣΛ)² / ΣΛ²", "participation_ratio"),
        ("n99: directions holding 99 % of ΣΛ", "n99"),
    )
    return {
        f"layer {name}: {' vs '.join(kinds)}": {title: _chart(exact(f"{kind}/{name}/{key}") for kind in kinds) for title, key in charts}
        for name in layers
    }


def section_categories(layers: Sequence[str], kinds: Sequence[str]) -> Layout:
    """One category per section ``a -> b``: edges holding 99 % of the weight and the Gini coefficient, every
    kind on one chart, plus the LIB / PCA ratio when both kinds are analysed."""
    out: Layout = {}
    for a, b in zip(layers[:-1], layers[1:]):
        prefix = f"edges/{a}->{b}"
        charts = {
            "n99: edges holding 99 % of the weight": _chart(exact(f"{prefix}/{kind}_n99") for kind in kinds),
            "Gini coefficient of the edge weights": _chart(exact(f"{prefix}/{kind}_gini") for kind in kinds),
        }
        if "lib" in kinds and "pca" in kinds:
            charts["n99 ratio LIB / PCA (below 1: LIB sparser)"] = _chart([exact(f"{prefix}/lib_pca_ratio_n99")])
        out[f"section {a} → {b}"] = charts
    return out


def overview_category(
    *, lib: bool = False, modularity: bool = False, edge_ratio: bool = False, llc: bool = False, progress: bool = False
) -> Layout:
    """The overview: the model's accuracy and loss, then what each attached analysis adds.

    Args:
        lib: a LIB analysis with the ``lib`` kind runs: the LIB dimension of every layer on one chart.
        modularity: it computes modularity.
        edge_ratio: it compares LIB and PCA edges: the n99 ratio LIB / PCA of every section on one chart.
        llc: an LLC callback runs (``llc/mean`` and any per-section ``llc/<section>/mean``).
        progress: the progress-measures callback runs (restricted / excluded loss).
    """
    charts = {"accuracy (train / val)": _chart([MODEL_ACCURACY]), "loss (train / val)": _chart([MODEL_LOSS])}
    if modularity:
        charts["modularity Q of the LIB interaction graph"] = _chart([exact("graph/modularity")])
    if lib:
        charts["LIB dimension dim_rel, every layer"] = _chart([r"lib/[^/]+/dim_rel$"])
    if edge_ratio:
        charts["edges n99 ratio LIB / PCA, every section (below 1: LIB sparser)"] = _chart([r"edges/[^/]+/lib_pca_ratio_n99$"])
    if llc:
        charts["LLC (mean over chains)"] = _chart([exact("llc/mean"), r"llc/.+/mean$"])
    if progress:
        charts["restricted / excluded loss"] = _chart([exact("progress/restricted_loss"), exact("progress/excluded_loss")])
    return {OVERVIEW: charts}


def summary_markdown(metrics: Mapping[str, float], layers: Sequence[str], kinds: Sequence[str]) -> str:
    """One analysis as markdown tables, each kind side by side: kept dimension and n99 per node layer, edges
    holding 99 % of the weight per section, then the graph's modularity and communities. A missing value
    (a layer without a basis, a part switched off) is a dash."""

    def cell(key: str) -> str:
        return f"{metrics[key]:.4g}" if key in metrics else "–"

    def table(header: str, rows: Sequence[str], columns: Sequence[tuple[str, str]]) -> list[str]:
        lines = ["| " + " | ".join([header] + [title for title, _ in columns]) + " |", "|---" * (len(columns) + 1) + "|"]
        return lines + ["| " + " | ".join([row] + [cell(key.format(row=row)) for _, key in columns]) + " |" for row in rows]

    columns = [(f"{kind} {q}", f"{kind}/{{row}}/{q}") for q in ("dim_rel", "n99") for kind in kinds]
    lines = table("node layer", layers, columns)
    sections = [f"{a}->{b}" for a, b in zip(layers[:-1], layers[1:])]
    if any(f"edges/{s}/{kinds[0]}_n99" in metrics for s in sections):
        lines += [""] + table("section", sections, [(f"{kind} edges n99", f"edges/{{row}}/{kind}_n99") for kind in kinds])
    graph = [f"{name} {cell('graph/' + key)}" for key, name in
             (("modularity", "modularity"), ("n_communities", "communities"), ("largest_community", "largest"),
              ("community_ari", "ARI with the previous analysis")) if f"graph/{key}" in metrics]
    return "\n".join(lines + ([""] + [", ".join(graph)] if graph else []))


def merge_layouts(layouts: Iterable[Layout]) -> Layout:
    """Categories in first-seen order; charts of a category seen twice are merged, a chart's tags unioned."""
    out: Layout = {}
    for layout in layouts:
        for category, charts in layout.items():
            merged = out.setdefault(category, {})
            for title, (kind, tags) in charts.items():
                old = merged.setdefault(title, [kind, []])[1]
                old.extend(t for t in tags if t not in old)
    return out


def _hparam_value(value: Any) -> Any:
    """A value the HParams plugin can show: numbers, strings and bools as they are, sequences joined, the
    rest as text; None is left out by the caller."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return ", ".join(str(getattr(v, "name", v)) for v in value)
    return str(value)


def flat_hparams(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings flattened to ``prefix/key/subkey`` -> number, string or bool; None values dropped."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, name))
        elif value is not None:
            out[name] = _hparam_value(value)
    return out


def hparams_summaries(settings: Mapping[str, Any], metrics: Sequence[str]) -> tuple:
    """The three HParams summaries (experiment, session start, session end) of one run.

    ``settings`` (nested mappings allowed) are flattened by :func:`flat_hparams`. The HParams tab shows, for each run, these settings next to the last value of each scalar tag in
    ``metrics`` in the same run folder, so the metrics need no values here.

    Raises:
        ValueError: for an empty ``metrics`` (the tab would show the run without any metric column).
    """
    from torch.utils.tensorboard.summary import hparams

    if not metrics:
        raise ValueError("metrics must name at least one scalar tag to show next to the settings")
    return hparams(flat_hparams(settings), dict.fromkeys(metrics, 0.0))
