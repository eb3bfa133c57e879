"""The local learning coefficient (LLC): the SGLD estimator and its refinements, the samplers, sampler
health and calibration. Pure torch; imports nothing from Lightning.

- :mod:`.estimator`: :func:`estimate_llc` (whole model, a subset of the weights, any data set).
- :mod:`.samplers`: SGLD and RMSprop-preconditioned SGLD, with per-step health terms.
- :mod:`.health`: trend and standard error of the draws; the documented health thresholds.
- :mod:`.sections`: the parameters between consecutive node layers (sections for a refined LLC).
- :mod:`.calibration`: sweeps of ε and nβ and the recommended setting.
"""

from lib_lightning.core.llc.calibration import LLCCalibration, calibrate, recommend
from lib_lightning.core.llc.estimator import LLCEstimate, default_nbeta, estimate_llc, select_params
from lib_lightning.core.llc.health import HealthLimits, health_problems
from lib_lightning.core.llc.samplers import SAMPLERS
from lib_lightning.core.llc.sections import parameter_sections

__all__ = [
    "SAMPLERS",
    "HealthLimits",
    "LLCCalibration",
    "LLCEstimate",
    "calibrate",
    "default_nbeta",
    "estimate_llc",
    "health_problems",
    "parameter_sections",
    "recommend",
    "select_params",
]
