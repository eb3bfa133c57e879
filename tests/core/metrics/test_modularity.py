import json
import math
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch

from lib_lightning.core.metrics.modularity import find_communities, interaction_graph, log_cutoff, newman_modularity


def _section(inner: list[list[float]], fill: float = 1e3) -> torch.Tensor:
    """An edge matrix with ``inner`` as its non-constant block and a heavy constant row and column."""
    inner = torch.tensor(inner, dtype=torch.float64)
    edges = torch.full((inner.shape[0] + 1, inner.shape[1] + 1), fill, dtype=torch.float64)
    edges[1:, 1:] = inner
    return edges


# (3, 4): layer "b" has features 1..2, layer "a" features 1..3. Asymmetric: a transpose changes the graph.
E_AB = _section([[100.0, 1.0, 0.0], [0.0, 10.0, 1000.0]])
E_BC = _section([[4.0, 0.0], [0.0, 9.0], [1.0, 1.0]])  # (4, 3): layer "c" has features 1..3


def test_log_weights_with_explicit_cutoffs():
    graph = interaction_graph([E_AB, E_BC], ["a", "b", "c"], weighting="log", cutoffs=[1.0, 0.5])
    assert sorted(graph.nodes) == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("c", 1), ("c", 2), ("c", 3)]
    assert graph.nodes["c", 3] == {"layer": "c", "layer_index": 2, "feature": 3}
    weights = {tuple(sorted((u, v))): w for u, v, w in graph.edges(data="weight")}
    expected = {
        (("a", 1), ("b", 1)): 2.0,  # E[b1, a1] = 100
        (("a", 2), ("b", 2)): 1.0,  # E[b2, a2] = 10; E[b1, a2] = 1 gives log 0 and is left out
        (("a", 3), ("b", 2)): 3.0,
        (("b", 1), ("c", 1)): math.log10(8.0),
        (("b", 2), ("c", 2)): math.log10(18.0),
        (("b", 1), ("c", 3)): math.log10(2.0),
        (("b", 2), ("c", 3)): math.log10(2.0),
    }
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        assert weights[key] == pytest.approx(value, abs=1e-12)
    assert graph.edges[("a", 3), ("b", 2)]["raw"] == 1000.0
    assert graph.graph["cutoffs"] == (1.0, 0.5)


def test_log_cutoff_is_smallest_edge_holding_the_fraction():
    # section a->b: sorted 1000, 100, 10, 1 (total 1111); 99 % = 1099.89 needs 1000 + 100,
    # 99.5 % = 1105.4 needs 1000 + 100 + 10
    assert log_cutoff(E_AB[1:, 1:], 0.99) == 100.0
    assert log_cutoff(E_AB[1:, 1:], 0.995) == 10.0
    assert log_cutoff(E_AB[1:, 1:], 0.5) == 1000.0
    assert log_cutoff(torch.zeros(2, 2), 0.9) == 0.0
    graph = interaction_graph([E_AB], ["a", "b"], log_cutoff_fraction=0.995)
    assert graph.graph["cutoffs"] == (10.0,)
    weights = {tuple(sorted((u, v))): w for u, v, w in graph.edges(data="weight")}
    # the cutoff edge itself has log weight 0 and is left out, as in the reference
    assert weights == pytest.approx({(("a", 1), ("b", 1)): 1.0, (("a", 3), ("b", 2)): 2.0})


def test_sqrt_and_normalized_weights():
    sqrt = interaction_graph([E_AB], ["a", "b"], weighting="sqrt")
    assert sqrt.number_of_edges() == 4  # exact zeros dropped
    assert sqrt.edges[("a", 3), ("b", 2)]["weight"] == pytest.approx(math.sqrt(1000.0))
    normalized = interaction_graph([E_AB, E_BC], ["a", "b", "c"], weighting="normalized")
    for section, (u, v) in ((0, ("a", "b")), (1, ("b", "c"))):
        total = sum(w for x, y, w in normalized.edges(data="weight") if {x[0], y[0]} == {u, v})
        assert total == pytest.approx(1.0, abs=1e-12), section
    assert normalized.edges[("a", 1), ("b", 1)]["weight"] == pytest.approx(100.0 / 1111.0)


