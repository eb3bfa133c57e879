"""The LIB engine: from a model and its module names to bases and interaction graphs (spec §2–§4).

Node layers and their capture (``nodes``, ``capture``, ``batch``, ``modes``), the section checks and the
memory guard (``checks``, ``memory``), the statistics and bases (``stats``, ``basis``), the integrated
Jacobians and their rules (``jacobian``, ``integration``), the build in named passes (``build``: the
statistics pass in ``passes``, then per section the Jacobian pass and the edges pass in ``section``,
with the Jacobian ``cache`` between them) and the graphs with their files (``graph``, ``files``).

May import: torch, numpy and ``lib_lightning.core.validation``; never metrics, interpret, tasks or
Lightning.
"""

from lib_lightning.core.lib.build import KINDS, build_graphs, check_build, default_reuse_rtol, default_vjp_rows

__all__ = ["KINDS", "build_graphs", "check_build", "default_reuse_rtol", "default_vjp_rows"]
