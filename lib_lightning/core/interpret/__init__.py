"""Offline interpretation tools that work on any model: node ablation and edge ablation in a basis.

May import: torch, ``lib_lightning.core.lib`` and ``lib_lightning.core.validation``; never metrics,
tasks or Lightning.
"""
