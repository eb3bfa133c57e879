"""Old module paths of the flat core (before issue 12), kept importing for user code and configs.

``import lib_lightning.core.capture`` (or ``from lib_lightning.core import batch``) returns the module at
its new home, ``lib_lightning.core.lib.capture``: the same module object, so monkeypatching and
``isinstance`` behave as before. The new module is imported only when an old path is asked for, so
the core never imports the task packages on its own. New code uses the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

__all__ = ["MOVED", "install"]

_ENGINE = ("nodes", "capture", "checks", "memory", "batch", "stats", "basis", "jacobian", "integration")
_METRICS = ("degeneracy", "coactivation", "sparsity", "modularity", "evolution", "summary")
MOVED: dict[str, str] = {
    **{f"lib_lightning.core.{name}": f"lib_lightning.core.lib.{name}" for name in _ENGINE},
    **{f"lib_lightning.core.{name}": f"lib_lightning.core.lib.{name}" for name in ("graph", "files", "modes")},
    **{f"lib_lightning.core.{name}": f"lib_lightning.core.metrics.{name}" for name in _METRICS},
    **{f"lib_lightning.core.{name}": f"lib_lightning.core.interpret.{name}" for name in ("ablation", "edge_ablation")},
    **{f"lib_lightning.core.{name}": f"lib_lightning.tasks.modadd.{name}" for name in ("fourier", "progress")},
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path in :data:`MOVED` and loads it as the module at the new path."""

    def find_spec(self, fullname, path, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was executed under its new name."""


def install() -> None:
    """Adds the finder once (idempotent, so reloading the core does not stack finders)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