def test_constant_included_on_request():
    graph = interaction_graph([E_AB], ["a", "b"], weighting="sqrt", exclude_constant=False)
    assert graph.number_of_nodes() == 4 + 3
    assert graph.edges[("a", 0), ("b", 0)]["raw"] == 1e3


@pytest.mark.parametrize(
    "edges, names, kwargs, match",
    [
        ([E_AB, E_AB], ["a", "b", "c"], {},
         r"node layer 'b' has 3 features .*edges\[0\] \(a -> b.*but 4 .*edges\[1\] \(b -> c"),
        ([E_AB], ["a", "b", "c"], {}, r"one more layer name than edge matrices, got 3 names for 1 sections"),
        ([E_AB, E_BC], ["a", "b", "a"], {}, r"distinct"),
        ([E_AB], ["a", "b"], {"weighting": "cube"},
         r"weighting must be one of \('log', 'sqrt', 'normalized'\), got 'cube'"),
        ([E_AB], ["a", "b"], {"cutoffs": [0.0]}, r"cutoffs must be 1 positive numbers"),
        ([-E_AB], ["a", "b"], {}, r"edges\[0\] \(a -> b\) must be non-negative"),
        ([E_AB[0]], ["a", "b"], {}, r"must be 2-D"),
    ],
)
def test_interaction_graph_bad_input(edges, names, kwargs, match):
    with pytest.raises(ValueError, match=match):
        interaction_graph(edges, names, **kwargs)


def _two_cliques(bridge: float) -> nx.Graph:
    graph = nx.Graph()
    for offset in (0, 4):
        graph.add_weighted_edges_from((offset + i, offset + j, 1.0) for i in range(4) for j in range(i + 1, 4))
    graph.add_edge(3, 4, weight=bridge)
    return graph


def test_planted_two_cliques():
    graph = _two_cliques(bridge=1.0)
    result = find_communities(graph, seed=0)
    assert result.communities == (frozenset({0, 1, 2, 3}), frozenset({4, 5, 6, 7}))
    assert result.sizes == (4, 4) and result.n_nonsingleton == 2
    assert result.membership == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1, 7: 1}
    # Q = Σ_c W_in/W - (vol/2W)² with W = 13, W_in = 6, vol = 13: 12/13 - 1/2
    assert result.modularity == pytest.approx(12 / 13 - 0.5, abs=1e-12)
    reference = nx.community.modularity(graph, [{0, 1, 2, 3}, {4, 5, 6, 7}], weight="weight")
    assert result.modularity == pytest.approx(reference, abs=1e-12)
    json.dumps(result.to_dict())


def test_layered_blocks_give_modules_spanning_layers_and_seed_determinism():
    gen = torch.Generator().manual_seed(0)
    blocks = []
    for k in (6, 6):  # two block-diagonal sections with weak noise between the blocks
        e = torch.rand(k + 1, k + 1, generator=gen, dtype=torch.float64) * 1e-3
        e[1:4, 1:4] += 1.0
        e[4:, 4:] += 1.0
        blocks.append(e)
    graph = interaction_graph(blocks, ["x", "y", "z"], weighting="sqrt")
    first = find_communities(graph, seed=3)
    assert first.sizes == (9, 9)
    assert {node[1] <= 3 for node in first.communities[0]} in ({True}, {False})
    assert {node[0] for node in first.communities[0]} == {"x", "y", "z"}
    again = find_communities(graph, seed=3)
    assert again.communities == first.communities and again.modularity == first.modularity
    assert first.modularity == pytest.approx(nx.community.modularity(graph, first.communities), abs=1e-12)
    json.dumps(first.to_dict())


