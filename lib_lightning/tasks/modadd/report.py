"""The modular-addition part of the offline analysis (``python -m lib_lightning analyze``): Fourier labels
of every LIB feature, key frequencies, community purity and the progress measures, as one JSON-able dict.

Pure torch (and networkx through the metrics): the caller passes the model, its forward and the p² pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lib_lightning.core.lib.capture import NodeLayer, capture
from lib_lightning.core.lib.graph import InteractionGraph
from lib_lightning.core.lib.modes import analysis_mode
from lib_lightning.core.metrics.modularity import find_communities, interaction_graph
from lib_lightning.core.metrics.summary import short_names
from lib_lightning.tasks.modadd.fourier import (
    community_frequencies,
    embedding_frequency_power,
    fourier_labels,
    grid_spectrum,
    key_frequencies,
    logit_frequency_power,
)
from lib_lightning.tasks.modadd.progress import progress_measures

__all__ = ["fourier_report"]

CHUNK = 4096  # pairs per forward pass


def _feature_rows(lib: InteractionGraph, i: int, feats: torch.Tensor, p: int, name: str, fractions, label_of):
    """One row per LIB feature of layer i (its Fourier label and dominant frequency); fills the per-node
    frequency fractions and short labels used by the communities and the graph figure."""
    spec = grid_spectrum(feats, p)
    texts = fourier_labels(spec)
    short = fourier_labels(spec, min_fraction=0.25, max_terms=2)
    rows = []
    for f in range(lib.layers[i].d_lib):
        fractions[(name, f)] = spec.frequency_fractions[f]
        label_of[(name, f)] = short[f]
        rows.append({"feature": f, "lambda": float(lib.layers[i].lambdas[f]), "label": texts[f],
                     "dominant": int(spec.dominant[f]),
                     "dominant_fraction": float(spec.frequency_fractions[f].max()),
                     "variance": float(spec.variance[f])})  # fmt: skip
    return rows


def _communities(graph, communities, fractions, key) -> list[dict[str, Any]]:
    weights = {node: graph.degree(node, weight="weight") for node in graph.nodes}
    return [vars(c) for c in community_frequencies(communities.membership, fractions, weights, key)]


def fourier_report(
    task: nn.Module,
    forward: Callable[[nn.Module, Any], torch.Tensor],
    graphs: dict[str, InteractionGraph],
    summary: Any,
    pairs: tuple[torch.Tensor, torch.Tensor],
    train_idx: torch.Tensor,
    key_threshold: float,
    cutoffs: list[float] | None,
    seed: int,
) -> dict[str, Any]:
    """Fourier labels of every LIB feature, key frequencies, community purity and progress measures.

    ``task`` holds the transformer as ``task.model`` (``p``, ``embed``); ``pairs``: every (a, b) token
    pair and its label; ``train_idx``: the training pairs (excluded from the excluded loss). The node
    labels for the graph figure come back under ``"_labels"``.
    """
    p = task.model.p
    tokens, labels = pairs
    lib = graphs["lib"]
    names = short_names(lib.layer_names)
    keep = [i for i, layer in enumerate(lib.layers) if layer.has_constant]
    with torch.no_grad(), analysis_mode(task, torch.float64):
        parts = [capture(task, [NodeLayer.parse(lib.layer_names[i]) for i in keep], tokens[s : s + CHUNK], forward)
                 for s in range(0, p * p, CHUNK)]  # fmt: skip
        logits = torch.cat([forward(task, tokens[s : s + CHUNK]) for s in range(0, p * p, CHUNK)])
        embed = task.model.embed.weight[:p].clone()
    features, fractions, label_of = {}, {}, {}
    for j, i in enumerate(keep):
        feats = lib.layers[i].transform(torch.cat([part[j] for part in parts]))  # (p*p, pos, d_lib)
        features[names[i]] = _feature_rows(lib, i, feats, p, names[i], fractions, label_of)
    power_embed, power_logits = embedding_frequency_power(embed), logit_frequency_power(logits, p)
    key = key_frequencies(power_embed, key_threshold)
    key_logits = key_frequencies(power_logits, key_threshold)
    out: dict[str, Any] = {"p": p, "key_threshold": key_threshold,
                           "key_frequencies": {"embedding": key, "logits": key_logits},
                           "power": {"embedding": (power_embed / power_embed.sum()).tolist(),
                                     "logits": (power_logits / power_logits.sum()).tolist()}}  # fmt: skip
    if summary.communities is not None:
        out["communities"] = _communities(summary.graph, summary.communities, fractions, key)
        out["modularity"] = summary.communities.modularity
    if cutoffs is not None and all(c > 0 for c in cutoffs):
        # The reference's weighting: ε_l = the weakest edge kept at the bisection threshold (LIB_SPEC.md §6).
        graph = interaction_graph([lib.edges[i] for i in keep[:-1]], [names[i] for i in keep], cutoffs=cutoffs)
        comms = find_communities(graph, seed=seed)
        out["communities_ablation_cutoffs"] = _communities(graph, comms, fractions, key)
        out["modularity_ablation_cutoffs"] = comms.modularity
    out["progress"] = vars(progress_measures(logits, labels, p, key, excluded_index=train_idx)) if key else None
    out["features"] = features
    return out | {"_labels": label_of}
