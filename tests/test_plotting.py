import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from lib_lightning.core.metrics.modularity import find_communities, interaction_graph
from lib_lightning.plotting import figure_to_array, plot_interaction_graph, plot_spectra


def _ink(image: np.ndarray) -> int:
    """Number of pixels that are not white."""
    return int((image < 250).any(axis=-1).sum())


def _graph():
    gen = torch.Generator().manual_seed(0)
    edges = []
    for k_out, k_in in ((6, 5), (4, 6)):  # layers x (5), y (6), z (4), constant at index 0
        e = torch.rand(k_out, k_in, generator=gen, dtype=torch.float64) * 1e-3
        e[1:3, 1:3] += 1.0
        e[3:, 3:] += 1.0
        edges.append(e)
    return interaction_graph(edges, ["x", "y", "z"], weighting="sqrt")


def test_plot_spectra_returns_a_drawn_figure():
    lam = torch.tensor([5.0, 1.0, 1e-3, 1e-9, 0.0], dtype=torch.float64)
    spectra = {"ln1": {"lib": lam, "pca": lam.flip(0) + 1.0}, "ln2": {"lib": lam[:3]}}
    fig = plot_spectra(spectra, title="step 100")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log"]
    lib_line = fig.axes[0].lines[0]
    np.testing.assert_allclose(lib_line.get_ydata(), [1.0, 0.2, 2e-4, 2e-10])  # normalised, zero left out
    np.testing.assert_array_equal(lib_line.get_xdata(), [1, 2, 3, 4])
    image = figure_to_array(fig)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert _ink(image) > 0


def test_plot_spectra_bad_input():
    with pytest.raises(ValueError, match=r"at least one node layer"):
        plot_spectra({})
    with pytest.raises(ValueError, match=r"spectra\['ln1'\]\['lib'\] must be 1-D and non-negative"):
        plot_spectra({"ln1": {"lib": torch.tensor([1.0, -1.0])}})


def test_plot_interaction_graph_layout_colours_and_labels():
    graph = _graph()
    communities = find_communities(graph, seed=0)
    labels = {node: f"f{node[1]}" for node in graph.nodes}
    fig = plot_interaction_graph(graph, communities, labels=labels, max_nodes_per_layer=3)
    (ax,) = fig.axes
    xy = ax.collections[-1].get_offsets()  # the node scatter
    assert len(xy) == 3 + 3 + 3  # capped per layer
    assert sorted(set(np.asarray(xy)[:, 0].tolist())) == [0.0, 1.0, 2.0]  # x, y, z left to right
    texts = [t.get_text() for t in ax.texts]
    assert {"x", "y", "z", "f1", "f3"} <= set(texts) and "f4" not in texts
    colours = ax.collections[-1].get_facecolors()
    assert len({tuple(c) for c in colours}) >= 2  # communities coloured differently
    assert _ink(figure_to_array(fig)) > 0


def test_plot_interaction_graph_order_and_errors():
    graph = _graph()
    fig = plot_interaction_graph(graph, layer_order=["z", "x"])
    xy = np.asarray(fig.axes[0].collections[-1].get_offsets())
    assert len(xy) == 3 + 4
    assert _ink(figure_to_array(fig)) > 0
    with pytest.raises(ValueError, match=r"unknown layers \['w'\]; the graph has \['x', 'y', 'z'\]"):
        plot_interaction_graph(graph, layer_order=["x", "w"])
    with pytest.raises(ValueError, match=r"max_nodes_per_layer must be an int >= 1, got 0"):
        plot_interaction_graph(graph, max_nodes_per_layer=0)


def _modules_graph():
    """Two modules interleaved in feature order (odd features one, even the other) and edgeless features."""
    gen = torch.Generator().manual_seed(1)
    edges = []
    for k_out, k_in in ((9, 8), (7, 9)):  # layers a (8), b (9), c (7); constant at index 0
        e = torch.zeros(k_out, k_in, dtype=torch.float64)
        for i in range(1, min(k_out, k_in, 6)):
            for j in range(1, min(k_out, k_in, 6)):
                if i % 2 == j % 2:  # features 1..5 only: the rest carry no edge
                    e[i, j] = 1.0 + torch.rand((), generator=gen, dtype=torch.float64).item()
        edges.append(e)
    return interaction_graph(edges, ["a", "b", "c"], weighting="sqrt")


