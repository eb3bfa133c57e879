"""The numerical core: pure PyTorch (and networkx for graphs), no Lightning.

Split by purpose: ``lib`` (the LIB engine: node layers, capture, statistics, bases, Jacobians, the build
and the graph files), ``metrics`` (what the callbacks log), ``interpret`` (node and edge ablation) and
``llc`` (the SGLD estimator). ``validation`` is the one home of argument checks shared by the core and
the callbacks. Nothing here imports Lightning, the callbacks, the tasks or the CLI; the old flat module
paths (``lib_lightning.core.capture`` ...) still import, as the modules at their new homes (``_moved``).
"""

from lib_lightning.core import _moved
from lib_lightning.core.lib import build_graphs, check_build
from lib_lightning.core.lib.basis import LayerBasis
from lib_lightning.core.lib.checks import CutError, IndependenceError
from lib_lightning.core.lib.graph import InteractionGraph, load_graphs, save_graphs
from lib_lightning.core.lib.memory import MemoryBudgetError
from lib_lightning.core.lib.nodes import LAYOUTS, NodeLayer
from lib_lightning.core.metrics.summary import SummaryOptions, summarise

_moved.install()

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
    "check_build",
    "load_graphs",
    "save_graphs",
    "summarise",
]
