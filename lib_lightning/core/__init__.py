"""The numerical core: pure PyTorch (and networkx for graphs), no Lightning."""

from lib_lightning.core.basis import LayerBasis
from lib_lightning.core.checks import CutError, IndependenceError
from lib_lightning.core.graph import InteractionGraph, load_graphs, save_graphs
from lib_lightning.core.lib import build_graphs
from lib_lightning.core.memory import MemoryBudgetError
from lib_lightning.core.nodes import LAYOUTS, NodeLayer
from lib_lightning.core.summary import SummaryOptions, summarise

__all__ = [
    "CutError",
    "IndependenceError",
    "InteractionGraph",
    "LAYOUTS",
    "LayerBasis",
    "MemoryBudgetError",
    "NodeLayer",
    "SummaryOptions",
    "build_graphs",
    "load_graphs",
    "save_graphs",
    "summarise",
]