def test_plot_interaction_graph_groups_features_by_community_and_counts_the_rest():
    graph = _modules_graph()
    communities = find_communities(graph, seed=0)
    labels = {node: f"{node[0]}{node[1]}" for node in graph.nodes}
    fig = plot_interaction_graph(graph, communities, labels=labels, title="step 7")
    ax = fig.axes[0]
    rows = {t.get_text(): t.get_position()[1] for t in ax.texts if t.get_text() in labels.values()}
    # only features 1..5 carry edges; odd ones (3 per layer) form the larger module and come first
    assert set(rows) == {f"{layer}{f}" for layer in "abc" for f in range(1, 6)}
    column_a = sorted((name for name in rows if name.startswith("a")), key=lambda name: -rows[name])
    assert column_a == ["a1", "a3", "a5", "a2", "a4"]
    assert rows["a3"] - rows["a5"] == pytest.approx(1.0) and rows["a5"] - rows["a2"] == pytest.approx(1.8)  # a gap between modules
    assert [t.get_text() for t in ax.texts if "without edges" in t.get_text()] == [
        "+ 2 without edges", "+ 3 without edges", "+ 1 without edges"
    ]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["community 1: 9 features", "community 2: 6 features"]
    assert fig._suptitle.get_text() == "step 7"
    named = plot_interaction_graph(graph, communities, community_labels={0: "k = 22", 1: "k = 20"})
    assert [t.get_text() for t in named.legends[0].get_texts()] == ["k = 22", "k = 20"]


def test_plot_interaction_graph_threshold_hides_weak_edges_and_their_features():
    graph = _modules_graph()
    weakest = min(w for _, _, w in graph.edges(data="weight"))
    strongest = max(w for _, _, w in graph.edges(data="weight"))
    fig = plot_interaction_graph(graph, min_weight=(weakest + strongest) / 2)
    shown = len(fig.axes[0].collections[-1].get_offsets())
    assert 0 < shown < 15
    assert not fig.legends  # no communities given: nothing to name
    assert any(t.get_text().endswith(f"without edges > {(weakest + strongest) / 2:g}") for t in fig.axes[0].texts)


def test_plot_interaction_graph_cap_keeps_the_most_important_features_and_says_so():
    graph = _modules_graph()
    fig = plot_interaction_graph(graph, find_communities(graph, seed=0), max_nodes_per_layer=2,
                                 labels={node: f"{node[0]}{node[1]}" for node in graph.nodes})
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert {"a1", "a2", "b1", "b2", "c1", "c2"} <= set(texts) and "a3" not in texts
    assert "+ 3 more with edges (first 2 drawn)\n+ 2 without edges" in texts  # layer a: 5 carry edges, 2 none
    with pytest.raises(ValueError, match=r"min_weight must be >= 0, got -1"):
        plot_interaction_graph(graph, min_weight=-1)


def _overlap(a, b) -> bool:
    """Whether two display bboxes share more than a pixel of area."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1


@pytest.mark.parametrize("panels", [1, 2, 6])
def test_plot_spectra_texts_stay_inside_and_apart(panels):
    gen = torch.Generator().manual_seed(panels)
    lam = torch.logspace(0, -15, 128, dtype=torch.float64) * (1 + 0.1 * torch.rand(128, generator=gen, dtype=torch.float64))
    names = [f"resid_{i}" for i in range(panels)]
    names[-1] = "transformer.h.11.mlp.hook_post_activation_of_a_rather_long_module_name"
    spectra = {name: {"lib": lam[: 100 + 5 * i], "pca": lam.sqrt()} for i, name in enumerate(names)}
    title = "Λ (LIB) and variances (PCA) of a model with a long name, at step 123456 of a long run"
    fig = plot_spectra(spectra, title=title)
    figure_to_array(fig)  # draws: tick labels exist from here
    renderer = fig.canvas.get_renderer()
    inside = fig.bbox.padded(1)
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]  # panel, its ticks, labels, title, legend
    suptitle = fig._suptitle.get_window_extent(renderer)
    for box in boxes + [suptitle]:
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
    for i, box in enumerate(boxes):
        assert not _overlap(box, suptitle)
        assert not any(_overlap(box, other) for other in boxes[i + 1:])
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            assert len(labels) >= 2
            assert all("$" not in t.get_text() for t in labels)  # plain text, no mathtext
            extents = [t.get_window_extent(renderer) for t in labels]
            assert not any(_overlap(a, b) for j, a in enumerate(extents) for b in extents[j + 1:])
        assert [t.get_text() for t in ax.yaxis.get_ticklabels(minor=True) if t.get_text()] == []


def test_plot_spectra_under_one_decade_keeps_matplotlibs_labels():
    fig = plot_spectra({"a": {"lib": torch.tensor([1.0, 0.9, 0.5, 0.3], dtype=torch.float64)}}, title="flat")
    figure_to_array(fig)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.yaxis.get_ticklabels(minor=True) if t.get_text()]  # minor ticks labelled
