"""The layout and HParams builders: exact tags for any layer name, merging, and the summaries' content."""

from __future__ import annotations

import re

import pytest
from tensorboard.plugins.hparams import plugin_data_pb2

from lib_lightning.tensorboard import (
    exact,
    flat_hparams,
    hparams_summaries,
    layer_categories,
    merge_layouts,
    overview_category,
    section_categories,
    summary_markdown,
)


def test_exact_matches_only_its_tag_whatever_the_layer_name():
    for name in ["encoder.0[in]", "blocks.1.attn@-1", "a+b(x)", "resid*"]:
        tag = f"lib/{name}/dim_rel"
        regex = exact(tag)
        assert re.match(regex, tag)  # TensorBoard's custom scalars use re.match
        assert not re.match(regex, tag + "_x") and not re.match(regex, f"lib/{name}X/dim_rel")
    assert not re.match(exact("lib/a.b/n99"), "lib/aXb/n99")


def test_layer_and_section_categories_put_every_kind_on_one_chart():
    layers = layer_categories(["pre", "mid"], ["lib", "pca"])
    assert list(layers) == ["layer pre: lib vs pca", "layer mid: lib vs pca"]
    chart = layers["layer mid: lib vs pca"]["n99: directions holding 99 % of ΣΛ"]
    assert chart == ["Multiline", [exact("lib/mid/n99"), exact("pca/mid/n99")]]
    sections = section_categories(["pre", "mid", "out"], ["lib", "pca"])
    assert list(sections) == ["section pre → mid", "section mid → out"]
    charts = sections["section mid → out"]
    assert charts["Gini coefficient of the edge weights"][1] == [exact("edges/mid->out/lib_gini"), exact("edges/mid->out/pca_gini")]
    assert charts["n99 ratio LIB / PCA (below 1: LIB sparser)"][1] == [exact("edges/mid->out/lib_pca_ratio_n99")]
    assert "n99 ratio LIB / PCA (below 1: LIB sparser)" not in section_categories(["a", "b"], ["lib"])["section a → b"]


def test_overview_has_only_the_attached_analyses_and_llc_per_section_keys():
    assert list(overview_category()["overview"]) == ["accuracy (train / val)", "loss (train / val)"]
    full = overview_category(lib=True, modularity=True, edge_ratio=True, llc=True, progress=True)["overview"]
    ratio = full["edges n99 ratio LIB / PCA, every section (below 1: LIB sparser)"][1]
    tags = ["edges/pre->mid/lib_pca_ratio_n99", "edges/mid->out/lib_pca_ratio_n99", "edges/mid->out/lib_n99"]
    assert [t for t in tags if any(re.match(r, t) for r in ratio)] == tags[:2]
    llc = full["LLC (mean over chains)"][1]
    tags = ["llc/mean", "llc/attn/mean", "llc/attn/std", "llc/std", "llc/mean_x"]
    assert [t for t in tags if any(re.match(r, t) for r in llc)] == ["llc/mean", "llc/attn/mean"]
    dims = full["LIB dimension dim_rel, every layer"][1]
    tags = ["lib/pre/dim_rel", "lib/mid/dim_rel", "pca/mid/dim_rel", "lib/mid/dim_rel_x"]
    assert [t for t in tags if any(re.match(r, t) for r in dims)] == ["lib/pre/dim_rel", "lib/mid/dim_rel"]
    accuracy = full["accuracy (train / val)"][1]
    assert [t for t in ["train/acc", "val/acc", "val/loss", "train/acc_epoch"] if any(re.match(r, t) for r in accuracy)] == [
        "train/acc", "val/acc", "train/acc_epoch"
    ]


def test_merge_layouts_keeps_order_and_unions_tags():
    a = {"overview": {"acc": ["Multiline", ["x$"]]}, "layer p": {"dim": ["Multiline", ["a$"]]}}
    b = {"layer q": {"dim": ["Multiline", ["q$"]]}, "overview": {"acc": ["Multiline", ["x$", "y$"]], "llc": ["Multiline", ["l$"]]}}
    merged = merge_layouts([a, b])
    assert list(merged) == ["overview", "layer p", "layer q"]
    assert merged["overview"] == {"acc": ["Multiline", ["x$", "y$"]], "llc": ["Multiline", ["l$"]]}
    assert a["overview"]["acc"] == ["Multiline", ["x$"]]  # inputs untouched


def test_flat_hparams_and_summaries():
    settings = {"lr": 1e-3, "LIBAnalysis": {"kinds": ("lib", "pca"), "threads": None, "center": True, "dtype": object}}
    flat = flat_hparams(settings)
    assert flat == {"lr": 1e-3, "LIBAnalysis/kinds": "lib, pca", "LIBAnalysis/center": True, "LIBAnalysis/dtype": str(object)}
    experiment, start, end = hparams_summaries(settings, ["val/acc", "graph/modularity"])
    data = plugin_data_pb2.HParamsPluginData.FromString(experiment.value[0].metadata.plugin_data.content)
    assert [m.name.tag for m in data.experiment.metric_infos] == ["val/acc", "graph/modularity"]
    info = plugin_data_pb2.HParamsPluginData.FromString(start.value[0].metadata.plugin_data.content).session_start_info
    assert info.hparams["LIBAnalysis/kinds"].string_value == "lib, pca"
    assert info.hparams["lr"].number_value == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="metrics must name at least one scalar tag"):
        hparams_summaries(settings, [])


def test_summary_markdown_puts_kinds_side_by_side():
    metrics = {"lib/pre/dim_rel": 12.0, "pca/pre/dim_rel": 36.0, "lib/pre/n99": 20.0, "pca/pre/n99": 50.0,
               "edges/pre->out/lib_n99": 56.0, "edges/pre->out/pca_n99": 102.0, "graph/modularity": 0.4213}
    text = summary_markdown(metrics, ["pre", "out"], ["lib", "pca"])
    assert text.splitlines() == [
        "| node layer | lib dim_rel | pca dim_rel | lib n99 | pca n99 |",
        "|---|---|---|---|---|",
        "| pre | 12 | 36 | 20 | 50 |",
        "| out | – | – | – | – |",
        "",
        "| section | lib edges n99 | pca edges n99 |",
        "|---|---|---|",
        "| pre->out | 56 | 102 |",
        "",
        "modularity 0.4213",
    ]
    assert summary_markdown({}, ["a", "b"], ["pca"]).splitlines()[2] == "| a | – | – |"  # nothing else: no sections, no graph
