import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from lib_lightning.core.modularity import find_communities, interaction_graph
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