def test_higher_resolution_splits_more_but_reports_q_at_one():
    graph = _two_cliques(bridge=1.0)
    fine = find_communities(graph, resolution=5.0, seed=0)
    assert len(fine.communities) > 2
    assert fine.modularity == pytest.approx(nx.community.modularity(graph, fine.communities, resolution=1))


def test_graph_without_edges():
    graph = nx.Graph()
    graph.add_nodes_from([("a", 1), ("a", 2), ("b", 1)])
    result = find_communities(graph)
    assert result.modularity == 0.0 and result.n_nonsingleton == 0
    assert result.communities == (frozenset({("a", 1)}), frozenset({("a", 2)}), frozenset({("b", 1)}))
    assert result.to_dict()["communities"] == [[["a", 1]], [["a", 2]], [["b", 1]]]


def test_find_communities_bad_input():
    graph = _two_cliques(bridge=1.0)
    with pytest.raises(ValueError, match=r"method must be one of \('louvain', 'leiden'\), got 'kmeans'"):
        find_communities(graph, method="kmeans")
    with pytest.raises(ValueError, match=r"resolution must be > 0, got 0"):
        find_communities(graph, resolution=0)


def test_leiden_without_backend_says_what_works():
    try:
        nx.community.leiden_communities(_two_cliques(1.0), seed=0)
    except NotImplementedError:
        with pytest.raises(RuntimeError, match=r"backend.*method='louvain'"):
            find_communities(_two_cliques(1.0), method="leiden")
    else:
        assert find_communities(_two_cliques(1.0), method="leiden").n_nonsingleton == 2


def test_exclude_constant_per_layer_keeps_an_uncentred_layers_feature_zero():
    graph = interaction_graph([E_AB], ["a", "b"], weighting="sqrt", exclude_constant=[False, True])
    assert ("a", 0) in graph.nodes and ("b", 0) not in graph.nodes
    assert all(node != ("b", 0) for edge in graph.edges for node in edge)
    with pytest.raises(ValueError, match=r"exclude_constant must be a bool or 2 bools \(one per layer\)"):
        interaction_graph([E_AB], ["a", "b"], exclude_constant=[True])


def _random_graph(seed: int = 0, layers: int = 4, width: int = 16) -> nx.Graph:
    """Features of consecutive layers joined by random weights; nodes named like the interaction graph's
    (a tuple holding a string, whose hash changes with PYTHONHASHSEED), plus one self-loop."""
    gen = torch.Generator().manual_seed(seed)
    graph = nx.Graph()
    for layer in range(layers - 1):
        weights = torch.rand(width, width, generator=gen, dtype=torch.float64) ** 3
        for i in range(width):
            for j in range(width):
                if weights[i, j] > 0.05:
                    graph.add_edge((f"layer{layer}", i), (f"layer{layer + 1}", j), weight=float(weights[i, j]))
    graph.add_edge(("layer0", 0), ("layer0", 0), weight=0.7)
    return graph


def test_newman_modularity_is_networkx_s():
    for seed in range(3):
        graph = _random_graph(seed)
        nodes = list(graph.nodes)
        for parts in (nx.community.louvain_communities(graph, weight="weight", seed=seed),
                      [set(nodes[: len(nodes) // 3]), set(nodes[len(nodes) // 3:])], [set(nodes)]):
            want = nx.community.modularity(graph, parts, weight="weight", resolution=1)
            assert newman_modularity(graph, parts) == pytest.approx(want, rel=1e-12, abs=1e-13)  # Q is O(1)


def test_modularity_has_the_same_bits_whatever_the_hash_seed():
    """The score was summed by networkx over sets of node names, in their hash order: its last bits
    changed from one process to the next. Two processes with different PYTHONHASHSEED now agree exactly."""
    code = ("from tests.core.metrics.test_modularity import _random_graph; "
            "from lib_lightning.core.metrics.modularity import find_communities; "
            "print(repr(find_communities(_random_graph(1, layers=6, width=24)).modularity))")
    root = Path(__file__).resolve().parents[3]
    values = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
        values.add(out.stdout.strip())
    assert len(values) == 1, values
