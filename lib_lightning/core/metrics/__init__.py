"""What the callbacks log, computed from graphs and bases: degeneracy, co-firing, interaction sparsity,
modularity, the evolution between analyses and the per-analysis summary.

Small pure functions of tensors (and networkx for communities). May import: torch, networkx,
``lib_lightning.core.lib`` and ``lib_lightning.core.validation``; never interpret, tasks or Lightning.
"""
